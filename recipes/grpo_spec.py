"""GRPO with speculative rollouts and a drafter that keeps up with the policy.

    accelerate launch recipes/grpo_spec.py                                   # the embedded default, CPU-friendly
    accelerate launch recipes/grpo_spec.py --config configs/grpo_spec.yaml --max_steps 50
    accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml recipes/grpo_spec.py \
        --config configs/qwen2.5-1.5b_gsm8k.yaml
    accelerate launch recipes/grpo_spec.py --speculative false              # the same GRPO with TRL's own generate

Every option of GRPOConfig, ModelConfig, SpecConfig, ServingConfig, DrafterConfig and DistillConfig is a flag (`--help`
lists them); a YAML file given with `--config` sets defaults that flags override. With no `--config`,
configs/grpo_spec.yaml is used: SmolLM2-135M-Instruct (embedded, no download) on a generated arithmetic task, an
EAGLE-style head (warm-started from drafters/) distilled in the background, W&B offline unless you are logged in.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from trl import GRPOConfig, GRPOTrainer, ModelConfig, TrlParser

from adaptive_drafter.config import DistillConfig, DrafterConfig, ServingConfig, SpecConfig
from adaptive_drafter.experiments.freshness import FreshnessCost
from adaptive_drafter.plots import plot_run
from adaptive_drafter.recipe import (
    ProbeArguments,
    RolloutArguments,
    TaskArguments,
    config_for_this_transformers,
    in_repo_if_relative,
    load_policy,
    load_task,
    make_probe,
    make_rollout,
    resume_point,
    show_drafter_events,
    use_wandb_offline_unless_logged_in,
)
from adaptive_drafter.trl import sampling_params

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "grpo_spec.yaml"


def main(argv: list[str] | None = None) -> GRPOTrainer:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    argv = config_for_this_transformers(argv)
    show_drafter_events()
    parser = TrlParser(
        (
            TaskArguments, RolloutArguments, ProbeArguments, GRPOConfig, ModelConfig, SpecConfig, ServingConfig,
            DrafterConfig, DistillConfig,
        )
    )  # fmt: skip
    task_args, rollout_args, probe_args, grpo_args, model_args, spec, serving, drafter_config, distill_config = (
        parser.parse_args_and_config(argv)
    )
    use_wandb_offline_unless_logged_in(grpo_args)
    drafter_config.drafter_adapter_path = in_repo_if_relative(drafter_config.drafter_adapter_path, REPO)

    policy, tokenizer = load_policy(model_args, grpo_args.trust_remote_code)  # off unless the user sets it
    dataset, rewards = load_task(task_args)
    rollout = make_rollout(rollout_args, spec, serving, drafter_config, distill_config)
    callbacks = []
    if rollout is not None:
        sampling = sampling_params(grpo_args)
        rollout.probe = make_probe(probe_args, task_args, dataset, tokenizer, spec, sampling, grpo_args.num_generations)
        freshness = FreshnessCost(rollout, hold_every=probe_args.hold_trainer_every)
        callbacks = [rollout.callback(), freshness]
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=rewards,
        args=grpo_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        rollout_func=rollout,
        callbacks=callbacks or None,
    )
    try:
        trainer.train(resume_from_checkpoint=resume_point(grpo_args))
        trainer.save_model(grpo_args.output_dir)
        trainer.save_state()  # trainer_state.json: the log history (per-step times) for scripts/bench_grpo_step.py
        if rollout is not None:
            rollout.save(Path(grpo_args.output_dir) / "drafter")
    finally:
        if rollout is not None:
            rollout.close()
    if not trainer.accelerator.is_main_process:
        return trainer
    if rollout is None:
        print(f"\nplain rollouts (TRL's own generate, no drafter); checkpoint {grpo_args.output_dir}")
        return trainer
    report = rollout.report(trainer)
    freshness.attach(report)
    print("\n" + report.summary(wandb_run()))
    title = f"{grpo_args.run_name or 'GRPO'}: {report.totals.emitted_tokens} rollout tokens"
    picture = plot_run(report.probe, report.rollouts, Path(grpo_args.output_dir) / "adaptive_drafter.png", title,
                       rewards=report.rewards)  # fmt: skip
    print(f"plot                 {picture}")
    print(f"run record           {report.write(Path(grpo_args.output_dir) / 'adaptive_drafter_run.json')}")
    return trainer


def wandb_run() -> str | None:
    """Where this run's W&B files are, and how to upload them when offline."""
    import wandb

    if wandb.run is None:
        return None
    where = "offline: `wandb sync` it to upload" if os.environ.get("WANDB_MODE") == "offline" else wandb.run.url
    return f"{wandb.run.dir} ({where})"


if __name__ == "__main__":
    main()
