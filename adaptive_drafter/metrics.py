"""Speculation statistics: what the engine counts per `generate` call and the rates derived from them."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class SpecStats:
    """Counters of one `generate` call.

    A *verify* is one row checked by one policy forward pass; a batched step over B active rows counts B verifies.
    """

    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens the acceptance rule kept
    verify_steps: int = 0  # row-level verifications
    verified_tokens: int = 0  # tokens emitted by verifications: accepted drafts + one correction/bonus each
    plain_steps: int = 0  # row-level plain decode steps (the prefill's first token included)
    policy_forwards: int = 0  # batched policy forward passes, prefill included
    drafter_forwards: int = 0  # batched drafter forward passes, prefill included
    emitted_tokens: int = 0  # completion tokens emitted by the decode steps after the prefill
    decode_seconds: float = 0.0  # wall time of the decode steps after the prefill
    # The measured speed-up: the decode steps taken at a batch size where a plain step had been measured in the same
    # engine, their wall time, and the time plain decoding takes for the same tokens at the measured plain step cost.
    timed_seconds: float = 0.0
    plain_equivalent_seconds: float = 0.0
    # Hybrid drafting (SpecConfig.drafting): the part of drafted/accepted/verify_steps drafted model-free.
    suffix_drafted: int = 0  # suffix draft tokens proposed
    suffix_accepted: int = 0  # ...and accepted
    suffix_verifies: int = 0  # row-level verifications of a suffix draft
    suffix_verified_tokens: int = 0  # tokens those verifications emitted

    def __add__(self, other: SpecStats) -> SpecStats:
        """Counters summed field by field: the statistics of several rollouts together."""
        return SpecStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @property
    def acceptance_rate(self) -> float:
        """Share of drafted tokens that were accepted (α)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_len(self) -> float:
        """Mean number of draft tokens accepted per verification."""
        return self.accepted / self.verify_steps if self.verify_steps else 0.0

    @property
    def tokens_per_verify(self) -> float:
        """Mean number of tokens one verification emits (accepted drafts + the correction or bonus)."""
        return self.verified_tokens / self.verify_steps if self.verify_steps else 0.0

    @property
    def suffix_share(self) -> float:
        """Share of the verifications whose draft was model-free (a suffix draft)."""
        return self.suffix_verifies / self.verify_steps if self.verify_steps else 0.0

    @property
    def suffix_acceptance_rate(self) -> float:
        return self.suffix_accepted / self.suffix_drafted if self.suffix_drafted else 0.0

    @property
    def suffix_tokens_per_verify(self) -> float:
        return self.suffix_verified_tokens / self.suffix_verifies if self.suffix_verifies else 0.0

    @property
    def model_acceptance_rate(self) -> float:
        """Acceptance of the model drafter's drafts alone (α of the drafter, which the distiller improves)."""
        drafted = self.drafted - self.suffix_drafted
        return (self.accepted - self.suffix_accepted) / drafted if drafted else 0.0

    @property
    def measured_speedup(self) -> float | None:
        """Plain decoding's measured time for the same tokens over the time taken, on the steps with a plain baseline
        measured in the same engine; None when there was none (e.g. fixed k never decodes plainly)."""
        return self.plain_equivalent_seconds / self.timed_seconds if self.timed_seconds > 0 else None

    @property
    def baseline_coverage(self) -> float:
        """Share of the decode time whose speed-up `measured_speedup` measures."""
        return self.timed_seconds / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        """The `spec/*` metrics of DESIGN §7 for a logger. The rates of speculation are left out of a rollout that
        never speculated (elastic mode decoding plainly): a 0 there would drag a logger's average of acceptance down
        although nothing was rejected."""
        out = {"spec/sd_fraction": self.verify_steps / max(1, self.verify_steps + self.plain_steps)}
        if self.verify_steps:
            out["spec/acceptance_rate"] = self.acceptance_rate
            out["spec/mean_accepted_len"] = self.mean_accepted_len
            out["spec/tokens_per_verify"] = self.tokens_per_verify
        if self.suffix_verifies:  # hybrid drafting: the totals above split by source
            out["spec/suffix_share"] = self.suffix_share
            out["spec/suffix_acceptance_rate"] = self.suffix_acceptance_rate
            out["spec/suffix_tokens_per_verify"] = self.suffix_tokens_per_verify
            if self.drafted > self.suffix_drafted:
                out["spec/model_acceptance_rate"] = self.model_acceptance_rate
        if self.decode_seconds > 0:
            out["spec/decode_tokens_per_second"] = self.emitted_tokens / self.decode_seconds
        if self.measured_speedup is not None:
            out["spec/measured_speedup"] = self.measured_speedup
        return out

    def as_dict(self) -> dict[str, float]:
        """Counters and rates, flat, ready for a logger."""
        return {
            **asdict(self),
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_len": self.mean_accepted_len,
            "tokens_per_verify": self.tokens_per_verify,
            "measured_speedup": self.measured_speedup,
            "suffix_share": self.suffix_share,
            "suffix_acceptance_rate": self.suffix_acceptance_rate,
            "suffix_tokens_per_verify": self.suffix_tokens_per_verify,
            "model_acceptance_rate": self.model_acceptance_rate,
        }


def speedup_estimate(alpha: float, k: int, cost_ratio: float, verify_cost: float = 1.0) -> float:
    """Expected speed-up of speculative over plain decoding (Leviathan et al. 2023):
    S = (1 - α^(k+1)) / ((1 - α)(k·c + v)), with α the acceptance rate, k the draft length, c the drafter/policy cost
    ratio of one step and v the cost of verifying k+1 tokens relative to one decode step (≈1 on a GPU at small batch)."""
    if not 0 <= alpha <= 1 or k < 1 or cost_ratio < 0 or verify_cost <= 0:
        raise ValueError(
            f"need 0 <= alpha <= 1, k >= 1, cost_ratio >= 0, verify_cost > 0; got {alpha}, {k}, "
            f"{cost_ratio}, {verify_cost}"
        )
    expected_tokens = k + 1 if alpha == 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return expected_tokens / (k * cost_ratio + verify_cost)


def machine_info() -> dict[str, Any]:
    """Where and with what a run or benchmark ran (its report says so beside every figure)."""
    import torch  # here, not at the top: the statistics above need neither
    import transformers

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if hasattr(os, "getloadavg"):
        info["load_avg_1min"] = round(os.getloadavg()[0], 2)
    return info
