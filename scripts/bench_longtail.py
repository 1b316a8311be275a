#!/usr/bin/env python
"""Long-tail rollout benchmark: time to finish a whole RL batch whose completion lengths are long-tailed, plain
`policy.generate` vs the speculative engine (fixed k and elastic), side by side in one process.

In RL most completions of a batch are short and a few run long; a batched decoder keeps stepping until the longest
is done, and for most of that time only a handful of rows are left. That tail is where speculation pays (a small
active batch is memory-bound on a GPU and cheap to verify), and where the elastic engine switches it on.

The lengths are real, not imposed: every row stops at its own eos.

* `--model tiny` (default): the damped random Llama of `adaptive_drafter.experiments.bench.tiny_setup` (greedy). A random model
  has no meaningful eos and its greedy continuations are prompt-specific, so an eos *set* is chosen from a plain run on
  the batch itself: tokens are added greedily (each the one that shortens the rows most) until the median length is
  `--max-new-tokens` / 16. Rows stop at their first token of the set; rows that never emit one run to
  `--max-new-tokens`: the tail is the model's own, not drawn from a chosen distribution. Both decoders produce the
  same greedy completions, so they finish the very same rows at the very same lengths.
* `--model embedded`: SmolLM2-135M-Instruct sampling (temperature 1, as RL does) on the recipe's arithmetic prompts,
  its own eos; optionally with a distilled drafter (`--adapter`) and a reduced draft vocabulary (`--draft-vocab`).

Plain `generate` keeps computing finished rows (padding) until the whole batch ends, as Hugging Face generation does;
the engine drops them. To separate that from speculation, the engine also runs with speculation off (`no_spec`,
`plain_batch_threshold=1`): speculation's own gain is fixed_k or elastic over no_spec.

    python scripts/bench_longtail.py                                # tiny, batch 32, up to 256 tokens
    python scripts/bench_longtail.py --model embedded --batch 16 --max-new-tokens 160 --json out.json --plot out.png

Setups, runners and records come from `adaptive_drafter.experiments.bench`; `--preset PATH` (YAML of flag names with underscores)
sets defaults that flags override.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch

from adaptive_drafter import SpecConfig, SpeculativeEngine
from adaptive_drafter.adaptive import AdaptiveDrafter
from adaptive_drafter.plots import plot_longtail
from adaptive_drafter.experiments.bench import (
    RunOptions,
    Setup,
    calibrate_draft_vocab,
    embedded_setup,
    prompts_on,
    run_plain,
    run_spec,
    tiny_setup,
)
from adaptive_drafter.experiments.cli import parse_with_preset, write_json
from adaptive_drafter.metrics import machine_info


def first_occurrences(rows: list[list[int]], vocab_size: int, cap: int) -> torch.Tensor:
    """`[V, R]`: the completion length row r would have if token v were its eos (1 + index of v's first occurrence;
    `cap` where v does not occur)."""
    first = torch.full((vocab_size, len(rows)), cap, dtype=torch.long)
    for r, row in enumerate(rows):
        for i, token in reversed(list(enumerate(row))):  # reversed: the earliest occurrence is written last
            first[token, r] = i + 1
    return first


def longtail_eos(rows: list[list[int]], cap: int, vocab_size: int, target_median: int, exclude: int) -> list[int]:
    """An eos set under which the calibration rows' lengths have median <= `target_median`: tokens are added greedily,
    each the one that shortens the rows most on average, until the median is reached. What is left of the tail (rows
    that emit none of them, some never: they run to `cap`) is the model's own. `exclude` (the pad id) is never used."""
    first = first_occurrences(rows, vocab_size, cap)
    first[exclude] = cap
    lengths, chosen = torch.full((len(rows),), cap, dtype=torch.long), []
    while lengths.float().median() > target_median:
        candidates = torch.minimum(lengths[None], first)
        mean = candidates.float().mean(1)
        mean[chosen] = float("inf")
        token = int(mean.argmin())
        if torch.equal(candidates[token], lengths):  # no token shortens any row further
            break
        chosen.append(token)
        lengths = candidates[token]
    return chosen


def percentiles(lengths: list[int]) -> dict[str, float]:
    """p50, p90, max and mean of the completion lengths."""
    ordered = sorted(lengths)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    return {"p50": pick(0.5), "p90": pick(0.9), "max": ordered[-1], "mean": statistics.mean(ordered)}


class StepTrace:
    """Records, for every decode step of an engine's rollout, the active batch size and the draft length verified
    (0: a plain step), through the engine's step hook."""

    def __init__(self, engine: SpeculativeEngine) -> None:
        self.steps: list[tuple[int, int]] = []
        engine.step_hooks.append(lambda plan, step: self.steps.append((len(step.rows), step.width)))

    def by_batch(self) -> list[dict[str, Any]]:
        """Steps and the share that speculated, per active-batch bucket [1], [2, 3], [4, 7], ... (powers of 2)."""
        buckets: dict[int, list[int]] = {}
        for batch, k in self.steps:
            buckets.setdefault(1 << (batch.bit_length() - 1), []).append(k)
        return [
            {"batch_from": lo, "batch_to": 2 * lo - 1, "steps": len(ks), "sd_share": sum(k > 0 for k in ks) / len(ks)}
            for lo, ks in sorted(buckets.items())
        ]


def run_all(setup: Setup, engines: dict[str, SpeculativeEngine], args: argparse.Namespace) -> dict:
    """Plain, then each engine, on the same batch, `--repeats` times; median seconds to finish the batch."""
    options = RunOptions.of(args)
    ids, mask = prompts_on(setup, args.batch, options)
    run_plain(setup, ids, mask, options, 8)  # warm-up
    for engine in engines.values():
        run_spec(engine, setup, ids, mask, options, args.max_new_tokens)  # warm-up; elastic learns costs
    times: dict[str, list[float]] = {name: [] for name in ["plain", *engines]}
    trace = StepTrace(engines["elastic"])
    for _ in range(args.repeats):
        trace.steps.clear()  # keep the last timed rollout's steps
        plain, seconds = run_plain(setup, ids, mask, options, args.max_new_tokens)
        times["plain"].append(seconds)
        outputs = {}
        for name, engine in engines.items():
            completions, stats, seconds = run_spec(engine, setup, ids, mask, options, args.max_new_tokens)
            times[name].append(seconds)
            outputs[name] = (completions, stats)
    lengths = [len(row) for row in plain]
    result: dict[str, Any] = {"batch": args.batch, "lengths": lengths, "length_percentiles": percentiles(lengths)}
    plain_s = statistics.median(times["plain"])
    result["plain"] = {"seconds": plain_s, "times": times["plain"]}
    for name, (completions, stats) in outputs.items():
        seconds = statistics.median(times[name])
        result[name] = {
            "seconds": seconds,
            "times": times[name],
            "speedup": plain_s / seconds,
            "speedup_over_no_spec": statistics.median(times["no_spec"]) / seconds,
            "acceptance": stats.acceptance_rate,
            "tokens_per_verify": stats.tokens_per_verify,
            "sd_fraction": stats.metrics()["spec/sd_fraction"],
        }
        if not args.do_sample:
            result[name]["identical_rows"] = sum(p == s for p, s in zip(plain, completions)) / len(plain)
    result["elastic"]["steps_by_batch"] = trace.by_batch()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "embedded"), default="tiny")
    parser.add_argument("--batch", type=int, default=32, help="rows in the RL batch (default 32)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 256 (tiny) or 160 (embedded)")
    parser.add_argument("--k", type=int, default=4, help="num_draft_tokens (default 4)")
    parser.add_argument("--drafter-layers", type=int, default=None, help="default 2 (tiny) or 4 (embedded)")
    parser.add_argument("--dampen", type=float, default=0.05, help="tiny: scale of the layers the drafter lacks")
    parser.add_argument("--adapter", type=Path, default=None, help="a distilled LoRA adapter (distill_drafter.py)")
    parser.add_argument("--lora-r", type=int, default=32)
    parser.add_argument("--draft-vocab", type=int, default=0, help="reduced draft vocabulary size (0: full)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parse_with_preset(parser, argv)
    if args.batch < 1 or args.repeats < 1:
        parser.error("--batch and --repeats must be positive")
    embedded = args.model == "embedded"
    args.max_new_tokens = args.max_new_tokens or (160 if embedded else 256)
    args.drafter_layers = args.drafter_layers or (4 if embedded else 2)
    # What the shared setups and runners read: RL samples at temperature 1; the tiny model is run greedy so that its
    # lengths (and so the long tail) are set by the chosen eos, and outputs can be compared row by row.
    args.do_sample, args.temperature, args.task = embedded, 1.0, "arithmetic"
    return args


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    setup = (tiny_setup if args.model == "tiny" else embedded_setup)(args)
    setup.policy.to(args.device)
    setup.drafter.to(args.device)
    if args.model == "tiny":  # choose the eos set that makes this batch's lengths long-tailed
        ids, mask = prompts_on(setup, args.batch, RunOptions.of(args))
        rows, _ = run_plain(setup, ids, mask, RunOptions.of(args), args.max_new_tokens)
        vocab, target = setup.policy.config.vocab_size, max(1, args.max_new_tokens // 16)
        setup.eos_token_id = longtail_eos(rows, args.max_new_tokens, vocab, target, setup.pad_token_id)
        print(f"eos set (median length <= {target} tokens): {setup.eos_token_id}")
    served = AdaptiveDrafter(setup.drafter).serving_model()  # LoRA merged, as the recipe serves it
    engines = {  # no_spec: the engine never drafting (drops finished rows like the others): isolates speculation
        "no_spec": SpeculativeEngine(
            setup.policy, served, SpecConfig(num_draft_tokens=args.k, elastic=False, plain_batch_threshold=1)
        ),
        "fixed_k": SpeculativeEngine(setup.policy, served, SpecConfig(num_draft_tokens=args.k, elastic=False)),
        "elastic": SpeculativeEngine(setup.policy, served, SpecConfig(num_draft_tokens=args.k, elastic=True)),
    }
    if args.draft_vocab:
        coverage = calibrate_draft_vocab(setup, list(engines.values()), RunOptions.of(args), args.draft_vocab)
        print(f"draft vocabulary: {args.draft_vocab} tokens, covering {coverage:.3f} of held-out completion tokens")
    machine = machine_info()
    print(f"machine: {machine['platform']} | torch threads {machine['torch_threads']} | load avg "
          f"{machine.get('load_avg_1min')}")  # fmt: skip
    print(f"model: {setup.description}")
    result = run_all(setup, engines, args)
    pct = result["length_percentiles"]
    print(
        f"batch {args.batch}, completion lengths p50 {pct['p50']} / p90 {pct['p90']} / max {pct['max']} "
        f"(mean {pct['mean']:.1f}), k={args.k}, {'sampling T=1' if args.do_sample else 'greedy'}"
    )
    header = ("decoder", "seconds", "vs plain", "vs no_spec", "accept", "tok/verify", "sd frac", "identical")
    print("".join(f"{h:>11}" for h in header))
    print(f"{'plain':>11}{result['plain']['seconds']:11.2f}{1.0:10.2f}x")
    for name in engines:
        r = result[name]
        identical = f"{r['identical_rows']:.2f}" if "identical_rows" in r else "-"
        print(
            f"{name:>11}{r['seconds']:11.2f}{r['speedup']:10.2f}x{r['speedup_over_no_spec']:10.2f}x"
            f"{r['acceptance']:11.3f}{r['tokens_per_verify']:11.2f}{r['sd_fraction']:11.2f}{identical:>11}"
        )
    print("elastic engine by active batch size (rows still generating): decode steps, share that speculated")
    for bucket in result["elastic"]["steps_by_batch"]:
        rows = f"{bucket['batch_from']}-{bucket['batch_to']}" if bucket["batch_to"] > bucket["batch_from"] else "1"
        print(f"  {rows:>7} rows: {bucket['steps']:4d} steps, {bucket['sd_share']:.2f} speculated")
    if args.plot is not None:
        plot_longtail(result, list(engines), args.plot, f"long-tail batch: {setup.description[:80]}")
        print(f"wrote {args.plot}")
    if args.json is not None:
        write_json(args.json, args, {"machine": machine, "model": setup.description}, result=result)
    return result


if __name__ == "__main__":
    main()
