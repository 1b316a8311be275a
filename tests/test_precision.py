"""Rollouts in the precision the hardware is fast at (`adaptive_drafter.precision`): which dtype `auto` picks, the
rollout copy of the policy and its sync after optimizer steps, the drafter served in the same precision, losslessness
in bfloat16 (the sampled distribution is the rollout copy's; greedy differs from the copy's own `generate` only at
near-ties), and bfloat16 rollouts inside a GRPO run."""

from __future__ import annotations

import gc
import json
import math
import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model

from adaptive_drafter import SpecConfig, SpeculativeEngine
from adaptive_drafter.adaptive import AdaptiveDrafter
from adaptive_drafter.config import DrafterConfig, ServingConfig
from adaptive_drafter.drafter import adapter_state, build_drafter, load_adapter_state, merged_copy, noised_copy
from adaptive_drafter.precision import RolloutCopy, cpu_bf16_flags, fast_bf16, resolve_rollout_dtype
from adaptive_drafter.sampling import SamplingParams
from adaptive_drafter.testing import left_padded_prompts, tiny_causal_lm
from test_engine import (
    EOS,
    SAMPLES,
    STEPS,
    VOCAB,
    assert_within_noise,
    exact_joint,
    first_tokens_joint,
    noise_bound,
    reference_greedy,
    speculative_samples,
)
from test_trl import Recorder, make_trainer, rollout_under_test

BF16 = torch.bfloat16


def bf16_copy(model):
    return RolloutCopy.build(model, resolve_rollout_dtype("bfloat16", model)).model


# --- which precision --------------------------------------------------------------------------------------------


def test_cpu_flags_for_fast_bfloat16_are_read_from_cpuinfo(tmp_path):
    fast = tmp_path / "fast"
    fast.write_text("processor : 0\nflags : fpu sse avx512f avx512_bf16 amx_tile amx_bf16\n\nprocessor : 1\n")
    slow = tmp_path / "slow"
    slow.write_text("processor : 0\nflags : fpu sse avx2 avx512f\n")
    assert cpu_bf16_flags(str(fast)) == ("avx512_bf16", "amx_bf16")
    assert cpu_bf16_flags(str(slow)) == ()
    assert cpu_bf16_flags(str(tmp_path / "missing")) == ()


@pytest.mark.parametrize("fast", [True, False])
def test_auto_serves_a_float32_policy_in_bfloat16_only_where_the_hardware_is_fast(monkeypatch, fast):
    monkeypatch.setattr("adaptive_drafter.precision.fast_bf16", lambda device: (fast, "a test CPU"))
    policy = tiny_causal_lm("llama")
    precision = resolve_rollout_dtype("auto", policy)
    assert precision.dtype == (BF16 if fast else torch.float32)
    assert "a test CPU" in precision.reason
    copy = RolloutCopy.build(policy, precision)
    assert copy.is_copy == fast and (copy.nbytes > 0) == fast
    assert (copy.model is policy) != fast
    # Explicit settings are obeyed whatever the hardware.
    assert resolve_rollout_dtype("float32", policy).dtype == torch.float32
    assert resolve_rollout_dtype("bfloat16", policy).dtype == BF16


def test_auto_leaves_a_policy_trained_in_half_precision_as_it_is_without_a_copy(monkeypatch):
    monkeypatch.setattr("adaptive_drafter.precision.fast_bf16", lambda device: (True, "a test CPU"))
    for dtype in (BF16, torch.float16):
        policy = tiny_causal_lm("llama").to(dtype)
        copy = RolloutCopy.build(policy, resolve_rollout_dtype("auto", policy))
        assert copy.model is policy and not copy.is_copy and copy.nbytes == 0 and copy.sync(policy) == 0


def test_this_machine_reports_what_auto_decides():
    fast, hardware = fast_bf16("cpu")
    assert isinstance(fast, bool) and hardware.startswith("CPU")


def test_unknown_rollout_dtypes_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="rollout_dtype 'fp16'.*auto, float32, bfloat16"):
        ServingConfig(rollout_dtype="fp16")
    with pytest.raises(ValueError, match="auto, float32, bfloat16"):
        resolve_rollout_dtype("half", tiny_causal_lm("llama"))
    assert ServingConfig().rollout_dtype == "auto"


# --- the rollout copy -------------------------------------------------------------------------------------------


def test_rollout_copy_holds_the_policys_weights_rounded_once_with_ties_and_buffers_kept():
    policy = tiny_causal_lm("llama", tie_word_embeddings=True, logit_scale=4.0)
    policy.forward = lambda *a, **kw: pytest.fail("the copy must not call a wrapper bound on the policy instance")
    copy = bf16_copy(policy)
    del policy.forward
    for (name, p), (copy_name, c) in zip(policy.named_parameters(), copy.named_parameters()):
        assert name == copy_name and c.dtype == BF16 and not c.requires_grad
        assert torch.equal(c, p.detach().to(BF16)), name
    assert copy.lm_head.weight is copy.model.embed_tokens.weight  # tied, as in the policy
    for (name, b), (_, c) in zip(policy.named_buffers(), copy.named_buffers()):
        assert c.dtype == b.dtype and torch.equal(c, b), name  # rotary frequencies stay float32
    ids, mask = left_padded_prompts(3, 4, 9, 256, seed=1)
    with torch.no_grad():
        reference = policy(input_ids=ids, attention_mask=mask).logits
        served = copy(input_ids=ids, attention_mask=mask).logits
    assert served.dtype == BF16 and not copy.training
    assert (served.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_rollout_copy_follows_the_policy_after_an_optimizer_step():
    policy = tiny_causal_lm("llama", logit_scale=4.0).train()
    policy.model.embed_tokens.weight.requires_grad_(False)  # a frozen tensor: copied only when it changes
    rollout = RolloutCopy.build(policy, resolve_rollout_dtype("bfloat16", policy))
    storage = {name: p.data_ptr() for name, p in rollout.model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 256, (2, 12))
    for _ in range(2):
        policy(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        trainable = sum(p.requires_grad for p in policy.parameters())
        assert rollout.sync(policy) == trainable  # the frozen embedding is not copied again
        for (name, p), (_, c) in zip(policy.named_parameters(), rollout.model.named_parameters()):
            assert torch.equal(c, p.detach().to(BF16)), name
    # In place: the copy's tensors were written, never reallocated (no memory added per sync).
    assert storage == {name: p.data_ptr() for name, p in rollout.model.named_parameters()}
    assert rollout.sync(policy, stepped=False) == 0  # nothing changed since
    with torch.no_grad():
        policy.model.embed_tokens.weight.mul_(2)  # a frozen tensor written in place is noticed
    assert rollout.sync(policy, stepped=False) == 1
    assert torch.equal(rollout.model.model.embed_tokens.weight, policy.model.embed_tokens.weight.detach().to(BF16))


def test_a_step_that_writes_weights_through_data_is_synced_too():
    # DeepSpeed's optimizers write the updated weights through `.data`, which bumps no version counter.
    policy = tiny_causal_lm("llama")
    rollout = RolloutCopy.build(policy, resolve_rollout_dtype("bfloat16", policy))
    for p in policy.parameters():
        p.data.copy_(torch.randn_like(p))
    assert rollout.sync(policy, stepped=True) == sum(1 for _ in policy.parameters())
    for p, c in zip(policy.parameters(), rollout.model.parameters()):
        assert torch.equal(c, p.detach().to(BF16))


def test_a_peft_wrapped_policy_gets_a_rollout_copy_too():
    base = tiny_causal_lm("qwen3", logit_scale=4.0)
    policy = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8))
    copy = bf16_copy(policy)
    assert all(p.dtype == BF16 for p in copy.parameters())
    ids = torch.randint(3, 256, (2, 7))
    with torch.no_grad():
        reference, served = policy(input_ids=ids).logits, copy(input_ids=ids).logits.float()
    assert (served - reference).abs().max() < 0.05 * reference.abs().max()


def test_a_policy_changed_in_shape_after_the_copy_is_refused_clearly():
    policy = tiny_causal_lm("llama")
    rollout = RolloutCopy.build(policy, resolve_rollout_dtype("bfloat16", policy))
    policy.resize_token_embeddings(300)
    with pytest.raises(RuntimeError, match="architecture changed"):
        rollout.sync(policy)


# --- the drafter in the same precision ---------------------------------------------------------------------------


def test_the_drafter_serves_in_the_rollout_precision_and_a_swap_recasts_only_what_changed():
    policy = tiny_causal_lm("llama", logit_scale=4.0)
    drafter = build_drafter(policy, DrafterConfig(drafter_num_layers=1, drafter_lora_r=4))
    adaptive = AdaptiveDrafter(drafter)
    adaptive.serving_dtype = BF16
    first = adaptive.serving_model()
    assert all(p.dtype == BF16 for p in first.parameters())
    assert all(p.dtype == torch.float32 for p in drafter.parameters())  # the drafter trains in its own precision
    assert adaptive.serving_model() is first  # nothing changed: the same copy
    cached = len(adaptive._cast_cache)
    gone = weakref.ref(first)
    for seed in range(3):  # three adapter swaps
        gen = torch.Generator().manual_seed(seed)
        state = {name: torch.randn(v.shape, generator=gen) * 0.05 for name, v in adapter_state(drafter).items()}
        load_adapter_state(drafter, state)
        served = adaptive.serving_model()
        # Merged in float32, rounded once: exactly the float32 merged drafter cast to bfloat16.
        for (name, s), (_, m) in zip(served.named_parameters(), merged_copy(drafter).named_parameters()):
            assert torch.equal(s, m.detach().to(BF16)), name
        # The weights LoRA does not touch are cast once and shared by every serving copy; nothing accumulates.
        assert served.model.embed_tokens.weight is first.model.embed_tokens.weight
        q_proj = served.model.layers[0].self_attn.q_proj.weight
        assert not torch.equal(q_proj, first.model.layers[0].self_attn.q_proj.weight)
        assert len(adaptive._cast_cache) == cached
    del first, served
    gc.collect()
    assert gone() is None  # the serving copy of an old adapter is released
    adaptive.serving_dtype = None  # back to the drafter's own precision
    assert next(adaptive.serving_model().parameters()).dtype == torch.float32


# --- lossless in bfloat16 ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_vocab_bf16():
    policy = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=16, logit_scale=3.0, seed=0)
    drafter = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=16, logit_scale=3.0, seed=4)
    return bf16_copy(policy), bf16_copy(drafter), policy


@pytest.mark.parametrize(
    "settings", [dict(temperature=1.0), dict(temperature=0.7, top_k=3)], ids=["t1.0", "t0.7-topk3"]
)
@pytest.mark.parametrize("k", [1, 3])
def test_sampled_joint_distribution_in_bfloat16_is_the_rollout_copys(small_vocab_bf16, settings, k):
    policy, drafter, _ = small_vocab_bf16
    prompt = [3, 1, 4, 5]
    params = SamplingParams(do_sample=True, **settings)
    target = exact_joint(policy, prompt, params)  # by brute force over all prefixes, with the bfloat16 copy
    bound = noise_bound(target, SAMPLES)
    assert 0.5 * float((exact_joint(drafter, prompt, params) - target).abs().sum()) > 3 * bound  # the test has power

    out = speculative_samples(policy, drafter, prompt, k, settings)
    empirical, index = first_tokens_joint(out.completion_ids)
    assert_within_noise(empirical, target, SAMPLES)
    assert out.stats.drafted > 0 and 0 < out.stats.acceptance_rate < 1
    # The reported logprobs are the copy's, up to the rounding of a cached (k+1)-token forward vs a full one.
    lp = torch.tensor([row[:STEPS] for row in out.logprobs], dtype=torch.double).sum(-1)
    assert (lp - target[index].log()).abs().max() < 0.05


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_in_bfloat16_equals_the_copys_generate_except_at_near_ties(arch):
    policy = tiny_causal_lm(arch, logit_scale=8.0)
    copy, drafter = bf16_copy(policy), bf16_copy(noised_copy(policy, 0.1, seed=1))
    ids, mask = left_padded_prompts(64, 1, 24, 256, seed=7)
    expected = reference_greedy(copy, ids, mask, max_new_tokens=32, eos=EOS)
    out = SpeculativeEngine(copy, drafter, SpecConfig(elastic=False, num_draft_tokens=4)).generate(
        ids, SamplingParams(do_sample=False), attention_mask=mask, max_new_tokens=32, eos_token_id=EOS
    )
    assert out.stats.accepted > 0
    flipped = [row for row in range(64) if out.completion_ids[row] != expected[row]]
    assert len(flipped) <= 64 // 10, f"{len(flipped)} of 64 rows differ from the copy's generate"
    for row in flipped:  # each first divergence is a near-tie: the two tokens' logits within a few bf16 roundings
        ours, theirs = out.completion_ids[row], expected[row]
        at = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        prefix = ids[row][mask[row].bool()].tolist() + theirs[:at]
        with torch.no_grad():
            logits = copy(input_ids=torch.tensor([prefix])).logits[0, -1].float()
        gap = float((logits[theirs[at]] - logits[ours[at]]).abs())
        assert gap <= 4 * 2**-7 * float(logits.abs().max()), f"row {row}: gap {gap:.4f} is no near-tie"


# --- bfloat16 rollouts in a GRPO run -----------------------------------------------------------------------------


def test_bfloat16_rollouts_in_grpo_give_finite_losses_and_the_training_forwards_logprobs_up_to_rounding(tmp_path):
    rollout = Recorder(rollout_under_test(rollout_dtype="bfloat16"))
    policy = tiny_causal_lm("llama", vocab_size=64, num_layers=3, logit_scale=4.0)
    initial = tiny_causal_lm("llama", vocab_size=64, num_layers=3, logit_scale=4.0)  # the step-0 weights
    trainer = make_trainer(tmp_path, rollout, policy=policy, max_steps=3, learning_rate=1e-3)
    trainer.train()
    inner = rollout.rollout
    assert (
        inner.backend.rollout_copy.is_copy and inner.backend.rollout_copy.syncs == 2
    )  # after each optimizer step but the last
    assert next(inner.engine.policy.parameters()).dtype == BF16
    assert any("rollouts: policy served in bfloat16" in event for event in inner.events)
    served = inner.adaptive.draft_model()
    assert next(served.parameters()).dtype == BF16  # the drafter serves in the rollouts' precision
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # training keeps its own
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    norms = [log["grad_norm"] for log in trainer.state.log_history if "grad_norm" in log]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses + norms)

    # The rollout logprobs are the bfloat16 copy's: the float32 training forward's up to bf16 rounding, with no
    # systematic shift (what an importance-sampling correction would have to fix).
    _, out, _ = rollout.calls[0]
    diffs = []
    for prompt_ids, completion, logprobs in zip(out["prompt_ids"], out["completion_ids"], out["logprobs"]):
        assert all(math.isfinite(x) for x in logprobs)
        with torch.no_grad():
            logits = initial(input_ids=torch.tensor([prompt_ids + completion])).logits[0, len(prompt_ids) - 1 : -1]
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        diffs.append(torch.tensor(logprobs) - expected)
    diffs = torch.cat(diffs)
    assert diffs.abs().max() < 0.1 and abs(float(diffs.mean())) < 0.02, diffs


# --- the benchmark ----------------------------------------------------------------------------------------------


def test_bench_rollout_in_bfloat16_times_fp32_generate_beside_and_counts_the_copys_memory(tmp_path, capsys):
    from pathlib import Path

    from conftest import load_file_module

    bench = load_file_module(Path(__file__).resolve().parents[1] / "scripts" / "bench_rollout.py")
    out = tmp_path / "bench.json"
    argv = ["--batch-sizes", "1,3", "--max-new-tokens", "8", "--repeats", "1", "--dtype", "bfloat16", "--fp32-baseline"]
    bench.main([*argv, "--json", str(out)])
    printed = capsys.readouterr().out
    assert "precision: bfloat16" in printed and "spec/fp32" in printed and "rollout copy of the policy" in printed
    record = json.loads(out.read_text())
    assert record["meta"]["precision"]["dtype"] == "bfloat16"
    memory = record["meta"]["memory"]
    assert memory["rollout_copy_mib"] > 0 and memory["drafter_serving_copy_mib"] > 0
    for row in record["rows"]:
        assert row["fp32_plain_tok_s"] > 0 and row["ratio_vs_fp32"] > 0 and 0 <= row["identical_to_fp32_rows"] <= 1
        assert all(v is None or v > 0 for v in row["engine_v"].values())


def test_the_copys_lm_head_reads_a_contiguous_input_so_cpu_bfloat16_never_expands_its_weight():
    policy = tiny_causal_lm("llama", logit_scale=4.0)
    copy = bf16_copy(policy)
    seen = []
    standard = lambda x: x.stride() == torch.empty(x.shape).stride()  # noqa: E731
    copy.lm_head.register_forward_pre_hook(lambda module, args: seen.append(standard(args[0])))
    for batch in (1, 3):  # at batch 1 the sliced view even counts as contiguous, with its long batch stride
        ids = torch.randint(3, 256, (batch, 9))
        with torch.no_grad():
            last = copy(input_ids=ids, logits_to_keep=1).logits  # the last position sliced out: a strided view
            full = copy(input_ids=ids).logits
        assert torch.equal(last[:, -1], full[:, -1])
    assert seen == [True] * 4
