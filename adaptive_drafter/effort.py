"""Distillation effort that follows the evidence: train the drafter while it is falling behind the policy or still
improving, idle while it holds.

Whether a drafter goes stale under RL is an empirical question (docs/drift_study.md): some runs show a frozen drafter
holding its acceptance for hundreds of steps, others collapsing. Continual distillation costs compute either way, so the
background trainer asks this policy before every step. The evidence is the served adapter's *expected acceptance* on
fresh rollouts, α̂ = 1 − TV(drafter, policy) averaged over generated positions (under the exact rule a drafted token
is accepted with probability Σ min(p, q) = 1 − TV): measured before each update on the batch being trained on, and,
while idle, by a forward pass without gradients over the newest rollouts whenever the policy has moved.

- **training** → **idle** when the last `patience` measurement windows (each `publish_every` steps) gained less than
  `min_gain` over the best before them: distillation has reached what it can reach on this policy (reason "plateau");
- **idle** → **training** when α̂ on the newest policy's rollouts falls `tolerance` below its value at the first
  check after training stopped (twice in a row: one batch is noisy) (reason "falling behind"); a policy that moves
  away from the drafter shows up here, whatever the cause. Fresh rollouts are compared with fresh rollouts: α̂ on the
  batches being trained on is optimistic (the trainer has seen them), so it only decides the plateau.

With `mode="always"` the trainer trains at its duty cycle all the time (the behaviour before this policy existed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

TRAINING, PLATEAU, HOLDING = 0, 1, 2
REASONS = {TRAINING: "training", PLATEAU: "plateau", HOLDING: "holding"}


@dataclass
class EffortDecision:
    """Whether to train now; `code` is one of TRAINING, PLATEAU (idle: no more gain), HOLDING (idle: fresh rollouts
    still accept as well as when training stopped); `reason` says why in words."""

    train: bool
    code: int
    reason: str


@dataclass
class DistillEffort:
    """The training/idle state machine of the background trainer (see the module docstring)."""

    mode: str = "auto"
    patience: int = 3
    min_gain: float = 0.01
    tolerance: float = 0.03
    _windows: list[float] = field(default_factory=list, repr=False)  # α̂ per measurement window while training
    _window: list[float] = field(default_factory=list, repr=False)  # α̂ of the steps of the current window
    _reference: float = field(default=math.nan, repr=False)  # α̂ at the first idle check: the bar of "holding"
    _below: int = field(default=0, repr=False)  # consecutive idle checks below the reference
    decision: EffortDecision = field(default_factory=lambda: EffortDecision(True, TRAINING, "training"))

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "always"):
            raise ValueError(f"distill_effort must be 'auto' or 'always', got {self.mode!r}.")
        if self.patience < 1 or self.min_gain < 0 or self.tolerance <= 0:
            raise ValueError("distill_effort_patience must be >= 1, min_gain >= 0 and tolerance > 0.")

    @property
    def training(self) -> bool:
        return self.decision.train

    def observe_step(self, acceptance: float, window_done: bool) -> EffortDecision:
        """α̂ of the batch a training step just measured (before its update); `window_done` at the end of each
        window (the trainer's publishes)."""
        if self.mode == "always" or not math.isfinite(acceptance):
            return self.decision
        self._window.append(acceptance)
        if not window_done:
            return self.decision
        self._windows.append(sum(self._window) / len(self._window))
        self._window = []
        if len(self._windows) > self.patience:
            before = max(self._windows[: -self.patience])
            recent = self._windows[-self.patience :]
            if max(recent) < before + self.min_gain:
                self._reference, self._below = math.nan, 0  # set by the first check on fresh rollouts
                self.decision = EffortDecision(
                    False,
                    PLATEAU,
                    f"plateau: expected acceptance {sum(recent) / len(recent):.3f} on the batches trained on gained "
                    f"< {self.min_gain} over the last {self.patience} adapters (best before {before:.3f}); idle until "
                    "fresh rollouts show the policy moving away",
                )
        return self.decision

    def observe_idle(self, acceptance: float) -> EffortDecision:
        """α̂ of the served adapter on the newest policy's rollouts, measured while idle."""
        if self.decision.train or not math.isfinite(acceptance):
            return self.decision
        if math.isnan(self._reference):
            self._reference = acceptance
        if acceptance < self._reference - self.tolerance:
            self._below += 1
        else:
            self._below = 0
            self.decision = EffortDecision(
                False,
                HOLDING,
                f"holding: expected acceptance {acceptance:.3f} on the newest rollouts vs {self._reference:.3f} at "
                "the first check after training stopped",
            )
        if self._below >= 2:
            self.decision = EffortDecision(
                True,
                TRAINING,
                f"falling behind: expected acceptance {acceptance:.3f} on the newest rollouts vs "
                f"{self._reference:.3f} at the first check after training stopped; training again",
            )
            self._windows, self._window, self._below = [], [], 0
        return self.decision
