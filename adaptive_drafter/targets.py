"""The distiller's data: the policy's top-K teacher signal from rollouts (`PolicyTargets`), a bounded recency-weighted
buffer of it (`DistillBuffer`) and padded training batches (`DistillBatch`).

Every engine already computes the policy's distribution at every completion position (it verifies every token), so the
teacher signal costs no extra forward pass: the engine keeps the top-K ids and logprobs of it per position in a
`PolicyTargets`, the adaptive drafter adds them to a `DistillBuffer`, and the background trainer samples
`DistillBatch`es from it and minimises a divergence of `distill.py`.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, fields

import torch

from .outputs import PolicyTargets


@dataclass
class DistillBatch:
    """Padded tensors for one causal-LM training step of the drafter, aligned to its logits.

    Rows are prompt + completion, right-padded. The logits at sequence index i predict token i + 1, so completion
    token t of row b (prompt length n_b) is the target of logits position n_b + t - 1: the per-position target tensors
    are indexed by logits position and `loss_mask` is True exactly at those positions. Positions without a target hold
    id 0 with logprob 0 (a harmless uniform target) and are masked out.
    """

    input_ids: torch.Tensor  # [B, L] int64, right-padded with `pad_id`
    attention_mask: torch.Tensor  # [B, L] int64: 1 on prompt + completion tokens
    topk_ids: torch.Tensor  # [B, L, K] int64: the policy's top-K ids for the token after position i
    topk_logprobs: torch.Tensor  # [B, L, K] float32: their logprobs (-inf = probability 0)
    loss_mask: torch.Tensor  # [B, L] bool: position i has a target
    rejected: torch.Tensor  # [B, L] bool: ...and the engine rejected a draft of that token
    policy_versions: torch.Tensor  # [B] int64: the policy version that produced each row
    # [B, L, H] float32: the policy's last-layer features aligned with input_ids (zero where it read nothing), when
    # every row carries them (`PolicyTargets.features`): what a feature-reading drafter trains on.
    features: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> DistillBatch:
        """A copy with every tensor on `device`."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return DistillBatch(**{name: None if t is None else t.to(device) for name, t in moved.items()})

    def at_targets(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`topk_ids`, `topk_logprobs`, `loss_mask` and `rejected` at the N positions of `loss_mask` only, as one
        `[1, N, ...]` row: aligned with logits computed at those positions (`[N, V]`, unsqueezed)."""
        mask = self.loss_mask.bool()
        return self.topk_ids[mask][None], self.topk_logprobs[mask][None], mask[mask][None], self.rejected[mask][None]

    @property
    def num_targets(self) -> int:
        """Number of completion positions with a target in the batch."""
        return int(self.loss_mask.sum())


def collate(rows: list[PolicyTargets], pad_id: int = 0) -> DistillBatch:
    """Pad a list of `PolicyTargets` (all with the same K) into a `DistillBatch` on the CPU."""
    if not rows:
        raise ValueError("collate needs at least one row.")
    k = rows[0].topk_ids.shape[1]
    if any(row.topk_ids.shape[1] != k for row in rows):
        raise ValueError(f"Rows have different top-K sizes {sorted({r.topk_ids.shape[1] for r in rows})}.")
    batch, length = len(rows), max(len(r.prompt_ids) + r.num_tokens for r in rows)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    topk_ids = torch.zeros(batch, length, k, dtype=torch.long)
    topk_logprobs = torch.zeros(batch, length, k, dtype=torch.float32)
    loss_mask = torch.zeros(batch, length, dtype=torch.bool)
    rejected = torch.zeros(batch, length, dtype=torch.bool)
    for b, row in enumerate(rows):
        prompt, total = len(row.prompt_ids), len(row.prompt_ids) + row.num_tokens
        input_ids[b, :total] = torch.tensor([*row.prompt_ids, *row.completion_ids], dtype=torch.long)
        attention_mask[b, :total] = 1
        targets = slice(prompt - 1, total - 1)  # logits positions predicting completion tokens 0..T-1
        topk_ids[b, targets] = row.topk_ids.to("cpu", torch.long)
        topk_logprobs[b, targets] = row.topk_logprobs.to("cpu", torch.float32)
        loss_mask[b, targets] = True
        rejected[b, targets] = row.rejected.cpu()
    versions = torch.tensor([row.policy_version for row in rows], dtype=torch.long)
    features = None
    if all(row.features is not None for row in rows):
        features = torch.zeros(batch, length, rows[0].features.shape[1])
        for b, row in enumerate(rows):
            features[b, : len(row.features)] = row.features.float()
    return DistillBatch(input_ids, attention_mask, topk_ids, topk_logprobs, loss_mask, rejected, versions, features)


class DistillBuffer:
    """Recent `PolicyTargets`, bounded in completion tokens, sampled with a preference for recent policy versions.

    - Bound: the total number of completion tokens stays <= `max_tokens` (prompt tokens are not counted). Adding rows
      evicts the oldest rows (in insertion order) until the new total fits. A single row longer than `max_tokens` is
      truncated to its first `max_tokens` completion tokens rather than rejected: the rollout thread adds rows and
      must never fail on one, and a completion prefix is still a valid set of targets.
    - Sampling: rows are drawn with replacement, row i with probability proportional to
      `0.5 ** ((newest - version_i) / recency_half_life)`, `newest` being the newest policy version in the buffer:
      the weight halves every `recency_half_life` versions behind it. `recency_half_life=math.inf` samples uniformly.
    - Ageing: `drop_older_than(version)` removes rows of earlier versions.
    - Rows with no completion token carry no target and are not stored. All rows must share one K.
    - Thread-safe: one lock guards the rows. `sample` holds it only to pick rows; collation happens outside it, so the
      rollout thread's `add` waits at most for a list copy.
    """

    def __init__(self, max_tokens: int, recency_half_life: float = 2.0, holdout_every: int = 0) -> None:
        if max_tokens < 1:
            raise ValueError(f"DistillBuffer.max_tokens must be >= 1, got {max_tokens}.")
        if not recency_half_life > 0:
            raise ValueError(
                f"DistillBuffer.recency_half_life must be > 0 (math.inf for uniform), got {recency_half_life}."
            )
        if holdout_every < 0 or holdout_every == 1:
            raise ValueError(f"DistillBuffer.holdout_every must be 0 (none) or >= 2, got {holdout_every}.")
        self.max_tokens = max_tokens
        self.recency_half_life = recency_half_life
        self.holdout_every = holdout_every
        self._rows: deque[PolicyTargets] = deque()
        self._trained: set[int] = set()  # ids of the rows `sample` ever drew: what `fresh` leaves out
        self._held_out: set[int] = set()  # ids of the rows `sample` never draws (every `holdout_every`-th added)
        self._num_tokens = 0
        self.added = 0  # rows ever added: how a reader tells that fresh rollouts arrived
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Number of rows held."""
        with self._lock:
            return len(self._rows)

    @property
    def num_tokens(self) -> int:
        """Total completion tokens held (<= `max_tokens`)."""
        with self._lock:
            return self._num_tokens

    def add(self, targets: PolicyTargets) -> None:
        """Add one row, evicting the oldest rows if the token budget is exceeded."""
        self.add_many([targets])

    def add_many(self, rows: Iterable[PolicyTargets]) -> None:
        """Add rows in order under one lock acquisition, then evict the oldest rows down to the token budget."""
        rows = [row if row.num_tokens <= self.max_tokens else row.truncated(self.max_tokens) for row in rows]
        rows = [row for row in rows if row.num_tokens]
        if not rows:
            return
        with self._lock:
            k = self._rows[0].topk_ids.shape[1] if self._rows else rows[0].topk_ids.shape[1]
            bad = sorted({row.topk_ids.shape[1] for row in rows} - {k})
            if bad:
                raise ValueError(f"DistillBuffer rows must share one top-K size: the buffer holds K={k}, got {bad}.")
            if self.holdout_every:
                every = self.holdout_every
                self._held_out.update(id(row) for i, row in enumerate(rows, self.added) if i % every == every - 1)
            self._rows.extend(rows)
            self.added += len(rows)
            self._num_tokens += sum(row.num_tokens for row in rows)
            while self._num_tokens > self.max_tokens:
                evicted = self._rows.popleft()
                self._num_tokens -= evicted.num_tokens
                self._trained.discard(id(evicted))
                self._held_out.discard(id(evicted))

    def versions(self) -> dict[int, int]:
        """Number of rows held per policy version, oldest version first."""
        with self._lock:
            counts: dict[int, int] = {}
            for row in self._rows:
                counts[row.policy_version] = counts.get(row.policy_version, 0) + 1
        return dict(sorted(counts.items()))

    def drop_older_than(self, version: int) -> int:
        """Remove every row whose policy version is < `version`; return how many were removed."""
        with self._lock:
            kept = [row for row in self._rows if row.policy_version >= version]
            dropped = len(self._rows) - len(kept)
            self._rows = deque(kept)
            self._num_tokens = sum(row.num_tokens for row in kept)
            self._trained &= {id(row) for row in kept}
            self._held_out &= {id(row) for row in kept}
        return dropped

    def clear(self) -> None:
        """Remove every row."""
        with self._lock:
            self._rows.clear()
            self._trained.clear()
            self._held_out.clear()
            self._num_tokens = 0

    def newest(self, batch_size: int, pad_id: int = 0) -> DistillBatch:
        """The `batch_size` rows added last (fewer if the buffer holds fewer), as a `DistillBatch`: the freshest
        rollouts, to measure how well the drafter matches the policy as it is now."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        with self._lock:
            if not self._rows:
                raise ValueError("DistillBuffer.newest: the buffer is empty: add rollouts first.")
            rows = list(self._rows)[-batch_size:]
        return collate(rows, pad_id)

    def sample(self, batch_size: int, generator: torch.Generator | None = None, pad_id: int = 0) -> DistillBatch:
        """Draw `batch_size` rows with replacement, recency-weighted (see the class docstring), as a `DistillBatch`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        with self._lock:
            rows = [row for row in self._rows if id(row) not in self._held_out]
            if not rows:
                raise ValueError("Cannot sample from an empty DistillBuffer: add rollouts first.")
        weights = recency_weights([row.policy_version for row in rows], self.recency_half_life)
        picks = [rows[i] for i in torch.multinomial(weights, batch_size, replacement=True, generator=generator).tolist()]
        with self._lock:
            held = {id(row) for row in self._rows}  # a row evicted meanwhile must not leave its id behind
            self._trained.update(id(row) for row in picks if id(row) in held)
        return collate(picks, pad_id)

    def fresh(self, batch_size: int, pad_id: int = 0) -> DistillBatch | None:
        """The newest `batch_size` rollouts no training step has seen (fewer if fewer exist; None if none), on which
        adapters can be compared without the optimism of their training data: the held-out rows (`holdout_every`),
        or without a holdout the rows `sample` never drew."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        with self._lock:
            unseen = [
                row
                for row in self._rows
                if (id(row) in self._held_out if self.holdout_every else id(row) not in self._trained)
            ][-batch_size:]
        return collate(unseen, pad_id) if unseen else None


def recency_weights(versions: list[int], half_life: float) -> torch.Tensor:
    """Unnormalised sampling weights `0.5 ** ((max(versions) - v) / half_life)`, float64."""
    v = torch.tensor(versions, dtype=torch.float64)
    return torch.exp2(-(v.max() - v) / half_life)
