"""The adaptive drafter: the serving copy (merged LoRA, reduced draft vocabulary), the weights it hands an engine that
keeps its own copy, checkpoints, resume and warm start. Swaps, the background trainer and the stale alarm are in
test_trainer.py."""

from __future__ import annotations

import pytest
import torch
from test_drafter import trained_lora
from test_engine import SAMPLES, STEPS, VOCAB, exact_joint, noise_bound, reference_greedy, small_vocab_models  # noqa: F401

from adaptive_drafter import SpecConfig, SpeculativeEngine
from adaptive_drafter.adaptive import AdaptiveDrafter
from adaptive_drafter.config import DistillConfig, DrafterConfig, ServingConfig
from adaptive_drafter.drafter import (
    AdapterVersion,
    adapter_state,
    build_drafter,
    load_adapter_state,
    merged_copy,
    noised_copy,
    save_adapter,
)
from adaptive_drafter.sampling import SamplingParams
from adaptive_drafter.testing import left_padded_prompts, tiny_causal_lm


def test_reduced_draft_vocabulary_is_lossless_and_follows_frequent_tokens():
    policy = tiny_causal_lm("llama", logit_scale=8.0)
    ids, mask = left_padded_prompts(16, 2, 10, 256, seed=8)
    expected = reference_greedy(policy, ids, mask, 24, eos=[])
    emitted = torch.bincount(torch.tensor(sum(expected, [])), minlength=256)
    drafter, config = noised_copy(policy, 0.05), SpecConfig(elastic=False, num_draft_tokens=4)
    adaptive = AdaptiveDrafter(drafter, ServingConfig(draft_vocab_size=8))
    engine = SpeculativeEngine(policy, drafter, config)
    greedy = SamplingParams(do_sample=False)
    first = adaptive.generate(engine, ids, greedy, attention_mask=mask, max_new_tokens=24)  # no counts yet: all tokens
    assert first.completion_ids == expected and adaptive.draft_vocab_coverage is None
    assert torch.equal(adaptive.token_counts, emitted)
    second = adaptive.generate(engine, ids, greedy, attention_mask=mask, max_new_tokens=24)  # the 8 most frequent
    assert second.completion_ids == expected
    covered = emitted.topk(8).values.sum() / emitted.sum()
    assert adaptive.draft_vocab_coverage == pytest.approx(float(covered)) and covered < 1
    assert adaptive.metrics(second.stats)["spec/draft_vocab_coverage"] == adaptive.draft_vocab_coverage
    # Tokens outside the subset are never proposed, so fewer drafts are accepted, but the output is the same.
    assert 0 < second.stats.acceptance_rate < first.stats.acceptance_rate
    sampled = adaptive.generate(engine, ids, attention_mask=mask, max_new_tokens=24, seed=0)
    assert adaptive.draft_vocab_coverage < 1 and sampled.stats.accepted > 0  # tokens outside it were still emitted


def test_pinned_draft_vocabulary_keeps_the_sampling_distribution(small_vocab_models):
    policy, drafter = small_vocab_models
    prompt, params = [3, 1, 4, 5], SamplingParams(do_sample=True, temperature=1.0)
    target = exact_joint(policy, prompt, params)
    config = SpecConfig(elastic=False, num_draft_tokens=3)
    adaptive, engine = AdaptiveDrafter(drafter), SpeculativeEngine(policy, drafter, config)
    adaptive.set_draft_vocab([0, 2, 3])
    ids = torch.tensor([prompt]).expand(SAMPLES, -1)
    out = adaptive.generate(engine, ids, max_new_tokens=STEPS, seed=5)
    firsts = torch.tensor([row[:STEPS] for row in out.completion_ids])
    empirical = torch.bincount((firsts * torch.tensor([VOCAB**2, VOCAB, 1])).sum(-1), minlength=VOCAB**STEPS)
    tv = 0.5 * float((empirical.double() / SAMPLES - target).abs().sum())
    assert tv < noise_bound(target, SAMPLES)
    assert 0 < adaptive.draft_vocab_coverage < 1 and 0 < out.stats.acceptance_rate
    with pytest.raises(ValueError, match="non-empty set of token ids"):
        adaptive.set_draft_vocab([0, VOCAB])


def test_serving_merges_from_the_pristine_base_so_swaps_accumulate_no_rounding():
    """In bf16, merge/unmerge in place on every swap drifts the base weights; the engine merges a copy from the
    unmerged drafter instead, so after many swaps the served weights are exactly a fresh merge's."""
    policy = tiny_causal_lm("llama", num_layers=2).to(torch.bfloat16)
    drafter = build_drafter(policy, DrafterConfig(drafter_num_layers=1, drafter_lora_r=4))
    adaptive = AdaptiveDrafter(drafter)
    states = [trained_lora(drafter, seed) for seed in range(2)]
    served = []
    for swap in range(40):
        load_adapter_state(drafter, states[swap % 2])  # a user's load: the fingerprint sees it
        served.append(adaptive.draft_model())
    assert len({id(m) for m in served}) == 40  # rebuilt on every change
    assert adaptive.draft_model() is served[-1]  # nothing written since: no rebuild
    fresh = merged_copy(drafter)
    assert all(torch.equal(a, b) for a, b in zip(served[-1].state_dict().values(), fresh.state_dict().values()))


def lora_drafter(seed: int = 0):
    policy = tiny_causal_lm("llama", num_layers=3)
    drafter = build_drafter(policy, DrafterConfig(drafter_num_layers=2, drafter_lora_r=4))
    load_adapter_state(drafter, trained_lora(drafter, seed))
    return policy, drafter


def test_serving_weights_hand_out_only_the_adapted_layers_and_only_after_a_change():
    _, drafter = lora_drafter()
    adaptive = AdaptiveDrafter(drafter)
    full = adaptive.serving_weights(changed_only=False)
    merged = merged_copy(drafter).state_dict()
    assert full.keys() == merged.keys() and all(torch.equal(full[k], merged[k]) for k in merged)
    assert adaptive.serving_weights() == {}  # nothing written since
    load_adapter_state(drafter, trained_lora(drafter, 1))
    changed = adaptive.serving_weights()
    assert changed and all(".self_attn." in k or ".mlp." in k for k in changed)  # the LoRA targets, nothing else
    assert not any("embed" in k or "norm" in k or "lm_head" in k for k in changed)
    fresh = merged_copy(drafter).state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in changed.items())
    assert adaptive.serving_weights() == {}


def test_export_writes_a_plain_checkpoint_that_computes_the_served_drafter(tmp_path):
    from transformers import AutoModelForCausalLM

    _, drafter = lora_drafter()
    adaptive = AdaptiveDrafter(drafter)
    loaded = AutoModelForCausalLM.from_pretrained(adaptive.export(tmp_path / "draft"))
    ids = torch.randint(3, 256, (2, 7))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, drafter(input_ids=ids).logits, atol=1e-5)


def test_restore_serves_the_saved_version_and_the_trainer_continues_from_it(tmp_path):
    policy, drafter = lora_drafter()
    save_adapter(drafter, tmp_path / "a", AdapterVersion(adapter_version=5, policy_version=40))
    fresh = build_drafter(policy, DrafterConfig(drafter_num_layers=2, drafter_lora_r=4))
    adaptive = AdaptiveDrafter(fresh, ServingConfig(), DistillConfig())
    version = adaptive.restore(tmp_path / "a")
    assert version == adaptive.adapter_version == AdapterVersion(5, 40)
    trainer_state, served = adapter_state(adaptive.trainer.model), adapter_state(drafter)
    assert all(torch.equal(trainer_state[k], served[k]) for k in served)
    assert adaptive.trainer.publish(policy_version=41).version == AdapterVersion(6, 41)  # numbering goes on

    warm = AdaptiveDrafter(
        build_drafter(policy, DrafterConfig(drafter_num_layers=2, drafter_lora_r=4)),
        ServingConfig(),
        DistillConfig(),
    )
    assert warm.warm_start(tmp_path / "a") == AdapterVersion(5, 40)
    assert warm.adapter_version is None and warm.trainer.publish(policy_version=0).version.adapter_version == 1
    trainer_state = adapter_state(warm.trainer.model)
    assert all(torch.equal(trainer_state[k], served[k]) for k in served)


def test_a_frozen_adaptive_drafter_collects_nothing_and_a_distilling_one_fills_the_buffer():
    policy, drafter = lora_drafter()
    config = SpecConfig(elastic=False, num_draft_tokens=3)
    engine = SpeculativeEngine(policy, drafter, config)
    ids, mask = left_padded_prompts(4, 2, 6, 256, seed=0)
    frozen = AdaptiveDrafter(drafter)
    assert frozen.topk == 0 and frozen.generate(engine, ids, attention_mask=mask, max_new_tokens=8).targets is None
    distilling = AdaptiveDrafter(drafter, ServingConfig(), DistillConfig(distill_topk=5))
    distilling.policy_version = 3
    out = distilling.generate(engine, ids, attention_mask=mask, max_new_tokens=8)
    assert distilling.trainer.buffer.num_tokens == sum(map(len, out.completion_ids))
    assert {t.policy_version for t in out.targets} == {3} and out.targets[0].topk_ids.shape[1] == 5


class WeightsEngine:
    """An engine that keeps its own copy of the drafter (as vLLM does): it takes merged weights, and decodes with the
    Hugging Face engine here so that the rollout is real."""

    drafter_format = "weights"

    def __init__(self, engine: SpeculativeEngine) -> None:
        self.engine, self.loads = engine, []

    @property
    def collect_topk(self) -> int:
        return 0

    def load_drafter(self, named_tensors, *, new_version=True):
        self.loads.append(dict(named_tensors))

    def generate(self, prompt_ids, sampling=None, **kwargs):
        return self.engine.generate(prompt_ids, sampling, **kwargs)


def test_an_engine_holding_its_own_drafter_gets_the_merged_weights_only_when_the_adapter_changed():
    policy, drafter = lora_drafter()
    adaptive = AdaptiveDrafter(drafter)
    engine = WeightsEngine(SpeculativeEngine(policy, drafter, SpecConfig(elastic=False)))
    prompts = [[3, 4, 5, 6], [7, 8]]
    adaptive.generate(engine, prompts, max_new_tokens=4)
    assert len(engine.loads) == 1  # the first rollout: the weights it has never seen
    adaptive.generate(engine, prompts, max_new_tokens=4)
    assert len(engine.loads) == 1  # nothing changed
    load_adapter_state(drafter, trained_lora(drafter, 5))
    adaptive.generate(engine, prompts, max_new_tokens=4)
    assert len(engine.loads) == 2
    merged = merged_copy(drafter).state_dict()
    assert engine.loads[-1].keys() == merged.keys()  # whole modules: vLLM fuses q/k/v
    assert all(torch.equal(engine.loads[-1][name], merged[name]) for name in merged)


def test_the_engines_spec_config_is_refused_where_the_serving_config_belongs():
    _, drafter = lora_drafter()
    with pytest.raises(TypeError, match="takes a ServingConfig.*SpecConfig goes to the engine"):
        AdaptiveDrafter(drafter, SpecConfig())
