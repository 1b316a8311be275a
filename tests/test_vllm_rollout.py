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


def test_the_recipe_trains_with_vllm_rollouts_serving_the_adaptive_drafter_elastically(tmp_path, capsys):
    """Elastic by default: the engine's first rollout warms it up, the second measures plain serving, the third
    speculation (timed against the second)."""
    argv = [
        "--config", str(RECIPE.parents[1] / "configs" / "grpo_spec_vllm.yaml"), "--max_steps", "3", "--max_completion_length", "12",
        "--per_device_train_batch_size", "4", "--num_generations", "4", "--num_examples", "16",
        "--report_to", "none", "--output_dir", str(tmp_path / "out"), "--use_cpu", "true",
        "--save_steps", "100", "--probe_every", "1", "--probe_prompts", "2", "--probe_max_new_tokens", "8",
        "--distill_min_buffer_tokens", "8",
        # the truncated drafter as vLLM's draft model (the YAML serves the EAGLE head: the next test)
        "--drafter_kind", "truncated", "--vllm_speculation", "draft_model", "--draft_vocab_size", "4096",
        "--drafter_adapter_path", "drafters/smollm2-135m-arithmetic", "--distill_loss", "fkl", "--distill_mix_weights", "",
    ]  # fmt: skip
    trainer = load_file_module(RECIPE).main(argv)
    assert trainer.state.global_step == 3
    rollout = next(cb for cb in trainer.callback_handler.callbacks if hasattr(cb, "rollout")).rollout
    assert type(rollout.backend).__name__ == "VLLMBackend" and rollout.backend._synced_step == 2  # synced each step
    assert rollout.totals.drafted > 0 and rollout.totals.verify_steps > 0  # vLLM speculated with the drafter
    assert rollout.adaptive.trainer.buffer.num_tokens > 0  # vLLM's top-K logprobs reached the distiller
    assert any("vLLM engine started (draft_model speculation, k=4, elastic" in event for event in rollout.events)
    assert any("vLLM serves speculatively from step 2 (measure_speculation" in event for event in rollout.events)
    logged = [row for row in trainer.state.log_history if "spec/vllm_speculative" in row]
    assert [row["spec/vllm_mode_measure_plain"] for row in logged] == [0.0, 1.0, 0.0]
    assert [row["spec/vllm_speculative"] for row in logged] == [0.0, 0.0, 1.0]
    assert len(rollout.probe.points) == 3 and (tmp_path / "out" / "adaptive_drafter.png").exists()
    printed = capsys.readouterr().out
    assert "acceptance" in printed and "measured speed-up" in printed and "x plain decoding" in printed
    assert (tmp_path / "out" / "drafter" / "adapter.safetensors").exists()


def test_the_recipe_trains_the_eagle_head_on_vllm_rollouts_with_features_from_the_loss_forward(tmp_path, capsys):
    """The YAML's drafter_kind eagle with --vllm_speculation eagle3: vLLM serves the head (exported as its EAGLE-3 checkpoint,
    reloaded as it trains), and the head's rows get the policy's features from the GRPO loss's forward (vLLM returns
    no hidden states)."""
    argv = [
        "--config", str(RECIPE.parents[1] / "configs" / "grpo_spec_vllm.yaml"), "--max_steps", "3", "--max_completion_length", "12",
        "--per_device_train_batch_size", "4", "--num_generations", "4", "--num_examples", "16",
        "--report_to", "none", "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--elastic", "false",
        "--save_steps", "100", "--probe_every", "2", "--probe_prompts", "2", "--probe_max_new_tokens", "8",
        "--distill_min_buffer_tokens", "8", "--distill_publish_every", "1",  # the YAML's drafter: the EAGLE head
    ]  # fmt: skip
    trainer = load_file_module(RECIPE).main(argv)
    assert trainer.state.global_step == 3
    rollout = next(cb for cb in trainer.callback_handler.callbacks if hasattr(cb, "rollout")).rollout
    assert any("vLLM engine started (eagle3 speculation, k=4" in event for event in rollout.events)
    assert rollout.totals.drafted > 0 and rollout.totals.accepted > 0  # vLLM drafted with the head, and it hit
    tap = rollout.adaptive.feature_tap
    assert tap.filled >= 12 and tap.dropped == 0  # every rollout row of the first steps met the loss's forward
    assert rollout.adaptive.trainer.buffer.num_tokens > 0
    assert (tmp_path / "out" / "drafter" / "adapter.safetensors").exists()
