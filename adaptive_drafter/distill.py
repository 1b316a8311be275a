"""Distillation losses: divergences between the policy's top-K teacher signal (`targets.PolicyTargets`, batched as a
`targets.DistillBatch`) and the drafter's logits, which the background trainer minimises.

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
from collections.abc import Callable

import torch

from .targets import DistillBatch

DIVERGENCES = ("fkl", "rkl", "tv", "jsd")
LOSS_KINDS = (*DIVERGENCES, "mix")


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
