"""Training the EAGLE-style head (`eagle.EagleHead`) from what rollouts collected: the policy's top-K targets and its
features at every position it read (`PolicyTargets.features`, from the verify pass at no extra forward).

The head's output at position s predicts x_{s+2}, whose target is the policy's distribution at s + 1, so the batch is
the drafter's `DistillBatch` shifted by one. The loss is unrolled over `depth` draft steps with the head's own outputs
fed back (EAGLE-3's training-time test), step d weighted `decay`^(d-1): a head trained on true features alone decays
fast along its own chain (the calibration in ../shared/MEASURED.md: α 0.49 / 0.35 / 0.23 / 0.16 by depth).

A head with a draft vocabulary (`EagleHead.draft_ids`) is trained over it: each target is the policy's distribution
conditioned on the tokens the head can propose (the top-K ids outside its vocabulary dropped, the rest renormalised,
the "other" bucket keeping the policy's mass on unlisted ids), which is what its acceptance Σ min(p, q) can gain from.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from .distill import distill_loss
from .eagle import EagleHead, feature_layers, layer_ids
from .outputs import PolicyTargets
from .targets import DistillBatch, collate


def collate_features(rows: list[PolicyTargets], pad_id: int = 0) -> tuple[DistillBatch, torch.Tensor]:
    """The rows as a `DistillBatch` and their features `[B, L, H]` (float32, aligned with `input_ids`; zero where the
    policy read nothing: padding and each row's last token). Every row needs features."""
    batch = collate(rows, pad_id)
    return batch, require_features(batch)


def require_features(batch: DistillBatch) -> torch.Tensor:
    """The batch's features, or a clear error when its rows were collected without them."""
    if batch.features is None:
        raise ValueError(
            "Training an eagle head needs the policy's features in every row (PolicyTargets.features): collect them "
            "with an eagle drafter serving, or set engine.collect_features = True."
        )
    return batch.features


def shifted(batch: DistillBatch) -> DistillBatch:
    """The batch aligned with the head's outputs: position s (pair f_s, x_{s+1}) has the target of x_{s+2}."""
    return DistillBatch(
        batch.input_ids[:, 1:],
        batch.attention_mask[:, 1:],
        batch.topk_ids[:, 1:],
        batch.topk_logprobs[:, 1:],
        batch.loss_mask[:, 1:],
        batch.rejected[:, 1:],
        batch.policy_versions,
    )


# A draft vocabulary's stand-in for the ids outside it: a logit low enough that q there is 0 in float32 and bf16, finite
# so that 0 · log q stays 0 in the losses.
_OUTSIDE_LOGIT = -1e4


def in_draft_vocab(head: EagleHead, batch: DistillBatch) -> DistillBatch:
    """`batch` with its targets over the head's draft vocabulary: ids as draft indices, ids outside it at index N (a
    column `head_logits` appends) with probability 0, the rest renormalised by the mass they keep. Unchanged for a head
    over the whole vocabulary."""
    if head.draft_ids is None:
        return batch
    size = head.draft_vocab_size
    lookup = torch.full((head.config.vocab_size,), size, dtype=torch.long, device=batch.topk_ids.device)
    lookup[head.draft_ids.to(lookup.device)] = torch.arange(size, device=lookup.device)
    ids = lookup[batch.topk_ids.long()]
    outside = ids == size
    logprobs = batch.topk_logprobs.float()
    dropped = logprobs.masked_fill(~outside, -math.inf).logsumexp(-1, keepdim=True)
    # p / (1 − dropped): the policy given that it does not pick a listed id outside the vocabulary
    scale = torch.log1p(-dropped.exp().clamp_max(1 - 1e-6))
    logprobs = torch.where(outside, -math.inf, logprobs - scale)
    return DistillBatch(batch.input_ids, batch.attention_mask, ids, logprobs, batch.loss_mask, batch.rejected,
                        batch.policy_versions)  # fmt: skip


def head_logits(head: EagleHead, g: torch.Tensor) -> torch.Tensor:
    """The head's logits at outputs `g [..., H]` as `in_draft_vocab`'s targets index them: over the draft vocabulary
    plus the column of ids outside it, or over the whole vocabulary."""
    logits = head.logits(g)
    if head.draft_ids is None:
        return logits
    return torch.cat([logits, logits.new_full((*logits.shape[:-1], 1), _OUTSIDE_LOGIT)], -1)


def eagle_loss(
    head: EagleHead,
    batch: DistillBatch,
    features: torch.Tensor,
    depth: int = 3,
    decay: float = 0.8,
    kind: str = "fkl",
    mix_weights: dict[str, float] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], DistillBatch]:
    """The unrolled distillation loss, per depth the head's logits at the target positions `[N, V']` (detach them
    for metrics), and the batch of targets they align with (shifted by one, over the head's draft vocabulary)."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}.")
    target = in_draft_vocab(head, shifted(batch))
    mask = target.loss_mask.bool()
    outputs = head.unroll(features[:, :-1], batch.input_ids[:, 1:], depth)
    loss, logits = 0.0, []
    for d, g in enumerate(outputs):
        step_logits = head_logits(head, g[mask])
        logits.append(step_logits)
        loss = loss + decay**d * distill_loss(step_logits, target, kind, mix_weights)
    return loss / sum(decay**d for d in range(depth)), logits, target


@torch.no_grad()
def acceptance_by_depth(head: EagleHead, rows: list[PolicyTargets], depth: int = 4, pad_id: int = 0) -> list[float]:
    """Expected acceptance of sampled drafts at each draft depth on `rows` (teacher-forced on their tokens):
    mean over target positions of Σ_top-K min(p, q_d), a lower bound of 1 − TV(p, q_d) (exact when K covers p)."""
    batch, features = collate_features(rows, pad_id)
    target = shifted(batch)
    ids, logprobs, _, _ = target.at_targets()
    p = logprobs[0].float().exp()
    out = []
    vocab = head.config.vocab_size
    for g in head.unroll(features[:, :-1].to(head.dtype), batch.input_ids[:, 1:], depth):
        q = head.full_logits(g[target.loss_mask.bool()], vocab).float().softmax(-1)
        out.append(float(torch.minimum(p, q.gather(-1, ids[0])).sum(-1).mean()))
    return out


class FeatureTap:
    """The policy's features for rollouts whose engine returned none (vLLM returns no hidden states), taken from the
    policy's next forward over the same sequences, the GRPO loss's, through forward hooks (NeMo-RL's approach): no
    forward is run for the drafter's sake.

    `expect(rows)` queues rollout rows, matched to a forward's rows by their tokens (prompt + completion, padding
    dropped by the forward's attention mask). Each forward of `policy` while rows wait fills those it contains with the
    outputs of the policy's `layers` (concatenated in layer order, bfloat16 on the CPU, as the engine stores them) and
    hands them to `sink` (the trainer's buffer). Rows of a rollout still waiting when the next rollout's rows come (the
    trainer's forwards over a generation batch all run before the next one is generated) are dropped, e.g. a prompt
    the trainer truncated: `dropped` counts them. `close()` removes the hooks.
    """

    def __init__(
        self, policy: Any, layers: tuple[int, ...] | list[int], sink: Callable[[list[PolicyTargets]], None]
    ) -> None:
        self.layers, self.sink = layer_ids(policy, layers), sink
        self.waiting: OrderedDict[tuple[int, ...], PolicyTargets] = OrderedDict()
        self.filled = self.dropped = 0
        self._lock = threading.Lock()
        self._inputs: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._outputs: list[torch.Tensor] = []
        model = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        self._hooks = [model.register_forward_pre_hook(self._before, with_kwargs=True)]
        self._hooks += [m.register_forward_hook(self._after) for m in feature_layers(policy, self.layers)]

    def expect(self, rows: list[PolicyTargets]) -> None:
        with self._lock:
            self.dropped += len(self.waiting)
            self.waiting = OrderedDict((tuple(row.prompt_ids) + tuple(row.completion_ids), row) for row in rows)

    def _before(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        ids, mask = kwargs.get("input_ids", args[0] if args else None), kwargs.get("attention_mask")
        # Only forwards over whole sequences (no KV cache: `cache` in transformers 5, `past_key_values` before) are read,
        # and only while rows wait.
        cached = kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
        whole = ids is not None and not cached and (mask is None or mask.shape == ids.shape)
        self._inputs = (ids, mask) if self.waiting and whole else None
        self._outputs = []

    def _after(self, module: Any, args: tuple, output: Any) -> None:
        if self._inputs is None:
            return
        self._outputs.append((output[0] if isinstance(output, tuple) else output).detach())
        if len(self._outputs) == len(self.layers):
            self._fill(*self._inputs, torch.cat(self._outputs, -1))
            self._inputs, self._outputs = None, []

    def _fill(self, ids: torch.Tensor, mask: torch.Tensor | None, features: torch.Tensor) -> None:
        ready = []
        with self._lock:
            for b in range(ids.shape[0]):
                keep = mask[b].bool() if mask is not None else torch.ones_like(ids[b], dtype=torch.bool)
                row = self.waiting.pop(tuple(ids[b][keep].tolist()), None)
                if row is not None:  # every position but the last, as the engine collects them
                    read = features[b][keep][:-1].to("cpu", torch.bfloat16)
                    ready.append(dataclasses.replace(row, features=read))
        if ready:
            self.filled += len(ready)
            self.sink(ready)

    def __deepcopy__(self, memo: dict[int, Any]) -> FeatureTap:
        """A deep copy of the hooked policy (e.g. the probe's frozen snapshot) copies its hooks too: their tap is an
        inert one, waiting for nothing, so the copy's forwards never feed rows with another model's features."""
        inert = object.__new__(FeatureTap)
        inert.layers, inert.sink, inert.waiting, inert.filled, inert.dropped = self.layers, None, OrderedDict(), 0, 0
        inert._lock, inert._inputs, inert._outputs, inert._hooks = threading.Lock(), None, [], []
        return inert

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
