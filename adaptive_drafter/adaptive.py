"""The adaptive drafter: a LoRA drafter kept in step with a moving policy, whatever engine decodes with it.

It owns everything that makes a drafter *adaptive*: the peft drafter and the adapter version it serves, the background
`DrafterTrainer` and its `DistillBuffer`, the serving copy with the LoRA merged in, the token counts behind the reduced
draft vocabulary, the swap of a newly published adapter between rollouts (never during one) and the stale-drafter
alarm. Engines only decode: the Hugging Face engine takes the draft model of each rollout from `draft_model()`, the vLLM
engine loads `serving_weights()` into its draft model; both hand back what they saw through `record()`.

    adaptive = AdaptiveDrafter(build_drafter(policy), ServingConfig(), DistillConfig())
    engine = SpeculativeEngine(policy, adaptive.drafter, SpecConfig())   # or a vllm_engine.VLLMEngine
    with adaptive:                                   # the background trainer runs inside
        out = adaptive.generate(engine, prompt_ids, SamplingParams(temperature=1.0), max_new_tokens=256)
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

from .config import DistillConfig, ServingConfig
from .drafter import (
    AdapterVersion,
    ReducedVocabDrafter,
    frequent_tokens,
    load_adapter,
    load_adapter_state,
    lora_fingerprint,
    merged_copy,
    save_adapter,
)
from .eagle import eagle3_checkpoint, eagle_head, export_eagle3, is_head_directory
from .metrics import SpecStats
from .outputs import PolicyTargets, RolloutEngine, SpecOutput
from .precision import CastCache
from .sampling import SamplingParams
from .trainer import DrafterTrainer

logger = logging.getLogger(__name__)


class AdaptiveDrafter:
    """A peft drafter whose LoRA adapters a background trainer keeps distilling from the policy's rollouts.

    `serving` supplies the serving options (`merge_lora`, `draft_vocab_size`, the stale alarm's thresholds);
    `distill_config` (or a ready `trainer`) turns on continual distillation: without either the drafter is served as
    it is (frozen) and nothing is collected. `policy_version` is advanced by whoever updates the policy; it stamps the
    collected targets and measures how far the served adapter lags.
    """

    def __init__(
        self,
        drafter: PeftModel,
        serving: ServingConfig | None = None,
        distill_config: DistillConfig | None = None,
        *,
        trainer: DrafterTrainer | None = None,
        vocab_size: int | None = None,
    ) -> None:
        if trainer is not None and distill_config is not None:
            raise ValueError("Pass distill_config or a ready trainer to AdaptiveDrafter, not both.")
        if serving is not None and not isinstance(serving, ServingConfig):
            raise TypeError(
                f"AdaptiveDrafter takes a ServingConfig (merge_lora, draft_vocab_size, stale thresholds), got "
                f"{type(serving).__name__}: the engine's SpecConfig goes to the engine."
            )
        self.drafter = drafter
        self.config = serving if serving is not None else ServingConfig()
        self.trainer = (
            trainer if trainer is not None else DrafterTrainer(drafter, distill_config) if distill_config else None
        )
        self.vocab_size = vocab_size or drafter.config.vocab_size
        self.is_eagle = eagle_head(drafter) is not None
        if self.is_eagle and self.config.draft_vocab_size:
            raise ValueError(
                "An eagle head drafts over its own draft vocabulary, fixed when it is distilled (scripts/distill_eagle.py "
                "--draft-vocab N) and loaded with it, not over ServingConfig.draft_vocab_size's frequent tokens: set "
                "draft_vocab_size=0 with drafter_kind='eagle'."
            )
        self.policy_version = 0
        self.adapter_version: AdapterVersion | None = None  # the adapter being served (None: the initial weights)
        self._lock = threading.Lock()  # a swap never overlaps a rollout
        self.acceptance_ema: float | None = None  # running acceptance over rollouts, for the stale-drafter alarm
        self._alarm: list[str] = []
        # The reduced draft vocabulary: pinned by `set_draft_vocab`, else the most frequent tokens of past completions.
        self.token_counts = torch.zeros(self.vocab_size, dtype=torch.long)
        self.draft_vocab: torch.Tensor | None = None
        self.draft_vocab_coverage: float | None = None  # share of the last rollout's tokens inside it
        self._reduced_head_checked = False
        self._merged: tuple[Any, Any] | None = None  # (LoRA fingerprint, merged copy) of the drafter being served
        # Serving in another precision than the drafter trains in (`serving_dtype`, the rollouts' precision): the cast
        # copy being served, keyed like `_merged`, and the casts of the drafter's unchanging weights it reuses.
        self._serving_dtype: torch.dtype | None = None
        # The policy as rollouts compute it (`serving_policy`): an eagle head's serving copy reads its modules.
        self._serving_policy: Any = None
        self._cast: tuple[Any, Any] | None = None
        self._cast_cache: CastCache | None = None
        # Where an eagle head's training rows get the policy's features when the engine returns none (vLLM): set by
        # the caller that owns the policy's forward (SpeculativeRollout), an `eagle_distill.FeatureTap`.
        self.feature_tap: Any = None
        self._exported: tuple[Any, ...] | None = None  # LoRA fingerprint last handed out by `serving_weights`

    # --- the background trainer ------------------------------------------------------------------------------------

    @property
    def topk(self) -> int:
        """Top-K policy logprobs an engine should collect per generated position: the trainer's K, or 0 (frozen)."""
        return self.trainer.config.distill_topk if self.trainer is not None else 0

    def start(self) -> AdaptiveDrafter:
        """Start the background trainer (no-op when frozen)."""
        if self.trainer is not None:
            self.trainer.start()
        return self

    def stop(self) -> None:
        """Stop the background trainer; no thread outlives training."""
        if self.trainer is not None:
            self.trainer.stop()

    def __enter__(self) -> AdaptiveDrafter:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # --- serving ---------------------------------------------------------------------------------------------------

    def swap(self) -> bool:
        """Load the trainer's newest adapter into the serving drafter if it is newer; return whether it was. Call it
        between rollouts only (`generate` does, under the lock)."""
        latest = self.trainer.latest() if self.trainer is not None else None
        current = self.adapter_version.adapter_version if self.adapter_version is not None else 0
        if latest is None or latest.version.adapter_version <= current:
            return False
        load_adapter_state(self.drafter, latest.state)
        self.adapter_version = latest.version
        return True

    @property
    def serving_dtype(self) -> torch.dtype | None:
        """The precision the drafter serves in: the rollouts' (`ServingConfig.rollout_dtype`, resolved by the rollout
        that owns this drafter); None: the drafter's own. The drafter and its background trainer keep their own."""
        return self._serving_dtype

    @serving_dtype.setter
    def serving_dtype(self, dtype: torch.dtype | None) -> None:
        if dtype != self._serving_dtype:
            self._serving_dtype, self._cast, self._cast_cache = dtype, None, None

    @property
    def serving_policy(self) -> Any:
        """The policy module rollouts are decoded with (the rollout copy in `serving_dtype`, set by the backend that
        owns it); None: the policy the drafter was built from. An eagle head's serving copy reads this policy's
        embedding, final norm and LM head, in the rollouts' precision; the head the trainer trains keeps its own."""
        return self._serving_policy

    @serving_policy.setter
    def serving_policy(self, policy: Any) -> None:
        self._serving_policy = policy

    def serving_model(self) -> Any:
        """The drafter as it serves: its merged copy (`ServingConfig.merge_lora`), rebuilt whenever a LoRA weight was
        written (a swap, or a user's load), else the peft model itself; in `serving_dtype` when that differs from the
        drafter's own (a cast copy, rebuilt on the same occasions)."""
        dtype = self._serving_dtype
        if dtype is None or dtype == next(self.drafter.parameters()).dtype:
            return self._merged_model() if self.config.merge_lora else self.drafter
        return self._cast_model(dtype)

    def _cast_model(self, dtype: torch.dtype) -> Any:
        """The serving model in `dtype`: LoRA merged in the drafter's own precision first, then rounded once (merging
        in bfloat16 would round twice). The drafter's weights that LoRA does not touch are cast once and reused."""
        peft = isinstance(self.drafter, PeftModel)
        fingerprint = (lora_fingerprint(self.drafter) if peft else (), self.config.merge_lora)
        if self._cast is None or self._cast[0] != fingerprint:
            self._cast = None  # the old copy goes before the new one is made: one copy's memory at a time
            if self._cast_cache is None:
                self._cast_cache = CastCache(dtype)
            source = merged_copy(self.drafter) if self.config.merge_lora and peft else self.drafter
            self._cast = (fingerprint, self._cast_cache.cast(source, stable=self.drafter.parameters()))
        return self._cast[1]

    def _merged_model(self) -> Any:
        if not isinstance(self.drafter, PeftModel):
            return self.drafter
        fingerprint = lora_fingerprint(self.drafter)
        if self._merged is None or self._merged[0] != fingerprint:
            self._merged = (fingerprint, merged_copy(self.drafter))
        return self._merged[1]

    def draft_model(self) -> Any:
        """What the Hugging Face engine drafts with this rollout: the serving model, whole or with its head cut to the
        reduced draft vocabulary (`set_draft_vocab`, else `ServingConfig.draft_vocab_size`'s most frequent tokens)."""
        drafter = self.serving_model()
        head = eagle_head(drafter)
        if head is not None and self._serving_policy is not None and head is not eagle_head(self.drafter):
            head.bind(self._serving_policy)
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

    def serving_weights(self, changed_only: bool = True) -> dict[str, torch.Tensor]:
        """The merged serving drafter's weights, for an engine that holds its own copy (vLLM): Hugging Face-named, or
        for the eagle kind the names of vLLM's EAGLE-3 checkpoint (`eagle.eagle3_checkpoint`). With `changed_only`,
        only the LoRA-adapted layers (nothing else ever changes; for a head, all of it, as it carries copies of the
        policy's norm and LM head rows, which move with the policy), and nothing at all when nothing was written
        since the last call."""
        self._check_exportable()
        fingerprint = self._fingerprint()
        if changed_only and fingerprint == self._exported:
            return {}
        self._exported = fingerprint
        if self.is_eagle:
            return eagle3_checkpoint(self._merged_model())[1]
        state = self._merged_model().state_dict()
        if not changed_only:
            return dict(state)
        adapted = {
            _hf_name(name) for name, module in self.drafter.named_modules() if isinstance(module, BaseTunerLayer)
        }
        return {name: tensor for name, tensor in state.items() if name.rsplit(".", 1)[0] in adapted}

    def _fingerprint(self) -> tuple:
        """What identifies the weights an engine holding its own copy was last given: the LoRA weights, and for a
        head the policy's final norm and LM head it copies (an optimizer step writes them in place)."""
        fingerprint = lora_fingerprint(self.drafter) if isinstance(self.drafter, PeftModel) else ()
        if self.is_eagle:
            shared = eagle_head(self.drafter)._shared
            fingerprint = (fingerprint, *((t.weight.data_ptr(), t.weight._version) for t in shared[1:3]))
        return fingerprint

    def export(self, directory: str | os.PathLike[str], tokenizer: Any = None) -> Path:
        """Save the merged serving drafter as vLLM loads it: an ordinary Hugging Face checkpoint (`draft_model`), or
        for the eagle kind an EAGLE-3 draft checkpoint (`eagle3`, `eagle.export_eagle3`)."""
        self._check_exportable()
        path = Path(directory)
        if self.is_eagle:
            export_eagle3(self._merged_model(), path)
        else:
            self._merged_model().save_pretrained(path)
            if tokenizer is not None:
                tokenizer.save_pretrained(path)
        self._exported = self._fingerprint()
        return path

    def _check_exportable(self) -> None:
        layout = getattr(eagle_head(self.drafter), "layout", None)
        if self.is_eagle and layout != "eagle3":
            raise ValueError(
                f"vLLM serves an EAGLE head in its 'eagle3' layout only; this head has the {layout!r} layout. Use a "
                "head in that layout (DrafterConfig.drafter_eagle_layout='eagle3', or a warm head distilled with "
                "scripts/distill_eagle.py --layout eagle3), or the Hugging Face backend (--rollout_backend hf)."
            )

    def set_draft_vocab(self, token_ids: Sequence[int] | torch.Tensor | None) -> None:
        """Pin the tokens the drafter may propose (None: back to `ServingConfig.draft_vocab_size`'s frequent tokens).
        Lossless whatever the set: the policy still emits any token it wants."""
        if token_ids is None:
            self.draft_vocab = None
            return
        ids = torch.as_tensor(token_ids, dtype=torch.long).unique()
        if len(ids) == 0 or ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"The draft vocabulary must be a non-empty set of token ids in [0, {self.vocab_size}).")
        self.draft_vocab = ids

    # --- one rollout -----------------------------------------------------------------------------------------------

    def generate(
        self,
        engine: RolloutEngine,
        prompt_ids: Sequence[Sequence[int]] | torch.Tensor,
        sampling: SamplingParams | None = None,
        **kwargs: Any,
    ) -> SpecOutput:
        """One rollout through either engine (`RolloutEngine.generate`'s arguments): serve the newest adapter, decode,
        collect the targets the trainer needs, and record the outcome."""
        with self._lock:
            swapped = self.swap()
            draft_model = self.serve(engine, swapped)
            kwargs.setdefault("collect_topk", max(self.topk, engine.collect_topk))
            out = engine.generate(prompt_ids, sampling, policy_version=self.policy_version, **kwargs)
        self.record(out.completion_ids, out.targets, out.stats, draft_model)
        return out

    def serve(self, engine: RolloutEngine, swapped: bool = False) -> Any:
        """Hand `engine` the drafter as it serves now, in the engine's format: the draft model (merged, cast, reduced
        vocabulary) to a module engine, every time; the merged weights to a weights engine (vLLM), only when a LoRA
        weight changed since it last got them (`swapped`, or a user's load). Returns the draft model, or None."""
        if engine.drafter_format == "module":
            draft_model = self.draft_model()
            engine.load_drafter(draft_model, new_version=swapped)
            return draft_model
        if swapped or self.serving_weights():  # whole modules: vLLM fuses q/k/v
            engine.load_drafter(self.serving_weights(changed_only=False).items(), new_version=True)
        return None

    def record(
        self,
        completions: list[list[int]],
        targets: list[PolicyTargets] | None,
        stats: SpecStats,
        draft_model: Any = None,
    ) -> None:
        """What a rollout saw: its targets go to the trainer's buffer, its tokens to the draft-vocabulary counts, its
        acceptance to the stale alarm."""
        if self.trainer is not None and targets:
            if self.is_eagle and targets[0].features is None:  # an engine without hidden states (vLLM)
                if self.feature_tap is None:
                    raise RuntimeError(
                        "The EAGLE head trains on the policy's features, and this engine returned none: set "
                        "AdaptiveDrafter.feature_tap (eagle_distill.FeatureTap) to take them from the policy's next "
                        "forward over the rollouts (SpeculativeRollout does with the vLLM backend)."
                    )
                self.feature_tap.expect(targets)
            else:
                self.trainer.buffer.add_many(targets)
        flat = torch.tensor([t for row in completions for t in row], dtype=torch.long)
        if self.config.draft_vocab_size or self.draft_vocab is not None:
            self.token_counts += torch.bincount(flat, minlength=self.vocab_size)[: self.vocab_size]
        head = eagle_head(draft_model) if draft_model is not None else None
        vocab = (
            draft_model.token_ids if isinstance(draft_model, ReducedVocabDrafter) else getattr(head, "draft_ids", None)
        )
        if vocab is not None and len(flat):
            self.draft_vocab_coverage = float(torch.isin(flat, vocab.cpu()).float().mean())
        self._watch(stats)

    # --- the stale alarm and metrics -------------------------------------------------------------------------------

    def _watch(self, stats: SpecStats) -> None:
        """The field's commonest silent failure is a drafter never updated after the policy moved, acceptance
        collapsing to ~1 token per verify. Warn when it starts, with the reasons."""
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

    def metrics(self, stats: SpecStats) -> dict[str, float]:
        """`spec/*` metrics of one rollout, the served adapter's version and lag, the alarm and the trainer's side."""
        out = stats.metrics()
        out["drafter/stale_alarm"] = float(bool(self.stale_reasons()))
        if self.draft_vocab_coverage is not None:
            out["spec/draft_vocab_coverage"] = self.draft_vocab_coverage
        if self.adapter_version is not None:
            out["drafter/version"] = float(self.adapter_version.adapter_version)
            out["drafter/version_lag"] = float(self.policy_version - self.adapter_version.policy_version)
        if self.trainer is not None:
            out.update(self.trainer.metrics())
        if self.feature_tap is not None:  # rows whose features never came (no forward of the policy read them)
            out["drafter/feature_rows_dropped"] = float(self.feature_tap.dropped)
        return out

    # --- checkpoints -----------------------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Save the served adapter and its versions into `directory` (atomically)."""
        with self._lock:
            return save_adapter(self.drafter, directory, self.adapter_version or AdapterVersion(0, 0))

    def restore(self, directory: str | os.PathLike[str]) -> AdapterVersion:
        """Resume: serve the adapter saved in `directory` with its versions, and have the trainer continue from it
        (its numbering included)."""
        with self._lock:
            version = load_adapter(self.drafter, directory)
            self.adapter_version = version
            if self.trainer is not None:
                self.trainer.reset(self.drafter, version.adapter_version)
        return version

    def warm_start(self, directory: str | os.PathLike[str]) -> AdapterVersion:
        """Start from an adapter distilled elsewhere (`scripts/distill_drafter.py`): its weights only, this run numbers
        its own versions from 0. Returns the version it was saved with (0 for an EAGLE head from
        `scripts/distill_eagle.py`, which `build_drafter` already made the drafter's base)."""
        with self._lock:
            if self.is_eagle and is_head_directory(directory):
                # A head is the drafter's base, not an adapter: build_drafter must have built the drafter from it.
                if getattr(eagle_head(self.drafter), "loaded_from", None) != str(Path(directory).resolve()):
                    raise ValueError(
                        f"{directory} holds an EAGLE head, the base the LoRA adapts, so it is loaded when the drafter "
                        "is built: build_drafter(policy, DrafterConfig(drafter_kind='eagle', "
                        f"drafter_adapter_path='{directory}'))."
                    )
                return AdapterVersion(0, 0)
            try:
                version = load_adapter(self.drafter, directory)
            except (RuntimeError, ValueError) as exc:  # shapes (another policy) or names (another DrafterConfig)
                raise ValueError(
                    f"The warm-start adapter at {directory} does not fit this drafter: it was distilled for another "
                    "policy or DrafterConfig. Point drafter_adapter_path at an adapter made for this policy, or set it "
                    f"to '' to start from a fresh drafter. ({str(exc).splitlines()[0][:300]})"
                ) from exc
            if self.trainer is not None:
                self.trainer.reset(self.drafter, self.trainer.adapter_version)
        return version


def _hf_name(peft_name: str) -> str:
    """A module's name inside the merged plain model, from its name inside the peft wrapper."""
    return peft_name.removeprefix("base_model.model.")
