"""The embedded workloads: datasets in TRL's conversational format and rewards that score what they say."""

import pytest

from adaptive_drafter.tasks import (
    TASKS,
    arithmetic_task,
    exact_match_reward,
    format_reward,
    load_task,
    reasoning_task,
    shows_work_reward,
)


def test_arithmetic_prompts_are_chat_messages_with_the_right_answers():
    data = arithmetic_task(50, seed=3)
    assert len(data) == 50 and data[0]["prompt"][0]["role"] == "user"
    for row in data:
        a, op, b = row["prompt"][0]["content"].removeprefix("What is ").split("?")[0].split()
        assert str(eval(f"{a} {op} {b}")) == row["answer"]  # noqa: S307 - generated digits and an operator
    assert arithmetic_task(50, seed=3)["prompt"] == data["prompt"]  # reproducible
    assert arithmetic_task(50, seed=4)["prompt"] != data["prompt"]


def test_reasoning_prompts_carry_the_answer_and_the_intermediate_step():
    data = reasoning_task(20, seed=1)
    for row in data:
        content = row["prompt"][0]["content"]
        a, b, c = (int(x) for x in content.removeprefix("Compute (").split(".")[0].replace(") *", " +").split(" + "))
        assert row["answer"] == str((a + b) * c) and row["intermediate"] == str(a + b)
        assert "step by step" in content


def test_rewards_score_the_final_number_the_bare_format_and_the_shown_work():
    completions = ["12 + 30 = 42, so the answer is 42", "Forty-two", "42", [{"role": "assistant", "content": "1,200"}]]
    assert exact_match_reward(completions, ["42", "42", "42", "1200"]) == [1.0, 0.0, 1.0, 1.0]
    assert format_reward(completions) == [0.0, 0.0, 0.2, 0.0]
    assert shows_work_reward(completions[:2], intermediate=["30", "30"]) == [0.2, 0.0]


def test_load_task_gives_a_dataset_and_its_rewards_and_names_the_choices_otherwise():
    for name in TASKS:
        dataset, rewards = load_task(name, 4)
        assert len(dataset) == 4 and rewards and all(callable(r) for r in rewards)
    with pytest.raises(ValueError, match="arithmetic, reasoning"):
        load_task("gsm9k", 4)
