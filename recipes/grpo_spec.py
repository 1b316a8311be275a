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

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer, ModelConfig, TrlParser

from adaptive_drafter.config import DistillConfig, DrafterConfig, SpecConfig
from adaptive_drafter.metrics import speedup_estimate
from adaptive_drafter.trl import SpeculativeRollout, last_complete_checkpoint

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "grpo_spec.yaml"


@dataclass
class TaskArguments:
    """The training data: the embedded arithmetic task, or a hub/local dataset with `prompt` and `answer` columns."""

    dataset_name: str = field(default="arithmetic", metadata={"help": "'arithmetic' (generated) or a dataset path."})
    dataset_split: str = field(default="train", metadata={"help": "Split of dataset_name to train on."})
    num_examples: int = field(default=512, metadata={"help": "arithmetic: how many problems to generate."})


@dataclass
class RolloutArguments:
    """Which rollout backend generates: the speculative engine, or TRL's own `generate` (the baseline to compare)."""

    speculative: bool = field(
        default=True,
        metadata={"help": "false: TRL's own generate, no drafter (the plain baseline of scripts/bench_grpo_step.py)."},
    )


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


def load_task(args: TaskArguments):
    if args.dataset_name == "arithmetic":
        from adaptive_drafter.embedded import arithmetic_task

        return arithmetic_task(args.num_examples)
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
    return dataset


def _text(completion) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def exact_match_reward(completions, answer, **kwargs) -> list[float]:
    """1 when the last number in the completion is the answer."""
    numbers = [re.findall(r"-?\d+", _text(c)) for c in completions]
    return [float(bool(found) and found[-1] == a.strip()) for found, a in zip(numbers, answer)]


def format_reward(completions, **kwargs) -> list[float]:
    """0.2 for answering with a bare number, as asked."""
    return [0.2 * bool(re.fullmatch(r"\s*-?\d+\s*\.?\s*", _text(c))) for c in completions]


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


def summary(rollout: SpeculativeRollout, args: GRPOConfig, spec: SpecConfig, processes: int = 1) -> str:
    totals = rollout.totals
    alpha, accepted_len = totals.acceptance_rate, totals.mean_accepted_len
    drafter, policy = rollout.drafter, rollout.engine.policy if rollout.engine else None
    cost = sum(p.numel() for p in drafter.parameters()) / sum(p.numel() for p in policy.parameters()) if policy else 0
    lines = [
        f"acceptance rate      {alpha:.3f} over {totals.drafted} drafted tokens",
        f"mean accepted length {accepted_len:.2f} (+1 bonus/correction per verify)",
        f"speed-up estimate    {speedup_estimate(alpha, spec.num_draft_tokens, cost):.2f}x (drafter/policy cost "
        f"c={cost:.2f} from parameter counts, verify cost 1: a GPU at small batch; a CPU verifies slower)",
    ]
    if rollout.drafter_trainer is not None:
        m, served = rollout.drafter_trainer.metrics(), rollout.engine.adapter_version
        lines.append(
            f"drafter              adapter v{served.adapter_version if served else 0}, drift to the policy: "
            f"TV {m['drafter/tv_to_policy']:.3f}, KL {m['drafter/kl_to_policy']:.3f} (nan: not trained yet); "
            f"{int(m['drafter/trainer_steps'])} distillation steps, {int(m['drafter/trainer_errors'])} trainer errors"
        )
    lines.append(f"processes            {processes} (each with its own engine and drafter trainer)")
    lines.append(f"checkpoint           {args.output_dir}")
    import wandb

    if wandb.run is not None:
        where = "offline: `wandb sync` it to upload" if os.environ.get("WANDB_MODE") == "offline" else wandb.run.url
        lines.append(f"W&B run              {wandb.run.dir} ({where})")
    return "\n".join(lines)


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
    parser = TrlParser(
        (TaskArguments, RolloutArguments, GRPOConfig, ModelConfig, SpecConfig, DrafterConfig, DistillConfig)
    )
    task_args, rollout_args, grpo_args, model_args, spec, drafter_config, distill_config = (
        parser.parse_args_and_config(argv)
    )
    use_wandb_offline_unless_logged_in(grpo_args)

    policy, tokenizer = load_policy(model_args, grpo_args.trust_remote_code)  # off unless the user sets it
    rollout = SpeculativeRollout(spec, drafter_config, distill_config) if rollout_args.speculative else None
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=[exact_match_reward, format_reward],
        args=grpo_args,
        train_dataset=load_task(task_args),
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
    finally:
        if rollout is not None:
            rollout.close()
    if trainer.accelerator.is_main_process:
        if rollout is not None:
            print("\n" + summary(rollout, grpo_args, spec, trainer.accelerator.num_processes))
        else:
            print(f"\nplain rollouts (TRL's own generate, no drafter); checkpoint {grpo_args.output_dir}")
    return trainer


if __name__ == "__main__":
    main()
