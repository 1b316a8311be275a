#!/usr/bin/env python
"""How far the logprobs of bfloat16 rollouts are from the float32 training forward's, on the embedded policy.

    OMP_NUM_THREADS=1 python scripts/bench_logprob_gap.py --json docs/results/logprob_gap_embedded_cpu.json

Samples GRPO-shaped rollouts (the recipe's arithmetic prompts, 4 per prompt, T = 1) with the speculative engine on the
bfloat16 rollout copy of SmolLM2-135M-Instruct (`adaptive_drafter.precision`), then recomputes every completion token's
logprob with the float32 policy in one full forward, as TRL's trainer does. Reports, per token, Δ = logprob(bf16
rollout) − logprob(fp32 forward): its mean (a systematic shift), mean |Δ| and largest |Δ|, the k3 estimate of
KL(π_bf16 ‖ π_fp32) on the sampled tokens, and per sequence the importance ratio exp(−Σ Δ) an importance-sampling
correction would apply (its spread: how off-policy bf16 sampling is for the fp32 loss).
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from adaptive_drafter.sampling import SamplingParams
from adaptive_drafter import SpecConfig, SpeculativeEngine
from adaptive_drafter.experiments.bench import SetupOptions, embedded_setup, grouped
from adaptive_drafter.experiments.cli import machine_line, write_json
from adaptive_drafter.metrics import machine_info
from adaptive_drafter.precision import RolloutCopy, resolve_rollout_dtype


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16, help="distinct prompts (each sampled --group times)")
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--adapter", type=Path, default=Path("drafters/smollm2-135m-arithmetic"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = machine_info()
    print(machine_line(machine))
    setup = grouped(embedded_setup(SetupOptions(drafter_layers=4, task="arithmetic", adapter=args.adapter)), args.group)
    precision = resolve_rollout_dtype("bfloat16", setup.policy)
    policy = RolloutCopy.build(setup.policy, precision).model
    drafter = RolloutCopy.build(setup.drafter, precision).model
    engine = SpeculativeEngine(policy, drafter, SpecConfig(num_draft_tokens=4))
    ids, mask = setup.make_prompts(args.prompts * args.group, args.seed)
    out = engine.generate(ids, SamplingParams(temperature=args.temperature), attention_mask=mask,
                          max_new_tokens=args.max_new_tokens, eos_token_id=setup.eos_token_id, seed=args.seed)  # fmt: skip
    deltas, log_ratios = [], []
    for row, (completion, logprobs) in enumerate(zip(out.completion_ids, out.logprobs)):
        prompt = ids[row][mask[row].bool()].tolist()
        logits = setup.policy(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
        fp32 = (logits.float() / args.temperature).log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])
        delta = torch.tensor(logprobs, dtype=torch.float64) - fp32.squeeze(-1).double()
        deltas.append(delta)
        log_ratios.append(float(-delta.sum()))  # log π_fp32(seq) / π_bf16(seq): the IS weight's log
    delta = torch.cat(deltas)
    ratios = [math.exp(r) for r in log_ratios]
    k3 = float((torch.expm1(-delta) + delta).mean())  # E_bf16[(r − 1) − log r], r = π_fp32 / π_bf16
    result = {
        "tokens": len(delta),
        "sequences": len(deltas),
        "mean_delta": float(delta.mean()),
        "mean_abs_delta": float(delta.abs().mean()),
        "max_abs_delta": float(delta.abs().max()),
        "kl_k3_per_token": k3,
        "is_ratio_median": statistics.median(ratios),
        "is_ratio_min": min(ratios),
        "is_ratio_max": max(ratios),
        "acceptance_rate": out.stats.acceptance_rate,
    }
    print(f"{result['tokens']} tokens in {result['sequences']} sequences (bf16 rollouts, T = {args.temperature}):")
    print(f"  per token Δ = logprob(bf16) − logprob(fp32): mean {result['mean_delta']:+.5f}, mean |Δ| "
          f"{result['mean_abs_delta']:.5f}, max |Δ| {result['max_abs_delta']:.4f}; KL(bf16 ‖ fp32) ≈ {k3:.2e} nats/token")
    print(f"  per sequence IS ratio π_fp32 / π_bf16: median {result['is_ratio_median']:.4f}, range "
          f"{result['is_ratio_min']:.4f} – {result['is_ratio_max']:.4f}")  # fmt: skip
    if args.json is not None:
        write_json(args.json, args, {"machine": machine, "model": setup.description}, result=result)
    return result


if __name__ == "__main__":
    main()
