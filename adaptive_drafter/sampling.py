"""Logits → the sampling distribution. Drafter and policy go through the same function, so the drafter's q and the
policy's p are always distributions over the same allowed set, which exact acceptance needs to stay lossless."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings, with the semantics and order of Hugging Face's logits warpers:
    temperature, then top-k, then top-p, then min-p. `do_sample=False` is greedy decoding.

    `repetition_penalty` (1: none) is vLLM's; the Hugging Face engine refuses any other value, and `process_logits`
    does not apply it."""

    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature} (use do_sample=False).")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1] (1 disables it), got {self.top_p}.")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must lie in [0, 1) (0 disables it), got {self.min_p}.")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 is none), got {self.repetition_penalty}.")


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Return float32 logits of the sampling distribution: scaled by the temperature, with every token outside the
    top-k / top-p / min-p set at -inf. `log_softmax` of the result is the log-probability of sampling each token.

    Greedy decoding (`do_sample=False`) leaves the logits unscaled and unfiltered: the emitted token is their argmax
    and its reported logprob is the model's own, `log_softmax(logits)`.
    """
    logits = logits.float()
    if not params.do_sample:
        return logits
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token once the tokens ranked above it already hold top_p of the mass; the first always stays.
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        floor = params.min_p * probs.amax(-1, keepdim=True)
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from (possibly unnormalised) probabilities of shape `[..., V]`."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
