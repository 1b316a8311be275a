"""The batched speculative decoder: draft → verify → accept over Hugging Face causal LMs with KV caches.

Both models keep a rectangular KV cache over *slots*. Rows accept different numbers of drafts (ragged), so a slot
may hold a rejected draft: a *hole*. A bool mask `valid [B, S]` marks the slots that hold a token of the row; it is
the attention mask, and the position of a row's next token is its count of valid slots, so positions stay
contiguous per row despite left padding and holes. Trailing slots no row kept are cropped, caches are compacted when
holes pile up, and finished rows leave the batch.

Invariant between steps: the policy's cache holds every token of a row except the last one emitted; the drafter's
cache lags further, by the tokens in `pending` (left-padded), which it consumes before drafting.

Hybrid drafting (`SpecConfig.drafting='hybrid'`): per step, each row verifies either the model drafter's k drafts or a
model-free suffix draft (`suffix.SuffixDrafter`: its siblings' completions, earlier rollouts, its own context), the one
with the larger expected accepted length; rows of different draft lengths share one verify forward (`lengths`, padding
beyond). Rows that did not verify the drafter's drafts turn the drafter's cached drafts into holes and queue what they
emitted in `pending`, whose slots may be invalid anywhere but whose last column is always each row's newest token.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import DynamicCache

from . import acceptance
from .config import SpecConfig
from .drafter import ReducedVocabDrafter, check_compatible
from .elastic import ElasticController, expected_tokens
from .metrics import SpecStats
from .sampling import SamplingParams, process_logits, sample
from .suffix import SuffixConfig, SuffixDraft, SuffixDrafter, stack_drafts
from .targets import PolicyTargets


@dataclass
class SpecOutput:
    """Result of `SpeculativeEngine.generate`, one entry per prompt row."""

    completion_ids: list[list[int]]  # the new tokens, up to and including the first eos
    logprobs: list[list[float]]  # the policy's logprob of each of them under the sampling distribution
    stats: SpecStats = field(default_factory=SpecStats)
    targets: list[PolicyTargets] | None = None  # the distiller's targets, when SpecConfig.collect_topk > 0


@dataclass
class _KV:
    """One model's KV cache and the mask of its slots that hold real tokens."""

    cache: DynamicCache
    valid: torch.Tensor  # [B, S] bool

    def select(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.valid = self.valid[rows]

    def crop(self) -> None:
        """Drop trailing slots that no row kept."""
        kept = self.valid.any(0).nonzero()
        trailing = self.valid.shape[1] - (int(kept[-1]) + 1 if len(kept) else 0)
        if trailing:
            self.cache.crop(-trailing)
            self.valid = self.valid[:, :-trailing]

    def compact(self, threshold: float, max_slots: int | None = None) -> None:
        """Gather each row's valid slots to the right, keeping their order, once that would free more than `threshold`
        of the slots (or the cache is longer than `max_slots`). Positions are kept per token: attention is unchanged."""
        slots = self.valid.shape[1]
        width = int(self.valid.sum(1).max()) if slots else 0
        if slots == 0 or width == slots:
            return
        if 1 - width / slots <= threshold and (max_slots is None or slots <= max_slots):
            return
        order = torch.argsort(self.valid.to(torch.int8), dim=1, stable=True)[:, -width:]
        for layer in self.cache.layers:
            index = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)
        self.valid = self.valid.gather(1, order)


@cache
def _cache_argument(forward_owner: type) -> str:
    """The name a model's forward takes its KV cache by: `cache` in recent transformers (which deprecates
    `past_key_values`), `past_key_values` in older ones (vLLM's environment pins one)."""
    return "cache" if "cache" in inspect.signature(forward_owner.forward).parameters else "past_key_values"


def _forward_owner(model: Any) -> type:
    if isinstance(model, ReducedVocabDrafter):
        return type(model.decoder)
    return type(model.get_base_model() if isinstance(model, PeftModel) else model)


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """`{name: cache}` for a forward call of `model`, under the name its transformers version takes."""
    return {_cache_argument(_forward_owner(model)): cache}


def _forward(model: Any, kv: _KV, tokens: torch.Tensor, token_valid: torch.Tensor, logits_to_keep: int = 0):
    """Run `tokens [B, m]` through `model`, appending m slots to its cache; invalid tokens become holes."""
    positions = kv.valid.sum(1, keepdim=True) + token_valid.cumsum(1) - 1
    kv.valid = torch.cat([kv.valid, token_valid], dim=1)
    out = model(
        input_ids=tokens,
        attention_mask=kv.valid.long(),
        position_ids=positions.clamp_min(0),
        use_cache=True,
        logits_to_keep=logits_to_keep,
        **cache_kwargs(model, kv.cache),
    )
    return out.logits


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_draft(config: SpecConfig) -> int:
    """The most drafts a row verifies in one step."""
    return max(config.num_draft_tokens, config.suffix_max_draft if config.drafting != "model" else 0)


def _max_positions(model: Any) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def _sliding_window(model: Any) -> int | None:
    return getattr(model.config, "sliding_window", None)


class SpeculativeEngine:
    """Batched, lossless-by-default speculative decoding: the drafter proposes `num_draft_tokens` tokens per row, the
    policy verifies them all in one forward pass, and the acceptance rule keeps a per-row prefix.

    `policy` and `drafter` are Hugging Face causal LMs (plain or peft-wrapped) sharing a tokenizer. Pass the
    tokenizers to have them checked for compatibility too. The engine only decodes: an adaptive drafter
    (`adaptive_drafter.adaptive.AdaptiveDrafter`) hands it the draft model of each rollout and takes back the policy's
    targets it collected.
    """

    def __init__(
        self,
        policy: Any,
        drafter: Any,
        config: SpecConfig | None = None,
        *,
        tokenizer: Any = None,
        drafter_tokenizer: Any = None,
    ) -> None:
        self.policy, self.drafter = policy, drafter
        self.config = config if config is not None else SpecConfig()
        self.vocab_size = check_compatible(policy, drafter, tokenizer, drafter_tokenizer, self.config.vocab_size)
        self._lock = threading.Lock()  # one rollout at a time: the controller's measurements are per step
        # Persists across calls: acceptance and costs measured in one rollout inform the next.
        self.controller = ElasticController(self.config.num_draft_tokens, self.config.plain_batch_threshold)
        # Model-free drafts; persists across calls: its history and global stores are the earlier rollouts.
        self.suffix = (
            SuffixDrafter(SuffixConfig(max_len=self.config.suffix_max_draft)) if self.config.drafting != "model" else None
        )

    def drafter_changed(self) -> None:
        """The draft model's weights changed (a new adapter): the acceptance measured so far describes the old one."""
        self.controller.forget_acceptance()

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
        *,
        drafter: Any = None,
        collect_topk: int | None = None,
        policy_version: int = 0,
    ) -> SpecOutput:
        """Generate up to `max_new_tokens` tokens for each left-padded prompt row.

        Each row stops after its first token in `eos_token_id` (one id or several). With `acceptance="exact"` the
        completions are samples from the policy's sampling distribution (greedy: identical to
        `policy.generate(do_sample=False)`). `generator` seeds drafting, acceptance and sampling for reproducibility.
        `drafter` drafts this call instead of the engine's own (a merged or reduced-vocabulary serving copy of it);
        `collect_topk` (default `SpecConfig.collect_topk`) keeps the policy's top-K logprobs at every generated
        position in `SpecOutput.targets`, stamped with `policy_version`.
        """
        params = SamplingParams(do_sample, temperature, top_k, top_p, min_p)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self._validate(input_ids, attention_mask, max_new_tokens)
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        pad = pad_token_id if pad_token_id is not None else 0
        if not 0 <= pad < self.vocab_size:
            raise ValueError(f"pad_token_id {pad} is outside the vocabulary [0, {self.vocab_size}).")
        topk = self.config.collect_topk if collect_topk is None else collect_topk
        if topk < 0:
            raise ValueError(f"collect_topk must be >= 0 (0 collects nothing), got {topk}.")
        mask = attention_mask.bool()
        input_ids = input_ids.long().masked_fill(~mask, pad)  # whatever sits under the padding is never looked up
        with self._lock:
            draft_model = drafter if drafter is not None else self.drafter
            rollout = _Rollout(self, draft_model, params, eos, pad, max_new_tokens, generator, topk, policy_version)
            if self.suffix is None:
                return rollout.run(input_ids, mask)
            self.suffix.begin([row[row_mask].tolist() for row, row_mask in zip(input_ids, mask)])
            try:
                return rollout.run(input_ids, mask)
            finally:
                self.suffix.end()  # the completions (so far, on an error) join the history

    def _validate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> None:
        if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(
                f"input_ids must be a non-empty [batch, length] tensor, got shape {tuple(input_ids.shape)}."
            )
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids {tuple(input_ids.shape)}; "
                "they must match."
            )
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        mask = attention_mask.bool()
        lengths = mask.sum(1)
        if (lengths == 0).any():
            rows = (lengths == 0).nonzero().flatten().tolist()
            raise ValueError(f"Prompt rows {rows[:10]} are empty (attention_mask all zero); every row needs a token.")
        if (mask[:, 1:] < mask[:, :-1]).any():
            raise ValueError(
                "Prompts must be left-padded (padding before the text), but attention_mask has padding after text. "
                "Set tokenizer.padding_side = 'left'."
            )
        real = input_ids[mask]
        if real.min() < 0 or real.max() >= self.vocab_size:
            raise ValueError(
                f"input_ids hold token ids outside [0, {self.vocab_size}), the vocabulary shared by policy and drafter."
            )
        needed = int(lengths.max()) + max_new_tokens
        for name, model in (("policy", self.policy), ("drafter", self.drafter)):
            limit = _max_positions(model)
            if limit is not None and needed > limit:
                raise ValueError(
                    f"The longest prompt ({int(lengths.max())} tokens) plus max_new_tokens ({max_new_tokens}) needs "
                    f"{needed} positions, beyond the {name}'s max_position_embeddings ({limit}). Shorten the prompts "
                    "or lower max_new_tokens."
                )
            window = _sliding_window(model)
            if window is not None and input_ids.shape[1] + max_new_tokens + _max_draft(self.config) + 1 > window:
                raise ValueError(
                    f"The {name} uses sliding-window attention ({window} tokens), which the engine supports only while "
                    f"prompt width ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) + num_draft_tokens + 1 "
                    "fits inside the window. Shorten the prompts or lower max_new_tokens."
                )


@dataclass
class _Step:
    """What one decode step emitted: per row, the first `count[b]` entries along dim 1 are real."""

    tokens: torch.Tensor  # [B, m] emitted tokens
    count: torch.Tensor  # [B]
    log_p: torch.Tensor  # [B, m, V] the policy's sampling distribution each token was drawn from
    drafted: torch.Tensor  # [B, m] bool: a draft was proposed at this position
    accepted: torch.Tensor  # [B, m] bool: ...and accepted


@dataclass
class _Hybrid:
    """What a hybrid step verified, for the controller: the verify width (the longest row's drafts) and the model
    drafter's part (k = 0: it did not run)."""

    width: int
    k: int
    model_accepted: int  # drafts accepted in the rows that verified the model drafter's drafts
    model_rejections: int  # ...and those of them stopped at a rejected draft


class _Rollout:
    """The state of one `generate` call; `run` is the algorithm, top to bottom."""

    def __init__(
        self,
        engine: SpeculativeEngine,
        draft_model: Any,
        params: SamplingParams,
        eos: set[int],
        pad: int,
        max_new_tokens: int,
        generator: torch.Generator | None,
        topk: int,
        policy_version: int,
    ) -> None:
        self.policy, self.drafter, self.config = engine.policy, draft_model, engine.config
        self.vocab_size, self.params, self.eos, self.pad = engine.vocab_size, params, eos, pad
        self.max_new_tokens, self.generator = max_new_tokens, generator
        self.policy_version, self.topk = policy_version, topk
        self.controller, self.draft_seconds, self.draft_steady = engine.controller, 0.0, True
        self.nonfinite = {"policy": torch.tensor(False), "drafter": torch.tensor(False)}
        self.stats = SpecStats()
        # A sliding-window model sees exactly the full context only while its cache fits in the window.
        windows = [_sliding_window(m) for m in (self.policy, self.drafter)]
        self.max_slots = [None if w is None else w - _max_draft(self.config) - 3 for w in windows]
        self.suffix = engine.suffix
        self.hybrid: _Hybrid | None = None  # what the last step verified, when it was a hybrid step

    def run(self, input_ids: torch.Tensor, mask: torch.Tensor) -> SpecOutput:
        batch, device = input_ids.shape[0], input_ids.device
        self.completions: list[list[int]] = [[] for _ in range(batch)]
        self.logprobs: list[list[float]] = [[] for _ in range(batch)]
        self.targets: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in range(batch)]
        rows = list(range(batch))  # original index of each active row

        # The prefill is the first plain step: the policy reads the whole prompt and emits each row's first token. The
        # drafter's pending block starts as the whole prompt: it prefills it when it first drafts, so a rollout that
        # never speculates (elastic or plain_batch_threshold) never runs the drafter.
        empty = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        self.pol, self.dr = _KV(DynamicCache(), empty), _KV(DynamicCache(), empty.clone())
        self.pending, self.pending_valid = input_ids, mask
        rows = self._drop_finished(rows, self._record(rows, self._plain_step(input_ids, mask)))
        self.stats.emitted_tokens = 0  # the decode steps' tokens only, as their timing

        while rows:
            remaining = max(self.max_new_tokens - len(self.completions[r]) for r in rows)
            k = self._draft_length(len(rows), limit=min(self.config.num_draft_tokens, remaining - 1))
            started = time.perf_counter()
            suffix_drafts = self._suffix_drafts(rows, k) if self.suffix is not None else None
            self.hybrid = None
            if suffix_drafts is not None:
                step = self._hybrid_step(k, suffix_drafts)
            elif k:
                step = self._speculative_step(k)
            else:
                step = self._plain_step(self.pending[:, -1:], self.pending_valid[:, -1:])
            emitted = self.stats.emitted_tokens
            done = self._record(rows, step)  # synchronises: the step's time is now known
            seconds = time.perf_counter() - started
            self._observe(len(rows), k, step, seconds)
            self._time(len(rows), self.stats.emitted_tokens - emitted, seconds)
            rows = self._drop_finished(rows, done)
            self.pol.crop()
            self.dr.crop()
            self.pol.compact(self.config.compact_threshold, self.max_slots[0])
            self.dr.compact(self.config.compact_threshold, self.max_slots[1])
        return SpecOutput(self.completions, self.logprobs, self.stats, self._policy_targets(input_ids, mask))

    def _draft_length(self, batch: int, limit: int) -> int:
        if self.config.drafting == "suffix":  # the drafter model never drafts; plain steps are still timed now and then
            if self.config.elastic:
                self.controller.measure_plain_now(batch)
            return 0
        if self.config.elastic:
            return self.controller.choose(batch, limit)
        threshold = self.config.plain_batch_threshold
        return 0 if limit <= 0 or (threshold is not None and batch >= threshold) else limit

    def _time(self, batch: int, tokens: int, seconds: float) -> None:
        """Account the step's wall time beside what plain decoding would have taken for its tokens at this batch size,
        from the plain steps measured in this engine (none measured at this batch size yet: the step is left out)."""
        self.stats.decode_seconds += seconds
        plain = self.controller.plain_seconds(batch)
        if plain is not None:
            self.stats.timed_seconds += seconds
            self.stats.plain_equivalent_seconds += tokens / batch * plain

    def _observe(self, batch: int, k: int, step: _Step, seconds: float) -> None:
        """Feed the controller the step's measured cost and acceptance (plain costs always: they are the baseline of
        the measured speed-up)."""
        if self.hybrid is not None:
            self._observe_hybrid(batch, self.hybrid, seconds)
            return
        if k == 0:
            self.controller.observe_plain(batch, seconds)
            return
        accepted = step.count - 1
        if not self.config.elastic:
            if self.suffix is not None:  # the per-row choice between the sources reads α in both modes
                self.controller.observe_acceptance(int(accepted.sum()), int((accepted < k).sum()))
            return
        self.controller.observe_speculation(
            batch,
            k,
            self.draft_seconds if self.draft_steady else None,
            seconds - self.draft_seconds,
            int(accepted.sum()),
            int((accepted < k).sum()),
        )

    def _observe_hybrid(self, batch: int, hybrid: _Hybrid, seconds: float) -> None:
        """A hybrid step: the verify cost at its width (and the drafter's step cost when it ran) in elastic mode; the
        model drafter's acceptance, from its rows only, in both modes (the per-row choice reads α)."""
        if self.config.elastic:
            draft_seconds = self.draft_seconds if hybrid.k and self.draft_steady else None
            verify_seconds = seconds - (self.draft_seconds if hybrid.k else 0.0)
            self.controller.observe_costs(batch, hybrid.k, draft_seconds, hybrid.width, verify_seconds)
        if hybrid.k:
            self.controller.observe_acceptance(hybrid.model_accepted, hybrid.model_rejections)

    def _suffix_drafts(self, rows: list[int], k: int) -> list[SuffixDraft | None] | None:
        """Per active row, the suffix draft it verifies this step instead of the model drafter's (None: the model's
        k drafts, or with k = 0 a plain decode inside the verify); None when no row takes a suffix draft.

        With k > 0 a row takes its suffix draft when the draft's expected accepted length is at least the model
        drafter's at k, expected_tokens(α, k) - 1 with the controller's α. With k = 0 (plain chosen) the rows whose
        suffix draft expects >= 1 accepted token still speculate, unless the controller is measuring a plain step, the
        batch is at `plain_batch_threshold`, or the verify does not pay: the batch's mean expected tokens per row,
        (1 + expected accepted) for those rows and 1 for the others, over v_K (the controller's interpolated cost of a
        verify of the longest of those drafts, K, relative to a plain step) below the controller's `min_speedup`
        (unmeasured v_K: speculate, the measurement follows). A suffix draft costs no drafter forward (c ~ 0)."""
        threshold = self.config.plain_batch_threshold
        if (threshold is not None and len(rows) >= threshold) or (k == 0 and self.controller.measuring_plain):
            return None
        drafts = []
        for row in rows:
            limit = min(self.config.suffix_max_draft, self.max_new_tokens - len(self.completions[row]) - 1)
            drafts.append(self.suffix.propose(row, limit) if limit > 0 else None)
        expected = [0.0 if d is None else d.expected_accepted() for d in drafts]
        bar = expected_tokens(self.controller.alpha, k) - 1 if k else 1.0
        chosen = [d if d is not None and e >= bar else None for d, e in zip(drafts, expected)]
        if not any(d is not None for d in chosen):
            return None
        if k == 0:
            width = max(len(d.tokens) for d in chosen if d is not None)
            verify = self.controller.verify_cost(len(rows), width)
            tokens = sum(1 + e if d is not None else 1.0 for d, e in zip(chosen, expected)) / len(rows)
            if self.config.elastic and verify is not None and tokens / verify < self.controller.min_speedup:
                return None
        return chosen

    def _hybrid_step(self, k: int, suffix_drafts: list[SuffixDraft | None]) -> _Step:
        """Verify per row either its suffix draft or the model drafter's k drafts (rows without a suffix draft; with
        k = 0 they decode plainly inside the same forward), in one policy pass of width K = the longest draft.

        The drafter runs (over all rows, batched) only when some row verifies its drafts; it then caches its own
        d1..d(k-1) for every row, which become holes in the other rows. What each row emitted and the drafter has not
        seen goes into `pending`, right-aligned so its last column is every row's newest token."""
        batch, device = len(suffix_drafts), self.pending.device
        use_suffix = torch.tensor([d is not None for d in suffix_drafts], device=device)
        model_ran = k > 0 and not all(d is not None for d in suffix_drafts)
        model_rows = ~use_suffix if model_ran else torch.zeros_like(use_suffix)
        need_q = self.params.do_sample and self.config.acceptance in ("exact", "lenient")
        last = self.pending[:, -1:]
        draft_m = q_m = None
        if model_ran:
            self.draft_steady = self.pending.shape[1] <= max(2, self.config.num_draft_tokens + 1)
            started = time.perf_counter()
            draft_m, q_m = self._draft(k)
            if self.config.elastic:
                _synchronize(draft_m.device)
                self.draft_seconds = time.perf_counter() - started
        draft_s, q_s, len_s = stack_drafts(suffix_drafts, vocab_size=self.vocab_size if need_q else None, device=device)
        width = max(k if model_ran else 0, draft_s.shape[1])
        draft = F.pad(draft_s, (0, width - draft_s.shape[1]))
        lengths = len_s
        q = None if q_s is None else F.pad(q_s, (0, 0, 0, width - q_s.shape[1]))
        if model_ran:
            draft = torch.where(model_rows[:, None], F.pad(draft_m, (0, width - k)), draft)
            lengths = torch.where(model_rows, k, lengths)
            if q is not None:
                q = torch.where(model_rows[:, None, None], F.pad(q_m, (0, 0, 0, width - k)), q.to(q_m.dtype))

        block = torch.cat([last, draft], 1)
        log_p = self._policy_logprobs(_forward(self.policy, self.pol, block, torch.ones_like(block, dtype=torch.bool)))
        self.stats.policy_forwards += 1
        n, token = self._accept(draft, q, log_p, lengths)

        # The policy cached [last, drafts]: row b keeps last and its n accepted drafts.
        position = torch.arange(width + 1, device=device)[None]
        kept = position <= n[:, None]
        self.pol.valid[:, -(width + 1) :] = kept
        if model_ran and k > 1:  # the drafter cached its d1..d(k-1): holes except the model rows' accepted ones
            self.dr.valid[:, -(k - 1) :] = kept[:, 1:k] & model_rows[:, None]
        tokens = torch.cat([draft, draft[:, :1]], 1).scatter(1, n[:, None], token[:, None])
        count = n + 1
        # Unseen by the drafter: a model row's d_k where all k were accepted and its new token; every other row's
        # emitted tokens. Right-aligned, invalid on the left, after whatever `pending` still holds.
        unseen = torch.where(model_rows, 1 + (n == k).long(), count)
        new_width = int(unseen.max())
        column = torch.arange(new_width, device=device)[None]
        new_valid = column >= (new_width - unseen)[:, None]
        new = tokens.gather(1, (count[:, None] - new_width + column).clamp_min(0)).masked_fill(~new_valid, self.pad)
        self.pending = torch.cat([self.pending, new], 1)
        self.pending_valid = torch.cat([self.pending_valid, new_valid], 1)
        self._compact_pending()

        n_list, lengths_list, suffix_list = n.tolist(), lengths.tolist(), use_suffix.tolist()
        model_list = model_rows.tolist()
        verifies = [b for b in range(batch) if lengths_list[b] > 0]
        self.stats.drafted += sum(lengths_list)
        self.stats.accepted += sum(n_list)
        self.stats.verify_steps += len(verifies)
        self.stats.verified_tokens += sum(n_list[b] + 1 for b in verifies)
        self.stats.plain_steps += batch - len(verifies)
        suffix_rows = [b for b in range(batch) if suffix_list[b]]
        self.stats.suffix_verifies += len(suffix_rows)
        self.stats.suffix_drafted += sum(lengths_list[b] for b in suffix_rows)
        self.stats.suffix_accepted += sum(n_list[b] for b in suffix_rows)
        self.stats.suffix_verified_tokens += sum(n_list[b] + 1 for b in suffix_rows)
        model = [b for b in range(batch) if model_list[b]]
        self.hybrid = _Hybrid(
            width,
            k if model_ran else 0,
            sum(n_list[b] for b in model),
            sum(n_list[b] < k for b in model),
        )
        return _Step(tokens, count, log_p, position < lengths[:, None], position < n[:, None])

    def _compact_pending(self) -> None:
        """Gather `pending`'s valid tokens to the right once holes make up most of it (steps without the drafter
        append ragged blocks): the drafter's catch-up forward and cache stay as wide as the longest row's backlog."""
        width = int(self.pending_valid.sum(1).max())
        if 2 * width >= self.pending.shape[1]:
            return
        order = torch.argsort(self.pending_valid.to(torch.int8), dim=1, stable=True)[:, -width:]
        self.pending, self.pending_valid = self.pending.gather(1, order), self.pending_valid.gather(1, order)

    def _speculative_step(self, k: int) -> _Step:
        """Draft k tokens per row, verify them in one policy pass, accept a ragged prefix per row."""
        last = self.pending[:, -1:]
        # The drafter's step cost is measured only in steady state: after plain steps (or at the start, the prompt)
        # its first forward catches up on many pending tokens, a one-off that would inflate c and keep it off.
        self.draft_steady = self.pending.shape[1] <= 2
        started = time.perf_counter()
        draft, q = self._draft(k)
        if self.config.elastic:  # time drafting apart from verifying (waits for the device only when measuring)
            _synchronize(draft.device)
            self.draft_seconds = time.perf_counter() - started
        block = torch.cat([last, draft], 1)
        log_p = self._policy_logprobs(_forward(self.policy, self.pol, block, torch.ones_like(block, dtype=torch.bool)))
        self.stats.policy_forwards += 1
        n, token = self._accept(draft, q, log_p)

        # The policy cached [last, d1..dk]: row b keeps last and its n accepted drafts. The drafter cached d1..d(k-1).
        position = torch.arange(k + 1, device=n.device)[None]
        kept = position <= n[:, None]
        self.pol.valid[:, -(k + 1) :] = kept
        if k > 1:
            self.dr.valid[:, -(k - 1) :] = kept[:, 1:k]
        # Still unseen by the drafter: d_k where all k were accepted, and the new token.
        all_accepted = n == k
        if all_accepted.any():
            self.pending = torch.stack([torch.where(all_accepted, draft[:, -1], self.pad), token], 1)
            self.pending_valid = torch.stack([all_accepted, torch.ones_like(all_accepted)], 1)
        else:
            self.pending, self.pending_valid = token[:, None], torch.ones_like(token[:, None], dtype=torch.bool)

        rows, accepted = len(n), int(n.sum())
        self.stats.drafted += rows * k
        self.stats.accepted += accepted
        self.stats.verify_steps += rows
        self.stats.verified_tokens += accepted + rows
        tokens = torch.cat([draft, draft[:, :1]], 1).scatter(1, n[:, None], token[:, None])
        return _Step(tokens, n + 1, log_p, (position < k).expand(rows, -1), position < n[:, None])

    def _plain_step(self, tokens: torch.Tensor, valid: torch.Tensor) -> _Step:
        """One ordinary decode step: the policy reads `tokens` (each row's newest token, or at the start the whole
        prompt: the prefill) and emits one token per row; the drafter catches up on them later."""
        log_p = self._policy_logprobs(_forward(self.policy, self.pol, tokens, valid, logits_to_keep=1))
        self.stats.policy_forwards += 1
        self.stats.plain_steps += len(tokens)
        token = self._pick(log_p[:, -1])
        self.pending = torch.cat([self.pending, token[:, None]], 1)
        self.pending_valid = torch.cat([self.pending_valid, torch.ones_like(token[:, None], dtype=torch.bool)], 1)
        no = torch.zeros_like(token[:, None], dtype=torch.bool)
        return _Step(token[:, None], torch.ones_like(token), log_p, no, no)

    def _draft(self, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The drafter consumes its pending tokens, then proposes k tokens autoregressively.
        Returns the drafts `[B, k]` and, when sampling, the distributions they were drawn from `[B, k, V]`."""
        logits = _forward(self.drafter, self.dr, self.pending, self.pending_valid, logits_to_keep=1)
        drafts, dists = [], []
        for i in range(k):
            q_logits = process_logits(self._checked(logits[:, -1, : self.vocab_size], "drafter"), self.params)
            if self.params.do_sample:
                q = q_logits.softmax(-1)
                token = sample(q, self.generator)
                dists.append(q)
            else:
                token = q_logits.argmax(-1)
            drafts.append(token)
            if i < k - 1:
                logits = _forward(
                    self.drafter, self.dr, token[:, None], torch.ones_like(token[:, None], dtype=torch.bool)
                )
        self.stats.drafter_forwards += k
        self.pending = self.pending[:, :0]
        self.pending_valid = self.pending_valid[:, :0]
        return torch.stack(drafts, 1), torch.stack(dists, 1) if dists else None

    def _accept(
        self, draft: torch.Tensor, q: torch.Tensor | None, log_p: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        p = log_p.exp()
        rule, do_sample = self.config.acceptance, self.params.do_sample
        if rule == "cascade":
            return acceptance.cascade(
                draft, p, self.config.cascade_threshold, do_sample, self.generator, lengths=lengths
            )
        if not do_sample:
            return acceptance.greedy(draft, p, lengths=lengths)
        if rule == "lenient":
            return acceptance.lenient(draft, q, p, self.config.lenience, self.generator, lengths=lengths)
        return acceptance.exact(draft, q, p, self.generator, lengths=lengths)

    def _policy_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """The policy's sampling distribution as log-probabilities, over the shared vocabulary."""
        return process_logits(self._checked(logits[..., : self.vocab_size], "policy"), self.params).log_softmax(-1)

    def _checked(self, logits: torch.Tensor, model: str) -> torch.Tensor:
        """Note NaN/+inf logits for the step's synchronisation point to raise on (checking here would cost a device
        sync per forward), and neutralise them so the step can finish without sampling from garbage."""
        bad = logits.isnan() | logits.isposinf()
        self.nonfinite[model] = self.nonfinite[model] | bad.any()
        return logits.masked_fill(bad, 0.0)

    def _pick(self, log_p: torch.Tensor) -> torch.Tensor:
        return sample(log_p.exp(), self.generator) if self.params.do_sample else log_p.argmax(-1)

    def _drop_finished(self, rows: list[int], done: list[bool]) -> list[int]:
        """Drop the finished rows from both caches and the pending block; return the original indices still active."""
        keep = [i for i, finished in enumerate(done) if not finished]
        if len(keep) < len(rows):
            index = torch.tensor(keep, dtype=torch.long, device=self.pending.device)
            self.pol.select(index)
            self.dr.select(index)
            self.pending, self.pending_valid = self.pending[index], self.pending_valid[index]
        return [rows[i] for i in keep]

    def _record(self, rows: list[int], step: _Step) -> list[bool]:
        """Append each row's emitted tokens, stopping at its first eos or at max_new_tokens; return which finished.
        This is the step's one host-device synchronisation."""
        logprobs = step.log_p.gather(-1, step.tokens[..., None]).squeeze(-1)
        tokens, lps, counts = step.tokens.tolist(), logprobs.tolist(), step.count.tolist()
        for model, flag in self.nonfinite.items():
            if bool(flag):
                raise ValueError(
                    f"The {model} produced NaN or +inf logits, so nothing it proposes can be sampled from. Check its "
                    "weights and dtype (fp16 overflows easily; prefer bf16 or fp32)."
                )
        top = step.log_p.topk(self.topk, dim=-1) if self.topk else None
        done = []
        for i, row in enumerate(rows):
            finished, taken = False, 0
            for token, lp in zip(tokens[i][: counts[i]], lps[i][: counts[i]]):
                self.completions[row].append(token)
                self.logprobs[row].append(lp)
                taken += 1
                self.stats.emitted_tokens += 1
                if token in self.eos or len(self.completions[row]) >= self.max_new_tokens:
                    finished = True
                    break
            if self.suffix is not None and taken:
                self.suffix.extend(row, self.completions[row][-taken:])
            if top is not None:
                self.targets[row].append(
                    (top.indices[i, :taken], top.values[i, :taken], step.drafted[i, :taken], step.accepted[i, :taken])
                )
            done.append(finished)
        return done

    def _policy_targets(self, input_ids: torch.Tensor, mask: torch.Tensor) -> list[PolicyTargets] | None:
        """Per row, the policy's top-K logprobs at every emitted position: the distiller's targets, for free."""
        if not self.topk:
            return None
        out = []
        for row, parts in enumerate(self.targets):
            ids, values, drafted, accepted = (torch.cat(column).cpu() for column in zip(*parts))
            out.append(
                PolicyTargets(
                    prompt_ids=input_ids[row][mask[row]].tolist(),
                    completion_ids=self.completions[row],
                    topk_ids=ids,
                    topk_logprobs=values.to(torch.float16),
                    drafted=drafted,
                    accepted=accepted,
                    policy_version=self.policy_version,
                )
            )
        return out
