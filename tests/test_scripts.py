"""The scripts run end to end on tiny models (their science is in docs/benchmarks.md, not here)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from adaptive_drafter import SpecConfig
from adaptive_drafter.config import DrafterConfig
from adaptive_drafter.drafter import AdapterVersion, build_drafter, load_adapter, save_adapter
from adaptive_drafter.testing import tiny_causal_lm
from conftest import load_file_module

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
PRESETS = Path(__file__).resolve().parents[1] / "configs" / "bench"
HYBRID = "drafting" in {f.name for f in dataclasses.fields(SpecConfig)}


def load_script(name: str):
    return load_file_module(SCRIPTS / f"{name}.py")


def test_bench_rollout_prints_and_writes_its_table(tmp_path, capsys):
    bench = load_script("bench_rollout")
    out = tmp_path / "bench.json"
    bench.main(["--batch-sizes", "1,3", "--max-new-tokens", "8", "--repeats", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "ratio" in printed and "identical" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    assert all(r["identical_rows"] == 1.0 and r["plain_tok_s"] > 0 and r["spec_tok_s"] > 0 for r in rows)


def test_bench_rollout_with_an_adapter_a_draft_vocabulary_and_a_plot(tmp_path, capsys):
    bench = load_script("bench_rollout")
    policy = tiny_causal_lm(seed=0, **bench.TINY)  # the benchmark's tiny policy (adapters depend only on its shapes)
    config = DrafterConfig(drafter_num_layers=2, drafter_lora_r=32, drafter_lora_alpha=64)
    adapter = save_adapter(build_drafter(policy, config), tmp_path / "adapter", AdapterVersion(1, 0))
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    bench.main(["--batch-sizes", "1", "--max-new-tokens", "8", "--repeats", "1", "--drafter-layers", "2",
                "--adapter", str(adapter), "--draft-vocab", "64", "--plot", str(png), "--json", str(out)])  # fmt: skip
    assert "HF assisted" in capsys.readouterr().out and png.stat().st_size > 0
    result = json.loads(out.read_text())
    row = result["rows"][0]
    assert row["identical_rows"] == 1.0 and row["assisted_ratio"] > 0 and 0 < row["c"] < 1 and row["v_k"] > 0
    assert row["predicted"] > 0 and 0 < result["meta"]["draft_vocab_coverage"] <= 1
    assert result["meta"]["memory"]["drafter_weights_mib"] > 0


@pytest.mark.skipif(not HYBRID, reason="the engine has no hybrid drafting yet (SpecConfig.drafting)")
@pytest.mark.parametrize("drafter", ["hybrid", "suffix"])
def test_bench_rollout_with_suffix_drafts_on_grpo_groups_writes_per_source_stats(tmp_path, capsys, drafter):
    bench = load_script("bench_rollout")
    out, threads = tmp_path / "bench.json", torch.get_num_threads()
    try:  # one thread: on a shared CPU, oversubscribed OpenMP threads make this 10-20x slower
        bench.main(["--batch-sizes", "4", "--max-new-tokens", "16", "--repeats", "1", "--group", "2", "--history", "1",
                    "--drafter", drafter, "--threads", "1", "--json", str(out)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert "sfx share" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["meta"]["args"]["drafter"] == drafter and "2 per prompt" in result["meta"]["model"]
    (row,) = result["rows"]
    assert (row["drafter"], row["group"], row["history"]) == (drafter, 2, 1)
    assert row["identical_rows"] == 1.0 and row["ratio"] > 0 and row["elastic_ratio"] > 0  # lossless, greedy
    assert row["tokens_per_verify"] == row["stats"]["tokens_per_verify"] and "elastic_tokens_per_verify" in row
    for stats, sources in ((row["stats"], row["sources"]), (row["elastic_stats"], row["elastic_sources"])):
        assert sources["suffix"]["verifies"] + sources["model"]["verifies"] == stats["verify_steps"]
        assert sources["suffix"]["drafted"] == stats["suffix_drafted"]
        if drafter == "suffix":  # the model drafter never drafts
            assert sources["model"]["drafted"] == 0 and stats["drafter_forwards"] == 0
    assert row["predicted"] is None  # S(α, k, c, v_k) models the drafter model alone
    if drafter == "suffix":  # the previous epoch indexed: some rows verify suffix drafts (hybrid: timing decides)
        assert row["sources"]["suffix"]["verifies"] > 0


def test_bench_rollout_presets_set_defaults_that_flags_override(tmp_path):
    bench = load_script("bench_rollout")
    quick = bench.parse_args(["--preset", str(PRESETS / "quick.yaml")])
    assert (quick.batch_sizes, quick.max_new_tokens, quick.repeats, quick.model) == ([1, 16], 32, 1, "tiny")
    embedded = bench.parse_args(["--preset", str(PRESETS / "embedded.yaml"), "--repeats", "1", "--json", "x.json"])
    assert (embedded.model, embedded.task, embedded.batch_sizes, embedded.repeats) == ("embedded", "arithmetic",
                                                                                         [1, 4, 16], 1)  # fmt: skip
    assert embedded.json == Path("x.json") and embedded.drafter_layers == 4
    assert bench.parse_args(["--prompts", "reasoning"]).task == "reasoning"  # the documented commands' old flag name
    for text in ("max_new_token: 8\n", "model: huge\n"):  # a typo, a value outside the choices
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(SystemExit):
            bench.parse_args(["--preset", str(tmp_path / "bad.yaml")])


def test_distill_drafter_saves_a_loadable_adapter(tmp_path):
    warm = load_script("distill_drafter")
    result = warm.main(
        [
            "--rounds",
            "2",
            "--steps-per-round",
            "2",
            "--batch-size",
            "4",
            "--max-new-tokens",
            "8",
            "--eval-batches",
            "1",
            "--eval-every",
            "1",
            "--json",
            str(tmp_path / "curve.json"),
            "--plot",
            str(tmp_path / "curve.png"),
            "--out",
            str(tmp_path / "adapter"),
        ]
    )
    assert 0 <= result["before"] <= 1 and 0 <= result["after"] <= 1
    curve = json.loads((tmp_path / "curve.json").read_text())["curve"]
    assert [point["round"] for point in curve] == [0, 1, 2] and (tmp_path / "curve.png").stat().st_size > 0
    task = warm.tiny_task(warm.parse_args([]))
    fresh = build_drafter(task.policy, DrafterConfig(drafter_num_layers=2, drafter_lora_r=32, drafter_lora_alpha=64))
    version = load_adapter(fresh, tmp_path / "adapter")
    assert version.adapter_version == 2 and version.policy_version == 0


@pytest.mark.parametrize(("flag", "value"), [("--batch-sizes", "0"), ("--repeats", "0"), ("--group", "0"),
                                           ("--history", "-1")])  # fmt: skip
def test_bench_rollout_rejects_bad_numbers(flag, value):
    bench = load_script("bench_rollout")
    with pytest.raises(SystemExit):
        bench.parse_args([flag, value])


def test_bench_distill_step_times_both_head_placements():
    result = load_script("bench_distill_step").main(["--batch-size", "2", "--repeats", "1"])
    assert result["at_targets_s"] > 0 and result["everywhere_s"] > 0


def test_bench_longtail_finishes_the_same_rows_faster_or_not_and_says_so(tmp_path):
    assert "import bench_rollout" not in (SCRIPTS / "bench_longtail.py").read_text()  # shared code: adaptive_drafter
    bench = load_script("bench_longtail")
    out, png = tmp_path / "lt.json", tmp_path / "lt.png"
    result = bench.main(["--batch", "8", "--max-new-tokens", "32", "--json", str(out), "--plot", str(png)])
    lengths = result["lengths"]
    assert len(lengths) == 8 and max(lengths) > min(lengths) and png.stat().st_size > 0
    for name in ("fixed_k", "elastic"):
        assert result[name]["identical_rows"] == 1.0 and result[name]["speedup"] > 0
    assert json.loads(out.read_text())["result"]["plain"]["seconds"] > 0
