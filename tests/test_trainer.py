"""The background trainer: it learns, publishes, is swapped in only between rollouts, and survives injected faults."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from adaptive_drafter import SpecConfig, SpeculativeEngine
from adaptive_drafter.adaptive import AdaptiveDrafter
from adaptive_drafter.config import DistillConfig, DrafterConfig
from adaptive_drafter.drafter import adapter_state, build_drafter, load_adapter_state
from adaptive_drafter.testing import left_padded_prompts, tiny_causal_lm
from adaptive_drafter.trainer import DrafterTrainer


def setup(spec: dict | None = None, **distill):
    policy = tiny_causal_lm("llama", num_layers=3, logit_scale=6.0)
    drafter = build_drafter(policy, DrafterConfig(drafter_num_layers=2, drafter_lora_r=8, drafter_lora_alpha=16))
    config = DistillConfig(
        **{"distill_min_buffer_tokens": 64, "distill_publish_every": 4, "distill_learning_rate": 1e-2, **distill}
    )
    trainer = DrafterTrainer(drafter, config)
    spec = SpecConfig(elastic=False, num_draft_tokens=3, **(spec or {}))
    adaptive = AdaptiveDrafter(drafter, spec, trainer=trainer)
    return policy, drafter, trainer, adaptive, SpeculativeEngine(policy, drafter, spec)


def rollout(adaptive, engine, seed=0, batch=16, do_sample=True):
    ids, mask = left_padded_prompts(batch, 2, 8, 256, seed=seed)
    return adaptive.generate(
        engine, ids, mask, max_new_tokens=24, do_sample=do_sample, generator=torch.Generator().manual_seed(seed)
    )


def test_distillation_wins_back_acceptance_after_the_policy_moves():
    policy, drafter, trainer, adaptive, engine = setup()
    # An RL-like update the drafter has not seen: the policy's output layer moves.
    with torch.no_grad():
        head = policy.get_output_embeddings().weight
        head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(0)) * 0.5 * head.std())
    adaptive.policy_version = 1
    stale = rollout(adaptive, engine, seed=100, do_sample=False).stats.acceptance_rate
    for seed in range(6):
        rollout(adaptive, engine, seed=seed, do_sample=False)
        for _ in range(12):
            trainer.step()
    assert trainer.adapter_version == 6 * 12 // 4
    fresh = rollout(adaptive, engine, seed=100, do_sample=False)
    assert adaptive.adapter_version.adapter_version == trainer.adapter_version
    assert fresh.stats.acceptance_rate > stale + 0.15, (stale, fresh.stats.acceptance_rate)
    metrics = {**adaptive.metrics(fresh.stats), **trainer.metrics()}
    assert metrics["drafter/trainer_errors"] == 0 and metrics["drafter/version_lag"] == 0
    assert math.isfinite(metrics["drafter/tv_to_policy"]) and metrics["spec/acceptance_rate"] > 0


def test_head_only_at_targets_gives_the_full_forwards_loss():
    _, _, trainer, adaptive, engine = setup()
    rollout(adaptive, engine)
    batch = trainer.buffer.sample(4, generator=torch.Generator().manual_seed(0))
    assert trainer._head_at_targets
    fast, fast_logits = trainer._loss(trainer.model, batch)
    trainer._head_at_targets = False
    full, full_logits = trainer._loss(trainer.model, batch)
    assert fast_logits.shape == (batch.num_targets, 256) and full_logits.dim() == 3
    assert fast.item() == pytest.approx(full.item(), rel=1e-5)
    assert trainer._drift(fast_logits, batch) == pytest.approx(trainer._drift(full_logits, batch), rel=1e-5)


@pytest.mark.parametrize("merge_lora", [True, False])
def test_swap_happens_only_between_rollouts(merge_lora):
    _, drafter, trainer, adaptive, engine = setup(spec={"merge_lora": merge_lora})
    rollout(adaptive, engine)
    trainer.step()
    served = adaptive.draft_model()  # what drafts: the peft drafter, or its merged copy
    assert (served is drafter) != merge_lora
    seen: list[float] = []

    def hook(module, args, kwargs):
        # Mid-rollout: the trainer publishes; the serving drafter must not change until the rollout ends.
        if len(seen) == 2:
            trainer.publish(policy_version=0)
        weights = [*adapter_state(drafter).values(), *served.parameters()]
        seen.append(sum(float(v.abs().sum()) for v in weights))

    handle = served.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        rollout(adaptive, engine, seed=1)
    finally:
        handle.remove()
    assert len(seen) > 2 and len(set(seen)) == 1, "the adapter changed during a rollout"
    assert adaptive.adapter_version is None
    rollout(adaptive, engine, seed=2)
    assert adaptive.adapter_version.adapter_version == trainer.adapter_version == 1
    assert adaptive.draft_model() is not served if merge_lora else adaptive.draft_model() is drafter


def test_swapped_drafter_equals_a_fresh_one_loaded_with_the_adapter():
    policy, drafter, trainer, adaptive, engine = setup()
    rollout(adaptive, engine)
    for _ in range(4):
        trainer.step()
    rollout(adaptive, engine, seed=1)
    fresh = build_drafter(policy, DrafterConfig(drafter_num_layers=2, drafter_lora_r=8, drafter_lora_alpha=16))
    load_adapter_state(fresh, trainer.latest().state)
    ids = torch.randint(3, 256, (2, 9))
    assert torch.equal(fresh(input_ids=ids).logits, drafter(input_ids=ids).logits)


def wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_background_thread_trains_publishes_and_stops_cleanly():
    _, _, trainer, adaptive, engine = setup()
    rollout(adaptive, engine)
    with trainer:
        wait_for(lambda: trainer.adapter_version >= 2)
        assert trainer.alive
    assert not trainer.alive
    assert not [t for t in threading.enumerate() if t.name == "drafter-trainer"]
    assert trainer.errors == 0


@pytest.mark.parametrize("fault", ["exception", "nan"])
def test_faults_are_counted_rolled_back_and_restarted(monkeypatch, fault):
    _, drafter, trainer, adaptive, engine = setup(distill_restart_backoff_s=0.01, distill_max_restarts=100)
    rollout(adaptive, engine)
    for _ in range(4):
        trainer.step()
    good = trainer.latest()
    rollout(adaptive, engine, seed=1)  # serving adapter 1
    original = trainer._loss
    calls = {"n": 0}

    def faulty(model, batch):
        calls["n"] += 1
        if calls["n"] <= 3:
            if fault == "exception":
                raise RuntimeError("injected fault")
            loss, logits = original(model, batch)
            return loss * float("nan"), logits
        return original(model, batch)

    monkeypatch.setattr(trainer, "_loss", faulty)
    trainer.start()
    try:
        wait_for(lambda: trainer.errors >= 3 and trainer.adapter_version >= 2)
    finally:
        trainer.stop()
    assert trainer.errors == 3 and trainer.restarts == 3
    assert ("injected fault" if fault == "exception" else "non-finite") in trainer.last_error
    assert trainer.metrics()["drafter/trainer_errors"] == 3
    assert all(torch.isfinite(v).all() for v in adapter_state(trainer.model).values())
    # Rollouts went on serving the last good adapter, then picked up the recovered trainer's next one.
    assert adaptive.adapter_version == good.version
    rollout(adaptive, engine, seed=2)
    assert adaptive.adapter_version.adapter_version >= 2


def test_on_error_stop_keeps_serving_the_last_good_adapter(monkeypatch):
    _, _, trainer, adaptive, engine = setup(distill_on_error="stop")
    rollout(adaptive, engine)
    for _ in range(4):
        trainer.step()
    rollout(adaptive, engine, seed=1)
    monkeypatch.setattr(trainer, "_loss", lambda model, batch: (_ for _ in ()).throw(MemoryError("injected OOM")))
    trainer.start()
    wait_for(lambda: not trainer.alive)
    assert trainer.errors == 1 and "MemoryError: injected OOM" in trainer.last_error
    out = rollout(adaptive, engine, seed=2)
    assert adaptive.adapter_version.adapter_version == 1 and out.stats.verify_steps > 0


def test_a_hung_step_times_out_and_the_trainer_moves_on(monkeypatch, caplog):
    _, _, trainer, adaptive, engine = setup(distill_step_timeout_s=0.5, distill_restart_backoff_s=0.01)
    rollout(adaptive, engine)
    for _ in range(4):
        trainer.step()
    rollout(adaptive, engine, seed=1)  # serving adapter 1
    hung_model, release, original = trainer.model, threading.Event(), trainer._loss

    def hangs_once(model, batch):
        if model is hung_model:  # the first step after start() blocks until released
            release.wait()
        return original(model, batch)

    monkeypatch.setattr(trainer, "_loss", hangs_once)
    trainer.start()
    try:
        wait_for(lambda: trainer.errors == 1 and trainer.adapter_version >= 3)
        assert trainer.alive and trainer.model is not hung_model
        assert "distill_step_timeout_s=0.5" in trainer.last_error and trainer.restarts == 1
        out = rollout(adaptive, engine, seed=2)  # rollouts never waited for the hung step
        assert out.stats.verify_steps > 0 and adaptive.adapter_version.adapter_version >= 2
        # The abandoned step finishes late: what it computed is dropped, nothing is published from it.
        trainer.pause()
        time.sleep(0.3)  # the step in flight, if any, ends
        published, steps = trainer.adapter_version, trainer.steps
        release.set()
        time.sleep(0.5)
        assert (trainer.adapter_version, trainer.steps) == (published, steps)
    finally:
        release.set()
        trainer.stop()
    assert "ran longer than distill_step_timeout_s" in caplog.text
    with pytest.raises(ValueError, match="distill_step_timeout_s"):
        DistillConfig(distill_step_timeout_s=0)


def test_trainer_needs_lora_weights():
    policy = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="no trainable parameters"):
        DrafterTrainer(tiny_causal_lm("llama").requires_grad_(False))
    with pytest.raises(ValueError, match="Unknown distillation loss"):
        DistillConfig(distill_loss="kl")
    with pytest.raises(ValueError, match="mix_weights"):
        DistillConfig(distill_loss="mix")
    with pytest.raises(ValueError, match="must look like"):
        DistillConfig(distill_loss="mix", distill_mix_weights="fkl=1")
    assert DistillConfig(distill_loss="mix", distill_mix_weights="fkl:0.5, tv:0.5").mix() == {"fkl": 0.5, "tv": 0.5}
    del policy


def test_stale_drafter_alarm_on_low_acceptance_and_on_version_lag(caplog):
    policy = tiny_causal_lm("llama", num_layers=3, logit_scale=6.0)
    random_drafter = build_drafter(policy, DrafterConfig(drafter_kind="model"), model=tiny_causal_lm("llama", seed=9))
    spec = SpecConfig(elastic=False, num_draft_tokens=3, stale_acceptance=0.2)
    adaptive, engine = AdaptiveDrafter(random_drafter, spec), SpeculativeEngine(policy, random_drafter, spec)
    with caplog.at_level("WARNING", logger="adaptive_drafter.adaptive"):
        out = rollout(adaptive, engine, do_sample=False)
    assert adaptive.metrics(out.stats)["drafter/stale_alarm"] == 1.0
    assert "stale drafter: acceptance" in caplog.text

    _, _, trainer, adaptive, engine = setup()
    rollout(adaptive, engine)
    for _ in range(4):
        trainer.step()
    out = rollout(adaptive, engine, seed=1)  # serves adapter 1, fitted to policy version 0
    assert adaptive.metrics(out.stats)["drafter/stale_alarm"] == 0.0
    adaptive.policy_version = 51  # the policy moved on; the trainer published nothing since
    with caplog.at_level("WARNING", logger="adaptive_drafter.adaptive"):
        out = rollout(adaptive, engine, seed=2)
    assert adaptive.metrics(out.stats)["drafter/stale_alarm"] == 1.0
    assert "lags the policy by 51 versions" in caplog.text
