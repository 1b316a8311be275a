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
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from trl.models import unwrap_model_for_generation

from .config import DistillConfig, DrafterConfig, SpecConfig
from .drafter import AdapterVersion, build_drafter, load_adapter, save_adapter
from .engine import SpeculativeEngine
from .metrics import SpecStats
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


def _sampling_settings(args: Any) -> dict[str, Any]:
    """The trainer's generation settings, as the engine takes them; unsupported ones fail loudly, not silently."""
    if getattr(args, "repetition_penalty", 1.0) not in (None, 1.0):
        raise ValueError(
            f"repetition_penalty={args.repetition_penalty} is not supported by the speculative engine yet "
            "(it would have to be applied identically to drafts and verification). Set repetition_penalty=1.0."
        )
    return dict(
        do_sample=True,
        temperature=args.temperature,
        top_k=args.top_k or 0,
        top_p=args.top_p if args.top_p is not None else 1.0,
        min_p=args.min_p or 0.0,
        max_new_tokens=args.max_completion_length,
    )


class SpeculativeRollout:
    """A `rollout_func` for `trl.GRPOTrainer` (and other TRL trainers with the same contract) that generates with
    `SpeculativeEngine`: lossless under the default exact rule, with the drafter distilled in the background when a
    `DistillConfig` is given.

    The drafter is built from the policy on the first call (inside `unwrap_model_for_generation`, so ZeRO-3 weights are
    gathered; outside `deepspeed.zero.Init` and never passed to `accelerator.prepare`), unless `drafter` is given.
    """

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
        self.engine: SpeculativeEngine | None = None
        self.drafter_trainer: DrafterTrainer | None = None
        self.restore_from: Path | None = None  # a checkpoint's drafter adapter, loaded once the drafter exists
        self.totals = SpecStats()  # over the whole run, for the end-of-training summary

    def callback(self) -> DrafterCallback:
        """The `TrainerCallback` that versions, checkpoints and restores this rollout's drafter."""
        return DrafterCallback(self)

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, list]:
        prompt_ids = trainer._tokenize_prompts(prompts)[0]  # TRL's own templating: chat template, kwargs, tools
        tokenizer = trainer.processing_class
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = trainer.generation_config.eos_token_id if trainer.generation_config is not None else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        settings = _sampling_settings(trainer.args)
        device = trainer.accelerator.device
        ids, mask = _left_pad(prompt_ids, pad, device)
        with unwrap_model_for_generation(
            trainer.model_wrapped,
            trainer.accelerator,
            gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
            gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
        ) as policy:
            engine = self._engine(policy, tokenizer)
            engine.policy_version = trainer.state.global_step
            was_training = policy.training
            policy.eval()  # dropout off: rollouts sample the policy itself
            try:
                out = engine.generate(ids, mask, eos_token_id=eos, pad_token_id=pad, **settings)
            finally:
                policy.train(was_training)
        self._log(trainer, engine, out.stats)
        return {"prompt_ids": prompt_ids, "completion_ids": out.completion_ids, "logprobs": out.logprobs}

    def _engine(self, policy: Any, tokenizer: Any) -> SpeculativeEngine:
        if self.engine is None:
            if self.drafter is None:
                self.drafter = build_drafter(policy, self.drafter_config, policy_tokenizer=tokenizer)
                warm = self.drafter_config.drafter_adapter_path
                if warm is not None and self.restore_from is None:  # a resumed run restores its own adapter instead
                    load_adapter(self.drafter, warm)  # weights only: this run numbers its adapters from 0
                    logger.info("drafter warm-started from the adapter at %s", warm)
            if self.restore_from is not None:
                version = load_adapter(self.drafter, self.restore_from)
                logger.info("restored drafter adapter v%d from %s", version.adapter_version, self.restore_from)
            self.engine = SpeculativeEngine(policy, self.drafter, self.spec_config, tokenizer=tokenizer)
            if self.restore_from is not None:
                self.engine.adapter_version = version
            if self.distill_config is not None:
                self.drafter_trainer = DrafterTrainer(self.drafter, self.distill_config)
                if self.engine.adapter_version is not None:  # keep numbering after a resume
                    self.drafter_trainer.adapter_version = self.engine.adapter_version.adapter_version
                self.engine.attach(self.drafter_trainer)
                self.drafter_trainer.start()
        self.engine.policy = policy  # the unwrapped module can differ between calls (DeepSpeed, FSDP)
        return self.engine

    def _log(self, trainer: Any, engine: SpeculativeEngine, stats: Any) -> None:
        """Hand the metrics to the trainer's own averaging logger (main thread: this runs inside the rollout)."""
        self.totals = self.totals + stats
        metrics = engine.metrics(stats)
        if self.drafter_trainer is not None:
            metrics.update(self.drafter_trainer.metrics())
        mode = "train" if trainer.model.training else "eval"
        for key, value in metrics.items():
            trainer._metrics[mode][key].append(float(value))

    def save(self, directory: str | os.PathLike[str]) -> Path | None:
        """Save the served drafter adapter and its versions into `directory` (atomically)."""
        if self.engine is None:
            return None
        return save_adapter(self.drafter, directory, self.engine.adapter_version or AdapterVersion(0, 0))

    def close(self) -> None:
        """Stop the background trainer (no thread outlives training)."""
        if self.drafter_trainer is not None:
            self.drafter_trainer.stop()


class DrafterCallback(TrainerCallback):
    """Keeps the drafter in step with training: the policy version follows the optimizer steps, the drafter adapter
    and its versions are saved inside every checkpoint (`checkpoint-N/drafter/`) and restored on resume, and the
    background trainer is stopped at the end."""

    def __init__(self, rollout: SpeculativeRollout) -> None:
        self.rollout = rollout

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step > 0:  # resuming: the trainer restored its state from checkpoint-<global_step>
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / DRAFTER_DIR
            if path.exists():
                self.rollout.restore_from = path
            else:
                logger.warning("resuming without a drafter adapter (%s is missing): starting a fresh one", path)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.rollout.engine is not None:
            self.rollout.engine.policy_version = state.global_step

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            self.rollout.save(checkpoint / DRAFTER_DIR)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.rollout.close()
