"""Configuration dataclasses, parsed by `HfArgumentParser`/`TrlParser` from YAML and the command line."""

from __future__ import annotations

from dataclasses import dataclass, field


ACCEPTANCE_RULES = ("exact", "lenient", "cascade")
DRAFTING = ("model", "hybrid", "suffix")
ROLLOUT_DTYPES = ("auto", "float32", "bfloat16")  # adaptive_drafter.precision resolves them


@dataclass
class SpecConfig:
    """How the speculative engine drafts and verifies (what the engines read; how the drafter is served is
    `ServingConfig`).

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
    elastic: bool = field(
        default=True,
        metadata={
            "help": "Choose per step between plain decoding and speculation with k <= num_draft_tokens, maximising the "
            "expected speed-up from the acceptance and costs measured online at the current batch size: an untrained "
            "or stale drafter then costs next to nothing. false: always draft num_draft_tokens (fixed k, opt-in)."
        },
    )
    plain_batch_threshold: int | None = field(
        default=None,
        metadata={"help": "Decode plainly (no drafting) while at least this many rows are active. None: no limit."},
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
    drafting: str = field(
        default="model",
        metadata={
            "help": "Where drafts come from: 'model' (the drafter model), 'hybrid' (per row and step, a model-free "
            "suffix draft from the row's siblings' completions, earlier rollouts of the same prompt and the row's own "
            "context where that promises more accepted tokens than the drafter model, else the model), or 'suffix' "
            "(suffix drafts only; the drafter model never runs). Lossless under the exact rule whatever the source."
        },
    )
    suffix_max_draft: int = field(
        default=16, metadata={"help": "hybrid/suffix drafting: the longest suffix draft of a row in one step."}
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
        if self.plain_batch_threshold is not None and self.plain_batch_threshold < 1:
            raise ValueError(
                f"SpecConfig.plain_batch_threshold must be >= 1 or None, got {self.plain_batch_threshold}."
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
        if self.drafting not in DRAFTING:
            raise ValueError(f"Unknown SpecConfig.drafting {self.drafting!r}: choose one of {', '.join(DRAFTING)}.")
        if self.suffix_max_draft < 1:
            raise ValueError(f"SpecConfig.suffix_max_draft must be >= 1, got {self.suffix_max_draft}.")


@dataclass
class ServingConfig:
    """How the adaptive drafter is served to an engine and watched, and the precision rollouts run in: read by
    `AdaptiveDrafter` and the rollout backends (the engine never reads it)."""

    merge_lora: bool = field(
        default=True,
        metadata={
            "help": "Draft with a copy of the drafter whose LoRA weights are merged into its adapted layers, refreshed "
            "whenever the adapter changes: faster steps for the memory of those layers. Off: draft with the peft model."
        },
    )
    draft_vocab_size: int = field(
        default=0,
        metadata={
            "help": "Draft over only the N tokens most frequent in past completions (0: the full vocabulary). The "
            "drafter's LM head dominates a small drafter's step at a 50k-150k vocabulary; this cuts it. Lossless with "
            "the exact rule: the drafter gives q = 0 to the other tokens, which the policy still emits when it wants."
        },
    )
    rollout_dtype: str = field(
        default="auto",
        metadata={
            "help": "Precision rollouts run in (the policy's serving copy and the drafter): 'auto' (bfloat16 where the "
            "policy trains in float32 and the hardware computes bfloat16 fast: a CUDA GPU from Ampere on, a CPU with "
            "AVX512-BF16 or AMX; the policy's own dtype elsewhere), 'float32' or 'bfloat16'. The copy is synced after "
            "every optimizer step; training keeps its own precision. Lossless either way: completions follow the "
            "policy as the rollout copy computes it. 'float32' keeps greedy rollouts token-identical to fp32 generate."
        },
    )
    stale_acceptance: float = field(
        default=0.05,
        metadata={"help": "Alarm (warning + drafter/stale_alarm metric) when the running acceptance falls below this."},
    )
    stale_version_lag: int = field(
        default=50,
        metadata={"help": "Alarm when the served adapter lags the policy by more than this many policy versions."},
    )

    def __post_init__(self) -> None:
        if self.draft_vocab_size < 0:
            raise ValueError(
                f"ServingConfig.draft_vocab_size must be >= 0 (0: all tokens), got {self.draft_vocab_size}."
            )
        if self.rollout_dtype not in ROLLOUT_DTYPES:
            raise ValueError(
                f"Unknown ServingConfig.rollout_dtype {self.rollout_dtype!r}: choose one of {', '.join(ROLLOUT_DTYPES)} "
                "('auto' runs rollouts in bfloat16 where the hardware computes it fast, 'float32' keeps them in fp32)."
            )
        if not 0.0 <= self.stale_acceptance <= 1.0:
            raise ValueError(f"ServingConfig.stale_acceptance must lie in [0, 1], got {self.stale_acceptance}.")
        if self.stale_version_lag < 0:
            raise ValueError(f"ServingConfig.stale_version_lag must be >= 0, got {self.stale_version_lag}.")


DRAFTER_KINDS = ("truncated", "model", "eagle")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class DrafterConfig:
    """What the drafter is and which of its weights the distiller trains.

    `kind="truncated"` (default) is a self-draft copied from the policy: its embeddings, first `num_layers` decoder
    layers, final norm and LM head. `kind="model"` is a separate causal LM sharing the policy's tokenizer
    (`model_name_or_path`). Either way LoRA adapters (peft) on `lora_target_modules` are what the distiller trains.
    """

    drafter_kind: str = field(
        default="truncated",
        metadata={
            "help": "'truncated' (self-draft from the policy's first layers), 'model' (a separate small LM) or "
            "'eagle' (a head over the policy's own last-layer features, adaptive_drafter.eagle: one decoder layer "
            "copied from the policy's last, adapted with LoRA, plus a fusion layer trained fully)."
        },
    )
    drafter_num_layers: int = field(default=4, metadata={"help": "Decoder layers of a truncated self-draft."})
    drafter_model_name_or_path: str | None = field(
        default=None, metadata={"help": "kind='model': the drafter's path or hub id (same tokenizer as the policy)."}
    )
    drafter_lora_r: int = field(default=32, metadata={"help": "LoRA rank."})
    drafter_lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    drafter_lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout while training the drafter."})
    drafter_lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        metadata={"help": "Module names that get LoRA adapters (all attention and MLP projections by default)."},
    )
    drafter_adapter_path: str | None = field(
        default=None,
        metadata={
            "help": "Warm start: load the LoRA adapter saved here (by scripts/distill_drafter.py or a checkpoint) into "
            "the new drafter before the first rollout. It must fit this config (layers, rank, targets) and policy. "
            "'' or none: a fresh drafter."
        },
    )
    drafter_eagle_layout: str | None = field(
        default=None,
        metadata={
            "help": "kind='eagle': the head's layout. 'eagle': fc over [features, next token's embedding]; 'eagle3': "
            "vLLM's EAGLE-3 checkpoint layout (the embedding read by attention beside the features), the one the vLLM "
            "backend serves (--vllm_speculation eagle3), and the one that drafts better here. None: the warm head's "
            "(drafter_adapter_path), else 'eagle3'."
        },
    )
    drafter_trust_remote_code: bool = field(
        default=False, metadata={"help": "kind='model': allow the drafter's own modelling code (off: safer)."}
    )

    def __post_init__(self) -> None:
        if self.drafter_adapter_path is not None and self.drafter_adapter_path.strip().lower() in ("", "none"):
            self.drafter_adapter_path = None  # how a command line overrides a YAML's warm start
        if self.drafter_kind not in DRAFTER_KINDS:
            raise ValueError(f"Unknown drafter kind {self.drafter_kind!r}: choose one of {', '.join(DRAFTER_KINDS)}.")
        if self.drafter_eagle_layout not in (None, "eagle", "eagle3"):
            raise ValueError(
                f"DrafterConfig.drafter_eagle_layout must be 'eagle' or 'eagle3', got {self.drafter_eagle_layout!r}."
            )
        if self.drafter_kind == "truncated" and self.drafter_num_layers < 1:
            raise ValueError(f"DrafterConfig.drafter_num_layers must be >= 1, got {self.drafter_num_layers}.")
        if self.drafter_lora_r < 1 or self.drafter_lora_alpha <= 0:
            raise ValueError(
                f"LoRA needs lora_r >= 1 and lora_alpha > 0, got r={self.drafter_lora_r}, alpha={self.drafter_lora_alpha}."
            )
        if not 0.0 <= self.drafter_lora_dropout < 1.0:
            raise ValueError(f"DrafterConfig.drafter_lora_dropout must lie in [0, 1), got {self.drafter_lora_dropout}.")
        if not self.drafter_lora_target_modules:
            raise ValueError("DrafterConfig.drafter_lora_target_modules is empty: LoRA would train nothing.")


@dataclass
class DistillConfig:
    """How the background trainer distills the moving policy into the drafter's LoRA adapters."""

    distill_loss: str = field(
        default="fkl", metadata={"help": "Divergence to the policy's top-K targets: fkl, rkl, tv, jsd or mix."}
    )
    distill_mix_weights: str = field(default="", metadata={"help": "loss='mix' only: weights as 'fkl:0.5,tv:0.5'."})
    distill_topk: int = field(default=32, metadata={"help": "Policy logprobs kept per generated position (K)."})
    distill_rejected_weight: float = field(
        default=1.0, metadata={"help": "Extra loss weight on positions whose draft the policy rejected."}
    )
    distill_learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the LoRA weights."})
    distill_batch_size: int = field(default=8, metadata={"help": "Completions per distillation step."})
    distill_buffer_tokens: int = field(default=65536, metadata={"help": "Completion tokens the buffer keeps (newest)."})
    distill_recency_half_life: float = field(
        default=2.0, metadata={"help": "A row's sampling weight halves every this many policy versions of age."}
    )
    distill_min_buffer_tokens: int = field(default=256, metadata={"help": "Tokens buffered before training starts."})
    distill_publish_every: int = field(
        default=8, metadata={"help": "Optimizer steps between published adapter versions."}
    )
    distill_max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    distill_on_error: str = field(
        default="restart",
        metadata={"help": "After a trainer fault: 'restart' (roll back to the last good adapter, back off) or 'stop'."},
    )
    distill_max_restarts: int = field(
        default=5, metadata={"help": "Consecutive faults tolerated before the trainer stops."}
    )
    distill_restart_backoff_s: float = field(default=1.0, metadata={"help": "First back-off after a fault; doubles."})
    distill_step_timeout_s: float | None = field(
        default=600.0,
        metadata={
            "help": "A distillation step running longer than this is a fault (a hang): it is abandoned, the trainer "
            "rolls back to a fresh copy of the last good adapter and restarts or stops (None: no timeout)."
        },
    )
    distill_duty_cycle: float = field(
        default=1.0,
        metadata={
            "help": "Largest share of wall time the background trainer may compute; it sleeps the rest. Below 1 it "
            "bounds the trainer's cost where it shares cores with rollouts (a CPU)."
        },
    )
    distill_device: str | None = field(
        default=None, metadata={"help": "Device of the trainer's drafter copy (default: the serving drafter's)."}
    )
    distill_effort: str = field(
        default="auto",
        metadata={
            "help": "'auto': train while the drafter's expected acceptance on fresh rollouts improves or falls behind, "
            "idle while it holds (adaptive_drafter.effort); 'always': train at the duty cycle all the time."
        },
    )
    distill_effort_patience: int = field(
        default=3, metadata={"help": "auto: published adapters without gain before the trainer idles."}
    )
    distill_effort_min_gain: float = field(
        default=0.01, metadata={"help": "auto: expected-acceptance gain over `patience` adapters that keeps training."}
    )
    distill_eagle_depth: int = field(
        default=3,
        metadata={
            "help": "drafter_kind='eagle': draft steps the head is unrolled over in training, its own outputs fed back "
            "(EAGLE-3's training-time test); step d weighs 0.8^(d-1)."
        },
    )
    distill_swap_gate: bool = field(
        default=True,
        metadata={
            "help": "Publish a new adapter only if its expected acceptance (1 - TV to the policy) on the newest "
            "rollouts no training step has seen is not below the served adapter's beyond noise (two standard errors "
            "of the per-row difference): adaptation never serves a worse drafter (drafter/swap_rejected counts "
            "the refusals). Off: publish every distill_publish_every steps."
        },
    )
    distill_effort_tolerance: float = field(
        default=0.03, metadata={"help": "auto: expected-acceptance drop on fresh rollouts that resumes training."}
    )

    def __post_init__(self) -> None:
        kinds = ("fkl", "rkl", "tv", "jsd", "mix")
        if self.distill_loss not in kinds:
            raise ValueError(f"Unknown distillation loss {self.distill_loss!r}: choose one of {', '.join(kinds)}.")
        if (self.distill_loss == "mix") != bool(self.distill_mix_weights):
            raise ValueError(
                "DistillConfig.distill_mix_weights ('fkl:0.5,tv:0.5') is needed with loss='mix', and only then."
            )
        self.mix()  # parse now: a malformed string fails at start-up, not in the background thread
        for name in (
            "distill_topk", "distill_batch_size", "distill_buffer_tokens", "distill_publish_every", "distill_eagle_depth"
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"DistillConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.distill_min_buffer_tokens > self.distill_buffer_tokens:
            raise ValueError(
                f"DistillConfig.distill_min_buffer_tokens ({self.distill_min_buffer_tokens}) exceeds buffer_tokens "
                f"({self.distill_buffer_tokens}): training would never start."
            )
        if self.distill_learning_rate <= 0 or self.distill_rejected_weight < 0 or self.distill_recency_half_life <= 0:
            raise ValueError("DistillConfig needs learning_rate > 0, rejected_weight >= 0, recency_half_life > 0.")
        if not 0.0 < self.distill_duty_cycle <= 1.0:
            raise ValueError(f"DistillConfig.distill_duty_cycle must lie in (0, 1], got {self.distill_duty_cycle}.")
        if self.distill_step_timeout_s is not None and self.distill_step_timeout_s <= 0:
            raise ValueError(
                f"DistillConfig.distill_step_timeout_s must be > 0 or None, got {self.distill_step_timeout_s}."
            )
        if self.distill_effort not in ("auto", "always"):
            raise ValueError(f"DistillConfig.distill_effort must be 'auto' or 'always', got {self.distill_effort!r}.")
        if self.distill_effort_patience < 1 or self.distill_effort_min_gain < 0 or self.distill_effort_tolerance <= 0:
            raise ValueError("distill_effort_patience must be >= 1, min_gain >= 0 and tolerance > 0.")
        if self.distill_on_error not in ("restart", "stop"):
            raise ValueError(
                f"DistillConfig.distill_on_error must be 'restart' or 'stop', got {self.distill_on_error!r}."
            )

    def mix(self) -> dict[str, float] | None:
        """`mix_weights` parsed into a dict (None unless loss='mix')."""
        if self.distill_loss != "mix":
            return None
        try:
            pairs = (item.split(":") for item in self.distill_mix_weights.split(",") if item.strip())
            return {name.strip(): float(weight) for name, weight in pairs}
        except ValueError as exc:
            raise ValueError(
                f"DistillConfig.distill_mix_weights must look like 'fkl:0.5,tv:0.5', got {self.distill_mix_weights!r}."
            ) from exc
