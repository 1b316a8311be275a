"""Distillation: the four divergences over the K ids and the other bucket against float64 brute force, their
gradients and zeros, the penalty on drafter mass outside the K ids, coarse-graining as a lower bound of the
full-vocabulary divergence, the weighted reducer, 1 − tv as the acceptance rate, the buffer's token bound, recency
weighting, ageing, collation alignment and thread safety, and `PolicyTargets` validation."""

import math
import threading

import pytest
import torch

from adaptive_drafter import acceptance
from adaptive_drafter.distill import distill_loss, fkl_loss, jsd_loss, rkl_loss, tv_loss
from adaptive_drafter.targets import DistillBatch, DistillBuffer, PolicyTargets, collate, recency_weights

LOSS_FNS = {"fkl": fkl_loss, "rkl": rkl_loss, "tv": tv_loss, "jsd": jsd_loss}
GEN = lambda seed=0: torch.Generator().manual_seed(seed)  # noqa: E731
NEG_INF = float("-inf")


# ---- helpers ---------------------------------------------------------------------------------------------------


def random_targets(batch=3, length=6, vocab=13, k=5, seed=0):
    """Drafter logits, distinct top-K ids, policy logprobs and a mask whose masked-out positions hold all -inf
    logprobs (the worst padding). Unmasked positions mix the three cases of the policy's mass Σ_k P_k: below 1 (mass
    outside the K ids), slightly above 1 (float16 rounding: renormalised), and exactly 1 (a single id with logprob 0,
    the rest -inf: a top-k filtered policy the K ids cover). Other positions have some -inf entries, never all."""
    gen = GEN(seed)
    logits = torch.randn(batch, length, vocab, generator=gen) * 2
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(batch * length)]).view(batch, length, k)
    zero = torch.rand(batch, length, k, generator=gen) < 0.3
    zero[..., 0] = False
    shape = (torch.randn(batch, length, k, generator=gen) * 2).masked_fill(zero, NEG_INF).log_softmax(-1)
    case = torch.randint(0, 3, (batch, length), generator=gen)
    mass = torch.where(case == 0, 0.2 + 0.75 * torch.rand(batch, length, generator=gen), torch.tensor(1.001))
    logprobs = shape + mass.log()[..., None]
    exact = torch.full((k,), NEG_INF)
    exact[0] = 0.0
    logprobs[case == 2] = exact
    mask = torch.rand(batch, length, generator=gen) < 0.7
    mask[0, 0] = True
    logprobs = logprobs.masked_fill(~mask[..., None], NEG_INF)
    return logits, ids, logprobs, mask


def buckets(logits_row, ids_row, logprobs_row) -> tuple[list[float], list[float]]:
    """The documented P and Q of one position in float64: the K ids, then (when K < V) the other bucket."""
    lp = [float(x) for x in logprobs_row]
    p = [math.exp(x) if x > NEG_INF else 0.0 for x in lp]
    z = [float(x) for x in logits_row]
    log_z = max(z) + math.log(sum(math.exp(x - max(z)) for x in z))
    q_full = [math.exp(x - log_z) for x in z]
    q = [q_full[i] for i in ids_row.tolist()]
    if len(ids_row) == len(z):  # K = V: no other bucket, P renormalised
        return [x / sum(p) for x in p], q
    if sum(p) > 1:
        p, p_other = [x / sum(p) for x in p], 0.0
    else:
        p_other = 1 - sum(p)
    q_other = sum(x for i, x in enumerate(q_full) if i not in set(ids_row.tolist()))
    return p + [p_other], q + [q_other]


def divergence(kind: str, p: list[float], q: list[float]) -> float:
    """Plain-Python float64 evaluation of the documented formula over matching outcome lists."""
    if kind == "fkl":
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)
    if kind == "rkl":
        qs = [qi if pi > 0 else 0.0 for pi, qi in zip(p, q)]
        qs = [x / sum(qs) for x in qs]
        return sum(qi * math.log(qi / pi) for pi, qi in zip(p, qs) if qi > 0)
    if kind == "tv":
        return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q))
    m = [(pi + qi) / 2 for pi, qi in zip(p, q)]
    return 0.5 * sum(pi * math.log(pi / mi) for pi, mi in zip(p, m) if pi > 0) + 0.5 * sum(
        qi * math.log(qi / mi) for qi, mi in zip(q, m) if qi > 0
    )


def reference(kind: str, logits, ids, logprobs, mask) -> torch.Tensor:
    """The documented loss at every position, in float64 (0 where masked)."""
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for b, t in mask.nonzero().tolist():
        out[b, t] = divergence(kind, *buckets(logits[b, t].double(), ids[b, t], logprobs[b, t]))
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
@pytest.mark.parametrize("seed, vocab", [(0, 13), (1, 13), (2, 5)])  # vocab 5 = K: no other bucket
def test_loss_matches_brute_force(kind, seed, vocab):
    logits, ids, logprobs, mask = random_targets(vocab=vocab, seed=seed)
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
        assert torch.equal(loss, LOSS_FNS[kind](logits.detach().float(), ids, logprobs, mask))  # computed in float32
        loss.sum().backward()
        grad = logits.grad
        assert grad.dtype == dtype and torch.isfinite(grad).all()
        assert grad[mask].abs().sum() > 0
        assert (grad[~mask] == 0).all()  # masked positions, all -inf targets included, get no gradient
        logits = logits.detach()


@pytest.mark.parametrize("kind", list(LOSS_FNS))
@pytest.mark.parametrize("vocab", [13, 5])
def test_loss_is_zero_exactly_when_the_drafter_matches_the_policy_on_the_k_ids_and_outside(kind, vocab):
    logits, ids, logprobs, mask = random_targets(vocab=vocab, seed=3)
    # The drafter's logits: log P on the K ids, log P_other spread at random over the other ids (-1e4 for a
    # probability 0), plus a per-position shift.
    matched = torch.full_like(logits, -1e4)
    gen = GEN(4)
    for b, t in mask.nonzero().tolist():
        p, _ = buckets(logits[b, t], ids[b, t], logprobs[b, t])
        matched[b, t, ids[b, t]] = torch.tensor([math.log(x) if x > 0 else -1e4 for x in p[: ids.shape[-1]]])
        others = [i for i in range(vocab) if i not in ids[b, t].tolist()]
        if others and p[-1] > 0:
            matched[b, t, others] = math.log(p[-1]) + torch.randn(len(others), generator=gen).log_softmax(-1)
    matched += torch.randn(mask.shape, generator=gen)[..., None]
    assert LOSS_FNS[kind](matched, ids, logprobs, mask).abs().max() < 1e-6
    # Any other drafter is penalised; rkl only where P's support has more than one outcome (it renormalises Q there).
    loss = LOSS_FNS[kind](logits, ids, logprobs, mask)
    for b, t in mask.nonzero().tolist():
        p, _ = buckets(logits[b, t], ids[b, t], logprobs[b, t])
        if kind != "rkl" or sum(x > 0 for x in p) > 1:
            assert loss[b, t] > 1e-4


@pytest.mark.parametrize("p_other", [0.0, 0.1])
def test_drafter_mass_outside_the_k_ids_is_penalised(p_other):
    # The drafter's K-id probabilities are proportional to the policy's, but it puts 30% of its mass outside them.
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    vocab, ids, mask = 10, torch.tensor([[[7, 2, 0, 5]]]), torch.tensor([[True]])
    # P_other = 0: the K ids cover the policy; its float16 logprobs overshoot 1 slightly and are renormalised.
    logprobs = (p * (1.001 if p_other == 0 else 1 - p_other)).log().half().float().view(1, 1, 4)
    logits = torch.full((1, 1, vocab), math.log(0.3 / (vocab - 4)))
    logits[0, 0, ids[0, 0]] = (0.7 * p).log()
    outside = [i for i in range(vocab) if i not in ids.flatten().tolist()]
    if p_other == 0:  # 1 − tv = 0.7 is the acceptance rate, and fkl is the cross-entropy excess −log 0.7
        assert tv_loss(logits, ids, logprobs, mask).item() == pytest.approx(0.3, abs=1e-6)
        assert fkl_loss(logits, ids, logprobs, mask).item() == pytest.approx(-math.log(0.7), abs=1e-6)
        # rkl restricts Q to P's support, the K ids, where Q is proportional to P: it is blind to this (documented).
        assert rkl_loss(logits, ids, logprobs, mask).item() == pytest.approx(0.0, abs=1e-6)
    for kind, fn in LOSS_FNS.items():
        if kind == "rkl" and p_other == 0:
            continue
        leaf = logits.clone().requires_grad_()
        loss = fn(leaf, ids, logprobs, mask)
        loss.sum().backward()
        assert loss.item() > 1e-3, kind
        assert (leaf.grad[0, 0, outside] > 0).all(), kind  # gradient descent pushes the outside logits down


def full_divergence(kind: str, p: torch.Tensor, q: torch.Tensor) -> float:
    return divergence(kind, p.double().tolist(), q.double().tolist())


@pytest.mark.parametrize("kind", list(LOSS_FNS))
def test_coarse_graining_lower_bounds_the_full_vocabulary_divergence(kind):
    # Policy and drafter over the full vocabulary; the targets are the policy's exact logprobs at K ids.
    gen, vocab, positions = GEN(13), 11, 12
    p_logits, q_logits = torch.randn(2, 1, positions, vocab, generator=gen) * 2
    p, q = p_logits.softmax(-1)[0], q_logits.softmax(-1)[0]
    mask = torch.ones(1, positions, dtype=torch.bool)
    for k in (1, 4, vocab - 1, vocab):
        ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(positions)])[None]
        coarse = LOSS_FNS[kind](q_logits, ids, p_logits.log_softmax(-1).gather(-1, ids), mask)[0]
        for t in range(positions):
            full = full_divergence(kind, p[t], q[t])
            if k < vocab:
                assert coarse[t].item() <= full * (1 + 1e-5) + 1e-6  # float32 rounding
            else:  # K = V: nothing is coarse-grained
                assert coarse[t].item() == pytest.approx(full, abs=1e-5)


def test_rkl_ignores_drafter_mass_on_zero_probability_outcomes_but_others_do_not():
    ids, logprobs, mask = torch.tensor([[[0, 1, 2]]]), torch.tensor([[[0.0, -1.0, NEG_INF]]]), torch.tensor([[True]])
    logits = torch.tensor([[[0.0, -1.0, 5.0]]])  # K = V: P's shape on ids 0, 1 but most mass on id 2, where P is 0
    assert rkl_loss(logits, ids, logprobs, mask).item() == pytest.approx(0.0, abs=1e-6)
    for fn in (fkl_loss, tv_loss, jsd_loss):
        assert fn(logits, ids, logprobs, mask).item() > 0.1
    # With an other bucket (ids 3, 4): P = (0.6, 0.2, 0, other 0.2); Q proportional to it off id 2.
    logprobs = torch.tensor([0.6, 0.2, 0.0, 0.2]).log()[:3].view(1, 1, 3)
    logits = torch.tensor([[[0.6, 0.2, 3.0, 0.1, 0.1]]]).log()
    assert rkl_loss(logits, ids, logprobs, mask).item() == pytest.approx(0.0, abs=1e-6)
    for fn in (fkl_loss, tv_loss, jsd_loss):
        assert fn(logits, ids, logprobs, mask).item() > 0.1


def test_one_minus_tv_is_the_acceptance_rate_on_the_full_vocabulary():
    gen, vocab = GEN(5), 7
    p_logits, q_logits = torch.randn(2, vocab, generator=gen) * 2
    ids = torch.randperm(vocab, generator=gen)
    p, q = p_logits.softmax(-1), q_logits.softmax(-1)
    tv = tv_loss(
        q_logits.view(1, 1, vocab),
        ids.view(1, 1, vocab),
        p.log()[ids].view(1, 1, vocab),
        torch.ones(1, 1, dtype=torch.bool),
    )
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


@pytest.mark.parametrize("kind", list(LOSS_FNS))
def test_logits_at_the_targets_only_give_the_same_loss(kind):
    logits, ids, logprobs, mask = random_targets(seed=10)
    rejected = (torch.rand(mask.shape, generator=GEN(11)) < 0.4) & mask
    batch = as_batch(logits, ids, logprobs, mask, rejected)
    full = distill_loss(logits, batch, kind, rejected_weight=2.0)
    at_targets = distill_loss(logits[mask.bool()], batch, kind, rejected_weight=2.0)  # [N, V]
    assert at_targets.item() == pytest.approx(full.item(), rel=1e-6)


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
    expected_by_version = {
        v: expected[[i for i, w in enumerate(versions) if w == v]].sum() / expected.sum() for v in set(versions)
    }
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
