#!/usr/bin/env python
"""Completion lengths of a workload: plain `policy.generate` samples (no speculation), tokens up to the first eos.

    OMP_NUM_THREADS=1 python scripts/bench_lengths.py --model embedded --task reasoning --prompts 16 --samples 4 \\
        --max-new-tokens 384 --threads 1 --json docs/results/reasoning_lengths_cpu.json

`--prompts` prompts (the benchmarks' held-out seeds, `adaptive_drafter.experiments.bench.embedded_setup`), each sampled
`--samples` times at `--temperature` (default 1, top-k/top-p off, as RL samples; `--greedy` for argmax), `--chunk`
rows per `generate` call. Prints and records median, p90, mean, max and the shares of rows >= 64, >= 256 tokens and
at the `--max-new-tokens` cap (rows without an eos count as the cap). `--model tiny` (a random model: no meaningful
eos) only checks the plumbing.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from adaptive_drafter.experiments.bench import RunOptions, embedded_setup, grouped, tiny_setup
from adaptive_drafter.experiments.cli import machine_line, parse_with_preset, write_json
from adaptive_drafter.experiments.lengths import lengths_summary, sample_completions
from adaptive_drafter.metrics import machine_info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "embedded"), default="embedded")
    parser.add_argument("--task", choices=("questions", "arithmetic", "reasoning"), default="reasoning")
    parser.add_argument("--prompts", type=int, default=16, help="distinct prompts (default 16)")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=384, help="length cap (default 384)")
    parser.add_argument("--chunk", type=int, default=16, help="rows per generate call (default 16)")
    parser.add_argument("--greedy", dest="do_sample", action="store_false", help="argmax instead of sampling")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="write the summary and lengths here")
    args = parse_with_preset(parser, argv)
    if min(args.prompts, args.samples, args.max_new_tokens, args.chunk) < 1:
        parser.error("--prompts, --samples, --max-new-tokens and --chunk must be positive")
    return args


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    machine = machine_info()
    print(machine_line(machine))
    torch.manual_seed(args.seed)
    options = {"drafter_layers": 2 if args.model == "tiny" else 4, "dampen": 0.05, "adapter": None, "lora_r": 32}
    base = (tiny_setup if args.model == "tiny" else embedded_setup)(argparse.Namespace(**vars(args), **options))
    setup = grouped(base, args.samples)
    run = RunOptions(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                     seed=args.seed)  # fmt: skip
    rows, seconds = sample_completions(setup, args.prompts * args.samples, run, args.max_new_tokens, args.chunk)
    summary = lengths_summary(rows, setup.eos_token_id, args.max_new_tokens)
    mode = f"T = {args.temperature}" if args.do_sample else "greedy"
    print(f"{setup.description}; {mode}; {seconds:.0f} s")
    print(
        f"{summary['rows']} completions ({args.prompts} prompts x {args.samples}): median {summary['median']:g}, "
        f"p90 {summary['p90']}, mean {summary['mean']:.1f}, max {summary['max']} tokens; >= 64: "
        f"{summary['share_ge_64']:.2f}, >= 256: {summary['share_ge_256']:.2f}, at the {args.max_new_tokens} cap: "
        f"{summary['share_at_cap']:.2f}"
    )
    result = {"summary": summary, "seconds": seconds}
    if args.json is not None:
        write_json(args.json, args, {"machine": machine, "model": setup.description}, **result)
    return result


if __name__ == "__main__":
    main()
