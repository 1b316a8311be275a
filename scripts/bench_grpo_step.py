#!/usr/bin/env python
"""End-to-end GRPO step time: the recipe with plain rollouts (TRL's own `generate`) vs speculative rollouts with the
adaptive drafter, and optionally the vLLM backends, same config, seed and steps.

Each mode runs `recipes/grpo_spec.py` in its own subprocess, one after the other (never side by side: they would share
the cores), with `OMP_NUM_THREADS` set. A GRPO step's time is TRL's `step_time` metric (the whole `training_step`:
generation, reward scoring, the loss and its backward pass), read from the `trainer_state.json` the recipe saves. The
speculative mode also pays for its background distillation thread, which shares the cores with the rollouts: that is
part of its real cost. With sampling, the two modes draw different (equally distributed) completions, so the mean
completion length is printed beside each: a step's time follows it.

Flags other than this script's own go to the recipe, for both modes, after the defaults `--max_steps 4 --report_to
none --save_strategy no` (so flags given here override them):

    python scripts/bench_grpo_step.py --json docs/results/grpo_step_embedded_cpu.json    # the embedded default
    python scripts/bench_grpo_step.py --max_steps 8 --num_draft_tokens 6
    OMP_NUM_THREADS=1 .venv-vllm/bin/python scripts/bench_grpo_step.py --modes plain,speculative,vllm,trl_vllm \
        --json docs/results/grpo_step_backends_cpu.json                               # the rollout backends (issue 12)

Modes (`--modes`, ratios are to the first): `plain` TRL's own `generate`; `speculative` our engine with the adaptive
drafter; `vllm` our vLLM backend without speculation; `vllm_draft` our vLLM backend serving the adaptive drafter
(the YAML's EAGLE head, vLLM's eagle3 method; for `--drafter_kind truncated` the truncated drafter needs vLLM's
draft_model method, which this mode does not set: run the recipe directly);
`trl_vllm` TRL's own `use_vllm` colocate path; `speculative_fp32` our engine with rollouts in float32 (the `speculative`
mode runs them in `rollout_dtype: auto`: bfloat16 where the hardware is fast at it). The vLLM modes need the interpreter of `make vllm-env`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "grpo_spec.py"
DEFAULT_RECIPE_FLAGS = ["--max_steps", "4", "--report_to", "none", "--save_strategy", "no"]
SHOWN = ("spec/acceptance_rate", "spec/tokens_per_verify", "spec/sd_fraction", "drafter/version")  # printed
MODES = {  # mode -> the recipe's flags
    "plain": ["--speculative", "false"],
    "speculative": ["--speculative", "true"],
    "speculative_fp32": ["--speculative", "true", "--rollout_dtype", "float32"],  # rollouts in the training precision
    "vllm": ["--rollout_backend", "vllm", "--vllm_speculation", "none"],
    "vllm_draft": ["--rollout_backend", "vllm", "--vllm_speculation", "eagle3"],  # the YAML's drafter: the EAGLE head
    "trl_vllm": ["--speculative", "false", "--use_vllm", "true", "--vllm_mode", "colocate"],
}


def run_recipe(mode: str, recipe_flags: list[str], out_dir: Path, threads: int) -> dict[str, Any]:
    """Run the recipe in one mode in a subprocess; return its per-step times and logged metrics."""
    run_dir = out_dir / mode
    command = [sys.executable, str(RECIPE), *DEFAULT_RECIPE_FLAGS, *recipe_flags]
    command += [*MODES[mode], "--output_dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TRL_EXPERIMENTAL_SILENCE": "1"}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"the recipe failed in mode {mode} (exit {done.returncode}):\n{done.stderr[-3000:]}")
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    return summarize(mode, history, wall)


def summarize(mode: str, history: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """Per-step times (TRL's `step_time`), their mean with and without the first (warm-up) step, completion lengths
    and the speculative counters the rollout logged."""
    steps = [entry for entry in history if "step_time" in entry]
    times = [entry["step_time"] for entry in steps]
    if not times:
        raise RuntimeError(f"mode {mode}: no step_time in the trainer's log history (is logging_steps 1?)")
    lengths = [entry["completions/mean_length"] for entry in steps if "completions/mean_length" in entry]
    spec_keys = sorted({key for entry in steps for key in entry if key.startswith(("spec/", "drafter/"))})
    return dict(
        mode=mode,
        step_times=times,
        mean_step_s=statistics.mean(times),
        mean_step_s_after_first=statistics.mean(times[1:]) if len(times) > 1 else times[0],
        mean_completion_length=statistics.mean(lengths) if lengths else None,
        wall_s=wall,
        spec={key: mean_of(e.get(key) for e in steps) for key in spec_keys},
    )


def mean_of(values: Any) -> float | None:
    """Mean of the finite numbers among `values` (a metric is missing or NaN at steps where it was not measured)."""
    numbers = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.mean(numbers) if numbers else None


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """This script's own flags, and the rest (the recipe's)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)),
                        help="OMP_NUM_THREADS of each run (default: this process's, else all cores)")  # fmt: skip
    parser.add_argument("--out-dir", type=Path, default=None, help="where the runs write (default: a temporary dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the runs' times and the ratios here")
    parser.add_argument("--modes", default="plain,speculative", help=f"comma-separated, of {', '.join(MODES)}")
    args, recipe_flags = parser.parse_known_args(argv)
    if args.threads < 1:
        parser.error("--threads must be positive")
    args.modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = [mode for mode in args.modes if mode not in MODES]
    if unknown or len(args.modes) < 2:
        parser.error(f"--modes takes two or more of {', '.join(MODES)}; got {args.modes}")
    return args, recipe_flags


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, recipe_flags = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        out_dir = args.out_dir or Path(scratch)
        runs, failed = {}, {}
        for mode in args.modes:
            try:
                runs[mode] = run_recipe(mode, recipe_flags, out_dir, args.threads)
            except RuntimeError as exc:  # one backend failing must not lose the others' measurements
                if mode == args.modes[0]:
                    raise
                failed[mode] = str(exc)[-2000:]
                print(f"mode {mode} failed; recorded, the others go on:\n{failed[mode]}")
    base = runs[args.modes[0]]
    ratios = {
        mode: {
            "speedup": base["mean_step_s"] / run["mean_step_s"],
            "speedup_after_first": base["mean_step_s_after_first"] / run["mean_step_s_after_first"],
        }
        for mode, run in runs.items()
    }
    result = dict(runs=runs, baseline=args.modes[0], ratios=ratios, failed=failed)
    if "plain" in runs and "speculative" in runs:  # the figures docs/benchmarks.md has always quoted
        result["speedup"] = runs["plain"]["mean_step_s"] / runs["speculative"]["mean_step_s"]
        result["speedup_after_first"] = (
            runs["plain"]["mean_step_s_after_first"] / runs["speculative"]["mean_step_s_after_first"]
        )
    print(f"recipe flags: {' '.join(DEFAULT_RECIPE_FLAGS + recipe_flags)} | OMP_NUM_THREADS={args.threads}")
    print(f"{'mode':12}{'mean step s':>12}{'w/o step 1':>12}{'x ' + args.modes[0]:>14}{'completion len':>16}"
          f"{'wall s':>9}  step times")  # fmt: skip
    for mode, run in runs.items():
        length = f"{run['mean_completion_length']:.1f}" if run["mean_completion_length"] is not None else "-"
        print(f"{mode:12}{run['mean_step_s']:12.2f}{run['mean_step_s_after_first']:12.2f}"
              f"{ratios[mode]['speedup_after_first']:14.2f}{length:>16}{run['wall_s']:9.1f}  "
              f"{', '.join(f'{t:.2f}' for t in run['step_times'])}")  # fmt: skip
    print(f"x {args.modes[0]}: its mean step time (without the first) over the mode's")
    for mode, run in runs.items():
        if run["spec"]:
            print(f"{mode} run, mean of logged metrics: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in run["spec"].items() if k in SHOWN and v is not None))  # fmt: skip
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(
            date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            command=" ".join(sys.argv),
            recipe_flags=DEFAULT_RECIPE_FLAGS + recipe_flags,
            omp_num_threads=args.threads,
            machine=machine(),
        )
        args.json.write_text(json.dumps(dict(meta=meta, **result), indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


def machine() -> dict[str, Any]:
    """The benchmarks' machine description (imported lazily: it imports torch, which this parent does not need)."""
    from adaptive_drafter.metrics import machine_info

    return machine_info()


if __name__ == "__main__":
    main()
