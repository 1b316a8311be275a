"""Rollouts in the precision the hardware is fast at: a serving copy of the policy in that precision, synced from the
training weights after every optimizer step, while training keeps its own precision.

Speculation pays when verifying k drafts costs about one decode step. In float32 on a CPU a (k+1)-token forward costs
1.7-2x a 1-token one at batch 1; in bfloat16, on a CPU with AVX512-BF16 or AMX (or a CUDA GPU from Ampere on), the
verify of 5 tokens costs about 1.1 decode steps (docs/benchmarks.md). `ServingConfig.rollout_dtype` picks the precision:

* `auto` (default): bfloat16 where the policy trains in float32 and the hardware computes bfloat16 fast
  (`fast_bf16`), else the policy's own dtype (no copy at all).
* `float32` / `bfloat16`: that precision, whatever the hardware.

    copy = RolloutCopy.build(policy, resolve_rollout_dtype("auto", policy))
    ...                                        # an optimizer step moves `policy`
    copy.sync(policy)                          # copies the changed tensors into the copy, in place
    engine = SpeculativeEngine(copy.model, drafter, config)

With the exact acceptance rule the completions follow the policy's distribution *as the rollout copy computes it*:
samples and their logprobs come from the bfloat16 weights, not the float32 ones the trainer's forward uses
(README.md, "Rollout precision", says what that means for the RL loss).
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ROLLOUT_DTYPES

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# x86 CPU flags under which oneDNN runs bfloat16 matrix products natively (not emulated through float32).
_FAST_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """The CPU's flags that give fast bfloat16 matrix products (`avx512_bf16`, `amx_bf16`), read from `cpuinfo`
    (Linux); empty where there are none or the file is missing (other systems: float32)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return tuple(flag for flag in _FAST_BF16_CPU_FLAGS if flag in flags)


def fast_bf16(device: torch.device | str) -> tuple[bool, str]:
    """Whether `device` computes bfloat16 faster than float32, and the hardware evidence, in words.

    CUDA: compute capability 8.0 or more (bfloat16 tensor cores; older GPUs emulate it). ROCm: torch's own check without
    emulation. CPU: the AVX512-BF16 or AMX-BF16 flags (without them PyTorch converts to float32 and back: slower than
    float32). Anything else: no."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        if torch.version.hip is not None:
            supported = torch.cuda.is_bf16_supported(including_emulation=False)
            return supported, f"ROCm GPU {'with' if supported else 'without'} native bfloat16"
        major, minor = torch.cuda.get_device_capability(device)
        return major >= 8, f"CUDA GPU of compute capability {major}.{minor}"
    if device.type == "cpu":
        flags = cpu_bf16_flags()
        if flags:
            return True, f"CPU with {' and '.join(flag.upper().replace('_', '-') for flag in flags)}"
        return False, "CPU without AVX512-BF16 or AMX-BF16"
    return False, f"{device.type} device (bfloat16 not known to be fast there)"


@dataclass(frozen=True)
class RolloutPrecision:
    """The precision rollouts run in and why (`resolve_rollout_dtype`)."""

    dtype: torch.dtype
    setting: str  # the ServingConfig.rollout_dtype it was resolved from
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def resolve_rollout_dtype(setting: str, policy: Any) -> RolloutPrecision:
    """The dtype rollouts of `policy` run in under `ServingConfig.rollout_dtype = setting`.

    `auto` turns a float32 policy into bfloat16 rollouts where its device computes bfloat16 fast, and serves any other
    policy in its own dtype (a policy trained in bf16/fp16 needs no copy). An explicit dtype is obeyed, with a warning
    when bfloat16 is asked for on hardware that emulates it (slower than float32, never wrong)."""
    if setting not in ROLLOUT_DTYPES:
        raise ValueError(
            f"Unknown rollout_dtype {setting!r}: choose one of {', '.join(ROLLOUT_DTYPES)} ('auto' serves bfloat16 "
            "where the hardware computes it fast and the policy's own dtype elsewhere)."
        )
    parameter = next(iter(policy.parameters()), None)
    policy_dtype = parameter.dtype if parameter is not None else torch.float32
    device = parameter.device if parameter is not None else torch.device("cpu")
    fast, hardware = fast_bf16(device)
    if setting != "auto":
        dtype = _DTYPES[setting]
        if dtype == torch.bfloat16 and not fast:
            logger.warning(
                "rollout_dtype=bfloat16 on a %s: bfloat16 is emulated there and runs slower than float32 "
                "(rollout_dtype=auto picks float32 on such hardware).",
                hardware,
            )
        return RolloutPrecision(dtype, setting, f"rollout_dtype={setting} ({hardware})")
    if policy_dtype != torch.float32:
        return RolloutPrecision(policy_dtype, setting, f"auto: the policy's own {_name(policy_dtype)}, no copy")
    if fast:
        return RolloutPrecision(torch.bfloat16, setting, f"auto: {hardware} computes bfloat16 fast")
    return RolloutPrecision(torch.float32, setting, f"auto: {hardware}, so float32 (the policy's own)")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fingerprint(tensor: torch.Tensor) -> tuple[int, int]:
    """Changes when `tensor` is written in place (torch's version counter) or its storage is replaced."""
    return tensor.data_ptr(), tensor._version


class RolloutCopy:
    """The policy as rollouts compute it: a copy in `dtype` (parameters only; buffers such as rotary frequencies keep
    their own dtype, as `from_pretrained(dtype=...)` keeps them), or the policy itself when it already is in `dtype`.

    The copy's tensors are allocated once and written in place by `sync` (`copy_`): no memory is added per sync, no
    state of an earlier policy survives one. Build it with `RolloutCopy.build`.
    """

    def __init__(self, model: Any, precision: RolloutPrecision, is_copy: bool) -> None:
        self.model, self.precision, self.is_copy = model, precision, is_copy
        self.syncs = 0  # syncs that copied something
        self.tensors_copied = 0
        self.sync_seconds = 0.0
        self._seen: dict[str, tuple[int, int]] = {}  # the policy's fingerprints at the last sync, by name

    @property
    def dtype(self) -> torch.dtype:
        return self.precision.dtype

    @classmethod
    def build(cls, policy: Any, precision: RolloutPrecision) -> RolloutCopy:
        """The rollout copy of `policy` in `precision.dtype`, or the policy itself when it already is in it."""
        dtypes = {p.dtype for p in policy.parameters() if p.is_floating_point()}
        if dtypes <= {precision.dtype}:
            return cls(policy, precision, is_copy=False)
        started = time.perf_counter()
        model = _cast_model(policy, precision.dtype)
        out = cls(model, precision, is_copy=True)
        out._seen = {name: _fingerprint(t) for name, t in _tensors(policy)}
        out.sync_seconds += time.perf_counter() - started
        return out

    @property
    def nbytes(self) -> int:
        """Memory the copy adds beside the policy (0 when the policy serves itself); tied tensors count once."""
        if not self.is_copy:
            return 0
        seen: set[int] = set()
        total = 0
        for tensor in (*self.model.parameters(), *self.model.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
        return total

    @torch.no_grad()
    def sync(self, policy: Any, stepped: bool = True) -> int:
        """Copy what changed in `policy` since the last sync into the copy, in place; return how many tensors.

        Changed means written in place (torch's version counter: optimizers, `load_state_dict`) or replaced (another
        storage, e.g. gathered ZeRO-3 weights). With `stepped` (an optimizer step happened since the last sync) every
        trainable parameter is copied too: some optimizers (DeepSpeed's) write weights through `.data`, which bumps no
        version counter. Frozen tensors are copied only when they changed."""
        if not self.is_copy:
            return 0
        started = time.perf_counter()
        target = dict(_tensors(self.model))
        copied = 0
        for name, tensor in _tensors(policy):
            fingerprint = _fingerprint(tensor)
            trainable = stepped and isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad
            if not trainable and self._seen.get(name) == fingerprint:
                continue
            destination = target.get(name)
            if destination is None or destination.shape != tensor.shape:
                raise RuntimeError(
                    f"The policy's tensor {name!r} {tuple(tensor.shape)} has no counterpart of that shape in its "
                    "rollout copy: the policy's architecture changed after the copy was built (e.g. resized "
                    "embeddings). Build the rollout after such changes, or set rollout_dtype to the policy's dtype."
                )
            destination.copy_(tensor)
            self._seen[name] = fingerprint
            copied += 1
        if copied:
            self.syncs += 1
            self.tensors_copied += copied
        self.sync_seconds += time.perf_counter() - started
        return copied

    def describe(self) -> str:
        """One line for the run's summary: the precision, why, and what the copy costs."""
        if not self.is_copy:
            return f"{self.precision.name} ({self.precision.reason}); the policy serves itself, no copy"
        return (
            f"{self.precision.name} ({self.precision.reason}); a copy of the policy ({self.nbytes / 2**20:.0f} MiB) "
            f"synced after every optimizer step: {self.syncs} syncs, {self.tensors_copied} tensors, "
            f"{self.sync_seconds:.2f} s in all; training keeps its own precision"
        )


def _tensors(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """A model's parameters and buffers by name (tied tensors once, under their first name)."""
    yield from model.named_parameters()
    yield from model.named_buffers()


def _cast_model(policy: Any, dtype: torch.dtype) -> Any:
    """A copy of `policy` whose floating-point parameters are `dtype` copies of the policy's and whose buffers are
    copies in their own dtype, without a float32 copy on the way (and without the hooks and instance-bound `forward`
    wrappers trainers add to the policy: the copy computes with its own weights). Tied parameters stay tied."""
    from transformers import PreTrainedModel

    if isinstance(policy, PreTrainedModel):
        with torch.device("meta"):  # the architecture only: no memory, no initialisation cost
            model = type(policy)(copy.deepcopy(policy.config))
        model.generation_config = copy.deepcopy(policy.generation_config)
    else:  # any other module (a peft-wrapped policy): a copy of the structure whose tensors are replaced below
        memo = {id(t): torch.empty(0, device="meta") for t in (*policy.parameters(), *policy.buffers())}
        model = copy.deepcopy(policy, memo=memo)
    _fill(model, policy, dtype)
    model.__dict__.pop("forward", None)  # a trainer's wrapper bound on the instance would call the original
    contiguous_head_input(model)
    return model.eval().requires_grad_(False)


def contiguous_head_input(model: Any) -> None:
    """Have `model`'s LM head read its input with standard strides. PyTorch's CPU `linear` on a 3-D bfloat16 input
    sliced out of a longer block (the last position, `logits_to_keep=1`: every prefill and every drafter catch-up)
    falls back to a batched matmul over the weight expanded per row, copying batch x vocab x hidden elements: 0.14 s
    at batch 1 and 4.6 s at batch 16 for SmolLM2's 49k x 576 head on one core, against 0.008 s and 0.02 s with standard
    strides (float32 takes another path). The fix costs at most a copy of one row of hidden states per sequence."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Module) and _contiguous_input not in head._forward_pre_hooks.values():
        head.register_forward_pre_hook(_contiguous_input)


def _contiguous_input(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.dim() < 3:
        return None
    # Standard strides, not merely `is_contiguous()`: a [B, 1, H] slice of a [B, L, H] block counts as contiguous at
    # B = 1 yet keeps its L * H batch stride, which sends `linear` down the same expanding path.
    strides, size = [], 1
    for n in reversed(x.shape):
        strides.append(size)
        size *= n
    if x.stride() == tuple(reversed(strides)):
        return None
    return (x.clone(memory_format=torch.contiguous_format), *args[1:])  # a copy with standard strides


def _fill(model: Any, policy: Any, dtype: torch.dtype) -> None:
    """Give every parameter and buffer of `model` (same structure as `policy`) its own tensor: parameters cast to
    `dtype` (floating point only), buffers copied; one new tensor per source tensor, so ties are kept."""
    made: dict[int, torch.Tensor] = {}
    modules = dict(model.named_modules())
    for name, source in policy.named_modules():
        module = modules.get(name)
        if module is None:
            raise RuntimeError(f"Cannot build the rollout copy: module {name!r} of the policy has no counterpart.")
        for key, tensor in source._parameters.items():
            if tensor is not None:
                if id(tensor) not in made:
                    cast = tensor.detach().to(dtype if tensor.is_floating_point() else tensor.dtype, copy=True)
                    made[id(tensor)] = torch.nn.Parameter(cast, requires_grad=False)
                module._parameters[key] = made[id(tensor)]
        for key, tensor in source._buffers.items():
            if tensor is not None:
                if id(tensor) not in made:
                    made[id(tensor)] = tensor.detach().clone()
                module._buffers[key] = made[id(tensor)]
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"Cannot build the rollout copy: {left[:3]} have no counterpart in the policy.")


# --- the drafter's serving copy ----------------------------------------------------------------------------------


class CastCache:
    """Serving copies of a model in another dtype, rebuilt on every adapter change without recasting what did not
    change: the cast of each tensor of `stable` (the drafter's own, which outlive every rebuild) is kept and reused
    while its fingerprint holds; everything else (freshly merged weights) is cast anew each time. Entries of tensors no
    longer used are dropped at every build, so nothing accumulates across swaps."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._kept: dict[int, tuple[torch.Tensor, tuple[int, int], torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._kept)

    def cast(self, model: Any, stable: Iterable[torch.Tensor] = ()) -> Any:
        """A copy of `model` with its floating-point parameters in this cache's dtype (buffers keep theirs); the tensors
        of `model` that are in `stable` reuse their earlier cast while unchanged."""
        stable_ids = {id(t) for t in stable}
        kept, memo = {}, {}
        for tensor in model.parameters():
            key = id(tensor)
            if key in memo:
                continue
            entry = self._kept.get(key)
            if key in stable_ids and entry is not None and entry[0] is tensor and entry[1] == _fingerprint(tensor):
                memo[key] = entry[2]
            else:
                dtype = self.dtype if tensor.is_floating_point() else tensor.dtype
                memo[key] = torch.nn.Parameter(tensor.detach().to(dtype, copy=True), requires_grad=False)
            if key in stable_ids:
                kept[key] = (tensor, _fingerprint(tensor), memo[key])
        self._kept = kept
        out = copy.deepcopy(model, memo=memo)
        out.__dict__.pop("forward", None)
        contiguous_head_input(out)
        return out.eval()
