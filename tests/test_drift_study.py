"""scripts/drift_study.py runs end to end on a tiny preset and writes its CSV, plot and summary (the science is the
real run's job: docs/drift_study.md); its presets come from configs/drift/*.yaml. Its library is tested in
test_studies.py."""

from __future__ import annotations

import csv
import json
import math
import threading
from pathlib import Path

import pytest
import yaml
from conftest import load_file_module

from adaptive_drafter.experiments.studies import CSV_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "drift_study.py"


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
    assert reader.fieldnames == CSV_COLUMNS
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
    assert saved["meta"]["args"]["updates"] == 6 and saved["meta"]["machine"]["cpu_count"] >= 1
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


def test_quick_means_the_quick_preset_and_flags_override_a_preset(tmp_path):
    study = load_drift_study()
    quick = yaml.safe_load((ROOT / "configs" / "drift" / "quick.yaml").read_text())
    args = study.parse_args(["--quick"])
    assert args.quick and {k: getattr(args, k) for k in quick} == quick
    assert vars(study.parse_args(["--preset", str(ROOT / "configs" / "drift" / "quick.yaml")])) == {
        **vars(args),
        "preset": ROOT / "configs" / "drift" / "quick.yaml",
    }
    assert study.parse_args(["--quick", "--updates", "5", "--no-overhead-run"]).updates == 5
    full = study.parse_args([])
    assert not full.quick and full.task == "arithmetic" and full.drafter_layers == 4
    partial = tmp_path / "partial.yaml"
    partial.write_text("updates: 3\n")
    with pytest.raises(SystemExit):
        study.parse_args(["--preset", str(partial)])  # a preset must set every setting
