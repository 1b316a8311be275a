"""Speculation statistics and their metrics."""

from __future__ import annotations

import pytest

from adaptive_drafter.metrics import SpecStats, speedup_estimate


def test_a_rollout_that_never_speculated_logs_no_acceptance():
    plain = SpecStats(plain_steps=40, policy_forwards=10)
    assert plain.metrics() == {"spec/sd_fraction": 0.0}  # not an acceptance of 0: nothing was drafted
    spec = SpecStats(drafted=8, accepted=6, verify_steps=2, verified_tokens=8, plain_steps=2)
    assert spec.metrics() == {
        "spec/sd_fraction": 0.5,
        "spec/acceptance_rate": 0.75,
        "spec/mean_accepted_len": 3.0,
        "spec/tokens_per_verify": 4.0,
    }
    assert (plain + spec).metrics()["spec/acceptance_rate"] == 0.75


def test_speedup_estimate_is_the_formula_and_refuses_nonsense():
    assert speedup_estimate(0.5, 2, 0.1, 1.0) == pytest.approx((1 + 0.5 + 0.25) / 1.2)
    assert speedup_estimate(1.0, 4, 0.0, 1.0) == 5.0
    with pytest.raises(ValueError, match="alpha"):
        speedup_estimate(1.5, 2, 0.1)
