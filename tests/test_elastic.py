"""Elastic speculation: the controller picks the k the formula says, and switching never changes what is sampled."""

from __future__ import annotations

import itertools

import pytest
import torch

from adaptive_drafter.sampling import SamplingParams
from adaptive_drafter import SpecConfig, SpeculativeEngine
from adaptive_drafter.drafter import noised_copy
from adaptive_drafter.elastic import ElasticController, best_k, expected_tokens, interpolate
from adaptive_drafter.metrics import speedup_estimate
from adaptive_drafter.testing import left_padded_prompts, tiny_causal_lm


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.6, 0.8, 0.95])
@pytest.mark.parametrize("c, slope", [(0.05, 0.0), (0.27, 0.15), (0.27, 0.5), (0.5, 1.0)])
def test_best_k_is_the_argmax_of_the_speedup_formula(alpha, c, slope):
    verify = [1.0 + k * slope for k in range(9)]
    formula = {k: speedup_estimate(alpha, k, c, verify[k]) for k in range(1, 9)}
    formula[0] = 1.0  # plain decoding
    assert best_k(alpha, c, verify) == max(formula, key=formula.get)


def test_expected_tokens_matches_the_closed_form():
    assert expected_tokens(0.0, 4) == 1.0 and expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def measured(controller: ElasticController, batch: int, plain: float, draft: float, verify_per_token: float, k: int):
    controller.observe_plain(batch, plain)
    controller.observe_speculation(batch, k, draft * k, plain + verify_per_token * k, accepted=0, rejections=0)


def test_controller_speculates_in_the_long_tail_and_not_at_large_batch():
    controller = ElasticController(num_draft_tokens=6)
    controller.accepted, controller.rejected = 80.0, 20.0  # alpha ~ 0.8
    # GPU-like long tail: verifying is nearly free, drafting cheap: speculate with a long draft.
    measured(controller, batch=2, plain=0.010, draft=0.001, verify_per_token=0.0005, k=6)
    # Compute-bound large batch: each verified token costs as much as a decode step: never speculate.
    measured(controller, batch=64, plain=0.100, draft=0.030, verify_per_token=0.100, k=6)
    alpha = controller.alpha
    expected = max(range(1, 7), key=lambda k: speedup_estimate(alpha, k, 0.1, 1 + k * 0.05))
    assert controller.choose(batch=2, limit=6) == expected >= 4
    assert controller.choose(batch=64, limit=6) == 0
    assert controller.choose(batch=2, limit=3) == 3  # never beyond what the rows can still emit


def test_controller_measures_before_it_decides_and_threshold_pins_plain():
    controller = ElasticController(num_draft_tokens=4, min_batch_plain=16)
    assert controller.choose(batch=4, limit=4) == 4  # no cost known yet: measure speculation first
    controller.observe_speculation(4, 4, 0.004, 0.02, accepted=4, rejections=0)
    assert controller.choose(batch=4, limit=4) == 0  # then a plain step
    assert controller.choose(batch=32, limit=4) == 0  # at or above the threshold: plain


def test_low_acceptance_turns_speculation_off():
    controller = ElasticController(num_draft_tokens=4)
    measured(controller, batch=1, plain=0.010, draft=0.003, verify_per_token=0.001, k=4)
    controller.accepted, controller.rejected = 1.0, 99.0
    assert controller.choose(batch=1, limit=4) == 0


def test_plain_mode_probes_a_poor_drafter_rarely_and_returns_when_it_improves():
    controller = ElasticController(num_draft_tokens=4)
    controller.accepted, controller.rejected = 2.0, 98.0
    measured(controller, batch=1, plain=0.010, draft=0.001, verify_per_token=0.0005, k=4)
    picks = [controller.choose(1, limit=4) for _ in range(64)]
    assert set(picks) == {0}  # fresh evidence of a poor drafter: probing would only cost
    for _ in range(1000):  # the drafter stays poor: every probe is rejected at its first draft
        picks.append(controller.choose(1, limit=4))
        if picks[-1]:
            controller.observe_speculation(1, picks[-1], 0.001, 0.0105, accepted=0, rejections=1)
    probes = [i for i, k in enumerate(picks) if k]
    assert probes and probes[0] >= 64 and len(probes) < 1064 / 64  # as the evidence ages, probes come back, rarely
    for _ in range(300):  # the drafter now agrees: the probes see it
        controller.choose(1, limit=4)
        controller.observe_speculation(1, 1, 0.001, 0.0105, accepted=1, rejections=0)
    assert controller.choose(1, limit=4) == 4
    # A swapped-in adapter makes the history stale at once: the controller forgets most of it and re-measures.
    controller.accepted, controller.rejected = 2.0, 98.0
    controller.forget_acceptance()
    for _ in range(8):
        controller.observe_speculation(1, 4, 0.004, 0.012, accepted=4, rejections=0)
    assert controller.alpha > 0.75 and controller.choose(1, limit=4) == 4


@pytest.mark.parametrize("accepted, rejected, probes", [(0, 0, True), (6, 4, True), (30, 70, False), (300, 200, False)])
def test_a_probe_drafts_the_k_that_pays_at_the_optimistic_alpha(accepted, rejected, probes):
    """CPU-like costs: v_1 = 1.74, v_4 = 1.93 decode steps, c = 0.16; α ≈ 0.6 is below break-even (plain is right).
    Few counts leave room for a good drafter (probe with the k that would then pay); many do not (no probe)."""
    controller = ElasticController(num_draft_tokens=4, memory=1.0)  # no ageing: the counts are what they are
    controller.observe_plain(1, 1.0)
    controller.observe_speculation(1, 1, 0.16, 1.74, accepted=0, rejections=0)
    controller.observe_speculation(1, 4, 0.64, 1.93, accepted=0, rejections=0)
    controller.accepted, controller.rejected = accepted, rejected
    verify = interpolate({1: 1.74, 4: 1.93}, 4)
    assert best_k(controller.alpha, 0.16, verify) == 0
    controller.steps = controller.explore_every // 2 - 1  # the next step is a probe step
    expected = best_k(controller.alpha_optimistic, 0.16, verify)
    assert controller.choose(1, limit=4) == expected
    assert (expected > 0) == probes


def test_verify_costs_are_interpolated_between_the_ks_measured():
    assert interpolate({4: 2.0}, 4) == pytest.approx([1.0, 1.25, 1.5, 1.75, 2.0])
    assert interpolate({1: 1.8, 4: 2.1}, 6) == pytest.approx([1.0, 1.8, 1.9, 2.0, 2.1, 2.2, 2.3])
    assert interpolate({2: 3.0}, 4) == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0])  # past the last: its slope


def test_a_cpu_like_jump_in_verify_cost_does_not_hide_a_good_drafter():
    """On a CPU verifying 2 tokens costs ~1.7 decode steps and 5 tokens barely more. Measured per k, the controller
    speculates with k = 4 at α = 0.85 (S ≈ 1.4); a cost linear in k fitted from k = 1 (v_4 ≈ 3.96) would stay plain."""
    controller = ElasticController(num_draft_tokens=4, memory=1.0)
    controller.observe_plain(1, 1.0)
    controller.observe_speculation(1, 1, 0.16, 1.74, accepted=0, rejections=0)
    controller.observe_speculation(1, 4, 0.64, 1.93, accepted=0, rejections=0)
    controller.accepted, controller.rejected = 85.0, 15.0
    assert controller.choose(1, limit=4) == 4
    assert speedup_estimate(controller.alpha, 4, 0.16, 1.93) > 1.3
    linear = [1.0 + 0.74 * k for k in range(5)]
    assert best_k(controller.alpha, 0.16, linear) == 0


def test_unrepresentative_draft_times_leave_the_cost_alone():
    controller = ElasticController(num_draft_tokens=4)
    measured(controller, batch=1, plain=0.010, draft=0.001, verify_per_token=0.0005, k=4)
    before = controller.costs[1].draft
    controller.observe_speculation(1, 4, None, 0.012, accepted=4, rejections=0)  # a catch-up step: time not used
    assert controller.costs[1].draft == before and controller.accepted == 4


def test_elastic_engine_measures_the_drafter_only_in_steady_state():
    policy = tiny_causal_lm("llama", logit_scale=8.0)
    engine = SpeculativeEngine(policy, noised_copy(policy, 0.05), SpecConfig(num_draft_tokens=3, elastic=True))
    ids, mask = left_padded_prompts(1, 12, 12, 256, seed=0)
    seen = []
    original = engine.controller.observe_costs

    def observe(batch, k, draft, *rest):
        if k:
            seen.append(draft)
        original(batch, k, draft, *rest)

    engine.controller.observe_costs = observe
    engine.generate(ids, SamplingParams(do_sample=False), attention_mask=mask, max_new_tokens=24)
    assert seen[0] is None  # the first draft prefilled the 12-token prompt: not a drafter step's cost
    assert any(t is not None and t > 0 for t in seen[1:])


def test_switching_between_plain_and_speculative_steps_is_lossless(monkeypatch):
    policy = tiny_causal_lm("qwen2", logit_scale=8.0)
    engine = SpeculativeEngine(policy, noised_copy(policy, 0.1), SpecConfig(num_draft_tokens=4, elastic=True))
    schedule = itertools.cycle([0, 0, 3, 4, 0, 1, 2, 0, 0, 0, 4])  # plain stretches make the drafter catch up
    monkeypatch.setattr(engine.controller, "choose", lambda batch, limit: min(next(schedule), limit))
    ids, mask = left_padded_prompts(24, 2, 12, 256, seed=9)
    out = engine.generate(ids, SamplingParams(do_sample=False), attention_mask=mask, max_new_tokens=40, eos_token_id=2)
    reference = policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0)
    expected = [row[: row.index(2) + 1] if 2 in row else row for row in reference[:, ids.shape[1] :].tolist()]
    assert out.completion_ids == expected
    assert out.stats.plain_steps > 24 and out.stats.verify_steps > 0 and out.stats.acceptance_rate > 0.3


def test_elastic_engine_samples_the_policys_distribution_and_learns_costs():
    policy = tiny_causal_lm("llama", logit_scale=4.0)
    engine = SpeculativeEngine(policy, noised_copy(policy, 0.1), SpecConfig(num_draft_tokens=4, elastic=True))
    ids, mask = left_padded_prompts(8, 2, 8, 256, seed=1)
    for seed in range(3):
        out = engine.generate(ids, attention_mask=mask, max_new_tokens=24, seed=seed)
        assert all(len(row) == 24 for row in out.completion_ids)
    costs = engine.controller.costs[ElasticController.bucket(8)]
    assert costs.plain is not None and costs.draft is not None and costs.verify
    assert 0 < engine.controller.alpha < 1


def test_plain_batch_threshold_without_elastic():
    policy = tiny_causal_lm("llama", logit_scale=8.0)
    engine = SpeculativeEngine(
        policy, noised_copy(policy, 0.1), SpecConfig(num_draft_tokens=3, elastic=False, plain_batch_threshold=4)
    )
    ids, mask = left_padded_prompts(8, 2, 8, 256, seed=2)
    out = engine.generate(ids, SamplingParams(do_sample=False), attention_mask=mask, max_new_tokens=12)
    assert out.stats.verify_steps == 0 and out.stats.plain_steps == 8 * 12
    small = engine.generate(ids[:2], SamplingParams(do_sample=False), attention_mask=mask[:2], max_new_tokens=12)
    assert small.stats.verify_steps > 0


@pytest.mark.parametrize("verify_cost, expected", [(1.05, 1), (1.40, 0), (1.50, 0)])
def test_speculation_needs_a_margin_over_plain(verify_cost, expected):
    """α = 0.5, k = 1, c = 0.05: S = 1.5 / (0.05 + v_1) is 1.36, 1.03 and 0.97. At 1.03 the formula's argmax is k = 1,
    but a gain that small is within the estimates' noise: the controller stays plain below S = 1.05."""
    controller = ElasticController(num_draft_tokens=1, memory=1.0)
    controller.observe_plain(1, 1.0)
    controller.observe_speculation(1, 1, 0.05, verify_cost, accepted=0, rejections=0)
    controller.accepted, controller.rejected = 50.0, 50.0
    assert controller.choose(1, limit=1) == expected
    assert best_k(controller.alpha, 0.05, [1.0, verify_cost]) == int(verify_cost < 1.45)


def test_probes_of_a_drafter_that_never_pays_back_off_and_a_new_adapter_is_probed_at_once():
    controller = ElasticController(num_draft_tokens=4)
    speculated = []
    for _ in range(4096):
        k = controller.choose(1, 4)
        speculated.append(k)
        if k:  # an untrained drafter: every draft rejected, drafting and verifying cost like a CPU's
            controller.observe_speculation(1, k, 0.3 * k, 1.6, accepted=0, rejections=1)
        else:
            controller.observe_plain(1, 1.0)
    # The first step measures speculation; probes then wait 16, 32, 64, ... up to 1024 steps: ~10 in 4096 steps,
    # where probing every 32 steps would cost ~128.
    assert sum(1 for k in speculated if k) <= 12, sum(1 for k in speculated if k)
    assert not any(speculated[-900:])
    controller.forget_acceptance()  # a new adapter: the next step probes it
    assert controller.choose(1, 4) > 0


def test_a_drafter_whose_acceptance_decays_with_depth_gets_the_shorter_draft_that_pays():
    """An EAGLE-style head chains on its own outputs: its first draft is accepted far more often than its later ones.
    The pooled acceptance (0.5 here) would draft 2 tokens; per-depth counts (1.0, then 0.0) say one is all that pays."""
    pooled, by_depth = ElasticController(num_draft_tokens=4), ElasticController(num_draft_tokens=4)
    for controller in (pooled, by_depth):
        measured(controller, batch=1, plain=0.010, draft=0.0005, verify_per_token=0.001, k=4)
        controller.observe_speculation(1, 1, 0.0005, 0.011, accepted=0, rejections=0)
    for _ in range(50):  # every row accepts its first draft and rejects its second, at k = 2
        pooled.observe_acceptance(accepted=8, rejections=8)
        by_depth.observe_acceptance(accepted=8, rejections=8, by_depth=[(8, 8), (0, 8)])
    assert pooled.alpha == by_depth.alpha == pytest.approx(0.5, abs=0.01)
    assert pooled.alphas(2) == [pytest.approx(0.5, abs=0.01)] * 2  # no per-depth counts: the pooled alpha
    assert by_depth.alphas(3) == [
        pytest.approx(1.0, abs=0.02),
        pytest.approx(0.0, abs=0.02),
        pytest.approx(0.5, abs=0.01),
    ]
    assert by_depth.expected_tokens(4) == pytest.approx(2.0, abs=0.05)
    assert pooled.choose(batch=1, limit=4) == 2 and by_depth.choose(batch=1, limit=4) == 1
    by_depth.forget_acceptance()  # a new adapter: its depths are re-measured too
    assert by_depth.depth_trials[0] == pytest.approx(0.1 * sum(8 * 0.99**i for i in range(50)))
