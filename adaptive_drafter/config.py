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
        if not 0.0 < self.compact_threshold <= 1.0:
            raise ValueError(f"SpecConfig.compact_threshold must lie in (0, 1], got {self.compact_threshold}.")
