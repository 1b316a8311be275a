import pytest
import torch

from adaptive_drafter.drafter import check_compatible, check_tokenizers, truncated_drafter
from adaptive_drafter.testing import ARCHITECTURES, tiny_causal_lm


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_truncated_drafter_copies_the_policys_first_layers(arch):
    policy = tiny_causal_lm(arch, num_layers=3)
    ids = torch.randint(3, 256, (2, 7))
    full = truncated_drafter(policy, 3)
    assert torch.allclose(full(input_ids=ids).logits, policy(input_ids=ids).logits, atol=1e-6)
    shallow = truncated_drafter(policy, 1)
    assert shallow.config.num_hidden_layers == 1 and policy.config.num_hidden_layers == 3
    # A copy, not a view: changing the drafter leaves the policy alone.
    with torch.no_grad():
        shallow.get_input_embeddings().weight.add_(1.0)
    assert not torch.equal(shallow.get_input_embeddings().weight, policy.get_input_embeddings().weight)


def test_truncated_drafter_rejects_impossible_depths():
    policy = tiny_causal_lm("llama", num_layers=2)
    with pytest.raises(ValueError, match="1 <= num_layers <= 2"):
        truncated_drafter(policy, 3)


def test_check_compatible_returns_the_shared_vocabulary():
    assert check_compatible(tiny_causal_lm(vocab_size=64), tiny_causal_lm(vocab_size=64)) == 64
    assert check_compatible(tiny_causal_lm(vocab_size=64), tiny_causal_lm(vocab_size=80), vocab_size=60) == 60
    with pytest.raises(ValueError, match="the tokenizer has 70 tokens"):
        check_compatible(tiny_causal_lm(vocab_size=64), tiny_causal_lm(vocab_size=80), vocab_size=70)


def test_check_tokenizers_names_special_token_mismatch(make_tokenizer):
    a, b = make_tokenizer(["x", "y"]), make_tokenizer(["x", "y"])
    check_tokenizers(a, b)
    b.pad_token = "<unk>"
    with pytest.raises(ValueError, match="pad_token_id is 0 for the policy but 3 for the drafter"):
        check_tokenizers(a, b)
