"""The distillation effort policy: train while the drafter improves or falls behind, idle while it holds."""

import math

import pytest

from adaptive_drafter.effort import HOLDING, PLATEAU, TRAINING, DistillEffort


def windows(effort, values, steps=2):
    for value in values:
        for i in range(steps):
            decision = effort.observe_step(value, window_done=i == steps - 1)
    return decision


def test_training_continues_while_each_adapter_gains():
    effort = DistillEffort(patience=2, min_gain=0.01)
    assert windows(effort, [0.1, 0.2, 0.3, 0.4, 0.5]).train


def test_a_plateau_idles_the_trainer_and_says_why():
    effort = DistillEffort(patience=2, min_gain=0.01)
    decision = windows(effort, [0.2, 0.4, 0.401, 0.399])
    assert not decision.train and decision.code == PLATEAU and "plateau" in decision.reason


def test_an_idle_drafter_that_holds_stays_idle_and_one_falling_behind_trains_again():
    effort = DistillEffort(patience=2, min_gain=0.01, tolerance=0.03)
    windows(effort, [0.2, 0.4, 0.40, 0.40])
    assert effort.observe_idle(0.39).code == HOLDING  # within tolerance: a still policy
    assert not effort.observe_idle(0.30).train  # one low batch is noise
    assert not effort.observe_idle(0.41).train  # ...and the streak resets
    effort.observe_idle(0.30)
    decision = effort.observe_idle(0.29)
    assert decision.train and decision.code == TRAINING and "falling behind" in decision.reason
    assert windows(effort, [0.3, 0.35]).train  # a fresh start: no plateau before patience windows


def test_always_mode_never_idles_and_nan_measurements_change_nothing():
    effort = DistillEffort(mode="always", patience=1)
    assert windows(effort, [0.4, 0.4, 0.4, 0.4]).train
    auto = DistillEffort(patience=1)
    assert windows(auto, [math.nan] * 5).train


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="auto"):
        DistillEffort(mode="sometimes")
    with pytest.raises(ValueError, match="patience"):
        DistillEffort(patience=0)


def test_fresh_rollouts_are_compared_with_fresh_rollouts_not_with_the_batches_trained_on():
    effort = DistillEffort(patience=2, min_gain=0.01, tolerance=0.03)
    windows(effort, [0.5, 0.6, 0.6, 0.6])  # optimistic: the trainer has seen these batches
    assert effort.observe_idle(0.35).code == HOLDING  # the first fresh check sets the bar
    assert effort.observe_idle(0.34).code == HOLDING and not effort.observe_idle(0.36).train
