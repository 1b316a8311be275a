"""What a rollout returns, whatever engine decoded it: the completions with their logprobs (`SpecOutput`) and, on
request, the policy's top-K teacher signal at every generated position (`PolicyTargets`). Both engines (the Hugging
Face `engine` and `vllm_engine`) and the training side import it; it imports neither, so decoding never depends on
training code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from .metrics import SpecStats
from .sampling import SamplingParams


@dataclass
class PolicyTargets:
    """The policy's teacher signal for one completion, as the speculative engine saw it (no extra forward pass).

    Row t of the tensors describes completion position t: the distribution `completion_ids[t]` was drawn from.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    topk_ids: torch.Tensor  # [T, K] int64: the policy's top-K token ids at completion position t (distinct per row)
    topk_logprobs: torch.Tensor  # [T, K] float (float16 saves memory): their log-probabilities (not renormalised)
    drafted: torch.Tensor  # [T] bool: a draft token was proposed for position t
    accepted: torch.Tensor  # [T] bool: ...and accepted (rejected = drafted & ~accepted)
    policy_version: int = 0
    # [P + T - 1, H] (bf16 saves memory): the policy's last-layer output at every position it read (all but the last
    # token), for drafters that read the policy's features (`eagle`); None when not collected.
    features: torch.Tensor | None = None

    def __post_init__(self) -> None:
        num, ids, logprobs = len(self.completion_ids), self.topk_ids, self.topk_logprobs
        if len(self.prompt_ids) == 0:
            # The first completion token is predicted by the logits at the last prompt position: there must be one.
            raise ValueError("PolicyTargets.prompt_ids is empty: the first completion token needs a prompt token.")
        if ids.dim() != 2 or ids.shape[0] != num or ids.shape[1] < 1:
            raise ValueError(
                f"PolicyTargets.topk_ids must have shape [T, K] = [{num}, K >= 1] (one row per completion token), "
                f"got {list(ids.shape)}."
            )
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"PolicyTargets.topk_ids must hold integer token ids, got dtype {ids.dtype}.")
        if logprobs.shape != ids.shape:
            raise ValueError(
                f"PolicyTargets.topk_logprobs must have the shape of topk_ids {list(ids.shape)}, "
                f"got {list(logprobs.shape)}."
            )
        if not logprobs.dtype.is_floating_point:
            raise ValueError(f"PolicyTargets.topk_logprobs must be floating point, got dtype {logprobs.dtype}.")
        if logprobs.isnan().any() or (logprobs == math.inf).any():
            raise ValueError("PolicyTargets.topk_logprobs holds NaN or +inf.")
        if num and not logprobs.isfinite().any(-1).all():
            raise ValueError("PolicyTargets.topk_logprobs has a position whose K logprobs are all -inf (no target).")
        for name in ("drafted", "accepted"):
            mask = getattr(self, name)
            if mask.shape != (num,) or mask.dtype != torch.bool:
                raise ValueError(
                    f"PolicyTargets.{name} must be a bool tensor of shape [{num}], got {mask.dtype} {list(mask.shape)}."
                )
        if (self.accepted & ~self.drafted).any():
            raise ValueError("PolicyTargets.accepted is True at a position with no draft (drafted is False there).")
        read = len(self.prompt_ids) + num - 1
        if self.features is not None and (self.features.dim() != 2 or self.features.shape[0] != read):
            raise ValueError(
                f"PolicyTargets.features must have shape [P + T - 1, H] = [{read}, H] (one row per position the policy "
                f"read), got {list(self.features.shape)}."
            )

    @property
    def num_tokens(self) -> int:
        """Number of completion tokens T (each carries one target)."""
        return len(self.completion_ids)

    @property
    def rejected(self) -> torch.Tensor:
        """`[T]` bool: a draft was proposed for position t and rejected."""
        return self.drafted & ~self.accepted

    def truncated(self, num_tokens: int) -> PolicyTargets:
        """The first `num_tokens` completion positions (still valid targets: each depends only on what precedes it)."""
        return PolicyTargets(
            prompt_ids=self.prompt_ids,
            completion_ids=self.completion_ids[:num_tokens],
            topk_ids=self.topk_ids[:num_tokens],
            topk_logprobs=self.topk_logprobs[:num_tokens],
            drafted=self.drafted[:num_tokens],
            accepted=self.accepted[:num_tokens],
            policy_version=self.policy_version,
            features=None if self.features is None else self.features[: len(self.prompt_ids) + num_tokens - 1],
        )


@dataclass
class SpecOutput:
    """Result of a rollout (`generate` of either engine), one entry per prompt row."""

    completion_ids: list[list[int]]  # the new tokens, up to and including the first eos
    logprobs: list[list[float]]  # the policy's logprob of each of them under the sampling distribution
    stats: SpecStats = field(default_factory=SpecStats)
    targets: list[PolicyTargets] | None = None  # the distiller's targets, when top-K collection was asked for


class RolloutEngine(Protocol):
    """The rollout contract both engines implement (`engine.SpeculativeEngine`, `vllm_engine.VLLMEngine`), through
    which `AdaptiveDrafter.generate` and the TRL rollout drive either one.

    `generate` decodes unpadded token-id prompts under `sampling`, stops each row at its first `eos_token_id`, seeds
    row randomness from `seed`, keeps the policy's top-K targets when `collect_topk` > 0 (stamped `policy_version`)
    and refuses with a ValueError any setting it cannot honour. `load_drafter` serves a new drafter for the next calls,
    in the engine's `drafter_format`: a model to draft with ("module") or its merged Hugging Face-named weights
    ("weights").
    """

    drafter_format: Literal["module", "weights"]

    @property
    def collect_topk(self) -> int: ...

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        sampling: SamplingParams | None = None,
        *,
        max_new_tokens: int = 64,
        eos_token_id: int | Sequence[int] | None = None,
        seed: int | None = None,
        collect_topk: int | None = None,
        policy_version: int = 0,
    ) -> SpecOutput: ...

    def load_drafter(self, drafter: Any, *, new_version: bool = ...) -> None: ...
