"""Elastic speculation: per decode step, plain decoding or speculation with the k that maximises the expected speed-up

    S(α, k, c, v_k) = (1 − α^(k+1)) / ((1 − α)(k·c + v_k))

from quantities measured online: α the drafter's acceptance probability, c the cost of one drafter step and v_k the cost
of verifying k+1 tokens, both relative to one plain decode step of the policy *at the current active batch size*.
Costs are kept per batch-size bucket (powers of two) because they change as rows finish: a large batch is
compute-bound (verifying k+1 tokens costs ~k+1 decode steps, speculation loses), the long tail of a few rows is not
(verifying costs ~1 step, speculation wins). v_k is measured for each k tried and interpolated between them, with
no shape assumed. Nothing is hard-coded per device.

Acceptance is also counted per draft depth: a drafter that chains on its own outputs (the EAGLE-style head) is accepted
less at each depth, so the expected tokens of k drafts are 1 + Σ_{j≤k} Π_{d≤j} α_d, with each α_d shrunk towards the
pooled α while its depth has few trials (with no per-depth counts, every α_d is the pooled α and the formula above).

While plain, the controller probes now and then, drafting the k that would pay if α were at the optimistic end of
what its acceptance counts allow, so a drafter that got better is noticed and one known to be poor costs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def expected_tokens(alpha: float, k: int) -> float:
    """Expected tokens one verify of k drafts emits: accepted drafts plus the correction/bonus."""
    if k == 0:
        return 1.0
    return k + 1.0 if alpha >= 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha)


def expected_tokens_by_depth(alphas: list[float], k: int) -> float:
    """Expected tokens one verify of k drafts emits when the draft at depth d is accepted with probability `alphas[d-1]`
    (given those before it were)."""
    total, reach = 1.0, 1.0
    for alpha in alphas[:k]:
        reach *= alpha
        total += reach
    return total


def best_k(alpha: float | list[float], cost_ratio: float, verify_costs: list[float]) -> int:
    """The k in 0..len(verify_costs)-1 with the largest S(α, k, c, v_k); `verify_costs[0]` is a plain step's cost (1).
    `alpha`: one acceptance probability for every depth, or one per depth (at least len(verify_costs) - 1)."""
    alphas = alpha if isinstance(alpha, list) else [alpha] * (len(verify_costs) - 1)
    speedups = [expected_tokens_by_depth(alphas, k) / (k * cost_ratio + v) for k, v in enumerate(verify_costs)]
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
    # Per draft depth d (index d - 1): drafts accepted there, and rows that reached it (decayed like the pooled counts).
    depth_accepted: list[float] = field(default_factory=list)
    depth_trials: list[float] = field(default_factory=list)
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

    def alphas(self, k: int) -> list[float]:
        """Acceptance probability at draft depths 1..k: each depth's counts, shrunk towards the pooled `alpha` with a
        prior worth a few drafts (depths never reached, or no per-depth counts: the pooled alpha)."""
        pooled, prior = self.alpha, 4.0
        out = []
        for d in range(k):
            trials = self.depth_trials[d] if d < len(self.depth_trials) else 0.0
            accepted = self.depth_accepted[d] if d < len(self.depth_accepted) else 0.0
            out.append((accepted + prior * pooled) / (trials + prior))
        return out

    def expected_tokens(self, k: int) -> float:
        """Expected tokens a verify of k model drafts emits, from the per-depth acceptance estimates."""
        return expected_tokens_by_depth(self.alphas(k), k)

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
        k = best_k(self.alphas(k_max), c, verify)
        if k and self.expected_tokens(k) / (k * c + verify[k]) < self.min_speedup:
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
        self.depth_accepted = [n * keep for n in self.depth_accepted]
        self.depth_trials = [n * keep for n in self.depth_trials]
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

    def observe_acceptance(self, accepted: int, rejections: int, by_depth: list[tuple[int, int]] | None = None) -> None:
        """The model drafter's verify outcomes of one step: `accepted` drafts in total, `rejections` rows stopped at a
        rejected draft (only rows that verified the model drafter's drafts: α describes the drafter); `by_depth`, per
        depth d = 1..k, (drafts accepted at d, rows whose drafts reached d)."""
        self.accepted = self.memory * self.accepted + accepted
        self.rejected = self.memory * self.rejected + rejections
        if by_depth:
            size = max(len(by_depth), len(self.depth_trials))
            old_accepted = self.depth_accepted + [0.0] * (size - len(self.depth_accepted))
            old_trials = self.depth_trials + [0.0] * (size - len(self.depth_trials))
            new = list(by_depth) + [(0, 0)] * (size - len(by_depth))
            self.depth_accepted = [self.memory * a + n for a, (n, _) in zip(old_accepted, new)]
            self.depth_trials = [self.memory * t + n for t, (_, n) in zip(old_trials, new)]
        self.observed_at = self.steps

    def verify_cost(self, batch: int, width: int) -> float | None:
        """v_width, the cost of verifying `width` drafts per row relative to a plain step at this batch size's bucket,
        interpolated from the widths measured there (None: no plain step or no verify measured there yet)."""
        costs = self.costs.get(self.bucket(batch))
        if costs is None or costs.plain is None or not costs.verify:
            return None
        return interpolate({n: seconds / costs.plain for n, seconds in costs.verify.items()}, width)[width]


# --- between rollouts: the vLLM backend's switch ----------------------------------------------------------------------
# vLLM decides per engine step inside its own scheduler; what the backend can choose is how each `generate` call is
# served, speculatively or plainly, in the same engine (`vllm_engine.VLLMEngine`).


@dataclass
class Decision:
    """How one `generate` call was served and why (`VLLMEngine.last_decision`)."""

    speculate: bool
    reason: str  # one of RolloutSwitch.REASONS
    expected_speedup: float | None = None  # speculative over plain serving, as estimated before the call
    measured_speedup: float | None = None  # filled in after the call, where a plain baseline was measured

    def metrics(self) -> dict[str, float]:
        """`spec/*` metrics: the mode (1 speculative, 0 plain), why (one flag per reason), the speed-ups."""
        out = {"spec/vllm_speculative": float(self.speculate)}
        out.update({f"spec/vllm_mode_{reason}": float(reason == self.reason) for reason in RolloutSwitch.REASONS})
        if self.expected_speedup is not None:
            out["spec/vllm_expected_speedup"] = self.expected_speedup
        return out


def acceptance_from_tokens(tokens_per_verify: float, k: int) -> float:
    """The per-token acceptance α whose `expected_tokens(α, k)` is `tokens_per_verify` (bisection: it increases)."""
    low, high = 0.0, 1.0
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if expected_tokens(mid, k) < tokens_per_verify else (low, mid)
    return (low + high) / 2


@dataclass
class _Bucket:
    """What was measured at one batch-size bucket: seconds per step of the longest row, in each mode."""

    plain: float | None = None
    speculative: float | None = None
    tokens_per_verify: float | None = None  # of the drafter measured with `speculative`
    calls: int = 0
    last_speculative: int = 0  # the call of the last speculative measurement
    last_plain: int = 0
    probe_interval: int = 0


@dataclass
class RolloutSwitch:
    """Per `generate` call, speculative or plain serving, from the seconds per step of the longest row measured in
    each mode at the call's batch size (power-of-two buckets: costs change with the batch) and the drafter's tokens
    per verify. Plain serving is measured first (it is the baseline and costs nothing against it), speculation next;
    then the faster one serves. The expected speed-up of speculation is the plain seconds per step over the
    speculative ones, rescaled by the tokens per verify of the drafter now served (a new adapter) against the one
    measured. While plain, speculation is probed again when a probe could pay: after `probe_interval` calls (doubling
    after every probe that did not pay, up to `max_probe_interval`) and when an acceptance `optimism` higher, growing
    by `optimism_per_call` with every call since the last measurement, would make speculation faster. While
    speculating, plain serving is re-measured every `remeasure_every` calls (costs drift).
    """

    k: int
    min_speedup: float = 1.0
    remeasure_every: int = 16
    first_probe_interval: int = 4
    max_probe_interval: int = 256
    optimism: float = 0.05
    optimism_per_call: float = 0.01
    smoothing: float = 0.5
    buckets: dict[int, _Bucket] = field(default_factory=dict)
    new_drafter: bool = False  # an adapter was loaded since the last speculative measurement

    REASONS = ("warm_up", "measure_plain", "measure_speculation", "faster", "slower", "probe", "remeasure_plain")

    @staticmethod
    def bucket(batch: int) -> int:
        return 1 << max(0, math.ceil(math.log2(max(1, batch))))

    def _bucket(self, batch: int) -> _Bucket:
        return self.buckets.setdefault(self.bucket(batch), _Bucket())

    def plain_seconds_per_step(self, batch: int) -> float | None:
        """Plain serving's measured seconds per step of the longest row at this batch size (None: not measured)."""
        bucket = self.buckets.get(self.bucket(batch))
        return bucket.plain if bucket is not None else None

    def expected_speedup(self, batch: int, optimism: float = 0.0) -> float | None:
        """Speculative over plain serving at this batch size, from the measurements (None: a mode not measured);
        `optimism` raises the acceptance assumed for the drafter now served by that much."""
        b = self.buckets.get(self.bucket(batch))
        if b is None or b.plain is None or b.speculative is None:
            return None
        speculative = b.speculative
        if b.tokens_per_verify is not None and optimism > 0:
            alpha = min(1.0, acceptance_from_tokens(b.tokens_per_verify, self.k) + optimism)
            speculative *= b.tokens_per_verify / expected_tokens(alpha, self.k)
        return b.plain / speculative

    def choose(self, batch: int) -> Decision:
        """How to serve the next call of `batch` requests."""
        b = self._bucket(batch)
        b.calls += 1
        if b.plain is None:
            return self._decide(b, False, "measure_plain", None)
        if b.speculative is None:
            return self._decide(b, True, "measure_speculation", None)
        speedup = self.expected_speedup(batch)
        if speedup >= self.min_speedup:
            if b.calls - b.last_plain >= self.remeasure_every:
                return self._decide(b, False, "remeasure_plain", speedup)
            b.probe_interval = 0
            return self._decide(b, True, "faster", speedup)
        since = b.calls - b.last_speculative
        interval = b.probe_interval or self.first_probe_interval
        optimistic = self.expected_speedup(batch, self.optimism + self.optimism_per_call * since)
        if since >= interval and optimistic >= self.min_speedup:
            b.probe_interval = min(2 * interval, self.max_probe_interval)
            return self._decide(b, True, "probe", speedup)
        return self._decide(b, False, "slower", speedup)

    @staticmethod
    def _decide(b: _Bucket, speculate: bool, reason: str, speedup: float | None) -> Decision:
        if speculate:
            b.last_speculative = b.calls
        else:
            b.last_plain = b.calls
        return Decision(speculate, reason, speedup)

    def observe(
        self, batch: int, speculated: bool, seconds: float, length: int, tokens_per_verify: float | None
    ) -> None:
        """A call's outcome: `seconds` for a longest row of `length` tokens, and (speculative) tokens per verify."""
        if length < 1:
            return
        b = self._bucket(batch)
        per_step = seconds / length

        def ema(old: float | None) -> float:
            return per_step if old is None else (1 - self.smoothing) * old + self.smoothing * per_step

        if not speculated:
            b.plain = ema(b.plain)
            return
        if self.new_drafter:  # the old drafter's acceptance, and so its cost per token, no longer holds
            b.speculative, b.tokens_per_verify = per_step, tokens_per_verify
            self.new_drafter = False
            return
        b.speculative = ema(b.speculative)
        if tokens_per_verify is not None:
            old, weight = b.tokens_per_verify, self.smoothing
            b.tokens_per_verify = tokens_per_verify if old is None else (1 - weight) * old + weight * tokens_per_verify

    def drafter_changed(self) -> None:
        """A new draft adapter was loaded: the next speculative measurement replaces the old drafter's instead of
        averaging with it. No probe is forced: adapters arrive often, and a probe of a poor drafter costs a slow
        call; the growing optimism brings one when it could pay."""
        self.new_drafter = True
