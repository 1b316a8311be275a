"""The cost of freshness: what keeping the drafter distilled costs the policy's training steps.

A `TrainerCallback` beside the rollout's own: with `hold_every` > 0 the background drafter trainer is held during
every other block of that many policy steps, so step times with and without it interleave under the same load; it
also reads the trainer threads' CPU clocks. The recipe adds it with `--hold_trainer_every N`.

    freshness = FreshnessCost(rollout, hold_every=10)
    trainer = GRPOTrainer(..., callbacks=[rollout.callback(), freshness])
    trainer.train()
    freshness.attach(report)      # a line in the summary, `freshness` in the JSON record
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from transformers import TrainerCallback


@dataclass
class StepTime:
    step: int
    seconds: float
    trainer_held: bool


@dataclass
class Freshness:
    """The drafter trainer's compute against the run's (wall seconds inside its steps; CPU seconds of its threads),
    and the mean policy step time with the trainer running vs held (None without such steps)."""

    steps: int
    wall_seconds: float
    trainer_busy_seconds: float
    trainer_wall_share: float | None
    process_cpu_seconds: float
    trainer_cpu_seconds: float | None
    trainer_cpu_share: float | None
    step_seconds_trainer_running: float | None
    step_seconds_trainer_held: float | None
    step_time_ratio: float | None

    def line(self) -> str:
        """The summary's line, or '' when nothing was measured."""
        if self.trainer_wall_share is None:
            return ""
        cpu = self.trainer_cpu_share
        line = (
            f"cost of freshness    the drafter trainer computed {self.trainer_wall_share:.0%} of the steps' wall time"
            + (f" and used {cpu:.0%} of the process's CPU time" if cpu is not None else "")
        )
        if self.step_time_ratio is not None:
            line += (
                f"; policy steps took {self.step_seconds_trainer_running:.1f} s with it running vs "
                f"{self.step_seconds_trainer_held:.1f} s held ({self.step_time_ratio:.2f}x)"
            )
        return line


class FreshnessCost(TrainerCallback):
    """Times every policy step (the first one, which builds the drafter, left out) and holds the rollout's drafter
    trainer during every other block of `hold_every` steps (0: never held)."""

    def __init__(self, rollout: Any, hold_every: int = 0) -> None:
        if hold_every < 0:
            raise ValueError(f"hold_every must be >= 0 (0: never held), got {hold_every}.")
        self.rollout, self.hold_every = rollout, hold_every
        self.step_times: list[StepTime] = []
        self._process_cpu_start = time.process_time()
        self._trainer_cpu: float | None = None
        self._held = False
        self._timed_first = False

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.rollout.drafter_trainer
        self._held = bool(self.hold_every) and (state.global_step // self.hold_every) % 2 == 1
        if trainer is not None and self.hold_every:
            (trainer.pause if self._held else trainer.resume)()
        self._started = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._timed_first:
            self.step_times.append(StepTime(state.global_step, time.perf_counter() - self._started, self._held))
        self._timed_first = True
        self.trainer_cpu_seconds()  # read while its threads live

    def trainer_cpu_seconds(self) -> float | None:
        """CPU seconds the background trainer's threads used so far; the last reading once they have stopped."""
        now = _thread_cpu_seconds("drafter-trainer") if self.rollout.drafter_trainer is not None else None
        if now is not None:
            self._trainer_cpu = max(now, self._trainer_cpu or 0.0)
        return self._trainer_cpu

    def result(self) -> Freshness:
        trainer = self.rollout.drafter_trainer
        wall = sum(row.seconds for row in self.step_times)
        process_cpu = time.process_time() - self._process_cpu_start
        trainer_cpu = self.trainer_cpu_seconds()
        busy = trainer.busy_seconds if trainer is not None else 0.0

        def mean_step(held: bool) -> float | None:
            times = [row.seconds for row in self.step_times if row.trainer_held == held]
            return sum(times) / len(times) if times else None

        running, held = mean_step(False), mean_step(True)
        return Freshness(
            steps=len(self.step_times),
            wall_seconds=wall,
            trainer_busy_seconds=busy,
            trainer_wall_share=busy / wall if trainer is not None and wall > 0 else None,
            process_cpu_seconds=process_cpu,
            trainer_cpu_seconds=trainer_cpu,
            trainer_cpu_share=trainer_cpu / process_cpu if trainer_cpu is not None and process_cpu > 0 else None,
            step_seconds_trainer_running=running,
            step_seconds_trainer_held=held,
            step_time_ratio=running / held if running and held else None,
        )

    def attach(self, report: Any) -> None:
        """Add the result to a `report.RunReport`: its summary line and, in the JSON record, `freshness` and
        `step_times`."""
        result = self.result()
        if result.line():
            report.notes.append(result.line())
        report.extra["freshness"] = asdict(result)
        report.extra["step_times"] = [asdict(row) for row in self.step_times]


def _thread_cpu_seconds(prefix: str) -> float | None:
    """CPU seconds used so far by the live threads whose name starts with `prefix` (Linux thread clocks; None where
    the platform has none). Intra-op worker threads a step may use are not attributed: run with one thread to count
    all of the trainer's work."""
    if not hasattr(time, "pthread_getcpuclockid"):
        return None
    total = 0.0
    for thread in threading.enumerate():
        if thread.name.startswith(prefix) and thread.ident is not None:
            try:
                total += time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
            except (OSError, ProcessLookupError):  # the thread ended meanwhile
                pass
    return total
