"""The background trainer: it learns, publishes, is swapped in only between rollouts, and survives injected faults."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from adaptive_drafter.sampling import SamplingParams
from adaptive_drafter import SpecConfig, SpeculativeEngine
from adaptive_drafter.adaptive import AdaptiveDrafter
from adaptive_drafter.config import DistillConfig, DrafterConfig, ServingConfig
from adaptive_drafter.drafter import adapter_state, build_drafter, load_adapter_state
from adaptive_drafter.testing import left_padded_prompts, tiny_causal_lm
from adaptive_drafter.trainer import DrafterTrainer


def setup(spec: dict | None = None, **distill):
    policy = tiny_causal_lm("llama", num_layers=3, logit_scale=6.0)
    drafter = build_drafter(policy, DrafterConfig(drafter_num_layers=2, drafter_lora_r=8, drafter_lora_alpha=16))
    # The swap gate publishes only adapters that measure no worse: off here, where publishing itself is tested.
    defaults = {"distill_min_buffer_tokens": 64, "distill_publish_every": 4, "distill_learning_rate": 1e-2}
    config = DistillConfig(**{**defaults, "distill_swap_gate": False, **distill})
    trainer = DrafterTrainer(drafter, config)
    spec, serving = SpecConfig(elastic=False, num_draft_tokens=3), ServingConfig(**(spec or {}))
    adaptive = AdaptiveDrafter(drafter, serving, trainer=trainer)
    return policy, drafter, trainer, adaptive, SpeculativeEngine(policy, drafter, spec)


def rollout(adaptive, engine, seed=0, batch=16, do_sample=True):
    ids, mask = left_padded_prompts(batch, 2, 8, 256, seed=seed)
    return adaptive.generate(
        engine, ids, SamplingParams(do_sample=do_sample), attention_mask=mask, max_new_tokens=24, seed=seed
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
    fast, fast_logits, _ = trainer._loss(trainer.model, batch)
    trainer._head_at_targets = False
    full, full_logits, _ = trainer._loss(trainer.model, batch)
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
            loss, logits, targets = original(model, batch)
            return loss * float("nan"), logits, targets
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


def steps_stay(trainer, seconds=0.5):
    """Whether `trainer` took no step during `seconds`."""
    before = trainer.steps
    time.sleep(seconds)
    return trainer.steps == before


def test_a_held_trainer_takes_no_step_while_held():
    _, _, trainer, adaptive, engine = setup()
    rollout(adaptive, engine)
    with trainer.hold():
        assert trainer.step() is None and trainer.steps == 0  # without the background thread too
        with trainer.hold():  # holds nest
            pass
        assert trainer.step() is None
    assert trainer.step() is not None and trainer.steps == 1
    with trainer:
        wait_for(lambda: trainer.steps >= 3)
        with trainer.hold():
            assert steps_stay(trainer)
        wait_for(lambda: trainer.steps >= 6)  # and it steps again once released
    assert trainer.errors == 0


def test_hold_waits_for_the_step_in_flight(monkeypatch):
    _, _, trainer, adaptive, engine = setup()
    rollout(adaptive, engine)
    entered, release, original = threading.Event(), threading.Event(), trainer._loss

    def blocks(model, batch):
        entered.set()
        release.wait()
        return original(model, batch)

    monkeypatch.setattr(trainer, "_loss", blocks)
    held, steps_when_held = threading.Event(), []

    def holder():
        with trainer.hold():
            steps_when_held.append(trainer.steps)
            held.set()
            time.sleep(0.3)

    trainer.start()
    try:
        assert entered.wait(30)
        thread = threading.Thread(target=holder)
        thread.start()
        time.sleep(0.3)
        assert not held.is_set(), "hold() returned while a step was in flight"
        release.set()
        assert held.wait(30)
        assert steps_when_held == [1]  # the step in flight finished, and none began since
        thread.join(30)
    finally:
        release.set()
        trainer.stop()
    assert trainer.errors == 0


def test_hold_keeps_a_pause_from_before_and_from_during_the_hold():
    _, _, trainer, adaptive, engine = setup()
    rollout(adaptive, engine)
    with trainer:
        wait_for(lambda: trainer.steps >= 1)
        trainer.pause()
        with trainer.hold():
            pass
        assert steps_stay(trainer), "leaving hold() resumed a trainer paused before it"
        trainer.resume()
        wait_for(lambda: trainer.steps >= 3)
        with trainer.hold():
            trainer.pause()
        assert steps_stay(trainer), "leaving hold() resumed a trainer paused during it"
        trainer.resume()
        wait_for(lambda: trainer.steps >= 5)


def test_time_held_inside_the_duty_cycle_rest_is_made_up_before_the_next_step(monkeypatch):
    # Steps of >= 0.3 s at duty cycle 0.25 rest >= 0.9 s. A hold that begins as a step ends and outlasts the rest
    # covers the whole rest: the trainer must still rest that long after the hold, not step at once.
    _, _, trainer, adaptive, engine = setup(distill_duty_cycle=0.25)
    rollout(adaptive, engine)
    entered, starts, original = threading.Event(), [], trainer._loss

    def slow(model, batch):
        starts.append(time.perf_counter())
        entered.set()
        time.sleep(0.3)
        return original(model, batch)

    monkeypatch.setattr(trainer, "_loss", slow)
    trainer.start()
    try:
        assert entered.wait(30)
        with trainer.hold():  # waits for that step, so the hold begins where the rest would
            busy = trainer.busy_seconds
            time.sleep(1.5)
            assert len(starts) == 1
        released = time.perf_counter()
        wait_for(lambda: len(starts) >= 2)
    finally:
        trainer.stop()
    rest = busy * (1 / 0.25 - 1)
    assert busy >= 0.3 and rest >= 0.9
    assert starts[1] - released >= rest - 0.3, (starts[1] - released, rest)  # the rest was made up after the hold
    # The duty cycle over the time the trainer was free to run (from its first step to its second, less the hold).
    assert busy / (starts[1] - starts[0] - 1.5) <= 0.25 + 0.1


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
    spec = SpecConfig(elastic=False, num_draft_tokens=3)
    adaptive = AdaptiveDrafter(random_drafter, ServingConfig(stale_acceptance=0.2))
    engine = SpeculativeEngine(policy, random_drafter, spec)
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


def test_effort_idles_while_the_policy_holds_and_trains_again_once_it_moves(caplog):
    # min_gain 0.5 makes the second window a plateau whatever it gained: the test is about what happens next
    policy, _, trainer, adaptive, engine = setup(
        distill_effort_patience=1, distill_effort_min_gain=0.5, distill_effort_tolerance=0.1, distill_batch_size=8
    )
    caplog.set_level("INFO", logger="adaptive_drafter.trainer")
    rollout(adaptive, engine, seed=0)
    with trainer:
        # The trainer thread flips to idle, then logs why (same locked section): wait for both.
        wait_for(lambda: not trainer.effort.training and "idles: plateau" in caplog.text)
        assert trainer.metrics()["drafter/effort"] == 0.0
        steps = trainer.steps
        for seed in (1, 2, 3):  # fresh rollouts of a policy that does not move: checked, and still idle
            rollout(adaptive, engine, seed=seed)
            wait_for(lambda: trainer._checked_rows == trainer.buffer.added)
            assert not trainer.effort.training and trainer.steps == steps
        assert trainer.metrics()["drafter/idle_reason"] == 2.0  # holding
        with torch.no_grad():  # an RL update the drafter has not seen
            head = policy.get_output_embeddings().weight
            head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(0)) * 1.0 * head.std())
        for seed in (4, 5, 6):
            rollout(adaptive, engine, seed=seed)
            wait_for(lambda: trainer._checked_rows == trainer.buffer.added or trainer.effort.training)
        wait_for(lambda: trainer.steps > steps)
    assert "resumes: falling behind" in caplog.text  # (min_gain 0.5 idles it again two windows later)


def test_effort_always_trains_and_direct_steps_ignore_effort():
    _, _, trainer, adaptive, engine = setup(distill_effort="always", distill_effort_patience=1)
    rollout(adaptive, engine)
    for _ in range(12):
        trainer.step()
    assert trainer.effort.training and trainer.steps == 12


# --- the swap gate ----------------------------------------------------------------------------------------------


def test_the_swap_gate_never_publishes_an_adapter_that_measures_worse_on_fresh_rollouts():
    """Training on corrupted targets makes the adapter worse than the served one: the gate keeps serving the old one;
    a better adapter (after the policy moved) is published."""
    policy, drafter, trainer, adaptive, engine = setup(distill_swap_gate=True, distill_publish_every=4)
    with torch.no_grad():  # an RL-like update the drafter has not seen: distillation has something to win back
        head = policy.get_output_embeddings().weight
        head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(0)) * 0.5 * head.std())
    for seed in range(2):
        rollout(adaptive, engine, seed=seed)
    for _ in range(8):
        trainer.step()
    served = trainer.latest()
    assert served is not None and trainer.swaps_rejected == 0, trainer.metrics()  # better on fresh rows: published
    before = rollout(adaptive, engine, seed=100, do_sample=False).stats.acceptance_rate  # swaps in what was published
    buffer = trainer.buffer
    rollout(adaptive, engine, seed=7)
    # Corrupt what the trainer samples (not the held-out rows the gate measures on): every target points elsewhere.
    with buffer._lock:
        for row in buffer._rows:
            if id(row) not in buffer._held_out:
                row.topk_ids = (row.topk_ids + 17) % 256
    for _ in range(16):
        trainer.step()
    assert trainer.swaps_rejected >= 2 and trainer.metrics()["drafter/gate_margin"] < 0, trainer.metrics()
    after = rollout(adaptive, engine, seed=100, do_sample=False).stats.acceptance_rate
    assert after >= before - 0.05, (before, after)  # what is served did not get worse
    trainer.publish(policy_version=0)  # the same training served ungated is far worse: the test has power
    worse = rollout(adaptive, engine, seed=100, do_sample=False).stats.acceptance_rate
    assert worse < before - 0.1, (before, worse)


def test_held_out_rows_are_never_trained_on_and_fresh_returns_them():
    from adaptive_drafter.targets import DistillBuffer

    policy, drafter, trainer, adaptive, engine = setup()
    rows = rollout(adaptive, engine, seed=3).targets
    buffer = DistillBuffer(10_000, holdout_every=4)
    buffer.add_many(rows)
    held = [row for i, row in enumerate(rows) if i % 4 == 3]
    for _ in range(20):  # 160 draws: every one of the 12 trainable rows is drawn (all but surely)
        buffer.sample(8)
    fresh = buffer.fresh(16)  # the rows never drawn: exactly the held-out ones
    assert fresh is not None and len(fresh.input_ids) == len(held)
    for b, row in enumerate(held):
        assert fresh.input_ids[b, : len(row.prompt_ids)].tolist() == row.prompt_ids
    with pytest.raises(ValueError, match="holdout_every"):
        DistillBuffer(100, holdout_every=1)
