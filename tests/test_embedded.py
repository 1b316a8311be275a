"""The engine on the real embedded model (SmolLM2-135M-Instruct, Llama architecture, 30 layers, vocab 49152)."""

import pytest
import torch

from adaptive_drafter.sampling import SamplingParams
from adaptive_drafter import SpecConfig, SpeculativeEngine
from adaptive_drafter.drafter import truncated_drafter

pytestmark = pytest.mark.slow

QUESTIONS = ["What is 7 + 5?", "Reverse the word 'cat'.", "Name a primary color.", "How many legs does a spider have?"]


@pytest.fixture(scope="module")
def embedded():
    from adaptive_drafter.embedded import load_embedded

    policy, tokenizer = load_embedded()
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in QUESTIONS
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return policy, tokenizer, batch


def test_embedded_model_loads_offline_as_documented(embedded):
    policy, tokenizer, batch = embedded
    assert policy.config.num_hidden_layers == 30 and policy.config.vocab_size == 49152
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.padding_side == "left"
    assert batch.attention_mask[:, 0].min() == 0  # mixed lengths: really left-padded


def test_greedy_identity_on_the_embedded_model(embedded):
    policy, tokenizer, batch = embedded
    engine = SpeculativeEngine(
        policy, truncated_drafter(policy, 4), SpecConfig(num_draft_tokens=4, elastic=False), tokenizer=tokenizer
    )
    eos = tokenizer.eos_token_id
    out = engine.generate(
        batch.input_ids,
        SamplingParams(do_sample=False),
        attention_mask=batch.attention_mask,
        max_new_tokens=24,
        eos_token_id=eos,
    )
    with torch.no_grad():
        ref = policy.generate(**batch, max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    expected = [row[: row.index(eos) + 1] if eos in row else row for row in ref[:, batch.input_ids.shape[1] :].tolist()]
    assert out.completion_ids == expected
    assert out.stats.verify_steps > 0
