"""Each acceptance rule on hand-made tensors: all accepted, none accepted, p = q, q = 0, and the distribution the
exact rule emits (Monte Carlo against the closed form)."""

import pytest
import torch

from adaptive_drafter import acceptance


def one_hot(index: int, size: int = 4) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(index), size).float()


def dists(*rows: list[float]) -> torch.Tensor:
    """A `[1, len(rows), V]` batch of one row of distributions."""
    return torch.tensor([rows], dtype=torch.float)


GEN = lambda seed=0: torch.Generator().manual_seed(seed)  # noqa: E731


def test_exact_accepts_everything_when_drafts_are_certain_under_p():
    draft = torch.tensor([[1, 2, 3]])
    q = torch.stack([one_hot(1), one_hot(2), one_hot(3)])[None]
    p = torch.cat([q, one_hot(0)[None, None]], 1)
    n, token = acceptance.exact(draft, q, p, GEN())
    assert n.tolist() == [3] and token.tolist() == [0]  # bonus drawn from the certain p at position k


def test_exact_rejects_a_draft_the_policy_never_emits():
    draft = torch.tensor([[1, 2]])
    q = dists([0, 1, 0, 0], [0, 0, 1, 0])
    p = dists([0, 0, 1, 0], [0, 0, 1, 0], [1, 0, 0, 0])
    n, token = acceptance.exact(draft, q, p, GEN())
    assert n.tolist() == [0] and token.tolist() == [2]  # residual max(0, p - q) at position 0 is all on token 2


def test_exact_with_p_equal_q_always_accepts():
    gen = GEN(3)
    q = torch.softmax(torch.randn(512, 4, 6, generator=gen), -1)
    draft = torch.multinomial(q.reshape(-1, 6), 1, generator=gen).reshape(512, 4)
    p = torch.cat([q, torch.softmax(torch.randn(512, 1, 6, generator=gen), -1)], 1)
    n, _ = acceptance.exact(draft, q, p, gen)
    assert (n == 4).all()


def test_exact_accepts_a_draft_q_gave_zero_probability():
    # Cannot happen when drafts are sampled from q, but the rule must stay defined: min(1, p/0) = 1.
    draft = torch.tensor([[3]])
    q = dists([1, 0, 0, 0])
    p = dists([0, 0, 0, 1], [0, 1, 0, 0])
    n, token = acceptance.exact(draft, q, p, GEN())
    assert n.tolist() == [1] and token.tolist() == [1]


def test_exact_rows_are_ragged():
    draft = torch.tensor([[1, 1], [1, 2], [3, 3]])
    certain = lambda i: one_hot(i)  # noqa: E731
    q = torch.stack(
        [
            torch.stack([certain(1), certain(1)]),
            torch.stack([certain(1), certain(2)]),
            torch.stack([certain(3), certain(3)]),
        ]
    )
    p = torch.stack(
        [
            torch.stack([certain(1), certain(1), certain(0)]),
            torch.stack([certain(1), certain(0), certain(0)]),
            torch.stack([certain(2), certain(3), certain(0)]),
        ]
    )
    n, token = acceptance.exact(draft, q, p, GEN())
    assert n.tolist() == [2, 1, 0]
    assert token.tolist() == [0, 0, 2]


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_first_token_follows_p(seed):
    """Monte Carlo: whatever q is, the first emitted token (draft 0 if accepted, else the correction) ~ p_0."""
    gen = GEN(seed)
    vocab, samples = 5, 200_000
    q0 = torch.softmax(torch.randn(vocab, generator=gen) * 2, -1)
    p0 = torch.softmax(torch.randn(vocab, generator=gen) * 2, -1)
    q = q0.expand(samples, 1, vocab)
    p = torch.stack([p0, torch.full((vocab,), 1 / vocab)]).expand(samples, 2, vocab)
    draft = torch.multinomial(q0, samples, replacement=True, generator=gen)[:, None]
    n, token = acceptance.exact(draft, q, p, gen)
    first = torch.where(n == 1, draft[:, 0], token)
    freq = torch.bincount(first, minlength=vocab).float() / samples
    assert (freq - p0).abs().max() < 0.006  # 5 sigma of a binomial at 200k samples
    expected_accept = torch.minimum(q0, p0).sum()  # P(accept) = sum min(p, q) = 1 - TV(p, q)
    assert (n == 1).float().mean() == pytest.approx(float(expected_accept), abs=0.006)


def test_greedy_accepts_while_equal_to_argmax():
    draft = torch.tensor([[2, 1, 0], [3, 3, 3], [0, 0, 0]])
    argmaxes = [[2, 1, 0, 3], [3, 3, 3, 1], [1, 0, 0, 2]]
    p = torch.stack([torch.stack([one_hot(i) * 0.7 + 0.075 for i in row]) for row in argmaxes])
    n, token = acceptance.greedy(draft, p)
    assert n.tolist() == [3, 3, 0]
    assert token.tolist() == [3, 1, 1]


def test_lenient_with_lenience_one_is_exact():
    gen = GEN(5)
    q = torch.softmax(torch.randn(256, 3, 7, generator=gen), -1)
    p = torch.softmax(torch.randn(256, 4, 7, generator=gen), -1)
    draft = torch.multinomial(q.reshape(-1, 7), 1, generator=gen).reshape(256, 3)
    exact = acceptance.exact(draft, q, p, GEN(9))
    lenient = acceptance.lenient(draft, q, p, 1.0, GEN(9))
    assert torch.equal(exact[0], lenient[0]) and torch.equal(exact[1], lenient[1])


def test_lenient_accepts_more_than_exact():
    gen = GEN(6)
    q = torch.softmax(torch.randn(4096, 4, 7, generator=gen) * 2, -1)
    p = torch.softmax(torch.randn(4096, 5, 7, generator=gen) * 2, -1)
    draft = torch.multinomial(q.reshape(-1, 7), 1, generator=gen).reshape(4096, 4)
    n_exact, _ = acceptance.exact(draft, q, p, GEN(1))
    n_lenient, _ = acceptance.lenient(draft, q, p, 3.0, GEN(1))
    assert (n_lenient >= n_exact).all() and n_lenient.float().mean() > n_exact.float().mean() + 0.2


def test_cascade_accepts_likely_tokens_and_falls_back_to_the_policy():
    draft = torch.tensor([[1, 2, 3]])
    p = dists([0.1, 0.5, 0.4, 0.0], [0.1, 0.5, 0.2, 0.2], [0.0, 0.2, 0.3, 0.5], [0.0, 0.0, 1.0, 0.0])
    # p(1)=0.5 >= 0.3*0.5; p(2)=0.2 >= 0.15; p(3)=0.5 = max: all accepted, greedy bonus = argmax of the last.
    n, token = acceptance.cascade(draft, p, threshold=0.3, do_sample=False)
    assert n.tolist() == [3] and token.tolist() == [2]
    # A stricter threshold rejects draft 1 (p=0.2 < 0.5*0.5): fall back to the policy's argmax there.
    n, token = acceptance.cascade(draft, p, threshold=0.5, do_sample=False)
    assert n.tolist() == [1] and token.tolist() == [1]
    # Sampled fallback draws from p at the rejected position: only tokens with p > 0 there.
    n, token = acceptance.cascade(torch.tensor([[3]]), p[:, [0, 3]], threshold=0.5, do_sample=True, generator=GEN())
    assert n.tolist() == [0] and token.item() in (0, 1, 2)
