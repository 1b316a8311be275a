"""Acceptance rules: pure tensor functions over a batch of drafts.

Every rule takes the k drafted tokens `draft [B, k]` and the policy's sampling distribution at the k+1 verified
positions `p [B, k+1, V]` (position i predicts draft i; position k is the bonus), and returns

    num_accepted [B]  the length n of the accepted draft prefix of each row (ragged: 0..k),
    next_token   [B]  the token emitted after it: a correction when n < k, a bonus token when n == k.

A row therefore emits `draft[:n] + [next_token]`, n + 1 tokens.

Ragged drafts: every rule also takes an optional `lengths [B]` (int64, each in 0..k; not checked, which would cost a
device sync). Row b then drafted only `draft[b, :lengths[b]]`; the rest of its row is padding whose tokens and q are
arbitrary and never read (NaN, or an out-of-vocabulary pad id, are fine). Its n is at most lengths[b], and when all its
real drafts are accepted (n == lengths[b]) its next token is the bonus sampled from p at position lengths[b], never a
residual: there was no draft there. p at the positions after lengths[b] is ignored too. A row of length 0 is a plain
decode step: it emits a sample (or the argmax) of p at position 0. With `lengths=None` every row drafted all k.

Deterministic drafts under `exact`: q = one-hot(d) accepts d with probability p(d) and otherwise resamples from
normalise(max(0, p - one_hot(d))), i.e. p with d removed, so the emitted token is still distributed as p.
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


def _real(draft: torch.Tensor, lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The drafts with padding replaced by token 0 (an arbitrary pad id must not index out of range) and the `[B, k]`
    mask of real drafts; unchanged and None without `lengths`."""
    if lengths is None:
        return draft, None
    if lengths.shape != draft.shape[:1]:
        raise ValueError(f"lengths must have shape [{draft.shape[0]}], got {list(lengths.shape)}.")
    real = torch.arange(draft.shape[1], device=draft.device)[None] < lengths[:, None]
    return draft.masked_fill(~real, 0), real


def _drafted_prob(dist: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:
    """Probability each distribution of `dist [B, >=k, V]` gives its drafted token: `[B, k]`."""
    return dist[:, : draft.shape[1]].gather(-1, draft.unsqueeze(-1)).squeeze(-1)


def _accept_or_resample(
    accepted: torch.Tensor,
    p: torch.Tensor,
    accepted_mass: torch.Tensor,
    generator: torch.Generator | None,
    real: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared tail of the sampling rules: the accepted prefix, then one token from the residual
    normalise(max(0, p - accepted_mass)) at the first rejection. The bonus position has no draft, so its accepted
    mass is 0 and the residual there is p itself. `real` masks ragged rows' padding (see the module docstring)."""
    if real is not None:
        accepted = accepted & real
    n = _leading_true(accepted)
    mass = F.pad(accepted_mass, (0, 0, 0, 1))  # zero at the bonus position
    mass_n = _at(mass, n)
    if real is not None:
        # A row whose real drafts were all accepted stops on padding: a bonus position, so no mass to remove (where,
        # not a product, so a NaN q on padding cannot leak in).
        stopped_on_draft = n < real.sum(-1)
        mass_n = torch.where(stopped_on_draft[:, None], mass_n, torch.zeros_like(mass_n))
    p_n, residual = _at(p, n), (_at(p, n) - mass_n).clamp_min(0)
    # A residual of zero mass only arises when a rejection had probability 0 (p == q up to rounding): fall back to p.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)
    return n, sample(residual, generator)


def exact(
    draft: torch.Tensor,
    q: torch.Tensor,
    p: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lossless speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    Accept draft i while u_i < min(1, p_i(d_i) / q_i(d_i)); at the first rejection sample from
    normalise(max(0, p_i - q_i)); if all k are accepted, sample the bonus from p_{k+1}. Every emitted token is then
    distributed exactly as if sampled from p. `q [B, k, V]` is the drafter's distribution the drafts were sampled from
    (one-hot for a deterministic draft). `lengths [B]`: ragged draft lengths (module docstring).
    """
    draft, real = _real(draft, lengths)
    p_d, q_d = _drafted_prob(p, draft), _drafted_prob(q, draft)
    u = torch.rand(draft.shape, generator=generator, device=p.device, dtype=p.dtype)
    # u * q < p is u < p / q without dividing by a zero q (a token q never proposes is then always accepted).
    return _accept_or_resample(u * q_d < p_d, p, q, generator, real)


def greedy(
    draft: torch.Tensor, p: torch.Tensor, *, lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification (`do_sample=False`): accept drafts while they equal the policy's argmax, then emit the
    argmax. Token-identical to greedy decoding with the policy alone. Lossless. `lengths [B]`: ragged draft lengths."""
    target = p.argmax(-1)
    matches = draft == target[:, : draft.shape[1]]
    if lengths is not None:
        matches = matches & _real(draft, lengths)[1]
    n = _leading_true(matches)
    return n, _at(target, n)


def lenient(
    draft: torch.Tensor,
    q: torch.Tensor,
    p: torch.Tensor,
    lenience: float,
    generator: torch.Generator | None = None,
    *,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LOSSY (SPEC-RL-style lenient acceptance, opt-in): accept draft i while u_i < min(1, lenience * p_i / q_i).

    With lenience = 1 this is `exact`. Larger values accept more drafts and bias completions toward the drafter; the
    correction is sampled from normalise(max(0, p - min(q, lenience * p))), the policy mass the accepted drafts left
    uncovered. The engine still reports the policy's logprob of every emitted token for importance correction.
    `lengths [B]`: ragged draft lengths (module docstring).
    """
    draft, real = _real(draft, lengths)
    p_d, q_d = _drafted_prob(p, draft), _drafted_prob(q, draft)
    u = torch.rand(draft.shape, generator=generator, device=p.device, dtype=p.dtype)
    accepted_mass = torch.minimum(q, lenience * p[:, : draft.shape[1]])
    return _accept_or_resample(u * q_d < lenience * p_d, p, accepted_mass, generator, real)


def cascade(
    draft: torch.Tensor,
    p: torch.Tensor,
    threshold: float,
    do_sample: bool,
    generator: torch.Generator | None = None,
    *,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LOSSY (speculative cascades, opt-in): accept a draft token the policy finds likely enough,
    p_i(d_i) >= threshold * max p_i, whatever the drafter's own probability; at the first rejection (and for the bonus)
    fall back to the policy: a sample from p (argmax when greedy). The engine still reports the policy's logprob of
    every emitted token for importance correction. `lengths [B]`: ragged draft lengths (module docstring)."""
    draft, real = _real(draft, lengths)
    p_d = _drafted_prob(p, draft)
    accepted = p_d >= threshold * p[:, : draft.shape[1]].amax(-1)
    accepted = accepted & (p_d > 0)
    n = _leading_true(accepted if real is None else accepted & real)
    p_n = _at(p, n)
    return n, sample(p_n, generator) if do_sample else p_n.argmax(-1)
