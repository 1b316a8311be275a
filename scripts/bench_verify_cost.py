#!/usr/bin/env python
"""The verify cost v_k inside the engine, per precision and batch size: how many plain decode steps verifying k drafts
(a (k+1)-token policy forward, with the engine's acceptance and cache bookkeeping) costs, as the elastic controller
measures it, for the policy in float32 and in its bfloat16 rollout copy, side by side in one process.

    OMP_NUM_THREADS=1 python scripts/bench_verify_cost.py --json docs/results/verify_cost_embedded_cpu.json

Each (precision, batch) runs the engine with a forced schedule that alternates a plain step and a speculative step of k
drafts, on the embedded SmolLM2-135M-Instruct and the recipe's arithmetic prompts (rows never stop early), drafted by
its untrained first 4 layers in the same precision (acceptance does not matter here). The engine's own timings of each
step (what it feeds the elastic controller) are recorded; v_k = median verify seconds / median plain-step seconds, over
the steps at the full batch, after one untimed warm-up rollout.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch

from adaptive_drafter.sampling import SamplingParams
from adaptive_drafter import SpecConfig, SpeculativeEngine
from adaptive_drafter.experiments.bench import SetupOptions, embedded_setup
from adaptive_drafter.experiments.cli import machine_line, write_json
from adaptive_drafter.metrics import machine_info
from adaptive_drafter.precision import RolloutCopy, resolve_rollout_dtype


def force_schedule(engine: SpeculativeEngine, k: int, record: dict[str, list[float]]) -> None:
    """Make the engine's controller alternate plain and k-draft steps, and keep every cost the engine reports to it."""
    controller = engine.controller
    plain, costs = controller.observe_plain, controller.observe_costs

    def choose(batch: int, limit: int) -> int:
        controller.steps += 1
        return min(k, limit) if controller.steps % 2 == 0 else 0

    def observe_plain(batch: int, seconds: float) -> None:
        record.setdefault(f"plain@{batch}", []).append(seconds)
        plain(batch, seconds)

    def observe_costs(batch: int, k_: int, draft: float | None, width: int, verify: float) -> None:
        record.setdefault(f"verify{width}@{batch}", []).append(verify)
        costs(batch, k_, draft, width, verify)

    controller.choose, controller.observe_plain, controller.observe_costs = choose, observe_plain, observe_costs


@torch.no_grad()
def measure(policy: Any, drafter: Any, ids: torch.Tensor, mask: torch.Tensor, k: int, tokens: int, pad: int) -> float:
    """v_k inside the engine at this batch: median verify seconds over median plain seconds (full batch only)."""
    batch = ids.shape[0]
    record: dict[str, list[float]] = {}
    engine = SpeculativeEngine(policy, drafter, SpecConfig(num_draft_tokens=k, elastic=True))
    force_schedule(engine, k, record)
    generate = dict(max_new_tokens=tokens)
    engine.generate(ids, SamplingParams(do_sample=False), attention_mask=mask, **generate)  # warm-up
    record.clear()
    engine.generate(ids, SamplingParams(do_sample=False), attention_mask=mask, **generate)
    engine.generate(ids, SamplingParams(do_sample=False), attention_mask=mask, **generate)
    plain = statistics.median(record[f"plain@{batch}"])
    return statistics.median(record[f"verify{k}@{batch}"]) / plain, plain


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--ks", default="1,2,4,8", help="draft lengths k (the verify reads k + 1 tokens)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = machine_info()
    print(machine_line(machine))
    setup = embedded_setup(SetupOptions(drafter_layers=4, task="arithmetic"))
    batches = [int(b) for b in args.batch_sizes.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    rows = []
    for setting in ("float32", "bfloat16"):
        precision = resolve_rollout_dtype(setting, setup.policy)
        policy = RolloutCopy.build(setup.policy, precision).model
        drafter = RolloutCopy.build(setup.drafter, precision).model
        for batch in batches:
            ids, mask = setup.make_prompts(batch, 0)
            row = {"dtype": precision.name, "batch": batch, "v": {}}
            for k in ks:
                pad = setup.pad_token_id
                row["v"][k], row["plain_ms"] = measure(policy, drafter, ids, mask, k, args.max_new_tokens, pad)
            row["plain_ms"] *= 1000
            rows.append(row)
            cells = "  ".join(f"v_{k}={row['v'][k]:.2f}" for k in ks)
            print(f"{precision.name:>9} batch {batch:>3}: plain step {row['plain_ms']:.1f} ms  {cells}", flush=True)
    if args.json is not None:
        write_json(args.json, args, {"machine": machine, "model": setup.description}, rows=rows)
    return {"rows": rows}


if __name__ == "__main__":
    main()
