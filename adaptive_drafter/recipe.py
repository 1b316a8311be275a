"""The building blocks of `recipes/grpo_spec.py`, which stays a TRL-style script (parse, build, train, report): its
argument groups beside GRPOConfig/ModelConfig and the package's configs, the policy and task, the rollout function and
its held-out probe, and the launch chores (W&B offline, resume, transformers' renamed flags).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, ModelConfig

from .backends import VLLMBackend
from .config import DistillConfig, DrafterConfig, ServingConfig, SpecConfig
from .probe import DrafterProbe
from .sampling import SamplingParams
from .tasks import TASKS, Reward, chat_batch, exact_match_reward
from .tasks import load_task as load_task_by_name
from .trl import SpeculativeRollout, last_complete_checkpoint


@dataclass
class TaskArguments:
    """The training data: the embedded arithmetic task, or a hub/local dataset with `prompt` and `answer` columns."""

    dataset_name: str = field(
        default="arithmetic",
        metadata={
            "help": "An embedded task ('arithmetic': short answers; 'reasoning': long completions) or a dataset."
        },
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
        metadata={
            "help": "vllm backend: 'draft_model' (the adaptive truncated drafter), 'eagle3' (the adaptive EAGLE head, "
            "drafter_kind: eagle in the eagle3 layout), 'ngram', 'suffix' or 'none'."
        },
    )

    def __post_init__(self) -> None:
        if self.rollout_backend not in ("hf", "vllm"):
            raise ValueError(f"--rollout_backend must be 'hf' or 'vllm', got {self.rollout_backend!r}.")
        if self.vllm_speculation not in ("draft_model", "eagle3", "ngram", "suffix", "none"):
            raise ValueError(
                f"--vllm_speculation must be draft_model, eagle3, ngram, suffix or none, got {self.vllm_speculation!r}."
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
    return DrafterProbe(
        ids, mask, every=args.probe_every, num_draft_tokens=spec.num_draft_tokens,
        max_new_tokens=args.probe_max_new_tokens, sampling=sampling, eos_token_id=tokenizer.eos_token_id,
        suffix_group=group if args.probe_suffix else 0, suffix_max_draft=spec.suffix_max_draft,
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


def make_rollout(
    args: RolloutArguments, spec: SpecConfig, serving: ServingConfig, drafter: DrafterConfig, distill: DistillConfig
) -> SpeculativeRollout | None:
    """The rollout function for GRPOTrainer, or None for TRL's own generate."""
    if not args.speculative:
        return None
    backend = None
    if args.rollout_backend == "vllm":
        backend = VLLMBackend(None if args.vllm_speculation == "none" else args.vllm_speculation)
    return SpeculativeRollout(spec, drafter, distill, serving_config=serving, backend=backend)


def show_drafter_events() -> None:
    """What happens to the drafter (restored from a checkpoint and which version, warm-started, fresh) is logged at
    INFO by adaptive_drafter: show it on the console."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[adaptive-drafter] %(message)s"))
    package = logging.getLogger("adaptive_drafter")
    if not package.handlers:
        package.addHandler(handler)
    package.setLevel(logging.INFO)


def config_for_this_transformers(argv: list[str]) -> list[str]:
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


def in_repo_if_relative(path: str | None, root: Path) -> str | None:
    """A relative path that does not exist from here but does inside the repository at `root` (the shipped warm-start
    adapter, `drafters/...`, named by the default YAML) is taken from there: the recipe may be launched from anywhere.
    """
    if path is None or Path(path).is_absolute() or Path(path).exists():
        return path
    in_repo = root / path
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
