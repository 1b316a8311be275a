"""TRL integration, by composition: a `rollout_func` for `trl.GRPOTrainer` that generates speculatively on a backend
(`backends.HFBackend`, the default, or `backends.VLLMBackend`), and a `TrainerCallback` that keeps the drafter's
versions, checkpoints and background trainer in step with training.

    rollout = SpeculativeRollout(SpecConfig(), DrafterConfig(), DistillConfig())   # backend=VLLMBackend() for vLLM
    trainer = GRPOTrainer(model, reward_funcs, args=config, train_dataset=dataset,
                          rollout_func=rollout, callbacks=[rollout.callback()])
    trainer.train()
    print(rollout.report(trainer).summary())

Multi-process (`accelerate launch --num_processes N`): every rank runs its own engine and background drafter trainer on
its own rollouts, so adapters drift apart between checkpoints. That is safe (the exact rule makes completions
independent of the drafter) and costs no communication; checkpoints hold rank 0's adapter and every rank restores that
one on resume, so all ranks start a resumed run from the same adapter.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from trl.models import unwrap_model_for_generation

from .adaptive import AdaptiveDrafter
from .backends import HFBackend, VLLMBackend
from .config import DistillConfig, DrafterConfig, ServingConfig, SpecConfig
from .drafter import build_drafter
from .eagle import eagle_head
from .eagle_distill import FeatureTap
from .metrics import SpecStats, machine_info
from .probe import DrafterProbe
from .report import DrafterState, RolloutRecord, RunReport
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


# The trainer's sampling settings the rollouts honour; TRL's `generation_kwargs` may override them (TRL: "they will
# override them"), and any other key there is refused rather than silently dropped.
_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def sampling_params(args: Any) -> SamplingParams:
    """The trainer's sampling settings (TRL's `generation_kwargs` override them) as the engines' `SamplingParams`:
    what the rollouts sample with, and the held-out probe too. A setting no rollout backend honours fails loudly
    here; one only some backends honour (`repetition_penalty`, `min_p` with vLLM speculation) is refused by the
    backend (`check`) before the first rollout."""
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
    return SamplingParams(
        do_sample=True,
        temperature=values["temperature"],
        top_k=values["top_k"] or 0,
        top_p=values["top_p"] if values["top_p"] is not None else 1.0,
        min_p=values["min_p"] or 0.0,
        repetition_penalty=1.0 if values["repetition_penalty"] is None else float(values["repetition_penalty"]),
    )


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


class SpeculativeRollout:
    """A `rollout_func` for `trl.GRPOTrainer` (and other TRL trainers with the same contract): speculative rollouts on
    `backend` (`HFBackend()` by default, or `VLLMBackend(...)`), lossless under the default exact rule, with the
    drafter distilled in the background when a `DistillConfig` is given.

    It owns what every backend shares: the adaptive drafter (built from the policy on the first call, inside
    `unwrap_model_for_generation` so ZeRO-3 weights are gathered, never passed to `accelerator.prepare`; warm-started
    or restored), its background trainer, the policy version, the held-out probe (`probe`), checkpoints, metrics and
    the run's totals (`report`). `drafter` replaces the drafter built from `drafter_config`; `serving_config` says how
    the drafter is served and in which precision the rollouts run.
    """

    def __init__(
        self,
        spec_config: SpecConfig | None = None,
        drafter_config: DrafterConfig | None = None,
        distill_config: DistillConfig | None = None,
        drafter: Any = None,
        *,
        serving_config: ServingConfig | None = None,
        backend: HFBackend | VLLMBackend | None = None,
    ) -> None:
        self.spec_config = spec_config or SpecConfig()
        self.serving_config = serving_config or ServingConfig()
        self.drafter_config = drafter_config or DrafterConfig()
        self.distill_config = distill_config
        self.drafter = drafter
        self.backend = backend if backend is not None else HFBackend()
        self.backend.check(self.spec_config, SamplingParams())  # SpecConfig options the backend cannot honour
        if self.backend.name == "vllm" and self.backend.serves_drafter():
            _check_vllm_drafter(self.backend.method, self.drafter_config.drafter_kind)
        self.adaptive: AdaptiveDrafter | None = None
        self.restore_from: Path | None = None  # a checkpoint's drafter adapter, loaded once the drafter exists
        self.totals = SpecStats()  # over the whole run, for the end-of-training report
        self.history: list[RolloutRecord] = []  # per rollout: step, tokens per verify, measured speed-up
        self.events: list[str] = []  # what happened to the drafter that a user should be told (restored, warm start)
        self.probe: DrafterProbe | None = None  # held-out acceptance of the served vs the starting adapter, and drift
        self._probe_metrics: dict[str, float] = {}

    @property
    def engine(self) -> Any:
        """The backend's engine (None before the first rollout)."""
        return self.backend.engine

    def callback(self) -> DrafterCallback:
        """The `TrainerCallback` that checks the sampling settings and versions, checkpoints and restores this
        rollout's drafter."""
        return DrafterCallback(self)

    @property
    def drafter_trainer(self) -> DrafterTrainer | None:
        return self.adaptive.trainer if self.adaptive is not None else None

    def check(self, args: Any) -> SamplingParams:
        """The trainer's sampling settings, or a ValueError saying what to use instead for one this backend cannot
        honour (run when training begins, before any rollout, and by every rollout)."""
        sampling = sampling_params(args)
        self.backend.check(self.spec_config, sampling)
        return sampling

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, list]:
        prompt_ids = tokenize_prompts(trainer, prompts)
        tokenizer = trainer.processing_class
        sampling = self.check(trainer.args)
        step = trainer.state.global_step
        decode = dict(max_new_tokens=trainer.args.max_completion_length, eos_token_id=_eos(trainer))
        with _unwrapped_policy(trainer) as policy:
            adaptive = self._adaptive(policy, tokenizer) if self.backend.serves_drafter() else None
            if adaptive is not None:
                adaptive.policy_version = step
            engine, probed = self.backend.prepare(
                policy, tokenizer, adaptive, self.spec_config, self.serving_config, step, trainer.args, self.notify
            )
            self._maybe_probe(step, probed)
            if self.backend.decodes_policy_module:
                out = self._generate(engine, adaptive, prompt_ids, sampling, decode)
        if not self.backend.decodes_policy_module:
            out = self._generate(engine, adaptive, prompt_ids, sampling, decode)
        self._log(trainer, out.stats, step)
        extra = self.backend.metrics(step, self.notify)
        if extra:
            log_metrics(trainer, extra)
        return {"prompt_ids": prompt_ids, "completion_ids": out.completion_ids, "logprobs": out.logprobs}

    def _generate(self, engine: Any, adaptive: AdaptiveDrafter | None, prompt_ids: list[list[int]], sampling:
                  SamplingParams, decode: dict[str, Any]) -> Any:  # fmt: skip
        if adaptive is not None:
            return adaptive.generate(engine, prompt_ids, sampling, **decode)
        return engine.generate(prompt_ids, sampling, **decode)

    def _adaptive(self, policy: Any, tokenizer: Any) -> AdaptiveDrafter:
        """The adaptive drafter, built on the first call: restored from a checkpoint on resume, else warm-started from
        `drafter_adapter_path` if set, else fresh. Says which, on the console: a resumed run must not look fresh."""
        if self.adaptive is not None:
            return self.adaptive
        if self.drafter is None:
            self.drafter = build_drafter(policy, self.drafter_config, policy_tokenizer=tokenizer)
        self.adaptive = AdaptiveDrafter(
            self.drafter, self.serving_config, self.distill_config, vocab_size=len(tokenizer)
        )
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
        if self.backend.name == "vllm" and self.adaptive.is_eagle and self.adaptive.trainer is not None:
            # vLLM returns no hidden states: the head's rows get them from the GRPO loss's forward over the same
            # sequences (forward hooks on the policy), not from a forward of their own.
            layers, sink = eagle_head(self.drafter).feature_layers, self.adaptive.trainer.buffer.add_many
            self.adaptive.feature_tap = FeatureTap(policy, layers, sink)
            self.notify("drafter: the head trains on features from the GRPO loss's forward (vLLM returns none)")
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
        self.history.append(RolloutRecord(step, stats.tokens_per_verify, stats.measured_speedup))
        metrics = self.adaptive.metrics(stats) if self.adaptive is not None else stats.metrics()
        metrics.update(self._probe_metrics)
        self._probe_metrics = {}
        log_metrics(trainer, metrics)

    def report(self, trainer: Any) -> RunReport:
        """What the run measured about its rollouts and drafter so far (`RunReport.summary()`, `.write()`)."""
        rewards = [
            {"step": row["step"], "reward": row["reward"], "reward_std": row.get("reward_std")}
            for row in trainer.state.log_history
            if "reward" in row
        ]
        adaptive = self.adaptive
        return RunReport(
            events=list(self.events),
            totals=self.totals,
            rollouts=list(self.history),
            probe=list(self.probe.points) if self.probe is not None else [],
            rollout_precision=self.backend.describe(),
            adapter_version=adaptive.adapter_version.adapter_version if adaptive and adaptive.adapter_version else 0,
            drafter=(
                DrafterState.of(adaptive.trainer) if adaptive is not None and adaptive.trainer is not None else None
            ),
            rewards=rewards,
            processes=trainer.accelerator.num_processes,
            output_dir=str(trainer.args.output_dir),
            machine=machine_info(),
        )

    def save(self, directory: str | os.PathLike[str]) -> Path | None:
        """Save the served drafter adapter and its versions into `directory` (atomically)."""
        return self.adaptive.save(directory) if self.adaptive is not None else None

    def close(self) -> None:
        """Stop the background trainer (no thread outlives training) and the backend's engine."""
        if self.adaptive is not None:
            self.adaptive.stop()
            if self.adaptive.feature_tap is not None:
                self.adaptive.feature_tap.close()
        self.backend.close()


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
    """Keeps the drafter in step with training: the sampling settings are checked before the first rollout, the
    policy version follows the optimizer steps, the drafter adapter and its versions are saved inside every checkpoint
    (`checkpoint-N/drafter/`) and restored on resume, and the background trainer is stopped at the end."""

    def __init__(self, rollout: SpeculativeRollout) -> None:
        self.rollout = rollout

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.rollout.check(args)
        if state.global_step > 0:  # resuming: the trainer restored its state from checkpoint-<global_step>
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / DRAFTER_DIR
            if path.exists():
                self.rollout.restore_from = path
            else:
                self.rollout.notify(
                    f"drafter: resuming without a drafter adapter ({path} is missing): a fresh one starts"
                )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.rollout.adaptive is not None:
            self.rollout.adaptive.policy_version = state.global_step

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            self.rollout.save(checkpoint / DRAFTER_DIR)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.rollout.close()


def _check_vllm_drafter(method: str, kind: str) -> None:
    """Refuse a drafter kind that the vLLM speculative method cannot serve, saying which method serves it."""
    if kind == "eagle" and method != "eagle3":
        raise ValueError(
            f"drafter_kind='eagle' is served by vLLM's EAGLE-3 method, not {method!r}: set --vllm_speculation eagle3 "
            "(with a head in the eagle3 layout, e.g. drafters/smollm2-135m-eagle3-4k), or drafter_kind='truncated' "
            "with --vllm_speculation draft_model."
        )
    if kind != "eagle" and method == "eagle3":
        raise ValueError(
            f"--vllm_speculation eagle3 serves an EAGLE head (drafter_kind='eagle'), not drafter_kind={kind!r}: set "
            "drafter_kind: eagle, or --vllm_speculation draft_model for this drafter."
        )
