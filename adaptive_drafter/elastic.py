"""Elastic speculation: per decode step, plain decoding or speculation with the k that maximises the expected speed-up

    S(α, k, c, v_k) = (1 − α^(k+1)) / ((1 − α)(k·c + v_k))

from quantities measured online: α the drafter's acceptance probability, c the cost of one drafter step and v_k the cost
of verifying k+1 tokens, both relative to one plain decode step of the policy *at the current active batch size*.
Costs are kept per batch-size bucket (powers of two) because they change as rows finish: a large batch is
compute-bound (verifying k+1 tokens costs ~k+1 decode steps, speculation loses), the long tail of a few rows is not
(verifying costs ~1 step, speculation wins). v_k is measured for each k tried and interpolated between them, with
no shape assumed. Nothing is hard-coded per device.

While plain, the controller probes now and then, drafting the k that would pay if α were at the optimistic end of
what its acceptance counts allow, so a drafter that got better is noticed and one known to be poor costs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .metrics import speedup_estimate


def expected_tokens(alpha: float, k: int) -> float:
    """Expected tokens one verify of k drafts emits: accepted drafts plus the correction/bonus."""
    if k == 0:
        return 1.0
    return k + 1.0 if alpha >= 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha)


def best_k(alpha: float, cost_ratio: float, verify_costs: list[float]) -> int:
    """The k in 0..len(verify_costs)-1 with the largest S(α, k, c, v_k); `verify_costs[0]` is a plain step's cost (1)."""
    speedups = [expected_tokens(alpha, k) / (k * cost_ratio + v) for k, v in enumerate(verify_costs)]
    return max(range(len(speedups)), key=speedups.__getitem__)


def _ema(old: float | None, new: float, weight: float) -> float:
    return new if old is None else (1 - weight) * old + weight * new


def interpolate(measured: dict[int, float], k_max: int) -> list[float]:
    """Verify costs v_0..v_k_max (relative to a plain step: v_0 = 1) from those measured at some k: linear between measured
    neighbours, and past the largest measured k along the last segment's slope. No shape is assumed: on a GPU at small
    batch v_k is nearly flat, on a CPU it jumps from one token to two and then barely grows (it may even fall, as the
    matrix kernels change), at large batch it grows like k + 1."""
    points = sorted({0: 1.0, **measured}.items())
    out = []
    for k in range(k_max + 1):
        upper = next((i for i, (x, _) in enumerate(points) if x >= k), len(points) - 1)
        (x0, y0), (x1, y1) = points[max(0, upper - 1)], points[upper]
        out.append(y1 if x1 == x0 else y0 + (y1 - y0) * (k - x0) / (x1 - x0))
    return out


@dataclass
class _Costs:
    """Seconds of one plain step, one drafter step, and a verify of k drafts for each k tried, at one batch size."""

    plain: float | None = None
    draft: float | None = None
    verify: dict[int, float] = field(default_factory=dict)


@dataclass
class ElasticController:
    """Chooses the draft length of every step from running estimates; `observe_*` feed it measurements."""

    num_draft_tokens: int  # the longest draft a step may verify
    min_batch_plain: int | None = None  # at or above this active batch size, always decode plainly
    alpha_prior: float = 0.6
    smoothing: float = 0.2
    memory: float = 0.99  # acceptance counts decay: the drafter and the policy both change
    explore_every: int = 32  # re-measure now and then: costs drift as caches grow, acceptance as the drafter learns
    optimism: float = 2.0  # a probe assumes α this many standard errors above its estimate
    min_speedup: float = 1.05  # speculate only when S beats plain by this much: nearer, the estimates' noise decides
    accepted: float = 0.0
    rejected: float = 0.0
    costs: dict[int, _Costs] = field(default_factory=dict)
    steps: int = 0
    observed_at: int = 0  # the step of the last speculative outcome
    measuring_plain: bool = False  # the last `choose` returned 0 to (re-)measure a plain step's cost
    # Probes back off: each one that finds speculation still not paying doubles the wait for the next (up to
    # max_probe_interval steps), so a drafter known to be poor costs next to nothing (an untrained drafter probed every
    # 32 steps cost ~5% of a rollout); speculation that pays, or a new adapter, resets the wait.
    max_probe_interval: int = 1024
    probe_interval: int = 0  # 0: explore_every
    next_probe: int = 0  # 0: explore_every // 2 from the start
    probes: int = 0

    @property
    def alpha(self) -> float:
        """Maximum-likelihood acceptance probability from the verify outcomes (n accepted of k, stopped at the first
        rejection): accepted / (accepted + rejections), with a prior worth a few drafts."""
        prior = 4.0
        return (self.accepted + prior * self.alpha_prior) / (self.accepted + self.rejected + prior)

    @property
    def alpha_optimistic(self) -> float:
        """α at the optimistic end of what the counts allow: the estimate plus `optimism` standard errors. Few counts
        (a swapped-in adapter) leave room for a better drafter, many low ones do not; and evidence ages with the plain
        steps since it was gathered (by `memory` per step), so a drafter once found poor is probed again, rarely."""
        age = self.memory ** (self.steps - self.observed_at)
        alpha, trials = self.alpha, (self.accepted + self.rejected) * age + 4.0
        return min(1.0, alpha + self.optimism * math.sqrt(alpha * (1 - alpha) / trials))

    @staticmethod
    def bucket(batch: int) -> int:
        return 1 << max(0, math.ceil(math.log2(batch)))

    def choose(self, batch: int, limit: int) -> int:
        """Draft length for the next step of `batch` active rows, at most `limit`."""
        self.steps += 1
        self.measuring_plain = False
        if limit <= 0 or (self.min_batch_plain is not None and batch >= self.min_batch_plain):
            return 0
        costs = self.costs.setdefault(self.bucket(batch), _Costs())
        k_max = min(self.num_draft_tokens, limit)
        if costs.draft is None or not costs.verify:
            return k_max  # measure speculation first
        if costs.plain is None or self.steps % self.explore_every == 0:
            self.measuring_plain = True
            return 0  # measure (or re-measure) a plain step
        c = costs.draft / costs.plain
        verify = interpolate({n: seconds / costs.plain for n, seconds in costs.verify.items()}, k_max)
        k = best_k(self.alpha, c, verify)
        if k and speedup_estimate(self.alpha, k, c, verify[k]) < self.min_speedup:
            k = 0
        if k:
            self.probe_interval = self.explore_every  # speculation pays: probing again soon is cheap insurance
            return k
        interval = self.probe_interval or self.explore_every
        if self.steps >= (self.next_probe or self.explore_every // 2):
            # A probe: without one a drafter that got better (distillation) would never be seen. It drafts the k that
            # would pay if α were optimistic (its cost is then worth the information), and none when even that would
            # not pay (many low acceptance counts: probing would only cost). The next waits twice as long.
            self.next_probe = self.steps + interval
            self.probe_interval = min(2 * interval, self.max_probe_interval)
            k = best_k(self.alpha_optimistic, c, verify)
            self.probes += bool(k)
        return k

    def forget_acceptance(self, keep: float = 0.1) -> None:
        """A new drafter adapter was swapped in: the acceptance history describes the old one, so shrink it to a few
        drafts' worth and let the next steps re-measure (costs are unchanged)."""
        self.accepted *= keep
        self.rejected *= keep
        self.probe_interval, self.next_probe = self.explore_every, self.steps + 1  # probe the new adapter next step

    def measure_plain_now(self, batch: int) -> bool:
        """For steps without a drafter model (suffix drafts only): whether this one should decode plainly to
        (re-)measure a plain step's cost, which model-free speculation is weighed against."""
        self.steps += 1
        costs = self.costs.setdefault(self.bucket(batch), _Costs())
        self.measuring_plain = costs.plain is None or self.steps % self.explore_every == 0
        return self.measuring_plain

    def plain_seconds(self, batch: int) -> float | None:
        """The running estimate of one plain step's seconds at this batch size's bucket (None: none measured)."""
        costs = self.costs.get(self.bucket(batch))
        return costs.plain if costs is not None else None

    def observe_plain(self, batch: int, seconds: float) -> None:
        costs = self.costs.setdefault(self.bucket(batch), _Costs())
        costs.plain = _ema(costs.plain, seconds, self.smoothing)

    def observe_speculation(
        self, batch: int, k: int, draft_seconds: float | None, verify_seconds: float, accepted: int, rejections: int
    ) -> None:
        """One speculative step: k drafter steps took `draft_seconds` (None: not representative, e.g. the drafter
        caught up on a long pending block first), the verify `verify_seconds`; rows accepted `accepted` drafts in total
        and `rejections` rows stopped at a rejected draft."""
        self.observe_costs(batch, k, draft_seconds, k, verify_seconds)
        self.observe_acceptance(accepted, rejections)

    def observe_costs(self, batch: int, k: int, draft_seconds: float | None, width: int, verify_seconds: float) -> None:
        """A step's costs: k drafter steps took `draft_seconds` (None: the drafter did not run, or not
        representatively), and verifying `width` drafts per row (plus the last token) took `verify_seconds`. The
        verify width can differ from k in hybrid steps, where model-free drafts of other lengths share the forward."""
        costs = self.costs.setdefault(self.bucket(batch), _Costs())
        if draft_seconds is not None and k > 0:
            costs.draft = _ema(costs.draft, draft_seconds / k, self.smoothing)
        costs.verify[width] = _ema(costs.verify.get(width), verify_seconds, self.smoothing)

    def observe_acceptance(self, accepted: int, rejections: int) -> None:
        """The model drafter's verify outcomes of one step: `accepted` drafts in total, `rejections` rows stopped at a
        rejected draft (only rows that verified the model drafter's drafts: α describes the drafter)."""
        self.accepted = self.memory * self.accepted + accepted
        self.rejected = self.memory * self.rejected + rejections
        self.observed_at = self.steps

    def verify_cost(self, batch: int, width: int) -> float | None:
        """v_width, the cost of verifying `width` drafts per row relative to a plain step at this batch size's bucket,
        interpolated from the widths measured there (None: no plain step or no verify measured there yet)."""
        costs = self.costs.get(self.bucket(batch))
        if costs is None or costs.plain is None or not costs.verify:
            return None
        return interpolate({n: seconds / costs.plain for n, seconds in costs.verify.items()}, width)[width]
