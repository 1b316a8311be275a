"""The drafter: how it is built from the policy, and the check that it can speak the policy's vocabulary."""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import DrafterConfig


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
        raise ValueError(
            f"A truncated drafter needs 1 <= num_layers <= {total} (the policy's layers), got {num_layers}."
        )
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


def build_drafter(
    policy: PreTrainedModel,
    config: DrafterConfig | None = None,
    model: PreTrainedModel | None = None,
    policy_tokenizer: Any = None,
    drafter_tokenizer: Any = None,
) -> PeftModel:
    """Build the serving drafter: a truncated self-draft of `policy` or a separate model, with LoRA adapters (peft).

    For `kind="model"` pass the model object as `model` or its path as `config.drafter_model_name_or_path`; its vocabulary
    (and, given both, its tokenizer) is checked against the policy's. The drafter is returned in eval mode with only
    its LoRA weights trainable; its base weights are its own copy, never shared with the policy.
    """
    config = config if config is not None else DrafterConfig()
    if config.drafter_kind == "eagle":
        from .eagle import EagleHead, is_head_directory, load_head  # (imports the decoding rooms, which import this)

        # A warm head (scripts/distill_eagle.py) is the base the LoRA adapts: its layer, fusion and draft vocabulary.
        warm = config.drafter_adapter_path
        layout = config.drafter_eagle_layout
        if warm is not None and is_head_directory(warm):
            head = load_head(policy, warm)
            if layout is not None and head.layout != layout:
                raise ValueError(
                    f"The warm head at {warm} has the {head.layout!r} layout, but drafter_eagle_layout={layout!r}. "
                    "Leave drafter_eagle_layout unset to take the warm head's, or point to a head of that layout."
                )
        else:
            head = EagleHead(policy, layout=layout or "eagle3")
        head.eval()
        lora = LoraConfig(
            r=config.drafter_lora_r,
            lora_alpha=config.drafter_lora_alpha,
            lora_dropout=config.drafter_lora_dropout,
            target_modules=list(config.drafter_lora_target_modules),
            modules_to_save=["fc"],  # the fusion layer is new: trained whole, saved beside the adapter
        )
        return get_peft_model(head, lora).eval()
    if config.drafter_kind == "truncated":
        base = truncated_drafter(policy, config.drafter_num_layers)
    else:
        if model is None and config.drafter_model_name_or_path is None:
            raise ValueError(
                "DrafterConfig(drafter_kind='model') needs the drafter: pass model=... or set model_name_or_path."
            )
        base = (
            model
            if model is not None
            else AutoModelForCausalLM.from_pretrained(
                config.drafter_model_name_or_path,
                dtype=policy.dtype,
                trust_remote_code=config.drafter_trust_remote_code,
            )
        )
        base = base.to(policy.device).eval().requires_grad_(False)
        if drafter_tokenizer is None and policy_tokenizer is not None and model is None:
            drafter_tokenizer = AutoTokenizer.from_pretrained(
                config.drafter_model_name_or_path, trust_remote_code=config.drafter_trust_remote_code
            )
        check_compatible(policy, base, policy_tokenizer, drafter_tokenizer)
    lora = LoraConfig(
        r=config.drafter_lora_r,
        lora_alpha=config.drafter_lora_alpha,
        lora_dropout=config.drafter_lora_dropout,
        target_modules=list(config.drafter_lora_target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, lora).eval()


class ReducedVocabDrafter:
    """The drafter with its LM head restricted to `token_ids`: called like the drafter, it returns logits over the full
    vocabulary that are -inf (q = 0) outside the subset. A draft step then skips most of the head's matmul, which
    dominates a small drafter's cost at a 50k-150k vocabulary. The exact acceptance rule stays lossless: a token the
    drafter cannot propose is emitted from the residual whenever the policy wants it.

    Only the head is cut; the decoder (with its LoRA adapters) is the drafter's own, so hot-swapped adapters apply.
    """

    def __init__(self, drafter: Any, token_ids: torch.Tensor, vocab_size: int) -> None:
        decoder, head = decoder_and_head(drafter)
        if type(head) is not torch.nn.Linear:
            raise ValueError(
                f"A reduced draft vocabulary needs a plain Linear LM head, but the drafter's is {type(head).__name__} "
                "(LoRA on lm_head?). Keep ServingConfig.merge_lora on (the merged head is plain), keep lm_head out of the LoRA "
                "targets, or set ServingConfig.draft_vocab_size=0."
            )
        self.drafter, self.decoder, self.config = drafter, decoder, drafter.config
        self.token_ids = token_ids.to(head.weight.device, torch.long)
        self.weight = head.weight.detach()[self.token_ids]
        self.bias = head.bias.detach()[self.token_ids] if head.bias is not None else None
        self.vocab_size = vocab_size

    def __call__(self, *, logits_to_keep: int = 0, **forward: Any) -> CausalLMOutputWithPast:
        hidden = self.decoder(**forward).last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = hidden.new_full((*hidden.shape[:-1], self.vocab_size), -torch.inf)
        # On 2-D rows: CPU bfloat16 `linear` on a 3-D input sliced out of a longer block expands the weight per row
        # (precision.contiguous_head_input).
        flat = torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]), self.weight, self.bias)
        logits[..., self.token_ids] = flat.view(*hidden.shape[:-1], -1)
        return CausalLMOutputWithPast(logits=logits)

    def check(self) -> None:
        """Raise `ValueError` unless the drafter's logits are exactly its head over its decoder's output (no logit
        scaling or soft-capping), compared on a probe input over the subset."""
        if not logits_are_head_over_decoder(self.drafter):
            raise ValueError(
                "This drafter's logits are not its LM head over its decoder's output (logit scaling or soft-capping?), "
                "so a reduced draft vocabulary cannot be used with it. Set ServingConfig.draft_vocab_size=0."
            )


def decoder_and_head(drafter: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The drafter's decoder (embeddings, layers, final norm; LoRA included) and its LM head, peft-wrapped or not."""
    base = drafter.get_base_model() if isinstance(drafter, PeftModel) else drafter
    return base.get_decoder(), base.get_output_embeddings()


def logits_are_head_over_decoder(drafter: Any) -> bool:
    """Whether `drafter(x).logits == head(decoder(x))` on a probe input: false for models that scale or soft-cap
    their logits after the head, which the shortcuts built on the two parts would silently get wrong."""
    decoder, head = decoder_and_head(drafter)
    probe = (torch.arange(3, 7, device=head.weight.device) % drafter.config.vocab_size)[None]
    with torch.no_grad():
        full = drafter(input_ids=probe).logits
        parts = head(decoder(input_ids=probe).last_hidden_state)
    return full.shape == parts.shape and torch.allclose(full.float(), parts.float(), rtol=1e-3, atol=1e-3)


def merged_copy(drafter: PeftModel) -> PreTrainedModel:
    """A plain model that computes what the peft-wrapped `drafter` computes, its LoRA weights merged into the base
    weights (peft's `merge_and_unload`) of a copy of the adapted layers only: every parameter LoRA does not touch
    (embeddings, norms, head) is shared, not copied. Serving it skips the adapters' extra matmuls (a quarter of a small
    drafter's step on a CPU, extra kernel launches on a GPU). Merging from the drafter's pristine base weights on every
    adapter change, rather than merging and unmerging in place, accumulates no rounding (which bf16 would)."""
    adapted = {id(p) for module in drafter.modules() if isinstance(module, BaseTunerLayer) for p in module.parameters()}
    shared = {id(p): p for p in drafter.parameters() if id(p) not in adapted}
    return copy.deepcopy(drafter, memo=shared).merge_and_unload().eval()


def lora_fingerprint(drafter: PeftModel) -> tuple[tuple[int, int], ...]:
    """Changes whenever any LoRA weight of `drafter` is written (in place: torch's version counter; or replaced)."""
    return tuple((p.data_ptr(), p._version) for name, p in drafter.named_parameters() if "lora_" in name)


def frequent_tokens(counts: torch.Tensor, size: int) -> torch.Tensor:
    """The ids of the `size` most frequent tokens in `counts` (a per-id tally), never one that was not seen; sorted."""
    size = min(size, int((counts > 0).sum()))
    return counts.topk(size).indices.sort().values


@dataclass(frozen=True)
class AdapterVersion:
    """Which adapter this is and which policy it was fitted to."""

    adapter_version: int
    policy_version: int


_ADAPTER_FILE = "adapter.safetensors"
_VERSION_FILE = "drafter_version.json"


def adapter_state(drafter: PeftModel) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the drafter's LoRA weights (what the trainer publishes and checkpoints save)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(drafter).items()}


def load_adapter_state(drafter: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Copy LoRA weights into the drafter in place; raises `ValueError` if they do not fit its adapters."""
    result = set_peft_model_state_dict(drafter, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"The adapter does not fit this drafter: unexpected {list(result.unexpected_keys)[:3]}, "
            f"missing {missing[:3]}. Was it saved from a drafter with another DrafterConfig?"
        )


def save_adapter(drafter: PeftModel, path: str | os.PathLike[str], version: AdapterVersion) -> Path:
    """Save the drafter's LoRA weights (safetensors) and versions into directory `path`, atomically: written to a
    temporary directory beside it and renamed into place, so a kill mid-save never leaves a broken adapter."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file(adapter_state(drafter), staging / _ADAPTER_FILE)
        (staging / _VERSION_FILE).write_text(json.dumps(version.__dict__) + "\n")
        previous = path.with_name(path.name + ".previous")
        if path.exists():  # keep the old adapter until the new one is in place
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(path, previous)
        os.replace(staging, path)
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def load_adapter(drafter: PeftModel, path: str | os.PathLike[str]) -> AdapterVersion:
    """Load an adapter saved by `save_adapter` into `drafter` (safetensors only, never a pickle); return its version."""
    path = Path(path)
    previous = path.with_name(path.name + ".previous")
    if not path.exists() and previous.exists():  # a save was killed between its two renames
        path = previous
    if not (path / _ADAPTER_FILE).is_file() or not (path / _VERSION_FILE).is_file():
        raise FileNotFoundError(f"No drafter adapter at {path} (expected {_ADAPTER_FILE} and {_VERSION_FILE}).")
    load_adapter_state(drafter, load_file(path / _ADAPTER_FILE))
    return AdapterVersion(**json.loads((path / _VERSION_FILE).read_text()))
