"""Model-free suffix drafts for RL rollouts: continue a row's context from text that already followed it elsewhere.

GRPO samples each prompt n times in one batch (rows with equal prompt ids are *siblings*) and brings the same prompts
back every epoch, so a row's next tokens often already exist: in a sibling that went ahead, in last epoch's completions
of the same prompt, in recent completions of other prompts (boilerplate), or in the row's own prompt and earlier
output (copying, loops). `SuffixDrafter` indexes those token sequences and, per row and decode step, proposes the
continuation that follows the longest suffix of the row's context found in them.

Sources of a row, in the order they break ties: its own context ("prompt": the continuation starts in the prompt;
"self": in its own earlier completion), its siblings' completions as they grow ("sibling"), up to `max_per_prompt`
earlier completions of the same prompt, LRU over `max_prompts` prompts ("history"), and the `max_global` most recent
completions of any prompt, FIFO ("global"); within a source the most recently indexed occurrence comes first (the
newest completions come from the policy closest to the current one). A completion joins the history and global stores
when its rollout ends, so a rollout only sees its own rows through the sibling source.

Matching: the longest suffix of the context, between `min_match` and `max_match` tokens, that occurs in the sources
(the trivial occurrence of the context's suffix at its own end is excluded; earlier positions of the row itself are
fair game). The continuations after all occurrences of that suffix are walked like a trie: at each position the
empirical next-token distribution over the occurrences still agreeing with the draft gives the most frequent token
and its probability, until the draft's estimated probability (the product so far) falls below `min_prob`. An
occurrence in the row's own context continues past the context's end into the draft itself, so a loop keeps drafting.

Index: for each anchor length m in a geometric ladder min_match, 2 min_match, ..., max_match (2, 4, 8, 16 by default),
a dict from the hash of an m-gram to the positions it ends at, updated incrementally as tokens are appended. A query
looks up the context's last m tokens from the longest anchor down; the first anchor with a hit bounds the true match
length to [m, next anchor), which a backward comparison of at most max_match tokens per candidate settles (and which
also discards hash collisions). Costs: `extend` O(len(ladder)) dict inserts per token; `propose` O(len(ladder)) dict
lookups per source, plus O(max_match) per candidate and O(max_len) per matching occurrence, with at most
`max_candidates` candidates per source and lookup (the most recent ones). History indexes are built at `begin` for the
prompts of the rollout only; stored completions otherwise cost 4 bytes a token. An indexed token costs len(ladder)
entries of ~80 bytes: with the defaults, a 64 x 1280-token rollout or the 64-completion global store ~25 MB each (the
global store up to twice that between compactions).
"""

from __future__ import annotations

from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

SOURCES = ("prompt", "self", "sibling", "history", "global")

_PROMPT_UID = 0  # entries of a group's shared prompt: resolved to the querying row's own sequence
_END_BITS = 32  # an occurrence is packed as uid << _END_BITS | end: one int per entry instead of a tuple


@dataclass(frozen=True)
class SuffixConfig:
    """Settings of `SuffixDrafter`.

    `min_prob` = 0.1: a draft token is kept while the estimated probability that it and every token before it are
    accepted stays >= 10%; verifying one more position costs a small fraction of a memory-bound decode step, so a
    token is worth proposing well below even odds, and below ~10% it mostly adds verify work.
    """

    min_match: int = 2
    max_match: int = 16
    max_len: int = 16
    min_prob: float = 0.1
    # The acceptance estimate of a continuation seen `count` times out of `total` is count / (total + prior): one
    # occurrence is a coin flip, not a certainty. Raw frequencies of a few sampled siblings overrate agreement badly
    # (measured in the hybrid engine's tests: 0.65-0.85 estimated where the policy gave the drafted tokens 0.22-0.29).
    prior: float = 1.0
    max_per_prompt: int = 4
    max_prompts: int = 4096
    max_global: int = 64
    max_candidates: int = 256
    use_prompt: bool = True
    use_siblings: bool = True
    use_history: bool = True
    use_global: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.min_match <= self.max_match:
            raise ValueError(f"need 1 <= min_match <= max_match, got {self.min_match} and {self.max_match}.")
        if self.max_match >= 1 << _END_BITS:
            raise ValueError(f"max_match must be < 2**{_END_BITS}, got {self.max_match}.")
        if self.max_len < 0:
            raise ValueError(f"max_len must be >= 0, got {self.max_len}.")
        if not 0.0 <= self.min_prob <= 1.0:
            raise ValueError(f"min_prob must lie in [0, 1], got {self.min_prob}.")
        if self.prior < 0:
            raise ValueError(f"prior must be >= 0, got {self.prior}.")
        for name in ("max_per_prompt", "max_prompts", "max_global", "max_candidates"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")


def expected_accepted(probs: Sequence[float]) -> float:
    """Expected number of accepted draft tokens, sum_j prod_{i<=j} probs[i], treating each token's acceptance as
    independent given the previous ones were accepted (an estimate: `probs` are empirical frequencies)."""
    total, prefix = 0.0, 1.0
    for prob in probs:
        prefix *= prob
        total += prefix
    return total


@dataclass
class SuffixDraft:
    """A proposed continuation of one row.

    tokens     the draft.
    probs      per position, the empirical probability of that token given the draft before it: its acceptance
               estimate under a deterministic draft.
    match_len  the length of the matched context suffix.
    source     which source most of the occurrences that support the whole draft came from (one of `SOURCES`).
    dists      per position, the sparse empirical next-token distribution given the draft before it.
    sampled    False: `tokens` are the most frequent path, a deterministic draft (verify with q = one-hot(tokens));
               True: drawn by `sample`, verify with q = dists.
    """

    tokens: list[int]
    probs: list[float]
    match_len: int
    source: str
    dists: list[dict[int, float]] = field(default_factory=list)
    sampled: bool = False

    def expected_accepted(self) -> float:
        """`expected_accepted(self.probs)`."""
        return expected_accepted(self.probs)

    def sample(self, generator: torch.Generator | None = None) -> SuffixDraft:
        """Draw a draft from `dists` instead of taking the most frequent path: t_j ~ dists[j], ending right after the
        first t_j off the path, since dists[j + 1] conditions on the path. Lossless under the exact rule with q = the
        returned dists: each q is what its token was drawn from, and where to stop depends only on drafted tokens.
        `generator` must be a CPU generator."""
        tokens: list[int] = []
        for j, dist in enumerate(self.dists):
            ids = list(dist)
            weights = torch.tensor([dist[t] for t in ids], dtype=torch.float64)
            token = ids[int(torch.multinomial(weights, 1, generator=generator))]
            tokens.append(token)
            if token != self.tokens[j]:
                break
        dists = self.dists[: len(tokens)]
        probs = [dist[t] for dist, t in zip(dists, tokens)]
        return SuffixDraft(tokens, probs, self.match_len, self.source, dists, sampled=True)


def stack_drafts(
    drafts: Sequence[SuffixDraft | None],
    k: int | None = None,
    vocab_size: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Batch per-row drafts for the acceptance rules' `lengths` argument.

    Returns `draft [B, k]` (padding 0), `q [B, k, V]` when `vocab_size` is given (one-hot of a deterministic draft,
    `dists` of a sampled one, zeros on padding) and `lengths [B]`. `k` defaults to the longest draft; longer drafts are
    cut to k. None (no draft) is a row of length 0.
    """
    lengths = [0 if d is None else len(d.tokens) for d in drafts]
    k = max(lengths, default=0) if k is None else k
    lengths = [min(n, k) for n in lengths]
    draft = torch.zeros(len(drafts), k, dtype=torch.long)
    for b, d in enumerate(drafts):
        if lengths[b]:
            draft[b, : lengths[b]] = torch.tensor(d.tokens[: lengths[b]])
    q = None
    if vocab_size is not None:
        rows, cols, ids, values = [], [], [], []
        for b, d in enumerate(drafts):
            for j in range(lengths[b]):
                dist = d.dists[j] if d.sampled else {d.tokens[j]: 1.0}
                rows += [b] * len(dist)
                cols += [j] * len(dist)
                ids += list(dist)
                values += list(dist.values())
        # Built on the device directly: [B, k, V] is large, the scattered entries are few.
        q = torch.zeros(len(drafts), k, vocab_size, device=device)
        index = tuple(torch.tensor(x, dtype=torch.long, device=device) for x in (rows, cols, ids))
        q.index_put_(index, torch.tensor(values, dtype=q.dtype, device=device))
    return draft.to(device), q, torch.tensor(lengths, dtype=torch.long, device=device)


class _Table:
    """Occurrences of m-grams in a set of sequences, one dict per anchor length m: hash(m-gram) -> packed
    (uid, end) entries in insertion order, where seq[end - m:end] is the m-gram and seq[end:] its continuation.
    A key held once maps to a bare int (most long m-grams are unique; a list each would double the memory)."""

    def __init__(self, ladder: tuple[int, ...]) -> None:
        self.ladder = ladder
        self.maps: list[dict[int, int | list[int]]] = [{} for _ in ladder]
        self.size = 0

    def add(self, uid: int, seq: Sequence[int], end: int) -> int:
        """Index the m-grams ending at `end` for every anchor m <= end; returns the number of entries added."""
        packed, added = uid << _END_BITS | end, 0
        for m, table in zip(self.ladder, self.maps):
            if m > end:
                break
            key = hash(tuple(seq[end - m : end]))
            held = table.get(key)
            if held is None:
                table[key] = packed
            elif type(held) is int:
                table[key] = [held, packed]
            else:
                held.append(packed)
            added += 1
        self.size += added
        return added

    def get(self, level: int, key: int) -> list[int]:
        held = self.maps[level].get(key)
        return [] if held is None else [held] if type(held) is int else held


class _Fifo:
    """A bounded store of finished sequences, oldest evicted first, with one shared `_Table`. Entries are appended in
    increasing uid order, so an evicted sequence's entries are the front of every list: lookups read lists from the
    back and stop at the first dead uid, and the table is rebuilt once dead entries outnumber live ones."""

    def __init__(self, ladder: tuple[int, ...], capacity: int) -> None:
        self.ladder, self.capacity = ladder, capacity
        self.seqs: OrderedDict[int, tuple[array, int]] = OrderedDict()
        self.table, self.live = _Table(ladder), 0

    def add(self, uid: int, seq: array, start: int) -> None:
        if self.capacity == 0:
            return
        self.live += self._index(self.table, uid, seq, start)
        self.seqs[uid] = (seq, start)
        while len(self.seqs) > self.capacity:
            old_uid, (old, old_start) = self.seqs.popitem(last=False)
            self.live -= self._count(old, old_start)
        if self.table.size > 2 * self.live:
            self.table = _Table(self.ladder)
            for uid, (seq, start) in self.seqs.items():
                self._index(self.table, uid, seq, start)

    def lookup(self, level: int, key: int, cap: int) -> list[int]:
        """The newest live entries (at most `cap`), newest first."""
        found = []
        for packed in reversed(self.table.get(level, key)):
            if len(found) >= cap or packed >> _END_BITS not in self.seqs:
                break
            found.append(packed)
        return found

    def _index(self, table: _Table, uid: int, seq: array, start: int) -> int:
        # The last end has an empty continuation: a finished sequence has nothing to propose there.
        return sum(table.add(uid, seq, end) for end in range(start, len(seq)))

    def _count(self, seq: array, start: int) -> int:
        return sum(1 for end in range(start, len(seq)) for m in self.ladder if m <= end)


@dataclass
class _Group:
    """Rows of the current rollout that share a prompt."""

    prompt: tuple[int, ...]
    table: _Table  # the shared prompt (uid 0) and every row's completion as it grows
    history: _Table | None  # earlier completions of this prompt, indexed at `begin`
    history_seqs: dict[int, array]


class SuffixDrafter:
    """Model-free drafts from a rollout's siblings, earlier rollouts and the row's own context (module docstring).

    Rows are the indices of `begin`'s prompts for the whole rollout: a caller that drops finished rows keeps passing
    the original index. Prompts and tokens are the real tokens only (no padding).
    """

    def __init__(self, config: SuffixConfig | None = None) -> None:
        self.config = config or SuffixConfig()
        ladder, m = [], self.config.min_match
        while m < self.config.max_match:
            ladder.append(m)
            m *= 2
        self.ladder = tuple(ladder + [self.config.max_match])
        self._next_uid = _PROMPT_UID + 1
        self._history: OrderedDict[tuple[int, ...], deque[tuple[int, array, int]]] = OrderedDict()
        self._global = _Fifo(self.ladder, self.config.max_global)
        self._groups: list[_Group] = []
        self._row_group: list[_Group] = []
        self._row_uid: list[int] = []
        self._seqs: dict[int, list[int]] = {}  # uid -> prompt + completion so far, of the current rollout's rows
        self._counts = {"proposals": 0, "drafts": 0, "drafted_tokens": 0, "match_len_sum": 0}

    def begin(self, prompts: Sequence[Sequence[int]]) -> None:
        """Start a rollout of `len(prompts)` rows (rows with equal prompts are siblings); an unfinished rollout is
        ended first. Indexes the history of the rollout's prompts."""
        if self._row_uid:
            self.end()
        by_prompt: dict[tuple[int, ...], _Group] = {}
        for prompt in prompts:
            key = tuple(int(t) for t in prompt)
            group = by_prompt.get(key)
            if group is None:
                group = by_prompt[key] = self._new_group(key)
                self._groups.append(group)
            uid = self._take_uid()
            self._seqs[uid] = list(key)
            self._row_group.append(group)
            self._row_uid.append(uid)
            group.table.add(uid, key, len(key))  # the row's completion starts here

    def extend(self, row: int, tokens: Sequence[int] | torch.Tensor) -> None:
        """Append the tokens `row` emitted (this step) to its context and index them."""
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.tolist()
        uid, group = self._row_uid[row], self._row_group[row]
        seq = self._seqs[uid]
        for token in tokens:
            seq.append(int(token))
            group.table.add(uid, seq, len(seq))

    def propose(self, row: int, max_len: int | None = None) -> SuffixDraft | None:
        """The draft for `row`'s next tokens (at most `max_len`, default `config.max_len`), or None when no suffix of
        at least `min_match` tokens matches or the first token's probability is below `min_prob`."""
        self._counts["proposals"] += 1
        max_len = self.config.max_len if max_len is None else max_len
        uid, group = self._row_uid[row], self._row_group[row]
        context = self._seqs[uid]
        occurrences, match_len = self._longest_match(uid, group, context)
        if not occurrences or max_len <= 0:
            return None
        draft = self._walk(occurrences, context, max_len)
        if draft is None:
            return None
        tokens, probs, dists, source = draft
        self._counts["drafts"] += 1
        self._counts["drafted_tokens"] += len(tokens)
        self._counts["match_len_sum"] += match_len
        return SuffixDraft(tokens, probs, match_len, source, dists)

    def end(self) -> None:
        """The rollout finished: its non-empty completions join the history and global stores."""
        config = self.config
        for row, uid in enumerate(self._row_uid):
            group, seq = self._row_group[row], self._seqs[uid]
            prompt_len = len(group.prompt)
            if len(seq) == prompt_len:
                continue
            # The prompt's last max_match tokens are all a match across the boundary can compare.
            tail = group.prompt[-config.max_match :]
            stored = array("i", tail)  # 4 bytes a token
            stored.extend(seq[prompt_len:])
            if config.use_history and config.max_per_prompt and config.max_prompts:
                completions = self._history.get(group.prompt)
                if completions is None:
                    completions = self._history[group.prompt] = deque(maxlen=config.max_per_prompt)
                completions.append((uid, stored, len(tail)))
                self._history.move_to_end(group.prompt)
                while len(self._history) > config.max_prompts:
                    self._history.popitem(last=False)
            if config.use_global:
                self._global.add(uid, stored, len(tail))
        self._groups, self._row_group, self._row_uid, self._seqs = [], [], [], {}

    def stats(self) -> dict[str, float]:
        """Index sizes and proposal counters."""
        drafts = self._counts["drafts"]
        return {
            "rows": float(len(self._row_uid)),
            "groups": float(len(self._groups)),
            "rollout_entries": float(sum(g.table.size for g in self._groups)),
            "history_prompts": float(len(self._history)),
            "history_completions": float(sum(len(c) for c in self._history.values())),
            "history_entries": float(sum(g.history.size for g in self._groups if g.history is not None)),
            "global_completions": float(len(self._global.seqs)),
            "global_entries": float(self._global.table.size),
            "proposals": float(self._counts["proposals"]),
            "drafts": float(drafts),
            "drafted_tokens": float(self._counts["drafted_tokens"]),
            "mean_match_len": self._counts["match_len_sum"] / drafts if drafts else 0.0,
        }

    def _take_uid(self) -> int:
        uid, self._next_uid = self._next_uid, self._next_uid + 1
        return uid

    def _new_group(self, prompt: tuple[int, ...]) -> _Group:
        table = _Table(self.ladder)
        # The prompt is indexed once for all siblings; its last end belongs to each row (where its completion starts).
        for end in range(1, len(prompt)):
            table.add(_PROMPT_UID, prompt, end)
        history, history_seqs = None, {}
        stored = self._history.get(prompt) if self.config.use_history else None
        if stored:
            self._history.move_to_end(prompt)
            history = _Table(self.ladder)
            for uid, seq, start in stored:
                history_seqs[uid] = seq
                for end in range(start, len(seq)):
                    history.add(uid, seq, end)
        return _Group(prompt, table, history, history_seqs)

    def _longest_match(
        self, uid: int, group: _Group, context: list[int]
    ) -> tuple[list[tuple[Sequence[int], int, str]], int]:
        """All usable occurrences (sequence, end, source) of the longest matching context suffix, in tie-break order,
        and its length."""
        length = len(context)
        limit = min(self.config.max_match, length)
        for level in reversed(range(len(self.ladder))):
            m = self.ladder[level]
            if m > length:
                continue
            key = hash(tuple(context[length - m :]))
            candidates = self._candidates(uid, group, context, level, key)
            best, found = 0, []
            for seq, end, source in candidates:
                matched = 0
                while matched < limit and matched < end and seq[end - 1 - matched] == context[length - 1 - matched]:
                    matched += 1
                if matched < m:  # a hash collision
                    continue
                if matched > best:
                    best, found = matched, []
                if matched == best:
                    found.append((seq, end, source))
            if found:
                return found, best
        return [], 0

    def _candidates(
        self, uid: int, group: _Group, context: list[int], level: int, key: int
    ) -> list[tuple[Sequence[int], int, str]]:
        config, cap, mask = self.config, self.config.max_candidates, (1 << _END_BITS) - 1
        own, others = [], []
        if config.use_prompt or config.use_siblings:
            for packed in reversed(group.table.get(level, key)[-cap:]):
                other, end = packed >> _END_BITS, packed & mask
                if other == _PROMPT_UID:
                    if config.use_prompt:
                        own.append((context, end, "prompt"))
                elif other == uid:
                    # Not the context's own end: that is the suffix matching itself.
                    if config.use_prompt and end < len(context):
                        own.append((context, end, "self"))
                elif config.use_siblings:
                    seq = self._seqs[other]
                    if end < len(seq):  # a sibling exactly level with the row has nothing to add yet
                        others.append((seq, end, "sibling"))
        stored: list[tuple[Sequence[int], int, str]] = []
        seen: set[int] = set()  # a completion can sit in both the history and the global store
        if group.history is not None:
            for packed in reversed(group.history.get(level, key)[-cap:]):
                seen.add(packed)
                stored.append((group.history_seqs[packed >> _END_BITS], packed & mask, "history"))
        if config.use_global:
            for packed in self._global.lookup(level, key, cap):
                if packed not in seen:
                    stored.append((self._global.seqs[packed >> _END_BITS][0], packed & mask, "global"))
        return own + others + stored

    def _walk(
        self, occurrences: list[tuple[Sequence[int], int, str]], context: list[int], max_len: int
    ) -> tuple[list[int], list[float], list[dict[int, float]], str] | None:
        """The most frequent path through the occurrences' continuations, while its probability >= min_prob.

        An occurrence in the row's own context runs into the context's end; past it the continuation is the context
        extended by the draft itself, so a loop (or a copied span that repeats) keeps drafting instead of stopping."""
        tokens: list[int] = []
        probs: list[float] = []
        dists: list[dict[int, float]] = []
        alive, prefix = occurrences, 1.0

        def at(seq: Sequence[int], i: int) -> int | None:
            if i < len(seq):
                return seq[i]
            # end <= len(context) - 1, so i - len(context) < j: already drafted.
            return tokens[i - len(seq)] if seq is context else None

        for j in range(max_len):
            counts: dict[int, int] = {}  # insertion order breaks ties: the earliest supporting occurrence wins
            for seq, end, _ in alive:
                token = at(seq, end + j)
                if token is not None:
                    counts[token] = counts.get(token, 0) + 1
            if not counts:
                break
            total = sum(counts.values())
            token = max(counts, key=counts.__getitem__)
            prob = counts[token] / (total + self.config.prior)
            if prefix * prob < self.config.min_prob:
                break
            prefix *= prob
            tokens.append(token)
            probs.append(prob)
            dists.append({t: c / total for t, c in counts.items()})
            alive = [o for o in alive if at(o[0], o[1] + j) == token]
        if not tokens:
            return None
        votes: dict[str, int] = {}
        for _, _, source in alive:
            votes[source] = votes.get(source, 0) + 1
        source = max(SOURCES, key=lambda s: (votes.get(s, 0), -SOURCES.index(s)))
        return tokens, probs, dists, source
