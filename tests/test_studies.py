"""The drift study's library: its tasks reward what they say, the GRPO update moves the policy towards rewarded
completions, drift is zero for a policy against itself, rebasing copies the policy's weights, and the summary's
figures are what the rows say."""

from __future__ import annotations

import copy
import math
import types

import pytest
import torch

from adaptive_drafter.config import DrafterConfig
from adaptive_drafter.drafter import build_drafter
from adaptive_drafter.experiments.studies import (
    completion_rows,
    correlation,
    distill_overhead,
    drift,
    embedded_task,
    group_advantages,
    grpo_update,
    rebase_drafter,
    study_seed,
    summarize,
    tiny_policy,
    tiny_task,
)
from adaptive_drafter.testing import tiny_causal_lm


def test_study_seeds_are_deterministic_31_bit_and_differ_by_part():
    assert study_seed(0, "train", 3) == study_seed(0, "train", 3)
    assert study_seed(0, "train", 3) != study_seed(0, "eval", 3)
    assert 0 <= study_seed("x") < 2**31


def test_tiny_task_rewards_target_tokens_before_eos_over_the_budget():
    task = tiny_task(vocab_size=256, max_new_tokens=4, eos=2, pad=0, modulus=4)
    ids, mask, metas = task.make_prompts(3, 7)
    assert ids.shape[0] == mask.shape[0] == len(metas) == 3 and (ids[mask.bool()] >= 3).all()
    assert torch.equal(ids, task.make_prompts(3, 7)[0])  # the seed decides the prompts
    assert task.rewards(metas[:2], [[8, 9, 12, 2], [5, 7]]) == [0.5, 0.0]


def test_tiny_policy_damps_the_layers_past_the_drafters():
    damped, description = tiny_policy(drafter_layers=2, dampen=0.5)
    plain, _ = tiny_policy(drafter_layers=2, dampen=1.0)
    assert "4 layers" in description
    assert torch.equal(damped.model.layers[1].mlp.down_proj.weight, plain.model.layers[1].mlp.down_proj.weight)
    assert torch.allclose(damped.model.layers[2].mlp.down_proj.weight, 0.5 * plain.model.layers[2].mlp.down_proj.weight)


def test_embedded_task_sums_the_recipes_reward_functions(make_tokenizer):
    tokenizer = make_tokenizer(["What", "is", "the", "answer", "41", "42"])
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    task = embedded_task(tokenizer, "arithmetic")
    ids, mask, metas = task.make_prompts(3, 0)
    assert ids.shape == mask.shape and ids.shape[0] == 3 and set(metas[0]) == {"answer"}
    answer = tokenizer("42", add_special_tokens=False).input_ids
    wrong = tokenizer("the answer is 41", add_special_tokens=False).input_ids
    eos = [tokenizer.eos_token_id]
    rewards = task.rewards([{"answer": "42"}] * 3, [answer + eos, wrong + eos, tokenizer("the answer is 42").input_ids])
    assert rewards == pytest.approx([1.2, 0.0, 1.0])  # exact match 1, bare number 0.2
    with pytest.raises(ValueError, match="Unknown embedded task"):
        embedded_task(tokenizer, "poetry")


def test_completion_rows_mark_the_positions_that_predict_completion_tokens():
    ids, attention, mask = completion_rows([[5, 6], [7]], [[8, 9], [10, 11, 12]], pad=0)
    assert ids.tolist() == [[5, 6, 8, 9], [7, 10, 11, 12]] and attention.sum().item() == 8
    assert mask.tolist() == [[False, True, True, False], [True, True, True, False]]


def test_group_advantages_normalise_within_each_group():
    adv = group_advantages([1.0, 0.0, 0.5, 0.5], group_size=2)
    assert adv[0] > 0 > adv[1] and adv[2] == adv[3] == 0
    assert group_advantages([1.0, 0.0], group_size=1).abs().sum() == 0  # a group of one has no baseline


@torch.no_grad()
def completion_logprob(policy, prompt, completion):
    ids, attention, mask = completion_rows([prompt], [completion], pad=0)
    logits = policy(input_ids=ids, attention_mask=attention).logits[:, :-1].log_softmax(-1)
    return float(logits.gather(-1, ids[:, 1:, None]).squeeze(-1)[mask[:, :-1]].sum())


def test_grpo_update_raises_the_rewarded_completion_and_lowers_the_other():
    policy = tiny_causal_lm(num_layers=2)
    reference = copy.deepcopy(policy).requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2, weight_decay=0.0)
    prompts, completions = [[5, 6, 7]] * 2, [[10, 11, 12], [20, 21, 22]]
    before = [completion_logprob(policy, p, c) for p, c in zip(prompts, completions)]
    for _ in range(3):
        loss = grpo_update(policy, optimizer, prompts, completions, group_advantages([1.0, 0.0], 2), 0,
                           microbatch=1, reference=reference, kl_coef=0.05)  # fmt: skip
        assert math.isfinite(loss)
    after = [completion_logprob(policy, p, c) for p, c in zip(prompts, completions)]
    assert after[0] > before[0] and after[1] < before[1]
    weights = [p.detach().clone() for p in policy.parameters()]
    assert grpo_update(policy, optimizer, prompts, completions, torch.zeros(2), 0) == 0.0  # no signal, no step
    assert all(torch.equal(a, b) for a, b in zip(weights, policy.parameters()))


def test_drift_is_zero_against_itself_and_grows_as_the_policy_moves():
    policy = tiny_causal_lm(num_layers=2, logit_scale=4.0)
    prompts, completions = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]
    kl, entropy = drift(policy, policy, prompts, completions, pad=0, chunk=1)
    assert kl == pytest.approx(0.0, abs=1e-6) and 0 < entropy < math.log(256)
    moved = copy.deepcopy(policy)
    with torch.no_grad():
        moved.get_output_embeddings().weight.mul_(2.0)
    assert drift(moved, policy, prompts, completions, pad=0)[0] > 1e-3


def test_rebase_copies_the_policys_weights_into_the_drafter_and_keeps_its_adapter():
    policy = tiny_causal_lm(num_layers=3)
    drafter = build_drafter(policy, DrafterConfig(drafter_num_layers=2, drafter_lora_r=4, drafter_lora_alpha=8))
    lora = {n: p.detach().clone() for n, p in drafter.named_parameters() if "lora_" in n}
    with torch.no_grad():
        policy.model.layers[0].self_attn.q_proj.weight.add_(1.0)
    rebase_drafter(drafter, policy)
    base = drafter.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(base, policy.model.layers[0].self_attn.q_proj.weight)
    assert all(torch.equal(p, lora[n]) for n, p in drafter.named_parameters() if "lora_" in n)


def test_summary_figures_follow_the_rows():
    rows = [
        {"step": s, "adaptive_acceptance": a, "frozen_acceptance": f, "policy_entropy": e, "kl_to_step0": k,
         "reward_mean": r}
        for s, a, f, e, k, r in [(0, 0.6, 0.6, 2.0, 0.0, 0.1), (10, 0.7, 0.5, 1.8, 0.5, 0.3), (20, 0.66, 0.3, 1.7, 0.9, 0.5)]
    ]  # fmt: skip
    s = summarize(rows)
    assert s["adaptive_acceptance_peak"] == 0.7 and s["adaptive_acceptance_peak_step"] == 10
    assert s["adaptive_min_last_half"] == 0.66 and s["adaptive_min_last_half_rel_peak"] == pytest.approx(0.66 / 0.7)
    assert s["frozen_relative_fall"] == pytest.approx(0.5) and s["final_kl"] == 0.9
    assert s["targets"] == {"adaptive_min_last_half_rel_peak >= 0.9": True, "frozen_relative_fall >= 0.3": True}
    assert correlation([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0) and math.isnan(correlation([1, 2], [1, 2]))


def test_distill_overhead_compares_the_runs_phase_by_phase():
    run = types.SimpleNamespace
    distill = run(rollout_s=12.0, update_s=6.0, engine_steps=100, rewards=[0.1])
    baseline = run(rollout_s=10.0, update_s=5.0, engine_steps=100, rewards=[0.1, 0.3, 0.5])
    o = distill_overhead(distill, baseline, window=2)
    assert o["overhead"] == pytest.approx(0.2) and o["update_phase_overhead"] == pytest.approx(0.2)
    assert o["rollout_per_step_overhead"] == pytest.approx(0.2) and o["baseline_final_train_reward"] == 0.4
