"""Tiny random causal LMs built from configs: for the tests and the quick benchmarks (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def tiny_causal_lm(
    arch: str = "llama",
    vocab_size: int = 256,
    hidden_size: int = 32,
    num_layers: int = 2,
    max_positions: int = 1024,
    seed: int = 0,
    logit_scale: float = 1.0,
    **overrides,
) -> PreTrainedModel:
    """A randomly initialised model of the given architecture, small enough for a 2-core CPU.

    `logit_scale` multiplies the LM head: larger values give peakier next-token distributions (random tiny models are
    otherwise close to uniform, which makes agreement between two of them meaninglessly low).
    """
    config_cls, model_cls = ARCHITECTURES[arch]
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch == "qwen3":
        kwargs["head_dim"] = hidden_size // 4
    if arch == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(logit_scale)
    return model.eval()


def left_padded_prompts(
    batch: int, min_len: int, max_len: int, vocab_size: int, pad_id: int = 0, seed: int = 0, low: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of mixed lengths in [min_len, max_len], left-padded: `(input_ids, attention_mask)`.
    Token ids start at `low` so prompts contain no special tokens."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=gen)
    width = int(lengths.max())
    ids = torch.randint(low, vocab_size, (batch, width), generator=gen)
    mask = torch.arange(width)[None] >= (width - lengths)[:, None]
    return ids.masked_fill(~mask, pad_id), mask.long()


def dampen_layers(model: PreTrainedModel, start: int, scale: float) -> PreTrainedModel:
    """Scale the residual-branch outputs (attention `o_proj`, MLP `down_proj`) of decoder layers `start..` by `scale`,
    in place. With a small scale the later layers barely change the residual stream, so a truncated drafter made of
    the first `start` layers agrees with the model often while costing only `start / L` of its layers: a cheap drafter
    with controlled agreement, for benchmarks of realistic shape without trained weights."""
    with torch.no_grad():
        for layer in model.model.layers[start:]:
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)
    return model
