#!/usr/bin/env python
"""Distil an EAGLE-style head (`adaptive_drafter.eagle`) for the embedded policy from its own rollouts, and measure it
against the truncated drafter with its shipped adapter, side by side on the same held-out prompts and seeds.

    OMP_NUM_THREADS=1 python scripts/distill_eagle.py --collect-minutes 8 --train-minutes 16 \\
        --json docs/results/eagle_distill_embedded_cpu.json --out drafters/smollm2-135m-eagle

Rollouts run in bfloat16 through the speculative engine (drafting with the truncated drafter and its shipped adapter
by default, `--collect-drafter`: lossless, so the data is the policy's either way, and faster to collect), whose
verify pass yields the policy's top-K targets and the outputs of the `--capture-layers` at every position for free
(`engine.collect_features`); arithmetic and reasoning prompts alternate at T = 1. `--cache FILE` keeps the collected
rows (training and held-out) so that every training variant reuses the same data; the head reads the
`--feature-layers` among them (the last layer: EAGLE-1; a low, a middle and the last: EAGLE-3's fused features).
The best recipe measured on this CPU (docs/benchmarks.md, 2026-12-06): `--depth 3 --loss mix --mix fkl=0.5,tv=0.5
--lr 3e-3`; the defaults are the first measurement's. The head trains in float32 (bf16 autocast) with the unrolled loss (`--depth` draft steps fed back) and is
served in bfloat16. Reported: expected acceptance α = Σ min(p, q) per draft depth (teacher-forced, held out), and the
engine's accepted tokens per verify at k = `--k`, T = 1 and greedy, for the head and for the truncated drafter.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import random
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tqdm import tqdm

from adaptive_drafter.sampling import SamplingParams
from adaptive_drafter import SpecConfig, SpeculativeEngine
from adaptive_drafter.config import DrafterConfig
from adaptive_drafter.drafter import build_drafter, load_adapter, merged_copy
from adaptive_drafter.config import DEFAULT_LORA_TARGETS
from adaptive_drafter.eagle import LAYOUTS, EagleHead, eagle_head, layer_ids, save_head
from adaptive_drafter.eagle_distill import acceptance_by_depth, collate_features, eagle_loss
from adaptive_drafter.embedded import load_embedded
from adaptive_drafter.tasks import chat_batch, load_task

MAX_NEW = {"arithmetic": 24, "reasoning": 96}


def prompts(tokenizer, task: str, count: int, seed: int):
    dataset, _ = load_task(task, count, seed=seed)
    return chat_batch(tokenizer, dataset["prompt"])


def rollout(engine, tokenizer, task, count, seed, do_sample=True, topk=32):
    ids, mask = prompts(tokenizer, task, count, seed)
    return engine.generate(
        ids, SamplingParams(do_sample=do_sample), attention_mask=mask, max_new_tokens=MAX_NEW[task],
        eos_token_id=tokenizer.eos_token_id, collect_topk=topk, seed=seed,
    )  # fmt: skip


def draft_vocabulary(rows, size: int, vocab_size: int) -> torch.Tensor:
    """The `size` tokens with the most policy probability over the rows' top-K targets (EAGLE-3 counts the sampled
    tokens; the targets also rank the tokens the policy considers and did not sample)."""
    mass = torch.zeros(vocab_size)
    for row in rows:
        mass.index_add_(0, row.topk_ids.flatten().long(), row.topk_logprobs.flatten().float().exp())
    return mass.topk(size).indices.sort().values


def tokens_per_verify(serving_policy, drafter, tokenizer, k: int, prompt_count: int, do_sample: bool) -> dict:
    """The engine's accepted tokens per verify and acceptance per drafted token on the held-out prompts (both tasks)."""
    engine = SpeculativeEngine(serving_policy, drafter, SpecConfig(num_draft_tokens=k, elastic=False))
    out = {}
    for task in MAX_NEW:
        stats = rollout(engine, tokenizer, task, prompt_count, 900_000 + len(task), do_sample, topk=0).stats
        out[task] = {"tokens_per_verify": stats.tokens_per_verify, "acceptance": stats.acceptance_rate}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--collect-minutes", type=float, default=8.0)
    parser.add_argument("--train-minutes", type=float, default=16.0)
    parser.add_argument("--rollout-batch", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step")
    parser.add_argument("--depth", type=int, default=3, help="draft steps unrolled in training (training-time test)")
    parser.add_argument("--decay", type=float, default=0.8, help="draft step d's loss weighted decay^(d-1)")
    parser.add_argument("--loss", default="fkl", help="fkl, tv, ... or mix (with --mix)")
    parser.add_argument("--mix", default=None, help="mix weights, e.g. fkl=0.5,tv=0.5")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--feature-layers", default="-1", help="policy layers the head reads, e.g. 1,14,-1")
    parser.add_argument(
        "--draft-vocab", type=int, default=0, help="draft over the N most probable tokens of the training rows (0: all)"
    )
    parser.add_argument("--layout", choices=LAYOUTS, default="eagle3",
                        help="eagle: fc over [features, embedding]; eagle3: vLLM's EAGLE-3 checkpoint layout (servable by vLLM)")
    parser.add_argument("--lora-r", type=int, default=0, help="train LoRA of this rank on the layer (0: the whole layer)")
    parser.add_argument("--capture-layers", default="1,14,26,-1", help="policy layers collected (a superset)")
    parser.add_argument("--collect-drafter", choices=("truncated", "eagle"), default="truncated")
    parser.add_argument("--cache", type=Path, default=None, help="collected rows: loaded if present, else saved")
    parser.add_argument("--engine", choices=("both", "head", "none"), default="both", help="engine measurements")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--eval-prompts", type=int, default=24, help="held-out prompts per task")
    parser.add_argument("--adapter", default="drafters/smollm2-135m-arithmetic", help="the truncated drafter's")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="save the head here")
    args = parser.parse_args()
    started = time.time()
    torch.manual_seed(0)
    torch.set_num_threads(1)

    policy, tokenizer = load_embedded()
    policy.requires_grad_(False)
    serving = copy.deepcopy(policy).to(torch.bfloat16).eval()  # rollouts in the precision this CPU is fast at
    ints = lambda text: tuple(int(x) for x in text.split(","))  # noqa: E731
    head_layers = layer_ids(policy, ints(args.feature_layers))

    def truncated_serving():
        truncated = build_drafter(policy, DrafterConfig())
        version = load_adapter(truncated, args.adapter)
        return merged_copy(truncated).to(torch.bfloat16).eval(), version

    if args.cache is not None and args.cache.is_file():
        data = torch.load(args.cache, weights_only=False)
        print(f"loaded {len(data['train'])} + {len(data['held_out'])} rows from {args.cache}")
    else:
        # An eagle head collecting captures the layers it reads (the engine's rule).
        captured = layer_ids(policy, ints(args.capture_layers)) if args.collect_drafter == "truncated" else head_layers
        if not set(head_layers) <= set(captured):
            raise SystemExit(f"--feature-layers {head_layers} must be among --capture-layers {captured}")
        collector = truncated_serving()[0] if args.collect_drafter == "truncated" else EagleHead(serving, head_layers, layout=args.layout)
        engine = SpeculativeEngine(serving, collector, SpecConfig(num_draft_tokens=args.k))
        engine.collect_features, engine.feature_layers = True, captured
        train, tasks, seed = [], list(MAX_NEW), 0
        with tqdm(desc="collect", unit="rows") as bar:
            while time.time() - started < args.collect_minutes * 60:
                out = rollout(engine, tokenizer, tasks[seed % 2], args.rollout_batch, 1000 + seed)
                train += out.targets
                seed += 1
                bar.update(len(out.targets))
        collect_seconds = time.time() - started
        held_out = [
            t for task in tasks for t in rollout(engine, tokenizer, task, args.eval_prompts, 900_000 + len(task)).targets
        ]
        data = {"train": train, "held_out": held_out, "captured": captured,
                "collect_minutes": collect_seconds / 60, "collect_drafter": args.collect_drafter}  # fmt: skip
        if args.cache is not None:
            torch.save(data, args.cache)
    hidden = policy.config.hidden_size
    columns = torch.cat([torch.arange(hidden) + hidden * data["captured"].index(i) for i in head_layers])

    def sliced(rows):
        return [dataclasses.replace(t, features=t.features[:, columns].contiguous()) for t in rows]

    train, held_out = sliced(data["train"]), sliced(data["held_out"])
    tokens = sum(t.num_tokens for t in train)
    draft_ids = draft_vocabulary(train, args.draft_vocab, policy.config.vocab_size) if args.draft_vocab else None
    head = EagleHead(policy, head_layers, draft_ids, args.layout)  # trains in float32
    if args.lora_r:  # as the online kind trains it (drafter.build_drafter): LoRA on the layer, fc trained whole
        lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=list(DEFAULT_LORA_TARGETS),
                          modules_to_save=["fc"])  # fmt: skip
        wrapped = get_peft_model(head, lora)
        head = eagle_head(wrapped)  # the head with the LoRA layers injected: what the loss and α read
    serving_head = EagleHead(serving, head_layers, draft_ids, args.layout)
    coverage = None
    if draft_ids is not None:
        inside = torch.zeros(policy.config.vocab_size, dtype=torch.bool)
        inside[draft_ids] = True
        coverage = float(inside[torch.cat([torch.as_tensor(t.completion_ids) for t in held_out])].float().mean())
        print(f"draft vocabulary: {len(draft_ids)} tokens, {coverage:.3f} of the held-out completion tokens")
    mix = {k: float(v) for k, v in (kv.split("=") for kv in args.mix.split(","))} if args.mix else None

    def alpha() -> list[float]:
        return acceptance_by_depth(head, held_out, depth=args.k, pad_id=tokenizer.pad_token_id)

    curve = [{"minutes": 0.0, "steps": 0, "alpha": alpha()}]
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    rng, steps, train_seconds, losses = random.Random(0), 0, 0.0, []
    budget = args.train_minutes * 60
    with tqdm(total=round(budget), desc="train", unit="s") as bar:
        while train_seconds < budget:
            step_start = time.time()
            warmup, progress = min(1.0, (steps + 1) / 30), min(train_seconds / budget, 1.0)
            for group in optimizer.param_groups:
                group["lr"] = args.lr * warmup * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
            batch, features = collate_features(rng.sample(train, args.batch_size), tokenizer.pad_token_id)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, _, _ = eagle_loss(head, batch, features, args.depth, args.decay, args.loss, mix)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            optimizer.step()
            steps += 1
            losses.append(float(loss))
            elapsed = time.time() - step_start
            train_seconds += elapsed
            bar.update(round(elapsed))
            if steps % 100 == 0:
                curve.append({"minutes": train_seconds / 60, "steps": steps, "alpha": alpha(), "loss": losses[-1]})
                bar.set_postfix(alpha1=f"{curve[-1]['alpha'][0]:.3f}")
    curve.append({"minutes": train_seconds / 60, "steps": steps, "alpha": alpha(), "loss": sum(losses[-50:]) / 50})

    if args.lora_r:
        head = wrapped.merge_and_unload()
    serving_head.load_state_dict({n: t if n == "draft_ids" else t.to(torch.bfloat16) for n, t in head.state_dict().items()})
    drafters = [("eagle", serving_head)] if args.engine != "none" else []
    version = None
    if args.engine == "both":
        truncated, version = truncated_serving()
        drafters.append(("truncated", truncated))
    measured = {
        name: {
            "T=1": tokens_per_verify(serving, drafter, tokenizer, args.k, args.eval_prompts, True),
            "greedy": tokens_per_verify(serving, drafter, tokenizer, args.k, args.eval_prompts, False),
        }
        for name, drafter in drafters
    }
    result = {
        "command": "python scripts/distill_eagle.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "data": {"train_rows": len(train), "train_completion_tokens": tokens, "collect_minutes": data["collect_minutes"],
                 "held_out_rows": len(held_out), "collect_drafter": data["collect_drafter"], "cache": str(args.cache),
                 "draft_vocab": args.draft_vocab, "held_out_tokens_in_draft_vocab": coverage},
        "training": {"steps": steps, "minutes": train_seconds / 60, "depth": args.depth, "decay": args.decay,
                     "loss": args.loss, "mix": mix, "lr": args.lr, "feature_layers": list(head_layers),
                     "lora_r": args.lora_r},
        "alpha_by_depth_held_out": curve[-1]["alpha"],
        "curve": curve,
        "engine": measured,
        "truncated_adapter_version": str(version),
        "wall_minutes": (time.time() - started) / 60,
    }  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}, indent=1))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    if args.out is not None:
        save_head(head.to(torch.bfloat16), args.out, policy="SmolLM2-135M-Instruct (embedded)", made_by=result["command"],
                  date=result["date"], alpha_by_depth_held_out=result["alpha_by_depth_held_out"])  # fmt: skip
        (args.out / "distill_curve.json").write_text(json.dumps(curve, indent=1))


if __name__ == "__main__":
    main()
