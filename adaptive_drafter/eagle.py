"""A drafter that reads the policy's hidden states: an EAGLE-style head (Li et al. 2024, arXiv 2401.15077).

The head predicts the token after next from the policy's own feature at a position and the token that follows it:

    g_s = layer(fc([f_s, embed(x_{s+1})]))        q(x_{s+2}) = softmax(lm_head(norm(g_s)))

where f_s is the output of the policy's last decoder layer at position s (before the final norm), `layer` one decoder
layer initialised from the policy's last one, and `embed`, `norm`, `lm_head` the policy's own, frozen and shared (not
copied: the head adds fc and one layer, ~3.9M parameters on SmolLM2-135M). Drafting chains the head on its own output:
the k-th draft's feature is the head's g from the draft before it (EAGLE's feature recurrence), so it is trained
unrolled on its own outputs (`EagleHead.unroll`, EAGLE-3's training-time test).

A draft vocabulary (`draft_ids`, EAGLE-3's reduced vocabulary, fixed when the head is made and saved with it) restricts
q to the N tokens most frequent in the head's training data: the LM head's matmul over the policy's whole vocabulary,
most of a draft step's and a training step's cost (28M of 33M multiply-adds per token on SmolLM2's 49k tokens), shrinks
to N rows. Lossless still: a token outside it is emitted from the residual whenever the policy wants it.

The policy's modules are never called, only their weights read, detached: the head's loss never writes a gradient into
the policy, which may be training in the same process, and the background trainer's thread never touches the modules
the policy's own forward is using (swapping their weights for detached ones, as `torch.func.functional_call` does, would
race with it).

The features are free: the engine's verify pass computes them at every position it keeps (forward hooks on the last
decoder layer, or on several whose outputs are concatenated for EAGLE-3's fused features: `feature_layers`), and
`EagleDrafts` keeps the head's own KV cache in step with them: after each verify, the head's cached draft slots
(computed from its own approximate features) become holes and the true (feature, next token) pairs of every kept
position are queued for its next catch-up forward. Lossless like every source: drafts are
sampled from q (greedy: its argmax) and verified by the policy under the acceptance rule.

Two layouts (`layout`), both lossless and trained the same way:
- "eagle": fc reads [features, embed(x_{s+1})] and its output is the layer's residual stream and attention input;
  a fed-back g takes the top feature slot of fc's input.
- "eagle3": vLLM's EAGLE-3 draft model (`Eagle3LlamaForCausalLM`): fc (no bias) reads the features only; the layer's
  q/k/v read [input_layernorm(embed(x_{s+1})), hidden_norm(x)] (2H wide), its residual stream is x = fc(features);
  a fed-back g skips fc. `export_eagle3` writes it as vLLM's checkpoint, so vLLM can serve it
  (`speculative_config={"method": "eagle3"}`). It also drafts better here (docs/benchmarks.md): the embedding reaches
  attention through its own norm instead of being mixed into the feature.

Supported policies: Llama-style decoder layers (`self_attn.{q,k,v,o}_proj`, `input_layernorm`,
`post_attention_layernorm`, `mlp`, rotary positions) such as Llama, Qwen2 and SmolLM; others are refused.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from safetensors.torch import load_file, save_file
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .drafts import Drafts, Verified, draw
from .kv import right_aligned
from .metrics import SpecStats
from .sampling import SamplingParams


def _decoder(policy: Any) -> Any:
    """The policy's decoder stack (embeddings, layers, final norm, rotary embedding), through peft wrappers."""
    model = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if decoder is None or not all(hasattr(decoder, name) for name in needed):
        raise ValueError(
            f"An EAGLE-style head needs a Llama-style decoder ({', '.join(needed)}); {type(model).__name__} has none. "
            "Use drafter_kind='truncated' for this policy."
        )
    return decoder


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` for a Llama-style RMSNorm, computed from its detached weight (see the module docstring)."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return norm.weight.detach() * normed.to(x.dtype)


def _check_shared(embed: nn.Module, norm: nn.Module) -> None:
    """Refuse a policy whose embedding or final norm computes something else than what the head computes from their
    weights (a scaled embedding, a (1 + w) norm): the head's drafts would silently read other features."""
    probe = torch.arange(4, device=embed.weight.device)[None] % embed.weight.shape[0]
    with torch.no_grad():
        same_embed = torch.equal(embed(probe), F.embedding(probe, embed.weight, embed.padding_idx))
        x = torch.randn(2, norm.weight.shape[-1], generator=torch.Generator().manual_seed(0)).to(norm.weight)
        same_norm = torch.allclose(norm(x).float(), _rms_norm(norm, x).float(), rtol=1e-2, atol=1e-2)
    if not (isinstance(embed, nn.Embedding) and same_embed and same_norm):
        raise ValueError(
            f"An EAGLE-style head reads the policy's embedding and final norm as a plain embedding and an RMSNorm; this "
            f"policy's ({type(embed).__name__}, {type(norm).__name__}) compute something else. Use "
            "drafter_kind='truncated' for this policy."
        )


class _Shared(tuple):
    """The policy's modules a head uses but does not own. Copies of the head (merged, cast) share them: copying them
    would duplicate the policy's embedding and LM head in every serving copy."""

    def __deepcopy__(self, memo: dict[int, Any]) -> _Shared:
        return self


def eagle_head(model: Any) -> EagleHead | None:
    """The `EagleHead` inside `model` (itself, or under a peft wrapper whose LoRA layers are injected in it), or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base if isinstance(base, EagleHead) else None


def feature_layer(policy: Any) -> nn.Module:
    """The module whose output is the feature the head reads: the policy's last decoder layer (its output is the
    residual stream before the final norm; HF's `hidden_states[-1]` is already normed in transformers 5)."""
    return _decoder(policy).layers[-1]


def layer_ids(policy: Any, layers: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """`layers` (decoder layer indices, negative from the end) as sorted distinct non-negative indices: the order in
    which the policy's forward runs them, so the order of the captured features."""
    count = len(_decoder(policy).layers)
    ids = sorted({i % count for i in layers if -count <= i < count})
    if not ids or len(ids) != len(layers):
        raise ValueError(f"feature layers {tuple(layers)} must be distinct indices into the policy's {count} layers.")
    return tuple(ids)


def feature_layers(policy: Any, layers: tuple[int, ...] | list[int] = (-1,)) -> list[nn.Module]:
    """The decoder layers whose outputs (concatenated in layer order) are the features: by default the last one;
    EAGLE-3 fuses a low, a middle and a high layer's."""
    decoder = _decoder(policy)
    return [decoder.layers[i] for i in layer_ids(policy, layers)]


LAYOUTS = ("eagle", "eagle3")


class EagleHead(nn.Module):
    """fc over [policy feature, next token's embedding] → one decoder layer → the policy's final norm and LM head
    (`layout="eagle"`), or vLLM's EAGLE-3 arrangement of the same parts (`layout="eagle3"`, the module docstring).

    `feature_layers` picks the policy layers whose outputs are the feature: the last one (EAGLE-1), or several fused
    by `fc` (EAGLE-3's low/mid/high: fc reads [f_low, f_mid, f_high, embedding], (n + 1)·H → H). A fed-back feature
    (the head's own output g, drafting from the second draft on) takes the last layer's slot, the other slots zero;
    `fc` starts as the identity on the last slot, so a fused head starts as the last-layer head.

    Trainable: `fc` and `layer`. The policy's embedding, final norm, LM head and rotary embedding are used, not owned
    (`bind` points the head at another copy of the policy, e.g. the rollout copy in another precision), and never
    trained. `draft_ids` (token ids, None: the whole vocabulary) is the head's draft vocabulary: `logits` are over
    those tokens only, `full_logits` over the policy's vocabulary with q = 0 outside them.
    """

    def __init__(
        self,
        policy: Any,
        feature_layers: tuple[int, ...] | list[int] = (-1,),
        draft_ids: torch.Tensor | list[int] | None = None,
        layout: str = "eagle3",
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"Unknown head layout {layout!r}: choose one of {', '.join(LAYOUTS)}.")
        decoder, config = _decoder(policy), policy.config
        layer = decoder.layers[-1]
        attention = getattr(layer, "self_attn", None)
        parts = ("q_proj", "k_proj", "v_proj", "o_proj")
        if attention is None or not all(hasattr(attention, p) for p in parts) or hasattr(attention, "q_norm"):
            raise ValueError(
                f"An EAGLE-style head copies a Llama-style decoder layer (q/k/v/o projections, no q/k norms); "
                f"{type(layer).__name__} is not one. Use drafter_kind='truncated' for this policy."
            )
        hidden = config.hidden_size
        self.config = config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // self.num_heads
        self.feature_layers = layer_ids(policy, feature_layers)
        self.slots = len(self.feature_layers)
        self.feature_size = self.slots * hidden
        self.layout = layout
        eagle3 = layout == "eagle3"
        # eagle: fc reads the features and the embedding; eagle3: the features only (the embedding enters attention)
        self.fc = nn.Linear(self.feature_size + (0 if eagle3 else hidden), hidden, bias=not eagle3)
        with torch.no_grad():  # start as "the top feature layer's successor applied again": identity on its slot
            self.fc.weight[:, : self.feature_size].zero_()
            self.fc.weight[:, self.feature_size - hidden : self.feature_size].copy_(torch.eye(hidden))
            if not eagle3:
                self.fc.weight[:, self.feature_size :].mul_(0.1)
                self.fc.bias.zero_()
        self.layer = copy.deepcopy(layer)
        self.hidden_norm = None
        if eagle3:  # q/k/v read [input_layernorm(embedding), hidden_norm(x)]: 2H wide, the embedding's half at 0.1
            for name in ("q_proj", "k_proj", "v_proj"):
                old = getattr(self.layer.self_attn, name)
                new = nn.Linear(2 * hidden, old.out_features, bias=old.bias is not None).to(old.weight)
                with torch.no_grad():
                    new.weight.copy_(torch.cat([0.1 * old.weight, old.weight], 1))
                    if old.bias is not None:
                        new.bias.copy_(old.bias)
                setattr(self.layer.self_attn, name, new)
            self.hidden_norm = copy.deepcopy(self.layer.input_layernorm)
        if draft_ids is not None:
            ids = torch.as_tensor(draft_ids, dtype=torch.long).unique()  # sorted: the draft index order
            if len(ids) == 0 or ids.min() < 0 or ids.max() >= config.vocab_size:
                raise ValueError(f"draft_ids must be a non-empty set of token ids in [0, {config.vocab_size}).")
            draft_ids = ids.to(self.fc.weight.device)
        self.register_buffer("draft_ids", draft_ids)  # saved with the head: it was trained over these tokens
        dtype = next(layer.parameters()).dtype
        self.to(dtype)
        self.requires_grad_(True)
        self.bind(policy)

    def bind(self, policy: Any) -> EagleHead:
        """Use `policy`'s embedding, final norm, LM head and rotary embedding (kept out of the head's parameters)."""
        decoder = _decoder(policy)
        model = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        _check_shared(decoder.embed_tokens, decoder.norm)
        object.__setattr__(self, "_shared", _Shared((decoder.embed_tokens, decoder.norm, model.get_output_embeddings(),
                                                     decoder.rotary_emb)))  # fmt: skip
        object.__setattr__(self, "_head_rows", None)  # (the LM head's weight, its version, its draft-vocabulary rows)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    @property
    def draft_vocab_size(self) -> int | None:
        """The size of the head's draft vocabulary, None when it drafts over the policy's whole vocabulary."""
        return None if self.draft_ids is None else len(self.draft_ids)

    def _rows(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head's weight and bias over the draft vocabulary, detached; the slice is cached until the policy's
        head is written (an optimizer step, a rollout-copy sync), so a draft step does not copy N rows each time."""
        head = self._shared[2]
        weight, bias = head.weight.detach(), None if head.bias is None else head.bias.detach()
        if self.draft_ids is None:
            return weight, bias
        key = (weight.data_ptr(), head.weight._version)
        if self._head_rows is None or self._head_rows[0] != key:
            ids = self.draft_ids.to(weight.device)
            rows = (weight[ids], None if bias is None else bias[ids])
            object.__setattr__(self, "_head_rows", (key, rows))
        return self._head_rows[1]

    def logits(self, g: torch.Tensor) -> torch.Tensor:
        """Logits over the head's draft vocabulary (`draft_ids`; the policy's whole vocabulary without one) from head
        outputs `g [..., H]`."""
        weight, bias = self._rows()
        return F.linear(_rms_norm(self._shared[1], g.to(weight.dtype)), weight, bias)

    def full_logits(self, g: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Logits over the first `vocab_size` token ids, -inf (q = 0) outside the draft vocabulary."""
        logits = self.logits(g)
        if self.draft_ids is None:
            return logits[..., :vocab_size]
        full = logits.new_full((*logits.shape[:-1], vocab_size), -torch.inf)
        return full.index_copy_(-1, self.draft_ids.to(logits.device), logits)

    def _inputs(
        self, features: torch.Tensor, tokens: torch.Tensor, fed_back: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's residual stream and its attention input at the pairs (features, tokens). `fed_back`: the
        features are the head's own outputs g (H wide), not the policy's."""
        embed = self._shared[0]
        embedded = F.embedding(tokens, embed.weight.detach(), embed.padding_idx).to(self.dtype)
        features = features.to(self.dtype)
        if self.layout == "eagle3":  # vLLM's Eagle3LlamaForCausalLM: a fed-back g skips fc
            x = features if fed_back else self.fc(features)
            return x, torch.cat([self.layer.input_layernorm(embedded), self.hidden_norm(x)], -1)
        if fed_back:  # in the top layer's slot, the others zero
            features = F.pad(features, (self.feature_size - features.shape[-1], 0))
        x = self.fc(torch.cat([features, embedded], -1))
        return x, self.layer.input_layernorm(x)

    def _layer(
        self, x: torch.Tensor, h: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor | None,
        values: torch.Tensor | None, mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """The decoder layer over residual `x [B, T, H]` with attention input `h` at `positions`, attending to
        `keys`/`values` (earlier slots, may be None) and its own under `mask [B, T, S + T]`. Returns the output and the
        new keys and values."""
        layer, attention = self.layer, self.layer.self_attn
        batch, length, _ = x.shape
        q = attention.q_proj(h).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = attention.k_proj(h).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = attention.v_proj(h).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self._shared[3](x, positions)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        all_k = k if keys is None else torch.cat([keys, k], 2)
        all_v = v if values is None else torch.cat([values, v], 2)
        out = F.scaled_dot_product_attention(q, all_k, all_v, attn_mask=mask[:, None], enable_gqa=True)
        x = x + attention.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
        return x + layer.mlp(layer.post_attention_layernorm(x)), k, v

    def step(
        self,
        cache: HeadCache,
        features: torch.Tensor,
        tokens: torch.Tensor,
        valid: torch.Tensor,
        fed_back: bool = False,
    ) -> torch.Tensor:
        """Append the pairs (features[:, t], tokens[:, t]) to the head's `cache` (invalid ones become holes) and return
        the head's outputs g at them `[B, T, H]`. A pair's position is the count of valid pairs before it; `fed_back`:
        the features are the head's own outputs."""
        positions = (cache.valid.sum(1, keepdim=True) + valid.cumsum(1) - 1).clamp_min(0)
        slots = cache.valid.shape[1]
        length = tokens.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=tokens.device).tril()
        # Every query sees itself (an invalid pair's output is never read, but must not be NaN), the valid earlier
        # slots, and the valid pairs before it in this block.
        mask = torch.cat([cache.valid[:, None, :].expand(-1, length, -1), causal & valid[:, None, :]], 2)
        mask[:, :, slots:] |= torch.eye(length, dtype=torch.bool, device=tokens.device)
        g, k, v = self._layer(*self._inputs(features, tokens, fed_back), positions, cache.keys, cache.values, mask)
        cache.append(k, v, valid)
        return g

    def unroll(self, features: torch.Tensor, next_tokens: torch.Tensor, depth: int) -> list[torch.Tensor]:
        """Training-time test over right-padded sequences: `features [B, T, H]` the policy's f_s, `next_tokens [B, T]`
        x_{s+1}. Returns the head's outputs of passes 1..depth; pass d at position s is the d-th step of the draft
        chain started at s - d + 1 (its input feature: pass d-1's output at s - 1), attending as it would when drafting
        to true-feature keys before the chain's start and to the chain's own earlier steps."""
        batch, length, _ = features.shape
        device = features.device
        positions = torch.arange(length, device=device)[None].expand(batch, -1)
        tri = lambda offset: torch.ones(length, length, dtype=torch.bool, device=device).tril(offset)  # noqa: E731
        keys = values = None
        outputs, inputs = [], features
        for d in range(1, depth + 1):
            # Keys: pass 1 at positions <= s - (d - 1); pass i (2..d) exactly at s - (d - i).
            blocks = [tri(-(d - 1))] + [tri(-(d - i)) & ~tri(-(d - i) - 1) for i in range(2, d + 1)]
            mask = torch.cat(blocks, 1)[None].expand(batch, -1, -1)
            g, k, v = self._layer(*self._inputs(inputs, next_tokens, d > 1), positions, keys, values, mask)
            keys = k if keys is None else torch.cat([keys, k], 2)
            values = v if values is None else torch.cat([values, v], 2)
            outputs.append(g)
            inputs = torch.cat([torch.zeros_like(g[:, :1]), g[:, :-1]], 1)
        return outputs


@dataclass
class HeadCache:
    """The head's keys and values over slots, and which slots hold a pair of the row (holes: fed-back draft slots)."""

    keys: torch.Tensor | None
    values: torch.Tensor | None
    valid: torch.Tensor  # [B, S] bool

    @classmethod
    def empty(cls, batch: int, device: torch.device) -> HeadCache:
        return cls(None, None, torch.zeros(batch, 0, dtype=torch.bool, device=device))

    def append(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        self.keys = keys if self.keys is None else torch.cat([self.keys, keys], 2)
        self.values = values if self.values is None else torch.cat([self.values, values], 2)
        self.valid = torch.cat([self.valid, valid], 1)

    def select(self, rows: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys[rows], self.values[rows]
        self.valid = self.valid[rows]

    def compact(self) -> None:
        """Gather each row's valid slots to the right once holes are most of the cache (positions are per pair)."""
        slots = self.valid.shape[1]
        width = int(self.valid.sum(1).max()) if slots else 0
        if self.keys is None or 2 * width > slots:
            return
        order = right_aligned(self.valid, width)
        index = order[:, None, :, None].expand(-1, self.keys.shape[1], -1, self.keys.shape[-1])
        self.keys, self.values = self.keys.gather(2, index), self.values.gather(2, index)
        self.valid = self.valid.gather(1, order)


class EagleDrafts:
    """The EAGLE-style head as a draft source (`drafts.DraftSource`): it reads the policy's features from each step's
    `Verified.features` (the engine captures them because `needs_features` is set)."""

    needs_features = True

    def __init__(
        self, head: EagleHead, params: SamplingParams, vocab_size: int, stats: SpecStats,
        generator: torch.Generator | None = None,
    ) -> None:  # fmt: skip
        self.head, self.params, self.vocab_size, self.stats, self.generator = head, params, vocab_size, stats, generator
        self.nonfinite = torch.tensor(False)
        self.drafted = 0

    def begin(self, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        batch, device = input_ids.shape[0], input_ids.device
        self.cache = HeadCache.empty(batch, device)
        self.features = torch.zeros(batch, 0, self.head.feature_size, dtype=self.head.dtype, device=device)
        self.tokens = input_ids[:, :0]
        self.valid = mask[:, :0].bool()

    def steady(self, k: int) -> bool:
        return self.tokens.shape[1] <= max(2, k + 1)

    def propose(self, rows: torch.Tensor, k: int) -> Drafts:
        g = self.head.step(self.cache, self.features, self.tokens, self.valid)[:, -1:]
        self.features, self.tokens, self.valid = self.features[:, :0], self.tokens[:, :0], self.valid[:, :0]
        drafts, dists = [], []
        for i in range(k):
            token, q, bad = draw(self.head.full_logits(g[:, -1], self.vocab_size), self.params, self.generator)
            self.nonfinite = self.nonfinite | bad
            drafts.append(token)
            if q is not None:
                dists.append(q)
            if i < k - 1:  # the next draft reads the head's own output as the feature of this position
                one = token[:, None]
                g = self.head.step(self.cache, g, one, torch.ones_like(one, dtype=torch.bool), fed_back=True)
        self.stats.drafter_forwards += k
        self.drafted = k
        return Drafts(torch.stack(drafts, 1), torch.where(rows, k, 0), torch.stack(dists, 1) if dists else None)

    def observe(self, step: Verified, mine: torch.Tensor) -> None:
        k, self.drafted = self.drafted, 0
        if k > 1:  # the fed-back slots held the head's own features: the policy's true ones replace them
            self.cache.valid[:, -(k - 1) :] = False
        if step.features is None:
            raise RuntimeError("EagleDrafts needs the policy's features of every step; the engine captured none.")
        # Queue the true pair (f_j, next token after j) of every position the policy kept, right-aligned.
        kept = step.kept
        width = int(kept.sum(1).max())
        order = right_aligned(kept, width)
        features = step.features.gather(1, order[..., None].expand(-1, -1, step.features.shape[-1]))
        self.features = torch.cat([self.features, features.to(self.features.dtype)], 1)
        self.tokens = torch.cat([self.tokens, step.next_tokens.gather(1, order)], 1)
        self.valid = torch.cat([self.valid, kept.gather(1, order)], 1)

    def select(self, keep: torch.Tensor) -> None:
        self.cache.select(keep)
        self.features, self.tokens, self.valid = self.features[keep], self.tokens[keep], self.valid[keep]

    def compact(self) -> None:
        self.cache.compact()

    def end(self) -> None:
        self.cache = None  # type: ignore[assignment]


HEAD_FILE, HEAD_META = "eagle_head.safetensors", "eagle_head.json"


def save_head(head: EagleHead, directory: str | os.PathLike[str], **metadata: Any) -> Path:
    """Save the head's own weights (fc and its layer; the policy's shared parts are not copied) and `metadata` (how it
    was made) into `directory`, written to a temporary name first so a crash never leaves a half-written head."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in head.state_dict().items()}
    save_file(state, path / (HEAD_FILE + ".tmp"))
    os.replace(path / (HEAD_FILE + ".tmp"), path / HEAD_FILE)
    shape = {"hidden_size": head.config.hidden_size, "vocab_size": head.config.vocab_size,
             "feature_layers": list(head.feature_layers), "draft_vocab_size": head.draft_vocab_size,
             "layout": head.layout}  # fmt: skip
    (path / HEAD_META).write_text(json.dumps({"kind": "eagle", **shape, **metadata}, indent=1))
    return path


def is_head_directory(directory: str | os.PathLike[str]) -> bool:
    """Whether `directory` holds a head written by `save_head` (rather than a LoRA adapter)."""
    return (Path(directory) / HEAD_FILE).is_file()


def load_head(policy: Any, directory: str | os.PathLike[str]) -> EagleHead:
    """A head for `policy` with the weights saved in `directory` (in the policy's dtype); a head made for another
    policy (other shapes or layer names) is refused with what to do."""
    path = Path(directory) / HEAD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No EAGLE head at {path}: point to a directory written by save_head.")
    meta_path = Path(directory) / HEAD_META
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    config, layers = policy.config, tuple(meta.get("feature_layers", (-1,)))
    made_for = (meta.get("hidden_size", config.hidden_size), meta.get("vocab_size", config.vocab_size))
    if made_for != (config.hidden_size, config.vocab_size) or max(layers) >= len(_decoder(policy).layers):
        raise ValueError(
            f"The EAGLE head at {directory} was made for another policy (hidden size {made_for[0]}, vocabulary "
            f"{made_for[1]}, reading layers {list(layers)}; this policy: {config.hidden_size}, {config.vocab_size}, "
            f"{len(_decoder(policy).layers)} layers). Distill a head for this policy (scripts/distill_eagle.py) or "
            "start from a fresh one."
        )
    state = load_file(path)
    head = EagleHead(policy, layers, state.get("draft_ids"), meta.get("layout", "eagle"))
    own = head.state_dict()
    wrong = sorted(n for n in set(own) | set(state) if n not in own or n not in state or own[n].shape != state[n].shape)
    if wrong:
        raise ValueError(
            f"The EAGLE head at {directory} was made for another policy ({len(wrong)} weights differ, e.g. "
            f"{wrong[0]}). Distill a head for this policy (scripts/distill_eagle.py) or start from a fresh one."
        )
    head.load_state_dict({n: t if n == "draft_ids" else t.to(head.dtype) for n, t in state.items()})
    head.loaded_from = str(Path(directory).resolve())  # what a warm start checks it was built from
    return head


# vLLM's EAGLE-3 draft checkpoint (vllm/model_executor/models/llama_eagle3.py): what `export_eagle3` writes.
EAGLE3_ARCHITECTURE = "LlamaForCausalLMEagle3"


def eagle3_checkpoint(head: EagleHead) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and the weights of `head` as vLLM's EAGLE-3 draft model loads them (`speculative_config={"method":
    "eagle3", "model": DIR}`): `fc`, the layer as `midlayer.*`, `midlayer.hidden_norm`, and copies of what the head
    shares with the policy now (its final norm as `norm`, its LM head's draft-vocabulary rows as `lm_head`, with `d2t`
    mapping draft ids to token ids). vLLM's `eagle_aux_hidden_state_layer_ids` count the residual stream entering a
    layer, so the output of the head's feature layer i is vLLM's i + 1.

    `head` must be a plain head in the "eagle3" layout with its LoRA merged (`drafter.merged_copy`)."""
    if not isinstance(head, EagleHead) or head.layout != "eagle3":
        raise ValueError(
            "vLLM serves heads in the 'eagle3' layout only (its Eagle3LlamaForCausalLM); this one is "
            f"{getattr(head, 'layout', type(head).__name__)!r}. Distill one with scripts/distill_eagle.py --layout eagle3 "
            "or set DrafterConfig.drafter_eagle_layout='eagle3'."
        )
    modules = [head.fc, *head.layer.self_attn.children(), *head.layer.mlp.children()]
    unmerged = [type(m).__name__ for m in modules if isinstance(m, nn.Module) and type(m).__module__.startswith("peft")]
    if unmerged:
        raise ValueError(
            f"The head still has LoRA layers ({unmerged[0]}): export its merged copy (drafter.merged_copy)."
        )
    weight, bias = head._rows()
    if bias is not None:
        raise ValueError("vLLM's EAGLE-3 LM head has no bias; this policy's LM head has one, so it cannot be exported.")
    norm = head._shared[1]
    weights = {"fc.weight": head.fc.weight}
    weights.update({f"midlayer.{name}": tensor for name, tensor in head.layer.state_dict().items()})
    weights["midlayer.hidden_norm.weight"] = head.hidden_norm.weight
    weights["norm.weight"] = norm.weight
    weights["lm_head.weight"] = weight
    size = head.draft_vocab_size or head.config.vocab_size
    if head.draft_ids is not None:
        weights["d2t"] = head.draft_ids.cpu() - torch.arange(size)
    weights = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in weights.items()}
    config = {key: value for key, value in head.config.to_dict().items() if key not in ("layer_types", "auto_map")}
    ids = [i + 1 for i in head.feature_layers]
    config.update(
        architectures=[EAGLE3_ARCHITECTURE], model_type="llama", num_hidden_layers=1, draft_vocab_size=size,
        eagle_aux_hidden_state_layer_ids=ids, num_aux_hidden_states=len(ids),
        target_hidden_size=head.config.hidden_size, tie_word_embeddings=False,
        attention_bias=head.layer.self_attn.q_proj.bias is not None,
        dtype=str(head.dtype).removeprefix("torch."),
    )  # fmt: skip
    return config, weights


def export_eagle3(head: EagleHead, directory: str | os.PathLike[str]) -> Path:
    """Write `head` as a vLLM EAGLE-3 draft checkpoint (`eagle3_checkpoint`) into `directory` (config.json and
    model.safetensors, each written to a temporary name first). Returns the directory."""
    config, weights = eagle3_checkpoint(head)
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    save_file(weights, path / "model.safetensors.tmp", metadata={"format": "pt"})
    os.replace(path / "model.safetensors.tmp", path / "model.safetensors")
    (path / "config.json.tmp").write_text(json.dumps(config, indent=1))
    os.replace(path / "config.json.tmp", path / "config.json")
    return path
