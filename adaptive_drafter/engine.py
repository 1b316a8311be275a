"""The batched speculative decoder: draft → verify → accept over Hugging Face causal LMs with KV caches.

Both models keep a rectangular KV cache over *slots*. Rows accept different numbers of drafts (ragged), so a slot
may hold a rejected draft: a *hole*. A bool mask `valid [B, S]` marks the slots that hold a token of the row; it is
the attention mask, and the position of a row's next token is its count of valid slots, so positions stay
contiguous per row despite left padding and holes. Trailing slots no row kept are cropped, caches are compacted when
holes pile up, and finished rows leave the batch.

Invariant between steps: the policy's cache holds every token of a row except the last one emitted; the drafter's
cache lags further, by the tokens in `pending` (left-padded), which it consumes before drafting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel
from transformers import DynamicCache

from . import acceptance
from .config import SpecConfig
from .distill import PolicyTargets
from .drafter import (
    AdapterVersion,
    ReducedVocabDrafter,
    check_compatible,
    frequent_tokens,
    load_adapter_state,
    lora_fingerprint,
    merged_copy,
)
from .elastic import ElasticController
from .metrics import SpecStats
from .sampling import SamplingParams, process_logits, sample

logger = logging.getLogger(__name__)


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


def _forward(model: Any, kv: _KV, tokens: torch.Tensor, token_valid: torch.Tensor, logits_to_keep: int = 0):
    """Run `tokens [B, m]` through `model`, appending m slots to its cache; invalid tokens become holes."""
    positions = kv.valid.sum(1, keepdim=True) + token_valid.cumsum(1) - 1
    kv.valid = torch.cat([kv.valid, token_valid], dim=1)
    out = model(
        input_ids=tokens,
        attention_mask=kv.valid.long(),
        position_ids=positions.clamp_min(0),
        past_key_values=kv.cache,
        use_cache=True,
        logits_to_keep=logits_to_keep,
    )
    return out.logits


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_positions(model: Any) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def _sliding_window(model: Any) -> int | None:
    return getattr(model.config, "sliding_window", None)


class SpeculativeEngine:
    """Batched, lossless-by-default speculative decoding: the drafter proposes `num_draft_tokens` tokens per row, the
    policy verifies them all in one forward pass, and the acceptance rule keeps a per-row prefix.

    `policy` and `drafter` are Hugging Face causal LMs (plain or peft-wrapped) sharing a tokenizer. Pass the
    tokenizers to have them checked for compatibility too.
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
        self.policy_version = 0  # stamped on collected targets; advanced by whoever updates the policy
        self.adapter_version: AdapterVersion | None = None  # the drafter adapter being served
        self.trainer: Any = None
        self._lock = threading.Lock()  # a swap never overlaps a rollout
        # Persists across calls: acceptance and costs measured in one rollout inform the next.
        self.controller = ElasticController(self.config.num_draft_tokens, self.config.plain_batch_threshold)
        self.acceptance_ema: float | None = None  # running acceptance over rollouts, for the stale-drafter alarm
        self._alarm: list[str] = []
        # The reduced draft vocabulary: pinned by `set_draft_vocab`, else the most frequent tokens of past completions.
        self.token_counts = torch.zeros(self.vocab_size, dtype=torch.long)
        self.draft_vocab: torch.Tensor | None = None
        self.draft_vocab_coverage: float | None = None  # share of the last rollout's tokens inside it
        self._reduced_head_checked = False
        self._merged: tuple[Any, Any] | None = None  # (LoRA fingerprint, merged copy) of the drafter being served

    def set_draft_vocab(self, token_ids: Sequence[int] | torch.Tensor | None) -> None:
        """Pin the tokens the drafter may propose (None: back to `SpecConfig.draft_vocab_size`'s frequent tokens).
        Lossless whatever the set: the policy still emits any token it wants."""
        if token_ids is None:
            self.draft_vocab = None
            return
        ids = torch.as_tensor(token_ids, dtype=torch.long).unique()
        if len(ids) == 0 or ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"The draft vocabulary must be a non-empty set of token ids in [0, {self.vocab_size}).")
        self.draft_vocab = ids

    def attach(self, trainer: Any) -> None:
        """Feed `trainer` (a `DrafterTrainer`) with every rollout's policy targets, and serve the newest adapter it
        publishes, swapped in at the start of the next `generate` call, never during one."""
        self.trainer = trainer

    def swap_adapter(self) -> bool:
        """Load the attached trainer's newest adapter into the serving drafter if it is newer; return whether it was.
        Called by `generate` before each rollout, under the engine's lock."""
        latest = self.trainer.latest() if self.trainer is not None else None
        current = self.adapter_version.adapter_version if self.adapter_version is not None else 0
        if latest is None or latest.version.adapter_version <= current:
            return False
        load_adapter_state(self.drafter, latest.state)
        self.adapter_version = latest.version
        self.controller.forget_acceptance()
        return True

    def metrics(self, stats: SpecStats) -> dict[str, float]:
        """`spec/*` metrics of one rollout plus the served adapter's version and its lag behind the policy."""
        out = stats.metrics()
        out["drafter/stale_alarm"] = float(bool(self.stale_reasons()))
        if self.draft_vocab_coverage is not None:
            out["spec/draft_vocab_coverage"] = self.draft_vocab_coverage
        if self.adapter_version is not None:
            out["drafter/version"] = float(self.adapter_version.adapter_version)
            out["drafter/version_lag"] = float(self.policy_version - self.adapter_version.policy_version)
        return out

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
    ) -> SpecOutput:
        """Generate up to `max_new_tokens` tokens for each left-padded prompt row.

        Each row stops after its first token in `eos_token_id` (one id or several). With `acceptance="exact"` the
        completions are samples from the policy's sampling distribution (greedy: identical to
        `policy.generate(do_sample=False)`). `generator` seeds drafting, acceptance and sampling for reproducibility.
        """
        params = SamplingParams(do_sample, temperature, top_k, top_p, min_p)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self._validate(input_ids, attention_mask, max_new_tokens)
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        pad = pad_token_id if pad_token_id is not None else 0
        if not 0 <= pad < self.vocab_size:
            raise ValueError(f"pad_token_id {pad} is outside the vocabulary [0, {self.vocab_size}).")
        mask = attention_mask.bool()
        input_ids = input_ids.long().masked_fill(~mask, pad)  # whatever sits under the padding is never looked up
        with self._lock:
            self.swap_adapter()
            draft_model = self.draft_model()
            out = _Rollout(self, draft_model, params, eos, pad, max_new_tokens, generator).run(input_ids, mask)
        self._count_tokens(out.completion_ids, draft_model)
        if self.trainer is not None and out.targets:
            self.trainer.buffer.add_many(out.targets)
        self._watch(out.stats)
        return out

    def draft_model(self) -> Any:
        """The drafter as this rollout drafts with it: its LoRA merged (`SpecConfig.merge_lora`), and whole or with its
        head cut to the reduced draft vocabulary."""
        drafter = self._serving_drafter()
        ids = self.draft_vocab
        if ids is None and self.config.draft_vocab_size:
            ids = frequent_tokens(self.token_counts, self.config.draft_vocab_size)
        if ids is None or len(ids) == 0:  # nothing pinned and no completions seen yet
            return drafter
        reduced = ReducedVocabDrafter(drafter, ids, self.vocab_size)
        if not self._reduced_head_checked:
            reduced.check()
            self._reduced_head_checked = True
        return reduced

    def _serving_drafter(self) -> Any:
        """The peft drafter, or its merged copy, rebuilt whenever its LoRA weights changed (a swap, or a user's load)."""
        if not self.config.merge_lora or not isinstance(self.drafter, PeftModel):
            return self.drafter
        fingerprint = lora_fingerprint(self.drafter)
        if self._merged is None or self._merged[0] != fingerprint:
            self._merged = (fingerprint, merged_copy(self.drafter))
        return self._merged[1]

    def _count_tokens(self, completions: list[list[int]], draft_model: Any) -> None:
        """Tally emitted tokens (what the reduced draft vocabulary is chosen from) and the share it covered."""
        flat = torch.tensor([t for row in completions for t in row], dtype=torch.long)
        if self.config.draft_vocab_size or self.draft_vocab is not None:
            self.token_counts += torch.bincount(flat, minlength=self.vocab_size)
        if isinstance(draft_model, ReducedVocabDrafter) and len(flat):
            self.draft_vocab_coverage = float(torch.isin(flat, draft_model.token_ids.cpu()).float().mean())

    def _watch(self, stats: SpecStats) -> None:
        """The stale-drafter alarm: the field's commonest silent failure is a drafter never updated after the policy
        moved, acceptance collapsing to ~1 token per verify. Warn when it starts, with the reasons."""
        if stats.drafted:
            rate = stats.acceptance_rate
            self.acceptance_ema = rate if self.acceptance_ema is None else 0.7 * self.acceptance_ema + 0.3 * rate
        alarm = self.stale_reasons()
        if alarm and not self._alarm:
            logger.warning("stale drafter: %s", "; ".join(alarm))
        self._alarm = alarm

    def stale_reasons(self) -> list[str]:
        """Why the drafter looks stale (empty when it does not)."""
        reasons = []
        if self.acceptance_ema is not None and self.acceptance_ema < self.config.stale_acceptance:
            reasons.append(
                f"acceptance {self.acceptance_ema:.3f} < {self.config.stale_acceptance} (speculation is not paying)"
            )
        lag = self.policy_version - self.adapter_version.policy_version if self.adapter_version else None
        if self.trainer is not None and lag is not None and lag > self.config.stale_version_lag:
            reasons.append(f"the adapter lags the policy by {lag} versions: is the drafter trainer running?")
        return reasons

    def _collect_topk(self) -> int:
        """Top-K targets to keep: the config's, else the attached trainer's, else none."""
        if self.config.collect_topk or self.trainer is None:
            return self.config.collect_topk
        return self.trainer.config.distill_topk

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
            if window is not None and input_ids.shape[1] + max_new_tokens + self.config.num_draft_tokens + 1 > window:
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
    ) -> None:
        self.policy, self.drafter, self.config = engine.policy, draft_model, engine.config
        self.vocab_size, self.params, self.eos, self.pad = engine.vocab_size, params, eos, pad
        self.max_new_tokens, self.generator = max_new_tokens, generator
        self.policy_version, self.topk = engine.policy_version, engine._collect_topk()
        self.controller, self.draft_seconds, self.draft_steady = engine.controller, 0.0, True
        self.nonfinite = {"policy": torch.tensor(False), "drafter": torch.tensor(False)}
        self.stats = SpecStats()
        # A sliding-window model sees exactly the full context only while its cache fits in the window.
        windows = [_sliding_window(m) for m in (self.policy, self.drafter)]
        self.max_slots = [None if w is None else w - self.config.num_draft_tokens - 3 for w in windows]

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

        while rows:
            remaining = max(self.max_new_tokens - len(self.completions[r]) for r in rows)
            k = self._draft_length(len(rows), limit=min(self.config.num_draft_tokens, remaining - 1))
            started = time.perf_counter()
            step = (
                self._speculative_step(k) if k else self._plain_step(self.pending[:, -1:], self.pending_valid[:, -1:])
            )
            done = self._record(rows, step)  # synchronises: the step's time is now known
            self._observe(len(rows), k, step, time.perf_counter() - started)
            rows = self._drop_finished(rows, done)
            self.pol.crop()
            self.dr.crop()
            self.pol.compact(self.config.compact_threshold, self.max_slots[0])
            self.dr.compact(self.config.compact_threshold, self.max_slots[1])
        return SpecOutput(self.completions, self.logprobs, self.stats, self._policy_targets(input_ids, mask))

    def _draft_length(self, batch: int, limit: int) -> int:
        if self.config.elastic:
            return self.controller.choose(batch, limit)
        threshold = self.config.plain_batch_threshold
        return 0 if limit <= 0 or (threshold is not None and batch >= threshold) else limit

    def _observe(self, batch: int, k: int, step: _Step, seconds: float) -> None:
        """Feed the elastic controller the step's measured cost and acceptance."""
        if not self.config.elastic:
            return
        if k == 0:
            self.controller.observe_plain(batch, seconds)
            return
        accepted = step.count - 1
        self.controller.observe_speculation(
            batch,
            k,
            self.draft_seconds if self.draft_steady else None,
            seconds - self.draft_seconds,
            int(accepted.sum()),
            int((accepted < k).sum()),
        )

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
        self, draft: torch.Tensor, q: torch.Tensor | None, log_p: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        p = log_p.exp()
        rule, do_sample = self.config.acceptance, self.params.do_sample
        if rule == "cascade":
            return acceptance.cascade(draft, p, self.config.cascade_threshold, do_sample, self.generator)
        if not do_sample:
            return acceptance.greedy(draft, p)
        if rule == "lenient":
            return acceptance.lenient(draft, q, p, self.config.lenience, self.generator)
        return acceptance.exact(draft, q, p, self.generator)

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
                if token in self.eos or len(self.completions[row]) >= self.max_new_tokens:
                    finished = True
                    break
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
