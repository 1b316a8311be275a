"""GRPO with speculative rollouts and a drafter that keeps up with the policy.

    accelerate launch recipes/grpo_spec.py                                   # the embedded default, CPU-friendly
    accelerate launch recipes/grpo_spec.py --config configs/grpo_spec.yaml --max_steps 50
    accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml recipes/grpo_spec.py \
        --config configs/qwen2.5-1.5b_gsm8k.yaml
    accelerate launch recipes/grpo_spec.py --speculative false              # the same GRPO with TRL's own generate

Every option of GRPOConfig, ModelConfig, SpecConfig, DrafterConfig and DistillConfig is a flag (`--help` lists them);
a YAML file given with `--config` sets defaults that flags override. With no `--config`, configs/grpo_spec.yaml is used:
SmolLM2-135M-Instruct (embedded, no download) on a generated arithmetic task, a 4-layer self-draft with LoRA distilled in
the background, W&B offline unless you are logged in.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer, ModelConfig, TrlParser

from adaptive_drafter.config import DistillConfig, DrafterConfig, SpecConfig
from adaptive_drafter.probe import DrafterProbe, plot_run
from adaptive_drafter.sampling import SamplingParams
from adaptive_drafter.tasks import TASKS, Reward, chat_batch, exact_match_reward
from adaptive_drafter.tasks import load_task as load_task_by_name
from adaptive_drafter.trl import (
    AdaptiveRollout,
    SpeculativeRollout,
    VLLMRollout,
    last_complete_checkpoint,
    sampling_params,
)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "grpo_spec.yaml"


@dataclass
class TaskArguments:
    """The training data: the embedded arithmetic task, or a hub/local dataset with `prompt` and `answer` columns."""

    dataset_name: str = field(
        default="arithmetic",
        metadata={"help": "An embedded task ('arithmetic': short answers; 'reasoning': long completions) or a dataset."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of dataset_name to train on."})
    num_examples: int = field(default=512, metadata={"help": "Embedded tasks: how many problems to generate."})


@dataclass
class RolloutArguments:
    """Which rollout backend generates: our Hugging Face engine, vLLM, or TRL's own `generate` (the baseline)."""

    speculative: bool = field(
        default=True,
        metadata={"help": "false: TRL's own generate, no drafter (the plain baseline of scripts/bench_grpo_step.py)."},
    )
    rollout_backend: str = field(
        default="hf",
        metadata={
            "help": "'hf': our speculative engine over the Hugging Face policy (the reference, any device). 'vllm': an "
            "in-process vLLM engine serving the adaptive drafter as its draft model (install with `make vllm-env`)."
        },
    )
    vllm_speculation: str = field(
        default="draft_model",
        metadata={"help": "vllm backend: 'draft_model' (the adaptive drafter), 'ngram', 'suffix' or 'none'."},
    )

    def __post_init__(self) -> None:
        if self.rollout_backend not in ("hf", "vllm"):
            raise ValueError(f"--rollout_backend must be 'hf' or 'vllm', got {self.rollout_backend!r}.")
        if self.vllm_speculation not in ("draft_model", "ngram", "suffix", "none"):
            raise ValueError(
                f"--vllm_speculation must be draft_model, ngram, suffix or none, got {self.vllm_speculation!r}."
            )


@dataclass
class ProbeArguments:
    """The held-out probe: the served adapter's acceptance vs the starting adapter's, and the policy's drift."""

    probe_every: int = field(default=2, metadata={"help": "Measure every this many policy steps (0: never)."})
    probe_prompts: int = field(default=4, metadata={"help": "Held-out prompts the probe decodes."})
    probe_max_new_tokens: int = field(default=32, metadata={"help": "Tokens per held-out prompt."})
    probe_suffix: bool = field(
        default=False,
        metadata={
            "help": "Also measure the model-free suffix drafter on the held-out prompts, each sampled num_generations "
            "times (siblings to draft from)."
        },
    )
    hold_trainer_every: int = field(
        default=0,
        metadata={
            "help": "The cost of freshness: hold the background drafter trainer during every other block of this many "
            "policy steps and compare step times with and without it (0: never held)."
        },
    )

    def __post_init__(self) -> None:
        if min(self.probe_every, self.hold_trainer_every) < 0 or min(self.probe_prompts, self.probe_max_new_tokens) < 1:
            raise ValueError(
                "--probe_every and --hold_trainer_every must be >= 0, --probe_prompts and --probe_max_new_tokens >= 1."
            )


def make_probe(
    args: ProbeArguments,
    task: TaskArguments,
    dataset: Any,
    tokenizer: Any,
    spec: SpecConfig,
    sampling: SamplingParams,
    group: int = 1,
) -> DrafterProbe | None:
    """The probe over held-out prompts (fresh ones for an embedded task, another seed, else the dataset's last rows),
    decoded with the run's sampling settings."""
    if args.probe_every == 0:
        return None
    if task.dataset_name in TASKS:
        held_out, _ = load_task_by_name(task.dataset_name, args.probe_prompts, seed=1_000_003)
    else:
        held_out = dataset.select(range(max(0, len(dataset) - args.probe_prompts), len(dataset)))
    ids, mask = chat_batch(tokenizer, held_out["prompt"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return DrafterProbe(
        ids, mask, every=args.probe_every, num_draft_tokens=spec.num_draft_tokens,
        max_new_tokens=args.probe_max_new_tokens, sampling=sampling, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad, suffix_group=group if args.probe_suffix else 0, suffix_max_draft=spec.suffix_max_draft,
    )  # fmt: skip


def load_policy(model_args: ModelConfig, trust_remote_code: bool = False):
    """The policy and its tokenizer: the embedded SmolLM2-135M-Instruct, or `model_name_or_path`."""
    if model_args.model_name_or_path in (None, "embedded"):
        from adaptive_drafter.embedded import load_embedded

        return load_embedded()
    kwargs = dict(trust_remote_code=trust_remote_code, revision=model_args.model_revision)
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(__import__("torch"), model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=dtype or "auto", **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, **kwargs)
    tokenizer.padding_side = "left"
    return model, tokenizer


def load_task(args: TaskArguments) -> tuple[Any, list[Reward]]:
    """The dataset and its reward functions: an embedded task (`adaptive_drafter.tasks`), or a hub/local dataset with
    `prompt` and `answer` columns (GSM8K's layout is converted) scored by the final number."""
    if args.dataset_name in TASKS:
        return load_task_by_name(args.dataset_name, args.num_examples)
    from datasets import load_dataset

    dataset = load_dataset(
        args.dataset_name, "main" if "gsm8k" in args.dataset_name else None, split=args.dataset_split
    )
    if "question" in dataset.column_names:  # GSM8K layout: the final answer follows "####"
        dataset = dataset.map(
            lambda row: {
                "prompt": [{"role": "user", "content": row["question"] + " End with the final number."}],
                "answer": row["answer"].split("####")[-1].strip().replace(",", ""),
            },
            remove_columns=dataset.column_names,
        )
    return dataset, [exact_match_reward]


def _wandb_logged_in() -> bool:
    netrc = Path.home() / ".netrc"
    return bool(os.environ.get("WANDB_API_KEY")) or (netrc.exists() and "api.wandb.ai" in netrc.read_text("utf-8"))


def use_wandb_offline_unless_logged_in(args: GRPOConfig) -> None:
    """W&B runs offline (files under output_dir/wandb) unless the user is logged in or chose WANDB_MODE."""
    if "wandb" not in (args.report_to or []) or os.environ.get("WANDB_MODE"):
        return
    if not _wandb_logged_in():
        os.environ["WANDB_MODE"] = "offline"
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_DIR", args.output_dir)


def summary(rollout: AdaptiveRollout, args: GRPOConfig, processes: int = 1, cost: dict[str, Any] | None = None) -> str:
    """The end-of-run summary: every figure in it was measured in this run, or it says that it was not."""
    totals = rollout.totals
    lines = [*(f"{event}" for event in rollout.events)]
    precision = getattr(rollout, "rollout_copy", None)  # the HF backend's rollout precision (SpecConfig.rollout_dtype)
    if precision is not None:
        lines.append(f"rollout precision    {precision.describe()}")
    if totals.decode_seconds > 0:
        share = totals.verify_steps / max(1, totals.verify_steps + totals.plain_steps)
        lines.append(
            f"rollouts             {totals.emitted_tokens} tokens decoded at "
            f"{totals.emitted_tokens / totals.decode_seconds:.1f} tok/s (after each prefill); {share:.0%} of row steps "
            "speculated"
        )
    if totals.drafted:
        lines.append(
            f"acceptance           {totals.acceptance_rate:.3f} over {totals.drafted} drafted tokens; "
            f"{totals.tokens_per_verify:.2f} tokens per verify"
        )
    else:
        lines.append("acceptance           no step speculated (the elastic controller found plain decoding faster)")
    if totals.measured_speedup is not None:
        lines.append(
            f"measured speed-up    {totals.measured_speedup:.2f}x plain decoding: wall time of the decode steps vs the "
            f"plain step cost measured in this run at the same batch sizes ({totals.baseline_coverage:.0%} of decode "
            "time had such a baseline)"
        )
    else:
        lines.append(
            "measured speed-up    not measured in this run: no plain decode step was timed beside the speculative ones "
            "(fixed k, or the vLLM backend: scripts/bench_vllm.py measures it)"
        )
    points = rollout.probe.points if rollout.probe is not None else []
    if points:
        first, last = points[0], points[-1]
        lines.append(
            f"held-out probe       acceptance {first.adaptive_acceptance:.3f} -> {last.adaptive_acceptance:.3f} with "
            f"the served adapter (v{last.adapter_version}), {first.frozen_acceptance:.3f} -> "
            f"{last.frozen_acceptance:.3f} with the starting one frozen (steps {first.step}-{last.step}, "
            f"{len(points)} measurements); policy KL to its start {last.policy_kl:.2e}"
        )
    adaptive = rollout.adaptive
    if adaptive is not None and adaptive.trainer is not None:
        m, served = adaptive.trainer.metrics(), adaptive.adapter_version
        lines.append(
            f"drafter              serving adapter v{served.adapter_version if served else 0}; drift to the policy on "
            f"the last distilled batch: TV {m['drafter/tv_to_policy']:.3f}, KL {m['drafter/kl_to_policy']:.3f} (nan: "
            f"not trained yet); {int(m['drafter/trainer_steps'])} distillation steps, "
            f"{int(m['drafter/trainer_errors'])} trainer errors"
        )
    if cost and cost.get("trainer_wall_share") is not None:
        cpu = cost["trainer_cpu_share"]
        line = (
            f"cost of freshness    the drafter trainer computed {cost['trainer_wall_share']:.0%} of the steps' wall "
            f"time" + (f" and used {cpu:.0%} of the process's CPU time" if cpu is not None else "")
        )
        if cost["step_time_ratio"] is not None:
            line += (
                f"; policy steps took {cost['step_seconds_trainer_running']:.1f} s with it running vs "
                f"{cost['step_seconds_trainer_held']:.1f} s held ({cost['step_time_ratio']:.2f}x)"
            )
        lines.append(line)
    lines.append(f"processes            {processes} (each with its own engine and drafter trainer)")
    lines.append(f"checkpoint           {args.output_dir}")
    import wandb

    if wandb.run is not None:
        where = "offline: `wandb sync` it to upload" if os.environ.get("WANDB_MODE") == "offline" else wandb.run.url
        lines.append(f"W&B run              {wandb.run.dir} ({where})")
    return "\n".join(lines)


def rewards_logged(trainer: GRPOTrainer) -> list[dict[str, Any]]:
    """The reward TRL logged at each step (mean and spread over the step's completions)."""
    return [
        {"step": row["step"], "reward": row["reward"], "reward_std": row.get("reward_std")}
        for row in trainer.state.log_history
        if "reward" in row
    ]


def write_run_record(rollout: AdaptiveRollout, trainer: GRPOTrainer, cost: dict[str, Any], path: Path) -> Path:
    """Everything the run measured about its drafter, as JSON: the probe's points, each rollout's tokens per verify
    and measured speed-up, the step times, the cost of freshness, the reward per logged step, and the machine."""
    import json

    from adaptive_drafter.metrics import machine_info

    record = {
        "probe": rollout.probe.as_dicts() if rollout.probe is not None else [],
        "rollouts": rollout.history,
        "step_times": rollout.step_times,
        "cost": cost,
        "rewards": rewards_logged(trainer),
        "events": rollout.events,
        "machine": machine_info(),
    }
    path.write_text(json.dumps(record, indent=1, default=str))
    return path


def make_rollout(args: RolloutArguments, spec: SpecConfig, drafter: DrafterConfig, distill: DistillConfig):
    """The rollout function for GRPOTrainer, or None for TRL's own generate."""
    if not args.speculative:
        return None
    if args.rollout_backend == "vllm":
        method = None if args.vllm_speculation == "none" else args.vllm_speculation
        return VLLMRollout(spec, drafter, distill, method=method)
    return SpeculativeRollout(spec, drafter, distill)


def show_drafter_events() -> None:
    """What happens to the drafter (restored from a checkpoint and which version, warm-started, fresh) is logged at
    INFO by adaptive_drafter: show it on the console."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[adaptive-drafter] %(message)s"))
    package = logging.getLogger("adaptive_drafter")
    if not package.handlers:
        package.addHandler(handler)
    package.setLevel(logging.INFO)


def _config_for_this_transformers(argv: list[str]) -> list[str]:
    """transformers 5.2x renamed `gradient_checkpointing` to `activation_checkpointing` (the old name warns); older
    versions, which the vLLM backend's environment pins, know only the old one. The YAML uses the new name: for an
    older transformers, a copy of it with the old name is parsed instead."""
    if "activation_checkpointing" in GRPOConfig.__dataclass_fields__:
        return argv
    index = argv.index("--config") + 1
    import tempfile

    import yaml

    config = yaml.safe_load(Path(argv[index]).read_text())
    renamed = {
        "activation_checkpointing": "gradient_checkpointing",
        "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs",
    }
    if not any(key in config for key in renamed):
        return argv
    config = {renamed.get(key, key): value for key, value in config.items()}
    copy = Path(tempfile.mkdtemp(prefix="grpo_spec_")) / Path(argv[index]).name
    copy.write_text(yaml.safe_dump(config))
    return [*argv[:index], str(copy), *argv[index + 1 :]]


def in_repo_if_relative(path: str | None) -> str | None:
    """A relative path that does not exist from here but does inside this repository (the shipped warm-start adapter,
    `drafters/...`, named by the default YAML) is taken from the repository: the recipe may be launched from anywhere."""
    if path is None or Path(path).is_absolute() or Path(path).exists():
        return path
    in_repo = DEFAULT_CONFIG.parents[1] / path
    return str(in_repo) if in_repo.exists() else path


def resume_point(args: GRPOConfig) -> str | None:
    """`--resume_from_checkpoint last` resumes from the newest checkpoint written completely (a run killed mid-save
    leaves a partial one, which `true` would pick); any other value is passed to the trainer as it is."""
    if args.resume_from_checkpoint != "last":
        return args.resume_from_checkpoint
    checkpoint = last_complete_checkpoint(args.output_dir)
    if checkpoint is None:
        raise ValueError(f"--resume_from_checkpoint last: no complete checkpoint under {args.output_dir}.")
    print(f"resuming from {checkpoint}")
    return str(checkpoint)


def main(argv: list[str] | None = None) -> GRPOTrainer:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    argv = _config_for_this_transformers(argv)
    show_drafter_events()
    parser = TrlParser(
        (
            TaskArguments, RolloutArguments, ProbeArguments, GRPOConfig, ModelConfig, SpecConfig, DrafterConfig,
            DistillConfig,
        )
    )  # fmt: skip
    task_args, rollout_args, probe_args, grpo_args, model_args, spec, drafter_config, distill_config = (
        parser.parse_args_and_config(argv)
    )
    use_wandb_offline_unless_logged_in(grpo_args)
    drafter_config.drafter_adapter_path = in_repo_if_relative(drafter_config.drafter_adapter_path)

    policy, tokenizer = load_policy(model_args, grpo_args.trust_remote_code)  # off unless the user sets it
    dataset, rewards = load_task(task_args)
    rollout = make_rollout(rollout_args, spec, drafter_config, distill_config)
    if rollout is not None:
        sampling = sampling_params(grpo_args)
        rollout.probe = make_probe(probe_args, task_args, dataset, tokenizer, spec, sampling, grpo_args.num_generations)
        rollout.hold_trainer_every = probe_args.hold_trainer_every
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=rewards,
        args=grpo_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        rollout_func=rollout,
        callbacks=[rollout.callback()] if rollout is not None else None,
    )
    try:
        trainer.train(resume_from_checkpoint=resume_point(grpo_args))
        trainer.save_model(grpo_args.output_dir)
        trainer.save_state()  # trainer_state.json: the log history (per-step times) for scripts/bench_grpo_step.py
        if rollout is not None:
            rollout.save(Path(grpo_args.output_dir) / "drafter")
            cost = rollout.cost()  # before close(): the trainer's threads carry its CPU clocks
    finally:
        if rollout is not None:
            rollout.close()
    if trainer.accelerator.is_main_process:
        if rollout is not None:
            print("\n" + summary(rollout, grpo_args, trainer.accelerator.num_processes, cost))
            picture = plot_run(
                rollout.probe, rollout.history, Path(grpo_args.output_dir) / "adaptive_drafter.png",
                f"{grpo_args.run_name or 'GRPO'}: {rollout.totals.emitted_tokens} rollout tokens",
                rewards=rewards_logged(trainer),
            )  # fmt: skip
            print(f"plot                 {picture}")
            record = write_run_record(rollout, trainer, cost, Path(grpo_args.output_dir) / "adaptive_drafter_run.json")
            print(f"run record           {record}")
        else:
            print(f"\nplain rollouts (TRL's own generate, no drafter); checkpoint {grpo_args.output_dir}")
    return trainer


if __name__ == "__main__":
    main()
