"""Hybrid drafting (`SpecConfig.drafting='hybrid'`): per row and step, a model-free suffix draft (siblings, earlier
rollouts, the row's own context) or the model drafter's, verified together; lossless like the model drafter alone."""

from __future__ import annotations

import copy

import pytest
import torch
from test_engine import (
    EOS,
    PAD,
    STEPS,
    VOCAB,
    exact_joint,
    first_tokens_joint,
    frequent_token,
    noise_bound,
    reference_greedy,
)

from adaptive_drafter import SpecConfig, SpeculativeEngine
from adaptive_drafter.drafter import noised_copy
from adaptive_drafter.metrics import SpecStats
from adaptive_drafter.sampling import SamplingParams
from adaptive_drafter.suffix import SuffixConfig, SuffixDrafter
from adaptive_drafter.testing import left_padded_prompts, tiny_causal_lm


def grpo_prompts(groups: int, copies: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`groups` random prompts of mixed lengths, each repeated `copies` times in a row, as GRPO batches them."""
    ids, mask = left_padded_prompts(groups, 2, 12, 256, seed=seed)
    return ids.repeat_interleave(copies, 0), mask.repeat_interleave(copies, 0)


@pytest.fixture(scope="module")
def models():
    policy = tiny_causal_lm("llama", logit_scale=8.0)
    return policy, noised_copy(policy, std=0.1, seed=1)


@pytest.fixture(scope="module")
def greedy_case(models):
    """4 prompts x 4 copies, an eos that ends rows at different lengths, and the policy's own greedy completions."""
    policy = models[0]
    ids, mask = grpo_prompts(4, 4, seed=7)
    eos = frequent_token(reference_greedy(policy, ids, mask, 32, eos=[]))
    expected = reference_greedy(policy, ids, mask, 32, eos=eos)
    assert len({len(row) for row in expected}) > 2, "rows should finish at different lengths"
    return ids, mask, eos, expected


class StepSources(list):
    """Per step with suffix drafts, (the model's k, rows verifying a suffix draft, rows verifying the model's or none),
    through the engine's step hook."""

    def attach(self, engine: SpeculativeEngine) -> SpeculativeEngine:
        engine.step_hooks.append(self.record)
        return engine

    def record(self, plan, step) -> None:
        suffix = int(plan.suffix_rows.sum())
        if suffix:
            self.append((plan.k, suffix, len(plan.suffix_rows) - suffix))


@pytest.fixture
def step_sources():
    return StepSources()


@pytest.mark.parametrize("elastic", [False, True], ids=["fixed_k", "elastic"])
def test_greedy_with_suffix_drafts_is_token_identical_to_policy_generate(models, greedy_case, elastic):
    policy, drafter = models
    ids, mask, eos, expected = greedy_case
    engine = SpeculativeEngine(policy, drafter, SpecConfig(elastic=elastic, num_draft_tokens=3, drafting="hybrid"))
    first = engine.generate(
        ids, SamplingParams(do_sample=False), attention_mask=mask, max_new_tokens=32, eos_token_id=eos
    )
    assert first.completion_ids == expected
    # A second rollout of the same prompts: the first one's completions are the history source, which drafts them
    # whole (greedy siblings are equal, so within one rollout none goes ahead of another).
    second = engine.generate(
        ids, SamplingParams(do_sample=False), attention_mask=mask, max_new_tokens=32, eos_token_id=eos
    )
    assert second.completion_ids == expected
    stats = second.stats
    assert stats.suffix_verifies > 0 and stats.suffix_acceptance_rate == 1.0, stats
    assert stats.suffix_tokens_per_verify > 8, stats
    assert engine.suffix._row_uid == []  # the rollout was ended


def test_rows_with_suffix_drafts_speculate_when_the_controller_decodes_plainly(models, greedy_case, step_sources):
    """A random drafter: the elastic controller learns to decode plainly (k = 0), yet rows with a promising suffix draft
    still verify it, beside plain rows in the same forward."""
    policy = models[0]
    ids, mask, eos, expected = greedy_case
    drafter = tiny_causal_lm("llama", logit_scale=8.0, seed=1)
    engine = SpeculativeEngine(policy, drafter, SpecConfig(elastic=True, num_draft_tokens=3, drafting="hybrid"))
    step_sources.attach(engine)
    for _ in range(3):
        out = engine.generate(
            ids, SamplingParams(do_sample=False), attention_mask=mask, max_new_tokens=32, eos_token_id=eos
        )
        assert out.completion_ids == expected
    assert any(k == 0 and suffix for k, suffix, _ in step_sources), step_sources
    assert out.stats.suffix_verifies > 0 and out.stats.suffix_acceptance_rate > 0.5, out.stats


def test_the_drafter_cache_stays_exact_when_rows_mix_sources_in_a_step(step_sources):
    """A drafter equal to the policy accepts every greedy draft as long as its cache holds exactly each row's tokens:
    rows that verified a suffix draft (their drafter slots become holes and their tokens pending) must not disturb it."""
    policy = tiny_causal_lm("llama", logit_scale=8.0)
    engine = SpeculativeEngine(
        policy, copy.deepcopy(policy), SpecConfig(elastic=False, num_draft_tokens=2, drafting="hybrid")
    )
    step_sources.attach(engine)
    ids, mask = grpo_prompts(4, 3, seed=3)
    expected = reference_greedy(policy, ids, mask, 24, eos=-1)
    # history for the first two prompts only
    engine.generate(ids[:6], SamplingParams(do_sample=False), attention_mask=mask[:6], max_new_tokens=24)
    step_sources.clear()
    out = engine.generate(ids, SamplingParams(do_sample=False), attention_mask=mask, max_new_tokens=24)
    assert out.completion_ids == expected
    stats = out.stats
    assert any(suffix and model for _, suffix, model in step_sources), step_sources
    assert stats.suffix_verifies > 0 and stats.verify_steps > stats.suffix_verifies, stats
    assert stats.model_acceptance_rate == 1.0, stats


# --- sampling: the exact joint distribution of the first tokens -------------------------------------------------

ROWS = 4000


@pytest.fixture(scope="module")
def peaked_models():
    """A policy peaked enough for siblings to agree (suffix drafts then get accepted and rejected both) and an
    anti-correlated drafter (negated head): its α is low, so most rows choose the suffix draft."""
    policy = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=16, logit_scale=20.0, seed=0).double()
    drafter = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=16, logit_scale=-20.0, seed=0).double()
    return policy, drafter


def joint_of_first_tokens(completions: list[list[int]]) -> torch.Tensor:
    return first_tokens_joint(completions)[0]


def test_sampled_joint_distribution_with_suffix_drafts_is_the_policys(peaked_models):
    policy, drafter = peaked_models
    prompt = [3, 1, 4, 5]
    target = exact_joint(policy, prompt, SamplingParams(do_sample=True))
    engine = SpeculativeEngine(policy, drafter, SpecConfig(elastic=False, num_draft_tokens=1, drafting="hybrid"))
    # Fewer candidates per lookup: a faster test; raw frequencies (prior 0): suffix drafts on most steps, more power.
    engine.suffix = SuffixDrafter(SuffixConfig(max_candidates=16, prior=0.0))
    ids = torch.tensor([prompt]).expand(ROWS, -1)
    # The first rollout drafts from siblings that went ahead, the second from the first's completions too.
    outs = [engine.generate(ids, max_new_tokens=STEPS + 3, seed=seed) for seed in range(2)]
    empirical = [joint_of_first_tokens(out.completion_ids) for out in outs]
    for joint in empirical:
        tv = 0.5 * float((joint - target).abs().sum())
        assert tv < noise_bound(target, ROWS), f"TV {tv:.4f} >= noise bound {noise_bound(target, ROWS):.4f}"
    pooled = 0.5 * float((sum(empirical) / 2 - target).abs().sum())
    assert pooled < noise_bound(target, 2 * ROWS), f"TV {pooled:.4f}"

    # The test has power: suffix drafts decided a large share of the tokens, by acceptance and by rejection...
    stats = outs[0].stats + outs[1].stats
    assert stats.suffix_verifies > 0.4 * stats.verify_steps, stats
    assert stats.suffix_accepted > 0.2 * stats.emitted_tokens, stats
    assert 0.1 < stats.suffix_acceptance_rate < 0.9, stats
    # ...and a lossy rule over the same drafts (accept any the policy gives p > 0) is caught many times over.
    engine.config.acceptance, engine.config.cascade_threshold = "cascade", 0.0
    lossy = engine.generate(ids, max_new_tokens=STEPS + 3, seed=2)
    assert lossy.stats.suffix_verifies > 0.9 * lossy.stats.verify_steps
    assert 0.5 * float((joint_of_first_tokens(lossy.completion_ids) - target).abs().sum()) > 3 * noise_bound(
        target, ROWS
    )


# --- metrics, targets, lifecycle --------------------------------------------------------------------------------


def test_metrics_split_verifies_by_draft_source():
    stats = SpecStats(
        drafted=20, accepted=12, verify_steps=6, verified_tokens=18, plain_steps=2,
        suffix_drafted=12, suffix_accepted=9, suffix_verifies=2, suffix_verified_tokens=11,
    )  # fmt: skip
    metrics = stats.metrics()
    assert metrics["spec/acceptance_rate"] == 12 / 20  # totals over both sources, as before
    assert metrics["spec/suffix_share"] == 2 / 6
    assert metrics["spec/suffix_acceptance_rate"] == 9 / 12
    assert metrics["spec/suffix_tokens_per_verify"] == 11 / 2
    assert metrics["spec/model_acceptance_rate"] == 3 / 8
    model_only = SpecStats(drafted=8, accepted=6, verify_steps=2, verified_tokens=8)
    assert not any("suffix" in key or "model" in key for key in model_only.metrics())


def test_collected_targets_count_suffix_positions_as_drafted(models):
    policy, drafter = models
    ids, mask = grpo_prompts(3, 4, seed=5)
    config = SpecConfig(elastic=False, num_draft_tokens=2, drafting="hybrid", collect_topk=4)
    engine = SpeculativeEngine(policy, drafter, config)
    engine.generate(ids, SamplingParams(do_sample=False), attention_mask=mask, max_new_tokens=20)
    out = engine.generate(ids, SamplingParams(do_sample=False), attention_mask=mask, max_new_tokens=20)
    stats = out.stats
    assert stats.suffix_verifies > 0
    metrics = stats.metrics()
    assert {"spec/suffix_share", "spec/suffix_acceptance_rate", "spec/suffix_tokens_per_verify"} <= set(metrics)
    drafted = sum(int(t.drafted.sum()) for t in out.targets)
    accepted = sum(int(t.accepted.sum()) for t in out.targets)
    assert accepted == stats.accepted and stats.suffix_accepted <= accepted <= drafted <= stats.drafted
    for row, targets in enumerate(out.targets):
        assert targets.topk_ids[:, 0].tolist() == out.completion_ids[row]
        assert bool((targets.accepted <= targets.drafted).all())


def test_suffix_drafting_is_off_by_default_and_validated():
    policy = tiny_causal_lm("llama")
    assert SpeculativeEngine(policy, policy).suffix is None
    with pytest.raises(ValueError, match="suffix_max_draft must be >= 1"):
        SpecConfig(drafting="hybrid", suffix_max_draft=0)
    with pytest.raises(ValueError, match="choose one of model, hybrid, suffix"):
        SpecConfig(drafting="siblings")


@pytest.mark.parametrize("elastic", [False, True])
def test_suffix_only_drafting_never_runs_the_drafter_model_and_stays_greedy_identical(elastic):
    policy = tiny_causal_lm("llama", logit_scale=6.0)
    drafter = noised_copy(policy, 0.05)
    engine = SpeculativeEngine(policy, drafter, SpecConfig(elastic=elastic, num_draft_tokens=3, drafting="suffix"))
    ids, mask = grpo_prompts(4, 4, seed=3)
    expected = reference_greedy(policy, ids, mask, 20, eos=EOS)
    calls = []
    drafter.register_forward_hook(lambda *args: calls.append(1))
    for _ in range(2):  # the second call drafts from the first call's completions (history)
        out = engine.generate(
            ids, SamplingParams(do_sample=False), attention_mask=mask, max_new_tokens=20, eos_token_id=EOS
        )
        assert out.completion_ids == expected
    assert not calls and out.stats.drafted == out.stats.suffix_drafted > 0


def test_a_failed_rollout_still_ends_the_suffix_rollout():
    policy = tiny_causal_lm("llama", logit_scale=4.0)
    drafter = noised_copy(policy, 0.1)
    drafter.lm_head.register_forward_hook(lambda module, args, out: out.index_fill(-1, torch.tensor([7]), float("nan")))
    engine = SpeculativeEngine(policy, drafter, SpecConfig(elastic=False, num_draft_tokens=2, drafting="hybrid"))
    ids, mask = grpo_prompts(2, 2, seed=0)
    with pytest.raises(ValueError, match="NaN"):
        engine.generate(ids, SamplingParams(do_sample=False), attention_mask=mask, max_new_tokens=8)
    assert engine.suffix._row_uid == []
