#!/usr/bin/env python
"""Rollout throughput: plain `policy.generate` vs `SpeculativeEngine` (fixed k and elastic), side by side, over batch
sizes.

    python scripts/bench_rollout.py                                  # tiny, batch sizes 1,4,16,64, greedy
    python scripts/bench_rollout.py --preset configs/bench/quick.yaml            # what `make bench` runs
    python scripts/bench_rollout.py --preset configs/bench/embedded.yaml         # the documented embedded run
    python scripts/bench_rollout.py --model embedded --drafter {model,suffix,hybrid} --group 4 --history 1 \\
        --do-sample --temperature 1.0 --json OUT                     # hybrid drafting on GRPO-shaped batches

For each batch size all decoders run back to back on identical left-padded prompts with the same sampling settings,
after a short warm-up; medians of `--repeats` runs. Throughput counts the new tokens produced per row up to and
including the first eos (the padding plain `generate` adds to finished rows is not counted). ratio = spec tok/s /
plain tok/s (> 1: speculation wins). Greedy runs also report the share of rows identical to `generate`'s (lossless:
1.00 up to float ties). Setups (`adaptive_drafter.experiments.bench`): `--model tiny` (default: a random 12-layer Llama with damped
late layers, drafted by its first `--drafter-layers` layers: agreement set by the damping) and `--model embedded`
(SmolLM2-135M-Instruct on `--task` prompts, drafted by its own first layers: untrained unless `--adapter`).

`--k` is k_max, the longest draft a row verifies from any source (the model drafter's num_draft_tokens and the suffix
drafter's suffix_max_draft). Each row also carries `mean_max_p`, the policy's mean top-1 probability over the fixed-k
run's generated positions (collected as top-1 targets), and `max_p_ceiling` = expected tokens per verify of k drafts
accepted at that rate: the ceiling of a deterministic draft (sampled drafts, q ~ p, can pass it).

Drafting (`--drafter`): `model` the drafter model alone; `hybrid` per row and step the model's drafts or a model-free
suffix draft (`SpecConfig.drafting`: siblings, earlier rollouts, the row's own context); `suffix` suffix drafts
only (the model drafter never drafts). `--group G` repeats each prompt G times (GRPO's num_generations; batch sizes
count rows); `--history H` first runs H untimed rollouts of the same prompts through each engine, so its suffix
drafter has earlier epochs indexed (each timed run starts from that same state). Presets (`--preset`, YAML of flag
names with underscores) set defaults; flags given override them.

On a shared CPU set `--threads` so that the processes together do not oversubscribe the cores: oversubscribed
OpenMP threads slow PyTorch down by orders of magnitude.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from adaptive_drafter import SpecStats, SpeculativeEngine
from adaptive_drafter.adaptive import AdaptiveDrafter
from adaptive_drafter.experiments.bench import (  # noqa: F401 - TINY, embedded_setup, forward_seconds: used through this module
    DRAFTERS,
    TINY,
    RunOptions,
    Setup,
    calibrate_draft_vocab,
    check_source,
    effective_alpha,
    embedded_setup,
    forward_seconds,
    fresh_suffix,
    grouped,
    make_engine,
    mean_max_p,
    prompts_on,
    restore_suffix,
    run_assisted,
    run_plain,
    run_spec,
    run_spec_output,
    snapshot_suffix,
    source_stats,
    step_costs,
    step_shares,
    suffix_supported,
    tiny_setup,
)
from adaptive_drafter.experiments.cli import machine_line, parse_with_preset, write_json
from adaptive_drafter.experiments.memory import format_memory, memory_report
from adaptive_drafter.metrics import machine_info
from adaptive_drafter.plots import plot_speedup
from adaptive_drafter.elastic import expected_tokens
from adaptive_drafter.metrics import speedup_estimate
from adaptive_drafter.precision import RolloutCopy, resolve_rollout_dtype


def index_history(engine: SpeculativeEngine, setup: Setup, ids, mask, options: RunOptions, epochs: int) -> Any:
    """Forget the warm-ups, run `epochs` untimed rollouts of these prompts (other seeds: earlier epochs are other
    samples), and return the suffix drafter's state for every timed run to start from (None without one)."""
    fresh_suffix(engine)
    for epoch in range(epochs):
        run_spec(engine, setup, ids, mask, options, options.max_new_tokens, seed=options.seed + 1 + epoch)
    return snapshot_suffix(engine)


def bench_batch(
    setup: Setup,
    engine: SpeculativeEngine,
    elastic: SpeculativeEngine,
    batch: int,
    args: argparse.Namespace,
    fp32: Setup | None = None,
) -> dict[str, Any]:
    """Warm up, then time plain, speculative (fixed k) and elastic decoding back to back `--repeats` times; medians.
    At batch 1, HF assisted generation runs beside them as a peer. With `fp32` (the float32 policy, when the run is in
    another precision), its plain `generate` runs beside them too."""
    options, max_new = RunOptions.of(args), args.max_new_tokens
    ids, mask = prompts_on(setup, batch, options)
    run_plain(setup, ids, mask, options, min(8, max_new))  # warm-up (allocator, kernels, lazy init)
    if fp32 is not None:
        run_plain(fp32, ids, mask, options, min(8, max_new))
    run_spec(engine, setup, ids, mask, options, min(8, max_new))
    run_spec(elastic, setup, ids, mask, options, max_new)  # the controller measures costs at this batch
    history = {name: index_history(e, setup, ids, mask, options, args.history) for name, e in
               (("fixed", engine), ("elastic", elastic))}  # fmt: skip
    assisted = batch == 1 and not args.no_assisted
    plain_times, spec_times, elastic_times, assisted_times, fp32_times = [], [], [], [], []
    for _ in range(args.repeats):
        plain, seconds = run_plain(setup, ids, mask, options, max_new)
        plain_times.append(seconds)
        if fp32 is not None:
            fp32_plain, seconds = run_plain(fp32, ids, mask, options, max_new)
            fp32_times.append(seconds)
        restore_suffix(engine, history["fixed"])
        out, seconds = run_spec_output(engine, setup, ids, mask, options, max_new, collect_topk=1)  # top-1: max p
        spec, stats, max_p = out.completion_ids, out.stats, mean_max_p(out.targets)
        spec_times.append(seconds)
        restore_suffix(elastic, history["elastic"])
        elastic_out, elastic_stats, seconds = run_spec(elastic, setup, ids, mask, options, max_new)
        elastic_times.append(seconds)
        if assisted:
            try:
                assisted_out, seconds = run_assisted(setup, ids, mask, options, max_new)
                assisted_times.append(seconds)
            except Exception as exc:  # noqa: BLE001 - a peer's failure is reported in the table, not fatal
                assisted, assisted_error = False, f"{type(exc).__name__}: {exc}"[:200]
    check_source(stats, args.drafter)
    check_source(elastic_stats, args.drafter)
    plain_tokens, spec_tokens = sum(map(len, plain)), sum(map(len, spec))
    plain_s, spec_s = statistics.median(plain_times), statistics.median(spec_times)
    row = {
        "batch": batch,
        "drafter": args.drafter,
        "group": args.group,
        "history": args.history,
        "prompt_width": ids.shape[1],
        "plain_tokens": plain_tokens,
        "spec_tokens": spec_tokens,
        "plain_seconds": plain_s,
        "spec_seconds": spec_s,
        "plain_times": plain_times,
        "spec_times": spec_times,
        "plain_tok_s": plain_tokens / plain_s,
        "spec_tok_s": spec_tokens / spec_s,
        "tokens_per_verify": stats.tokens_per_verify,
        "mean_max_p": max_p,
        "max_p_ceiling": expected_tokens(max_p, args.k),
        "steps": step_shares(stats),
        "stats": stats.as_dict(),
    }
    row["ratio"] = row["spec_tok_s"] / row["plain_tok_s"]
    row["elastic_tok_s"] = sum(map(len, elastic_out)) / statistics.median(elastic_times)
    row["elastic_ratio"] = row["elastic_tok_s"] / row["plain_tok_s"]
    row["elastic_times"] = elastic_times
    row["elastic_sd_fraction"] = elastic_stats.metrics()["spec/sd_fraction"]
    row["elastic_tokens_per_verify"] = elastic_stats.tokens_per_verify
    row["elastic_steps"] = step_shares(elastic_stats)
    row["elastic_stats"] = elastic_stats.as_dict()
    sources, elastic_sources = source_stats(stats), source_stats(elastic_stats)
    if sources is not None:  # per-source counters: the engine has hybrid drafting
        row.update(sources=sources, elastic_sources=elastic_sources)
    if assisted:
        row["assisted_ratio"] = sum(map(len, assisted_out)) / statistics.median(assisted_times) / row["plain_tok_s"]
        row["assisted_times"] = assisted_times
    elif batch == 1 and not args.no_assisted:
        row["assisted_error"] = assisted_error
    if fp32 is not None:  # the same rollouts against float32 `generate` (what rollouts cost before this precision)
        row["fp32_plain_tok_s"] = sum(map(len, fp32_plain)) / statistics.median(fp32_times)
        row["fp32_plain_times"] = fp32_times
        row["ratio_vs_fp32"] = row["spec_tok_s"] / row["fp32_plain_tok_s"]
        row["elastic_ratio_vs_fp32"] = row["elastic_tok_s"] / row["fp32_plain_tok_s"]
        if not args.do_sample:
            row["identical_to_fp32_rows"] = sum(p == s for p, s in zip(fp32_plain, spec)) / batch
    # v_w as the elastic engine measured it at this batch size, in the precision it serves (w drafts + 1 token).
    row["engine_v"] = {w: elastic.controller.verify_cost(batch, w) for w in range(1, args.k + 1)}
    row.update(step_costs(setup, engine, ids, mask, args.k))
    # S(α, k, c, v_k) models one draft source of k tokens: suffix drafts (other lengths, no drafter cost) fall outside.
    alpha = predicted = None
    if args.drafter == "model":
        alpha = effective_alpha(stats.tokens_per_verify, args.k)
        predicted = speedup_estimate(alpha, args.k, row["c"], row["v_k"])
    row.update(alpha_effective=alpha, predicted=predicted,
               achieved_over_predicted=row["ratio"] / predicted if predicted else None)  # fmt: skip
    if not args.do_sample:
        row["identical_rows"] = sum(p == s for p, s in zip(plain, spec)) / batch
    return row


def format_table(rows: list[dict[str, Any]], greedy: bool) -> str:
    """The result rows as an aligned text table."""
    header = ["batch", "plain tok/s", "spec tok/s", "ratio", "elastic", "sd frac", "accept", "tok/verify", "max p"]
    suffix = rows[0]["drafter"] != "model" and "sources" in rows[0]
    if suffix:
        header += ["sfx share", "sfx accept"]
    header += ["c", "v_k", "predicted", "achieved/pred", "HF assisted"] + (["identical"] if greedy else [])
    fp32 = "fp32_plain_tok_s" in rows[0]
    if fp32:
        header += ["fp32 gen tok/s", "spec/fp32", "elastic/fp32"] + (["identical fp32"] if greedy else [])
    lines = []
    for r in rows:
        s = SpecStats(**{k: v for k, v in r["stats"].items() if k in SpecStats.__dataclass_fields__})
        cells = [
            str(r["batch"]),
            f"{r['plain_tok_s']:.1f}",
            f"{r['spec_tok_s']:.1f}",
            f"{r['ratio']:.2f}x",
            f"{r['elastic_ratio']:.2f}x",
            f"{r['elastic_sd_fraction']:.2f}",
            f"{s.acceptance_rate:.3f}",
            f"{s.tokens_per_verify:.2f}",
            f"{r['mean_max_p']:.3f}" if "mean_max_p" in r else "-",
        ]
        if suffix:
            sfx = r["sources"]["suffix"]
            cells += [f"{sfx['verifies'] / max(1, s.verify_steps):.2f}", f"{sfx['acceptance_rate']:.3f}"]
        cells += [
            f"{r['c']:.3f}",
            f"{r['v_k']:.2f}",
            f"{r['predicted']:.2f}x" if r["predicted"] is not None else "-",
            f"{r['achieved_over_predicted']:.2f}" if r["achieved_over_predicted"] is not None else "-",
            f"{r['assisted_ratio']:.2f}x" if "assisted_ratio" in r else ("error" if "assisted_error" in r else "-"),
        ]
        if greedy:
            cells.append(f"{r['identical_rows']:.2f}")
        if fp32:
            cells += [f"{r['fp32_plain_tok_s']:.1f}", f"{r['ratio_vs_fp32']:.2f}x"]
            cells += [f"{r['elastic_ratio_vs_fp32']:.2f}x"]
            cells += [f"{r['identical_to_fp32_rows']:.2f}"] if greedy else []
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", choices=("tiny", "embedded"), default="tiny")
    parser.add_argument("--batch-sizes", default="1,4,16,64", help="comma-separated batch sizes in rows (1,4,16,64)")
    parser.add_argument(
        "--k",
        type=int,
        default=4,
        help="k_max, the longest draft a row verifies (default 4): the model drafter's num_draft_tokens and the "
        "suffix drafter's suffix_max_draft",
    )
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 64 (tiny) or 48 (embedded)")
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument("--do-sample", dest="do_sample", action="store_true", help="sample (temperature only)")
    sampling.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy decoding (default)")
    parser.set_defaults(do_sample=False)
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)")
    parser.add_argument(
        "--drafter",
        choices=DRAFTERS,
        default="model",
        help="draft source: the drafter model, model-free suffix drafts, or per row either (hybrid)",
    )
    parser.add_argument("--group", type=int, default=1, help="rows per prompt (GRPO's num_generations; default 1)")
    parser.add_argument(
        "--history",
        type=int,
        default=0,
        help="untimed rollouts of the same prompts first: earlier epochs for the suffix drafter",
    )
    parser.add_argument(
        "--drafter-layers", type=int, default=None, help="truncated drafter depth (default: 2 tiny, 4 embedded)"
    )
    parser.add_argument("--dampen", type=float, default=0.05, help="tiny: scale of the layers the drafter lacks")
    parser.add_argument(
        "--drafter-kind", choices=("truncated", "eagle"), default="truncated",
        help="the drafter model: the policy's first layers (truncated) or an EAGLE-style head over its features",
    )  # fmt: skip
    parser.add_argument(
        "--adapter", type=Path, default=None,
        help="a distilled LoRA adapter (distill_drafter.py --out) or, --drafter-kind eagle, head (distill_eagle.py)",
    )  # fmt: skip
    parser.add_argument("--lora-r", type=int, default=32, help="LoRA rank the adapter was trained with (default 32)")
    parser.add_argument(
        "--task",
        "--prompts",
        dest="task",
        choices=("questions", "arithmetic", "reasoning"),
        default="questions",
        help="embedded: chat questions or an embedded RL task (tasks.py)",
    )
    parser.add_argument(
        "--draft-vocab", type=int, default=0, help="draft over the N most frequent completion tokens (0: all)"
    )
    parser.add_argument("--no-assisted", action="store_true", help="skip HF assisted generation at batch 1")
    parser.add_argument("--plot", type=Path, default=None, help="save a PNG of the speed-up vs batch size here")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs per batch size, median kept (default 3 for tiny, 1 for embedded)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "auto"),
        default="float32",
        help="precision of the rollouts (ServingConfig.rollout_dtype): policy copy and drafter; plain generate runs in it "
        "too (default float32, the documented runs before it; auto: bfloat16 where the hardware is fast at it)",
    )
    parser.add_argument(
        "--fp32-baseline",
        action="store_true",
        help="with --dtype other than float32: also time float32 generate side by side (columns .../fp32)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write rows and metadata to this JSON file")
    args = parse_with_preset(parser, argv)
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    if args.max_new_tokens is None:
        args.max_new_tokens = 64 if args.model == "tiny" else 48
    if args.drafter_layers is None:
        args.drafter_layers = 2 if args.model == "tiny" else 4
    if args.repeats is None:
        args.repeats = 3 if args.model == "tiny" else 1
    if args.do_sample:
        args.no_assisted = True  # HF's assisted sampling is another algorithm; compare it greedy
    if not args.batch_sizes or min(args.batch_sizes) < 1 or args.repeats < 1 or args.max_new_tokens < 1:
        parser.error("batch sizes, --repeats and --max-new-tokens must be positive")
    if args.group < 1 or args.history < 0:
        parser.error("--group must be positive and --history non-negative")
    if args.drafter_kind == "eagle":
        args.no_assisted = True  # HF's assisted generation needs a causal LM as its assistant, not a head
    if args.drafter_kind == "eagle" and args.draft_vocab:
        parser.error(
            "--drafter-kind eagle drafts over the head's own draft vocabulary (distill_eagle.py --draft-vocab)"
        )
    if args.drafter != "model" and not suffix_supported():
        parser.error(f"--drafter {args.drafter} needs SpecConfig.drafting (hybrid drafting), which this "
                     "adaptive_drafter's engine lacks")  # fmt: skip
    return args


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    machine = machine_info()
    print(machine_line(machine, args.device))
    torch.manual_seed(args.seed)
    setup = grouped((tiny_setup if args.model == "tiny" else embedded_setup)(args), args.group)
    setup.policy.to(args.device)
    setup.drafter.to(args.device)
    precision = resolve_rollout_dtype(args.dtype, setup.policy)
    rollout = RolloutCopy.build(setup.policy, precision)  # the policy as rollouts compute it, as the recipe serves it
    adaptive = AdaptiveDrafter(setup.drafter)
    adaptive.serving_dtype = precision.dtype
    adaptive.serving_policy = rollout.model  # (an eagle head's serving copy reads the rollout copy's modules)
    served = adaptive.draft_model()  # LoRA merged, in the rollouts' precision, as the recipe serves it
    fp32 = setup if args.fp32_baseline and rollout.is_copy else None
    trained_drafter = setup.drafter  # the drafter in its training precision (the memory report counts both)
    setup = dataclasses.replace(setup, policy=rollout.model, drafter=served if rollout.is_copy else setup.drafter)
    print(f"precision: {precision.name} ({precision.reason})" + ("; float32 generate timed beside" if fp32 else ""))
    engine = make_engine(setup.policy, served, args.drafter, args.k, elastic=False)
    elastic = make_engine(setup.policy, served, args.drafter, args.k, elastic=True)
    mode = f"sampling, temperature {args.temperature}" if args.do_sample else "greedy"
    print(f"model: {setup.description}")
    print(f"k={args.k}, max_new_tokens={args.max_new_tokens}, {mode}, drafter {args.drafter}, group {args.group}, "
          f"history {args.history}, median of {args.repeats} run(s), seed {args.seed}")  # fmt: skip
    options = RunOptions.of(args)
    coverage = calibrate_draft_vocab(setup, [engine, elastic], options, args.draft_vocab) if args.draft_vocab else None
    if coverage is not None:
        print(f"draft vocabulary: {args.draft_vocab} most frequent tokens, covering {coverage:.3f} of held-out tokens")

    rows = [bench_batch(setup, engine, elastic, b, args, fp32) for b in tqdm(args.batch_sizes, desc="batch sizes")]

    print(format_table(rows, greedy=not args.do_sample))
    print(
        "tokens counted up to and including each row's first eos; ratio = spec tok/s / plain tok/s (>1: spec wins); "
        "elastic = elastic engine's ratio, sd frac = its share of row-steps that speculated; sfx share/accept = share "
        "of verifies with a suffix draft and their acceptance; max p = the policy's mean top-1 probability over the "
        "generated positions (a deterministic draft token's acceptance ceiling); c, v_k = measured drafter-step and (k+1)-token verify "
        "costs relative to a decode step; predicted = S(α, k, c, v_k) with α fitted to the measured tokens/verify "
        "(model drafter only); HF assisted = transformers' assisted generation (batch 1, greedy)"
    )
    memory = memory_report(
        dataclasses.replace(setup, drafter=trained_drafter), max(args.batch_sizes),
        rows[-1]["prompt_width"] + args.max_new_tokens, options,
        served_drafter=served if rollout.is_copy else None, rollout_copy_bytes=rollout.nbytes,
    )  # fmt: skip
    print(format_memory(memory))
    if args.plot is not None:
        plot_speedup(rows, args.plot, f"{setup.description[:90]}\nk={args.k}, {mode}, drafter {args.drafter}")
        print(f"wrote {args.plot}")
    meta = {"machine": machine, "model": setup.description, "draft_vocab_coverage": coverage, "memory": memory}
    meta["precision"] = {"dtype": precision.name, "setting": precision.setting, "reason": precision.reason}
    if args.json is not None:
        write_json(args.json, args, meta, rows=rows)
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main()
