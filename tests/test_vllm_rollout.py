"""GRPO with vLLM rollouts: the recipe trains on the embedded model with `--rollout_backend vllm`, vLLM serving the
adaptive drafter as its draft model, the policy synced after each step and vLLM's logprobs feeding the distiller.
Runs in the vLLM environment (`make vllm-env`); skipped where vLLM is not installed."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here: `make vllm-env` builds .venv-vllm, where it is")

from conftest import load_file_module  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "grpo_spec.py"


def test_the_recipe_trains_with_vllm_rollouts_serving_the_adaptive_drafter(tmp_path, capsys):
    argv = [
        "--rollout_backend", "vllm", "--max_steps", "2", "--max_completion_length", "12",
        "--per_device_train_batch_size", "4", "--num_generations", "4", "--num_examples", "16",
        "--report_to", "none", "--output_dir", str(tmp_path / "out"), "--use_cpu", "true",
        "--save_steps", "100", "--probe_every", "1", "--probe_prompts", "2", "--probe_max_new_tokens", "8",
        "--distill_min_buffer_tokens", "8",
    ]  # fmt: skip
    trainer = load_file_module(RECIPE).main(argv)
    assert trainer.state.global_step == 2
    rollout = next(cb for cb in trainer.callback_handler.callbacks if hasattr(cb, "rollout")).rollout
    assert type(rollout).__name__ == "VLLMRollout" and rollout._synced_step == 1  # synced after the first step
    assert rollout.totals.drafted > 0 and rollout.totals.verify_steps > 0  # vLLM speculated with the drafter
    assert rollout.adaptive.trainer.buffer.num_tokens > 0  # vLLM's top-K logprobs reached the distiller
    assert any("vLLM engine started (draft_model speculation" in event for event in rollout.events)
    assert len(rollout.probe.points) == 2 and (tmp_path / "out" / "adaptive_drafter.png").exists()
    printed = capsys.readouterr().out
    assert "acceptance" in printed and "not measured in this run" in printed
    assert (tmp_path / "out" / "drafter" / "adapter.safetensors").exists()
