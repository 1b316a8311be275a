#!/usr/bin/env python
"""Rollout throughput side by side on identical prompts: Hugging Face `generate`, our engine (plain and elastic), vLLM
plain and vLLM with the adaptive drafter as its draft model, at several batch sizes. Runs in the vLLM environment:

    make vllm-env
    .venv-vllm/bin/python scripts/bench_vllm.py --batch-sizes 1,8,32 --max-new-tokens 64 --repeats 3 \
        --json docs/results/bench_vllm_cpu.json
    .venv-vllm/bin/python scripts/bench_vllm.py --adapter outputs/drafter_embedded_warm --do-sample   # a GPU: T = 1
    # the elastic vLLM backend (speculative or plain per call, whichever it measured faster) beside vLLM plain:
    OMP_NUM_THREADS=1 .venv-vllm/bin/python scripts/bench_vllm.py --skip-hf --elastic --batch-sizes 1,8,32 \
        --max-new-tokens 64 --repeats 5
    # vLLM's model-free methods on grouped reasoning rollouts at T = 1 (issue 13's measurement, vLLM's side):
    OMP_NUM_THREADS=1 .venv-vllm/bin/python scripts/bench_vllm.py --skip-hf --methods draft_model,ngram,suffix \
        --task reasoning --group 4 --do-sample --batch-sizes 8,32 --max-new-tokens 128 --repeats 1

The policy is the embedded SmolLM2-135M-Instruct; the drafter its first `--drafter-layers` layers with LoRA (untrained,
or the adapter at `--adapter`), merged and exported as the checkpoint vLLM's `draft_model` method loads. Greedy by
default: on a CPU the vllm-cpu build needs the repair `VLLMEngine` registers for sampled speculation, which this bench
then relies on. Each row: tokens per second (median of `--repeats`, after a warm-up), ratios to HF `generate`, vLLM's
acceptance and tokens per verify, and whether vLLM's speculative output equals its plain output (greedy).
`--methods` picks vLLM's speculative methods measured beside vLLM plain (`draft_model` is the adaptive drafter;
`eagle3` the EAGLE head at `--head`, exported as vLLM's EAGLE-3 draft checkpoint; `ngram`
is prompt lookup in the row's own prompt and output; `suffix` needs the `arctic-inference` package and is recorded as
skipped without it); `--group G` repeats each prompt G times, as GRPO's `num_generations` does.
`--elastic` adds `vllm_adaptive_elastic`: the adaptive drafter served elastically (`VLLMEngine(elastic=True)`), timed
call by call over `--elastic-warmup` calls (its first calls at a batch size measure plain serving and speculation)
and then `--repeats` calls: `_tok_s` is the median of those, `_all_tok_s` counts every call but the engine's first
(as the other rows leave out their warm-up), and `_modes` lists how each call was served and why.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


def timed_run(run: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any]:
    """`adaptive_drafter.experiments.bench.timed` after one warm-up, and the last run's result (its tokens are counted)."""
    from adaptive_drafter.experiments.bench import timed

    results = [run()]
    seconds = timed(lambda: results.append(run()), device, repeats)
    return seconds, results[-1]


def elastic_run(
    engine: Any, run: Callable[[], Any], row: dict[str, Any], name: str, args: argparse.Namespace, first: bool
) -> tuple[float, Any]:
    """The elastic engine's calls at one batch size, each timed: `--elastic-warmup` calls, then `--repeats`. Returns
    the median seconds of the last `--repeats` and the last output; records every call's throughput and mode."""
    import statistics
    import time

    seconds, tokens, modes, out = [], [], [], None
    for _ in range(args.elastic_warmup + args.repeats):
        start = time.perf_counter()
        out = run()
        seconds.append(time.perf_counter() - start)
        tokens.append(sum(map(len, out.completion_ids)))
        decision = engine.last_decision
        modes.append(f"{'S' if decision.speculate else 'P'}:{decision.reason}")
    counted = slice(1, None) if first else slice(None)  # the engine's very first call sets up its kernels
    row[f"{name}_all_tok_s"] = sum(tokens[counted]) / sum(seconds[counted])
    row[f"{name}_modes"] = " ".join(modes)
    return statistics.median(seconds[args.elastic_warmup :]), out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--k", type=int, default=4, help="num_draft_tokens")
    p.add_argument("--drafter-layers", type=int, default=4)
    p.add_argument("--adapter", type=Path, default=None, help="a LoRA adapter (scripts/distill_drafter.py --out)")
    p.add_argument("--task", choices=("arithmetic", "reasoning"), default="arithmetic")
    p.add_argument("--do-sample", action="store_true", help="sample at --temperature (default greedy)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--skip-hf", action="store_true", help="vLLM rows only (a GPU: the HF rows take long)")
    p.add_argument("--methods", default="draft_model", help="vLLM speculative methods: draft_model,eagle3,ngram,suffix")
    p.add_argument("--head", type=Path, default=None, help="eagle3: an EAGLE head in the eagle3 layout (drafters/...)")
    p.add_argument("--group", type=int, default=1, help="rows per prompt (GRPO's num_generations; default 1)")
    p.add_argument("--elastic", action="store_true", help="also the elastic adaptive drafter (vllm_adaptive_elastic)")
    p.add_argument("--elastic-warmup", type=int, default=3, help="elastic calls per batch size before the timed ones")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from adaptive_drafter.vllm_engine import METHODS  # imports no vLLM

    speculative = [m for m in METHODS if m is not None]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if (not args.methods and not args.elastic) or any(m not in speculative for m in args.methods):
        p.error(f"--methods takes one or more of {', '.join(speculative)} ('' with --elastic); got {args.methods}")
    if "eagle3" in args.methods and args.head is None:
        p.error("--methods eagle3 needs --head DIR (a head in the eagle3 layout, e.g. drafters/smollm2-135m-eagle3-4k)")
    if args.group < 1 or any(b % args.group for b in args.batch_sizes):
        p.error(f"--group must be positive and divide every batch size; got {args.group} for {args.batch_sizes}")
    return args


def served_name(method: str) -> str:
    """The row's key prefix for a vLLM speculative method (the adaptive drafter is vLLM's `draft_model`)."""
    return "vllm_adaptive" if method == "draft_model" else f"vllm_{method}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from adaptive_drafter import SpecConfig, SpeculativeEngine
    from adaptive_drafter.adaptive import AdaptiveDrafter
    from adaptive_drafter.experiments.cli import write_json
    from adaptive_drafter.metrics import machine_info
    from adaptive_drafter.sampling import SamplingParams
    from adaptive_drafter.config import DrafterConfig
    from adaptive_drafter.drafter import build_drafter, load_adapter
    from adaptive_drafter.embedded import cache_path, load_embedded
    from adaptive_drafter.tasks import chat_batch, load_task
    from adaptive_drafter.vllm_engine import VLLMEngine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy, tokenizer = load_embedded()
    policy.to(device).eval()
    drafter = build_drafter(policy, DrafterConfig(drafter_num_layers=args.drafter_layers))
    if args.adapter is not None:
        load_adapter(drafter, args.adapter)
    adaptive = AdaptiveDrafter(drafter)
    draft_dir = adaptive.export(Path(tempfile.mkdtemp(prefix="bench_vllm_drafter_")), tokenizer)
    sampling = dict(do_sample=args.do_sample, temperature=args.temperature)
    batches = args.batch_sizes
    dataset, _ = load_task(args.task, max(batches) // args.group, seed=777)
    conversations = [c for c in dataset["prompt"] for _ in range(args.group)]  # siblings adjacent, as TRL orders them
    ids, mask = chat_batch(tokenizer, conversations, device)

    rows: dict[int, dict[str, Any]] = {b: {"batch": b} for b in batches}
    if not args.skip_hf:
        served = adaptive.serving_model().to(device)
        engines = {
            "hf_engine_plain": SpeculativeEngine(policy, served, SpecConfig(elastic=False, plain_batch_threshold=1)),
            "hf_engine_elastic": SpeculativeEngine(policy, served, SpecConfig(num_draft_tokens=args.k)),
        }
        for b in batches:
            i, m = ids[:b], mask[:b]

            def generate() -> Any:  # min_new_tokens: every row decodes max_new_tokens, as in the other engines
                return policy.generate(
                    input_ids=i, attention_mask=m, max_new_tokens=args.max_new_tokens,
                    min_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling,
                )  # fmt: skip

            seconds, _ = timed_run(generate, policy.device, args.repeats)
            rows[b]["hf_generate_tok_s"] = b * args.max_new_tokens / seconds
            for name, engine in engines.items():
                seconds, out = timed_run(
                    lambda engine=engine: engine.generate(
                        i, SamplingParams(**sampling), attention_mask=m, max_new_tokens=args.max_new_tokens
                    ),
                    policy.device,
                    args.repeats,
                )
                rows[b][f"{name}_tok_s"] = sum(map(len, out.completion_ids)) / seconds
        del engines

    # No eos: every row decodes max_new_tokens in every engine, so token counts (and work) are equal.
    prompts = [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())]
    outputs: dict[str, dict[int, Any]] = {}
    skipped: dict[str, str] = {}
    vllm_runs = [("vllm_plain", dict(method=None))]
    # ngram last: its proposer loads llvmlite (numba), after which no new vLLM engine can start in this process
    # (vLLM's kernel-override scan fails on one of llvmlite's objects; see vllm_support.register_expand_fallback).
    for method in sorted(args.methods, key=lambda m: m == "ngram"):
        kwargs: dict[str, Any] = dict(method=method)
        if method == "draft_model":
            kwargs["draft_path"] = str(draft_dir)
        if method == "eagle3":
            from adaptive_drafter.eagle import export_eagle3, load_head

            head_dir = Path(tempfile.mkdtemp(prefix="bench_vllm_eagle3_"))
            kwargs["draft_path"] = str(export_eagle3(load_head(policy, args.head), head_dir))
        if method == "suffix" and importlib.util.find_spec("arctic_inference") is None:
            skipped[served_name(method)] = "vLLM's suffix method needs the arctic-inference package, not installed"
            continue
        vllm_runs.append((served_name(method), kwargs))
    if args.elastic:  # before ngram (see above)
        at = next((i for i, (name, _) in enumerate(vllm_runs) if name == "vllm_ngram"), len(vllm_runs))
        elastic = dict(method="draft_model", draft_path=str(draft_dir), elastic=True)
        vllm_runs.insert(at, ("vllm_adaptive_elastic", elastic))
    for name, kwargs in vllm_runs:
        engine = VLLMEngine(str(cache_path()), num_draft_tokens=args.k, max_model_len=1024, **kwargs)
        outputs[name] = {}
        for b in batches:
            def rollout(b: int = b) -> Any:
                return engine.generate(
                    prompts[:b], SamplingParams(**sampling), max_new_tokens=args.max_new_tokens, seed=0
                )

            if kwargs.get("elastic"):
                seconds, out = elastic_run(engine, rollout, rows[b], name, args, first=b == batches[0])
            else:
                seconds, out = timed_run(rollout, policy.device, args.repeats)
            outputs[name][b] = out
            rows[b][f"{name}_tok_s"] = sum(map(len, out.completion_ids)) / seconds
            if name != "vllm_plain":
                rows[b][f"{name}_acceptance"] = out.stats.acceptance_rate
                rows[b][f"{name}_tokens_per_verify"] = out.stats.tokens_per_verify
        engine.close()
    for b in batches:
        row = rows[b]
        base = row.get("hf_generate_tok_s")
        for key in [k for k in row if k.endswith("_tok_s") and not k.endswith("_all_tok_s")]:
            if base:
                row[key.replace("_tok_s", "_vs_generate")] = row[key] / base
        for name, _ in vllm_runs[1:]:
            row[f"{name}_vs_vllm_plain"] = row[f"{name}_tok_s"] / row["vllm_plain_tok_s"]
            if f"{name}_all_tok_s" in row:
                row[f"{name}_all_vs_vllm_plain"] = row[f"{name}_all_tok_s"] / row["vllm_plain_tok_s"]
            row[f"{name}_identical"] = (
                outputs["vllm_plain"][b].completion_ids == outputs[name][b].completion_ids if not args.do_sample else None
            )  # fmt: skip

    print(f"{'batch':>5} " + " ".join(f"{k:>24}" for k in rows[batches[0]] if k != "batch" and "modes" not in k))
    for b in batches:
        cells = [
            f"{v:24.3f}" if isinstance(v, float) else f"{v!s:>24}"
            for k, v in rows[b].items()
            if k != "batch" and "modes" not in k
        ]
        print(f"{b:5d} " + " ".join(cells))
    for b in batches:
        for key in (k for k in rows[b] if k.endswith("_modes")):
            print(f"batch {b} {key}: {rows[b][key]}")
    import vllm

    meta = {
        "machine": machine_info(), "vllm": vllm.__version__, "device": device,
        "drafter": f"first {args.drafter_layers} layers + LoRA ({args.adapter or 'untrained'})",
        "eagle3_head": str(args.head) if "eagle3" in args.methods else None,
    }  # fmt: skip
    result = {"meta": meta, "rows": list(rows.values()), "skipped": skipped}
    for name, why in skipped.items():
        print(f"{name}: not measured ({why})")
    if args.json is not None:
        write_json(args.json, args, meta, rows=result["rows"], skipped=skipped)
    return result


if __name__ == "__main__":
    main()
