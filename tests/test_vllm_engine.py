"""The vLLM rollout backend on the embedded model (SmolLM2-135M): losslessness, weight swaps, distillation targets and
sampling under speculation. Runs inside the vLLM environment (`make vllm-env`; `make test` runs it there); skipped
where vLLM is not installed."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here: `make vllm-env` builds .venv-vllm, where it is")

from adaptive_drafter.embedded import cache_path, load_embedded
from adaptive_drafter.vllm_engine import VLLMEngine

pytestmark = [pytest.mark.vllm]

TOPK = 5
LAYER = "model.layers.2."  # a whole decoder layer: vLLM fuses q/k/v and gate/up, so swaps go by module


@pytest.fixture(scope="module")
def policy():
    """The embedded model (HF), its tokenizer and its checkpoint directory."""
    model, tokenizer = load_embedded()
    return model, tokenizer, str(cache_path())


@pytest.fixture(scope="module")
def prompts(policy):
    tokenizer = policy[1]
    return [tokenizer(f"Question {i}: what is {i} + 3*{i}? Answer:").input_ids for i in range(8)]


@pytest.fixture(scope="module")
def plain(policy):
    engine = VLLMEngine(policy[2], method=None, max_model_len=512, collect_topk=TOPK)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def spec(policy):
    """Speculation with a drafter equal to the policy (same checkpoint): what `load_draft` perturbs and restores."""
    engine = VLLMEngine(policy[2], draft_path=policy[2], num_draft_tokens=4, max_model_len=512, collect_topk=TOPK)
    yield engine
    engine.close()


def _noised(model, prefix: str, std: float, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """HF-named weights under `prefix` with Gaussian noise of relative size `std`."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name, tensor in model.state_dict().items():
        if name.startswith(prefix):
            noise = torch.randn(tensor.shape, generator=gen) * tensor.float().std() * std
            out.append((name, tensor + noise.to(tensor.dtype)))
    return out


def _weights(model, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    return [(name, tensor) for name, tensor in model.state_dict().items() if name.startswith(prefix)]


GREEDY = {"do_sample": False, "eos_token_id": None}  # fixed lengths: every row runs the full max_new_tokens


def test_greedy_speculation_matches_plain_decoding_in_every_row(prompts, plain, spec):
    reference = plain.generate(prompts, max_new_tokens=32, **GREEDY)
    assert [len(row) for row in reference.completion_ids] == [32] * 8
    out = spec.generate(prompts, max_new_tokens=32, **GREEDY)
    assert out.completion_ids == reference.completion_ids
    assert out.stats.verify_steps > 0


def test_a_drafter_equal_to_the_policy_is_accepted_a_perturbed_one_is_not_and_restoring_it_restores_acceptance(
    policy, prompts, plain, spec
):
    rows, length = prompts[:4], 16
    reference = plain.generate(rows, max_new_tokens=length, **GREEDY).completion_ids
    equal = spec.generate(rows, max_new_tokens=length, **GREEDY)
    spec.load_draft(_noised(policy[0], LAYER, std=2.0))
    perturbed = spec.generate(rows, max_new_tokens=length, **GREEDY)
    spec.load_draft(_weights(policy[0], LAYER))  # only that layer: the others must have been left alone
    restored = spec.generate(rows, max_new_tokens=length, **GREEDY)
    assert equal.stats.acceptance_rate > 0.9
    assert perturbed.stats.acceptance_rate < 0.5 * equal.stats.acceptance_rate
    assert restored.stats.acceptance_rate > 0.9
    for out in (equal, perturbed, restored):
        assert out.completion_ids == reference
        stats = out.stats
        assert stats.verify_steps > 0 and stats.drafted == 4 * stats.verify_steps
        assert stats.verified_tokens == stats.accepted + stats.verify_steps
        assert stats.plain_steps >= len(rows)  # each row's first token comes from the prefill


def test_a_perturbed_policy_synced_in_changes_the_outputs_and_syncing_the_originals_back_restores_them(
    policy, prompts, plain
):
    rows = prompts[:4]
    before = plain.generate(rows, max_new_tokens=16, **GREEDY).completion_ids
    plain.sync_policy(_noised(policy[0], "", std=0.2))
    try:
        perturbed = plain.generate(rows, max_new_tokens=16, **GREEDY).completion_ids
    finally:
        plain.sync_policy(_weights(policy[0]))
    after = plain.generate(rows, max_new_tokens=16, **GREEDY).completion_ids
    assert perturbed != before
    assert after == before


def test_the_distillation_targets_under_speculation_equal_the_plain_engines_top_k_logprobs(prompts, plain, spec):
    rows = prompts[:4]
    reference = plain.generate(rows, max_new_tokens=16, **GREEDY)
    out = spec.generate(rows, max_new_tokens=16, **GREEDY)
    assert out.targets is not None and len(out.targets) == len(rows)
    for row, (got, want) in enumerate(zip(out.targets, reference.targets)):
        assert got.prompt_ids == rows[row] and got.completion_ids == out.completion_ids[row]
        assert got.topk_ids.shape == (16, TOPK)
        # Same logits up to float32 kernel differences (verifying 5 tokens vs decoding 1); stored as float16, whose
        # rounding is 2^-11 relative: 2e-3 relative + absolute covers both.
        assert torch.allclose(got.topk_logprobs.float(), want.topk_logprobs.float(), rtol=2e-3, atol=2e-3)
        assert torch.equal(got.topk_ids[:, 0], want.topk_ids[:, 0])
        assert (got.topk_logprobs[:, :-1] >= got.topk_logprobs[:, 1:]).all()  # rank order
        assert not got.drafted.any() and not got.accepted.any()  # vLLM does not say per token
        # Greedy: the emitted token is the top-1 entry, and its logprob is that entry's.
        assert got.topk_ids[:, 0].tolist() == out.completion_ids[row]
        torch.testing.assert_close(
            torch.tensor(out.logprobs[row]), got.topk_logprobs[:, 0].float(), rtol=1e-3, atol=1e-3
        )


def test_sampled_completions_logprobs_are_the_sampled_tokens_entries_of_the_sampling_distribution(prompts, plain):
    out = plain.generate(prompts[:4], max_new_tokens=16, do_sample=True, temperature=0.7, top_k=20, generator_seed=3)
    again = plain.generate(prompts[:4], max_new_tokens=16, do_sample=True, temperature=0.7, top_k=20, generator_seed=3)
    assert out.completion_ids == again.completion_ids  # seeded rows are reproducible
    for row, targets in enumerate(out.targets):
        for t, token in enumerate(out.completion_ids[row]):
            ids = targets.topk_ids[t].tolist()
            if token in ids:
                assert math.isclose(
                    out.logprobs[row][t], targets.topk_logprobs[t, ids.index(token)].item(), abs_tol=2e-3
                )
            else:  # outside the top 5 but inside top-k = 20: possible, and no likelier than the 5th
                assert -math.inf < out.logprobs[row][t] <= targets.topk_logprobs[t, -1].item() + 2e-3


def _chi2_sf(statistic: float, dof: int) -> float:
    """Survival function of the chi-squared distribution (no scipy in the vLLM environment)."""
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(statistic / 2)).item()


def test_sampled_speculation_draws_from_the_policys_distribution(policy, prompts, plain, spec):
    """Speculation at T = 1 with a noisy drafter: the first two tokens' joint frequencies over many seeded rows fit
    the exact distribution computed from the plain engine's logprobs (the 3 x 3 likeliest pairs, the rest pooled)."""
    prompt, batch, batches = prompts[0], 80, 3
    rows = batch * batches
    sampling = {"do_sample": True, "temperature": 1.0, "eos_token_id": None}
    first = plain.generate([prompt], max_new_tokens=1, **sampling).targets[0]
    exact = {}
    for a, log_a in zip(first.topk_ids[0, :3].tolist(), first.topk_logprobs[0, :3].float().tolist()):
        second = plain.generate([prompt + [a]], max_new_tokens=1, **sampling).targets[0]
        for b, log_b in zip(second.topk_ids[0, :3].tolist(), second.topk_logprobs[0, :3].float().tolist()):
            exact[(a, b)] = math.exp(log_a + log_b)
    exact["other"] = 1.0 - sum(exact.values())

    spec.load_draft(_noised(policy[0], "model.layers.", std=0.3))
    try:
        # Two tokens: the first comes from the prefill, the second from the first verification.
        outs = [
            spec.generate([prompt] * batch, max_new_tokens=2, generator_seed=i * batch, **sampling)
            for i in range(batches)
        ]
    finally:
        spec.load_draft(_weights(policy[0], "model.layers."))
    accepted, drafted = sum(o.stats.accepted for o in outs), sum(o.stats.drafted for o in outs)
    assert 0 < accepted < drafted  # both acceptance and rejection (recovered tokens) happened
    assert all(math.isfinite(v) for o in outs for row in o.logprobs for v in row)
    counts = {key: 0 for key in exact}
    for row in (row for o in outs for row in o.completion_ids):
        key = tuple(row[:2])
        counts[key if key in counts else "other"] += 1
    # Pearson's test, with outcomes expected fewer than 5 times pooled (the chi-squared approximation needs it).
    expected = {key: rows * p for key, p in exact.items()}
    rare = [key for key, e in expected.items() if e < 5]
    cells = [(counts[key], e) for key, e in expected.items() if e >= 5]
    if rare:
        cells.append((sum(counts[key] for key in rare), sum(expected[key] for key in rare)))
    statistic = sum((seen - e) ** 2 / e for seen, e in cells)
    assert _chi2_sf(statistic, len(cells) - 1) > 1e-3, (counts, expected)


def test_top_k_with_sampled_speculation_is_refused_on_a_cpu(prompts, spec):
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the top-k crash concerns vLLM's CPU build only")
    with pytest.raises(ValueError, match="top_k=0"):
        spec.generate(prompts[:1], max_new_tokens=2, do_sample=True, top_k=3)


def test_sampled_speculation_is_refused_when_the_cpu_repair_is_off_and_the_bug_is_present(prompts, spec):
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the rejection-sampler bug and its repair concern vLLM's CPU build only")
    current_platform.register_triton_kernel_overrides()  # what any new vLLM engine in this process does: the bug back
    spec.repair_cpu_sampling = False
    try:
        with pytest.raises(ValueError, match=r"do_sample=False.*method=None.*SpeculativeEngine"):
            spec.generate(prompts[:1], max_new_tokens=2, do_sample=True)
    finally:
        spec.repair_cpu_sampling = True
    out = spec.generate(prompts[:1], max_new_tokens=4, do_sample=True, generator_seed=0)  # repaired again on the fly
    assert all(math.isfinite(v) for v in out.logprobs[0])


def test_eos_ends_a_completion_and_is_kept(prompts, plain, policy):
    eos = policy[1].eos_token_id
    free = plain.generate(prompts, max_new_tokens=32, **GREEDY).completion_ids
    out = plain.generate(prompts, max_new_tokens=32, do_sample=False, eos_token_id=eos).completion_ids
    for full, cut in zip(free, out):
        end = full.index(eos) + 1 if eos in full else len(full)
        assert cut == full[:end]
    assert any(eos in row for row in free), "no prompt reached eos within 32 tokens: the test checks nothing"


def test_invalid_settings_are_refused(policy, plain):
    with pytest.raises(ValueError, match="draft_path"):
        VLLMEngine(policy[2], method="draft_model")
    with pytest.raises(ValueError, match="method"):
        VLLMEngine(policy[2], method="eagle")
    with pytest.raises(ValueError, match="temperature"):
        plain.generate([[1, 2]], do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="non-empty"):
        plain.generate([[]])
    with pytest.raises(ValueError, match="load_draft"):
        plain.load_draft([])


# Last in the file: closing a vLLM engine tears down vLLM's process-wide distributed state, which the other engines of
# this module also use (see VLLMEngine.close).
def test_ngram_speculation_is_greedy_identical_to_plain_decoding(policy, prompts, plain):
    reference = plain.generate(prompts, max_new_tokens=32, **GREEDY).completion_ids
    engine = VLLMEngine(policy[2], method="ngram", num_draft_tokens=4, max_model_len=512)
    try:
        out = engine.generate(prompts, max_new_tokens=32, **GREEDY)
        # Sampled: the CPU repair must register although the ngram proposer has loaded llvmlite (numba), after which
        # vLLM's own register_kernels raises (see _register_expand_fallback).
        sampled = engine.generate(prompts, max_new_tokens=16, do_sample=True, generator_seed=0)
    finally:
        engine.close()
    assert out.completion_ids == reference
    assert out.stats.verify_steps > 0
    vocab = policy[0].config.vocab_size
    assert all(0 <= token < vocab for row in sampled.completion_ids for token in row)
    assert all(math.isfinite(v) for row in sampled.logprobs for v in row)
