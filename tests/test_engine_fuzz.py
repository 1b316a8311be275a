"""Fuzzing the engine's inputs (hypothesis): every input either works correctly or raises a clear ValueError, never a
crash deep in torch or a wrong result."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptive_drafter.sampling import SamplingParams
from adaptive_drafter import SpecConfig, SpeculativeEngine
from adaptive_drafter.drafter import noised_copy
from adaptive_drafter.testing import tiny_causal_lm

VOCAB = 64
POLICY = tiny_causal_lm("qwen2", vocab_size=VOCAB, logit_scale=6.0, max_positions=64)
POLICY.generation_config.eos_token_id = None  # the reference stops only where the engine is told to
DRAFTER = noised_copy(POLICY, 0.2)
ENGINES = {k: SpeculativeEngine(POLICY, DRAFTER, SpecConfig(elastic=False, num_draft_tokens=k)) for k in range(1, 7)}


@st.composite
def engine_inputs(draw):
    batch = draw(st.integers(1, 4))
    width = draw(st.integers(1, 10))
    lengths = [draw(st.integers(0, width)) for _ in range(batch)]  # 0: an empty row
    right_padded = draw(st.booleans()) and draw(st.booleans())  # rarely
    ids = torch.tensor([[draw(st.integers(0, VOCAB - 1)) for _ in range(width)] for _ in range(batch)])
    if draw(st.integers(0, 7)) == 0:  # now and then an id outside the vocabulary, under padding or not
        ids[draw(st.integers(0, batch - 1)), draw(st.integers(0, width - 1))] = draw(st.sampled_from([-1, VOCAB]))
    mask = torch.tensor([[int((j < n) if right_padded else (j >= width - n)) for j in range(width)] for n in lengths])
    dtype = draw(st.sampled_from([torch.int64] * 6 + [torch.int32, torch.float32]))
    kwargs = dict(
        max_new_tokens=draw(st.integers(0, 12)),
        do_sample=draw(st.booleans()),
        temperature=draw(st.sampled_from([0.5, 1.0, 1.7, 1.0, 0.0])),
        top_k=draw(st.sampled_from([0, 1, 5])),
        top_p=draw(st.sampled_from([1.0, 0.9, 0.3])),
        eos_token_id=draw(st.sampled_from([None, 2, [2, 5], 17])),
    )
    return draw(st.integers(1, 6)), ids.to(dtype), mask, kwargs, draw(st.integers(0, 2**16))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(engine_inputs())
def test_any_input_works_or_raises_a_clear_value_error(case):
    k, ids, mask, kwargs, seed = case
    try:
        decode = dict(kwargs)
        sampling = SamplingParams(**{name: decode.pop(name) for name in ("do_sample", "temperature", "top_k", "top_p")})
        out = ENGINES[k].generate(ids, sampling, attention_mask=mask, seed=seed, **decode)
    except ValueError as error:
        assert str(error)  # a message that says what is wrong
        return
    eos = {kwargs["eos_token_id"]} if isinstance(kwargs["eos_token_id"], int) else set(kwargs["eos_token_id"] or ())
    assert len(out.completion_ids) == len(out.logprobs) == ids.shape[0]
    for row, logprobs in zip(out.completion_ids, out.logprobs):
        assert 1 <= len(row) <= kwargs["max_new_tokens"] and len(logprobs) == len(row)
        assert all(0 <= t < VOCAB for t in row)
        assert not eos & set(row[:-1])  # nothing after the first eos
        assert len(row) == kwargs["max_new_tokens"] or row[-1] in eos
        assert all(math.isfinite(lp) and lp <= 1e-6 for lp in logprobs)
    if not kwargs["do_sample"]:
        reference = POLICY.generate(
            input_ids=ids.long().masked_fill(mask == 0, 0), attention_mask=mask,
            max_new_tokens=kwargs["max_new_tokens"], do_sample=False,
            eos_token_id=sorted(eos) or None, pad_token_id=0,
        )  # fmt: skip
        for row, ref in zip(out.completion_ids, reference[:, ids.shape[1] :].tolist()):
            assert row == ref[: len(row)]
