import math

import pytest
import torch

from adaptive_drafter.sampling import SamplingParams, process_logits, sample


def reference_probs(logits: list[float], temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> list[float]:
    """Plain-Python reference of HF's warper chain: temperature → top-k → top-p → min-p, then softmax."""
    scaled = [x / temperature for x in logits]
    allowed = set(range(len(scaled)))
    if top_k:
        allowed &= set(sorted(range(len(scaled)), key=lambda i: -scaled[i])[:top_k])

    def softmax_over(ids):
        m = max(scaled[i] for i in ids)
        z = sum(math.exp(scaled[i] - m) for i in ids)
        return {i: math.exp(scaled[i] - m) / z for i in ids}

    if top_p < 1.0:
        probs = softmax_over(allowed)
        kept, mass = set(), 0.0
        for i in sorted(allowed, key=lambda i: -probs[i]):
            if mass >= top_p:
                break
            kept.add(i)
            mass += probs[i]
        allowed = kept
    if min_p > 0:
        probs = softmax_over(allowed)
        top = max(probs.values())
        allowed = {i for i in allowed if probs[i] >= min_p * top}
    probs = softmax_over(allowed)
    return [probs.get(i, 0.0) for i in range(len(scaled))]


SETTINGS = [
    dict(temperature=1.0),
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=3),
    dict(temperature=1.0, top_p=0.6),
    dict(temperature=0.8, top_k=5, top_p=0.9),
    dict(temperature=1.0, min_p=0.2),
    dict(temperature=1.0, top_k=1),
    dict(temperature=1.0, top_p=1e-6),
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_process_logits_matches_reference(settings):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 11, generator=gen) * 2
    got = process_logits(logits, SamplingParams(do_sample=True, **settings)).softmax(-1)
    for row, probs in zip(logits.tolist(), got.tolist()):
        assert probs == pytest.approx(reference_probs(row, **settings), abs=1e-6)


def test_greedy_leaves_logits_untouched():
    logits = torch.randn(3, 7)
    out = process_logits(logits, SamplingParams(do_sample=False, temperature=0.1, top_k=2))
    assert torch.equal(out, logits)


def test_filtered_tokens_are_never_sampled():
    logits = torch.randn(1, 20).expand(4000, -1)
    probs = process_logits(logits, SamplingParams(top_k=4)).softmax(-1)
    drawn = sample(probs, torch.Generator().manual_seed(1))
    allowed = set(torch.topk(logits[0], 4).indices.tolist())
    assert set(drawn.tolist()) <= allowed


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(top_k=-1), "top_k must be >= 0"),
        (dict(top_p=0.0), "top_p must lie in"),
        (dict(min_p=1.0), "min_p must lie in"),
    ],
)
def test_bad_sampling_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
