"""Every picture the project draws, in one room: a training run's drafter (`plot_run`, the recipe's PNG), the
rollout benchmark's speed-up by batch size (`plot_speedup`) and the drift study (`plot_study`). matplotlib is imported
lazily and draws to files only (headless machines)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .probe import ProbePoint
    from .report import RolloutRecord


def plot_speedup(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Speed-up over plain decoding vs batch size: fixed k, elastic, predicted (where known), HF assisted, and the
    break-even line."""
    plt = pyplot()
    batches = [r["batch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(batches, [r["ratio"] for r in rows], "o-", label="speculative, fixed k")
    ax.plot(batches, [r["elastic_ratio"] for r in rows], "s-", label="elastic")
    predicted = [(r["batch"], r["predicted"]) for r in rows if r.get("predicted") is not None]
    if predicted:
        ax.plot(*zip(*predicted), "x--", label="predicted S (measured α, c, v_k)")
    assisted = [(r["batch"], r["assisted_ratio"]) for r in rows if "assisted_ratio" in r]
    if assisted:
        ax.plot(*zip(*assisted), "^", label="HF assisted generation")
    ax.axhline(1.0, color="gray", lw=1, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens/s relative to plain decoding")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (benchmarks run headless); imported lazily, as it is slow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Lay out, save as PNG (creating the folder) and close `fig`."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def plot_study(rows: list[dict[str, float]], path: Path, title: str) -> None:
    """Acceptance of both drafters against the policy step, the drift KL on a second y-axis."""
    steps = [r["step"] for r in rows]
    fig, ax = pyplot().subplots(figsize=(9, 5.2))
    ax.plot(steps, [r["adaptive_acceptance"] for r in rows], "o-", color="tab:blue", label="adaptive drafter")
    ax.plot(steps, [r["frozen_acceptance"] for r in rows], "s-", color="tab:orange", label="drafter frozen at step 0")
    ax.set_xlabel("policy update (step)")
    ax.set_ylabel("acceptance rate (fresh prompts)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [r["kl_to_step0"] for r in rows], "^--", color="tab:green", label="KL(policy ‖ step-0 policy)")
    ax2.set_ylabel("drift KL(π_t ‖ π_0), nats/token", color="tab:green")
    ax2.tick_params(axis="y", labelcolor="tab:green")
    ax2.set_ylim(bottom=0)
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="center right")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def plot_run(
    probe: list[ProbePoint],
    history: list[RolloutRecord],
    path: str | Path,
    title: str = "",
    rewards: list[dict[str, float]] | None = None,
) -> Path:
    """A PNG of the run: acceptance of the adaptive vs the frozen drafter on the held-out prompts (and the suffix
    drafter's, when measured), tokens per verify, the measured rollout speed-up over plain decoding per step, the
    policy's drift and entropy, and the reward, over policy steps. `probe` holds the probe's points, `history` one
    record per rollout (`measured_speedup` None: unmeasured), `rewards` one dict per logged step with `step` and
    `reward` (TRL's log history)."""
    plt = pyplot()
    points = probe
    fig, axes = plt.subplots(2, 3 if rewards else 2, figsize=(15 if rewards else 11, 7), constrained_layout=True)
    steps = [p.step for p in points]
    with_suffix = any(not math.isnan(p.suffix_tokens_per_step) for p in points)
    panels = (  # (axis, title, y label, [(field, style, label)]): the drafters side by side on the held-out prompts
        (axes[0][0], "acceptance on held-out prompts", "accepted / drafted", [
            ("adaptive_acceptance", "o-", "adaptive (served adapter)"),
            ("frozen_acceptance", "s--", "frozen (starting adapter)"),
            ("suffix_acceptance", "^:", "suffix (siblings)"),
        ]),
        (axes[0][1], "tokens per verify (held-out)", "tokens", [
            ("adaptive_tokens_per_verify", "o-", "adaptive"),
            ("frozen_tokens_per_verify", "s--", "frozen"),
            ("suffix_tokens_per_step", "^:", "suffix (siblings), per step"),
        ]),
    )  # fmt: skip
    for ax, panel, ylabel, curves in panels:  # (not `title`: that is the figure's)
        for name, style, label in curves[: 3 if with_suffix else 2]:
            ax.plot(steps, [getattr(p, name) for p in points], style, label=label)
        ax.set(title=panel, xlabel="policy step", ylabel=ylabel)
        ax.legend()
    ax = axes[1][0]
    timed = [(h.step, h.measured_speedup) for h in history if h.measured_speedup is not None]
    if timed:
        ax.plot(*zip(*timed), "o-", label="rollouts of this run")
    ax.axhline(1.0, color="grey", lw=0.8, label="plain decoding")
    ax.set(title="measured rollout speed-up vs plain", xlabel="policy step", ylabel="x plain")
    ax.legend()
    ax = axes[1][1]
    ax.plot(steps, [p.policy_kl for p in points], "o-", color="C3", label="KL to the start")
    ax.set(title="policy drift", xlabel="policy step", ylabel="KL, nats per token")
    twin = ax.twinx()
    twin.plot(steps, [p.policy_entropy for p in points], "s--", color="C4", label="entropy")
    twin.set_ylabel("entropy, nats per token")
    ax.legend(handles=ax.get_lines() + twin.get_lines(), loc="upper left")
    if rewards:
        ax = axes[0][2]
        xs, ys = [r["step"] for r in rewards], [r["reward"] for r in rewards]
        ax.plot(xs, ys, ".", alpha=0.4, label="per step")
        window = max(1, len(ys) // 20)
        if len(ys) >= window > 1:
            smooth = [sum(ys[i - window + 1 : i + 1]) / window for i in range(window - 1, len(ys))]
            ax.plot(xs[window - 1 :], smooth, "-", label=f"mean of {window}")
        ax.set(title="reward", xlabel="policy step", ylabel="mean reward")
        ax.legend()
        axes[1][2].axis("off")
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_longtail(result: dict[str, Any], engines: list[str], path: Path, title: str) -> None:
    """Left: the batch's completion lengths; right: seconds to finish the batch per decoder."""
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(9, 3.6))
    left.hist(result["lengths"], bins=24, color="tab:blue")
    left.set_xlabel("completion length (tokens)")
    left.set_ylabel("rows")
    names = ["plain", *engines]
    colors = ["gray", "silver", "tab:orange", "tab:green"][: len(names)]
    right.bar(names, [result[n]["seconds"] for n in names], color=colors)
    for i, name in enumerate(names[1:], start=1):
        right.text(i, result[name]["seconds"], f"{result[name]['speedup']:.2f}x", ha="center", va="bottom")
    right.set_ylabel("seconds to finish the batch")
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def plot_distill_curve(result: dict[str, Any], path: Path) -> None:
    """Held-out acceptance (sampled and, if measured, greedy) against minutes of distillation."""
    curve = result["curve"]
    fig, ax = pyplot().subplots(figsize=(6, 3.6))
    minutes = [point["minutes"] for point in curve]
    ax.plot(minutes, [point["acceptance"] for point in curve], "o-", label="sampled (T=1): acceptance rate")
    if all("greedy_acceptance" in point for point in curve):
        ax.plot(minutes, [point["greedy_acceptance"] for point in curve], "s-", label="greedy: acceptance rate")
    ax.set_xlabel("minutes of distillation (rollouts included, evaluations excluded)")
    ax.set_ylabel("held-out acceptance")
    ax.set_ylim(0, 1)
    ax.set_title(result.get("policy", ""), fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)
