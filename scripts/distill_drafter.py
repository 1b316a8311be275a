#!/usr/bin/env python
"""Offline warm start of a drafter adapter: distill the policy into a fresh LoRA drafter before RL begins.

A fresh truncated self-draft agrees with its policy only a few percent of the time. This script samples completions
from the policy with the speculative engine (whose verify pass yields the policy's top-K targets for free), trains the
drafter's LoRA weights on them in rounds (rollout batch, then `--steps-per-round` optimizer steps), saves the adapter
with its version, and prints the acceptance on held-out prompts before and after.

    python scripts/distill_drafter.py --model tiny --rounds 20                     # seconds, tiny random models
    python scripts/distill_drafter.py --model embedded --rounds 40 --out outputs/drafter_warm_start

`--model embedded` uses SmolLM2-135M-Instruct on an embedded task (`--task`, `adaptive_drafter.tasks`), drafted by its first
`--drafter-layers` layers. Training runs synchronously between rollouts here (no background thread), so the timings
are those of distillation alone.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from adaptive_drafter.sampling import SamplingParams
from adaptive_drafter import SpecConfig, SpeculativeEngine, SpecStats
from adaptive_drafter.adaptive import AdaptiveDrafter
from adaptive_drafter.config import DistillConfig, DrafterConfig
from adaptive_drafter.drafter import AdapterVersion, build_drafter, save_adapter
from adaptive_drafter.testing import left_padded_prompts, tiny_causal_lm
from adaptive_drafter.plots import plot_distill_curve
from adaptive_drafter.trainer import DrafterTrainer


@dataclass
class Task:
    """A policy and a source of prompt batches: `prompts(batch, seed) -> (input_ids, attention_mask)`."""

    policy: Any
    prompts: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
    eos_token_id: int | None
    description: str


def tiny_task(args: argparse.Namespace) -> Task:
    policy = tiny_causal_lm("llama", vocab_size=512, hidden_size=128, num_layers=6, logit_scale=4.0, seed=args.seed)

    def prompts(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return left_padded_prompts(batch, 4, 16, 512, seed=seed)

    return Task(policy, prompts, None, "tiny random Llama (6 layers, hidden 128, vocab 512), random prompts")


def embedded_task(args: argparse.Namespace) -> Task:
    from adaptive_drafter.embedded import EMBEDDED_MODEL_NAME, load_embedded
    from adaptive_drafter.tasks import chat_batch, load_task

    policy, tokenizer = load_embedded()
    policy.to(args.device)

    def prompts(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return chat_batch(tokenizer, load_task(args.task, batch, seed=seed)[0]["prompt"], args.device)

    return Task(policy, prompts, tokenizer.eos_token_id, f"{EMBEDDED_MODEL_NAME} on the {args.task} task")


Served = tuple[AdaptiveDrafter, SpeculativeEngine]  # a drafter and the engine it drafts for


def rollout(served: Served, task: Task, args: argparse.Namespace, seed: int, do_sample: bool = True) -> SpecStats:
    """One batch of completions (sampled, or greedy) from prompts drawn with `seed`; returns its statistics."""
    ids, mask = task.prompts(args.batch_size, seed)
    adaptive, engine = served
    out = adaptive.generate(
        engine, ids, SamplingParams(do_sample=do_sample, temperature=args.temperature), attention_mask=mask,
        max_new_tokens=args.max_new_tokens, eos_token_id=task.eos_token_id, seed=seed,
    )  # fmt: skip
    return out.stats


def held_out_stats(served: Served, task: Task, args: argparse.Namespace, do_sample: bool = True) -> SpecStats:
    """Acceptance of the drafter on held-out prompts (seeds disjoint from the training prompts')."""
    return sum((rollout(served, task, args, 10_000 + i, do_sample) for i in range(args.eval_batches)), SpecStats())


def evaluate(evaluator: Served, task: Task, args: argparse.Namespace) -> dict[str, float]:
    """Held-out acceptance, sampled at --temperature and (with --eval-greedy) greedy: one point of the curve."""
    point = {"acceptance": held_out_stats(evaluator, task, args).acceptance_rate}
    if args.eval_greedy:
        point["greedy_acceptance"] = held_out_stats(evaluator, task, args, do_sample=False).acceptance_rate
    return point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("tiny", "embedded"), default="tiny")
    p.add_argument("--task", choices=("arithmetic", "reasoning"), default="arithmetic", help="embedded model's prompts")
    p.add_argument("--drafter-layers", type=int, default=None, help="truncated drafter depth (2 tiny, 4 embedded)")
    p.add_argument("--lora-r", type=int, default=32)
    p.add_argument("--rounds", type=int, default=20, help="rollout batches to distill from")
    p.add_argument("--steps-per-round", type=int, default=8, help="optimizer steps after each rollout batch")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per rollout batch")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--k", type=int, default=4, help="num_draft_tokens")
    p.add_argument(
        "--elastic", action="store_true", help="training rollouts decode plainly where speculation does not pay yet"
    )
    p.add_argument("--loss", default="fkl", choices=("fkl", "rkl", "tv", "jsd"))
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--eval-batches", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every N rounds: the learning curve")
    p.add_argument("--eval-greedy", action="store_true", help="also measure greedy acceptance at each evaluation")
    p.add_argument("--json", type=Path, default=None, help="write the curve and settings to this JSON file")
    p.add_argument("--plot", type=Path, default=None, help="plot the curve (with --eval-every) to this PNG")
    p.add_argument("--replot", type=Path, default=None, help="only plot the curve of this --json file to --plot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("outputs/drafter_warm_start"))
    args = p.parse_args(argv)
    if args.drafter_layers is None:
        args.drafter_layers = 2 if args.model == "tiny" else 4
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.replot is not None:
        result = json.loads(args.replot.read_text())
        plot_distill_curve(result, args.plot or args.replot.with_suffix(".png"))
        return result
    torch.manual_seed(args.seed)
    task = (tiny_task if args.model == "tiny" else embedded_task)(args)
    drafter = build_drafter(
        task.policy,
        DrafterConfig(
            drafter_num_layers=args.drafter_layers, drafter_lora_r=args.lora_r, drafter_lora_alpha=2 * args.lora_r
        ),
    )
    config = DistillConfig(
        distill_loss=args.loss,
        distill_learning_rate=args.lr,
        distill_topk=args.topk,
        distill_batch_size=args.batch_size,
        distill_min_buffer_tokens=1,
        distill_publish_every=args.steps_per_round,
        distill_swap_gate=False,  # offline: every round's weights are published; held-out prompts measure them
    )
    trainer = DrafterTrainer(drafter, config)
    spec = SpecConfig(num_draft_tokens=args.k, elastic=False)
    # Targets come from plain steps as well as verifies, so elastic training rollouts lose nothing but time.
    adaptive = AdaptiveDrafter(drafter, trainer=trainer)
    training = SpecConfig(num_draft_tokens=args.k, elastic=args.elastic)
    engine = (adaptive, SpeculativeEngine(task.policy, drafter, training))
    # The same serving drafter, frozen: it feeds no buffer.
    evaluator = (AdaptiveDrafter(drafter), SpeculativeEngine(task.policy, drafter, spec))
    print(f"policy: {task.description}; drafter: first {args.drafter_layers} layers + LoRA r={args.lora_r}")

    before = held_out_stats(evaluator, task, args)
    curve = [{"round": 0, "minutes": 0.0, **evaluate(evaluator, task, args)}] if args.eval_every else []
    start, eval_seconds = time.perf_counter(), 0.0
    for round_ in tqdm(range(args.rounds), desc="distilling"):
        rollout(engine, task, args, round_)
        for _ in range(args.steps_per_round):
            trainer.step()
        if args.eval_every and (round_ + 1) % args.eval_every == 0:
            adaptive.swap()
            evaluated = time.perf_counter()
            training_minutes = (evaluated - start - eval_seconds) / 60  # evaluation time is not training time
            curve.append({"round": round_ + 1, "minutes": training_minutes, **evaluate(evaluator, task, args)})
            eval_seconds += time.perf_counter() - evaluated
            tqdm.write(f"round {round_ + 1}: {curve[-1]}")
    adaptive.swap()
    minutes = (time.perf_counter() - start - eval_seconds) / 60
    after = held_out_stats(evaluator, task, args)

    path = save_adapter(drafter, args.out, AdapterVersion(trainer.adapter_version, policy_version=0))
    print(f"{'':12}{'acceptance':>12}{'accepted len':>14}{'tokens/verify':>15}")
    for name, stats in (("before", before), ("after", after)):
        print(f"{name:12}{stats.acceptance_rate:12.3f}{stats.mean_accepted_len:14.2f}{stats.tokens_per_verify:15.2f}")
    print(
        f"{trainer.steps} optimizer steps on {args.rounds} rollout batches in {minutes:.1f} min "
        f"(rollouts included); last loss {trainer.last_loss:.3f}; adapter v{trainer.adapter_version} saved to {path}"
    )
    result = {"before": before.acceptance_rate, "after": after.acceptance_rate, "minutes": minutes, "curve": curve}
    result["policy"] = task.description
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"settings": settings, **result}, indent=2) + "\n")
    if args.plot is not None and curve:
        plot_distill_curve(result, args.plot)
    return result


if __name__ == "__main__":
    main()
