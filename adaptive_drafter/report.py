"""What a training run measured about its rollouts and drafter: a typed report with the end-of-run summary a user
reads (every figure in it measured in this run, or said not to be) and the JSON record beside the checkpoint.

    report = rollout.report(trainer)        # trl.SpeculativeRollout
    print(report.summary())
    report.write(Path(output_dir) / "adaptive_drafter_run.json")
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .metrics import SpecStats
from .probe import ProbePoint


@dataclass
class RolloutRecord:
    """One rollout: the policy step it served, accepted tokens per verify, and the measured speed-up (None: not
    measured in that rollout)."""

    step: int
    tokens_per_verify: float
    measured_speedup: float | None


@dataclass
class DrafterState:
    """The background trainer at the end of the run (drift to the policy on its last distilled batch: NaN before any
    training step)."""

    tv_to_policy: float
    kl_to_policy: float
    steps: int
    errors: int
    swaps_rejected: int
    busy_seconds: float

    @classmethod
    def of(cls, trainer: Any) -> DrafterState:
        return cls(
            trainer.tv_to_policy,
            trainer.kl_to_policy,
            trainer.steps,
            trainer.errors,
            trainer.swaps_rejected,
            trainer.busy_seconds,
        )


@dataclass
class RunReport:
    """A run's rollouts and drafter, as measured. `notes` are further lines for the summary and `extra` further
    entries for the JSON record (an experiment's own measurements, e.g. `experiments.freshness`)."""

    events: list[str]
    totals: SpecStats
    rollouts: list[RolloutRecord]
    probe: list[ProbePoint]
    rollout_precision: str | None
    adapter_version: int
    drafter: DrafterState | None
    rewards: list[dict[str, Any]]
    processes: int
    output_dir: str
    machine: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self, wandb_run: str | None = None) -> str:
        """The end-of-run summary, one line per figure."""
        totals = self.totals
        lines = list(self.events)
        if self.rollout_precision is not None:
            lines.append(f"rollout precision    {self.rollout_precision}")
        if totals.decode_seconds > 0:
            share = totals.verify_steps / max(1, totals.verify_steps + totals.plain_steps)
            lines.append(
                f"rollouts             {totals.emitted_tokens} tokens decoded at "
                f"{totals.emitted_tokens / totals.decode_seconds:.1f} tok/s (after each prefill); {share:.0%} of row "
                "steps speculated"
            )
        if totals.drafted:
            lines.append(
                f"acceptance           {totals.acceptance_rate:.3f} over {totals.drafted} drafted tokens; "
                f"{totals.tokens_per_verify:.2f} tokens per verify"
            )
        else:
            lines.append("acceptance           no step speculated (the elastic controller found plain decoding faster)")
        if totals.measured_speedup is not None:
            lines.append(
                f"measured speed-up    {totals.measured_speedup:.2f}x plain decoding: wall time of the decode steps vs "
                f"the plain step cost measured in this run at the same batch sizes ({totals.baseline_coverage:.0%} of "
                "decode time had such a baseline)"
            )
        else:
            lines.append(
                "measured speed-up    not measured in this run: no plain decode step was timed beside the speculative "
                "ones (fixed k, or the vLLM backend: scripts/bench_vllm.py measures it)"
            )
        if self.probe:
            first, last = self.probe[0], self.probe[-1]
            lines.append(
                f"held-out probe       acceptance {first.adaptive_acceptance:.3f} -> {last.adaptive_acceptance:.3f} "
                f"with the served adapter (v{last.adapter_version}), {first.frozen_acceptance:.3f} -> "
                f"{last.frozen_acceptance:.3f} with the starting one frozen (steps {first.step}-{last.step}, "
                f"{len(self.probe)} measurements); policy KL to its start {last.policy_kl:.2e}"
            )
        if self.drafter is not None:
            d = self.drafter
            lines.append(
                f"drafter              serving adapter v{self.adapter_version}; drift to the policy on the last "
                f"distilled batch: TV {d.tv_to_policy:.3f}, KL {d.kl_to_policy:.3f} (nan: not trained yet); "
                f"{d.steps} distillation steps ({d.busy_seconds:.0f} s of compute), {d.swaps_rejected} adapters held "
                f"back by the swap gate, {d.errors} trainer errors"
            )
        lines.extend(self.notes)
        lines.append(f"processes            {self.processes} (each with its own engine and drafter trainer)")
        lines.append(f"checkpoint           {self.output_dir}")
        if wandb_run is not None:
            lines.append(f"W&B run              {wandb_run}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["totals"] = self.totals.metrics()
        return record

    def write(self, path: str | Path) -> Path:
        """The report as JSON (NaN as null)."""
        path = Path(path)
        path.write_text(json.dumps(_finite(self.as_dict()), indent=1, default=str))
        return path


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value
