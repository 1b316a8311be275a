"""Continual distillation data and losses: the policy's top-K teacher signal from rollouts, a bounded recency-weighted
buffer of it, and divergences between that signal and the drafter.

The speculative engine already computes the policy's distribution at every completion position (it verifies every
token), so the teacher signal costs no extra forward pass: the engine keeps the top-K ids and logprobs of it per
position in a `PolicyTargets`, the rollout thread adds them to a `DistillBuffer`, and the background trainer samples
`DistillBatch`es from it and minimises `distill_loss`.

Divergence semantics. Top-K targets say how the policy spreads its mass over its K ids, not how it spreads the rest,
so each position is coarse-grained to K + 1 outcomes: the K target ids and an "other" bucket holding every remaining
vocabulary id. Neither side is renormalised over the K ids:

    P        the policy's K probabilities as given (exp of `topk_logprobs`; -inf is probability 0, e.g. the padding of
             a top-k/top-p filtered distribution), and P_other = 1 − Σ_k P_k, 0 when the K ids cover the policy's
             support. Stored logprobs may be float16, whose rounding can push Σ_k P_k above 1: then P is renormalised
             over the K ids so that it sums to exactly 1, and P_other = 0.
    Q        the drafter's softmax over the full vocabulary (float32) at the K ids, and Q_other = its total mass on
             every other id (a logsumexp over those ids: exact even when Q_other is tiny, unlike 1 − Σ_k Q_k).

When K = V no id is left for the bucket: it is dropped and P is renormalised over the K ids (a deficit from 1 can
only be rounding). The K ids of a position are assumed distinct (as `torch.topk` returns them).

P and Q are distributions over the same K + 1 outcomes. fkl, tv and jsd are 0 exactly when Q = P there, i.e. when
the drafter's full distribution equals the policy's on the K ids and puts the same total mass outside them (when
K = V: when the two distributions are equal), and positive otherwise; so is rkl on positions where P gives every
outcome nonzero probability (see rkl below). In particular the drafter's mass outside the K ids is penalised: its
gradient pushes Q_other towards P_other. What the targets cannot show is how either side spreads the mass inside the
bucket, so coarse-graining can only lose information: each divergence is at most its full-vocabulary value (the
data-processing inequality; for rkl, where it is not restricted), with equality when K = V.

    tv   ½ Σ |P − Q| over the K + 1 outcomes. For a drafter sampling from q and a policy sampling from p (full
         vocabulary), the exact acceptance rule accepts a draft with probability α = Σ min(p, q) = 1 − TV(p, q).
         tv is a lower bound of TV(p, q), equal when K = V: 1 − tv bounds α from above, exactly so when K = V.
    fkl  KL(P ‖ Q) = Σ P (log P − log Q): mode-covering, the usual soft-target cross-entropy up to a constant.
    rkl  KL(Q ‖ P) = Σ Q (log Q − log P): mode-seeking. It is infinite as soon as Q puts mass on an outcome P gives
         probability 0, so on positions with such outcomes (a zero P_k, or P_other = 0) Q is further restricted to
         P's support (the outcomes with nonzero probability) and renormalised; mass outside P's support, the
         drafter's mass outside the K ids included when P_other = 0, is left to the other divergences (use "mix").
    jsd  ½ KL(P ‖ M) + ½ KL(Q ‖ M), M = (P + Q) / 2: bounded by log 2, finite whatever the supports.
    mix  Σ_kind w_kind · divergence_kind over `mix_weights`.

Everything is computed in float32 log space; terms with P = 0 contribute exactly 0 and never produce NaN, values or
gradients. The drafter side needs the full vocabulary (its normaliser, and its mass outside the K ids): it holds up
to two float32 `[B, L, V]` temporaries, a float32 copy of bf16 logits and the copy with the K ids masked out.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields

import torch

DIVERGENCES = ("fkl", "rkl", "tv", "jsd")
LOSS_KINDS = (*DIVERGENCES, "mix")


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
        )


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

    def to(self, device: torch.device | str) -> DistillBatch:
        """A copy with every tensor on `device`."""
        return DistillBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

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
    return DistillBatch(input_ids, attention_mask, topk_ids, topk_logprobs, loss_mask, rejected, versions)


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

    def __init__(self, max_tokens: int, recency_half_life: float = 2.0) -> None:
        if max_tokens < 1:
            raise ValueError(f"DistillBuffer.max_tokens must be >= 1, got {max_tokens}.")
        if not recency_half_life > 0:
            raise ValueError(
                f"DistillBuffer.recency_half_life must be > 0 (math.inf for uniform), got {recency_half_life}."
            )
        self.max_tokens = max_tokens
        self.recency_half_life = recency_half_life
        self._rows: deque[PolicyTargets] = deque()
        self._num_tokens = 0
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
            self._rows.extend(rows)
            self._num_tokens += sum(row.num_tokens for row in rows)
            while self._num_tokens > self.max_tokens:
                self._num_tokens -= self._rows.popleft().num_tokens

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
        return dropped

    def clear(self) -> None:
        """Remove every row."""
        with self._lock:
            self._rows.clear()
            self._num_tokens = 0

    def sample(self, batch_size: int, generator: torch.Generator | None = None, pad_id: int = 0) -> DistillBatch:
        """Draw `batch_size` rows with replacement, recency-weighted (see the class docstring), as a `DistillBatch`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        with self._lock:
            if not self._rows:
                raise ValueError("Cannot sample from an empty DistillBuffer: add rollouts first.")
            rows = list(self._rows)
        weights = recency_weights([row.policy_version for row in rows], self.recency_half_life)
        picks = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
        return collate([rows[i] for i in picks.tolist()], pad_id)


def recency_weights(versions: list[int], half_life: float) -> torch.Tensor:
    """Unnormalised sampling weights `0.5 ** ((max(versions) - v) / half_life)`, float64."""
    v = torch.tensor(versions, dtype=torch.float64)
    return torch.exp2(-(v.max() - v) / half_life)


# ---- losses ----------------------------------------------------------------------------------------------------


def _check_shapes(
    drafter_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, mask: torch.Tensor
) -> None:
    if drafter_logits.dim() != 3:
        raise ValueError(f"drafter_logits must have shape [B, L, V], got {list(drafter_logits.shape)}.")
    batch_len = tuple(drafter_logits.shape[:2])
    if topk_ids.dim() != 3 or tuple(topk_ids.shape[:2]) != batch_len or topk_logprobs.shape != topk_ids.shape:
        raise ValueError(
            f"topk_ids and topk_logprobs must both have shape [B, L, K] with [B, L] = {list(batch_len)} of the "
            f"logits, got {list(topk_ids.shape)} and {list(topk_logprobs.shape)}."
        )
    if tuple(mask.shape) != batch_len:
        raise ValueError(f"mask must have shape [B, L] = {list(batch_len)}, got {list(mask.shape)}.")


def _log_dists(
    drafter_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """log P and log Q, `[B, L, K + 1]` float32: the policy's and the drafter's probabilities of the K ids and, last,
    of the "other" bucket (every remaining id); `[B, L, K]` when K = V (see the module docstring)."""
    _check_shapes(drafter_logits, topk_ids, topk_logprobs, mask)
    ids = topk_ids.long()
    # Masked positions may hold anything (all -inf padding): a uniform target there keeps NaN out of the forward
    # pass, and so out of the gradient, which flows through both branches of the final `where`.
    log_p = topk_logprobs.float().masked_fill(~mask.bool().unsqueeze(-1), 0.0)
    log_mass = log_p.logsumexp(-1, keepdim=True)  # log Σ_k P_k
    logits = drafter_logits.float()
    log_z = logits.logsumexp(-1, keepdim=True)
    log_q = logits.gather(-1, ids) - log_z
    if ids.shape[-1] >= logits.shape[-1]:
        return log_p - log_mass, log_q  # K = V: no other id, so P's deficit from 1 is rounding
    log_p = log_p - log_mass.clamp_min(0.0)  # renormalise only a sum pushed above 1 by (float16) rounding
    log_p_other = torch.log(-torch.expm1(log_mass.clamp_max(0.0)))  # log(1 − Σ_k P_k): -inf when it is 0
    # The drafter's mass off the K ids, summed over those ids in log space: 1 − Σ_k Q_k would cancel when it is small.
    log_q_other = logits.scatter(-1, ids, -math.inf).logsumexp(-1, keepdim=True) - log_z
    return torch.cat([log_p, log_p_other], -1), torch.cat([log_q, log_q_other], -1)


def _finite(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`x` where `keep`, else 0: for the log of a probability whose term must vanish (0 · log 0 = 0 without NaN)."""
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _fkl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    support = ~log_p.isneginf()
    return (log_p.exp() * (_finite(log_p, support) - log_q)).sum(-1)


def _rkl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    support = ~log_p.isneginf()
    # Q restricted to P's support and renormalised: KL(Q || P) would be infinite with mass where P is 0.
    log_q = log_q.masked_fill(~support, -math.inf).log_softmax(-1)
    return (log_q.exp() * (_finite(log_q, support) - _finite(log_p, support))).sum(-1)


def _tv(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def _jsd(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    support = ~log_p.isneginf()
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)  # finite: log Q is (finite logits)
    kl_pm = (log_p.exp() * (_finite(log_p, support) - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


_DIVERGENCE_FNS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "fkl": _fkl,
    "rkl": _rkl,
    "tv": _tv,
    "jsd": _jsd,
}


def _per_position(
    kind: str, drafter_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    log_p, log_q = _log_dists(drafter_logits, topk_ids, topk_logprobs, mask)
    loss = _DIVERGENCE_FNS[kind](log_p, log_q)
    return torch.where(mask.bool(), loss, torch.zeros((), dtype=loss.dtype, device=loss.device))


def fkl_loss(
    drafter_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Per-position forward KL(P ‖ Q) over the K ids and the other bucket, `[B, L]` float32, 0 where `mask` is False
    (see the module docstring)."""
    return _per_position("fkl", drafter_logits, topk_ids, topk_logprobs, mask)


def rkl_loss(
    drafter_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Per-position reverse KL(Q ‖ P) over the K ids and the other bucket, `[B, L]` float32, 0 where `mask` is False.
    Q is restricted to the outcomes P gives nonzero probability (see the module docstring)."""
    return _per_position("rkl", drafter_logits, topk_ids, topk_logprobs, mask)


def tv_loss(
    drafter_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Per-position total variation ½ Σ |P − Q| over the K ids and the other bucket, `[B, L]` float32, 0 where
    `mask` is False. A lower bound of the full-vocabulary TV, so 1 − tv bounds the acceptance rate of exact
    speculative sampling from above (exactly so when K = V)."""
    return _per_position("tv", drafter_logits, topk_ids, topk_logprobs, mask)


def jsd_loss(
    drafter_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Per-position Jensen–Shannon divergence ½ KL(P ‖ M) + ½ KL(Q ‖ M), M = (P + Q) / 2, over the K ids and the
    other bucket, `[B, L]` float32, 0 where `mask` is False."""
    return _per_position("jsd", drafter_logits, topk_ids, topk_logprobs, mask)


def _check_mix(kind: str, mix_weights: dict[str, float] | None) -> dict[str, float]:
    if kind not in LOSS_KINDS:
        raise ValueError(f"Unknown distillation loss kind {kind!r}: choose one of {', '.join(LOSS_KINDS)}.")
    if kind != "mix":
        if mix_weights is not None:
            raise ValueError(f"mix_weights is only used with kind='mix', got kind={kind!r}.")
        return {kind: 1.0}
    if not mix_weights:
        raise ValueError("kind='mix' needs mix_weights, e.g. {'fkl': 0.5, 'tv': 0.5}.")
    unknown = sorted(set(mix_weights) - set(DIVERGENCES))
    if unknown:
        raise ValueError(f"Unknown mix_weights keys {unknown}: choose among {', '.join(DIVERGENCES)}.")
    if any(w < 0 for w in mix_weights.values()) or not any(w > 0 for w in mix_weights.values()):
        raise ValueError(f"mix_weights must be >= 0 with at least one > 0, got {mix_weights}.")
    return {name: float(w) for name, w in mix_weights.items() if w > 0}


def distill_loss(
    drafter_logits: torch.Tensor,
    batch: DistillBatch,
    kind: str = "fkl",
    mix_weights: dict[str, float] | None = None,
    rejected_weight: float = 1.0,
) -> torch.Tensor:
    """Scalar distillation loss of the drafter's logits against the batch's policy targets. The logits are `[B, L, V]`
    over `batch.input_ids`, or `[N, V]` at the N positions of `batch.loss_mask` only (row-major order), which spares
    the LM head and the float32 copies below every prompt position.

    `kind` is one of "fkl", "rkl", "tv", "jsd" or "mix" (Σ `mix_weights[d]` · d over the named divergences; see the
    module docstring). The per-position losses are averaged over `batch.loss_mask` with weight `rejected_weight` on
    positions whose draft was rejected and 1 elsewhere, normalised by the total weight: rejected_weight = 1 is the
    plain mean, larger values focus on the tokens the drafter got wrong, 0 ignores them. A batch with no weighted
    position gives 0 (still connected to the graph).
    """
    weights = _check_mix(kind, mix_weights)
    if rejected_weight < 0:
        raise ValueError(f"rejected_weight must be >= 0, got {rejected_weight}.")
    if drafter_logits.dim() == 2:
        topk_ids, topk_logprobs, mask, rejected = batch.at_targets()
        drafter_logits = drafter_logits[None]
    else:
        topk_ids, topk_logprobs, mask, rejected = batch.topk_ids, batch.topk_logprobs, batch.loss_mask, batch.rejected
    mask = mask.bool()
    log_p, log_q = _log_dists(drafter_logits, topk_ids, topk_logprobs, mask)
    per_position = sum(w * _DIVERGENCE_FNS[name](log_p, log_q) for name, w in weights.items())
    position_weight = torch.where(rejected.bool(), rejected_weight, 1.0) * mask
    per_position = torch.where(mask, per_position, torch.zeros((), dtype=per_position.dtype, device=mask.device))
    return (per_position * position_weight).sum() / position_weight.sum().clamp_min(1e-12)
