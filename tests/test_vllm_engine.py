"""The vLLM rollout backend on the embedded model (SmolLM2-135M): losslessness, weight swaps, distillation targets,
sampling under speculation and elastic serving. The engine tests run inside the vLLM environment (`make vllm-env`;
`make test` runs them there) and are skipped where vLLM is not installed; the elastic switch's tests run anywhere."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from adaptive_drafter.sampling import SamplingParams
from adaptive_drafter.embedded import cache_path, load_embedded
from adaptive_drafter.elastic import RolloutSwitch, _Bucket, acceptance_from_tokens, expected_tokens
from adaptive_drafter.vllm_engine import VLLMEngine

TOPK = 5
LAYER = "model.layers.2."  # a whole decoder layer: vLLM fuses q/k/v and gate/up, so swaps go by module


# --- the elastic switch (no vLLM needed) -----------------------------------------------------------------------------


def _simulate(switch: RolloutSwitch, calls: int, plain: float, speculative: float, tokens: float = 1.2) -> list:
    """Drive the switch at batch 8 with fixed seconds per step in each mode; return its decisions."""
    decisions = []
    for _ in range(calls):
        decision = switch.choose(8)
        switch.observe(8, decision.speculate, speculative if decision.speculate else plain, 1, tokens)
        decisions.append(decision)
    return decisions


def test_the_switch_measures_plain_then_speculation_then_serves_the_faster_and_remeasures_plain_now_and_then():
    decisions = _simulate(RolloutSwitch(k=4), 40, plain=1.0, speculative=0.5, tokens=3.0)
    assert [d.reason for d in decisions[:3]] == ["measure_plain", "measure_speculation", "faster"]
    assert decisions[2].expected_speedup == pytest.approx(2.0)
    plain = [i for i, d in enumerate(decisions) if not d.speculate]
    assert plain[0] == 0 and 1 <= len(plain) - 1 <= 3  # re-measured every 16 calls, no more
    assert all(d.reason == "remeasure_plain" for d in (decisions[i] for i in plain[1:]))


def test_a_poor_drafter_is_probed_rarely_so_it_costs_little_over_many_rollouts():
    decisions = _simulate(RolloutSwitch(k=4), 300, plain=1.0, speculative=2.0, tokens=1.05)
    speculative = sum(d.speculate for d in decisions)
    assert decisions[2].reason == "slower" and speculative <= 8  # each probe costs one call at 2x: under 3% here
    # ...while a drafter that got better (its tokens per verify measured at the next probe) wins the calls back.
    switch = RolloutSwitch(k=4)
    _simulate(switch, 60, plain=1.0, speculative=2.0, tokens=1.05)
    switch.drafter_changed()
    later = _simulate(switch, 200, plain=1.0, speculative=0.6, tokens=3.5)
    assert sum(d.speculate for d in later[-50:]) >= 45


def test_the_expected_speedup_rescales_to_an_optimistic_acceptance():
    switch = RolloutSwitch(k=4)
    switch.buckets[8] = _Bucket(plain=1.0, speculative=1.25, tokens_per_verify=expected_tokens(0.3, 4))
    assert acceptance_from_tokens(expected_tokens(0.3, 4), 4) == pytest.approx(0.3, abs=1e-6)
    assert switch.expected_speedup(8) == pytest.approx(0.8)
    optimistic = switch.expected_speedup(8, optimism=0.2)
    assert optimistic == pytest.approx(0.8 * expected_tokens(0.5, 4) / expected_tokens(0.3, 4))
    assert switch.expected_speedup(5) == switch.expected_speedup(8) and switch.expected_speedup(16) is None


# --- the engine (vLLM) -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy():
    """The embedded model (HF), its tokenizer and its checkpoint directory."""
    pytest.importorskip("vllm", reason="vLLM is not installed here: `make vllm-env` builds .venv-vllm, where it is")
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
    """Speculation with a drafter equal to the policy (same checkpoint): what `load_drafter` perturbs and restores.
    Started elastic (vLLM's draft-length schedule on) with the switch removed: every call speculates unless a test
    puts a switch back."""
    engine = VLLMEngine(
        policy[2], draft_path=policy[2], num_draft_tokens=4, max_model_len=512, collect_topk=TOPK, elastic=True
    )
    engine.switch = None
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


GREEDY = SamplingParams(do_sample=False)  # and no eos: every row runs the full max_new_tokens


def test_greedy_speculation_matches_plain_decoding_in_every_row_with_and_without_a_repetition_penalty(
    prompts, plain, spec
):
    reference = plain.generate(prompts, GREEDY, max_new_tokens=32)
    assert [len(row) for row in reference.completion_ids] == [32] * 8
    out = spec.generate(prompts, GREEDY, max_new_tokens=32)
    assert out.completion_ids == reference.completion_ids
    assert out.stats.verify_steps > 0
    penalised = plain.generate(prompts, SamplingParams(do_sample=False, repetition_penalty=1.3), max_new_tokens=32)
    assert penalised.completion_ids != reference.completion_ids  # the penalty acts...
    out = spec.generate(prompts, SamplingParams(do_sample=False, repetition_penalty=1.3), max_new_tokens=32)
    assert out.completion_ids == penalised.completion_ids  # ...identically under speculation
    assert out.stats.verify_steps > 0


def test_elastic_serving_switches_between_plain_and_speculative_in_one_engine_with_identical_outputs(
    prompts, plain, spec
):
    reference = plain.generate(prompts, GREEDY, max_new_tokens=16).completion_ids
    spec.switch = switch = RolloutSwitch(k=4)
    spec._warm = True  # the fixture's engine has run before in a full run; not when this test runs alone
    try:
        # Measurements that make speculation slower, then faster, at batch 8.
        switch.buckets[8] = _Bucket(plain=1.0, speculative=10.0, tokens_per_verify=5.0, calls=1)
        slow = spec.generate(prompts, GREEDY, max_new_tokens=16)
        plain_mode = spec.last_decision
        skipped = spec.llm.collective_rpc(lambda worker: "propose_draft_token_ids" in vars(worker.model_runner))
        switch.buckets[8] = _Bucket(plain=10.0, speculative=1.0, tokens_per_verify=5.0, calls=1)
        fast = spec.generate(prompts, GREEDY, max_new_tokens=16)
        fast_mode = spec.last_decision
        restored = spec.llm.collective_rpc(lambda worker: "propose_draft_token_ids" in vars(worker.model_runner))
    finally:
        spec.switch = None
    assert (plain_mode.speculate, plain_mode.reason, slow.stats.drafted) == (False, "slower", 0)
    assert skipped == [True] and restored == [False]  # plain serving skipped the drafting step (CPU: synchronous)
    assert (fast_mode.speculate, fast_mode.reason) == (True, "faster") and fast.stats.accepted > 0
    assert slow.completion_ids == reference and fast.completion_ids == reference
    metrics = fast_mode.metrics()
    assert metrics["spec/vllm_speculative"] == 1.0 and metrics["spec/vllm_mode_faster"] == 1.0
    assert fast.stats.measured_speedup is not None  # timed against the plain seconds per step measured


def test_plain_batch_threshold_uses_vllms_draft_length_schedule(prompts, spec):
    spec.plain_batch_threshold, spec._speculating = 5, False
    try:
        spec._serve(speculate=True)  # rewrites the schedule: 4 drafts below 5 running requests, none from 5 on
        wide = spec.generate(prompts, GREEDY, max_new_tokens=8)  # 8 rows all the way: never drafts
        narrow = spec.generate(prompts[:4], GREEDY, max_new_tokens=8)
    finally:
        spec.plain_batch_threshold, spec._speculating = None, False
        spec._serve(speculate=True)
    assert wide.stats.drafted == 0 and narrow.stats.drafted > 0


def test_at_t1_a_drafter_equal_to_the_policy_is_almost_always_accepted_so_vllm_samples_its_drafts(prompts, spec):
    """With argmax drafts (vLLM's default draft_sample_method="greedy") the acceptance at T = 1 would be about the
    policy's mean max p (0.5-0.65 here) however good the drafter; sampled drafts from q = p are always accepted."""
    assert spec.probabilistic_drafts
    out = spec.generate(prompts, SamplingParams(do_sample=True, temperature=1.0), max_new_tokens=16, eos_token_id=None)
    assert out.stats.drafted > 0 and out.stats.acceptance_rate > 0.9


def test_a_drafter_equal_to_the_policy_is_accepted_a_perturbed_one_is_not_and_restoring_it_restores_acceptance(
    policy, prompts, plain, spec
):
    rows, length = prompts[:4], 16
    reference = plain.generate(rows, GREEDY, max_new_tokens=length).completion_ids
    equal = spec.generate(rows, GREEDY, max_new_tokens=length)
    spec.load_drafter(_noised(policy[0], LAYER, std=2.0))
    perturbed = spec.generate(rows, GREEDY, max_new_tokens=length)
    spec.load_drafter(_weights(policy[0], LAYER))  # only that layer: the others must have been left alone
    restored = spec.generate(rows, GREEDY, max_new_tokens=length)
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
    before = plain.generate(rows, GREEDY, max_new_tokens=16).completion_ids
    plain.sync_policy(_noised(policy[0], "", std=0.2))
    try:
        perturbed = plain.generate(rows, GREEDY, max_new_tokens=16).completion_ids
    finally:
        plain.sync_policy(_weights(policy[0]))
    after = plain.generate(rows, GREEDY, max_new_tokens=16).completion_ids
    assert perturbed != before
    assert after == before


def test_the_distillation_targets_under_speculation_equal_the_plain_engines_top_k_logprobs(prompts, plain, spec):
    rows = prompts[:4]
    reference = plain.generate(rows, GREEDY, max_new_tokens=16)
    out = spec.generate(rows, GREEDY, max_new_tokens=16)
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
    out = plain.generate(
        prompts[:4], SamplingParams(do_sample=True, temperature=0.7, top_k=20), max_new_tokens=16, seed=3
    )
    again = plain.generate(
        prompts[:4], SamplingParams(do_sample=True, temperature=0.7, top_k=20), max_new_tokens=16, seed=3
    )
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


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.8, 0.9)])
def test_sampled_speculation_draws_from_the_policys_distribution(policy, prompts, plain, spec, temperature, top_p):
    """Speculation with a noisy drafter: the first two tokens' joint frequencies over many seeded rows fit the exact
    sampling distribution (temperature, top-p) computed from the plain engine's processed logprobs (the 3 x 3
    likeliest pairs, the rest pooled)."""
    spec.load_drafter(_noised(policy[0], "model.layers.", std=0.3))
    try:
        _assert_two_tokens_follow_the_policy(
            plain, spec, prompts[0], SamplingParams(temperature=temperature, top_p=top_p)
        )
    finally:
        spec.load_drafter(_weights(policy[0], "model.layers."))


def _assert_two_tokens_follow_the_policy(plain, engine, prompt, sampling, batch: int = 80, batches: int = 3) -> None:
    rows = batch * batches
    first = plain.generate([prompt], sampling, max_new_tokens=1).targets[0]
    exact = {}
    for a, log_a in zip(first.topk_ids[0, :3].tolist(), first.topk_logprobs[0, :3].float().tolist()):
        second = plain.generate([prompt + [a]], sampling, max_new_tokens=1).targets[0]
        for b, log_b in zip(second.topk_ids[0, :3].tolist(), second.topk_logprobs[0, :3].float().tolist()):
            exact[(a, b)] = math.exp(log_a + log_b)
    exact["other"] = 1.0 - sum(exact.values())
    # Two tokens: the first comes from the prefill, the second from the first verification.
    outs = [engine.generate([prompt] * batch, sampling, max_new_tokens=2, seed=i * batch) for i in range(batches)]
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
        spec.generate(prompts[:1], SamplingParams(do_sample=True, top_k=3), max_new_tokens=2)


def test_sampled_speculation_is_refused_when_the_cpu_repair_is_off_and_the_bug_is_present(prompts, spec):
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the rejection-sampler bug and its repair concern vLLM's CPU build only")
    current_platform.register_triton_kernel_overrides()  # what any new vLLM engine in this process does: the bug back
    spec.repair_cpu_sampling = False
    try:
        with pytest.raises(ValueError, match=r"do_sample=False.*method=None.*SpeculativeEngine"):
            spec.generate(prompts[:1], SamplingParams(do_sample=True), max_new_tokens=2)
    finally:
        spec.repair_cpu_sampling = True
    out = spec.generate(
        prompts[:1], SamplingParams(do_sample=True), max_new_tokens=4, seed=0
    )  # repaired again on the fly
    assert all(math.isfinite(v) for v in out.logprobs[0])


def test_eos_ends_a_completion_and_is_kept(prompts, plain, policy):
    eos = policy[1].eos_token_id
    free = plain.generate(prompts, GREEDY, max_new_tokens=32).completion_ids
    out = plain.generate(prompts, SamplingParams(do_sample=False), max_new_tokens=32, eos_token_id=eos).completion_ids
    for full, cut in zip(free, out):
        end = full.index(eos) + 1 if eos in full else len(full)
        assert cut == full[:end]
    assert any(eos in row for row in free), "no prompt reached eos within 32 tokens: the test checks nothing"


def test_invalid_settings_are_refused(policy, plain):
    with pytest.raises(ValueError, match="draft_path"):
        VLLMEngine(policy[2], method="draft_model")
    with pytest.raises(ValueError, match="method"):
        VLLMEngine(policy[2], method="eagle")
    with pytest.raises(ValueError, match="export_eagle3"):
        VLLMEngine(policy[2], method="eagle3")
    with pytest.raises(ValueError, match="temperature"):
        plain.generate([[1, 2]], SamplingParams(do_sample=True, temperature=0.0))
    with pytest.raises(ValueError, match="non-empty"):
        plain.generate([[]])
    with pytest.raises(ValueError, match="load_drafter"):
        plain.load_drafter([])


def test_min_p_with_speculation_is_refused_before_vllm_runs_and_works_without(prompts, plain, spec):
    with pytest.raises(ValueError, match=r"min_p=0.1 is not supported by vLLM with speculative decoding.*top_p"):
        spec.generate(prompts[:1], SamplingParams(do_sample=True, min_p=0.1), max_new_tokens=2)
    out = plain.generate(prompts[:1], SamplingParams(do_sample=True, min_p=0.1), max_new_tokens=2)
    assert len(out.completion_ids[0]) == 2


# --- the EAGLE head served by vLLM (method "eagle3") ------------------------------------------------------------------

HEAD = Path(__file__).resolve().parents[1] / "drafters" / "smollm2-135m-eagle3-4k"  # the shipped head, eagle3 layout


@pytest.fixture(scope="module")
def eagle3(policy, tmp_path_factory):
    """The shipped head exported as vLLM's EAGLE-3 checkpoint, vLLM serving it; and chat prompts like its data's."""
    from adaptive_drafter.eagle import export_eagle3, load_head

    head = load_head(policy[0], HEAD)
    engine = VLLMEngine(
        policy[2], method="eagle3", draft_path=export_eagle3(head, tmp_path_factory.mktemp("eagle3")),
        num_draft_tokens=3, max_model_len=512,
    )  # fmt: skip
    tokenizer = policy[1]
    chats = [[{"role": "user", "content": f"What is {i} * 7 + {3 * i}? Answer with the number."}] for i in range(8)]
    chats = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    yield head, engine, [tokenizer(c).input_ids for c in chats]
    engine.close()


def test_vllm_serves_the_exported_head_losslessly_drafting_what_our_engine_drafts(policy, plain, eagle3):
    """Greedy: vLLM's output with the head is its plain output, and its acceptance is what our engine measures with
    the same head over the same policy (equal drafts: the export computes what the head computes; a wrong name, half
    or norm would draft garbage, accepted near 0)."""
    from adaptive_drafter import SpecConfig, SpeculativeEngine

    head, engine, prompts = eagle3
    reference = plain.generate(prompts, GREEDY, max_new_tokens=32)
    out = engine.generate(prompts, GREEDY, max_new_tokens=32)
    assert out.completion_ids == reference.completion_ids
    ours = SpeculativeEngine(policy[0], head, SpecConfig(elastic=False, num_draft_tokens=3))
    hf = [ours.generate(torch.tensor([row]), GREEDY, max_new_tokens=32) for row in prompts]
    hf_rate = sum(o.stats.accepted for o in hf) / sum(o.stats.drafted for o in hf)
    assert [o.completion_ids[0] for o in hf] == reference.completion_ids
    assert hf_rate > 0.2 and abs(out.stats.acceptance_rate - hf_rate) < 0.05, (out.stats, hf_rate)


def test_a_reloaded_head_is_what_vllm_drafts_with_next(policy, eagle3):
    """Live reload between rollouts (`load_drafter` with the checkpoint's names): a perturbed head is accepted less,
    the original again as before, outputs unchanged throughout."""
    from adaptive_drafter.eagle import eagle3_checkpoint

    head, engine, prompts = eagle3
    weights = eagle3_checkpoint(head)[1]
    before = engine.generate(prompts, GREEDY, max_new_tokens=24)
    gen = torch.Generator().manual_seed(0)
    noisy = {
        name: t + t.float().std() * torch.randn(t.shape, generator=gen).to(t.dtype) if name.endswith("proj.weight") else t
        for name, t in weights.items()
    }  # fmt: skip
    engine.load_drafter(noisy.items())
    perturbed = engine.generate(prompts, GREEDY, max_new_tokens=24)
    engine.load_drafter(weights.items())
    restored = engine.generate(prompts, GREEDY, max_new_tokens=24)
    assert perturbed.stats.acceptance_rate < 0.5 * before.stats.acceptance_rate
    assert restored.stats.acceptance_rate == before.stats.acceptance_rate
    assert before.completion_ids == perturbed.completion_ids == restored.completion_ids


def test_at_t1_vllm_with_the_head_draws_from_the_policys_distribution(plain, eagle3):
    """Probabilistic drafts (draft_sample_method) sampled from the head's q, 80 rows a call: the first two tokens'
    joint frequencies fit the policy's exact distribution (as for the draft model above), CPU repair included."""
    head, engine, prompts = eagle3
    assert engine.probabilistic_drafts
    _assert_two_tokens_follow_the_policy(plain, engine, prompts[0], SamplingParams(temperature=1.0))


# Last in the file: closing a vLLM engine tears down vLLM's process-wide distributed state, which the other engines of
# this module also use (see VLLMEngine.close).
def test_ngram_speculation_is_greedy_identical_to_plain_decoding(policy, prompts, plain):
    reference = plain.generate(prompts, GREEDY, max_new_tokens=32).completion_ids
    engine = VLLMEngine(policy[2], method="ngram", num_draft_tokens=4, max_model_len=512)
    try:
        out = engine.generate(prompts, GREEDY, max_new_tokens=32)
        # Sampled: the CPU repair must register although the ngram proposer has loaded llvmlite (numba), after which
        # vLLM's own register_kernels raises (see vllm_support.register_expand_fallback).
        sampled = engine.generate(prompts, SamplingParams(do_sample=True), max_new_tokens=16, seed=0)
    finally:
        engine.close()
    assert out.completion_ids == reference
    assert out.stats.verify_steps > 0
    vocab = policy[0].config.vocab_size
    assert all(0 <= token < vocab for row in sampled.completion_ids for token in row)
    assert all(math.isfinite(v) for row in sampled.logprobs for v in row)
