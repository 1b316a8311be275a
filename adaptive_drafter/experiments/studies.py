"""The drift study's library (`scripts/drift_study.py`): its tasks, GRPO update, policy drift, drafter rebase, and
the summary, CSV, plot and console report of a run. The script keeps only the study's flow.

Tasks (`StudyTask`): prompts as token ids plus per-row metadata, and a batch reward on completion ids. `tiny_task` is
the quick mode's toy task for `tiny_policy`; `embedded_task` wraps an embedded RL task of `adaptive_drafter.tasks`
(the recipe's prompts and reward functions) for a real tokenizer.
"""

from __future__ import annotations

import csv
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..engine import SpeculativeEngine
from ..testing import dampen_layers, left_padded_prompts, tiny_causal_lm

TINY_VOCAB = 256
TINY_PROMPT_LENGTHS = (4, 12)
CSV_COLUMNS = [
    "step",
    "frozen_acceptance",
    "adaptive_acceptance",
    "frozen_mean_accepted_len",
    "adaptive_mean_accepted_len",
    "frozen_tokens_per_verify",
    "adaptive_tokens_per_verify",
    "kl_to_step0",
    "reward_mean",
    "adapter_version",
    "version_lag",
    "trainer_steps",
    "trainer_errors",
    "distill_loss",
    "elapsed_s",
    "train_reward_mean",
    "policy_entropy",
    "distinct_completions",
    "drafter_tv_to_policy",
    "buffer_tokens",
]


def study_seed(*parts: Any) -> int:
    """A deterministic 31-bit seed from any parts (Python's hash() of strings is salted per process)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


# ---- tasks and models -------------------------------------------------------------------------------------------


@dataclass
class StudyTask:
    """Prompts and a verifiable reward."""

    make_prompts: Callable[[int, int], tuple[torch.Tensor, torch.Tensor, list[Any]]]  # (n, seed) -> ids, mask, metas
    rewards: Callable[[Sequence[Any], Sequence[list[int]]], list[float]]  # (metas, completion ids) -> rewards
    eos_token_id: int
    pad_token_id: int
    description: str


def tiny_policy(
    seed: int = 0,
    drafter_layers: int = 2,
    dampen: float = 0.5,
    hidden_size: int = 64,
    num_layers: int = 4,
    logit_scale: float = 20.0,
) -> tuple[Any, str]:
    """The quick mode's policy and its description: a random Llama whose LM head is scaled by `logit_scale` (next-token
    entropy ≈ 2.3 nats at 20) and whose layers past the drafter's are damped by `dampen`, so that its first layers
    carry much of its computation, as in a trained LM."""
    policy = tiny_causal_lm(
        "llama", vocab_size=TINY_VOCAB, hidden_size=hidden_size, num_layers=num_layers, seed=seed,
        logit_scale=logit_scale,
    )  # fmt: skip
    if dampen != 1.0:
        dampen_layers(policy, drafter_layers, dampen)
    description = (
        f"tiny random Llama policy ({num_layers} layers, hidden {hidden_size}, vocab {TINY_VOCAB}, "
        f"LM head x{logit_scale:g})"
    )
    return policy, description


def tiny_task(vocab_size: int, max_new_tokens: int, eos: int, pad: int, modulus: int = 4) -> StudyTask:
    """Random token prompts; reward = completion tokens (before eos) whose id is ≡ 0 (mod `modulus`), over
    `max_new_tokens`: dense, verifiable, and it rewards neither stopping early nor any particular sequence."""

    def make_prompts(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[Any]]:
        ids, mask = left_padded_prompts(n, *TINY_PROMPT_LENGTHS, vocab_size, pad_id=pad, seed=seed)
        return ids, mask, [None] * n

    def rewards(metas: Sequence[Any], completions: Sequence[list[int]]) -> list[float]:
        return [sum(t != eos and t > 2 and t % modulus == 0 for t in c) / max_new_tokens for c in completions]

    low, high = TINY_PROMPT_LENGTHS
    description = (
        f"random token prompts ({low}-{high} tokens); reward = completion tokens with id % {modulus} == 0 / "
        f"{max_new_tokens}"
    )
    return StudyTask(make_prompts, rewards, eos, pad, description)


def embedded_task(tokenizer: Any, name: str = "arithmetic") -> StudyTask:
    """The embedded RL task `name` of `adaptive_drafter.tasks`, chat-templated; the reward is the sum of the task's
    reward functions (the recipe's) on the decoded completions."""
    from ..tasks import chat_batch, load_task

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    reward_functions = load_task(name, 0)[1]

    def make_prompts(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[Any]]:
        data = load_task(name, n, seed=seed)[0]
        ids, mask = chat_batch(tokenizer, data["prompt"])
        return ids, mask, [{k: v for k, v in row.items() if k != "prompt"} for row in data]

    def rewards(metas: Sequence[Any], completions: Sequence[list[int]]) -> list[float]:
        texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        columns = {key: [m[key] for m in metas] for key in metas[0]} if metas else {}
        return [sum(r) for r in zip(*(fn(texts, **columns) for fn in reward_functions))]

    names = ", ".join(fn.__name__ for fn in reward_functions)
    return StudyTask(make_prompts, rewards, eos, pad, f"{name} (adaptive_drafter.tasks), reward = {names}")


# ---- policy update, drift, rebase -----------------------------------------------------------------------------


def completion_rows(
    prompts: Sequence[list[int]], completions: Sequence[list[int]], pad: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt + completion rows: (input_ids, attention_mask, completion_mask). `completion_mask[b, i]` is
    True where the logits at position i predict a completion token (position i + 1 holds one)."""
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    attention = torch.zeros(len(lengths), width, dtype=torch.long)
    completion = torch.zeros(len(lengths), width, dtype=torch.bool)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        ids[b, : lengths[b]] = torch.tensor([*p, *c], dtype=torch.long)
        attention[b, : lengths[b]] = 1
        completion[b, len(p) - 1 : lengths[b] - 1] = True
    return ids.to(device), attention.to(device), completion.to(device)


def group_advantages(rewards: Sequence[float], group_size: int) -> torch.Tensor:
    """GRPO advantages: (r − group mean) / (group std + 1e-4), per group of `group_size` consecutive rows."""
    r = torch.tensor(rewards, dtype=torch.float32).view(-1, group_size)
    std = r.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
    return ((r - r.mean(1, keepdim=True)) / (std + 1e-4)).flatten()


def token_logprobs(model: Any, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """log π(token at i + 1 | prefix) for every position i, `[B, L - 1]` float32."""
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
    return logits.gather(-1, ids[:, 1:, None]).squeeze(-1) - logits.logsumexp(-1)


def grpo_update(
    policy: Any,
    optimizer: torch.optim.Optimizer,
    prompts: Sequence[list[int]],
    completions: Sequence[list[int]],
    advantages: torch.Tensor,
    pad: int,
    microbatch: int = 0,
    reference: Any = None,
    kl_coef: float = 0.0,
) -> float:
    """One policy-gradient step: loss = −mean over all completion tokens of (A · log π(token) − kl_coef · k3), k3 the
    GRPO estimator of KL(π ‖ π_ref) on the sampled token: exp(log π_ref − log π) − (log π_ref − log π) − 1
    (DeepSeekMath's GRPO; kl_coef = 0 is the plain policy gradient); gradient norm clipped to 1. Returns the loss."""
    device = next(policy.parameters()).device
    rows = [i for i, c in enumerate(completions) if c]
    total = sum(len(completions[i]) for i in rows)
    if not rows or not (advantages.abs().sum() > 0 or kl_coef):
        return 0.0  # no signal (every group had equal rewards): no step
    step = microbatch if microbatch > 0 else len(rows)
    optimizer.zero_grad(set_to_none=True)
    loss_value = 0.0
    policy.train()
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]
        ids, attention, mask = completion_rows(
            [prompts[i] for i in chunk], [completions[i] for i in chunk], pad, device
        )
        logp = token_logprobs(policy, ids, attention)
        objective = advantages[chunk].to(device)[:, None] * logp
        if kl_coef:
            with torch.no_grad():
                ref_logp = token_logprobs(reference, ids, attention)
            delta = ref_logp - logp
            objective = objective - kl_coef * (delta.exp() - delta - 1.0)
        loss = -(objective * mask[:, :-1]).sum() / total
        loss.backward()
        loss_value += loss.item()
    policy.eval()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()
    return loss_value


@torch.no_grad()
def drift(
    policy: Any,
    reference: Any,
    prompts: Sequence[list[int]],
    completions: Sequence[list[int]],
    pad: int,
    chunk: int = 16,
) -> tuple[float, float]:
    """(KL(policy ‖ reference), entropy of policy), token level over the full vocabulary, averaged over completion
    positions, from full forward passes over prompt + completion."""
    device = next(policy.parameters()).device
    rows = [i for i, c in enumerate(completions) if c]
    kl_sum = ent_sum = count = 0.0
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        ids, attention, mask = completion_rows([prompts[i] for i in part], [completions[i] for i in part], pad, device)
        vocab = min(policy.config.vocab_size, reference.config.vocab_size)
        log_p = policy(input_ids=ids, attention_mask=attention).logits[..., :vocab].float().log_softmax(-1)
        log_q = reference(input_ids=ids, attention_mask=attention).logits[..., :vocab].float().log_softmax(-1)
        p = log_p.exp()
        kl_sum += float((p * (log_p - log_q)).sum(-1)[mask].sum())
        ent_sum += float(-(p * log_p).sum(-1)[mask].sum())
        count += int(mask.sum())
    return kl_sum / max(count, 1), ent_sum / max(count, 1)


@torch.no_grad()
def rebase_drafter(drafter: Any, policy: Any) -> None:
    """Re-copy a truncated drafter's base weights (embeddings, its layers, final norm, LM head) from the live policy,
    in place, keeping its LoRA adapter."""
    source = policy.state_dict()
    for name, tensor in drafter.get_base_model().state_dict(keep_vars=True).items():
        if "lora_" in name:
            continue
        tensor.data.copy_(source[name.replace(".base_layer", "")])


# ---- a training run and its cost ---------------------------------------------------------------------------------


@dataclass
class Run:
    """A policy, its optimizer and its rollout engine, with the wall time of its rollout and update phases."""

    policy: Any
    optimizer: torch.optim.Optimizer
    engine: SpeculativeEngine
    adaptive: Any  # the AdaptiveDrafter the engine drafts with (and, in the distilling run, its trainer)
    reference: Any = None  # the step-0 policy, for the KL penalty
    rollout_s: float = 0.0
    update_s: float = 0.0
    engine_steps: int = 0  # batched policy forwards of the rollouts (decode steps)
    rewards: list[float] = field(default_factory=list)


def distill_overhead(distill: Run, baseline: Run, window: int) -> dict[str, float]:
    """The distilling run's cost against the no-distill baseline: end to end (rollout + update wall time; it includes
    the adaptive drafter's effect on the number of decode steps) and contention only (the update phase, identical
    work in both; rollout seconds per batched engine step). `window`: updates the baseline's final reward averages."""
    with_s, without_s = distill.rollout_s + distill.update_s, baseline.rollout_s + baseline.update_s
    late = baseline.rewards[-window:]
    return {
        "rollout_update_s_distill": with_s,
        "rollout_update_s_no_distill": without_s,
        "overhead": with_s / without_s - 1.0,
        "rollout_s_distill": distill.rollout_s,
        "rollout_s_no_distill": baseline.rollout_s,
        "update_s_distill": distill.update_s,
        "update_s_no_distill": baseline.update_s,
        "update_phase_overhead": distill.update_s / baseline.update_s - 1.0,
        "engine_steps_distill": distill.engine_steps,
        "engine_steps_no_distill": baseline.engine_steps,
        "rollout_per_step_overhead": (distill.rollout_s / distill.engine_steps)
        / (baseline.rollout_s / baseline.engine_steps)
        - 1.0,
        "baseline_final_train_reward": sum(late) / len(late),
    }


# ---- summary and outputs -----------------------------------------------------------------------------------------


def summarize(rows: list[dict[str, float]], targets_hold: float = 0.9, targets_fall: float = 0.3) -> dict[str, Any]:
    """The headline figures of the evaluation rows, and whether they meet the study's targets: the adaptive drafter's
    acceptance over the last half stays >= `targets_hold` of its peak, the frozen one's falls by >= `targets_fall`."""
    adaptive = [r["adaptive_acceptance"] for r in rows]
    frozen = [r["frozen_acceptance"] for r in rows]
    peak_index = max(range(len(adaptive)), key=adaptive.__getitem__)
    last_half = [r for r in rows if r["step"] >= rows[-1]["step"] / 2] or rows[-1:]
    min_last_half = min(r["adaptive_acceptance"] for r in last_half)
    peak = adaptive[peak_index]
    fall = 1.0 - frozen[-1] / frozen[0] if frozen[0] > 0 else math.nan
    hold = min_last_half / peak if peak > 0 else math.nan
    return {
        "adaptive_acceptance_peak": peak,
        "adaptive_acceptance_peak_step": rows[peak_index]["step"],
        "adaptive_acceptance_start": adaptive[0],
        "adaptive_acceptance_end": adaptive[-1],
        "adaptive_end_rel_peak": adaptive[-1] / peak if peak > 0 else math.nan,
        "adaptive_min_last_half": min_last_half,
        "adaptive_min_last_half_rel_peak": hold,
        "frozen_acceptance_start": frozen[0],
        "frozen_acceptance_end": frozen[-1],
        "frozen_relative_fall": fall,
        "adaptive_over_frozen_at_end": adaptive[-1] / frozen[-1] if frozen[-1] > 0 else math.nan,
        "adaptive_mean_last_half": sum(r["adaptive_acceptance"] for r in last_half) / len(last_half),
        "frozen_mean_last_half": sum(r["frozen_acceptance"] for r in last_half) / len(last_half),
        # How much of the adaptive curve's wiggle is the policy's own: its entropy moves acceptance (peakier is easier).
        "corr_adaptive_acceptance_policy_entropy": correlation(adaptive, [r["policy_entropy"] for r in rows]),
        "final_kl": rows[-1]["kl_to_step0"],
        "final_reward": rows[-1]["reward_mean"],
        "start_reward": rows[0]["reward_mean"],
        "targets": {
            f"adaptive_min_last_half_rel_peak >= {targets_hold}": bool(hold >= targets_hold),
            f"frozen_relative_fall >= {targets_fall}": bool(fall >= targets_fall),
        },
    }


def correlation(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson correlation (nan when undefined or with fewer than 3 points)."""
    n = len(xs)
    if n < 3:
        return math.nan
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def write_csv(rows: list[dict[str, float]], path: Path) -> None:
    """The evaluation rows as `CSV_COLUMNS`, floats to 6 significant digits."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def print_summary(rows: list[dict[str, float]], summary: dict[str, Any]) -> None:
    """The evaluation rows as a table, then the headline figures."""
    print()
    print(f"{'step':>6} {'frozen acc':>10} {'adaptive acc':>12} {'KL':>8} {'reward':>7} {'entropy':>7} {'lag':>5}")
    for r in rows:
        print(
            f"{r['step']:>6} {r['frozen_acceptance']:>10.3f} {r['adaptive_acceptance']:>12.3f} {r['kl_to_step0']:>8.3f} "
            f"{r['reward_mean']:>7.3f} {r['policy_entropy']:>7.3f} {r['version_lag']:>5.0f}"
        )
    s = summary
    print()
    print(
        f"frozen acceptance   {s['frozen_acceptance_start']:.3f} -> {s['frozen_acceptance_end']:.3f}  "
        f"(relative fall {s['frozen_relative_fall']:.1%}, target >= 30%)"
    )
    print(
        f"adaptive acceptance peak {s['adaptive_acceptance_peak']:.3f} (step {s['adaptive_acceptance_peak_step']}), "
        f"end {s['adaptive_acceptance_end']:.3f}, min over last half {s['adaptive_min_last_half']:.3f} "
        f"= {s['adaptive_min_last_half_rel_peak']:.1%} of peak (target >= 90%)"
    )
    print(
        f"final KL(policy || step-0 policy) {s['final_kl']:.3f} nats/token; reward {s['start_reward']:.3f} -> "
        f"{s['final_reward']:.3f}"
    )
    o = s.get("distill_overhead")
    if o:
        print(
            f"distillation overhead (rollout+update wall time): {o['rollout_update_s_distill']:.1f} s vs "
            f"{o['rollout_update_s_no_distill']:.1f} s without -> {o['overhead']:+.1%} "
            f"(update phase {o['update_phase_overhead']:+.1%}, rollout s/step {o['rollout_per_step_overhead']:+.1%})"
        )
    print(f"wall time {s['wall_time_s']:.0f} s")
