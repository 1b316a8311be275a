"""The background drafter trainer: distills the moving policy into a private copy of the drafter's LoRA adapters and
publishes new adapter versions for the engine to swap in between rollouts.

The trainer never touches the serving drafter. It owns a deep copy, trains its LoRA weights on batches sampled from a
`DistillBuffer` that the engine fills, and every `publish_every` optimizer steps publishes `(version, state_dict)`.
A fault (an exception, a non-finite loss or gradient, a step that hangs past `distill_step_timeout_s`) is caught and
counted, the private copy is rolled back to the last published adapter, and the trainer restarts after a back-off or
stops, as configured; the engine keeps serving the last good adapter throughout.

`hold()` keeps the trainer from stepping while something else must run alone (an evaluation, a baseline's phase): it
waits for the step in flight, and the duty-cycle rest after a step is measured in time the trainer is free to run, so
a hold cannot stand in for that rest and the trainer's compute stays within `distill_duty_cycle` of its free time.

Steps run on a worker thread that the background loop supervises. A Python thread cannot be killed, so a hung step is
abandoned rather than stopped: the trainer continues on a fresh copy of the model, and whatever the abandoned step
computes, should it ever return, is dropped (it trained a model object nobody serves or publishes any more).
"""

from __future__ import annotations

import concurrent.futures
import copy
import logging
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel

from .config import DistillConfig
from .distill import distill_loss, fkl_loss, tv_loss
from .effort import DistillEffort
from .eagle import eagle_head
from .eagle_distill import eagle_loss, require_features
from .targets import DistillBatch, DistillBuffer
from .drafter import AdapterVersion, adapter_state, decoder_and_head, load_adapter_state, logits_are_head_over_decoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishedAdapter:
    """One adapter version as published by the trainer: immutable CPU tensors, safe to hand across threads."""

    version: AdapterVersion
    state: dict[str, torch.Tensor]


class TrainerFault(RuntimeError):
    """A training step produced something unusable (a non-finite loss or gradient)."""


class DrafterTrainer:
    """Continually distills the policy's targets from `buffer` into a private copy of `drafter`'s LoRA adapters.

    Use `start()` to train in a background thread (or call `step()` yourself), `latest()` to fetch the newest
    published adapter, `metrics()` for logging, `pause()`/`resume()` or `hold()` to keep it from stepping, and
    `stop()` when done (also a context manager).
    """

    def __init__(self, drafter: PeftModel, config: DistillConfig | None = None, buffer: DistillBuffer | None = None):
        self.config = config if config is not None else DistillConfig()
        self.buffer = (
            buffer
            if buffer is not None
            else DistillBuffer(
                self.config.distill_buffer_tokens,
                self.config.distill_recency_half_life,
                # The swap gate compares adapters on rollouts no step trained on: one row in 8 is kept for it.
                holdout_every=8 if self.config.distill_swap_gate else 0,
            )
        )
        device = self.config.distill_device or next(drafter.parameters()).device
        self.model = copy.deepcopy(drafter).to(device).train()
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        if not self._params:
            raise ValueError("The drafter has no trainable parameters: build it with build_drafter (LoRA adapters).")
        # Run the LM head only at positions with a target (not over prompts): exact when the logits are the head over
        # the decoder's output, which is checked once; otherwise the full forward is used.
        self._eagle = eagle_head(self.model) is not None  # a head over the policy's features: its own loss
        self._head_at_targets = not self._eagle and logits_are_head_over_decoder(self.model)
        self._optimizer = self._new_optimizer()
        self._good_state = adapter_state(self.model)  # what a fault rolls back to: the last published weights
        self._published: PublishedAdapter | None = None
        self._lock = threading.Lock()
        self._stop, self._running = threading.Event(), threading.Event()
        self._running.set()
        self._thread: threading.Thread | None = None
        # `hold()`'s state, guarded by `_gate`: the nesting depth, the step in flight (a token per step, so that a step
        # abandoned after a timeout cannot clear its successor's) and the seconds held, which the rest clock skips.
        self._gate = threading.Condition()
        self._holds = 0
        self._in_flight: object | None = None
        self._held_since = self._held_total = 0.0
        self.steps = self.adapter_version = self.errors = self.restarts = 0
        self.last_error: str | None = None
        self.last_loss = self.tv_to_policy = self.kl_to_policy = math.nan
        self.busy_seconds = 0.0
        # Distillation effort (adaptive_drafter.effort): the background loop trains while the drafter improves or falls
        # behind and idles while it holds, checking fresh rollouts meanwhile. `step()` called directly always trains.
        config = self.config
        self.effort = DistillEffort(
            config.distill_effort, config.distill_effort_patience, config.distill_effort_min_gain,
            config.distill_effort_tolerance,
        )  # fmt: skip
        self.expected_acceptance = math.nan  # 1 - TV on the last batch measured: α̂ of the exact rule
        # The swap gate (`distill_swap_gate`): windows whose adapter was not published, and the last comparison's
        # mean per-row difference in expected acceptance (new - served) on fresh rollouts.
        self.swaps_rejected = 0
        self.gate_margin = math.nan
        self._checked_rows = 0  # `buffer.added` at the last idle check

    # --- one step -------------------------------------------------------------------------------------------------

    def step(self) -> float | None:
        """One optimizer step on a batch from the buffer; returns the loss, or None while the buffer is too small or
        the trainer is held (`hold()`). Raises on a fault (the background loop handles it; see `_recover`)."""
        return self._gated_step(honour_pause=False)

    def _gated_step(self, honour_pause: bool) -> float | None:
        """`step()` unless held or, for the background loop (`honour_pause`), paused: checked under the gate together
        with marking the step in flight, so that neither a hold nor a pause that came after the loop's wait is missed."""
        if self.buffer.num_tokens < self.config.distill_min_buffer_tokens:
            return None
        token = object()
        with self._gate:
            if self._holds or (honour_pause and not self._running.is_set()):
                return None
            self._in_flight = token
        try:
            if honour_pause and not self.effort.training:
                self._idle_check()
                return None
            return self._step()
        finally:
            with self._gate:
                if self._in_flight is token:
                    self._in_flight = None
                    self._gate.notify_all()

    def _step(self) -> float | None:
        start = time.perf_counter()
        # Taken once: after a timeout the trainer moves on to a new model, and this step must keep to the old one.
        model, optimizer, params = self.model, self._optimizer, self._params
        batch = self.buffer.sample(self.config.distill_batch_size).to(next(model.parameters()).device)
        loss, logits, targets = self._loss(model, batch)
        if not torch.isfinite(loss):
            raise TrainerFault(f"non-finite distillation loss ({loss.item()}) at step {self.steps + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.distill_max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise TrainerFault(f"non-finite gradient norm at step {self.steps + 1}")
        optimizer.step()
        drift = self._drift(logits.detach(), targets)
        window_done = (self.steps + 1) % self.config.distill_publish_every == 0
        # Outside the lock (two forward passes): the rollout thread fetching `latest()` must not wait for them.
        verdict = self._swap_verdict(model) if window_done and self.config.distill_swap_gate else None
        with self._lock:
            if model is not self.model:  # abandoned after a timeout: drop what it computed
                return None
            self.steps += 1
            self.last_loss = loss.item()
            self.tv_to_policy, self.kl_to_policy = drift
            self.expected_acceptance = 1.0 - drift[0]
            if window_done and (verdict is None or verdict[0]):
                self._publish(policy_version=int(batch.policy_versions.max()))
            elif window_done:
                self.swaps_rejected += 1
                logger.info("drafter trainer keeps serving v%d: %s", self.adapter_version, verdict[1])
            if self.effort.training and not self.effort.observe_step(self.expected_acceptance, window_done).train:
                # idling right after a publish: the served adapter is the one measured from now on
                logger.info("drafter trainer idles: %s", self.effort.decision.reason)
            self.busy_seconds += time.perf_counter() - start
        return self.last_loss

    @torch.no_grad()
    def _idle_check(self) -> None:
        """While idle: once enough fresh rollouts have arrived, the drafter's expected acceptance on them (a forward
        pass, no update), which tells the effort policy whether the policy has moved away from it."""
        added = self.buffer.added
        if added - self._checked_rows < self.config.distill_batch_size:
            return
        start = time.perf_counter()
        self._checked_rows = added
        model = self.model
        batch = self.buffer.newest(self.config.distill_batch_size).to(next(model.parameters()).device)
        model.eval()  # no LoRA dropout in a measurement
        try:
            _, logits, targets = self._loss(model, batch)
        finally:
            model.train()
        tv, _ = self._drift(logits, targets)
        with self._lock:
            self.expected_acceptance = 1.0 - tv
            if self.effort.observe_idle(self.expected_acceptance).train:
                logger.info("drafter trainer resumes: %s", self.effort.decision.reason)
            self.busy_seconds += time.perf_counter() - start

    def _loss(self, model: PeftModel, batch: DistillBatch) -> tuple[torch.Tensor, torch.Tensor, DistillBatch]:
        """The loss, the drafter's logits at the targets (`[N, V]`, or `[B, L, V]`) and the batch they align with (an
        EAGLE head's output at position s predicts the token after next: its batch is shifted by one; its logits are
        those of the first draft step)."""
        if self._eagle:
            config = self.config
            loss, logits, targets = eagle_loss(
                eagle_head(model), batch, require_features(batch), depth=config.distill_eagle_depth,
                kind=config.distill_loss, mix_weights=config.mix(),
            )  # fmt: skip
            return loss, logits[0], targets
        if self._head_at_targets:
            decoder, head = decoder_and_head(model)
            hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
            logits = head(hidden[batch.loss_mask.bool()])  # [N, V]
        else:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = distill_loss(
            logits,
            batch,
            self.config.distill_loss,
            self.config.mix(),
            rejected_weight=self.config.distill_rejected_weight,
        )
        return loss, logits, batch

    @torch.no_grad()
    def _swap_verdict(self, model: PeftModel) -> tuple[bool, str]:
        """Whether the weights being trained may be published: their expected acceptance on the newest rollouts no
        step has trained on, row by row against the served (last published) weights', is not lower beyond noise
        (the mean per-row difference plus two standard errors is >= 0). No fresh rollout yet: not published."""
        batch = self.buffer.fresh(self.config.distill_batch_size)
        if batch is None:
            return False, "no rollout the trainer has not seen to compare the new adapter on yet"
        batch = batch.to(next(model.parameters()).device)
        candidate = adapter_state(model)
        model.eval()  # no LoRA dropout in a measurement
        try:
            new = self._row_acceptance(model, batch)
            load_adapter_state(model, self._good_state)
            served = self._row_acceptance(model, batch)
        finally:
            load_adapter_state(model, candidate)
            model.train()
        difference = new - served
        rows = len(difference)
        noise = 2 * float(difference.std() / math.sqrt(rows)) if rows > 1 else 0.0
        self.gate_margin = float(difference.mean())
        if self.gate_margin + noise >= 0:
            return True, "published"
        return False, (
            f"the new adapter's expected acceptance on {rows} fresh rollouts is {float(new.mean()):.3f} vs "
            f"{float(served.mean()):.3f} for the served one (difference {self.gate_margin:+.3f}, noise {noise:.3f})"
        )

    def _row_acceptance(self, model: PeftModel, batch: DistillBatch) -> torch.Tensor:
        """`[B]` the mean expected acceptance 1 - TV over each row's target positions."""
        _, logits, batch = self._loss(model, batch)
        mask = batch.loss_mask.bool()
        rows = mask.nonzero()[:, 0]
        if logits.dim() == 2:  # [N, V] at the targets
            topk_ids, topk_logprobs, at, _ = batch.at_targets()
            tv = tv_loss(logits[None], topk_ids, topk_logprobs, at)[0]
        else:
            tv = tv_loss(logits, batch.topk_ids, batch.topk_logprobs, mask)[mask]
        count = torch.zeros(len(mask)).index_add_(0, rows.cpu(), torch.ones(len(rows)))
        total = torch.zeros(len(mask)).index_add_(0, rows.cpu(), (1 - tv).float().cpu())
        return (total / count.clamp_min(1))[count > 0]

    @staticmethod
    def _drift(logits: torch.Tensor, batch: DistillBatch) -> tuple[float, float]:
        """Drafter/policy TV and KL on the batch just trained on (before the update): the drift metrics. `logits` are
        `[B, L, V]` or `[N, V]` at the targets (see `distill_loss`)."""
        if logits.dim() == 2:
            topk_ids, topk_logprobs, mask, _ = batch.at_targets()
            logits = logits[None]
        else:
            topk_ids, topk_logprobs, mask = batch.topk_ids, batch.topk_logprobs, batch.loss_mask
        count = mask.sum().clamp_min(1)
        tv = float(tv_loss(logits, topk_ids, topk_logprobs, mask).sum() / count)
        return tv, float(fkl_loss(logits, topk_ids, topk_logprobs, mask).sum() / count)

    def publish(self, policy_version: int) -> PublishedAdapter:
        """Publish the current weights as the next adapter version (fitted to `policy_version`)."""
        with self._lock:
            return self._publish(policy_version)

    def _publish(self, policy_version: int) -> PublishedAdapter:  # holds self._lock
        self.adapter_version += 1
        published = PublishedAdapter(AdapterVersion(self.adapter_version, policy_version), adapter_state(self.model))
        self._published, self._good_state = published, published.state
        return published

    def reset(self, drafter: PeftModel, adapter_version: int) -> None:
        """Continue from `drafter`'s current LoRA weights (a resumed or warm-started adapter), numbering the next
        published version after `adapter_version`; the optimizer's moments start afresh."""
        with self._lock:
            load_adapter_state(self.model, adapter_state(drafter))
            self._good_state = adapter_state(self.model)
            self._optimizer = self._new_optimizer()
            self.adapter_version = adapter_version

    def latest(self) -> PublishedAdapter | None:
        """The newest published adapter, or None before the first."""
        with self._lock:
            return self._published

    # --- the background loop --------------------------------------------------------------------------------------

    def start(self) -> DrafterTrainer:
        """Train in a background daemon thread until `stop()`."""
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="drafter-trainer", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the background thread and wait for it (at most `timeout` seconds)."""
        self._stop.set()
        self._running.set()
        with self._gate:
            self._gate.notify_all()  # wakes a rest or a wait for a hold to end
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("drafter trainer did not stop within %.0f s; it is a daemon thread", timeout)
            self._thread = None

    def pause(self) -> None:
        """Keep the background loop from starting steps until `resume()` (e.g. while a checkpoint is written, or while
        distillation is not needed). Unlike `hold()`, it does not wait for the step in flight."""
        self._running.clear()

    def resume(self) -> None:
        """Let a paused trainer step again."""
        self._running.set()
        with self._gate:
            self._gate.notify_all()

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Keep the trainer from stepping for the duration of the block, e.g. while another computation must be timed
        alone. Entering waits for the step in flight to finish; `step()` returns None while held, whether the
        background thread runs or not. Holds nest, and a pause (`pause()`) from before, during or after the block is
        left as it is.

        Time held does not count as the duty-cycle rest that follows a step: the rest resumes when the last hold ends,
        so that the trainer computes at most `distill_duty_cycle` of the time it is free to run. Without this, holds
        that fall inside rests (an interleaved baseline run holds it half of the time) would let it compute far more.
        """
        with self._gate:
            self._holds += 1
            if self._holds == 1:
                self._held_since = time.perf_counter()
            try:
                self._gate.wait_for(lambda: self._in_flight is None)
            except BaseException:
                self._release()
                raise
        try:
            yield
        finally:
            with self._gate:
                self._release()

    def _release(self) -> None:  # holds self._gate
        self._holds -= 1
        if self._holds == 0:
            self._held_total += time.perf_counter() - self._held_since
        self._gate.notify_all()

    def _free_clock(self) -> float:  # holds self._gate
        """Seconds the trainer has not been held: `perf_counter` with the held intervals cut out."""
        now = time.perf_counter()
        return now - self._held_total - (now - self._held_since if self._holds else 0.0)

    def _rest(self, seconds: float) -> None:
        """Sleep `seconds` of free time: time held meanwhile is not counted, so the rest is made up after the hold."""
        with self._gate:
            end = self._free_clock() + seconds
            while not self._stop.is_set():
                left = end - self._free_clock()
                if left <= 0:
                    return
                self._gate.wait(None if self._holds else left)  # stop() and the end of a hold notify

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> DrafterTrainer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _run(self) -> None:
        self._executor = self._new_executor()
        try:
            self._loop()
        finally:
            self._executor.shutdown(wait=True)

    def _new_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        """The worker thread that runs steps, so that the loop can time them out."""
        device = next(self.model.parameters()).device
        # On a GPU the trainer's kernels go to their own stream so they can overlap the rollouts' on the default one.
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        return concurrent.futures.ThreadPoolExecutor(
            1, "drafter-trainer-step", initializer=torch.cuda.set_stream if stream is not None else None,
            initargs=(stream,) if stream is not None else (),
        )

    def _timed_step(self) -> float | None:
        """`step()` on the worker thread; a step that outlives `distill_step_timeout_s` is abandoned and raised as a
        fault, the trainer moving on to a fresh copy of the model."""
        future = self._executor.submit(self._gated_step, True)
        timeout = self.config.distill_step_timeout_s
        try:
            return future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            self._executor.shutdown(wait=False)
            self._executor = self._new_executor()
            fresh = copy.deepcopy(self.model)  # the hung step keeps the old object to itself
            with self._lock:
                self.model = fresh
                self._params = [p for p in fresh.parameters() if p.requires_grad]
            with self._gate:  # a hold must not wait for a step that may never return
                self._in_flight = None
                self._gate.notify_all()
            raise TrainerFault(
                f"a distillation step ran longer than distill_step_timeout_s={timeout} s (hung?); abandoned it"
            ) from None

    def _loop(self) -> None:
        consecutive = 0
        while not self._stop.is_set():
            with self._gate:
                self._gate.wait_for(lambda: (self._running.is_set() and not self._holds) or self._stop.is_set())
            if self._stop.is_set():
                break
            started = time.perf_counter()
            try:
                loss = self._timed_step()
            except Exception as exc:  # noqa: BLE001 - any fault must leave the rollouts serving, never crash them
                consecutive += 1
                if not self._recover(exc, consecutive):
                    return
                continue
            if loss is None:
                if not self._holds and self._running.is_set():  # else the loop's top waits for the hold or pause to end
                    self._stop.wait(0.05)  # waiting for rollouts to fill the buffer
                continue
            consecutive = 0
            if self.config.distill_duty_cycle < 1.0:  # rest so that compute stays within duty_cycle of free time
                busy = time.perf_counter() - started
                self._rest(busy * (1.0 / self.config.distill_duty_cycle - 1.0))

    def _recover(self, exc: Exception, consecutive: int) -> bool:
        """Count and log a fault, roll back to the last good adapter; return whether to keep training."""
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        load_adapter_state(self.model, self._good_state)
        self._optimizer = self._new_optimizer()  # moments may hold the fault's NaNs
        if self.config.distill_on_error == "stop" or consecutive > self.config.distill_max_restarts:
            logger.error("drafter trainer stopped after a fault (%s); serving the last good adapter", self.last_error)
            return False
        self.restarts += 1
        backoff = self.config.distill_restart_backoff_s * 2 ** (consecutive - 1)
        logger.warning("drafter trainer fault (%s); rolled back, restarting in %.1f s", self.last_error, backoff)
        self._stop.wait(backoff)
        return True

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self._params, lr=self.config.distill_learning_rate)

    # --- metrics --------------------------------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """The trainer's side of the drafter metrics (DESIGN §7), ready for a logger."""
        return {
            "drafter/distill_loss": self.last_loss,
            "drafter/tv_to_policy": self.tv_to_policy,
            "drafter/kl_to_policy": self.kl_to_policy,
            "drafter/trainer_steps": float(self.steps),
            "drafter/adapter_published": float(self.adapter_version),
            "drafter/buffer_tokens": float(self.buffer.num_tokens),
            "drafter/trainer_errors": float(self.errors),
            "drafter/trainer_alive": float(self.alive),
            "drafter/expected_acceptance": self.expected_acceptance,
            # effort 1: training at the duty cycle; 0: idle (idle_reason 1: plateau, 2: holding; 0: training)
            "drafter/effort": float(self.effort.training),
            "drafter/idle_reason": float(self.effort.decision.code),
            "drafter/swap_rejected": float(self.swaps_rejected),
            "drafter/gate_margin": self.gate_margin,
        }
