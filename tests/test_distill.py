"""Distillation: the four divergences against float64 brute force, their gradients and zeros, the weighted reducer,
1 − tv as the acceptance rate, the buffer's token bound, recency weighting, ageing, collation alignment and
thread safety, and `PolicyTargets` validation."""

import math
import threading

import pytest
import torch

from adaptive_drafter import acceptance
from adaptive_drafter.distill import (
    DistillBatch,
    DistillBuffer,
    PolicyTargets,
    collate,
    distill_loss,
    fkl_loss,
    jsd_loss,
    recency_weights,
    rkl_loss,
    tv_loss,
)

LOSS_FNS = {"fkl": fkl_loss, "rkl": rkl_loss, "tv": tv_loss, "jsd": jsd_loss}
GEN = lambda seed=0: torch.Generator().manual_seed(seed)  # noqa: E731
NEG_INF = float("-inf")


# ---- helpers ---------------------------------------------------------------------------------------------------


def random_targets(batch=3, length=6, vocab=13, k=5, seed=0):
    """Drafter logits, distinct top-K ids, policy logprobs with some -inf entries (never all of a position), and a
    mask whose masked-out positions hold all -inf logprobs (the worst padding)."""
    gen = GEN(seed)
    logits = torch.randn(batch, length, vocab, generator=gen) * 2
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(batch * length)]).view(batch, length, k)
    logprobs = torch.randn(batch, length, k, generator=gen) * 2 - 3  # unnormalised on purpose
    zero = torch.rand(batch, length, k, generator=gen) < 0.3
    zero[..., 0] = False
    logprobs = logprobs.masked_fill(zero, NEG_INF)
    mask = torch.rand(batch, length, generator=gen) < 0.7
    mask[0, 0] = True
    logprobs = logprobs.masked_fill(~mask[..., None], NEG_INF)
    return logits, ids, logprobs, mask


def reference(kind: str, logits, ids, logprobs, mask) -> torch.Tensor:
    """Plain-Python float64 evaluation of the documented formula at every position."""
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if not mask[b, t]:
                continue
            lp = [float(x) for x in logprobs[b, t]]
            z = [float(logits[b, t, i]) for i in ids[b, t]]
            p = [math.exp(x) if x > NEG_INF else 0.0 for x in lp]
            p = [x / sum(p) for x in p]
            q = [math.exp(x) for x in z]
            q = [x / sum(q) for x in q]
            if kind == "fkl":
                value = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)
            elif kind == "rkl":
                qs = [qi if pi > 0 else 0.0 for pi, qi in zip(p, q)]
                qs = [x / sum(qs) for x in qs]
                value = sum(qi * math.log(qi / pi) for pi, qi in zip(p, qs) if pi > 0)
            elif kind == "tv":
                value = 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q))
            else:
                m = [(pi + qi) / 2 for pi, qi in zip(p, q)]
                value = 0.5 * sum(pi * math.log(pi / mi) for pi, mi in zip(p, m) if pi > 0)
                value += 0.5 * sum(qi * math.log(qi / mi) for qi, mi in zip(q, m) if qi > 0)
            out[b, t] = value
    return out


def make_row(prompt_len=3, num=4, k=3, version=0, tag=0, seed=0) -> PolicyTargets:
    gen = GEN(seed)
    drafted = torch.rand(num, generator=gen) < 0.7
    topk_ids = torch.stack([torch.randperm(50, generator=gen)[:k] for _ in range(num)] or [torch.zeros(0, k)])
    return PolicyTargets(
        prompt_ids=[tag] * prompt_len,
        completion_ids=torch.randint(0, 50, (num,), generator=gen).tolist(),
        topk_ids=topk_ids.view(num, k).long(),
        topk_logprobs=torch.randn(num, k, generator=gen).half(),
        drafted=drafted,
        accepted=drafted & (torch.rand(num, generator=gen) < 0.5),
        policy_version=version,
    )


# ---- losses ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(LOSS_FNS))
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_matches_brute_force(kind, seed):
    logits, ids, logprobs, mask = random_targets(seed=seed)
    got = LOSS_FNS[kind](logits, ids, logprobs, mask)
    assert got.shape == mask.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference(kind, logits, ids, logprobs, mask), atol=2e-6, rtol=1e-5)
    assert (got[~mask] == 0).all()


@pytest.mark.parametrize("kind", list(LOSS_FNS))
def test_gradients_flow_and_are_finite(kind):
    logits, ids, logprobs, mask = random_targets(seed=2)
    for dtype in (torch.float32, torch.bfloat16):  # a drafter on an accelerator gives bf16 logits
        logits = logits.to(dtype).requires_grad_()
        loss = LOSS_FNS[kind](logits, ids, logprobs, mask)
        assert loss.dtype == torch.float32
        loss.sum().backward()
        grad = logits.grad
        assert grad.dtype == dtype and torch.isfinite(grad).all()
        assert grad[mask].abs().sum() > 0
        assert (grad[~mask] == 0).all()  # masked positions, all -inf targets included, get no gradient
        logits = logits.detach()


@pytest.mark.parametrize("kind", list(LOSS_FNS))
def test_loss_is_zero_when_drafter_matches_policy_on_the_k_ids(kind):
    logits, ids, logprobs, mask = random_targets(seed=3)
    # Off-K logits stay random (they are ignored); on the K ids, the policy's logprobs up to a per-position shift.
    shift = torch.randn(mask.shape, generator=GEN(4))[..., None]
    matched = logits.scatter(-1, ids, logprobs.clamp_min(-1e9) + shift)
    assert LOSS_FNS[kind](matched, ids, logprobs, mask).abs().max() < 1e-6
    assert LOSS_FNS[kind](logits, ids, logprobs, mask)[mask].min() > 1e-4


def test_rkl_ignores_drafter_mass_on_zero_probability_ids_but_others_do_not():
    ids, logprobs, mask = torch.tensor([[[0, 1, 2]]]), torch.tensor([[[0.0, -1.0, NEG_INF]]]), torch.tensor([[True]])
    logits = torch.tensor([[[0.0, -1.0, 5.0]]])  # P's shape on ids 0, 1 but most mass on id 2, where P is 0
    assert rkl_loss(logits, ids, logprobs, mask).item() == pytest.approx(0.0, abs=1e-6)
    for fn in (fkl_loss, tv_loss, jsd_loss):
        assert fn(logits, ids, logprobs, mask).item() > 0.1


def test_one_minus_tv_is_the_acceptance_rate_on_the_full_vocabulary():
    gen, vocab = GEN(5), 7
    p_logits, q_logits = torch.randn(2, vocab, generator=gen) * 2
    ids = torch.randperm(vocab, generator=gen)
    p, q = p_logits.softmax(-1), q_logits.softmax(-1)
    tv = tv_loss(q_logits.view(1, 1, vocab), ids.view(1, 1, vocab), p_logits[ids].view(1, 1, vocab),
                 torch.ones(1, 1, dtype=torch.bool))
    assert 1 - tv.item() == pytest.approx(torch.minimum(p, q).sum().item(), abs=1e-6)
    # ...and the exact acceptance rule accepts a draft sampled from q at that rate (Monte Carlo).
    samples = 40_000
    draft = torch.multinomial(q, samples, replacement=True, generator=gen)[:, None]
    n, _ = acceptance.exact(draft, q.expand(samples, 1, vocab), p.expand(samples, 2, vocab), gen)
    assert n.float().mean().item() == pytest.approx(1 - tv.item(), abs=0.015)


def as_batch(logits, ids, logprobs, mask, rejected) -> DistillBatch:
    batch, length = mask.shape
    tokens = torch.zeros(batch, length, dtype=torch.long)
    return DistillBatch(tokens, tokens + 1, ids, logprobs, mask, rejected & mask, torch.zeros(batch, dtype=torch.long))


@pytest.mark.parametrize("kind", list(LOSS_FNS))
def test_distill_loss_masks_and_weights_rejected_positions(kind):
    logits, ids, logprobs, mask = random_targets(seed=6)
    rejected = (torch.rand(mask.shape, generator=GEN(7)) < 0.4) & mask
    assert rejected.any() and (mask & ~rejected).any()
    per = LOSS_FNS[kind](logits, ids, logprobs, mask)
    batch = as_batch(logits, ids, logprobs, mask, rejected)

    plain = distill_loss(logits, batch, kind)
    assert plain.item() == pytest.approx(per[mask].mean().item(), rel=1e-5)
    weighted = distill_loss(logits, batch, kind, rejected_weight=3.0)
    expected = (per[mask & ~rejected].sum() + 3 * per[rejected].sum()) / ((mask & ~rejected).sum() + 3 * rejected.sum())
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-5)
    # Weight 0 on every unrejected position (via the mask) is the loss over rejected positions only...
    only_rejected = as_batch(logits, ids, logprobs, rejected, rejected)
    assert distill_loss(logits, only_rejected, kind, rejected_weight=5.0).item() == pytest.approx(
        per[rejected].mean().item(), rel=1e-5
    )
    # ...and rejected_weight 0 is the loss over the others.
    assert distill_loss(logits, batch, kind, rejected_weight=0.0).item() == pytest.approx(
        per[mask & ~rejected].mean().item(), rel=1e-5
    )


def test_distill_loss_mix_is_the_weighted_sum_and_bad_kinds_are_rejected():
    logits, ids, logprobs, mask = random_targets(seed=8)
    batch = as_batch(logits, ids, logprobs, mask, torch.zeros_like(mask))
    mix = distill_loss(logits, batch, "mix", mix_weights={"fkl": 0.25, "tv": 2.0})
    expected = 0.25 * distill_loss(logits, batch, "fkl") + 2.0 * distill_loss(logits, batch, "tv")
    assert mix.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="fkl, rkl, tv, jsd, mix"):
        distill_loss(logits, batch, "kl")
    with pytest.raises(ValueError, match="mix_weights"):
        distill_loss(logits, batch, "mix")
    with pytest.raises(ValueError, match="Unknown mix_weights"):
        distill_loss(logits, batch, "mix", mix_weights={"ce": 1.0})
    with pytest.raises(ValueError, match="rejected_weight"):
        distill_loss(logits, batch, "tv", rejected_weight=-1.0)
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        tv_loss(logits, ids, logprobs, mask[:, 1:])


def test_distill_loss_on_an_empty_mask_is_zero_with_a_gradient():
    logits, ids, logprobs, mask = random_targets(seed=9)
    logits.requires_grad_()
    loss = distill_loss(logits, as_batch(logits, ids, logprobs, torch.zeros_like(mask), mask), "rkl")
    loss.backward()
    assert loss.item() == 0 and (logits.grad == 0).all()


# ---- buffer ----------------------------------------------------------------------------------------------------


def test_buffer_token_bound_evicts_oldest_first_and_truncates_oversize_rows():
    buffer = DistillBuffer(max_tokens=10)
    lengths = [4, 3, 5, 2, 6, 1, 1, 9]
    for tag, num in enumerate(lengths):
        buffer.add(make_row(num=num, tag=tag, seed=tag))
        assert buffer.num_tokens <= 10
        # The rows held are the longest suffix of what was added that fits.
        held, total = [], 0
        for t in range(tag, -1, -1):
            if total + lengths[t] > 10:
                break
            held.insert(0, t)
            total += lengths[t]
        assert len(buffer) == len(held) and buffer.num_tokens == total
    buffer.add(make_row(num=25, tag=99))
    assert len(buffer) == 1 and buffer.num_tokens == 10
    batch = buffer.sample(1)
    assert batch.loss_mask.sum() == 10 and batch.input_ids[0, 0] == 99
    buffer.add(make_row(num=0))  # no target: not stored
    assert len(buffer) == 1


def test_buffer_rows_must_share_k():
    buffer = DistillBuffer(max_tokens=100)
    buffer.add(make_row(k=3))
    with pytest.raises(ValueError, match="top-K"):
        buffer.add(make_row(k=4))
    with pytest.raises(ValueError, match="empty"):
        DistillBuffer(10).sample(2)
    with pytest.raises(ValueError, match="max_tokens"):
        DistillBuffer(0)
    with pytest.raises(ValueError, match="recency_half_life"):
        DistillBuffer(10, recency_half_life=0)


def test_recency_weighting_matches_the_documented_weights():
    buffer = DistillBuffer(max_tokens=1000, recency_half_life=1.5)
    versions = [0, 1, 3, 3, 4]
    buffer.add_many([make_row(num=1, k=1, version=v, seed=i) for i, v in enumerate(versions)])
    expected = torch.tensor([0.5 ** ((4 - v) / 1.5) for v in versions], dtype=torch.float64)
    torch.testing.assert_close(recency_weights(versions, 1.5), expected)
    expected_by_version = {v: expected[[i for i, w in enumerate(versions) if w == v]].sum() / expected.sum()
                           for v in set(versions)}
    gen, draws = GEN(10), 6000
    sampled = torch.cat([buffer.sample(500, gen).policy_versions for _ in range(draws // 500)])
    for v, share in expected_by_version.items():
        assert (sampled == v).float().mean().item() == pytest.approx(share.item(), abs=0.02)
    # The newest version is sampled more often per row than older ones.
    assert (sampled == 4).float().mean() > (sampled == 1).float().mean() > (sampled == 0).float().mean()
    uniform = DistillBuffer(max_tokens=1000, recency_half_life=math.inf)
    uniform.add_many([make_row(num=1, k=1, version=v) for v in (0, 10)])
    assert (uniform.sample(4000, GEN(11)).policy_versions == 0).float().mean().item() == pytest.approx(0.5, abs=0.03)


def test_drop_older_than_and_versions():
    buffer = DistillBuffer(max_tokens=100)
    buffer.add_many([make_row(num=2, version=v) for v in (0, 0, 1, 2, 2, 2)])
    assert buffer.versions() == {0: 2, 1: 1, 2: 3}
    assert buffer.drop_older_than(2) == 3
    assert buffer.versions() == {2: 3} and len(buffer) == 3 and buffer.num_tokens == 6
    assert (buffer.sample(20, GEN()).policy_versions == 2).all()
    assert buffer.drop_older_than(3) == 3 and len(buffer) == 0 and buffer.num_tokens == 0


def test_collation_aligns_targets_to_logits_positions():
    row = PolicyTargets(
        prompt_ids=[5, 6, 7],
        completion_ids=[8, 9],
        topk_ids=torch.tensor([[8, 1], [2, 9]]),
        topk_logprobs=torch.tensor([[-0.1, -2.5], [-0.7, NEG_INF]], dtype=torch.float16),
        drafted=torch.tensor([True, True]),
        accepted=torch.tensor([True, False]),
        policy_version=7,
    )
    longer = make_row(prompt_len=2, num=5, k=2, version=3, tag=4)
    batch = collate([row, longer], pad_id=-1)
    assert batch.input_ids.shape == (2, 7) and batch.topk_ids.shape == (2, 7, 2)
    assert batch.input_ids[0].tolist() == [5, 6, 7, 8, 9, -1, -1]
    assert batch.attention_mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0]
    # Completion token t is predicted by logits position len(prompt) + t - 1: positions 2 and 3.
    assert batch.loss_mask[0].tolist() == [False, False, True, True, False, False, False]
    assert batch.topk_ids[0, 2].tolist() == [8, 1] and batch.topk_ids[0, 3].tolist() == [2, 9]
    assert batch.topk_logprobs.dtype == torch.float32
    torch.testing.assert_close(batch.topk_logprobs[0, 2:4], row.topk_logprobs.float())
    assert batch.rejected[0].tolist() == [False, False, False, True, False, False, False]
    assert batch.loss_mask[1].tolist() == [False, True, True, True, True, True, False]
    assert batch.input_ids[1, 2:].tolist() == longer.completion_ids
    assert batch.policy_versions.tolist() == [7, 3] and batch.num_targets == 7
    # The targets at each masked position describe the token the next input position holds.
    assert batch.input_ids[0, 3] in batch.topk_ids[0, 2] and batch.input_ids[0, 4] in batch.topk_ids[0, 3]


def test_buffer_is_thread_safe_under_concurrent_add_and_sample():
    buffer = DistillBuffer(max_tokens=40, recency_half_life=2.0)
    buffer.add(make_row(num=3))
    rows = [make_row(num=1 + i % 5, version=i // 20, seed=i) for i in range(200)]
    errors: list[BaseException] = []

    def producer():
        try:
            for row in rows:
                buffer.add(row)
                if row.policy_version % 3 == 2:
                    buffer.drop_older_than(row.policy_version - 1)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    thread = threading.Thread(target=producer)
    thread.start()
    gen = GEN(12)
    for _ in range(100):  # sampling keeps going while the producer adds, evicts and drops
        batch = buffer.sample(8, gen)
        assert batch.loss_mask.any() and batch.num_targets <= 8 * 5
        assert buffer.num_tokens <= 40
    thread.join()
    assert not errors
    assert buffer.num_tokens <= 40 and buffer.versions()


# ---- PolicyTargets validation ----------------------------------------------------------------------------------


def targets(**overrides) -> PolicyTargets:
    fields = dict(
        prompt_ids=[1, 2],
        completion_ids=[3, 4, 5],
        topk_ids=torch.zeros(3, 2, dtype=torch.long) + torch.tensor([3, 4]),
        topk_logprobs=torch.full((3, 2), -0.7),
        drafted=torch.tensor([True, True, False]),
        accepted=torch.tensor([True, False, False]),
    )
    return PolicyTargets(**{**fields, **overrides})


def test_policy_targets_accepts_a_valid_row():
    row = targets()
    assert row.num_tokens == 3 and row.rejected.tolist() == [False, True, False]
    assert targets(topk_logprobs=torch.tensor([[0.0, NEG_INF]] * 3)).num_tokens == 3


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(prompt_ids=[]), "prompt_ids is empty"),
        (dict(topk_ids=torch.zeros(2, 2, dtype=torch.long)), r"topk_ids must have shape \[T, K\] = \[3"),
        (dict(topk_ids=torch.zeros(3, dtype=torch.long)), "topk_ids must have shape"),
        (dict(topk_ids=torch.zeros(3, 0, dtype=torch.long)), "topk_ids must have shape"),
        (dict(topk_ids=torch.zeros(3, 2)), "integer token ids"),
        (dict(topk_logprobs=torch.zeros(3, 3)), "topk_logprobs must have the shape"),
        (dict(topk_logprobs=torch.zeros(3, 2, dtype=torch.long)), "floating point"),
        (dict(topk_logprobs=torch.tensor([[0.0, float("nan")]] * 3)), "NaN"),
        (dict(topk_logprobs=torch.tensor([[0.0, 0.0], [NEG_INF, NEG_INF], [0.0, 0.0]])), "all -inf"),
        (dict(drafted=torch.tensor([True, False])), r"drafted must be a bool tensor of shape \[3\]"),
        (dict(accepted=torch.tensor([1, 0, 0])), "accepted must be a bool tensor"),
        (dict(accepted=torch.tensor([True, False, True])), "no draft"),
    ],
)
def test_policy_targets_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        targets(**overrides)
