"""Watching the adaptive drafter earn its keep in a run: every few steps, on a small fixed set of held-out prompts with
fixed seeds, the acceptance of the adapter being served and of the adapter the run started from (kept frozen), and how
far the policy has drifted from where it started. It answers the question a user of an adaptive drafter asks: does
adapting help here, as the policy moves?

The probe decodes with the Hugging Face engine at a fixed draft length and the exact rule, so both drafters are
measured the same way whatever backend serves the rollouts; it is off the critical path only in the sense of being
small (a handful of prompts, a few dozen tokens each). With `suffix_group` it also measures the model-free suffix
drafter (`suffix.SuffixDrafter`) on the same prompts, each sampled `suffix_group` times as a GRPO group is, so that it
drafts from the siblings: the model-free alternative a learned drafter must beat.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .adaptive import AdaptiveDrafter
from .config import SpecConfig
from .engine import SpeculativeEngine
from .sampling import SamplingParams


@dataclass
class ProbePoint:
    """One measurement: acceptance per drafted token and tokens per verify of both drafters on the same prompts and
    seeds, and the policy's drift from the start (KL(π_now ‖ π_start) per token, k3 estimator on its own samples)."""

    step: int
    adaptive_acceptance: float
    frozen_acceptance: float
    adaptive_tokens_per_verify: float
    frozen_tokens_per_verify: float
    policy_kl: float
    policy_entropy: float
    adapter_version: int
    # The suffix drafter on the same prompts in groups (NaN unless measured). Tokens per step counts every row step,
    # plain ones included (a suffix drafter drafts only where it finds a match), so it compares with tokens per verify
    # of the model drafters, which draft at every step.
    suffix_acceptance: float = math.nan
    suffix_tokens_per_step: float = math.nan
    suffix_share: float = math.nan  # share of row steps that verified a suffix draft


class DrafterProbe:
    """Measures the served and the starting adapter on held-out prompts every `every` policy steps.

    `input_ids`/`attention_mask` are the held-out prompts (left-padded), decoded with the run's `sampling` settings (the
    drift is measured on the temperature-scaled policy); `track_drift` keeps a frozen copy of the
    starting policy to measure its drift (memory: one more copy of the policy); `suffix_group` > 0 also measures the
    suffix drafter on the prompts repeated that many times (siblings to draft from), drafting up to `suffix_max_draft`.
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        every: int = 2,
        num_draft_tokens: int = 4,
        max_new_tokens: int = 32,
        sampling: SamplingParams | None = None,
        eos_token_id: Any = None,
        seed: int = 1234,
        track_drift: bool = True,
        suffix_group: int = 0,
        suffix_max_draft: int = 16,
    ) -> None:
        if every < 1:
            raise ValueError(f"DrafterProbe.every must be >= 1, got {every}.")
        if suffix_group < 0:
            raise ValueError(f"DrafterProbe.suffix_group must be >= 0 (0: no suffix drafter), got {suffix_group}.")
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.every, self.max_new_tokens = every, max_new_tokens
        self.sampling = sampling if sampling is not None else SamplingParams()
        self.eos_token_id, self.seed, self.track_drift = eos_token_id, seed, track_drift
        self.spec = SpecConfig(num_draft_tokens=num_draft_tokens, elastic=False)
        self.suffix_group = suffix_group
        self.suffix_spec = SpecConfig(
            num_draft_tokens=num_draft_tokens, drafting="suffix", suffix_max_draft=suffix_max_draft, elastic=False
        )
        self.frozen: Any = None  # the starting adapter's serving model, merged
        self.reference: Any = None  # the starting policy
        self.points: list[ProbePoint] = []
        self._last_step: int | None = None

    def due(self, step: int) -> bool:
        """Whether `step` should be measured: the first call, then every `every` steps."""
        return self._last_step is None or step - self._last_step >= self.every

    @torch.no_grad()
    def measure(self, step: int, policy: Any, adaptive: AdaptiveDrafter) -> ProbePoint:
        """Decode the held-out prompts with both drafters; the first call also snapshots what "starting" means."""
        if self.frozen is None:
            self.frozen = copy.deepcopy(adaptive.serving_model()).eval()
            if self.track_drift:
                self.reference = _snapshot(policy)
        was_training = policy.training
        policy.eval()
        try:
            ids, mask = self.input_ids.to(policy.device), self.attention_mask.to(policy.device)
            outs = {}
            for name, drafter in (("adaptive", adaptive.serving_model()), ("frozen", self.frozen)):
                engine = SpeculativeEngine(policy, drafter, self.spec)
                outs[name] = engine.generate(
                    ids, self.sampling, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                    eos_token_id=self.eos_token_id, seed=self.seed,
                )  # fmt: skip
            kl, entropy = self._drift(policy, ids, mask, outs["adaptive"])
            suffix = self._suffix(policy, adaptive, ids, mask) if self.suffix_group else None
        finally:
            policy.train(was_training)
        version = adaptive.adapter_version.adapter_version if adaptive.adapter_version else 0
        point = ProbePoint(
            step,
            outs["adaptive"].stats.acceptance_rate,
            outs["frozen"].stats.acceptance_rate,
            outs["adaptive"].stats.tokens_per_verify,
            outs["frozen"].stats.tokens_per_verify,
            kl,
            entropy,
            version,
        )
        if suffix is not None:
            steps = suffix.verify_steps + suffix.plain_steps
            point.suffix_acceptance = suffix.acceptance_rate
            point.suffix_tokens_per_step = (suffix.verified_tokens + suffix.plain_steps) / max(1, steps)
            point.suffix_share = suffix.verify_steps / max(1, steps)
        self.points.append(point)
        self._last_step = step
        return point

    def _suffix(self, policy: Any, adaptive: AdaptiveDrafter, ids: torch.Tensor, mask: torch.Tensor) -> Any:
        """The suffix drafter's statistics on the prompts sampled `suffix_group` times each, from a fresh engine: its
        drafts come from the siblings and the row's own context only, never from the training rollouts."""
        engine = SpeculativeEngine(policy, adaptive.serving_model(), self.suffix_spec)
        out = engine.generate(
            ids.repeat_interleave(self.suffix_group, 0), self.sampling,
            attention_mask=mask.repeat_interleave(self.suffix_group, 0), max_new_tokens=self.max_new_tokens,
            eos_token_id=self.eos_token_id, seed=self.seed + 1,
        )  # fmt: skip
        return out.stats

    def _drift(self, policy: Any, ids: torch.Tensor, mask: torch.Tensor, out: Any) -> tuple[float, float]:
        """KL(π_now ‖ π_start) per completion token, k3 = E[exp(r) − 1 − r] with r = log π_start − log π_now over the
        policy's own samples (unbiased, non-negative; Schulman's estimator; NaN without `track_drift`), and the
        policy's mean entropy at those positions (RL sharpens the policy: lower entropy, easier drafting)."""
        kls, entropies = [], []
        temperature = self.sampling.temperature if self.sampling.do_sample else 1.0
        for row, completion in enumerate(out.completion_ids):
            if not completion:
                continue
            prompt = ids[row][mask[row].bool()]
            tokens = torch.cat([prompt, torch.tensor(completion, device=ids.device)])[None]
            span = slice(len(prompt) - 1, tokens.shape[1] - 1)
            now = policy(input_ids=tokens).logits[0, span].double().div(temperature).log_softmax(-1)
            entropies.append(-(now.exp() * now).sum(-1))
            if self.reference is not None:
                start = self.reference(input_ids=tokens).logits[0, span].double().div(temperature).log_softmax(-1)
                picked = tokens[0, len(prompt) :, None]
                # float64 and expm1: early in RL the ratios are ~1e-5, where exp(r) - 1 - r in float32 rounds to 0.
                ratio = (start.gather(-1, picked) - now.gather(-1, picked))[:, 0].double()
                kls.append(torch.expm1(ratio) - ratio)
        kl = float(torch.cat(kls).mean()) if kls else math.nan
        return kl, float(torch.cat(entropies).mean()) if entropies else math.nan

    def metrics(self) -> dict[str, float]:
        """The newest point as `drafter/probe_*` metrics for a logger (empty before the first)."""
        if not self.points:
            return {}
        point = self.points[-1]
        return {
            "drafter/probe_acceptance_adaptive": point.adaptive_acceptance,
            "drafter/probe_acceptance_frozen": point.frozen_acceptance,
            "drafter/probe_tokens_per_verify_adaptive": point.adaptive_tokens_per_verify,
            "drafter/probe_tokens_per_verify_frozen": point.frozen_tokens_per_verify,
            "policy/kl_to_start": point.policy_kl,
            "policy/entropy": point.policy_entropy,
            **(
                {
                    "drafter/probe_acceptance_suffix": point.suffix_acceptance,
                    "drafter/probe_tokens_per_step_suffix": point.suffix_tokens_per_step,
                }
                if not math.isnan(point.suffix_tokens_per_step)
                else {}
            ),
        }

    def as_dicts(self) -> list[dict[str, float]]:
        return [asdict(point) for point in self.points]


def _snapshot(model: Any) -> Any:
    """A frozen copy of `model` that computes with its own weights. Trainers rebind `forward` on the instance
    (accelerate and TRL wrap it), and a deep copy keeps that wrapper, whose closure calls the *original* model: the
    copy would then silently follow the live policy and every drift would read 0."""
    snapshot = copy.deepcopy(model)
    snapshot.__dict__.pop("forward", None)  # back to the class's forward, on the copy's own weights
    return snapshot.eval().requires_grad_(False)
