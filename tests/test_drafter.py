import pytest
import torch

from adaptive_drafter.drafter import check_compatible, check_tokenizers, truncated_drafter
from adaptive_drafter.testing import ARCHITECTURES, tiny_causal_lm


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_truncated_drafter_copies_the_policys_first_layers(arch):
    policy = tiny_causal_lm(arch, num_layers=3)
    ids = torch.randint(3, 256, (2, 7))
    full = truncated_drafter(policy, 3)
    assert torch.allclose(full(input_ids=ids).logits, policy(input_ids=ids).logits, atol=1e-6)
    shallow = truncated_drafter(policy, 1)
    assert shallow.config.num_hidden_layers == 1 and policy.config.num_hidden_layers == 3
    # A copy, not a view: changing the drafter leaves the policy alone.
    with torch.no_grad():
        shallow.get_input_embeddings().weight.add_(1.0)
    assert not torch.equal(shallow.get_input_embeddings().weight, policy.get_input_embeddings().weight)


def test_truncated_drafter_rejects_impossible_depths():
    policy = tiny_causal_lm("llama", num_layers=2)
    with pytest.raises(ValueError, match="1 <= num_layers <= 2"):
        truncated_drafter(policy, 3)


def test_check_compatible_returns_the_shared_vocabulary():
    assert check_compatible(tiny_causal_lm(vocab_size=64), tiny_causal_lm(vocab_size=64)) == 64
    assert check_compatible(tiny_causal_lm(vocab_size=64), tiny_causal_lm(vocab_size=80), vocab_size=60) == 60
    with pytest.raises(ValueError, match="the tokenizer has 70 tokens"):
        check_compatible(tiny_causal_lm(vocab_size=64), tiny_causal_lm(vocab_size=80), vocab_size=70)


def test_check_tokenizers_names_special_token_mismatch(make_tokenizer):
    a, b = make_tokenizer(["x", "y"]), make_tokenizer(["x", "y"])
    check_tokenizers(a, b)
    b.pad_token = "<unk>"
    with pytest.raises(ValueError, match="pad_token_id is 0 for the policy but 3 for the drafter"):
        check_tokenizers(a, b)


from adaptive_drafter.config import DrafterConfig  # noqa: E402
from adaptive_drafter.drafter import AdapterVersion, adapter_state, build_drafter, load_adapter, save_adapter  # noqa: E402


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_build_truncated_drafter_with_lora(arch):
    policy = tiny_causal_lm(arch, num_layers=3)
    drafter = build_drafter(policy, DrafterConfig(drafter_num_layers=2, drafter_lora_r=4, drafter_lora_alpha=8))
    trainable = [n for n, p in drafter.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert drafter.get_base_model().config.num_hidden_layers == 2
    ids = torch.randint(3, 256, (2, 5))
    # A fresh LoRA adapter is a no-op (B = 0): the drafter equals the truncated copy.
    assert torch.allclose(drafter(input_ids=ids).logits, truncated_drafter(policy, 2)(input_ids=ids).logits, atol=1e-6)


def test_build_model_drafter_checks_the_vocabulary():
    policy = tiny_causal_lm("qwen2")
    drafter = build_drafter(
        policy, DrafterConfig(drafter_kind="model", drafter_lora_r=2), model=tiny_causal_lm("qwen2", seed=3)
    )
    assert drafter.peft_config["default"].r == 2
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        build_drafter(policy, DrafterConfig(drafter_kind="model"), model=tiny_causal_lm("qwen2", vocab_size=300))
    with pytest.raises(ValueError, match="pass model="):
        build_drafter(policy, DrafterConfig(drafter_kind="model"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(drafter_kind="medusa"), "Unknown drafter kind"),
        (dict(drafter_num_layers=0), "num_layers must be >= 1"),
        (dict(drafter_lora_r=0), "lora_r >= 1"),
        (dict(drafter_lora_dropout=1.0), "lora_dropout"),
        (dict(drafter_lora_target_modules=[]), "train nothing"),
    ],
)
def test_impossible_drafter_configs_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DrafterConfig(**kwargs)


def test_adapter_save_load_round_trip_with_versions(tmp_path):
    policy = tiny_causal_lm("llama", num_layers=2)
    trained = build_drafter(policy, DrafterConfig(drafter_num_layers=1, drafter_lora_r=4))
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.normal_()
    save_adapter(trained, tmp_path / "adapter", AdapterVersion(adapter_version=3, policy_version=41))
    save_adapter(trained, tmp_path / "adapter", AdapterVersion(adapter_version=4, policy_version=42))  # overwrite
    fresh = build_drafter(policy, DrafterConfig(drafter_num_layers=1, drafter_lora_r=4))
    assert load_adapter(fresh, tmp_path / "adapter") == AdapterVersion(4, 42)
    ids = torch.randint(3, 256, (2, 6))
    assert torch.equal(fresh(input_ids=ids).logits, trained(input_ids=ids).logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging or backup left behind
    assert all(torch.equal(a, b) for a, b in zip(adapter_state(fresh).values(), adapter_state(trained).values()))


def test_adapter_of_another_shape_is_refused(tmp_path):
    policy = tiny_causal_lm("llama", num_layers=2)
    save_adapter(
        build_drafter(policy, DrafterConfig(drafter_num_layers=1, drafter_lora_r=4)),
        tmp_path / "a",
        AdapterVersion(1, 1),
    )
    other = build_drafter(
        policy, DrafterConfig(drafter_num_layers=1, drafter_lora_r=4, drafter_lora_target_modules=["q_proj"])
    )
    with pytest.raises(ValueError, match="does not fit this drafter"):
        load_adapter(other, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="No drafter adapter"):
        load_adapter(other, tmp_path / "missing")


def test_model_drafter_from_a_path_with_another_tokenizer_is_refused(tmp_path, make_tokenizer):
    policy = tiny_causal_lm("llama", vocab_size=16)
    tiny_causal_lm("llama", vocab_size=16, seed=2).save_pretrained(tmp_path / "drafter")
    make_tokenizer(["b", "a", "c"]).save_pretrained(tmp_path / "drafter")
    config = DrafterConfig(drafter_kind="model", drafter_model_name_or_path=str(tmp_path / "drafter"))
    with pytest.raises(ValueError, match="Tokenizer mismatch"):
        build_drafter(policy, config, policy_tokenizer=make_tokenizer(["a", "b", "c"]))
    assert build_drafter(policy, config, policy_tokenizer=make_tokenizer(["b", "a", "c"])) is not None


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_reduced_vocab_drafter_is_the_head_over_a_subset(arch):
    from adaptive_drafter.drafter import ReducedVocabDrafter, build_drafter
    from adaptive_drafter.config import DrafterConfig

    policy = tiny_causal_lm(arch, num_layers=2)
    drafter = build_drafter(policy, DrafterConfig(drafter_num_layers=1, drafter_lora_r=4))
    subset = torch.tensor([3, 7, 50, 200])
    reduced = ReducedVocabDrafter(drafter, subset, 256)
    reduced.check()
    ids = torch.randint(3, 256, (2, 6))
    full, cut = drafter(input_ids=ids).logits, reduced(input_ids=ids).logits
    assert torch.allclose(cut[..., subset], full[..., subset], atol=1e-5)
    outside = torch.ones(256, dtype=torch.bool).index_fill(0, subset, False)
    assert bool((cut[..., outside] == -torch.inf).all())
    assert reduced(input_ids=ids, logits_to_keep=1).logits.shape == (2, 1, 256)


def test_reduced_vocab_refuses_heads_it_cannot_cut():
    from adaptive_drafter.drafter import ReducedVocabDrafter, build_drafter
    from adaptive_drafter.config import DrafterConfig

    policy = tiny_causal_lm("llama")
    scaled = truncated_drafter(policy, 1)  # logits scaled after the head, as soft-capping models do
    forward = scaled.forward

    def scaled_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = 0.5 * out.logits
        return out

    scaled.forward = scaled_forward
    with pytest.raises(ValueError, match="soft-capping"):
        ReducedVocabDrafter(scaled, torch.arange(3, 40), 256).check()
    lora_head = build_drafter(policy, DrafterConfig(drafter_num_layers=1, drafter_lora_target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="plain Linear LM head"):
        ReducedVocabDrafter(lora_head, torch.arange(3, 40), 256)


def trained_lora(drafter, seed: int, scale: float = 0.1) -> dict:
    """An adapter state with nonzero LoRA weights (a fresh LoRA's B is zero: merging it would prove nothing)."""
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator).to(v.dtype) * scale for k, v in adapter_state(drafter).items()}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_merged_copy_computes_what_the_peft_drafter_does_and_shares_the_rest(arch):
    from adaptive_drafter.drafter import load_adapter_state, merged_copy

    policy = tiny_causal_lm(arch, num_layers=2)
    drafter = build_drafter(policy, DrafterConfig(drafter_num_layers=1, drafter_lora_r=4))
    load_adapter_state(drafter, trained_lora(drafter, 0))
    before = {k: v.clone() for k, v in drafter.state_dict().items()}
    merged = merged_copy(drafter)
    ids = torch.randint(3, 256, (2, 9))
    with torch.no_grad():
        full, fused = drafter(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(full, fused, atol=1e-5) and not any("lora_" in n for n, _ in merged.named_parameters())
    assert merged.get_input_embeddings().weight is drafter.get_input_embeddings().weight  # not copied
    assert all(torch.equal(v, before[k]) for k, v in drafter.state_dict().items())  # the original is untouched
