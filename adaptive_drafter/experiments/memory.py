"""What speculation adds to plain decoding in memory (scripts/bench_rollout.py `--memory`): the drafter's weights, its
KV cache, the distillation buffer's targets, and the peaks per phase on CUDA."""

from __future__ import annotations

import resource
from typing import Any

import torch
from peft import PeftModel

from ..config import DistillConfig, SpecConfig
from ..drafter import merged_copy
from ..engine import SpeculativeEngine
from ..targets import DistillBuffer
from .bench import RunOptions, Setup, prompts_on, run_plain, run_spec


def memory_report(
    setup: Setup,
    batch: int,
    tokens: int,
    options: RunOptions,
    served_drafter: Any = None,
    rollout_copy_bytes: int = 0,
) -> dict[str, Any]:
    """What speculation adds to plain decoding, in MiB: the drafter's weights (`truncated_drafter` copies them: nothing
    is shared with the policy; tied tensors are counted once), its KV cache at `batch` rows of `tokens` slots (the
    policy's for scale; the verify adds k slots per row to it), and the distillation buffer's top-K targets (bytes per
    token measured on a short rollout, times the buffer's default capacity). Peak memory: on CUDA per phase (plain,
    then speculative, peak reset between them); on CPU only the process's peak RSS, which phases cannot be told apart
    in (the first phase to reach it sets it for the rest of the process).

    Rollouts in another precision than training (`adaptive_drafter.precision`): `setup.policy` is the rollout copy,
    `rollout_copy_bytes` its size (memory added beside the training policy), and `served_drafter` the drafter's serving
    copy in that precision (added beside the drafter, which trains in its own); KV caches are in the served dtype."""

    def kv_bytes(model: Any) -> int:
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
        return per_token * batch * tokens * next(model.parameters()).element_size()

    def weight_bytes(model: Any, shared_with: Any = None) -> int:
        shared = {id(p) for p in shared_with.parameters()} if shared_with is not None else set()
        return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in shared)  # tied: once

    # The engine drafts with a copy whose LoRA is merged (ServingConfig.merge_lora): its adapted layers are extra. In
    # another precision the serving copy is a whole cast copy instead.
    merged = merged_copy(setup.drafter) if isinstance(setup.drafter, PeftModel) and served_drafter is None else None

    mib, distill = 2**20, DistillConfig()
    report = {
        "batch": batch,
        "tokens": tokens,
        "policy_weights_mib": weight_bytes(setup.policy) / mib,
        "drafter_weights_mib": weight_bytes(setup.drafter) / mib,
        "merged_drafter_mib": weight_bytes(merged, shared_with=setup.drafter) / mib if merged is not None else 0.0,
        "policy_kv_mib": kv_bytes(setup.policy) / mib,
        "drafter_kv_mib": kv_bytes(served_drafter if served_drafter is not None else setup.drafter) / mib,
        "rollout_copy_mib": rollout_copy_bytes / mib,
        "drafter_serving_copy_mib": weight_bytes(served_drafter) / mib if served_drafter is not None else 0.0,
        "policy_dtype": str(next(setup.policy.parameters()).dtype).removeprefix("torch."),
        "distill_topk": distill.distill_topk,
        "distill_bytes_per_token": target_bytes_per_token(setup, distill.distill_topk, options),
        "distill_buffer_tokens": distill.distill_buffer_tokens,
    }
    report["distill_buffer_mib"] = report["distill_bytes_per_token"] * distill.distill_buffer_tokens / mib
    if options.device.startswith("cuda"):
        report.update(cuda_peaks(setup, batch, options))
    else:
        report["process_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return report


def target_bytes_per_token(setup: Setup, topk: int, options: RunOptions) -> float:
    """Bytes one completion token's distillation targets take in the buffer (top-K ids and logprobs, the drafted and
    accepted flags), measured on the targets the engine collects in a short rollout."""
    engine = SpeculativeEngine(
        setup.policy, setup.drafter, SpecConfig(num_draft_tokens=options.k, elastic=False, collect_topk=topk)
    )
    ids, mask = prompts_on(setup, 2, options)
    out = engine.generate(ids, options.params, attention_mask=mask, max_new_tokens=8, eos_token_id=setup.eos_token_id)
    buffer = DistillBuffer(max_tokens=10**9)
    buffer.add_many(out.targets)
    tensors = [t for row in out.targets for t in (row.topk_ids, row.topk_logprobs, row.drafted, row.accepted)]
    return sum(t.numel() * t.element_size() for t in tensors) / max(1, buffer.num_tokens)


def cuda_peaks(setup: Setup, batch: int, options: RunOptions) -> dict[str, float]:
    """Peak allocated CUDA memory of one plain and one speculative rollout at `batch`, reset between them (MiB)."""
    ids, mask = prompts_on(setup, batch, options)
    engine = SpeculativeEngine(setup.policy, setup.drafter, SpecConfig(num_draft_tokens=options.k, elastic=False))
    max_new, peaks = options.max_new_tokens, {}
    for name, run in (("plain", lambda: run_plain(setup, ids, mask, options, max_new)),
                      ("spec", lambda: run_spec(engine, setup, ids, mask, options, max_new))):  # fmt: skip
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        run()
        peaks[f"cuda_peak_{name}_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return peaks


def format_memory(memory: dict[str, Any]) -> str:
    """The memory report as a small table: what speculation adds, beside the policy's own for scale."""
    row = lambda name, spec, plain: f"  {name:<44}{spec:>14}{plain:>14}"
    buffer = f"distillation buffer ({memory['distill_buffer_tokens']} tok x {memory['distill_bytes_per_token']:.0f} B)"
    lines = [
        f"memory in MiB, batch {memory['batch']} x {memory['tokens']} slots",
        row("", "spec adds", "policy"),
        row("weights", f"{memory['drafter_weights_mib']:.1f}", f"{memory['policy_weights_mib']:.1f}"),
        row("merged copy of the LoRA-adapted layers", f"{memory.get('merged_drafter_mib', 0.0):.1f}", "-"),
        row("KV cache at the end of the rollout", f"{memory['drafter_kv_mib']:.1f}", f"{memory['policy_kv_mib']:.1f}"),
    ]
    if memory.get("rollout_copy_mib"):  # rollouts in another precision than training
        lines += [
            row(f"rollout copy of the policy ({memory['policy_dtype']})", "-", f"{memory['rollout_copy_mib']:.1f}"),
            row(f"drafter serving copy ({memory['policy_dtype']})", f"{memory['drafter_serving_copy_mib']:.1f}", "-"),
        ]
    lines += [
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


# ---------------------------------------------------------------------------------------------- plots, records, CLI
