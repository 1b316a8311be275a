"""Acceptance rules: pure tensor functions over a batch of drafts.

Every rule takes the k drafted tokens `draft [B, k]` and the policy's sampling distribution at the k+1 verified
positions `p [B, k+1, V]` (position i predicts draft i; position k is the bonus), and returns

    num_accepted [B]  the length n of the accepted draft prefix of each row (ragged: 0..k),
    next_token   [B]  the token emitted after it: a correction when n < k, a bonus token when n == k.

A row therefore emits `draft[:n] + [next_token]`, n + 1 tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sampling import sample


def _leading_true(accepted: torch.Tensor) -> torch.Tensor:
    """Length of the all-True prefix of each row of a `[B, k]` bool tensor."""
    return accepted.long().cumprod(dim=-1).sum(dim=-1)


def _at(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x[b, index[b]]` for every row b of a `[B, L, ...]` tensor."""
    return x[torch.arange(x.shape[0], device=x.device), index]


def _drafted_prob(dist: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:
    """Probability each distribution of `dist [B, >=k, V]` gives its drafted token: `[B, k]`."""
    return dist[:, : draft.shape[1]].gather(-1, draft.unsqueeze(-1)).squeeze(-1)


def _accept_or_resample(
    accepted: torch.Tensor, p: torch.Tensor, accepted_mass: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared tail of the sampling rules: the accepted prefix, then one token from the residual
    normalise(max(0, p - accepted_mass)) at the first rejection. The bonus position has no draft, so its accepted
    mass is 0 and the residual there is p itself."""
    n = _leading_true(accepted)
    mass = F.pad(accepted_mass, (0, 0, 0, 1))  # zero at the bonus position
    p_n, residual = _at(p, n), (_at(p, n) - _at(mass, n)).clamp_min(0)
    # A residual of zero mass only arises when a rejection had probability 0 (p == q up to rounding): fall back to p.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)
    return n, sample(residual, generator)


def exact(
    draft: torch.Tensor, q: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lossless speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    Accept draft i while u_i < min(1, p_i(d_i) / q_i(d_i)); at the first rejection sample from
    normalise(max(0, p_i - q_i)); if all k are accepted, sample the bonus from p_{k+1}. Every emitted token is then
    distributed exactly as if sampled from p. `q [B, k, V]` is the drafter's distribution the drafts were sampled from.
    """
    p_d, q_d = _drafted_prob(p, draft), _drafted_prob(q, draft)
    u = torch.rand(draft.shape, generator=generator, device=p.device, dtype=p.dtype)
    # u * q < p is u < p / q without dividing by a zero q (a token q never proposes is then always accepted).
    return _accept_or_resample(u * q_d < p_d, p, q, generator)


def greedy(draft: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification (`do_sample=False`): accept drafts while they equal the policy's argmax, then emit the
    argmax. Token-identical to greedy decoding with the policy alone. Lossless."""
    target = p.argmax(-1)
    n = _leading_true(draft == target[:, : draft.shape[1]])
    return n, _at(target, n)


def lenient(
    draft: torch.Tensor,
    q: torch.Tensor,
    p: torch.Tensor,
    lenience: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LOSSY (SPEC-RL-style lenient acceptance, opt-in): accept draft i while u_i < min(1, lenience * p_i / q_i).

    With lenience = 1 this is `exact`. Larger values accept more drafts and bias completions toward the drafter; the
    correction is sampled from normalise(max(0, p - min(q, lenience * p))), the policy mass the accepted drafts left
    uncovered. The engine still reports the policy's logprob of every emitted token for importance correction.
    """
    p_d, q_d = _drafted_prob(p, draft), _drafted_prob(q, draft)
    u = torch.rand(draft.shape, generator=generator, device=p.device, dtype=p.dtype)
    accepted_mass = torch.minimum(q, lenience * p[:, : draft.shape[1]])
    return _accept_or_resample(u * q_d < lenience * p_d, p, accepted_mass, generator)


def cascade(
    draft: torch.Tensor,
    p: torch.Tensor,
    threshold: float,
    do_sample: bool,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LOSSY (speculative cascades, opt-in): accept a draft token the policy finds likely enough,
    p_i(d_i) >= threshold * max p_i, whatever the drafter's own probability; at the first rejection (and for the bonus)
    fall back to the policy: a sample from p (argmax when greedy). The engine still reports the policy's logprob of
    every emitted token for importance correction."""
    p_d = _drafted_prob(p, draft)
    accepted = p_d >= threshold * p[:, : draft.shape[1]].amax(-1)
    n = _leading_true(accepted & (p_d > 0))
    p_n = _at(p, n)
    return n, sample(p_n, generator) if do_sample else p_n.argmax(-1)
