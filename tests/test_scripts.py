"""The scripts run end to end on tiny models (their science is in docs/benchmarks.md, not here)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import load_file_module

from adaptive_drafter import SpecConfig
from adaptive_drafter.config import DrafterConfig
from adaptive_drafter.drafter import AdapterVersion, build_drafter, load_adapter, save_adapter
from adaptive_drafter.testing import tiny_causal_lm

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


def test_bench_rollout_drafts_with_a_saved_eagle_head_and_times_its_draft_step(tmp_path):
    from adaptive_drafter.eagle import EagleHead, save_head

    bench = load_script("bench_rollout")
    policy = tiny_causal_lm(seed=0, **bench.TINY)
    head = save_head(EagleHead(policy, draft_ids=list(range(0, 512, 4))), tmp_path / "head")
    out = tmp_path / "bench.json"
    bench.main(["--batch-sizes", "1,2", "--max-new-tokens", "8", "--repeats", "1", "--drafter-kind", "eagle",
                "--adapter", str(head), "--json", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert all(r["identical_rows"] == 1.0 and 0 < r["c"] < 1 and r["stats"]["drafted"] > 0 for r in rows)
    with pytest.raises(SystemExit):  # the head drafts over its own draft vocabulary
        bench.parse_args(["--drafter-kind", "eagle", "--draft-vocab", "64"])


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
    assert 0 < row["mean_max_p"] <= 1 and 1 <= row["max_p_ceiling"] <= 5  # k = 4: at most 5 tokens per verify
    for steps in (row["steps"], row["elastic_steps"]):
        assert steps["plain"] + steps["suffix"] + steps["model"] == pytest.approx(1.0)
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


def test_lengths_summary_counts_tokens_up_to_the_first_eos():
    from adaptive_drafter.experiments.lengths import lengths_summary

    rows = [[5, 6, 2, 7, 2], [2, 9, 9, 9, 9], [5, 5, 5, 5, 5], [1, 2, 3, 4, 9]]  # eos 2 at 2, at 0, never, at 1
    summary = lengths_summary(rows, eos=[2, 3], cap=5)  # 3 is an eos too: the last row stops at its 2 first
    assert summary["lengths"] == [2, 0, 5, 1] and summary["max"] == 5 and summary["median"] == 1.5
    assert summary["share_at_cap"] == 0.25 and summary["share_ge_64"] == 0.0 and summary["rows"] == 4
    assert lengths_summary([[7] * 300], eos=2, cap=300)["share_ge_256"] == 1.0


def test_bench_lengths_records_the_length_distribution_of_sampled_completions(tmp_path):
    out = tmp_path / "lengths.json"
    result = load_script("bench_lengths").main(["--model", "tiny", "--prompts", "2", "--samples", "3",
                                                "--max-new-tokens", "6", "--chunk", "4", "--json", str(out)])  # fmt: skip
    summary = json.loads(out.read_text())["summary"]
    assert summary == result["summary"] and summary["rows"] == 6 and len(summary["lengths"]) == 6
    assert all(0 <= n <= 6 for n in summary["lengths"]) and summary["cap"] == 6


def test_mean_max_p_averages_the_policys_top_probability_over_every_position():
    from types import SimpleNamespace

    from adaptive_drafter.experiments.bench import mean_max_p

    rows = [SimpleNamespace(topk_logprobs=torch.tensor([[0.5, 0.3], [0.9, 0.1]]).log().half()),
            SimpleNamespace(topk_logprobs=torch.tensor([[0.4, 0.2]]).log().half())]  # fmt: skip
    assert mean_max_p(rows) == pytest.approx(0.6, abs=1e-3)  # (0.5 + 0.9 + 0.4) / 3 positions, not rows


def test_step_shares_split_row_steps_into_plain_suffix_and_model():
    from adaptive_drafter.experiments.bench import step_shares
    from adaptive_drafter.metrics import SpecStats

    stats = SpecStats(verify_steps=6, verified_tokens=15, plain_steps=4)
    if HYBRID:
        stats.suffix_verifies = 2
    shares = step_shares(stats)
    assert shares["plain"] == 0.4 and shares["suffix"] + shares["model"] == pytest.approx(0.6)
    assert shares["tokens_per_row_step"] == pytest.approx(1.9)  # (15 + 4) tokens / 10 row-steps


@pytest.mark.skipif(not HYBRID, reason="the engine has no hybrid drafting yet (SpecConfig.drafting)")
def test_the_bench_k_bounds_suffix_drafts_as_well_as_model_drafts():
    from adaptive_drafter.experiments.bench import make_engine
    from adaptive_drafter.drafter import truncated_drafter

    policy = tiny_causal_lm(seed=0, vocab_size=64, hidden_size=32, num_layers=2)
    drafter = truncated_drafter(policy, 1)
    for source in ("hybrid", "suffix"):
        config = make_engine(policy, drafter, source, 8, elastic=True).config
        assert (config.num_draft_tokens, config.suffix_max_draft) == (8, 8)
    assert make_engine(policy, drafter, "hybrid", 8, elastic=True, suffix_max_draft=3).config.suffix_max_draft == 3
