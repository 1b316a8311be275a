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


# Ragged draft lengths: row b drafted only draft[b, :lengths[b]]; the rest is padding whose tokens and q are junk.


def test_greedy_with_ragged_lengths_stops_at_each_rows_length_and_emits_the_argmax_there():
    argmaxes = [[2, 1, 0, 3], [3, 3, 3, 1], [1, 0, 0, 2], [0, 1, 2, 3]]
    p = torch.stack([torch.stack([one_hot(i) * 0.7 + 0.075 for i in row]) for row in argmaxes])
    # Every real draft equals the argmax, and so does the padding: only the lengths can stop a row.
    draft = torch.tensor([row[:3] for row in argmaxes])
    lengths = torch.tensor([3, 1, 0, 2])
    n, token = acceptance.greedy(draft, p, lengths=lengths)
    assert n.tolist() == [3, 1, 0, 2]
    assert token.tolist() == [3, 3, 1, 2]  # the argmax at position lengths[b]; length 0 is a plain greedy step
    # Padding may hold any pad id, even one outside the vocabulary.
    padded = torch.where(torch.arange(3)[None] < lengths[:, None], draft, -1)
    assert [t.tolist() for t in acceptance.greedy(padded, p, lengths=lengths)] == [n.tolist(), token.tolist()]


def test_full_lengths_change_nothing():
    gen = GEN(11)
    q = torch.softmax(torch.randn(256, 3, 7, generator=gen), -1)
    p = torch.softmax(torch.randn(256, 4, 7, generator=gen), -1)
    draft = torch.multinomial(q.reshape(-1, 7), 1, generator=gen).reshape(256, 3)
    full = torch.full((256,), 3)
    calls = [
        lambda **kw: acceptance.exact(draft, q, p, GEN(9), **kw),
        lambda **kw: acceptance.lenient(draft, q, p, 2.0, GEN(9), **kw),
        lambda **kw: acceptance.cascade(draft, p, 0.3, True, GEN(9), **kw),
        lambda **kw: acceptance.greedy(draft, p, **kw),
    ]
    for call in calls:
        (n0, t0), (n1, t1) = call(), call(lengths=full)
        assert torch.equal(n0, n1) and torch.equal(t0, t1)


def test_no_rule_accepts_more_than_a_rows_length():
    gen = GEN(12)
    rows, k, vocab = 2048, 4, 3
    q = torch.softmax(torch.randn(rows, k, vocab, generator=gen), -1)
    draft = torch.multinomial(q.reshape(-1, vocab), 1, generator=gen).reshape(rows, k)
    p = torch.cat([q, torch.softmax(torch.randn(rows, 1, vocab, generator=gen), -1)], 1)  # p = q: exact accepts all
    lengths = torch.randint(0, k + 1, (rows,), generator=gen)
    junk_q = torch.where(torch.arange(k)[None, :, None] < lengths[:, None, None], q, float("nan"))
    n, _ = acceptance.exact(draft, junk_q, p, GEN(1), lengths=lengths)
    assert torch.equal(n, lengths)
    for n, _ in [
        acceptance.lenient(draft, junk_q, p, 3.0, GEN(1), lengths=lengths),
        acceptance.cascade(draft, p, 0.0, True, GEN(1), lengths=lengths),
        acceptance.greedy(draft, p, lengths=lengths),
    ]:
        assert (n <= lengths).all()
    n, _ = acceptance.cascade(draft, p, 0.0, True, GEN(1), lengths=lengths)
    assert torch.equal(n, lengths)  # threshold 0 accepts every token p allows


P0 = torch.tensor([0.1, 0.4, 0.2, 0.25, 0.05])  # a fixed policy distribution with no dominant token


def first_token_frequencies(n: torch.Tensor, draft: torch.Tensor, token: torch.Tensor, vocab: int) -> torch.Tensor:
    first = torch.where(n >= 1, draft[:, 0], token)
    return torch.bincount(first, minlength=vocab).float() / len(first)


def test_exact_emits_the_bonus_from_p_where_a_ragged_row_runs_out_of_drafts():
    """Rows of length 0 and 1 in one call, padding q one-hot on the policy's likeliest token: a (wrong) residual at the
    padding position would never emit token 1; the bonus emits it with probability 0.4."""
    samples, vocab = 200_000, len(P0)
    lengths = torch.arange(samples) % 2  # even rows: length 0 (plain step); odd rows: one certain draft
    draft = torch.stack([torch.full((samples,), 3), torch.full((samples,), -1)], 1)  # -1: a junk pad id
    q = torch.stack([one_hot(3, vocab), one_hot(1, vocab)]).expand(samples, 2, vocab).clone()
    q[lengths == 0, 0] = one_hot(1, vocab)  # padding at position 0 of the length-0 rows
    certain = torch.stack([one_hot(3, vocab), P0, torch.full((vocab,), 1 / vocab)])
    plain = torch.stack([P0, torch.full((vocab,), 1 / vocab), torch.full((vocab,), 1 / vocab)])
    p = torch.where((lengths == 1)[:, None, None], certain, plain)
    n, token = acceptance.exact(draft, q, p, GEN(4), lengths=lengths)
    assert torch.equal(n, lengths)  # the certain draft is always accepted, and nothing past a row's length
    for length in (0, 1):
        freq = torch.bincount(token[lengths == length], minlength=vocab).float() / (samples // 2)
        assert (freq - P0).abs().max() < 0.01  # > 6 sigma at 100k draws per length


@pytest.mark.parametrize(
    "q0",
    [one_hot(1, 5), one_hot(4, 5), torch.tensor([0.5, 0.0, 0.0, 0.5, 0.0])],
    ids=["one-hot on a likely token", "one-hot on an unlikely token", "sparse empirical"],
)
def test_exact_with_a_deterministic_or_sparse_q_keeps_the_first_token_distributed_as_p(q0):
    """A one-hot q (a deterministic draft, e.g. a suffix match) is accepted with probability p(d) and otherwise
    resampled from p without d; a sparse empirical q (drafts sampled from sibling counts) is exact too. Rows of length
    0 (padding q = junk) ride in the same call."""
    samples, vocab = 200_000, len(P0)
    draft = torch.multinomial(q0, samples, replacement=True, generator=GEN(7))[:, None]
    q = q0.expand(samples, 1, vocab).clone()
    lengths = (torch.arange(samples) % 4 != 0).long()  # every fourth row drafted nothing
    q[lengths == 0] = float("nan")
    p = torch.stack([P0, torch.full((vocab,), 1 / vocab)]).expand(samples, 2, vocab)
    n, token = acceptance.exact(draft, q, p, GEN(8), lengths=lengths)
    assert (n <= lengths).all()
    real = lengths == 1
    freq = first_token_frequencies(n[real], draft[real], token[real], vocab)
    assert (freq - P0).abs().max() < 0.006  # ~5 sigma at 150k draws; a residual keeping d is off by p(d)(1 - p(d))
    expected_accept = torch.minimum(q0, P0).sum()  # p(d) for a one-hot q
    assert n[real].float().mean() == pytest.approx(float(expected_accept), abs=0.006)
    plain = torch.bincount(token[~real], minlength=vocab).float() / int((~real).sum())
    assert (plain - P0).abs().max() < 0.012  # 50k plain steps sample p at position 0
