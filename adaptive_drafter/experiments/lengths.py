"""Completion lengths of the policy's own sampling (scripts/bench_lengths.py): how long the long tail is."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from .bench import RunOptions, Setup, completion_length, prompts_on


def lengths_summary(rows: list[list[int]], eos: int | list[int], cap: int) -> dict[str, Any]:
    """The distribution of completion lengths: tokens up to the first eos per row (rows without one count as `cap`,
    the max_new_tokens they ran to): count, median, p90, mean, max, and the shares of rows >= 64, >= 256 tokens and
    at the cap."""
    found = [completion_length(row, eos) for row in rows]
    lengths = sorted(cap if n is None else n for n in found)
    if not lengths:
        raise ValueError("lengths_summary needs at least one row")
    p90 = lengths[min(len(lengths) - 1, int(0.9 * len(lengths)))]  # nearest-rank: the value 90% of rows are below
    return {
        "rows": len(lengths),
        "cap": cap,
        "median": statistics.median(lengths),
        "p90": p90,
        "mean": statistics.fmean(lengths),
        "min": lengths[0],
        "max": lengths[-1],
        "share_ge_64": sum(n >= 64 for n in lengths) / len(lengths),
        "share_ge_256": sum(n >= 256 for n in lengths) / len(lengths),
        "share_at_cap": sum(n is None for n in found) / len(lengths),
        "lengths": [cap if n is None else n for n in found],
    }


def sample_completions(
    setup: Setup, rows: int, options: RunOptions, max_new: int, chunk: int
) -> tuple[list[list[int]], float]:
    """`rows` plain `generate` completions of `setup`'s prompts (seed `options.seed`; a grouped setup repeats each
    prompt), `chunk` rows per call (each call seeded `options.seed + i`). Returns (the completions' full new tokens,
    eos and padding included, seconds)."""
    ids, mask = prompts_on(setup, rows, options)
    out, seconds = [], 0.0
    for i, start in enumerate(range(0, rows, chunk)):
        sub_ids, sub_mask = ids[start : start + chunk], mask[start : start + chunk]
        width = int(sub_mask.sum(1).max())  # drop the columns every row of the chunk pads
        sub_ids, sub_mask = sub_ids[:, -width:], sub_mask[:, -width:]
        torch.manual_seed(options.seed + i)
        begin = time.perf_counter()
        new = setup.policy.generate(
            input_ids=sub_ids, attention_mask=sub_mask, max_new_tokens=max_new, eos_token_id=setup.eos_token_id,
            pad_token_id=setup.pad_token_id, **options.sampling,
        )  # fmt: skip
        seconds += time.perf_counter() - begin
        out.extend(new[:, width:].tolist())
    return out, seconds
