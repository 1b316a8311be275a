"""Rectangular KV caches over *slots* for ragged speculative decoding, and the forward call that extends them.

Rows accept different numbers of drafts, so a slot may hold a rejected draft: a *hole*. A bool mask `valid [B, S]`
marks the slots that hold a token of the row; it is the attention mask, and the position of a row's next token is its
count of valid slots, so positions stay contiguous per row despite left padding and holes. Trailing slots no row kept
are cropped, and caches are compacted when holes pile up.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from peft import PeftModel
from transformers import DynamicCache

from .drafter import ReducedVocabDrafter


def right_aligned(valid: torch.Tensor, width: int) -> torch.Tensor:
    """`[B, width]` indices that gather each row's valid slots of `valid [B, S]` to the right, in their order (the
    invalid ones fill the left): how every ragged block here is compacted."""
    return torch.argsort(valid.to(torch.int8), dim=1, stable=True)[:, -width:]


@dataclass
class KVSlots:
    """One model's KV cache and the mask of its slots that hold real tokens."""

    cache: DynamicCache
    valid: torch.Tensor  # [B, S] bool

    @classmethod
    def empty(cls, batch: int, device: torch.device) -> KVSlots:
        return cls(DynamicCache(), torch.zeros(batch, 0, dtype=torch.bool, device=device))

    def select(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.valid = self.valid[rows]

    def crop(self) -> None:
        """Drop trailing slots that no row kept."""
        kept = self.valid.any(0).nonzero()
        trailing = self.valid.shape[1] - (int(kept[-1]) + 1 if len(kept) else 0)
        if trailing:
            self.cache.crop(-trailing)
            self.valid = self.valid[:, :-trailing]

    def compact(self, threshold: float, max_slots: int | None = None) -> None:
        """Gather each row's valid slots to the right, keeping their order, once that would free more than `threshold`
        of the slots (or the cache is longer than `max_slots`). Positions are kept per token: attention is unchanged."""
        slots = self.valid.shape[1]
        width = int(self.valid.sum(1).max()) if slots else 0
        if slots == 0 or width == slots:
            return
        if 1 - width / slots <= threshold and (max_slots is None or slots <= max_slots):
            return
        order = right_aligned(self.valid, width)
        for layer in self.cache.layers:
            index = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)
        self.valid = self.valid.gather(1, order)


@cache
def _cache_argument(forward_owner: type) -> str:
    """The name a model's forward takes its KV cache by: `cache` in recent transformers (which deprecates
    `past_key_values`), `past_key_values` in older ones (vLLM's environment pins one)."""
    return "cache" if "cache" in inspect.signature(forward_owner.forward).parameters else "past_key_values"


def _forward_owner(model: Any) -> type:
    if isinstance(model, ReducedVocabDrafter):
        return type(model.decoder)
    return type(model.get_base_model() if isinstance(model, PeftModel) else model)


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """`{name: cache}` for a forward call of `model`, under the name its transformers version takes."""
    return {_cache_argument(_forward_owner(model)): cache}


def forward(model: Any, kv: KVSlots, tokens: torch.Tensor, token_valid: torch.Tensor, logits_to_keep: int = 0):
    """Run `tokens [B, m]` through `model`, appending m slots to its cache; invalid tokens become holes. Returns the
    logits (of the last `logits_to_keep` positions; 0: all)."""
    positions = kv.valid.sum(1, keepdim=True) + token_valid.cumsum(1) - 1
    kv.valid = torch.cat([kv.valid, token_valid], dim=1)
    out = model(
        input_ids=tokens,
        attention_mask=kv.valid.long(),
        position_ids=positions.clamp_min(0),
        use_cache=True,
        logits_to_keep=logits_to_keep,
        **cache_kwargs(model, kv.cache),
    )
    return out.logits


def synchronize(device: torch.device) -> None:
    """Wait for the device (timing only: CPU work is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_positions(model: Any) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def sliding_window(model: Any) -> int | None:
    return getattr(model.config, "sliding_window", None)


def prompt_batch(
    prompt_ids: Sequence[Sequence[int]] | torch.Tensor, attention_mask: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts (token-id lists, or a left-padded tensor and its mask) as a left-padded batch and its mask on `device`."""
    if isinstance(prompt_ids, torch.Tensor):
        return prompt_ids, attention_mask if attention_mask is not None else torch.ones_like(prompt_ids)
    if attention_mask is not None:
        raise ValueError("attention_mask goes with a padded prompt_ids tensor; token-id lists need none.")
    rows = [list(map(int, row)) for row in prompt_ids]
    if not rows or any(len(row) == 0 for row in rows):
        raise ValueError("prompt_ids must be a non-empty list of non-empty token id lists.")
    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)
