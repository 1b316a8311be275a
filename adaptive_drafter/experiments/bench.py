"""Benchmark helpers shared by `scripts/bench_*.py`: the benchmark setups (policy, drafter, prompts), the timed runners
(plain `generate`, the speculative engine, Hugging Face assisted generation), cost and acceptance fits, the memory
report (`experiments.memory`), completion lengths (`experiments.lengths`), presets and the JSON record of a run
(`experiments.cli`); plots are in `adaptive_drafter.plots`.

Two setups:

* tiny (`tiny_setup`, no files needed): a random 12-layer Llama (`testing.tiny_causal_lm`) whose layers after the first
  `drafter_layers` are damped by `dampen` (`testing.dampen_layers`), drafted by those first layers
  (`drafter.truncated_drafter`): a drafter of realistic cost whose agreement is set by the damping, not learned.
* embedded (`embedded_setup`): SmolLM2-135M-Instruct (`embedded.load_embedded`) on chat-templated questions or an
  embedded RL task (`tasks`), drafted by its own first `drafter_layers` layers (untrained, or a distilled adapter).

Drafting sources (`DRAFTERS`, `make_engine`): `model` (the drafter model alone), `hybrid` (`SpecConfig.drafting`:
per row and step the model's drafts or a model-free suffix draft) and `suffix` (suffix drafts only: the model drafter
never drafts).
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from ..config import DrafterConfig, SpecConfig
from ..drafter import ReducedVocabDrafter, build_drafter, frequent_tokens, load_adapter, truncated_drafter
from ..eagle import EagleHead, HeadCache, eagle_head, load_head
from ..elastic import expected_tokens
from ..engine import SpeculativeEngine
from ..kv import cache_kwargs
from ..sampling import SamplingParams
from ..metrics import SpecStats
from ..testing import dampen_layers, left_padded_prompts, tiny_causal_lm

TINY = {"arch": "llama", "vocab_size": 512, "hidden_size": 256, "num_layers": 12, "logit_scale": 8.0}
TINY_PROMPT_LENGTHS = (8, 24)  # min, max prompt tokens: mixed lengths, so prompts are really left-padded
TASK_SEED_OFFSET = 50_000  # embedded task prompts are drawn from seeds held out from distill_drafter's 0..rounds
DRAFTERS = ("model", "suffix", "hybrid")

QUESTIONS = [
    "What is 7 + 5?", "What is 12 times 3?", "What is 100 minus 37?", "What is 81 divided by 9?", "What is 15 + 27?",
    "What is 6 squared?", "What is the square root of 144?", "What is 9 times 8?", "What is 250 + 250?",
    "What is 1000 minus 1?", "What is half of 64?", "What is 3 to the power of 4?", "What is 45 divided by 5?",
    "What is 17 + 26?", "What is 13 times 7?", "What is 90 minus 45?", "Is 17 a prime number?",
    "Is 21 an even number?", "What is 20% of 150?", "What is 2 + 2 * 3?", "How many minutes are in 3 hours?",
    "How many days are in two weeks?", "How many seconds are in a minute?", "What is the next number: 2, 4, 6, 8?",
    "What is the next number: 1, 1, 2, 3, 5?", "Which is larger, 0.5 or 0.45?",
    "Round 3.7 to the nearest whole number.", "What is 11 times 11?", "Reverse the word 'cat'.", "Spell 'house' backwards.",
    "How many letters are in the word 'banana'?", "What is the first letter of 'zebra'?",
    "What is the last letter of 'apple'?", "Write 'hello' in capital letters.",
    "How many vowels are in the word 'education'?", "What word do you get by removing the 's' from 'stone'?",
    "Is 'level' a palindrome?", "Sort these letters alphabetically: d, a, c, b.",
    "Join the words 'sun' and 'flower' into one word.", "What is the plural of 'mouse'?",
    "How many words are in the sentence 'The cat sat down'?", "Repeat the word 'yes' three times.",
    "What rhymes with 'cat'?", "What is the opposite of 'hot'?", "Give a synonym for 'happy'.",
    "Count the letter 'a' in 'abracadabra'.", "What is the capital of France?",
    "What color is the sky on a clear day?", "How many legs does a spider have?",
    "What is the boiling point of water in Celsius?", "Name a primary color.",
    "What is the largest planet in our solar system?", "How many continents are there?",
    "What is H2O commonly called?", "How many sides does a hexagon have?", "What is the freezing point of water?",
    "Which animal is known as the king of the jungle?", "What is the chemical symbol for gold?",
    "How many hours are in a day?", "What do bees make?", "What is 5 factorial?", "What is 144 divided by 12?",
    "Convert 2 kilometers to meters.", "What is 3/4 as a decimal?",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- setups


@dataclass
class Setup:
    """Everything one benchmark needs: the two models, a prompt maker and the special tokens."""

    policy: Any
    drafter: Any
    make_prompts: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]  # (batch, seed) -> (input_ids, mask)
    eos_token_id: int | list[int]
    pad_token_id: int
    description: str


@dataclass
class SetupOptions:
    """What a setup is built from. The setup functions read only these attributes, so an argparse Namespace that has
    them (the scripts') works as well."""

    drafter_layers: int = 2
    dampen: float = 0.05  # tiny: scale of the layers the drafter lacks
    adapter: Path | None = None  # a distilled LoRA adapter (distill_drafter.py --out) or eagle head (distill_eagle.py)
    lora_r: int = 32  # the rank that adapter was trained with
    drafter_kind: str = "truncated"  # or "eagle": a head over the policy's features (DrafterConfig.drafter_kind)
    task: str = "questions"  # embedded: "questions" or an embedded task of `adaptive_drafter.tasks`
    seed: int = 0


def make_drafter(policy: Any, options: SetupOptions) -> Any:
    """The policy's first `drafter_layers` layers: untrained, or with the LoRA adapter saved at `adapter` loaded; with
    `drafter_kind="eagle"` an EAGLE-style head: untrained, or the head saved at `adapter`."""
    if getattr(options, "drafter_kind", "truncated") == "eagle":
        return EagleHead(policy) if options.adapter is None else load_head(policy, options.adapter)
    if options.adapter is None:
        return truncated_drafter(policy, options.drafter_layers)
    config = DrafterConfig(
        drafter_num_layers=options.drafter_layers, drafter_lora_r=options.lora_r, drafter_lora_alpha=2 * options.lora_r
    )
    drafter = build_drafter(policy, config)
    load_adapter(drafter, options.adapter)
    return drafter


def tiny_setup(options: SetupOptions) -> Setup:
    """A random tiny Llama with damped late layers, drafted by its own first layers (controlled agreement)."""
    policy = dampen_layers(tiny_causal_lm(seed=options.seed, **TINY), options.drafter_layers, options.dampen)
    drafter = make_drafter(policy, options)
    config = policy.config

    def make_prompts(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = TINY_PROMPT_LENGTHS
        return left_padded_prompts(batch, lo, hi, config.vocab_size, pad_id=config.pad_token_id, seed=seed)

    description = (
        f"tiny random Llama ({TINY['num_layers']} layers, hidden {TINY['hidden_size']}, vocab {TINY['vocab_size']}), "
        f"layers {options.drafter_layers}.. damped x{options.dampen}; drafter = its first {options.drafter_layers} "
        "layers + LM head: agreement set by the damping, not learned"
    )
    return Setup(policy, drafter, make_prompts, config.eos_token_id, config.pad_token_id, description)


def embedded_setup(options: SetupOptions) -> Setup:
    """SmolLM2-135M-Instruct on chat-templated questions or an embedded RL task (`tasks.load_task`: arithmetic,
    reasoning), drafted by its own first layers (untrained, or distilled with `adapter`)."""
    from ..embedded import EMBEDDED_MODEL_NAME, load_embedded
    from ..tasks import chat_batch, load_task

    policy, tokenizer = load_embedded()
    drafter = make_drafter(policy, options)
    task = options.task

    def make_prompts(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if task != "questions":  # the recipe's tasks, on seeds held out from distill_drafter's
            return chat_batch(tokenizer, load_task(task, batch, seed=TASK_SEED_OFFSET + seed)[0]["prompt"])
        questions = [QUESTIONS[(seed + i) % len(QUESTIONS)] for i in range(batch)]
        return chat_batch(tokenizer, [[{"role": "user", "content": q}] for q in questions])

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    head = eagle_head(drafter)
    trained = (
        f"{'head' if head else 'LoRA adapter'} {options.adapter}" if options.adapter
        else "UNTRAINED: expect low acceptance and a slow-down"
    )  # fmt: skip
    kind = f"first {options.drafter_layers} layers + LM head" if head is None else (
        f"an EAGLE-style head ({head.draft_vocab_size or 'all'} draft tokens)")  # fmt: skip
    layers = policy.config.num_hidden_layers
    description = f"{EMBEDDED_MODEL_NAME} ({layers} layers) on {task} prompts; drafter = {kind}, {trained}"
    return Setup(policy, drafter, make_prompts, tokenizer.eos_token_id, pad, description)


def grouped(setup: Setup, group: int) -> Setup:
    """`setup` with each prompt repeated `group` times in a row, as GRPO batches its `num_generations` samples (rows
    with equal prompts are siblings to the suffix drafter). The batch size still counts rows: ceil(batch / group)
    distinct prompts, the last group cut short when `group` does not divide the batch."""
    if group <= 1:
        return setup
    make = setup.make_prompts

    def make_prompts(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = make(-(-batch // group), seed)
        return ids.repeat_interleave(group, 0)[:batch], mask.repeat_interleave(group, 0)[:batch]

    return dataclasses.replace(setup, make_prompts=make_prompts, description=f"{setup.description}; {group} per prompt")


# --------------------------------------------------------------------------------------------------------- engines


def suffix_supported() -> bool:
    """Whether this engine has hybrid drafting: `SpecConfig.drafting` and the per-source `SpecStats` fields."""
    config = {f.name for f in dataclasses.fields(SpecConfig)}
    stats = {f.name for f in dataclasses.fields(SpecStats)}
    return "drafting" in config and {"suffix_drafted", "suffix_accepted", "suffix_verifies"} <= stats


def make_engine(policy: Any, drafter: Any, source: str, k: int, elastic: bool, **config: Any) -> SpeculativeEngine:
    """An engine drafting from `source` (`SpecConfig.drafting`: model, hybrid, suffix), fixed k or elastic; `config`
    goes to `SpecConfig`. With `suffix`, "fixed" verifies every suffix draft that expects >= 1 accepted token, and
    "elastic" only when the measured verify cost pays.

    `k` is k_max, the longest draft a row may verify whatever the source: the model drafter's `num_draft_tokens` and
    the suffix drafter's `suffix_max_draft` (unless `config` sets it), so drafters compare at the same verify width."""
    if source not in DRAFTERS:
        raise ValueError(f"unknown drafting source {source!r}: choose one of {', '.join(DRAFTERS)}")
    if source != "model" and not suffix_supported():
        raise RuntimeError(
            f"--drafter {source} needs hybrid drafting in the engine (SpecConfig.drafting and the SpecStats fields "
            "suffix_drafted/suffix_accepted/suffix_verifies), which this adaptive_drafter lacks"
        )
    if source != "model":
        config.setdefault("suffix_max_draft", k)
    return SpeculativeEngine(
        policy, drafter, SpecConfig(num_draft_tokens=k, elastic=elastic, drafting=source, **config)
    )


def check_source(stats: SpecStats, source: str) -> None:
    """Fail loudly if a `suffix` engine's model drafter drafted after all (the k = 0 pin no longer holds)."""
    if source == "suffix" and stats.drafted != stats.suffix_drafted:
        raise RuntimeError(
            f"--drafter suffix: the model drafter drafted {stats.drafted - stats.suffix_drafted} tokens; the "
            "engine no longer honours the pinned controller (make_engine)"
        )


def source_stats(stats: SpecStats) -> dict[str, dict[str, float]] | None:
    """The verifies split by draft source, `{"suffix": {...}, "model": {...}}` (counters, acceptance, tokens per
    verify); None when the engine keeps no per-source counters."""
    if not hasattr(stats, "suffix_drafted"):
        return None

    def source(drafted: int, accepted: int, verifies: int, emitted: int) -> dict[str, float]:
        return {
            "drafted": drafted,
            "accepted": accepted,
            "verifies": verifies,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "tokens_per_verify": emitted / verifies if verifies else 0.0,
        }

    suffix_emitted = getattr(stats, "suffix_verified_tokens", stats.suffix_accepted + stats.suffix_verifies)
    return {
        "suffix": source(stats.suffix_drafted, stats.suffix_accepted, stats.suffix_verifies, suffix_emitted),
        "model": source(
            stats.drafted - stats.suffix_drafted,
            stats.accepted - stats.suffix_accepted,
            stats.verify_steps - stats.suffix_verifies,
            stats.verified_tokens - suffix_emitted,
        ),
    }


def step_shares(stats: SpecStats) -> dict[str, float]:
    """How the row-steps of a rollout split by what each row did (plain decode, a suffix draft verified, the model's
    drafts verified; shares of verify + plain row-steps, the prefill's first token counted plain), and the tokens a
    row-step emitted on average over all of them (the speed-up's numerator, plain steps included)."""
    steps = stats.verify_steps + stats.plain_steps
    suffix = getattr(stats, "suffix_verifies", 0)
    if not steps:
        return {"plain": 0.0, "suffix": 0.0, "model": 0.0, "tokens_per_row_step": 0.0}
    return {
        "plain": stats.plain_steps / steps,
        "suffix": suffix / steps,
        "model": (stats.verify_steps - suffix) / steps,
        "tokens_per_row_step": (stats.verified_tokens + stats.plain_steps) / steps,
    }


def mean_max_p(targets: list[Any]) -> float:
    """The policy's mean top-1 probability over every generated position of a rollout (`SpecOutput.targets`
    collected with `collect_topk >= 1`): the acceptance ceiling of a deterministic draft token under the exact rule."""
    tops = [t.topk_logprobs[:, 0].float().exp() for t in targets if t.topk_logprobs.numel()]
    if not tops:
        raise ValueError("mean_max_p needs targets with at least one position (collect_topk >= 1)")
    return float(torch.cat(tops).mean())


def fresh_suffix(engine: SpeculativeEngine) -> None:
    """Forget everything the engine's suffix drafter indexed (warm-ups, earlier batch sizes); nothing without one."""
    if getattr(engine, "suffix", None) is not None:
        engine.suffix = type(engine.suffix)(engine.suffix.config)


def snapshot_suffix(engine: SpeculativeEngine) -> Any:
    """A copy of the engine's suffix drafter state, for `restore_suffix` before each timed run: every repeat then
    sees the same earlier epochs, not the repeats before it (None without suffix drafting)."""
    return copy.deepcopy(engine.suffix) if getattr(engine, "suffix", None) is not None else None


def restore_suffix(engine: SpeculativeEngine, snapshot: Any) -> None:
    """Put back a `snapshot_suffix` copy (a copy of it: the timed run extends what it gets)."""
    if snapshot is not None:
        engine.suffix = copy.deepcopy(snapshot)


# --------------------------------------------------------------------------------------------------------- running


@dataclass
class RunOptions:
    """How each rollout runs: draft length, length cap, sampling, seed and device."""

    k: int = 4
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    seed: int = 0
    device: str = "cpu"

    @classmethod
    def of(cls, namespace: Any) -> RunOptions:
        """The fields of a script's parsed arguments."""
        return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})

    @property
    def sampling(self) -> dict[str, Any]:
        """Sampling settings shared by all decoders as `generate` keywords (top-k/top-p explicitly off, as in the
        engine's defaults)."""
        if self.do_sample:
            return {"do_sample": True, "temperature": self.temperature, "top_k": 0, "top_p": 1.0}
        return {"do_sample": False}

    @property
    def params(self) -> SamplingParams:
        """The same settings as the engines take them."""
        return SamplingParams(**self.sampling)


def count_until_eos(rows: list[list[int]], eos: int | list[int]) -> list[list[int]]:
    """Each row cut after its first eos (one id or a set of them; eos included)."""
    stops = {eos} if isinstance(eos, int) else set(eos)
    return [row[: next((i + 1 for i, t in enumerate(row) if t in stops), len(row))] for row in rows]


def completion_length(row: list[int], eos: int | list[int]) -> int | None:
    """Tokens before the row's first eos (the eos itself not counted); None when the row has no eos (it ran to the
    length cap)."""
    stops = {eos} if isinstance(eos, int) else set(eos)
    return next((i for i, t in enumerate(row) if t in stops), None)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so wall time covers them (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompts_on(setup: Setup, batch: int, options: RunOptions, seed: int | None = None):
    """`setup`'s prompts for `batch` rows (seed: `options.seed`) on the run's device."""
    ids, mask = setup.make_prompts(batch, options.seed if seed is None else seed)
    return ids.to(options.device), mask.to(options.device)


def run_plain(setup: Setup, ids: torch.Tensor, mask: torch.Tensor, options: RunOptions, max_new: int):
    """`policy.generate`; returns (completions cut at eos, seconds)."""
    torch.manual_seed(options.seed)
    synchronize(ids.device)
    start = time.perf_counter()
    out = setup.policy.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new,
        eos_token_id=setup.eos_token_id,
        pad_token_id=setup.pad_token_id,
        **options.sampling,
    )
    synchronize(ids.device)
    seconds = time.perf_counter() - start
    return count_until_eos(out[:, ids.shape[1] :].tolist(), setup.eos_token_id), seconds


def run_spec(
    engine: SpeculativeEngine,
    setup: Setup,
    ids: torch.Tensor,
    mask: torch.Tensor,
    options: RunOptions,
    max_new: int,
    seed: int | None = None,
):
    """`SpeculativeEngine.generate` seeded with `seed` (default `options.seed`); returns (completions, stats,
    seconds)."""
    out, seconds = run_spec_output(engine, setup, ids, mask, options, max_new, seed)
    return out.completion_ids, out.stats, seconds


def run_spec_output(
    engine: SpeculativeEngine,
    setup: Setup,
    ids: torch.Tensor,
    mask: torch.Tensor,
    options: RunOptions,
    max_new: int,
    seed: int | None = None,
    collect_topk: int = 0,
):
    """`run_spec` returning the whole `SpecOutput` (with the policy's top-`collect_topk` targets when > 0; top-1 costs
    a max over the verify logits the engine has anyway) and the seconds."""
    synchronize(ids.device)
    start = time.perf_counter()
    out = engine.generate(
        ids,
        options.params,
        attention_mask=mask,
        max_new_tokens=max_new,
        eos_token_id=setup.eos_token_id,
        seed=options.seed if seed is None else seed,
        collect_topk=collect_topk,
    )
    synchronize(ids.device)
    return out, time.perf_counter() - start


def run_assisted(setup: Setup, ids: torch.Tensor, mask: torch.Tensor, options: RunOptions, max_new: int):
    """Hugging Face assisted generation (`generate(assistant_model=...)`, batch 1 only) with the same drafter, LoRA
    merged; HF's own schedule of draft lengths. Returns (completions cut at eos, seconds)."""
    assistant = setup.drafter
    if hasattr(assistant, "merge_and_unload"):  # a peft drafter: HF wants a plain model
        assistant = copy.deepcopy(assistant).merge_and_unload()
    synchronize(ids.device)
    start = time.perf_counter()
    out = setup.policy.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new, assistant_model=assistant,
        eos_token_id=setup.eos_token_id, pad_token_id=setup.pad_token_id, **options.sampling,
    )  # fmt: skip
    synchronize(ids.device)
    return count_until_eos(out[:, ids.shape[1] :].tolist(), setup.eos_token_id), time.perf_counter() - start


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls, the device synchronised around each."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_seconds(model: Any, ids: torch.Tensor, mask: torch.Tensor, tokens: int, logits: int, repeats: int) -> float:
    """Seconds of one forward of `tokens` new tokens per row over the prompts' KV cache (cropped back each time)."""
    cache = DynamicCache()
    model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
    new = ids[:, -tokens:]
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)

    def once() -> None:
        model(
            input_ids=new, attention_mask=full_mask, use_cache=True, logits_to_keep=logits, **cache_kwargs(model, cache)
        )
        cache.crop(-tokens)

    once()  # warm-up
    return timed(once, ids.device, repeats)


def step_costs(setup: Setup, engine: SpeculativeEngine, ids: torch.Tensor, mask: torch.Tensor, k: int) -> dict:
    """The cost ratios of the speed-up formula at this batch size, timed directly: c = one drafter step (as the engine
    drafts: reduced vocabulary included) / one policy decode step, v_k = a policy forward of k + 1 tokens / one step."""
    repeats = 5
    decode = forward_seconds(setup.policy, ids, mask, 1, 1, repeats)
    head = eagle_head(engine.drafter)
    draft = (
        forward_seconds(engine.drafter, ids, mask, 1, 1, repeats) if head is None
        else head_step_seconds(head, ids.shape[0], ids.shape[1], engine.vocab_size, repeats)
    )  # fmt: skip
    verify = forward_seconds(setup.policy, ids, mask, k + 1, 0, repeats)
    return {"decode_s": decode, "c": draft / decode, "v_k": verify / decode}


def head_step_seconds(head: EagleHead, batch: int, context: int, vocab_size: int, repeats: int) -> float:
    """Seconds of one draft step of an EAGLE-style head as the engine drafts: one fed-back pair through its layer over
    `context` cached slots, and its logits over the policy's vocabulary (-inf outside a draft vocabulary)."""
    device = head.fc.weight.device
    cache = HeadCache.empty(batch, device)
    valid = torch.ones(batch, context, dtype=torch.bool, device=device)
    tokens = torch.randint(0, vocab_size, (batch, context), device=device)
    head.step(cache, torch.randn(batch, context, head.feature_size, dtype=head.dtype, device=device), tokens, valid)
    g = torch.randn(batch, 1, head.config.hidden_size, dtype=head.dtype, device=device)

    def once() -> None:
        out = head.step(cache, g, tokens[:, :1], valid[:, :1])
        head.full_logits(out[:, -1], vocab_size)
        cache.keys, cache.values, cache.valid = cache.keys[:, :, :-1], cache.values[:, :, :-1], cache.valid[:, :-1]

    once()  # warm-up
    return timed(once, device, repeats)


def effective_alpha(tokens_per_verify: float, k: int) -> float:
    """The per-token acceptance probability α whose expected tokens per verify, (1 − α^(k+1)) / (1 − α), equals the
    measured one (bisection: it is increasing in α)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tokens(mid, k) < tokens_per_verify else (lo, mid)
    return lo


def calibrate_draft_vocab(setup: Setup, engines: list[SpeculativeEngine], options: RunOptions, size: int) -> float:
    """Pin each engine's draft vocabulary to the `size` tokens most frequent in plain completions of held-out prompts
    (another seed than the benchmark's); return the share of those completions' tokens it covers."""
    ids, mask = prompts_on(setup, 32, options, seed=options.seed + 1)
    rows, _ = run_plain(setup, ids, mask, options, options.max_new_tokens)
    counts = torch.bincount(torch.tensor([t for row in rows for t in row]), minlength=engines[0].vocab_size)
    vocab = frequent_tokens(counts, size)
    for engine in engines:
        engine.drafter = ReducedVocabDrafter(engine.drafter, vocab, engine.vocab_size)
        engine.drafter.check()
    return float(counts[vocab].sum() / counts.sum())


# ---------------------------------------------------------------------------------------------------------- memory
