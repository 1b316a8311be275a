"""The batched speculative decoder: plan → draft → verify → record over Hugging Face causal LMs with KV caches.

Every decode step is one policy forward over `[last, d_1..d_W]` per row: the plan (`plan.StepPlanner`) says which
source drafts for each row (the model drafter, a suffix draft, or none: a plain decode inside the same forward) and
how many tokens; the sources (`drafts.DraftSource`) propose; the policy verifies every row's drafts at once (ragged
lengths: padding beyond); the acceptance rule keeps a per-row prefix and emits one more token; every source observes
the outcome. A plain step is the same step with W = 0, and the prefill is the first plain step, over the whole prompt.

The policy's cache (`kv.KVSlots`) holds every token of a row except the last one emitted; rejected drafts become
holes, trailing slots no row kept are cropped, caches are compacted when holes pile up, and finished rows leave the
batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from . import acceptance
from .config import SpecConfig
from .drafter import check_compatible
from .drafts import Drafts, ModelDrafts, SuffixDrafts, Verified
from .eagle import EagleDrafts, eagle_head, feature_layers
from .elastic import ElasticController
from .kv import KVSlots, forward, max_positions, prompt_batch, sliding_window, synchronize
from .metrics import SpecStats
from .outputs import PolicyTargets, SpecOutput
from .plan import StepPlan, StepPlanner
from .sampling import SamplingParams, process_logits, sample
from .suffix import SuffixConfig, SuffixDrafter

__all__ = ["SpeculativeEngine", "StepHook"]

StepHook = Callable[[StepPlan, Verified], None]


def check_sampling(sampling: SamplingParams) -> None:
    """Refuse the sampling settings the engine cannot honour (every `generate` checks; a rollout backend checks before
    its first rollout)."""
    if sampling.repetition_penalty != 1.0:
        raise ValueError(
            f"repetition_penalty={sampling.repetition_penalty} is not supported by the speculative engine (it would "
            "have to be applied identically to drafts and verification). Use 1.0, or the vLLM engine "
            "(--rollout_backend vllm), which applies it."
        )


def _max_draft(config: SpecConfig) -> int:
    """The most drafts a row verifies in one step."""
    return max(config.num_draft_tokens, config.suffix_max_draft if config.drafting != "model" else 0)


class SpeculativeEngine:
    """Batched, lossless-by-default speculative decoding: the drafter proposes `num_draft_tokens` tokens per row, the
    policy verifies them all in one forward pass, and the acceptance rule keeps a per-row prefix.

    `policy` and `drafter` are Hugging Face causal LMs (plain or peft-wrapped) sharing a tokenizer. Pass the
    tokenizers to have them checked for compatibility too. The engine only decodes: an adaptive drafter
    (`adaptive_drafter.adaptive.AdaptiveDrafter`) hands it the draft model of each rollout and takes back the policy's
    targets it collected.
    """

    drafter_format = "module"  # what `load_drafter` takes: a model to draft with

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
        self.planner = StepPlanner(self.config, self.controller)
        # Called after every decode step with its plan and outcome (traces, benchmarks); the prefill is not a decode step.
        self.step_hooks: list[StepHook] = []
        # Keep the policy's last-layer features in the collected targets (`PolicyTargets.features`) even when the
        # drafter does not read them (a feature-reading drafter being trained beside another one); with an `eagle`
        # drafter they are kept whenever targets are.
        self.collect_features = False
        # The policy layers whose outputs (concatenated in layer order) are captured without an eagle drafter, whose
        # own `feature_layers` decide otherwise: the last one by default.
        self.feature_layers: tuple[int, ...] = (-1,)

    def drafter_changed(self) -> None:
        """The draft model's weights changed (a new adapter): the acceptance measured so far describes the old one."""
        self.controller.forget_acceptance()

    @property
    def collect_topk(self) -> int:
        """Top-K policy logprobs kept per generated position when a call does not say (`SpecConfig.collect_topk`)."""
        return self.config.collect_topk

    def load_drafter(self, drafter: Any, *, new_version: bool = False) -> None:
        """Draft the next calls with `drafter` (a serving copy of the engine's drafter: merged, cast, or with a reduced
        vocabulary). `new_version`: its weights changed, so the acceptance measured so far describes the old ones."""
        self.drafter = drafter
        if new_version:
            self.drafter_changed()

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]] | torch.Tensor,
        sampling: SamplingParams | None = None,
        *,
        max_new_tokens: int = 64,
        eos_token_id: int | Sequence[int] | None = None,
        seed: int | None = None,
        collect_topk: int | None = None,
        policy_version: int = 0,
        attention_mask: torch.Tensor | None = None,
    ) -> SpecOutput:
        """Generate up to `max_new_tokens` tokens for each prompt: the rollout contract both engines implement.

        `prompt_ids` are token-id lists (unpadded), or a left-padded `[batch, width]` tensor with its
        `attention_mask` (default: no padding). Each row stops after its first token in `eos_token_id` (one id or
        several). `sampling` defaults to `SamplingParams()` (T = 1); with `acceptance="exact"` the completions are
        samples from the policy's sampling distribution (greedy: identical to `policy.generate(do_sample=False)`).
        `seed` seeds drafting, acceptance and sampling (None: fresh randomness). `collect_topk` (default
        `SpecConfig.collect_topk`) keeps the policy's top-K logprobs at every generated position in
        `SpecOutput.targets`, stamped with `policy_version`. The policy decodes in eval mode (dropout off).
        """
        params = sampling if sampling is not None else SamplingParams()
        check_sampling(params)
        input_ids, attention_mask = prompt_batch(prompt_ids, attention_mask, next(self.policy.parameters()).device)
        self._validate(input_ids, attention_mask, max_new_tokens)
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        topk = self.collect_topk if collect_topk is None else collect_topk
        if topk < 0:
            raise ValueError(f"collect_topk must be >= 0 (0 collects nothing), got {topk}.")
        generator = None
        if seed is not None:
            generator = torch.Generator(input_ids.device).manual_seed(seed)
        mask = attention_mask.bool()
        # Whatever sits under the padding is never looked up; 0 keeps every embedding lookup in range.
        input_ids = input_ids.long().masked_fill(~mask, 0)
        with self._lock:
            was_training = self.policy.training
            self.policy.eval()  # rollouts sample the policy itself: dropout off
            try:
                rollout = _Rollout(self, self.drafter, params, eos, max_new_tokens, generator, topk, policy_version)
                return rollout.run(input_ids, mask)
            finally:
                self.policy.train(was_training)

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
            limit = max_positions(model)
            if limit is not None and needed > limit:
                raise ValueError(
                    f"The longest prompt ({int(lengths.max())} tokens) plus max_new_tokens ({max_new_tokens}) needs "
                    f"{needed} positions, beyond the {name}'s max_position_embeddings ({limit}). Shorten the prompts "
                    "or lower max_new_tokens."
                )
            window = sliding_window(model)
            if window is not None and input_ids.shape[1] + max_new_tokens + _max_draft(self.config) + 1 > window:
                raise ValueError(
                    f"The {name} uses sliding-window attention ({window} tokens), which the engine supports only while "
                    f"prompt width ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) + num_draft_tokens + 1 "
                    "fits inside the window. Shorten the prompts or lower max_new_tokens."
                )


class _Rollout:
    """The state of one `generate` call; `run` is the algorithm, top to bottom."""

    def __init__(
        self,
        engine: SpeculativeEngine,
        draft_model: Any,
        params: SamplingParams,
        eos: set[int],
        max_new_tokens: int,
        generator: torch.Generator | None,
        topk: int,
        policy_version: int,
    ) -> None:
        self.engine, self.policy, self.config = engine, engine.policy, engine.config
        self.vocab_size, self.params, self.eos = engine.vocab_size, params, eos
        self.max_new_tokens, self.generator = max_new_tokens, generator
        self.policy_version, self.topk = policy_version, topk
        self.nonfinite = torch.tensor(False)  # NaN/+inf policy logits seen (raised at the step's sync point)
        self.stats = SpecStats()
        # A sliding-window model sees exactly the full context only while its cache fits in the window.
        windows = [sliding_window(m) for m in (self.policy, draft_model)]
        self.max_slots = [None if w is None else w - _max_draft(self.config) - 3 for w in windows]
        head = eagle_head(draft_model)
        if head is not None:
            self.model: Any = EagleDrafts(head, params, self.vocab_size, self.stats, generator)
        else:
            self.model = ModelDrafts(
                draft_model,
                params,
                self.vocab_size,
                self.stats,
                generator,
                compact_threshold=self.config.compact_threshold,
                max_slots=self.max_slots[1],
            )
        self.features: list[torch.Tensor] = []  # the feature layers' outputs in the policy's latest forward, if needed
        need_q = params.do_sample and self.config.acceptance in ("exact", "lenient")
        self.suffix = SuffixDrafts(engine.suffix, self.vocab_size if need_q else None) if engine.suffix else None
        self.sources: list[Any] = [self.model] + ([self.suffix] if self.suffix is not None else [])

    def run(self, input_ids: torch.Tensor, mask: torch.Tensor) -> SpecOutput:
        batch, device = input_ids.shape[0], input_ids.device
        self.completions: list[list[int]] = [[] for _ in range(batch)]
        self.logprobs: list[list[float]] = [[] for _ in range(batch)]
        self.targets: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in range(batch)]
        self.feature_chunks: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        rows = list(range(batch))  # original index of each active row
        self.pol = KVSlots.empty(batch, device)
        for source in self.sources:
            source.begin(input_ids, mask)
        capture = []
        if self.engine.collect_features or any(getattr(source, "needs_features", False) for source in self.sources):
            eagle = isinstance(self.model, EagleDrafts)
            layers = self.model.head.feature_layers if eagle else self.engine.feature_layers
            capture = [m.register_forward_hook(self._capture) for m in feature_layers(self.policy, layers)]
        try:
            # The prefill is the first plain step: the policy reads the whole prompt and emits each row's first token.
            none = torch.zeros(batch, dtype=torch.bool, device=device)
            prefill = StepPlan(0, none, none)
            rows, _ = self._step(rows, prefill, input_ids, mask, Drafts(input_ids[:, :0], none.long()))
            self.stats.emitted_tokens = 0  # the decode steps' tokens only, as their timing
            while rows:
                remaining = [self.max_new_tokens - len(self.completions[r]) for r in rows]
                started = time.perf_counter()
                plan = self.engine.planner.plan(remaining, rows, self.suffix, device)
                drafts, draft_seconds, steady = self._draft(plan)
                emitted = self.stats.emitted_tokens
                rows, step = self._verify(rows, plan, drafts)
                seconds = time.perf_counter() - started  # the verify synchronised: the step's time is known
                self.engine.planner.observe(plan, step, seconds, draft_seconds, steady)
                self._time(len(step.rows), self.stats.emitted_tokens - emitted, seconds)
                for hook in self.engine.step_hooks:
                    hook(plan, step)
        finally:
            for hook in capture:
                hook.remove()
            for source in self.sources:
                source.end()
        return SpecOutput(self.completions, self.logprobs, self.stats, self._policy_targets(input_ids, mask))

    def _draft(self, plan: StepPlan) -> tuple[Drafts, float, bool]:
        """Every source's drafts for its rows, as one ragged block; the model drafter's seconds (elastic only: timing
        waits for the device) and whether they measure an ordinary drafter step."""
        parts: list[tuple[Drafts, torch.Tensor]] = []
        draft_seconds, steady = 0.0, False
        if plan.k:
            steady = self.model.steady(plan.k)
            started = time.perf_counter()
            parts.append((self.model.propose(plan.model_rows, plan.k), plan.model_rows))
            if self.config.elastic:
                synchronize(parts[-1][0].tokens.device)
                draft_seconds = time.perf_counter() - started
        if self.suffix is not None and bool(plan.suffix_rows.any()):
            parts.append((self.suffix.propose(plan.suffix_rows, 0), plan.suffix_rows))
        batch, device = len(plan.model_rows), plan.model_rows.device
        width = max((d.tokens.shape[1] for d, _ in parts), default=0)
        tokens = torch.zeros(batch, width, dtype=torch.long, device=device)
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        q = None
        for drafts, rows in parts:
            pad = width - drafts.tokens.shape[1]
            tokens = torch.where(rows[:, None], F.pad(drafts.tokens, (0, pad)), tokens)
            lengths = torch.where(rows, drafts.lengths, lengths)
            if drafts.q is not None:
                part_q = F.pad(drafts.q, (0, 0, 0, pad))
                q = part_q if q is None else torch.where(rows[:, None, None], part_q.to(q.dtype), q)
        return Drafts(tokens, lengths, q), draft_seconds, steady

    def _verify(self, rows: list[int], plan: StepPlan, drafts: Drafts) -> tuple[list[int], Verified]:
        """One policy forward over each row's newest token and its drafts; accept, record, let the sources observe;
        drop the finished rows. Returns the rows still active and what the step emitted."""
        block = torch.cat([self.last, drafts.tokens], 1)
        return self._step(rows, plan, block, torch.ones_like(block, dtype=torch.bool), drafts)

    def _step(
        self, rows: list[int], plan: StepPlan, block: torch.Tensor, valid: torch.Tensor, drafts: Drafts
    ) -> tuple[list[int], Verified]:
        width, length = drafts.tokens.shape[1], block.shape[1]
        self.features.clear()
        logits = forward(self.policy, self.pol, block, valid, logits_to_keep=width + 1)
        log_p = self._policy_logprobs(logits)
        self.stats.policy_forwards += 1
        if width == 0:
            token = self._pick(log_p[:, -1])
            n = torch.zeros_like(token)
            tokens, kept = token[:, None], valid
        else:
            n, token = self._accept(drafts, log_p)
            # The policy cached [last, drafts]: row b keeps last and its n accepted drafts.
            kept = torch.arange(width + 1, device=n.device)[None] <= n[:, None]
            self.pol.valid[:, -(width + 1) :] = kept
            tokens = torch.cat([drafts.tokens, drafts.tokens[:, :1]], 1).scatter(1, n[:, None], token[:, None])
        position = torch.arange(width + 1, device=n.device)[None]
        drafted, accepted = position < drafts.lengths[:, None], position < n[:, None]
        emitted, done = self._record(rows, tokens, n + 1, log_p, drafted, accepted)  # the step's one sync
        features = torch.cat(self.features, -1) if len(self.features) > 1 else (self.features or [None])[0]
        if features is not None and self.topk:  # the features the policy read, for feature-reading drafters' training
            for i, row in enumerate(rows):
                read = features[i][valid[i]] if width == 0 else features[i, : len(emitted[i])]
                self.feature_chunks[row].append(read.to(torch.bfloat16))
        # What follows each block position: the block's next token, and at the last kept one the emitted token.
        last_kept = (length - 1 - width + n)[:, None]
        next_tokens = torch.cat([block[:, 1:], block[:, :1]], 1).scatter(1, last_kept, token[:, None])
        step = Verified(tokens, n + 1, n, width, rows, emitted, block, kept, next_tokens, features)
        self.last = token[:, None]
        self._account(plan, step, drafts)
        self.model.observe(step, plan.model_rows)
        if self.suffix is not None:
            self.suffix.observe(step, plan.suffix_rows)
        keep = [i for i, finished in enumerate(done) if not finished]
        if len(keep) < len(rows):
            index = torch.tensor(keep, dtype=torch.long, device=block.device)
            self.pol.select(index)
            self.last = self.last[index]
            for source in self.sources:
                source.select(index)
        if keep:
            self.pol.crop()
            self.pol.compact(self.config.compact_threshold, self.max_slots[0])
            self.model.compact()
        return [rows[i] for i in keep], step

    def _capture(self, module: Any, args: Any, output: Any) -> None:
        self.features.append(output[0] if isinstance(output, tuple) else output)

    def _account(self, plan: StepPlan, step: Verified, drafts: Drafts) -> None:
        """The step's counters: drafts proposed and accepted, verifies and plain row-steps, and the suffix source's."""
        lengths, n = drafts.lengths.tolist(), step.accepted.tolist()
        verifies = [b for b, length in enumerate(lengths) if length > 0]
        self.stats.drafted += sum(lengths)
        self.stats.accepted += sum(n)
        self.stats.verify_steps += len(verifies)
        self.stats.verified_tokens += sum(n[b] + 1 for b in verifies)
        self.stats.plain_steps += len(lengths) - len(verifies)
        suffix_rows = [b for b, use in enumerate(plan.suffix_rows.tolist()) if use]
        self.stats.suffix_verifies += len(suffix_rows)
        self.stats.suffix_drafted += sum(lengths[b] for b in suffix_rows)
        self.stats.suffix_accepted += sum(n[b] for b in suffix_rows)
        self.stats.suffix_verified_tokens += sum(n[b] + 1 for b in suffix_rows)

    def _time(self, batch: int, tokens: int, seconds: float) -> None:
        """Account the step's wall time beside what plain decoding would have taken for its tokens at this batch size,
        from the plain steps measured in this engine (none measured at this batch size yet: the step is left out)."""
        self.stats.decode_seconds += seconds
        plain = self.engine.controller.plain_seconds(batch)
        if plain is not None:
            self.stats.timed_seconds += seconds
            self.stats.plain_equivalent_seconds += tokens / batch * plain

    def _accept(self, drafts: Drafts, log_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p, draft, q, lengths = log_p.exp(), drafts.tokens, drafts.q, drafts.lengths
        rule, do_sample = self.config.acceptance, self.params.do_sample
        if rule == "cascade":
            return acceptance.cascade(draft, p, self.config.cascade_threshold, do_sample, self.generator, lengths=lengths)
        if not do_sample:
            return acceptance.greedy(draft, p, lengths=lengths)
        if rule == "lenient":
            return acceptance.lenient(draft, q, p, self.config.lenience, self.generator, lengths=lengths)
        return acceptance.exact(draft, q, p, self.generator, lengths=lengths)

    def _policy_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """The policy's sampling distribution as log-probabilities, over the shared vocabulary. Logits that are NaN or
        +inf are noted for the step's synchronisation point to raise on (checking here would cost a device sync per
        forward) and neutralised so the step can finish without sampling from garbage."""
        logits = logits[..., : self.vocab_size]
        bad = logits.isnan() | logits.isposinf()
        self.nonfinite = self.nonfinite | bad.any()
        return process_logits(logits.masked_fill(bad, 0.0), self.params).log_softmax(-1)

    def _pick(self, log_p: torch.Tensor) -> torch.Tensor:
        return sample(log_p.exp(), self.generator) if self.params.do_sample else log_p.argmax(-1)

    def _record(
        self,
        rows: list[int],
        tokens: torch.Tensor,
        count: torch.Tensor,
        log_p: torch.Tensor,
        drafted: torch.Tensor,
        accepted: torch.Tensor,
    ) -> tuple[list[list[int]], list[bool]]:
        """Append each row's emitted tokens, stopping at its first eos or at max_new_tokens; return what each row kept
        and which finished. This is the step's one host-device synchronisation."""
        logprobs = log_p.gather(-1, tokens[..., None]).squeeze(-1)
        token_lists, lps, counts = tokens.tolist(), logprobs.tolist(), count.tolist()
        for model, flag in (("policy", self.nonfinite), ("drafter", self.model.nonfinite)):
            if bool(flag):
                raise ValueError(
                    f"The {model} produced NaN or +inf logits, so nothing it proposes can be sampled from. Check its "
                    "weights and dtype (fp16 overflows easily; prefer bf16 or fp32)."
                )
        top = log_p.topk(self.topk, dim=-1) if self.topk else None
        emitted, done = [], []
        for i, row in enumerate(rows):
            finished, kept = False, []
            for token, lp in zip(token_lists[i][: counts[i]], lps[i][: counts[i]]):
                self.completions[row].append(token)
                self.logprobs[row].append(lp)
                kept.append(token)
                self.stats.emitted_tokens += 1
                if token in self.eos or len(self.completions[row]) >= self.max_new_tokens:
                    finished = True
                    break
            taken = len(kept)
            if top is not None:
                self.targets[row].append(
                    (top.indices[i, :taken], top.values[i, :taken], drafted[i, :taken], accepted[i, :taken])
                )
            emitted.append(kept)
            done.append(finished)
        return emitted, done

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
                    features=torch.cat(self.feature_chunks[row]).cpu() if self.feature_chunks[row] else None,
                )
            )
        return out
