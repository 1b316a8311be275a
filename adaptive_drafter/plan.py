"""What each decode step drafts: per row, the source of its drafts (the model drafter, a suffix draft, or none) and
their length, chosen from the elastic controller's measurements and the suffix index, outside the decoder.

The planner also feeds the controller what each step cost and how its drafts fared: the model drafter's acceptance
(its rows only: α describes the drafter), a drafter step's cost (only when its forward was an ordinary one), a verify
of the step's width, or a plain step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SpecConfig
from .drafts import SuffixDrafts, Verified
from .elastic import ElasticController
from .suffix import SuffixDraft


@dataclass
class StepPlan:
    """One decode step's drafts: the model drafter drafts `k` tokens (0: it does not run) for the `model_rows`; the
    `suffix_rows` verify their suffix draft; the other rows decode plainly inside the same forward."""

    k: int
    model_rows: torch.Tensor  # [B] bool
    suffix_rows: torch.Tensor  # [B] bool


class StepPlanner:
    """Plans every step of the engine's rollouts; persists across them (the controller's measurements carry over)."""

    def __init__(self, config: SpecConfig, controller: ElasticController) -> None:
        self.config, self.controller = config, controller

    def plan(
        self, remaining: list[int], rows: list[int], suffix: SuffixDrafts | None, device: torch.device
    ) -> StepPlan:
        """The plan for active rows with `remaining[i]` tokens still to emit (original indices `rows`)."""
        batch = len(remaining)
        k = self._model_k(batch, min(self.config.num_draft_tokens, max(remaining) - 1))
        none = torch.zeros(batch, dtype=torch.bool, device=device)
        chosen = self._suffix_drafts(remaining, rows, k, suffix) if suffix is not None else None
        if chosen is None:
            return StepPlan(k, none if k == 0 else ~none, none)
        suffix.chosen = chosen
        suffix_rows = torch.tensor([d is not None for d in chosen], device=device)
        model_rows = ~suffix_rows if k else none
        return StepPlan(k if bool(model_rows.any()) else 0, model_rows, suffix_rows)

    def observe(self, plan: StepPlan, step: Verified, seconds: float, draft_seconds: float, steady: bool) -> None:
        """Feed the controller the step's measured costs (of its `seconds`, `draft_seconds` were the model drafter's,
        a drafter step's cost only when `steady`) and the model drafter's acceptance."""
        batch = len(step.count)
        if step.width == 0:
            self.controller.observe_plain(batch, seconds)
            return
        if self.config.elastic:
            drafter = draft_seconds if plan.k and steady else None
            self.controller.observe_costs(batch, plan.k, drafter, step.width, seconds - draft_seconds)
        if plan.k:
            accepted = step.accepted[plan.model_rows]
            by_depth = [(int((accepted >= d).sum()), int((accepted >= d - 1).sum())) for d in range(1, plan.k + 1)]
            self.controller.observe_acceptance(int(accepted.sum()), int((accepted < plan.k).sum()), by_depth)

    def _model_k(self, batch: int, limit: int) -> int:
        if self.config.drafting == "suffix":  # the drafter model never drafts; plain steps are still timed now and then
            if self.config.elastic:
                self.controller.measure_plain_now(batch)
            return 0
        if self.config.elastic:
            return self.controller.choose(batch, limit)
        threshold = self.config.plain_batch_threshold
        return 0 if limit <= 0 or (threshold is not None and batch >= threshold) else limit

    def _suffix_drafts(
        self, remaining: list[int], rows: list[int], k: int, suffix: SuffixDrafts
    ) -> list[SuffixDraft | None] | None:
        """Per active row, the suffix draft it verifies this step instead of the model drafter's (None: the model's
        k drafts, or with k = 0 a plain decode inside the verify); None when no row takes a suffix draft.

        With k > 0 a row takes its suffix draft when the draft's expected accepted length is at least the model
        drafter's at k (the controller's expected tokens of k drafts, from per-depth α, minus 1). With k = 0 (plain
        chosen) the rows whose suffix draft expects >= 1 accepted token still speculate, unless the controller is
        measuring a plain step, the batch is at `plain_batch_threshold`, or the verify does not pay: the batch's mean
        expected tokens per row,
        (1 + expected accepted) for those rows and 1 for the others, over v_K (the controller's interpolated cost of a
        verify of the longest of those drafts, K, relative to a plain step) below the controller's `min_speedup`
        (unmeasured v_K: speculate, the measurement follows). A suffix draft costs no drafter forward (c ~ 0)."""
        threshold = self.config.plain_batch_threshold
        if (threshold is not None and len(rows) >= threshold) or (k == 0 and self.controller.measuring_plain):
            return None
        limits = [min(self.config.suffix_max_draft, left - 1) for left in remaining]
        drafts = suffix.candidates(rows, limits)
        expected = [0.0 if d is None else d.expected_accepted() for d in drafts]
        bar = self.controller.expected_tokens(k) - 1 if k else 1.0
        chosen = [d if d is not None and e >= bar else None for d, e in zip(drafts, expected)]
        if not any(d is not None for d in chosen):
            return None
        if k == 0:
            width = max(len(d.tokens) for d in chosen if d is not None)
            verify = self.controller.verify_cost(len(rows), width)
            tokens = sum(1 + e if d is not None else 1.0 for d, e in zip(chosen, expected)) / len(rows)
            if self.config.elastic and verify is not None and tokens / verify < self.controller.min_speedup:
                return None
        return chosen
