"""The embedded RL workloads, shared by the recipe, the benchmarks and the studies: generated prompts in TRL's
conversational format (`prompt`: chat messages, `answer`: a string) and their reward functions (TRL's signature:
`reward(completions, answer, **kwargs) -> list[float]`).

- `arithmetic`: "What is a + b? Answer with the number only." Completions of a few tokens (≤ 24): a quick demo, but
  no long tail and little for a drafter to reuse.
- `reasoning`: "Compute (a + b) * c. Show your work step by step, then give the final answer." Completions of the
  embedded SmolLM2-135M run to a hundred tokens and more at T = 1 (reasoning length: a long tail, siblings that share
  phrasing), and the reward (the right final number, and the intermediate sum shown) moves the policy.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import Any

Reward = Callable[..., list[float]]


def _text(completion: Any) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def _numbers(completion: Any) -> list[str]:
    return re.findall(r"-?\d+", _text(completion).replace(",", ""))


def exact_match_reward(completions: list[Any], answer: list[str], **kwargs: Any) -> list[float]:
    """1 when the last number in the completion is the answer."""
    found = [_numbers(c) for c in completions]
    return [float(bool(numbers) and numbers[-1] == a.strip()) for numbers, a in zip(found, answer)]


def format_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """0.2 for answering with a bare number, as the arithmetic prompts ask."""
    return [0.2 * bool(re.fullmatch(r"\s*-?\d+\s*\.?\s*", _text(c))) for c in completions]


def shows_work_reward(completions: list[Any], intermediate: list[str], **kwargs: Any) -> list[float]:
    """0.2 when the completion states the intermediate result (a + b) the prompt's first step needs."""
    return [0.2 * (i.strip() in _numbers(c)) for c, i in zip(completions, intermediate)]


def arithmetic_task(num_examples: int, seed: int = 0, max_operand: int = 99) -> Any:
    """"What is a + b?" (or a - b, a * b with small operands) as a `datasets.Dataset`. SmolLM2-135M gets some of these
    right, so a reward on them gives RL a learning signal."""
    from datasets import Dataset

    rng = random.Random(seed)
    prompts, answers = [], []
    for _ in range(num_examples):
        op = rng.choice("+-*")
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand if op != "*" else 12)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        prompts.append([{"role": "user", "content": f"What is {a} {op} {b}? Answer with the number only."}])
        answers.append(str(value))
    return Dataset.from_dict({"prompt": prompts, "answer": answers})


def reasoning_task(num_examples: int, seed: int = 0, max_operand: int = 20) -> Any:
    """"Compute (a + b) * c. Show your work step by step, then give the final answer." as a `datasets.Dataset` with
    `answer` ((a + b) * c) and `intermediate` (a + b) columns: reasoning-length completions."""
    from datasets import Dataset

    rng = random.Random(seed)
    prompts, answers, intermediates = [], [], []
    for _ in range(num_examples):
        a, b, c = rng.randint(1, max_operand), rng.randint(1, max_operand), rng.randint(2, 9)
        question = f"Compute ({a} + {b}) * {c}. Show your work step by step, then give the final answer."
        prompts.append([{"role": "user", "content": question}])
        answers.append(str((a + b) * c))
        intermediates.append(str(a + b))
    return Dataset.from_dict({"prompt": prompts, "answer": answers, "intermediate": intermediates})


TASKS: dict[str, tuple[Callable[..., Any], list[Reward]]] = {
    "arithmetic": (arithmetic_task, [exact_match_reward, format_reward]),
    "reasoning": (reasoning_task, [exact_match_reward, shows_work_reward]),
}


def load_task(name: str, num_examples: int, seed: int = 0) -> tuple[Any, list[Reward]]:
    """The named embedded task's dataset and reward functions."""
    if name not in TASKS:
        raise ValueError(f"Unknown embedded task {name!r}: choose one of {', '.join(TASKS)}.")
    make, rewards = TASKS[name]
    return make(num_examples, seed=seed), list(rewards)


def chat_batch(tokenizer: Any, conversations: list[list[dict[str, str]]], device: Any = "cpu"):
    """Chat-templated, left-padded `(input_ids, attention_mask)` for a list of conversations."""
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return batch.input_ids.to(device), batch.attention_mask.to(device)
