"""The drafter protocol: where a decode step's drafts come from, and what each source is told afterwards.

A decode step of the engine reads plan → draft → verify → record. Each *draft source* proposes drafts (and the
distribution q each was drawn from) for the rows the plan gave it, and observes what the verify pass emitted, so it can
keep whatever state it drafts from (a KV cache, an n-gram index) in step. Two sources ship:

- `ModelDrafts`: a causal LM (the truncated self-draft or a separate small model, plain, peft, merged or with a reduced
  vocabulary) with its own KV cache, drafting k tokens autoregressively for every active row at once.
- `SuffixDrafts`: model-free drafts per row from `suffix.SuffixDrafter` (siblings' completions, earlier rollouts, the
  row's own context), proposed when the plan is made because the plan weighs their expected length.

A source that needs more of the verify pass (the policy's hidden states, for a head that reads them) gets it through
`Verified`, without a change to the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .kv import KVSlots, forward, right_aligned
from .metrics import SpecStats
from .sampling import SamplingParams, process_logits, sample
from .suffix import SuffixDraft, SuffixDrafter, stack_drafts


@dataclass
class Drafts:
    """A source's proposal for the active rows: `tokens [B, W]` (row b drafted its first `lengths[b]`, the rest is
    padding) and, when the acceptance rule needs it, `q [B, W, V]`, the distribution each draft was drawn from."""

    tokens: torch.Tensor
    lengths: torch.Tensor  # [B] int64
    q: torch.Tensor | None = None


@dataclass
class Verified:
    """What one decode step emitted, as every draft source observes it.

    The policy read a block of m tokens per row: `[last, d_1..d_W]` (W = `width`; 0 for a plain step), or the prompt
    at the prefill. Row b accepted `accepted[b]` drafts and emitted `count[b] = accepted[b] + 1` tokens, the first
    `count[b]` of `tokens[b]`. `emitted[i]` is what active row i (original prompt index `rows[i]`) kept of them after
    its eos / `max_new_tokens` cut. `kept [B, m]` marks the block positions the policy's cache keeps, `next_tokens
    [B, m]` the token that follows each of them (a draft it accepted, or the emitted one), and `features [B, m, H]` the
    policy's last-layer output there, captured only when a source `needs_features`."""

    tokens: torch.Tensor  # [B, W + 1]
    count: torch.Tensor  # [B]
    accepted: torch.Tensor  # [B]
    width: int
    rows: list[int]
    emitted: list[list[int]]
    block: torch.Tensor  # [B, m] what the policy read
    kept: torch.Tensor  # [B, m] bool
    next_tokens: torch.Tensor  # [B, m]
    features: torch.Tensor | None = None  # [B, m, H]


def draw(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One draft token per row from a drafter's `logits [B, V]` under the sampling settings: sampled from q (returned,
    for the acceptance rule) or, greedy, its argmax (q None). Also whether any logit was NaN/+inf (neutralised here;
    the engine raises at its sync point, where checking costs no extra device sync)."""
    bad = logits.isnan() | logits.isposinf()
    q_logits = process_logits(logits.masked_fill(bad, 0.0), params)
    if not params.do_sample:
        return q_logits.argmax(-1), None, bad.any()
    q = q_logits.softmax(-1)
    return sample(q, generator), q, bad.any()


class DraftSource(Protocol):
    """What the engine needs of a source of drafts. Rows are the active rows of the rollout, in order."""

    def begin(self, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        """A rollout of these left-padded prompts starts."""

    def propose(self, rows: torch.Tensor, k: int) -> Drafts:
        """Drafts of at most k tokens for the rows where `rows [B]` (bool) is set; length 0 elsewhere."""

    def observe(self, step: Verified, mine: torch.Tensor) -> None:
        """The step's outcome; `mine [B]` marks the rows that verified this source's drafts."""

    def select(self, keep: torch.Tensor) -> None:
        """Only the active rows at indices `keep` go on."""

    def compact(self) -> None:
        """Between steps: free cache slots that hold nothing of any row."""

    def end(self) -> None:
        """The rollout finished (or failed)."""


class ModelDrafts:
    """Drafts from a causal LM with its own KV cache.

    Invariant between steps: the drafter's cache lags the policy's by the tokens in `pending` (left-padded, holes
    allowed, the last column always each row's newest token), which it consumes before drafting. It drafts for every
    active row at once (its cache stays rectangular); rows that verified another source's drafts turn its cached
    drafts into holes and queue what they emitted."""

    def __init__(
        self,
        model: Any,
        params: SamplingParams,
        vocab_size: int,
        stats: SpecStats,
        generator: torch.Generator | None = None,
        *,
        compact_threshold: float = 0.5,
        max_slots: int | None = None,
    ) -> None:
        self.model, self.params, self.vocab_size, self.stats = model, params, vocab_size, stats
        self.generator, self.compact_threshold, self.max_slots = generator, compact_threshold, max_slots
        self.nonfinite = torch.tensor(False)  # NaN/+inf logits seen; the engine raises at its sync point
        self.drafted = 0  # k of this step's proposal (0: the model did not run)

    def begin(self, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        # The prompt is pending: the drafter prefills it when it first drafts, so a rollout that never speculates never
        # runs it.
        self.kv = KVSlots.empty(input_ids.shape[0], input_ids.device)
        self.pending, self.pending_valid = input_ids, mask

    def steady(self, k: int) -> bool:
        """Whether drafting k tokens now costs k ordinary drafter steps: after plain steps (or at the start, the prompt)
        its first forward catches up on many pending tokens, a one-off that would inflate its measured step cost."""
        return self.pending.shape[1] <= max(2, k + 1)

    def propose(self, rows: torch.Tensor, k: int) -> Drafts:
        logits = forward(self.model, self.kv, self.pending, self.pending_valid, logits_to_keep=1)
        drafts, dists = [], []
        for i in range(k):
            token, q, bad = draw(logits[:, -1, : self.vocab_size], self.params, self.generator)
            self.nonfinite = self.nonfinite | bad
            drafts.append(token)
            if q is not None:
                dists.append(q)
            if i < k - 1:
                one = token[:, None]
                logits = forward(self.model, self.kv, one, torch.ones_like(one, dtype=torch.bool))
        self.stats.drafter_forwards += k
        self.pending, self.pending_valid = self.pending[:, :0], self.pending_valid[:, :0]
        self.drafted = k
        lengths = torch.where(rows, k, 0)
        return Drafts(torch.stack(drafts, 1), lengths, torch.stack(dists, 1) if dists else None)

    def observe(self, step: Verified, mine: torch.Tensor) -> None:
        k, self.drafted = self.drafted, 0
        n, count = step.accepted, step.count
        if k > 1:  # it cached its d_1..d_(k-1): holes except the accepted ones of the rows that verified them
            kept = torch.arange(1, k, device=n.device)[None] <= n[:, None]
            self.kv.valid[:, -(k - 1) :] = kept & mine[:, None]
        # Unseen by the drafter: in its own rows d_k where all k were accepted, and the new token; in every other row
        # all it emitted. Right-aligned, invalid on the left, after whatever `pending` still holds.
        unseen = torch.where(mine, 1 + (n == k).long(), count) if k else count
        width = int(unseen.max())
        column = torch.arange(width, device=n.device)[None]
        valid = column >= (width - unseen)[:, None]
        index = (count[:, None] - width + column).clamp_min(0)
        new = step.tokens.gather(1, index).masked_fill(~valid, 0)
        self.pending = torch.cat([self.pending, new], 1)
        self.pending_valid = torch.cat([self.pending_valid, valid], 1)
        self._compact_pending()

    def select(self, keep: torch.Tensor) -> None:
        self.kv.select(keep)
        self.pending, self.pending_valid = self.pending[keep], self.pending_valid[keep]

    def compact(self) -> None:
        self.kv.crop()
        self.kv.compact(self.compact_threshold, self.max_slots)

    def end(self) -> None:
        self.kv = None  # type: ignore[assignment]  # the cache is the rollout's; free it now

    def _compact_pending(self) -> None:
        """Gather `pending`'s valid tokens to the right once holes make up most of it (steps without the drafter
        append ragged blocks): its catch-up forward and cache stay as wide as the longest row's backlog."""
        width = int(self.pending_valid.sum(1).max())
        if 2 * width >= self.pending.shape[1]:
            return
        order = right_aligned(self.pending_valid, width)
        self.pending, self.pending_valid = self.pending.gather(1, order), self.pending_valid.gather(1, order)


class SuffixDrafts:
    """Model-free drafts per row from a `SuffixDrafter`, which persists across rollouts (its history and global stores
    are the earlier rollouts). `candidates` proposes when the step is planned (the plan weighs their expected accepted
    length against the model's); `propose` stacks the chosen ones."""

    def __init__(self, drafter: SuffixDrafter, vocab_size: int | None) -> None:
        self.drafter, self.vocab_size = drafter, vocab_size  # vocab_size None: q is not needed (greedy, cascade)
        self.chosen: list[SuffixDraft | None] = []

    def begin(self, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.drafter.begin([row[row_mask].tolist() for row, row_mask in zip(input_ids, mask)])

    def candidates(self, rows: list[int], limits: list[int]) -> list[SuffixDraft | None]:
        """Per active row (original index `rows[i]`), its suffix draft of at most `limits[i]` tokens, or None."""
        return [self.drafter.propose(row, limit) if limit > 0 else None for row, limit in zip(rows, limits)]

    def propose(self, rows: torch.Tensor, k: int) -> Drafts:
        chosen = [d if use else None for d, use in zip(self.chosen, rows.tolist())]
        tokens, q, lengths = stack_drafts(chosen, vocab_size=self.vocab_size, device=rows.device)
        return Drafts(tokens, lengths, q)

    def observe(self, step: Verified, mine: torch.Tensor) -> None:
        for row, tokens in zip(step.rows, step.emitted):
            if tokens:
                self.drafter.extend(row, tokens)

    def select(self, keep: torch.Tensor) -> None:
        pass  # keyed by the rows' original indices

    def compact(self) -> None:
        pass

    def end(self) -> None:
        self.drafter.end()  # the completions (so far, on an error) join the history
