"""The model-free suffix drafter: each source, the matching and probability rules, the stores' bounds, a brute-force
reference on random sequences, and the batch helper that feeds the ragged acceptance rules."""

import random
import time

import pytest
import torch

from adaptive_drafter import acceptance
from adaptive_drafter.suffix import SuffixConfig, SuffixDraft, SuffixDrafter, expected_accepted, stack_drafts

P = [101, 102, 103]  # a prompt
Q = [201, 202, 203]  # another prompt


def drafter(**config) -> SuffixDrafter:
    """Raw frequencies (prior 0) unless a test says otherwise: the matching logic is what most tests check."""
    return SuffixDrafter(SuffixConfig(**{"prior": 0.0, **config}))


def test_the_prior_shrinks_estimates_from_few_occurrences_and_shortens_their_drafts():
    d = drafter(prior=1.0)
    d.begin([P, P, P])
    d.extend(0, [1, 2, 3, 4, 5])
    once = d.propose(2)
    assert once.probs[0] == 0.5 and len(once.tokens) == 3  # 0.5 ** 4 < min_prob 0.1
    d.extend(1, [1, 2, 3, 4, 5])
    twice = d.propose(2)
    assert twice.probs[0] == pytest.approx(2 / 3) and len(twice.tokens) == 5


def rollout(d: SuffixDrafter, rows: list[tuple[list[int], list[int]]]) -> None:
    """A whole rollout: each row's prompt and completion."""
    d.begin([prompt for prompt, _ in rows])
    for row, (_, completion) in enumerate(rows):
        d.extend(row, completion)
    d.end()


def test_a_sibling_that_went_ahead_drafts_the_continuation():
    d = drafter()
    d.begin([P, P])
    d.extend(0, [1, 2, 3, 4, 5])
    draft = d.propose(1)  # row 1 has only its prompt: the sibling's whole completion follows it
    assert draft.tokens == [1, 2, 3, 4, 5] and draft.probs == [1.0] * 5
    assert draft.source == "sibling" and draft.match_len == 3
    d.extend(1, [1, 2])
    assert d.propose(1).tokens == [3, 4, 5]  # the sibling's completion, matched as it went
    d.extend(0, [6, 7])  # siblings grow during the rollout
    assert d.propose(1).tokens == [3, 4, 5, 6, 7]


def test_the_previous_rollout_of_the_same_prompt_drafts_from_history():
    d = drafter(use_global=False)
    rollout(d, [(P, [1, 2, 3, 4])])
    d.begin([P, Q])
    draft = d.propose(0)
    assert draft.tokens == [1, 2, 3, 4] and draft.source == "history"
    assert d.propose(1) is None  # another prompt's history is not a source without the global store


def test_other_prompts_completions_draft_through_the_global_store():
    d = drafter(use_history=False)
    rollout(d, [(Q, [7, 8, 9, 10, 11])])
    d.begin([P])
    d.extend(0, [7, 8])
    draft = d.propose(0)
    assert draft.tokens == [9, 10, 11] and draft.source == "global" and draft.match_len == 2


def test_the_row_copies_from_its_own_prompt():
    d = drafter()
    d.begin([[5, 6, 7, 8, 9, 10]])
    d.extend(0, [6, 7])
    draft = d.propose(0, max_len=7)
    assert draft.source == "prompt" and draft.match_len == 2
    # The copied span runs into the row's own end, then repeats: the context extended by the draft continues it.
    assert draft.tokens == [8, 9, 10, 6, 7, 8, 9] and draft.probs == [1.0] * 7


def test_a_loop_in_the_rows_own_completion_is_a_source():
    d = drafter()
    d.begin([P])
    d.extend(0, [1, 2, 3, 1, 2, 3, 1, 2])
    draft = d.propose(0, max_len=7)
    assert draft.tokens == [3, 1, 2, 3, 1, 2, 3] and draft.source == "self" and draft.match_len == 5


def test_a_row_never_matches_its_own_end():
    d = drafter()
    d.begin([P, P])
    assert d.propose(0) is None  # the prompt's suffix occurs at its own end only; the sibling has nothing yet
    d.extend(0, [1, 2, 3])
    d.extend(1, [1, 2, 3])
    assert d.propose(0) is None and d.propose(1) is None  # level siblings have no continuation to offer


def test_empty_and_short_contexts_give_no_draft():
    d = drafter(min_match=3)
    d.begin([[], [1], [1, 2], [1, 2]])
    assert d.propose(0) is None and d.propose(1) is None
    d.extend(3, [1, 2, 5, 6])
    assert d.propose(2) is None  # two tokens cannot make a 3-token match
    d.extend(2, [5])
    assert d.propose(2).tokens == [6]
    assert d.propose(2, max_len=0) is None


def test_the_longest_match_wins():
    d = drafter()
    d.begin([P, P, P, P])
    d.extend(0, [9, 4, 5, 6, 1, 1])  # "4 5 6" -> 1
    d.extend(1, [8, 5, 6, 2, 2])  # "5 6" -> 2
    d.extend(2, [7, 5, 6, 2, 2])  # "5 6" -> 2, the majority after a shorter match
    d.extend(3, [4, 5, 6])
    draft = d.propose(3)
    assert draft.match_len == 3 and draft.tokens == [1, 1]  # "4 5 6" once beats "5 6" twice


def test_two_siblings_that_split_after_the_match_give_half_and_half():
    d = drafter(min_prob=0.0)
    d.begin([P, P, P])
    d.extend(0, [1, 2, 3])
    d.extend(1, [1, 4, 5])
    draft = d.propose(2)
    assert draft.probs[0] == 1.0 and draft.probs[1] == 0.5 and draft.dists[1] == {2: 0.5, 4: 0.5}
    assert draft.tokens == [1, 4, 5]  # the tie goes to the most recently indexed occurrence, then only its continuation
    assert draft.probs == [1.0, 0.5, 1.0]
    assert expected_accepted(draft.probs) == pytest.approx(1 + 0.5 + 0.5)


def test_the_draft_stops_where_its_probability_falls_below_min_prob():
    def draft(min_prob):
        d = drafter(min_prob=min_prob)
        d.begin([P] * 5)
        for row, completion in enumerate([[1, 2, 9], [1, 2, 8], [1, 3, 9], [1, 4, 9]]):
            d.extend(row, completion)
        return d.propose(4)

    assert draft(0.3).tokens == [1, 2] and draft(0.3).probs == [1.0, 0.5]  # then 9 or 8: 0.25 < 0.3
    assert draft(0.2).tokens == [1, 2, 8] and draft(0.2).probs == [1.0, 0.5, 0.5]  # the tie: the newer row
    assert draft(0.6).tokens == [1]  # 0.5 < 0.6 stops at the split


def test_history_keeps_max_per_prompt_completions_and_evicts_the_least_recently_used_prompt():
    d = drafter(max_per_prompt=2, max_prompts=2, use_global=False)
    for tail in (1, 2, 3):  # three rollouts of P: the first completion falls out
        rollout(d, [(P, [tail, 50 + tail])])
    d.begin([P])
    assert d.propose(0).dists[0] == {3: 0.5, 2: 0.5}  # the newest first
    d.end()
    rollout(d, [(Q, [7, 8])])
    d.begin([P])  # touching P makes Q the least recently used
    d.end()
    rollout(d, [([301, 302], [9, 9])])
    assert d.stats()["history_prompts"] == 2
    d.begin([P, Q])
    assert d.propose(0) is not None and d.propose(1) is None


def test_the_global_store_keeps_the_newest_completions():
    d = drafter(max_global=2, use_history=False)
    for i in range(3):
        rollout(d, [([300 + i], [10 * i + 1, 10 * i + 2, 10 * i + 3])])
    d.begin([P])
    d.extend(0, [1, 2])
    assert d.propose(0) is None  # the oldest completion was evicted
    d.end()
    for i in range(40):  # churn: evicted entries must not pile up in the index
        rollout(d, [([400 + i], [i + 1000, i + 2000, i + 3000])])
    stats = d.stats()
    assert stats["global_completions"] == 2 and stats["global_entries"] <= 4 * 2 * 4
    d.begin([P])
    d.extend(0, [1039, 2039])
    assert d.propose(0).tokens == [3039]


def test_a_completion_in_history_and_global_counts_once():
    d = drafter(min_prob=0.0)
    rollout(d, [(P, [1, 2]), (P, [1, 3])])
    d.begin([P, P])
    d.extend(1, [1, 2])
    # The sibling and two stored completions: counting the stored ones twice would give 2 3/5 of the mass.
    assert d.propose(0).dists == [{1: 1.0}, {2: 2 / 3, 3: 1 / 3}]


def test_source_flags_switch_sources_off():
    def draft(**flags):
        d = drafter(**flags)
        rollout(d, [(Q, [5, 6, 7])])
        d.begin([[4, 5, 6, 9], [4, 5, 6, 9]])
        d.extend(0, [3, 5, 6])  # "5 6" follows a different token in every source: all match 2 tokens
        d.extend(1, [2, 5, 6, 8])
        return d.propose(0)

    both = draft()
    assert both.dists[0] == {9: 1 / 3, 8: 1 / 3, 7: 1 / 3} and both.tokens[0] == 9  # the tie goes to the prompt
    assert draft(use_prompt=False).tokens == [8] and draft(use_prompt=False).source == "sibling"
    assert draft(use_siblings=False, use_global=False).tokens[0] == 9
    assert draft(use_prompt=False, use_siblings=False).tokens == [7]
    assert draft(use_prompt=False, use_siblings=False, use_global=False) is None


@pytest.mark.parametrize(
    ("probs", "expected"),
    [([], 0.0), ([1.0, 1.0, 1.0], 3.0), ([0.5, 0.5], 0.75), ([1.0, 0.0, 1.0], 1.0), ([0.9, 0.5], 0.9 + 0.45)],
)
def test_expected_accepted_sums_the_prefix_products(probs, expected):
    assert expected_accepted(probs) == pytest.approx(expected)
    assert SuffixDraft([0] * len(probs), probs, 2, "self").expected_accepted() == pytest.approx(expected)


def naive_longest_match(context, sequences, config):
    """Reference: scan every (sequence, end) for the longest common suffix with the context."""
    best, counts = 0, {}
    for seq, ends in sequences:
        for end in ends:
            matched, limit = 0, min(config.max_match, len(context), end)
            while matched < limit and seq[end - 1 - matched] == context[-1 - matched]:
                matched += 1
            if matched < config.min_match or matched < best:
                continue
            if matched > best:
                best, counts = matched, {}
            counts[seq[end]] = counts.get(seq[end], 0) + 1
    return best, counts


@pytest.mark.parametrize("seed", range(4))
def test_matches_agree_with_a_brute_force_scan(seed):
    """Random low-entropy text exercises every rung of the anchor ladder; the index must find exactly the longest
    match and all its occurrences."""
    rng = random.Random(seed)
    config = SuffixConfig(min_match=2, max_match=16, min_prob=0.0, max_candidates=10**6, use_history=False, prior=0.0)
    d = SuffixDrafter(config)
    prompts = [[rng.randrange(3) for _ in range(rng.randrange(0, 12))] for _ in range(3)]
    rows = [prompts[i % 3] for i in range(9)]
    d.begin(rows)
    contexts = [list(p) for p in rows]
    for _ in range(60):
        row = rng.randrange(len(rows))
        # Long runs of one pattern make long matches; random tokens break them.
        tokens = rng.choice([[0, 1] * rng.randrange(1, 6), [rng.randrange(3) for _ in range(rng.randrange(1, 5))]])
        d.extend(row, tokens)
        contexts[row] += tokens
        probe = rng.randrange(len(rows))
        context, prompt_len = contexts[probe], len(rows[probe])
        sources = [(context, range(1, len(context)))]
        sources += [
            (contexts[r], range(prompt_len, len(contexts[r])))
            for r in range(len(rows))
            if r != probe and rows[r] == rows[probe]
        ]
        best, counts = naive_longest_match(context, sources, config)
        draft = d.propose(probe)
        if best == 0:
            assert draft is None
        else:
            total = sum(counts.values())
            assert draft.match_len == best
            assert draft.dists[0] == {t: c / total for t, c in counts.items()}


def test_drafts_are_deterministic():
    def run():
        rng = random.Random(5)
        d = drafter(min_prob=0.0)
        d.begin([P] * 8)
        out = []
        for _ in range(30):
            for row in range(8):
                d.extend(row, [rng.randrange(4)])
                draft = d.propose(row)
                out.append(None if draft is None else (draft.tokens, draft.probs, draft.source, draft.match_len))
        return out

    assert run() == run()


def test_sampled_drafts_follow_the_distributions_and_stop_off_the_path():
    draft = SuffixDraft([1, 2, 3], [1.0, 0.5, 1.0], 2, "sibling", [{1: 1.0}, {2: 0.5, 4: 0.5}, {3: 1.0}])
    gen = torch.Generator().manual_seed(0)
    seen = {tuple(draft.sample(gen).tokens) for _ in range(64)}
    assert seen == {(1, 2, 3), (1, 4)}  # off the path after 4: nothing is known past it
    sampled = draft.sample(torch.Generator().manual_seed(1))
    assert sampled.sampled and sampled.dists == draft.dists[: len(sampled.tokens)]


def test_stack_drafts_feeds_the_ragged_acceptance_rules():
    deterministic = SuffixDraft([3, 1], [1.0, 0.5], 2, "sibling", [{3: 1.0}, {1: 0.5, 2: 0.5}])
    sampled = SuffixDraft([2], [0.5], 2, "history", [{2: 0.5, 0: 0.5}], sampled=True)
    draft, q, lengths = stack_drafts([deterministic, None, sampled], vocab_size=5)
    assert draft.tolist() == [[3, 1], [0, 0], [2, 0]] and lengths.tolist() == [2, 0, 1]
    assert q[0, 0].tolist() == [0, 0, 0, 1, 0] and q[0, 1].tolist() == [0, 1, 0, 0, 0]  # one-hot: deterministic
    assert q[2, 0].tolist() == [0.5, 0, 0.5, 0, 0] and q[1].sum() == 0 and q[2, 1].sum() == 0
    assert stack_drafts([deterministic], k=1)[0].tolist() == [[3]]
    # The policy is certain of every real draft: all are accepted and each row's bonus comes from p at its length.
    p = torch.nn.functional.one_hot(torch.tensor([[3, 1, 4], [4, 0, 0], [2, 4, 0]]), 5).float()
    n, token = acceptance.exact(draft, q, p, torch.Generator().manual_seed(0), lengths=lengths)
    assert n.tolist() == [2, 0, 1] and token.tolist() == [4, 4, 4]


def test_a_batch_of_64_rows_indexes_and_proposes_within_a_loose_time_bound():
    """64 rows (8 prompts x 8 siblings) x 512 tokens indexed, then 32 steps of one query and one token per row. The
    bound is > 50x what one CPU core needs (0.3 s): it catches an accidental full scan per query, not slowness."""
    rng = random.Random(0)
    d = drafter()
    prompts = [[rng.randrange(1000) for _ in range(128)] for _ in range(8)]
    started = time.perf_counter()
    d.begin([prompts[i // 8] for i in range(64)])
    phrases = [[rng.randrange(1000) for _ in range(8)] for _ in range(40)]
    for row in range(64):
        tokens = []
        while len(tokens) < 512:  # text re-using phrases, as completions do
            tokens += rng.choice(phrases) if rng.random() < 0.5 else [rng.randrange(1000)]
        d.extend(row, tokens[:512])
    for _ in range(32):
        for row in range(64):
            d.propose(row)
            d.extend(row, [rng.randrange(1000)])
    d.end()
    assert time.perf_counter() - started < 20
