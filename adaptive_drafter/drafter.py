"""The drafter: how it is built from the policy, and the check that it can speak the policy's vocabulary."""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import PreTrainedModel


def _config(model: Any) -> Any:
    return model.config  # plain and peft-wrapped models both expose the base model's config here


def check_compatible(
    policy: Any,
    drafter: Any,
    policy_tokenizer: Any = None,
    drafter_tokenizer: Any = None,
    vocab_size: int | None = None,
) -> int:
    """Check that the drafter and the policy share a vocabulary and return its size.

    The drafter's token ids are fed to the policy as they are, so both must use the same tokenizer. Embedding
    matrices padded to different sizes are fine when `vocab_size` (the tokenizer's size) is given: logits are sliced to
    it. With tokenizers, their vocabularies, special tokens and a round trip of sample text must agree.
    Raises `ValueError` naming the mismatch.
    """
    p_vocab, d_vocab = _config(policy).vocab_size, _config(drafter).vocab_size
    if policy_tokenizer is not None and drafter_tokenizer is not None:
        check_tokenizers(policy_tokenizer, drafter_tokenizer)
    if vocab_size is None and policy_tokenizer is not None:
        vocab_size = len(policy_tokenizer)
    if vocab_size is None:
        if p_vocab != d_vocab:
            raise ValueError(
                f"Drafter/policy vocabulary mismatch: the policy has {p_vocab} token embeddings, the drafter "
                f"{d_vocab}. The drafter must share the policy's tokenizer. If only the embedding matrices are padded "
                "differently, pass the tokenizer's size as SpecConfig(vocab_size=len(tokenizer))."
            )
        return p_vocab
    if vocab_size > min(p_vocab, d_vocab):
        raise ValueError(
            f"Drafter/policy vocabulary mismatch: the tokenizer has {vocab_size} tokens but the policy has "
            f"{p_vocab} token embeddings and the drafter {d_vocab}; both need at least {vocab_size}."
        )
    return vocab_size


_ROUND_TRIP_TEXT = "Speculative decoding: 12 + 30 = 42, naïve café ✓\n\tdone."


def check_tokenizers(policy_tokenizer: Any, drafter_tokenizer: Any) -> None:
    """Raise `ValueError` unless two tokenizers have the same vocabulary, special tokens and encoding."""
    if len(policy_tokenizer) != len(drafter_tokenizer):
        raise ValueError(
            f"Tokenizer mismatch: the policy's tokenizer has {len(policy_tokenizer)} tokens, the drafter's "
            f"{len(drafter_tokenizer)}. Use a drafter trained with the policy's tokenizer."
        )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        p_id, d_id = getattr(policy_tokenizer, name, None), getattr(drafter_tokenizer, name, None)
        if p_id != d_id:
            raise ValueError(f"Tokenizer mismatch: {name} is {p_id} for the policy but {d_id} for the drafter.")
    p_vocab, d_vocab = policy_tokenizer.get_vocab(), drafter_tokenizer.get_vocab()
    if p_vocab != d_vocab:
        token = next(t for t in sorted(p_vocab) if p_vocab.get(t) != d_vocab.get(t))
        raise ValueError(
            f"Tokenizer mismatch: token {token!r} has id {p_vocab[token]} for the policy but "
            f"{d_vocab.get(token)} for the drafter. Use a drafter trained with the policy's tokenizer."
        )
    p_ids = policy_tokenizer.encode(_ROUND_TRIP_TEXT, add_special_tokens=False)
    d_ids = drafter_tokenizer.encode(_ROUND_TRIP_TEXT, add_special_tokens=False)
    if p_ids != d_ids:
        raise ValueError(
            f"Tokenizer mismatch: the two tokenizers encode {_ROUND_TRIP_TEXT!r} differently "
            f"(policy {p_ids[:8]}..., drafter {d_ids[:8]}...)."
        )


def truncated_drafter(policy: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """A self-draft: a copy of the policy's embeddings, its first `num_layers` decoder layers, final norm and LM head.

    The copy owns its weights (nothing is shared with the policy), so the policy can train while the drafter serves.
    """
    total = policy.config.num_hidden_layers
    if not 1 <= num_layers <= total:
        raise ValueError(f"A truncated drafter needs 1 <= num_layers <= {total} (the policy's layers), got {num_layers}.")
    config = copy.deepcopy(policy.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:num_layers]
    drafter = type(policy)(config).to(device=policy.device, dtype=policy.dtype)
    missing, unexpected = drafter.load_state_dict(policy.state_dict(), strict=False)
    if missing:
        raise ValueError(f"Cannot build a truncated drafter: weights {missing[:4]} were not found in the policy.")
    if drafter.config.tie_word_embeddings:
        drafter.tie_weights()
    return drafter.eval().requires_grad_(False)


def noised_copy(model: PreTrainedModel, std: float, seed: int = 0) -> PreTrainedModel:
    """A copy of `model` with Gaussian noise of relative size `std` added to every weight: a drafter that agrees with
    the model often but not always. Used by tests and benchmarks to control agreement."""
    drafter = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in drafter.parameters():
            noise = torch.randn(param.shape, generator=gen).to(param.device, param.dtype)
            param.add_(noise * std * param.float().std().clamp_min(1e-6).to(param.dtype))
    return drafter
