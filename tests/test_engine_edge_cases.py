"""The engine at the edges the trusted implementations test (vLLM's rejection sampler and spec-decode tests,
transformers' assisted decoding): long completions, large k, heavy padding, the convergence form of the sampling test,
filtered sampling, boundary probabilities and low-precision near-ties."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from adaptive_drafter import SpecConfig, SpeculativeEngine
from adaptive_drafter.drafter import noised_copy
from adaptive_drafter.sampling import SamplingParams, process_logits
from adaptive_drafter.testing import tiny_causal_lm
from test_engine import PAD, exact_joint, noise_bound, reference_greedy


def padded_prompts(batch: int, min_pad: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of 1..16 tokens in a row at least `min_pad` + 16 wide: every row has >= `min_pad` pads."""
    gen = torch.Generator().manual_seed(seed)
    width = min_pad + 16
    lengths = torch.randint(1, 17, (batch,), generator=gen)
    ids = torch.randint(3, 256, (batch, width), generator=gen)
    mask = torch.arange(width)[None] >= (width - lengths)[:, None]
    return ids.masked_fill(~mask, PAD), mask.long()


def spread_eos(rows: list[list[int]]) -> int:
    """The token whose first occurrences would end the rows at the most spread-out lengths (absent: full length)."""
    best, best_spread = 3, -1.0
    for token in {t for row in rows for t in row}:
        lengths = torch.tensor([row.index(token) + 1 if token in row else len(row) for row in rows], dtype=torch.float)
        spread = float(lengths.std()) if len(rows) > 1 else float(lengths[0])
        if spread > best_spread:
            best, best_spread = token, spread
    return best


@pytest.fixture(scope="module")
def long_models():
    policy = tiny_causal_lm("llama", logit_scale=8.0, max_positions=1024)
    return policy, noised_copy(policy, std=0.05, seed=2)


@pytest.mark.slow
@pytest.mark.parametrize("batch, k", [(1, 16), (8, 1), (8, 7), (64, 4), (64, 16)])
def test_greedy_identity_long_completions_large_k_heavy_padding(long_models, batch, k):
    policy, drafter = long_models
    ids, mask = padded_prompts(batch, min_pad=32, seed=batch + k)
    assert int((mask == 0).sum(1).min()) >= 32
    free = reference_greedy(policy, ids, mask, 512, eos=[])
    eos = spread_eos(free) if batch > 1 else -1  # batch 1: no eos, the full 512 tokens
    expected = reference_greedy(policy, ids, mask, 512, eos=[eos] if eos >= 0 else [])
    if batch > 1:
        lengths = sorted(len(row) for row in expected)
        assert lengths[-1] >= 4 * lengths[0], f"rows should finish at very different lengths: {lengths}"
    else:
        assert len(expected[0]) == 512
    engine = SpeculativeEngine(policy, drafter, SpecConfig(elastic=False, num_draft_tokens=k))
    out = engine.generate(
        ids, SamplingParams(do_sample=False), attention_mask=mask, max_new_tokens=512,
        eos_token_id=[eos] if eos >= 0 else None,
    )  # fmt: skip
    assert out.completion_ids == expected
    assert out.stats.tokens_per_verify > 1.5, out.stats


# --- sampling: the convergence form ------------------------------------------------------------------------------

VOCAB, STEPS = 6, 3
SIZES = (10, 100, 1_000, 10_000, 100_000)


@pytest.fixture(scope="module")
def small_models():
    policy = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=16, logit_scale=3.0, seed=0).double()
    drafter = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=16, logit_scale=3.0, seed=4).double()
    return policy, drafter


def blind_to(model, tokens: list[int]):
    """A copy of `model` that gives `tokens` probability exactly 0 (logit -inf): q = 0 where the policy has p > 0."""
    model = copy.deepcopy(model)
    banned = torch.tensor(tokens)
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: out.index_fill(-1, banned, -math.inf))
    return model


def joint_samples(engine, prompt: list[int], samples: int, seed: int, **settings) -> torch.Tensor:
    """Outcome index of the first STEPS tokens of `samples` completions, drawn in chunks."""
    chunks = []
    for start in range(0, samples, 25_000):
        ids = torch.tensor([prompt]).expand(min(25_000, samples - start), -1)
        out = engine.generate(ids, SamplingParams(**settings), max_new_tokens=STEPS, seed=seed + start)
        firsts = torch.tensor([row[:STEPS] for row in out.completion_ids])
        chunks.append((firsts * torch.tensor([VOCAB**2, VOCAB, 1])).sum(-1))
    return torch.cat(chunks)


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


@pytest.mark.slow
@pytest.mark.parametrize(
    "drafter_kind, settings",
    [("random", dict(temperature=1.0)), ("blind", dict(temperature=0.8, top_p=0.9)), ("random", dict(top_k=3))],
    ids=["t1.0", "q0-topp", "topk3"],
)
def test_empirical_distribution_converges_to_the_policys(small_models, drafter_kind, settings):
    """TV(empirical, p) shrinks like 1/sqrt(N) from 10 to 100k samples, while the TV to random reference
    distributions (the drafter's own, mixtures of it with p, Dirichlet draws) stops shrinking at their distance."""
    policy, drafter = small_models
    prompt = [3, 1, 4, 5]
    params = SamplingParams(do_sample=True, **settings)
    target = exact_joint(policy, prompt, params)
    if drafter_kind == "blind":  # q = 0 on the two tokens the policy likes most after the prompt
        drafter = blind_to(drafter, target.reshape(VOCAB, -1).sum(1).topk(2).indices.tolist())
    q = exact_joint(drafter, prompt, params)
    dirichlet = torch.distributions.Dirichlet(torch.ones(VOCAB**STEPS, dtype=torch.double))
    torch.manual_seed(0)
    references = [q, 0.5 * (target + q), 0.7 * target + 0.3 * q, *dirichlet.sample((3,))]

    engine = SpeculativeEngine(policy, drafter, SpecConfig(elastic=False, num_draft_tokens=3))
    outcomes = joint_samples(engine, prompt, SIZES[-1], seed=1, do_sample=True, **settings)
    to_policy, to_references = [], []
    for n in SIZES:
        empirical = torch.bincount(outcomes[:n], minlength=VOCAB**STEPS).double() / n
        to_policy.append(tv(empirical, target))
        to_references.append(min(tv(empirical, r) for r in references))
        assert to_policy[-1] < noise_bound(target, n), (n, to_policy[-1])
    # The distance to the policy keeps shrinking at the sampling-noise rate: slope ~ -1/2 in log-log.
    slope = (math.log(to_policy[-1]) - math.log(to_policy[2])) / (math.log(SIZES[-1]) - math.log(SIZES[2]))
    assert -0.8 < slope < -0.3, (slope, to_policy)
    # The nearest reference (30% of the way to q) stays at its own distance; at 100k samples p is far closer.
    print(f"TV to p: {to_policy}; to the nearest reference: {to_references}")
    assert to_references[-1] > 3 * to_policy[-1], (to_references, to_policy)
    assert to_references[-1] > 0.5 * min(tv(target, r) for r in references)


# --- filtered sampling and boundary probabilities ------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings", [dict(top_k=5), dict(top_p=0.6), dict(top_k=20, top_p=0.7, temperature=0.7), dict(min_p=0.2)]
)
def test_every_emitted_token_lies_in_the_allowed_set(settings):
    """Drafts come from the drafter's own filtered distribution, so they often fall outside the policy's allowed set;
    those must all be rejected."""
    policy = tiny_causal_lm("qwen2", logit_scale=4.0)
    drafter = noised_copy(policy, std=0.6, seed=3)
    ids, mask = padded_prompts(32, min_pad=2, seed=5)
    params = SamplingParams(do_sample=True, **settings)
    out = SpeculativeEngine(policy, drafter, SpecConfig(elastic=False, num_draft_tokens=4)).generate(
        ids, params, attention_mask=mask, max_new_tokens=24, seed=0
    )
    assert out.stats.accepted > 0 and out.stats.accepted < out.stats.drafted
    outside = 0
    for row, completion in enumerate(out.completion_ids):
        prompt = ids[row][mask[row].bool()].tolist()
        with torch.no_grad():
            logits = policy(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
        allowed = process_logits(logits, params) > -math.inf  # [T, V]
        assert allowed.gather(1, torch.tensor(completion)[:, None]).all(), f"row {row} left the allowed set"
        # The drafter may propose tokens outside it (its own allowed set differs): the test has power.
        with torch.no_grad():
            q_logits = drafter(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
        outside += int(((process_logits(q_logits, params) > -math.inf) & ~allowed).any(-1).sum())
    assert outside > 0


def test_drafter_equal_to_policy_accepts_every_sampled_draft():
    """p = q everywhere: min(p, q) / q = 1, so every draft is accepted and each verify yields k + 1 tokens."""
    policy = tiny_causal_lm("llama", logit_scale=4.0)
    ids, mask = padded_prompts(16, min_pad=3, seed=2)
    k = 5
    out = SpeculativeEngine(
        policy, copy.deepcopy(policy), SpecConfig(elastic=False, num_draft_tokens=k)
    ).generate(
        ids, SamplingParams(temperature=0.9, top_p=0.95), attention_mask=mask, max_new_tokens=1 + 5 * (k + 1), seed=0
    )
    assert out.stats.acceptance_rate == 1.0 and out.stats.tokens_per_verify == k + 1


def test_tokens_the_drafter_cannot_propose_are_still_emitted():
    """q = 0 on tokens the policy emits often: the residual distribution must produce them."""
    policy = tiny_causal_lm("llama", logit_scale=4.0)
    ids, mask = padded_prompts(32, min_pad=1, seed=4)
    free = reference_greedy(policy, ids, mask, 16, eos=[])
    favourite = torch.bincount(torch.tensor(sum(free, [])), minlength=256).topk(3).indices.tolist()
    engine = SpeculativeEngine(policy, blind_to(policy, favourite), SpecConfig(elastic=False, num_draft_tokens=3))
    sampled = engine.generate(ids, attention_mask=mask, max_new_tokens=16, seed=0)
    assert any(t in favourite for row in sampled.completion_ids for t in row)
    greedy = engine.generate(ids, SamplingParams(do_sample=False), attention_mask=mask, max_new_tokens=16)
    assert greedy.completion_ids == free


# --- low precision: near-ties between a verify pass and a decode step ----------------------------------------------


def first_divergences(expected: list[list[int]], got: list[list[int]]) -> list[tuple[int, int]]:
    """(row, position) of each row's first differing token."""
    out = []
    for row, (a, b) in enumerate(zip(expected, got)):
        position = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if position is not None:
            out.append((row, position))
    return out


def check_near_ties(policy, ids, mask, expected, got, tolerance: float) -> list[float]:
    """Each first divergence between `got` and `expected` must be a near-tie: both tokens' logits in a float32 forward
    of the policy lie within `tolerance` of each other. Returns the logit gaps, one per divergent row."""
    divergences, gaps = first_divergences(expected, got), []
    reference = copy.deepcopy(policy).float()
    for row, position in divergences:
        prompt = ids[row][mask[row].bool()].tolist()
        prefix = prompt + expected[row][:position]
        with torch.no_grad():
            logits = reference(input_ids=torch.tensor([prefix], device=ids.device)).logits[0, -1]
        gap = abs(float(logits[expected[row][position]] - logits[got[row][position]]))
        assert gap <= tolerance, f"row {row} diverged at {position} with a logit gap of {gap:.4f} > {tolerance}"
        gaps.append(gap)
    return gaps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_greedy_is_identical_up_to_near_ties(dtype):
    """In bf16/fp16 a verify pass over k+1 tokens and a one-token decode step round differently, so greedy outputs may
    part where the top two logits are within rounding of each other. What holds: every first divergence is such a
    near-tie (the two tokens within 0.05 of each other in a float32 forward: bf16 keeps 8 bits of mantissa, so
    logits of magnitude ~10 round by ~0.04), and most rows are identical."""
    policy = tiny_causal_lm("llama", hidden_size=64, logit_scale=4.0)
    drafter = noised_copy(policy, std=0.05, seed=1).to(dtype)
    policy = policy.to(dtype)
    ids, mask = padded_prompts(32, min_pad=4, seed=6)
    expected = reference_greedy(policy, ids, mask, 48, eos=[])
    out = SpeculativeEngine(policy, drafter, SpecConfig(elastic=False, num_draft_tokens=4)).generate(
        ids, SamplingParams(do_sample=False), attention_mask=mask, max_new_tokens=48
    )
    gaps = check_near_ties(policy, ids, mask, expected, out.completion_ids, tolerance=0.05)
    print(f"{dtype}: {len(gaps)} of {len(expected)} rows diverged, largest fp32 logit gap {max(gaps, default=0):.4f}")
    assert len(gaps) <= len(expected) // 4, f"{len(gaps)} of {len(expected)} rows diverged"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_greedy_on_gpu(dtype):
    policy = tiny_causal_lm("llama", hidden_size=256, num_layers=4, logit_scale=4.0)
    drafter = noised_copy(policy, std=0.05, seed=1).to("cuda", dtype)
    policy = policy.to("cuda", dtype)
    ids, mask = (t.cuda() for t in padded_prompts(64, min_pad=4, seed=6))
    expected = reference_greedy(policy, ids, mask, 128, eos=[])
    out = SpeculativeEngine(policy, drafter, SpecConfig(elastic=False, num_draft_tokens=4)).generate(
        ids, SamplingParams(do_sample=False), attention_mask=mask, max_new_tokens=128
    )
    gaps = check_near_ties(policy, ids, mask, expected, out.completion_ids, tolerance=0.05)
    print(f"{dtype}: {len(gaps)} of {len(expected)} rows diverged, largest fp32 logit gap {max(gaps, default=0):.4f}")


def test_token_id_lists_and_the_same_prompts_left_padded_are_the_same_rollout():
    """The rollout contract takes unpadded token-id lists (what both engines share); a padded tensor is the same."""
    policy = tiny_causal_lm("llama", logit_scale=4.0)
    engine = SpeculativeEngine(policy, noised_copy(policy, 0.1), SpecConfig(elastic=False, num_draft_tokens=3))
    ids, mask = padded_prompts(6, min_pad=3, seed=11)
    rows = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    sampling = SamplingParams(temperature=0.8, top_p=0.9)
    padded = engine.generate(ids, sampling, attention_mask=mask, max_new_tokens=12, seed=4)
    listed = engine.generate(rows, sampling, max_new_tokens=12, seed=4)
    assert listed.completion_ids == padded.completion_ids  # the padded tensor is wider: sums differ in the last bits
    for a, b in zip(listed.logprobs, padded.logprobs):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
    with pytest.raises(ValueError, match="non-empty token id lists"):
        engine.generate([rows[0], []], sampling)
    with pytest.raises(ValueError, match="attention_mask goes with a padded prompt_ids tensor"):
        engine.generate(rows, sampling, attention_mask=mask)


def test_a_repetition_penalty_the_engine_cannot_apply_is_refused_not_ignored():
    policy = tiny_causal_lm("llama")
    engine = SpeculativeEngine(policy, noised_copy(policy, 0.1), SpecConfig())
    with pytest.raises(ValueError, match=r"repetition_penalty=1.2 is not supported.*vLLM"):
        engine.generate([[3, 4, 5]], SamplingParams(repetition_penalty=1.2), max_new_tokens=4)
    assert engine.generate([[3, 4, 5]], SamplingParams(repetition_penalty=1.0), max_new_tokens=4).completion_ids


def test_the_policy_decodes_in_eval_mode_and_keeps_its_training_mode():
    """Dropout would make rollouts sample another distribution than the policy's: the engine turns it off."""
    policy = tiny_causal_lm("llama").train()
    engine, seen = SpeculativeEngine(policy, noised_copy(policy, 0.1), SpecConfig()), []
    policy.register_forward_hook(lambda module, args, output: seen.append(module.training))
    engine.generate([[3, 4, 5]], max_new_tokens=3)
    assert seen and not any(seen) and policy.training
