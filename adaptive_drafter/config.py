"""Configuration dataclasses, parsed by `HfArgumentParser`/`TrlParser` from YAML and the command line."""

from __future__ import annotations

from dataclasses import dataclass, field

ACCEPTANCE_RULES = ("exact", "lenient", "cascade")


@dataclass
class SpecConfig:
    """How the speculative engine drafts and verifies.

    `acceptance="exact"` is the default and the only lossless rule: completions follow the policy's own
    sampling distribution whatever the drafter proposes (greedy: token-identical to `policy.generate`).
    `lenient` and `cascade` are lossy, opt-in, and still report the policy's logprobs so the RL loss can
    importance-correct.
    """

    num_draft_tokens: int = field(default=4, metadata={"help": "Tokens the drafter proposes per verify step (k)."})
    acceptance: str = field(
        default="exact",
        metadata={"help": "Acceptance rule: 'exact' (lossless), 'lenient' (lossy) or 'cascade' (lossy)."},
    )
    lenience: float = field(
        default=2.0, metadata={"help": "Lossy 'lenient' rule only: accept with probability min(1, lenience*p/q)."}
    )
    cascade_threshold: float = field(
        default=0.3,
        metadata={"help": "Lossy 'cascade' rule only: accept a draft token d when p(d) >= threshold * max p."},
    )
    vocab_size: int | None = field(
        default=None,
        metadata={
            "help": "Size of the shared tokenizer vocabulary. Needed only when the two models' embedding matrices are "
            "padded to different sizes; logits are sliced to it so no id beyond the tokenizer is ever emitted."
        },
    )
    collect_topk: int = field(
        default=0,
        metadata={
            "help": "Keep the policy's top-K logprobs at every generated position (`SpecOutput.targets`), the "
            "distiller's targets at no extra forward pass. 0 (default) collects nothing."
        },
    )
    compact_threshold: float = field(
        default=0.5,
        metadata={"help": "Compact the KV caches when more than this fraction of their slots are holes or padding."},
    )

    def __post_init__(self) -> None:
        if self.num_draft_tokens < 1:
            raise ValueError(
                f"SpecConfig.num_draft_tokens must be >= 1, got {self.num_draft_tokens}. "
                "Use plain `policy.generate` if you do not want to speculate."
            )
        if self.acceptance not in ACCEPTANCE_RULES:
            raise ValueError(
                f"Unknown acceptance rule {self.acceptance!r}: choose one of {', '.join(ACCEPTANCE_RULES)} "
                "('exact' is the lossless default)."
            )
        if self.lenience < 1.0:
            raise ValueError(f"SpecConfig.lenience must be >= 1 (1 is the exact rule), got {self.lenience}.")
        if not 0.0 <= self.cascade_threshold <= 1.0:
            raise ValueError(f"SpecConfig.cascade_threshold must lie in [0, 1], got {self.cascade_threshold}.")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"SpecConfig.vocab_size must be positive, got {self.vocab_size}.")
        if self.collect_topk < 0:
            raise ValueError(f"SpecConfig.collect_topk must be >= 0 (0 disables it), got {self.collect_topk}.")
        if not 0.0 < self.compact_threshold <= 1.0:
            raise ValueError(f"SpecConfig.compact_threshold must lie in (0, 1], got {self.compact_threshold}.")


DRAFTER_KINDS = ("truncated", "model")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class DrafterConfig:
    """What the drafter is and which of its weights the distiller trains.

    `kind="truncated"` (default) is a self-draft copied from the policy: its embeddings, first `num_layers` decoder
    layers, final norm and LM head. `kind="model"` is a separate causal LM sharing the policy's tokenizer
    (`model_name_or_path`). Either way LoRA adapters (peft) on `lora_target_modules` are what the distiller trains.
    """

    kind: str = field(default="truncated", metadata={"help": "'truncated' (self-draft from the policy) or 'model'."})
    num_layers: int = field(default=4, metadata={"help": "Decoder layers of a truncated self-draft."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "kind='model': the drafter's path or hub id (same tokenizer as the policy)."}
    )
    lora_r: int = field(default=32, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout while training the drafter."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        metadata={"help": "Module names that get LoRA adapters (all attention and MLP projections by default)."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "kind='model': allow the drafter's own modelling code (off: safer)."}
    )

    def __post_init__(self) -> None:
        if self.kind not in DRAFTER_KINDS:
            raise ValueError(f"Unknown drafter kind {self.kind!r}: choose one of {', '.join(DRAFTER_KINDS)}.")
        if self.kind == "truncated" and self.num_layers < 1:
            raise ValueError(f"DrafterConfig.num_layers must be >= 1, got {self.num_layers}.")
        if self.lora_r < 1 or self.lora_alpha <= 0:
            raise ValueError(f"LoRA needs lora_r >= 1 and lora_alpha > 0, got r={self.lora_r}, alpha={self.lora_alpha}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"DrafterConfig.lora_dropout must lie in [0, 1), got {self.lora_dropout}.")
        if not self.lora_target_modules:
            raise ValueError("DrafterConfig.lora_target_modules is empty: LoRA would train nothing.")
