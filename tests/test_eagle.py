"""The EAGLE-style head (`adaptive_drafter.eagle`): drafts from the policy's own features, kept in step by the verify
pass; lossless like every draft source."""

from __future__ import annotations

import pytest
import torch
from test_engine import PAD, STEPS, VOCAB, assert_within_noise, exact_joint, first_tokens_joint, reference_greedy

from adaptive_drafter import SpecConfig, SpeculativeEngine
from adaptive_drafter.eagle import LAYOUTS, EagleHead, HeadCache, feature_layers
from adaptive_drafter.sampling import SamplingParams
from adaptive_drafter.testing import left_padded_prompts, tiny_causal_lm


def features_of(policy, sequence: list[int], layers: tuple[int, ...] = (-1,)) -> torch.Tensor:
    """The outputs (pre-norm) of the policy's `layers`, concatenated in layer order, at every position of `sequence`,
    from scratch."""
    seen = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
        for m in feature_layers(policy, layers)
    ]
    try:
        with torch.no_grad():
            policy(input_ids=torch.tensor([sequence]))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat([s[0] for s in seen], -1)


def perturbed(head: EagleHead, scale: float, seed: int = 0) -> EagleHead:
    """`head` with random weights of `scale` added on its fused (non-top) feature slots, so that they matter."""
    generator = torch.Generator().manual_seed(seed)
    top = head.feature_size - head.config.hidden_size
    with torch.no_grad():
        noise = torch.randn(head.fc.weight[:, :top].shape, generator=generator, dtype=torch.float64)
        head.fc.weight[:, :top] += scale * noise.to(head.dtype)
    return head


EVEN_IDS = list(range(0, 256, 2))  # a draft vocabulary: half the tokens, the others only ever emitted by the policy


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("layers", [(-1,), (0, 1)], ids=["last", "fused"])
@pytest.mark.parametrize("draft_ids", [None, EVEN_IDS], ids=["all-tokens", "draft-vocab"])
def test_greedy_with_the_head_is_token_identical_to_policy_generate(layout, arch, k, layers, draft_ids):
    policy = tiny_causal_lm(arch, logit_scale=8.0)
    head = perturbed(EagleHead(policy, layers, draft_ids, layout), 0.05)
    ids, mask = left_padded_prompts(6, 2, 12, 256, seed=3)
    engine = SpeculativeEngine(policy, head, SpecConfig(elastic=False, num_draft_tokens=k))
    out = engine.generate(ids, SamplingParams(do_sample=False), attention_mask=mask, max_new_tokens=24, eos_token_id=7)
    assert out.completion_ids == reference_greedy(policy, ids, mask, 24, eos=7)
    assert 0 < out.stats.drafted <= out.stats.verify_steps * k  # (k shrinks near max_new_tokens)


@pytest.mark.parametrize("layers", [(-1,), (0, 1)], ids=["last", "fused"])
def test_every_draft_is_the_head_over_the_policys_true_features(layers):
    """The head's incremental cache (catch-up on verified pairs, fed-back draft slots turned into holes, compaction,
    finished rows leaving) gives exactly what the head computes from scratch over the policy's features (the last
    layer's, or two layers' fused): the first draft of every step is argmax q over the true pair before it, the second
    (where the first was accepted) the fed-back chain of `unroll`'s second pass."""
    policy = tiny_causal_lm("llama", num_layers=len(layers), logit_scale=8.0).double()
    head = EagleHead(policy, layers, layout="eagle")  # fc reads the embedding: the setup below needs it
    hidden = policy.config.hidden_size
    with torch.no_grad():  # the head reads mostly the next token's embedding: with the policy's last layer it is
        head.fc.weight.zero_()  # close to the policy minus its first token, agreeing often enough for second drafts
        head.fc.weight[:, head.feature_size :].copy_(torch.eye(hidden))  # to be checked; features weigh a little
    perturbed(head, 0.02)  # (fused only: the low slot)
    with torch.no_grad():
        head.fc.weight[:, head.feature_size - hidden : head.feature_size] += 0.02 * torch.eye(hidden, dtype=head.dtype)
    ids, mask = left_padded_prompts(5, 8, 16, 256, seed=11)
    engine = SpeculativeEngine(policy, head, SpecConfig(elastic=False, num_draft_tokens=2))
    drafts: list[tuple[int, int, int, int, int]] = []  # (row, completion position, depth, draft, accepted)

    def record(plan, step):
        for i, row in enumerate(step.rows):
            done = len(out_rows[row]) + 1  # the prefill emitted the first token
            for depth in range(step.width):
                drafts.append((row, done, depth, int(step.block[i, 1 + depth]), int(step.accepted[i])))
            out_rows[row].extend(step.emitted[i])

    out_rows: dict[int, list[int]] = {row: [] for row in range(len(ids))}
    engine.step_hooks.append(record)
    out = engine.generate(ids, SamplingParams(do_sample=False), attention_mask=mask, max_new_tokens=20, eos_token_id=5)
    checked = {0: 0, 1: 0}
    for row, completion in enumerate(out.completion_ids):
        prompt = ids[row][mask[row].bool()].tolist()
        sequence = prompt + completion
        features = features_of(policy, sequence, layers)
        nxt = torch.tensor([sequence[1:] + [0]])
        with torch.no_grad():
            passes = [head.logits(g[0]).argmax(-1) for g in head.unroll(features[None], nxt, 2)]
        # The prefill emitted completion[0]; the step at completion position p (p tokens emitted) drafts x_{L+p}.
        for r, done, depth, token, accepted in drafts:
            if r != row or depth > accepted:
                continue
            position = len(prompt) + done - 1 + depth  # the chain's pair (f_s, x_{s+1}) predicting x_{s+2}
            assert token == int(passes[depth][position - 1]), (row, done, depth)
            checked[depth] += 1
    assert checked[0] > 30 and checked[1] > 5, checked
    assert out.completion_ids == reference_greedy(policy, ids, mask, 20, eos=5)


@pytest.mark.parametrize(
    ("layers", "draft_ids", "layout"),
    [((-1,), None, "eagle"), ((0, 1), None, "eagle"), ((-1,), [0, 2, 3, 5], "eagle"), ((0, 1), [0, 2, 3, 5], "eagle3")],
    ids=["last", "fused", "draft-vocab", "eagle3-fused-draft-vocab"],
)
def test_sampled_joint_distribution_with_the_head_is_the_policys(layers, draft_ids, layout):
    policy = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=16, logit_scale=3.0, seed=0).double()
    head = perturbed(EagleHead(policy, layers, draft_ids, layout), 0.05)
    prompt = [3, 1, 4, 5]
    rows = 4000
    target = exact_joint(policy, prompt, SamplingParams(do_sample=True))
    engine = SpeculativeEngine(policy, head, SpecConfig(elastic=False, num_draft_tokens=2))
    ids = torch.tensor([prompt]).expand(rows, -1)
    out = engine.generate(ids, max_new_tokens=STEPS, seed=0)
    assert_within_noise(first_tokens_joint(out.completion_ids)[0], target, rows)
    assert 0.1 < out.stats.acceptance_rate < 0.95, out.stats  # drafts both accepted and rejected: the test has power


@pytest.mark.parametrize("layout", LAYOUTS)
def test_drafting_step_by_step_computes_what_the_training_unroll_computes(layout):
    """The draft path (catch-up on true pairs, then the head's own output fed back) and the training-time test's
    `unroll` are one computation: the d-th fed-back step from position s equals pass d + 1 of `unroll` at s + d. In the
    eagle3 layout a fed-back output skips fc, in the eagle layout it takes the top feature slot."""
    torch.manual_seed(0)
    policy = tiny_causal_lm("llama", num_layers=3, logit_scale=4.0).double()
    head = perturbed(EagleHead(policy, (0, -1), layout=layout).double(), 0.1)
    features = torch.randn(1, 9, head.feature_size, dtype=torch.float64)
    tokens = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        passes = head.unroll(features, tokens, 3)
        for start in (0, 4, 6):
            cache = HeadCache.empty(1, tokens.device)
            ones = torch.ones(1, start + 1, dtype=torch.bool)
            g = head.step(cache, features[:, : start + 1], tokens[:, : start + 1], ones)[:, -1:]
            torch.testing.assert_close(g[0, 0], passes[0][0, start])
            for d in (1, 2):
                g = head.step(cache, g, tokens[:, start + d : start + d + 1], ones[:, :1], fed_back=True)
                torch.testing.assert_close(g[0, 0], passes[d][0, start + d])


def test_an_eagle3_head_exports_as_vllms_eagle3_draft_checkpoint(tmp_path):
    """Names, shapes and config of vLLM's Eagle3LlamaForCausalLM (llama_eagle3.py): fc over the fused features, q/k/v
    reading [embedding, feature] (2H), its own norm and draft-vocabulary LM head (copies of the policy's), d2t, and
    the aux layer ids one above the head's feature layers. A head in the other layout, or with unmerged LoRA, is
    refused."""
    import json

    from safetensors.torch import load_file

    from adaptive_drafter.eagle import export_eagle3

    policy = tiny_causal_lm("llama", num_layers=3, logit_scale=4.0)
    hidden = policy.config.hidden_size
    head = EagleHead(policy, (0, -1), EVEN_IDS, "eagle3")
    export_eagle3(head, tmp_path / "e3")
    config = json.loads((tmp_path / "e3" / "config.json").read_text())
    weights = load_file(tmp_path / "e3" / "model.safetensors")
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["num_hidden_layers"] == 1
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 3] and config["num_aux_hidden_states"] == 2
    assert config["draft_vocab_size"] == len(EVEN_IDS) and config["vocab_size"] == 256
    assert weights["fc.weight"].shape == (hidden, 2 * hidden)
    assert weights["midlayer.self_attn.q_proj.weight"].shape[1] == 2 * hidden
    assert {"midlayer.hidden_norm.weight", "midlayer.input_layernorm.weight", "norm.weight"} <= set(weights)
    assert torch.equal(weights["lm_head.weight"], policy.lm_head.weight[EVEN_IDS].detach())
    assert torch.equal(weights["norm.weight"], policy.model.norm.weight.detach())
    d2t = weights["d2t"]
    assert (torch.arange(len(EVEN_IDS)) + d2t).tolist() == EVEN_IDS  # vLLM: target id = draft id + d2t[draft id]
    with pytest.raises(ValueError, match="'eagle3' layout"):
        export_eagle3(EagleHead(policy, layout="eagle"), tmp_path / "other")
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(EagleHead(policy, layout="eagle3"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="merged copy"):
        export_eagle3(wrapped.base_model.model, tmp_path / "lora")


def test_a_policy_without_a_llama_style_decoder_is_refused_clearly():
    class Opaque(torch.nn.Module):
        config = tiny_causal_lm("llama").config

    with pytest.raises(ValueError, match="drafter_kind='truncated'"):
        EagleHead(Opaque())


# --- training from the verify pass's features ---------------------------------------------------------------------


def rollout_targets(engine, seed: int, rows: int = 24):
    ids, mask = left_padded_prompts(rows, 3, 10, 256, seed=seed)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=20, collect_topk=16, seed=seed)
    return out


@pytest.mark.parametrize("layers", [(-1,), (0, 2), (0, 1, 2)], ids=["last", "two", "three"])
def test_the_verify_pass_collects_the_policys_features_at_every_position_it_read(layers):
    """The head's feature layers' outputs, concatenated in layer order (EAGLE-3's low/mid/high for three)."""
    policy = tiny_causal_lm("llama", num_layers=3, logit_scale=4.0)
    engine = SpeculativeEngine(policy, EagleHead(policy, layers), SpecConfig(elastic=False, num_draft_tokens=3))
    out = rollout_targets(engine, seed=1, rows=6)
    for targets in out.targets:
        sequence = targets.prompt_ids + targets.completion_ids
        expected = features_of(policy, sequence, layers)[:-1]  # the last token is never read
        assert targets.features.shape == expected.shape and targets.features.dtype == torch.bfloat16
        torch.testing.assert_close(targets.features.float(), expected, atol=0.05, rtol=0.02)


@pytest.mark.parametrize(
    ("layers", "vocab", "layout"),
    [((-1,), 0, "eagle"), ((0, 1), 0, "eagle"), ((-1,), 128, "eagle"), ((-1,), 0, "eagle3"), ((0, 1), 0, "eagle3")],
    ids=["last", "fused", "draft-vocab", "eagle3", "eagle3-fused"],
)
def test_training_the_head_on_collected_features_raises_its_acceptance_at_every_depth(layers, vocab, layout):
    from adaptive_drafter.eagle_distill import acceptance_by_depth, collate_features, eagle_loss

    torch.manual_seed(0)
    policy = tiny_causal_lm("llama", logit_scale=8.0)
    head = EagleHead(policy, layers, layout=layout)
    engine = SpeculativeEngine(policy, head, SpecConfig(elastic=False, num_draft_tokens=3))
    train = [t for seed in range(4) for t in rollout_targets(engine, seed=10 + seed).targets]
    if vocab:  # the `vocab` tokens with the most policy mass in the training rows (as scripts/distill_eagle.py does)
        mass = torch.zeros(policy.config.vocab_size)
        for t in train:
            mass.index_add_(0, t.topk_ids.flatten().long(), t.topk_logprobs.flatten().float().exp())
        head = EagleHead(policy, layers, mass.topk(vocab).indices, layout)
        engine = SpeculativeEngine(policy, head, SpecConfig(elastic=False, num_draft_tokens=3))
    held_out = rollout_targets(engine, seed=99).targets
    before = acceptance_by_depth(head, held_out, depth=3)
    untrained = rollout_targets(engine, seed=98).stats
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=5e-3)
    for step in range(200):
        rows = [train[(8 * step + i) % len(train)] for i in range(8)]
        batch, features = collate_features(rows)
        loss, _, _ = eagle_loss(head, batch, features, depth=2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = acceptance_by_depth(head, held_out, depth=3)
    # The tiny policy spreads its mass: a draft vocabulary caps α at the held-out mass inside it (0.19 for 128 of 256
    # tokens), so there the head must close half the gap to that ceiling.
    inside = torch.zeros(policy.config.vocab_size, dtype=torch.bool)
    inside[head.draft_ids if vocab else slice(None)] = True
    ceiling = sum(float(t.topk_logprobs.float().exp()[inside[t.topk_ids.long()]].sum()) for t in held_out)
    ceiling /= sum(t.num_tokens for t in held_out)
    assert all(a > b + min(0.08, (ceiling - b) / 2) for a, b in zip(after, before)), (before, after, ceiling)
    trained = rollout_targets(engine, seed=98).stats  # the engine drafts with the trained head: more accepted
    assert trained.acceptance_rate > untrained.acceptance_rate + 0.05, (untrained, trained)


def test_the_eagle_kind_is_distilled_online_through_lora_and_hot_swapped():
    """drafter_kind='eagle': LoRA on the head's layer and its fusion layer trained whole, by the background trainer
    from the features every rollout collected; each published version is swapped in and drafts better."""
    from adaptive_drafter.adaptive import AdaptiveDrafter
    from adaptive_drafter.config import DistillConfig, DrafterConfig
    from adaptive_drafter.drafter import build_drafter
    from adaptive_drafter.trainer import DrafterTrainer

    torch.manual_seed(0)
    policy = tiny_causal_lm("llama", num_layers=3, logit_scale=8.0)
    # The eagle layout: an untrained eagle3 head already drafts well on this tiny policy (0.41), leaving little to show.
    config = DrafterConfig(drafter_kind="eagle", drafter_eagle_layout="eagle", drafter_lora_r=8, drafter_lora_alpha=16)
    drafter = build_drafter(policy, config)
    trainable = {name for name, p in drafter.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or ".fc." in name for name in trainable), sorted(trainable)[:4]
    config = DistillConfig(
        distill_min_buffer_tokens=64, distill_publish_every=4, distill_learning_rate=5e-3, distill_topk=16
    )
    trainer = DrafterTrainer(drafter, config)
    spec = SpecConfig(elastic=False, num_draft_tokens=3)
    adaptive = AdaptiveDrafter(drafter, trainer=trainer)
    engine = SpeculativeEngine(policy, drafter, spec)

    def rollout(seed):
        ids, mask = left_padded_prompts(16, 2, 8, 256, seed=seed)
        return adaptive.generate(engine, ids, attention_mask=mask, max_new_tokens=24, seed=seed)

    before = rollout(100).stats.acceptance_rate
    for seed in range(1, 7):
        out = rollout(seed)
        assert out.targets[0].features is not None  # the verify pass fed the buffer
        for _ in range(12):
            trainer.step()
    after = rollout(100)
    assert adaptive.adapter_version is not None and adaptive.adapter_version.adapter_version >= 10
    assert after.stats.acceptance_rate > before + 0.1, (before, after.stats.acceptance_rate)


def test_a_saved_head_loads_back_and_one_for_another_policy_is_refused(tmp_path):
    from adaptive_drafter.eagle import load_head, save_head

    policy = tiny_causal_lm("llama", logit_scale=8.0)
    head = EagleHead(policy, layout="eagle")
    with torch.no_grad():
        head.fc.bias.add_(0.5)
    save_head(head, tmp_path / "head", made_by="test")
    loaded = load_head(policy, tmp_path / "head")
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), loaded.state_dict().values()))
    fused = EagleHead(policy, (0, 1), draft_ids=[9, 3, 5])  # the feature layers and the draft vocabulary travel with it
    save_head(fused, tmp_path / "fused")
    loaded = load_head(policy, tmp_path / "fused")
    assert loaded.feature_layers == (0, 1) and loaded.draft_ids.tolist() == [3, 5, 9]
    eagle3 = EagleHead(policy, (0, 1))  # and the layout (eagle3 by default)
    save_head(eagle3, tmp_path / "eagle3")
    assert load_head(policy, tmp_path / "eagle3").layout == "eagle3" and loaded.layout == "eagle3"
    assert load_head(policy, tmp_path / "head").layout == "eagle"
    other = tiny_causal_lm("llama", hidden_size=48, logit_scale=8.0)
    with pytest.raises(ValueError, match="made for another policy"):
        load_head(other, tmp_path / "head")


def test_without_an_eagle_drafter_the_engine_collects_the_layers_it_is_told():
    """`engine.feature_layers` with `collect_features`: data for heads over any of those layers, whatever drafts."""
    policy = tiny_causal_lm("llama", num_layers=3, logit_scale=4.0)
    drafter = tiny_causal_lm("llama", num_layers=1, logit_scale=4.0, seed=5)
    engine = SpeculativeEngine(policy, drafter, SpecConfig(elastic=False, num_draft_tokens=2))
    engine.collect_features, engine.feature_layers = True, (2, 0)
    for targets in rollout_targets(engine, seed=2, rows=4).targets:
        expected = features_of(policy, targets.prompt_ids + targets.completion_ids, (0, 2))[:-1]
        torch.testing.assert_close(targets.features.float(), expected, atol=0.05, rtol=0.02)


def test_a_fused_head_starts_as_the_head_over_the_last_layer():
    """fc starts as the identity on the top layer's slot and zero on the others: a fused head's first outputs, and
    its fed-back ones, are the last-layer head's, so fusing can only be learnt on top of it."""
    torch.manual_seed(0)
    policy = tiny_causal_lm("llama", num_layers=3, logit_scale=4.0).double()
    last = EagleHead(policy, layout="eagle").double()
    fused = EagleHead(policy, (0, 1, -1), layout="eagle").double()
    hidden = policy.config.hidden_size
    with torch.no_grad():  # the same random start elsewhere
        fused.layer.load_state_dict(last.layer.state_dict())
        fused.fc.weight[:, -hidden:].copy_(last.fc.weight[:, -hidden:])
    assert fused.fc.weight.shape == (hidden, 4 * hidden) and fused.feature_layers == (0, 1, 2)
    features = torch.randn(2, 7, 3 * hidden, dtype=torch.float64)
    tokens = torch.randint(0, 256, (2, 7))
    for a, b in zip(fused.unroll(features, tokens, 3), last.unroll(features[..., -hidden:], tokens, 3)):
        torch.testing.assert_close(a, b)


def test_feature_layers_that_repeat_or_fall_outside_the_policy_are_refused():
    policy = tiny_causal_lm("llama", num_layers=3)
    for layers in [(1, 1), (3,), (-4,), ()]:
        with pytest.raises(ValueError, match="distinct indices"):
            EagleHead(policy, layers)


def test_serving_copies_of_the_head_share_the_policys_modules_and_read_the_rollout_copy():
    """A served head (merged, or cast to the rollouts' precision) never copies the policy's embedding and LM head, and
    reads those of the policy as rollouts compute it; the head the trainer trains keeps the training policy's."""
    from adaptive_drafter.adaptive import AdaptiveDrafter
    from adaptive_drafter.config import DrafterConfig
    from adaptive_drafter.drafter import build_drafter
    from adaptive_drafter.eagle import eagle_head
    from adaptive_drafter.precision import RolloutCopy, resolve_rollout_dtype

    policy = tiny_causal_lm("llama", num_layers=3, logit_scale=8.0)
    drafter = build_drafter(policy, DrafterConfig(drafter_kind="eagle", drafter_lora_r=8))
    trained, adaptive = eagle_head(drafter), AdaptiveDrafter(drafter)
    merged = eagle_head(adaptive.draft_model())
    assert merged is not trained and merged.layer is not trained.layer
    assert all(a is b for a, b in zip(merged._shared, trained._shared))  # shared, not copied

    rollout = RolloutCopy.build(policy, resolve_rollout_dtype("bfloat16", policy)).model
    adaptive.serving_dtype, adaptive.serving_policy = torch.bfloat16, rollout
    served = eagle_head(adaptive.draft_model())
    assert served.dtype == torch.bfloat16 and served._shared[2] is rollout.get_output_embeddings()
    assert trained._shared[2] is policy.get_output_embeddings() and trained.dtype == torch.float32
    engine = SpeculativeEngine(rollout, drafter, SpecConfig(elastic=False, num_draft_tokens=3))
    ids, mask = left_padded_prompts(8, 2, 8, 256, seed=3)
    out = adaptive.generate(engine, ids, SamplingParams(do_sample=False), attention_mask=mask, max_new_tokens=16)
    expected = reference_greedy(rollout, ids, mask, 16, eos=[])
    assert out.stats.drafted > 0
    assert sum(a == b for a, b in zip(out.completion_ids, expected)) >= 7  # bf16 near-ties may flip a row


def test_the_heads_loss_writes_no_gradient_into_the_policy_it_reads():
    """The head reads the policy's embedding, norm and LM head, which may be training in the same process: its loss
    must leave their gradients alone (the background trainer's backward runs between the policy's own steps)."""
    from adaptive_drafter.eagle_distill import collate_features, eagle_loss

    policy = tiny_causal_lm("llama", logit_scale=8.0).train().requires_grad_(True)
    for draft_ids in (None, EVEN_IDS):
        head = EagleHead(policy, draft_ids=draft_ids)
        engine = SpeculativeEngine(policy, head, SpecConfig(elastic=False, num_draft_tokens=2))
        batch, features = collate_features(rollout_targets(engine, seed=5, rows=4).targets)
        loss, _, _ = eagle_loss(head, batch, features, depth=2)
        loss.backward()
        assert all(p.grad is None for p in policy.parameters())
        assert head.fc.weight.grad is not None and head.layer.self_attn.q_proj.weight.grad is not None


def test_the_head_reads_the_policys_weights_without_calling_or_swapping_its_modules():
    """The background trainer computes the head's loss while the policy's own forward may run in another thread: the
    head must only read the policy's embedding, norm and LM head weights, never call those modules or put other
    tensors in their place (a swap, as torch.func.functional_call does, untied the policy's embedding and LM head for
    the length of a call and broke the rollout copy's sync in a GRPO run)."""
    from adaptive_drafter.eagle_distill import collate_features, eagle_loss

    policy = tiny_causal_lm("llama", logit_scale=8.0, tie_word_embeddings=True).train().requires_grad_(True)
    decoder, head_module = policy.model, policy.lm_head
    assert decoder.embed_tokens.weight is head_module.weight
    head = EagleHead(policy, draft_ids=EVEN_IDS)
    engine = SpeculativeEngine(policy, head, SpecConfig(elastic=False, num_draft_tokens=2))
    rows = rollout_targets(engine, seed=5, rows=4).targets
    seen = []
    for module in (decoder.embed_tokens, decoder.norm, head_module):
        module.register_forward_pre_hook(lambda m, args: seen.append((type(m).__name__, m.weight is weights[m])))
    weights = {m: m.weight for m in (decoder.embed_tokens, decoder.norm, head_module)}
    batch, features = collate_features(rows)
    eagle_loss(head, batch, features, depth=2)[0].backward()
    assert seen == [] and decoder.embed_tokens.weight is head_module.weight
    assert all(p.grad is None for p in policy.parameters())


def test_targets_over_a_draft_vocabulary_drop_the_ids_outside_it_and_renormalise():
    from adaptive_drafter.eagle_distill import head_logits, in_draft_vocab
    from adaptive_drafter.targets import DistillBatch

    policy = tiny_causal_lm("llama", logit_scale=8.0)
    head = EagleHead(policy, draft_ids=[4, 8, 2])  # draft indices: 2 -> 0, 4 -> 1, 8 -> 2
    p = torch.tensor([[[0.5, 0.25, 0.125]]])  # on ids 8, 3 (outside), 2; 0.125 on unlisted ids
    batch = DistillBatch(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long),
                         torch.tensor([[[8, 3, 2]]]), p.log(), torch.ones(1, 1, dtype=torch.bool),
                         torch.zeros(1, 1, dtype=torch.bool), torch.zeros(1, dtype=torch.long))  # fmt: skip
    target = in_draft_vocab(head, batch)
    assert target.topk_ids.tolist() == [[[2, 3, 0]]]  # id 3 at the column of ids outside the vocabulary
    assert torch.allclose(target.topk_logprobs.exp(), torch.tensor([[[0.5 / 0.75, 0.0, 0.125 / 0.75]]]))
    logits = head_logits(head, torch.randn(5, policy.config.hidden_size))
    assert logits.shape == (5, 4) and torch.all(logits[:, 3].float().softmax(-1) >= 0)
    assert float(torch.cat([logits[:, :3], logits[:, 3:]], -1).float().softmax(-1)[:, 3].max()) == 0.0
    full = head.full_logits(torch.randn(5, policy.config.hidden_size), policy.config.vocab_size)
    assert torch.isfinite(full[:, [2, 4, 8]]).all() and torch.isneginf(full).sum() == 5 * (full.shape[1] - 3)


def test_the_online_kind_warm_starts_from_a_distilled_head_with_its_draft_vocabulary(tmp_path):
    """drafter_adapter_path naming a head (scripts/distill_eagle.py) makes it the base the LoRA adapts: the drafter
    drafts what the head drafts, over its draft vocabulary; a head handed to a drafter built without it is refused."""
    from adaptive_drafter.adaptive import AdaptiveDrafter
    from adaptive_drafter.config import DistillConfig, DrafterConfig
    from adaptive_drafter.drafter import build_drafter
    from adaptive_drafter.eagle import eagle_head, save_head

    policy = tiny_causal_lm("llama", num_layers=3, logit_scale=8.0)
    head = perturbed(EagleHead(policy, draft_ids=EVEN_IDS, layout="eagle"), 0.05)
    with torch.no_grad():
        head.fc.bias.add_(0.1)
    save_head(head, tmp_path / "head")
    config = DrafterConfig(drafter_kind="eagle", drafter_lora_r=4, drafter_adapter_path=str(tmp_path / "head"))
    drafter = build_drafter(policy, config)
    assert eagle_head(drafter).draft_ids.tolist() == EVEN_IDS
    adaptive = AdaptiveDrafter(drafter, distill_config=DistillConfig())
    assert adaptive.warm_start(tmp_path / "head").adapter_version == 0
    ids, mask = left_padded_prompts(4, 2, 8, 256, seed=1)
    spec = SpecConfig(elastic=False, num_draft_tokens=3)
    greedy = SamplingParams(do_sample=False)
    kwargs = dict(attention_mask=mask, max_new_tokens=16, seed=0)

    def drafted(model):
        tokens = []
        engine = SpeculativeEngine(policy, model, spec)
        engine.step_hooks.append(lambda plan, step: tokens.extend(step.block[:, 1 : 1 + step.width].flatten().tolist()))
        engine.generate(ids, greedy, **kwargs)
        return tokens

    served = drafted(adaptive.draft_model())
    assert len(served) > 10 and served == drafted(head) and set(served) <= set(EVEN_IDS)
    engine = SpeculativeEngine(policy, drafter, spec)
    out = adaptive.generate(engine, ids, greedy, **kwargs)  # the share of its tokens the draft vocabulary covers
    flat = [t for row in out.completion_ids for t in row]
    coverage = sum(t % 2 == 0 for t in flat) / len(flat)
    assert adaptive.metrics(out.stats)["spec/draft_vocab_coverage"] == pytest.approx(coverage) and coverage < 1
    fresh = AdaptiveDrafter(build_drafter(policy, DrafterConfig(drafter_kind="eagle", drafter_lora_r=4)))
    with pytest.raises(ValueError, match="loaded when the drafter is built"):
        fresh.warm_start(tmp_path / "head")


def test_rows_without_features_get_them_from_the_policys_next_forward_over_the_same_sequences():
    """An engine without hidden states (vLLM): the FeatureTap fills its rows from the GRPO loss's forward (left-padded
    prompts, right-padded completions, as TRL batches them), equal to what the verify pass collects; rows that forward
    did not contain are dropped when the next rollout's come, and forwards with a KV cache (decoding) are not read."""
    import dataclasses

    from adaptive_drafter.eagle_distill import FeatureTap

    policy = tiny_causal_lm("llama", num_layers=3, logit_scale=4.0)
    layers = (0, -1)
    engine = SpeculativeEngine(policy, EagleHead(policy, layers), SpecConfig(elastic=False, num_draft_tokens=2))
    rows = rollout_targets(engine, seed=4, rows=5).targets
    received = []
    tap = FeatureTap(policy, layers, received.extend)
    tap.expect([dataclasses.replace(row, features=None) for row in rows])
    prompt_ids, prompt_mask = left_padded_prompts(2, 3, 6, 256, seed=0)
    engine.generate(prompt_ids, attention_mask=prompt_mask, max_new_tokens=4)  # decoding: not read
    assert received == [] and len(tap.waiting) == 5
    batch = rows[:3]  # the loss's micro-batch: three of the five rows
    prompt_width = max(len(r.prompt_ids) for r in batch)
    width = max(len(r.completion_ids) for r in batch) + 2  # completions padded past the longest
    ids = torch.zeros(3, prompt_width + width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(batch):
        p, c = len(row.prompt_ids), len(row.completion_ids)
        ids[b, prompt_width - p : prompt_width] = torch.tensor(row.prompt_ids)
        ids[b, prompt_width : prompt_width + c] = torch.tensor(row.completion_ids)
        mask[b, prompt_width - p : prompt_width + c] = 1
    policy(input_ids=ids, attention_mask=mask).logits.sum().backward()  # a training forward, gradients on
    assert [r.completion_ids for r in received] == [r.completion_ids for r in batch]
    for got, want in zip(received, batch):
        assert got.features.dtype == torch.bfloat16 and got.features.shape == want.features.shape
        torch.testing.assert_close(got.features.float(), want.features.float(), atol=0.05, rtol=0.02)
    assert len(tap.waiting) == 2 and tap.filled == 3 and tap.dropped == 0
    import copy

    waiting_row = torch.tensor([rows[3].prompt_ids + rows[3].completion_ids])
    copy.deepcopy(policy)(input_ids=waiting_row)  # a copy of the policy (the probe's snapshot) feeds nothing
    assert tap.filled == 3 and len(tap.waiting) == 2
    tap.expect(rows[3:4])  # the next rollout: what the last one's forwards did not contain is dropped
    assert tap.dropped == 2 and len(tap.waiting) == 1
    tap.close()
    policy(input_ids=torch.tensor([rows[3].prompt_ids + rows[3].completion_ids]))
    assert len(received) == 3  # hooks gone


def test_the_adaptive_head_exports_for_vllm_and_resends_its_weights_when_the_lora_or_the_policy_moved(tmp_path):
    """What the vLLM backend serves: the merged head as an EAGLE-3 checkpoint; its weights again whenever LoRA or the
    policy's norm and LM head (which the checkpoint copies) were written. A head in the other layout is refused."""
    import json

    from adaptive_drafter.adaptive import AdaptiveDrafter
    from adaptive_drafter.config import DrafterConfig
    from adaptive_drafter.drafter import build_drafter

    policy = tiny_causal_lm("llama", num_layers=3, logit_scale=8.0)
    drafter = build_drafter(
        policy, DrafterConfig(drafter_kind="eagle", drafter_eagle_layout="eagle3", drafter_lora_r=4)
    )
    adaptive = AdaptiveDrafter(drafter)
    adaptive.export(tmp_path / "e3")
    assert json.loads((tmp_path / "e3" / "config.json").read_text())["architectures"] == ["LlamaForCausalLMEagle3"]
    assert adaptive.serving_weights() == {}  # nothing moved since the export
    with torch.no_grad():
        policy.lm_head.weight.mul_(1.01)  # an optimizer step on the policy
    sent = adaptive.serving_weights()
    assert torch.equal(sent["lm_head.weight"], policy.lm_head.weight.detach()) and adaptive.serving_weights() == {}
    with torch.no_grad():
        next(p for n, p in drafter.named_parameters() if "lora_B" in n).add_(0.1)  # a trainer step
    assert "midlayer.self_attn.q_proj.weight" in adaptive.serving_weights()
    plain = AdaptiveDrafter(
        build_drafter(policy, DrafterConfig(drafter_kind="eagle", drafter_eagle_layout="eagle", drafter_lora_r=4))
    )
    with pytest.raises(ValueError, match="'eagle3' layout only"):
        plain.export(tmp_path / "other")
    with pytest.raises(ValueError, match="drafter_eagle_layout"):
        DrafterConfig(drafter_kind="eagle", drafter_eagle_layout="medusa")
    from adaptive_drafter.eagle import save_head

    save_head(EagleHead(policy, layout="eagle"), tmp_path / "warm")  # a warm head of the other layout: said, not mixed
    with pytest.raises(ValueError, match="has the 'eagle' layout"):
        build_drafter(policy, DrafterConfig(drafter_kind="eagle", drafter_eagle_layout="eagle3",
                                            drafter_adapter_path=str(tmp_path / "warm")))  # fmt: skip
