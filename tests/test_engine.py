"""The engine against the policy alone: token identity under greedy decoding, the exact sampling distribution under
sampling, the policy's logprobs, and clear errors for bad input."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from adaptive_drafter import SpecConfig, SpecOutput, SpeculativeEngine
from adaptive_drafter.drafter import noised_copy
from adaptive_drafter.sampling import SamplingParams, process_logits
from adaptive_drafter.testing import ARCHITECTURES, left_padded_prompts, tiny_causal_lm

EOS, PAD = 2, 0


def reference_greedy(policy, ids, mask, max_new_tokens, eos=EOS):
    out = policy.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=PAD,
    )
    rows = out[:, ids.shape[1] :].tolist()
    eos_ids = {eos} if isinstance(eos, int) else set(eos)
    return [row[: next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))] for row in rows]


def frequent_token(rows: list[list[int]]) -> int:
    """A token that ends some rows early but not all: the one found in the most rows, short of all of them.
    (Random tiny models rarely emit a fixed eos id, so tests pick one from what they do emit.)"""
    in_rows = torch.zeros(max(t for row in rows for t in row) + 1)
    for row in rows:
        in_rows[list(set(row))] += 1
    in_rows[in_rows >= len(rows)] = 0
    return int(in_rows.argmax())


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch_models(request):
    policy = tiny_causal_lm(request.param, logit_scale=8.0)
    return {
        "policy": policy,
        "agreeing": noised_copy(policy, std=0.1, seed=1),
        "random": tiny_causal_lm(request.param, seed=1, logit_scale=8.0),
    }


@pytest.mark.parametrize("drafter_kind", ["agreeing", "random"])
def test_greedy_is_token_identical_to_policy_generate(arch_models, drafter_kind):
    policy, drafter = arch_models["policy"], arch_models[drafter_kind]
    ids, mask = left_padded_prompts(64, 1, 24, policy.config.vocab_size, seed=7)
    eos = frequent_token(reference_greedy(policy, ids, mask, max_new_tokens=32, eos=[]))
    expected = reference_greedy(policy, ids, mask, max_new_tokens=32, eos=eos)
    assert len({len(row) for row in expected}) > 4, "rows should finish at many different lengths"
    for k in (1, 2, 4, 8):
        out = SpeculativeEngine(policy, drafter, SpecConfig(elastic=False, num_draft_tokens=k)).generate(
            ids, SamplingParams(do_sample=False), attention_mask=mask, max_new_tokens=32, eos_token_id=eos
        )
        assert out.completion_ids == expected, f"k={k}"
        if drafter_kind == "agreeing":
            assert out.stats.tokens_per_verify > 1.5, out.stats
        else:
            assert out.stats.tokens_per_verify < 1.1, out.stats


def test_drafter_equal_to_policy_accepts_everything():
    policy = tiny_causal_lm("llama", logit_scale=8.0)
    ids, mask = left_padded_prompts(8, 3, 10, 256, seed=1)
    k = 4
    out = SpeculativeEngine(policy, copy.deepcopy(policy), SpecConfig(elastic=False, num_draft_tokens=k)).generate(
        ids, SamplingParams(do_sample=False), attention_mask=mask, max_new_tokens=41
    )
    assert out.stats.acceptance_rate == 1.0
    assert out.stats.tokens_per_verify == k + 1
    assert all(len(row) == 41 for row in out.completion_ids)
    assert out.stats.policy_forwards == 1 + 40 // (k + 1)  # the prefill emits the first token, then 8 verifies


def test_plain_decoding_runs_as_many_policy_forwards_as_generate():
    """The prefill emits each row's first token, as in `generate`: n tokens cost n policy forwards, not n + 1."""
    policy = tiny_causal_lm("llama", logit_scale=8.0)
    ids, mask = left_padded_prompts(4, 3, 10, 256, seed=1)
    engine = SpeculativeEngine(
        policy, copy.deepcopy(policy), SpecConfig(elastic=False, num_draft_tokens=4, plain_batch_threshold=1)
    )
    out = engine.generate(ids, SamplingParams(do_sample=False), attention_mask=mask, max_new_tokens=12)
    assert out.completion_ids == reference_greedy(policy, ids, mask, 12, eos=-1)
    assert out.stats.policy_forwards == 12 and out.stats.drafter_forwards == 0


def test_peft_wrapped_drafter(arch_models):
    from peft import LoraConfig, get_peft_model

    policy = arch_models["policy"]
    drafter = get_peft_model(
        copy.deepcopy(arch_models["agreeing"]), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    ids, mask = left_padded_prompts(16, 2, 12, policy.config.vocab_size, seed=3)
    out = SpeculativeEngine(policy, drafter, SpecConfig(elastic=False, num_draft_tokens=3)).generate(
        ids, SamplingParams(do_sample=False), attention_mask=mask, max_new_tokens=20, eos_token_id=EOS
    )
    assert out.completion_ids == reference_greedy(policy, ids, mask, 20)


def test_several_eos_ids_and_max_new_tokens_one():
    policy = tiny_causal_lm("qwen2", logit_scale=8.0)
    ids, mask = left_padded_prompts(32, 2, 12, 256, seed=5)
    engine = SpeculativeEngine(policy, noised_copy(policy, 0.1), SpecConfig(elastic=False, num_draft_tokens=4))
    free = reference_greedy(policy, ids, mask, 24, eos=[])
    # Two frequent tokens as eos ids: each row must stop right after its first occurrence of either.
    first = frequent_token(free)
    eos_ids = [first, frequent_token([[t for t in row if t != first] or [first] for row in free])]
    out = engine.generate(
        ids, SamplingParams(do_sample=False), attention_mask=mask, max_new_tokens=24, eos_token_id=eos_ids
    )
    assert out.completion_ids == reference_greedy(policy, ids, mask, 24, eos=eos_ids)
    assert any(len(row) < 24 for row in out.completion_ids)
    one = engine.generate(ids, SamplingParams(do_sample=False), attention_mask=mask, max_new_tokens=1)
    assert one.completion_ids == [row[:1] for row in free]


# --- sampling: the exact joint distribution of the first tokens -------------------------------------------------

VOCAB, STEPS, SAMPLES = 6, 3, 20_000


def exact_joint(model, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """P(x1, x2, x3 | prompt) under the processed sampling distribution, by brute force over all prefixes."""
    joint = torch.ones(())
    for step in range(STEPS):
        prefixes = list(itertools.product(range(VOCAB), repeat=step))
        ids = torch.tensor([prompt + list(prefix) for prefix in prefixes])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -1]
        probs = process_logits(logits, params).softmax(-1).double()
        joint = joint.reshape(-1, 1) * probs  # [V^step, V]
    return joint.reshape(-1)


def speculative_samples(policy, drafter, prompt: list[int], k: int, settings: dict) -> SpecOutput:
    """SAMPLES rows of `prompt` decoded speculatively at draft length k (fixed, exact rule), seeded by k."""
    engine = SpeculativeEngine(policy, drafter, SpecConfig(elastic=False, num_draft_tokens=k))
    ids = torch.tensor([prompt]).expand(SAMPLES, -1)
    return engine.generate(ids, SamplingParams(**settings), max_new_tokens=STEPS + 1, seed=k)


def first_tokens_joint(completions: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The empirical joint of every row's first STEPS tokens, and each row's outcome index into it."""
    firsts = torch.tensor([row[:STEPS] for row in completions])
    index = (firsts * torch.tensor([VOCAB**2, VOCAB, 1])).sum(-1)
    return torch.bincount(index, minlength=VOCAB**STEPS).double() / len(completions), index


def assert_within_noise(empirical: torch.Tensor, target: torch.Tensor, samples: int) -> None:
    """TV(empirical, target) below what a correct sampler exceeds with probability 1e-6 (`noise_bound`)."""
    tv, bound = 0.5 * float((empirical - target).abs().sum()), noise_bound(target, samples)
    assert tv < bound, f"TV {tv:.4f} >= noise bound {bound:.4f}"


def noise_bound(probs: torch.Tensor, samples: int, delta: float = 1e-6) -> float:
    """Upper bound on TV(empirical, true) that holds with probability 1 - delta: E[TV] <= 1/2 sum sqrt(p(1-p)/N), and
    TV moves by at most 1/N per sample, so McDiarmid adds sqrt(ln(1/delta) / 2N)."""
    mean = 0.5 * float((probs * (1 - probs) / samples).sqrt().sum())
    return mean + math.sqrt(math.log(1 / delta) / (2 * samples))


@pytest.fixture(scope="module")
def small_vocab_models():
    policy = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=16, logit_scale=3.0, seed=0).double()
    drafter = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=16, logit_scale=3.0, seed=4).double()
    return policy, drafter


@pytest.mark.parametrize(
    "settings",
    [dict(temperature=1.0), dict(temperature=0.7), dict(temperature=1.0, top_k=3), dict(temperature=0.9, top_p=0.8)],
    ids=["t1.0", "t0.7", "topk3", "topp0.8"],
)
@pytest.mark.parametrize("k", [1, 3])
def test_sampled_joint_distribution_is_the_policys(small_vocab_models, settings, k):
    policy, drafter = small_vocab_models
    prompt = [3, 1, 4, 5]
    params = SamplingParams(do_sample=True, **settings)
    target = exact_joint(policy, prompt, params)
    bound = noise_bound(target, SAMPLES)
    # The test has power: sampling from the drafter instead would be caught many times over.
    assert 0.5 * float((exact_joint(drafter, prompt, params) - target).abs().sum()) > 3 * bound

    out = speculative_samples(policy, drafter, prompt, k, settings)
    empirical, index = first_tokens_joint(out.completion_ids)
    assert_within_noise(empirical, target, SAMPLES)
    assert out.stats.drafted > 0 and 0 < out.stats.acceptance_rate < 1

    # Reported logprobs are the policy's: log P(x_t | prefix) from the brute-force tables.
    lp = torch.tensor([row[:STEPS] for row in out.logprobs], dtype=torch.double)
    joint_lp = lp.sum(-1)
    assert torch.allclose(joint_lp, target[index].log(), atol=1e-6)


def test_logprobs_equal_a_full_policy_forward():
    policy = tiny_causal_lm("qwen3", logit_scale=4.0)
    drafter = noised_copy(policy, 0.1)
    ids, mask = left_padded_prompts(8, 3, 9, 256, seed=2)
    params = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.95)
    out = SpeculativeEngine(policy, drafter, SpecConfig(elastic=False, num_draft_tokens=3)).generate(
        ids, SamplingParams(**params), attention_mask=mask, max_new_tokens=16, seed=0, eos_token_id=EOS
    )
    for row, (completion, logprobs) in enumerate(zip(out.completion_ids, out.logprobs)):
        prompt = ids[row][mask[row].bool()].tolist()
        full = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = policy(input_ids=full).logits[0, len(prompt) - 1 : -1]
        expected = process_logits(logits, SamplingParams(**params)).log_softmax(-1)
        expected = expected.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(logprobs), expected, atol=1e-4), row


def test_seeded_runs_are_reproducible():
    policy = tiny_causal_lm("llama", logit_scale=4.0)
    engine = SpeculativeEngine(policy, noised_copy(policy, 0.2), SpecConfig(elastic=False, num_draft_tokens=4))
    ids, mask = left_padded_prompts(16, 2, 10, 256, seed=1)
    runs = [engine.generate(ids, attention_mask=mask, max_new_tokens=24, seed=123).completion_ids for _ in range(2)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize(
    "lossy_config", [dict(acceptance="lenient", lenience=4.0), dict(acceptance="cascade", cascade_threshold=0.0)]
)
def test_lossy_rules_accept_more_and_report_policy_logprobs(lossy_config):
    policy = tiny_causal_lm("llama", logit_scale=4.0)
    drafter = noised_copy(policy, 0.3)
    ids, mask = left_padded_prompts(8, 3, 8, 256, seed=3)
    exact = SpeculativeEngine(policy, drafter, SpecConfig(elastic=False, num_draft_tokens=4)).generate(
        ids, attention_mask=mask, max_new_tokens=24, seed=0
    )
    lossy = SpeculativeEngine(policy, drafter, SpecConfig(elastic=False, num_draft_tokens=4, **lossy_config)).generate(
        ids, attention_mask=mask, max_new_tokens=24, seed=0
    )
    assert lossy.stats.acceptance_rate > exact.stats.acceptance_rate
    if lossy_config["acceptance"] == "cascade":  # threshold 0 takes every draft the policy gives p > 0
        assert lossy.stats.acceptance_rate == 1.0
    for row, (completion, logprobs) in enumerate(zip(lossy.completion_ids, lossy.logprobs)):
        prompt = ids[row][mask[row].bool()].tolist()
        with torch.no_grad():
            logits = policy(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(logprobs), expected, atol=1e-4)


# --- distillation targets ---------------------------------------------------------------------------------------


def test_targets_are_off_by_default():
    policy = tiny_causal_lm("llama")
    out = SpeculativeEngine(policy, noised_copy(policy, 0.1)).generate(torch.tensor([[5, 6]]), max_new_tokens=4)
    assert out.targets is None


def test_collected_targets_are_the_policys_topk_at_every_emitted_position():
    policy = tiny_causal_lm("qwen2", logit_scale=8.0)
    ids, mask = left_padded_prompts(12, 2, 10, 256, seed=4)
    config = SpecConfig(elastic=False, num_draft_tokens=3, collect_topk=8)
    engine = SpeculativeEngine(policy, noised_copy(policy, 0.1), config)
    out = engine.generate(
        ids, SamplingParams(do_sample=False), attention_mask=mask, max_new_tokens=20, eos_token_id=EOS, policy_version=7
    )
    assert sum(t.accepted.sum().item() for t in out.targets) <= out.stats.accepted
    assert any(t.accepted.any() for t in out.targets) and any((t.drafted & ~t.accepted).any() for t in out.targets)
    for row, targets in enumerate(out.targets):
        completion = out.completion_ids[row]
        assert targets.prompt_ids == ids[row][mask[row].bool()].tolist()
        assert targets.completion_ids == completion and targets.policy_version == 7
        assert targets.topk_ids.shape == (len(completion), 8)
        assert bool((targets.accepted <= targets.drafted).all())
        # Greedy emits the policy's argmax: the top-1 target is the emitted token itself.
        assert targets.topk_ids[:, 0].tolist() == completion
        with torch.no_grad():
            logits = policy(input_ids=torch.tensor([targets.prompt_ids + completion])).logits[0]
        expected = logits[len(targets.prompt_ids) - 1 : -1].log_softmax(-1).topk(8)
        assert torch.equal(targets.topk_ids, expected.indices)
        assert torch.allclose(targets.topk_logprobs.float(), expected.values, atol=1e-2)


# --- bad input ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    policy = tiny_causal_lm("llama", max_positions=64)
    return SpeculativeEngine(policy, noised_copy(policy, 0.1))


def test_vocabulary_mismatch_is_named():
    with pytest.raises(ValueError, match="policy has 256 token embeddings, the drafter 300"):
        SpeculativeEngine(tiny_causal_lm("llama"), tiny_causal_lm("llama", vocab_size=300))


def test_padded_embeddings_work_with_the_tokenizer_size():
    policy = tiny_causal_lm("llama", vocab_size=256, logit_scale=8.0)
    drafter = tiny_causal_lm("llama", vocab_size=320, seed=2, logit_scale=8.0)
    engine = SpeculativeEngine(policy, drafter, SpecConfig(vocab_size=200))
    ids, mask = left_padded_prompts(16, 2, 8, 200, seed=0)
    out = engine.generate(ids, SamplingParams(temperature=1.5), attention_mask=mask, max_new_tokens=40)
    assert max(t for row in out.completion_ids for t in row) < 200


def test_tokenizer_mismatch_is_named(make_tokenizer):
    policy = tiny_causal_lm("llama", vocab_size=16)
    drafter = tiny_causal_lm("llama", vocab_size=16, seed=1)
    same = make_tokenizer(["a", "b", "c"])
    SpeculativeEngine(policy, drafter, tokenizer=same, drafter_tokenizer=make_tokenizer(["a", "b", "c"]))
    with pytest.raises(ValueError, match="Tokenizer mismatch: the policy's tokenizer has 7 tokens, the drafter's 8"):
        SpeculativeEngine(policy, drafter, tokenizer=same, drafter_tokenizer=make_tokenizer(["a", "b", "c", "d"]))
    with pytest.raises(ValueError, match="token .a. has id 4 for the policy but 5 for the drafter"):
        SpeculativeEngine(policy, drafter, tokenizer=same, drafter_tokenizer=make_tokenizer(["b", "a", "c"]))


def test_config_errors_reach_the_engine():
    policy = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="num_draft_tokens must be >= 1"):
        SpeculativeEngine(policy, policy, SpecConfig(elastic=False, num_draft_tokens=0))
    with pytest.raises(ValueError, match="Unknown acceptance rule"):
        SpeculativeEngine(policy, policy, SpecConfig(acceptance="nope"))


@pytest.mark.parametrize(
    "ids, mask, max_new, message",
    [
        (torch.tensor([[5, 6, 7], [0, 0, 0]]), torch.tensor([[1, 1, 1], [0, 0, 0]]), 4, r"Prompt rows \[1\] are empty"),
        (torch.zeros(0, 4, dtype=torch.long), None, 4, "non-empty"),
        (torch.tensor([[5, 6, 7]]), torch.tensor([[1, 1]]), 4, "attention_mask has shape"),
        (torch.tensor([[5, 6, 7], [5, 6, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]), 4, "must be left-padded"),
        (torch.tensor([[5, 6, 7]]), None, 62, "beyond the policy's max_position_embeddings"),
        (torch.tensor([[5, 6, 999]]), None, 4, "outside"),
        (torch.tensor([[5.0, 6.0]]), None, 4, "integer token ids"),
        (torch.tensor([[5, 6]]), None, 0, "max_new_tokens must be >= 1"),
    ],
)
def test_bad_input_raises_clear_errors(engine, ids, mask, max_new, message):
    with pytest.raises(ValueError, match=message):
        engine.generate(ids, attention_mask=mask, max_new_tokens=max_new)


def test_bad_sampling_settings_raise(engine):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        engine.generate(torch.tensor([[5, 6]]), SamplingParams(temperature=0.0))


@pytest.mark.parametrize("broken", ["policy", "drafter"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_logits_raise_a_clear_error(broken, value):
    policy = tiny_causal_lm("llama", logit_scale=4.0)
    drafter = noised_copy(policy, 0.1)
    target = policy if broken == "policy" else drafter
    target.lm_head.register_forward_hook(lambda module, args, out: out.index_fill(-1, torch.tensor([7]), value))
    engine = SpeculativeEngine(policy, drafter, SpecConfig(elastic=False, num_draft_tokens=3))
    ids, mask = left_padded_prompts(4, 2, 6, 256, seed=0)
    for do_sample in (True, False):
        with pytest.raises(ValueError, match=f"The {broken} produced NaN or \\+inf logits"):
            engine.generate(ids, SamplingParams(do_sample=do_sample), attention_mask=mask, max_new_tokens=8)


def test_the_engine_calls_models_by_the_current_names_without_deprecation_notices():
    """transformers 5.2x renamed `past_key_values` to `cache` (the old name warns, and logs a notice once); the engine
    passes whichever name the installed version takes."""
    import logging
    import warnings

    policy = tiny_causal_lm("llama")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    library = logging.getLogger("transformers")
    logging.Logger.warning_once.cache_clear()  # a notice already given elsewhere in the session would hide this one
    library.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ids, mask = left_padded_prompts(3, 2, 6, 256, seed=0)
            SpeculativeEngine(policy, noised_copy(policy, 0.1), SpecConfig(elastic=False)).generate(
                ids, attention_mask=mask, max_new_tokens=6
            )
    finally:
        library.removeHandler(handler)
    notices = [r.getMessage() for r in records] + [str(w.message) for w in caught]
    assert not [n for n in notices if "deprecated" in n], notices
