"""scripts/drift_study.py runs end to end on a tiny preset and writes its CSV, plot and summary (the science is the
real run's job: docs/drift_study.md)."""

from __future__ import annotations

import csv
import json
import math
import threading
from pathlib import Path

import torch
from conftest import load_file_module

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "drift_study.py"


def load_drift_study():
    return load_file_module(SCRIPT)


TINY = [
    "--quick",
    "--updates",
    "6",
    "--eval-every",
    "3",
    "--warmup-steps",
    "6",
    "--warmup-rollouts",
    "2",
    "--eval-prompts",
    "8",
    "--prompts",
    "4",
    "--group-size",
    "2",
    "--max-new-tokens",
    "8",
    "--no-progress",
]


def test_quick_preset_writes_csv_png_and_summary(tmp_path, capsys):
    study = load_drift_study()
    summary = study.main([*TINY, "--overhead-run", "--out", str(tmp_path)])

    with (tmp_path / "drift_study.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == study.CSV_COLUMNS
    assert [int(r["step"]) for r in rows] == [0, 3, 6]
    for r in rows:
        for name in ("frozen_acceptance", "adaptive_acceptance", "kl_to_step0"):
            assert 0.0 <= float(r[name]) <= (1.0 if "acceptance" in name else math.inf)
        assert int(r["trainer_errors"]) == 0
    assert float(rows[0]["kl_to_step0"]) < 1e-4  # the step-0 policy against itself
    assert rows[0]["frozen_acceptance"] == rows[0]["adaptive_acceptance"]  # same warm adapter, same seeds

    png = tmp_path / "drift_study.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    saved = json.loads((tmp_path / "summary.json").read_text())
    for key in (
        "adaptive_acceptance_peak",
        "adaptive_acceptance_end",
        "adaptive_min_last_half_rel_peak",
        "frozen_acceptance_start",
        "frozen_acceptance_end",
        "frozen_relative_fall",
        "final_kl",
        "wall_time_s",
        "distill_overhead",
        "settings",
        "targets",
    ):
        assert key in saved, key
    assert saved["distill_overhead"]["rollout_update_s_no_distill"] > 0  # the no-distill baseline ran
    assert saved["adaptive_acceptance_end"] == summary["adaptive_acceptance_end"]
    assert "frozen acceptance" in capsys.readouterr().out
    assert not [t for t in threading.enumerate() if t.name == "drafter-trainer"]  # the trainer was stopped


def test_no_distill_runs_without_a_trainer(tmp_path):
    study = load_drift_study()
    summary = study.main([*TINY, "--no-distill", "--updates", "2", "--eval-every", "2", "--out", str(tmp_path)])
    assert "distill_overhead" not in summary and summary["trainer"] is None
    rows = list(csv.DictReader((tmp_path / "drift_study.csv").open()))
    # Without distillation the served drafter never changes: both drafters see the same prompts and seeds, so the
    # two engines' rollouts are identical.
    assert all(r["frozen_acceptance"] == r["adaptive_acceptance"] for r in rows)


def test_group_advantages_and_rebase():
    study = load_drift_study()
    adv = study.group_advantages([1.0, 0.0, 0.5, 0.5], group_size=2)
    assert adv[0] > 0 > adv[1] and adv[2] == adv[3] == 0
    from adaptive_drafter.config import DrafterConfig
    from adaptive_drafter.drafter import build_drafter
    from adaptive_drafter.testing import tiny_causal_lm

    policy = tiny_causal_lm(num_layers=3)
    drafter = build_drafter(policy, DrafterConfig(drafter_num_layers=2, drafter_lora_r=4, drafter_lora_alpha=8))
    with torch.no_grad():
        policy.model.layers[0].self_attn.q_proj.weight.add_(1.0)
    study.rebase_drafter(drafter, policy)
    base = drafter.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(base, policy.model.layers[0].self_attn.q_proj.weight)
