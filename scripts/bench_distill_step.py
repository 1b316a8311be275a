#!/usr/bin/env python
"""Seconds per distillation step of the background trainer, with the drafter's LM head run only at the positions that
have a target (the default) vs over every position (prompts included), interleaved in one process.

The buffer holds synthetic rows shaped like the GRPO recipe's: `--prompt-tokens` prompt tokens, `--completion-tokens`
completion tokens with top-`--topk` targets. The loss is the same either way (tested); only the cost differs.

    python scripts/bench_distill_step.py                       # tiny model
    python scripts/bench_distill_step.py --model embedded      # SmolLM2-135M, 4-layer self-draft, vocab 49152
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from adaptive_drafter.config import DistillConfig, DrafterConfig
from adaptive_drafter.targets import PolicyTargets
from adaptive_drafter.drafter import build_drafter
from adaptive_drafter.testing import tiny_causal_lm
from adaptive_drafter.trainer import DrafterTrainer


def synthetic_row(vocab: int, prompt: int, completion: int, topk: int, gen: torch.Generator) -> PolicyTargets:
    return PolicyTargets(
        prompt_ids=torch.randint(3, vocab, (prompt,), generator=gen).tolist(),
        completion_ids=torch.randint(3, vocab, (completion,), generator=gen).tolist(),
        topk_ids=torch.randint(0, vocab, (completion, topk), generator=gen),
        topk_logprobs=torch.log_softmax(torch.randn(completion, topk, generator=gen), -1).half(),
        drafted=torch.ones(completion, dtype=torch.bool),
        accepted=torch.zeros(completion, dtype=torch.bool),
        policy_version=0,
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "embedded"), default="tiny")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=45)
    parser.add_argument("--completion-tokens", type=int, default=24)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.model == "embedded":
        from adaptive_drafter.embedded import load_embedded

        policy, _ = load_embedded()
        layers = 4
    else:
        policy, layers = tiny_causal_lm("llama", vocab_size=4096, hidden_size=64, num_layers=4), 2
    drafter = build_drafter(policy, DrafterConfig(drafter_num_layers=layers))
    trainer = DrafterTrainer(drafter, DistillConfig(distill_batch_size=args.batch_size, distill_min_buffer_tokens=1))
    gen = torch.Generator().manual_seed(0)
    vocab = policy.config.vocab_size
    for _ in range(4 * args.batch_size):
        trainer.buffer.add(synthetic_row(vocab, args.prompt_tokens, args.completion_tokens, args.topk, gen))
    assert trainer._head_at_targets, "this drafter's logits are not its head over its decoder: nothing to compare"
    times: dict[bool, list[float]] = {True: [], False: []}
    trainer.step()  # warm-up
    for _ in range(args.repeats):
        for at_targets in (True, False):
            trainer._head_at_targets = at_targets
            start = time.perf_counter()
            trainer.step()
            times[at_targets].append(time.perf_counter() - start)
    fast, full = statistics.median(times[True]), statistics.median(times[False])
    print(
        f"{args.model}: vocab {vocab}, batch {args.batch_size} x ({args.prompt_tokens} prompt + "
        f"{args.completion_tokens} completion) tokens, torch threads {torch.get_num_threads()}: head at targets "
        f"{fast:.3f} s/step, head everywhere {full:.3f} s/step: {full / fast:.2f}x faster"
    )
    return {"at_targets_s": fast, "everywhere_s": full}


if __name__ == "__main__":
    main()
