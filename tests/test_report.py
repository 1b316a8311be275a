"""The run's report: a summary whose every figure was measured (or says it was not) and a JSON record beside it."""

from __future__ import annotations

import json
import math

from adaptive_drafter.metrics import SpecStats
from adaptive_drafter.probe import ProbePoint
from adaptive_drafter.report import DrafterState, RolloutRecord, RunReport


def report(**overrides) -> RunReport:
    fields = dict(
        events=["drafter: a fresh, untrained LoRA drafter"],
        totals=SpecStats(drafted=40, accepted=10, verify_steps=10, verified_tokens=20, emitted_tokens=30,
                         decode_seconds=2.0),
        rollouts=[RolloutRecord(0, 2.0, None), RolloutRecord(1, 1.5, 1.2)],
        probe=[ProbePoint(0, 0.3, 0.3, 1.9, 1.9, 0.0, 1.2, 0), ProbePoint(2, 0.35, 0.28, 2.0, 1.8, 0.01, 1.1, 2)],
        rollout_precision="bfloat16",
        adapter_version=2,
        drafter=DrafterState(0.4, math.nan, 12, 0, 1, 3.5),
        rewards=[{"step": 1, "reward": 0.5, "reward_std": 0.1}],
        processes=1,
        output_dir="out",
        machine={"platform": "test"},
    )  # fmt: skip
    return RunReport(**{**fields, **overrides})


def test_the_summary_states_what_was_measured_and_what_was_not():
    text = report().summary()
    assert "acceptance           0.250 over 40 drafted tokens" in text
    assert "measured speed-up    not measured in this run" in text  # no plain step was timed beside
    assert "0.300 -> 0.350 with the served adapter (v2), 0.300 -> 0.280 with the starting one frozen" in text
    assert "12 distillation steps (4 s of compute), 1 adapters held back by the swap gate, 0 trainer errors" in text
    quiet = report(totals=SpecStats(), probe=[], drafter=None).summary()
    assert "no step speculated" in quiet and "held-out probe" not in quiet and "drafter   " not in quiet


def test_the_record_is_json_with_unmeasured_values_as_null(tmp_path):
    extended = report()
    extended.notes.append("cost of freshness    ...")
    extended.extra["freshness"] = {"step_time_ratio": None}
    record = json.loads(extended.write(tmp_path / "run.json").read_text())
    assert record["drafter"]["kl_to_policy"] is None and record["probe"][1]["adapter_version"] == 2
    assert record["probe"][0]["suffix_acceptance"] is None  # NaN: not measured
    assert record["rollouts"][1] == {"step": 1, "tokens_per_verify": 1.5, "measured_speedup": 1.2}
    assert record["totals"]["spec/acceptance_rate"] == 0.25 and record["extra"]["freshness"]["step_time_ratio"] is None
