"""The held-out probe: the served adapter vs the starting one on fixed prompts and seeds, the policy's drift, the plot."""

import math

import torch
from test_drafter import trained_lora

from adaptive_drafter.adaptive import AdaptiveDrafter
from adaptive_drafter.config import DrafterConfig, SpecConfig
from adaptive_drafter.drafter import build_drafter, load_adapter_state
from adaptive_drafter.plots import plot_run
from adaptive_drafter.probe import DrafterProbe
from adaptive_drafter.report import RolloutRecord
from adaptive_drafter.sampling import SamplingParams
from adaptive_drafter.testing import left_padded_prompts, tiny_causal_lm


def setup(every=2):
    policy = tiny_causal_lm("llama", num_layers=3, logit_scale=6.0)
    drafter = build_drafter(policy, DrafterConfig(drafter_num_layers=2, drafter_lora_r=4))
    ids, mask = left_padded_prompts(6, 2, 6, 256, seed=0)
    return policy, AdaptiveDrafter(drafter), DrafterProbe(ids, mask, every=every, max_new_tokens=12)


def test_the_first_point_measures_the_same_drafter_twice_and_no_drift():
    policy, adaptive, probe = setup()
    assert probe.due(0)
    point = probe.measure(0, policy, adaptive)
    assert point.adaptive_acceptance == point.frozen_acceptance > 0
    assert point.policy_kl == 0.0 and not probe.due(1) and probe.due(2)


def test_a_changed_adapter_and_a_moved_policy_show_up_against_the_frozen_start():
    policy, adaptive, probe = setup()
    start = probe.measure(0, policy, adaptive)
    load_adapter_state(adaptive.drafter, trained_lora(adaptive.drafter, 3, scale=0.5))  # the served adapter moves
    with torch.no_grad():
        head = policy.get_output_embeddings().weight
        head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(1)) * 0.3 * head.std())
    later = probe.measure(2, policy, adaptive)
    assert later.frozen_acceptance != later.adaptive_acceptance  # two different drafters on the same prompts and seeds
    assert later.frozen_acceptance != start.frozen_acceptance  # the same drafter against a moved policy
    assert later.policy_kl > 1e-3 and math.isfinite(later.policy_kl)
    assert set(probe.metrics()) >= {"drafter/probe_acceptance_adaptive", "policy/kl_to_start"}


def test_the_run_plot_is_written(tmp_path):
    policy, adaptive, probe = setup()
    probe.measure(0, policy, adaptive)
    probe.measure(2, policy, adaptive)
    history = [RolloutRecord(0, 2.0, None), RolloutRecord(1, 1.8, 1.1)]
    rewards = [{"step": 1, "reward": 0.2}, {"step": 2, "reward": 0.4}]
    path = plot_run(probe.points, history, tmp_path / "run.png", "test", rewards=rewards)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_the_suffix_drafter_is_measured_on_grouped_prompts_only_when_asked():
    policy, adaptive, probe = setup()
    assert math.isnan(probe.measure(0, policy, adaptive).suffix_tokens_per_step)
    peaked = tiny_causal_lm("llama", num_layers=3, logit_scale=60.0)
    ids, mask = left_padded_prompts(3, 2, 6, 256, seed=0)
    grouped = DrafterProbe(ids, mask, every=1, max_new_tokens=16, suffix_group=4, suffix_max_draft=8)
    point = grouped.measure(0, peaked, adaptive)
    # siblings of a peaked policy share continuations: some steps verify a suffix draft, each emitting >= 1 token
    assert 0 < point.suffix_share <= 1 and point.suffix_tokens_per_step >= 1.0
    assert 0 <= point.suffix_acceptance <= 1
    assert "drafter/probe_tokens_per_step_suffix" in grouped.metrics()


def test_the_probe_samples_with_the_runs_settings():
    """A cooler run is probed cooler: the policy's entropy at the probed positions falls with the temperature, and a
    top-k of 1 leaves the drafter nothing to disagree on but the argmax."""
    policy, adaptive, _ = setup()
    ids, mask = left_padded_prompts(6, 2, 6, 256, seed=0)
    points = {
        name: DrafterProbe(ids, mask, max_new_tokens=12, sampling=sampling).measure(0, policy, adaptive)
        for name, sampling in (
            ("hot", SamplingParams(temperature=1.0)),
            ("cool", SamplingParams(temperature=0.25)),
            ("top1", SamplingParams(top_k=1)),
        )
    }
    assert points["cool"].policy_entropy < 0.7 * points["hot"].policy_entropy
    greedy = DrafterProbe(ids, mask, max_new_tokens=12, sampling=SamplingParams(do_sample=False))
    assert points["top1"].adaptive_acceptance == greedy.measure(0, policy, adaptive).adaptive_acceptance
