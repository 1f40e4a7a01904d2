"""LoRA adapters and single-base GAD: the base never moves, merged folders are plain and equal
base + adapter, each role's loss reaches only its own weights, and resume is exact."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gad.config import load as cfg
from gad.core.tracking import read_metrics
from gad.methods import stage as gad_stage
from gad.models import discriminator, lora, lora_roles, store
from gad.train import engine, sft

LORA = dict(lora_rank=4, lora_alpha=8.0)
WORDS = "yes no maybe sure fine good okay right true false red blue green cat dog sun".split()


@pytest.fixture(scope="module")
def records_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "train.jsonl"
    with open(path, "w") as f:
        for i in range(16):
            messages = [
                {"role": "user", "content": f"Question {i}?"},
                {"role": "assistant", "content": f"{WORDS[i % len(WORDS)].capitalize()}."},
            ]
            f.write(json.dumps({"id": f"q{i}", "messages": messages}) + "\n")
    return path


def sft_config(tiny_dir, records_file, out, **overrides):
    values = dict(
        data=str(records_file),
        model=str(tiny_dir),
        output_dir=str(out),
        epochs=2,
        lr=1e-2,
        micro_batch_size=4,
        mixed_precision="no",
        save_every=2,
        keep_checkpoints=0,
        **LORA,
    )
    return cfg.build(cfg.SFTConfig, values | overrides, "test")


def gad_config(tiny_dir, records_file, out, **overrides):
    values = dict(
        data=str(records_file),
        model=str(tiny_dir),
        output_dir=str(out),
        batch_prompts=4,
        n_samples=4,
        micro_batch_size=8,
        max_response_tokens=10,
        warmup_epochs=0.5,
        warmup_d_only_steps=1,
        epochs=100.0,
        max_steps=4,
        lr=1e-2,
        d_lr=1e-2,
        kl_coef=0.1,
        max_grad_norm=1.0,
        mixed_precision="no",
        save_every=0,
        **LORA,
    )
    return cfg.build(cfg.GADConfig, values | overrides, "test")


def batch_of(tokenizer, texts):
    ids = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, row in enumerate(ids):
        input_ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
    return input_ids, mask


def test_base_weights_do_not_move_and_roles_get_only_their_own_gradients(tiny_dir):
    config = cfg.GADConfig(**LORA)
    adapters, tokenizer = lora_roles.base_adapters(str(tiny_dir))
    base_before = {k: v.clone() for k, v in adapters._base.state_dict().items()}
    policy = lora_roles.policy(adapters, config, None)
    d = lora_roles.scorer(adapters, config, None, seed=0)
    reference = lora_roles.frozen_reference(adapters, None)
    g_opt = engine.make_optimizer(policy, 1e-2, 0.0, (0.9, 0.999))
    d_opt = engine.make_optimizer(d, 1e-2, 0.0, (0.9, 0.999))
    input_ids, mask = batch_of(tokenizer, ["The sky is blue.", "Cats like to sleep a lot."])
    names = lambda view: {id(p) for p in view.parameters()}  # noqa: E731
    g_ids, d_ids = names(policy), names(d)
    assert g_ids and d_ids and not g_ids & d_ids

    def grads():
        return {id(p) for p in adapters.peft.parameters() if p.grad is not None} | {
            id(p) for p in d.score.parameters() if p.grad is not None
        }

    with torch.no_grad():
        ref_before = reference(input_ids=input_ids, attention_mask=mask).logits
    for _ in range(3):
        policy(input_ids=input_ids, attention_mask=mask).logits.logsumexp(-1).mean().backward()
        assert grads() == g_ids  # the policy loss reaches the policy adapter only
        g_opt.step()
        g_opt.zero_grad(set_to_none=True)
        discriminator.scores(d, input_ids, mask).sum().backward()
        assert grads() == d_ids  # the discriminator loss: its adapter and head only
        d_opt.step()
        d_opt.zero_grad(set_to_none=True)
    for k, v in adapters._base.state_dict().items():
        if "lora_" not in k:
            key = k.replace(".base_layer", "")
            assert torch.equal(v, base_before[key]), k
    with torch.no_grad():
        ref_after = reference(input_ids=input_ids, attention_mask=mask).logits
        pol_after = policy(input_ids=input_ids, attention_mask=mask).logits
    assert torch.equal(ref_before, ref_after)  # the reference did not move
    assert not torch.allclose(pol_after, ref_after)  # the policy did


def test_lora_sft_final_is_merged_plain_folder_equal_to_base_plus_adapter(
    tiny_dir, records_file, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_file = load_file(Path(tiny_dir) / "model.safetensors")
    final = sft.train(sft_config(tiny_dir, records_file, tmp_path / "run"))
    rows = read_metrics(tmp_path / "run")
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert load_file(Path(tiny_dir) / "model.safetensors").keys() == base_file.keys()
    merged = AutoModelForCausalLM.from_pretrained(final).eval()  # a plain HF folder
    assert not any("lora" in k for k in merged.state_dict())
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    stacked = PeftModel.from_pretrained(base, final / lora.ADAPTER_DIR).eval()
    tokenizer = store.load_tokenizer(str(final))
    input_ids, mask = batch_of(tokenizer, ["Question 3?", "Hello there, how are you?"])
    with torch.no_grad():
        a = merged(input_ids=input_ids, attention_mask=mask).logits
        b = stacked(input_ids=input_ids, attention_mask=mask).logits
    assert torch.allclose(a, b, atol=1e-5)
    with torch.no_grad(), stacked.disable_adapter():
        plain = stacked(input_ids=input_ids, attention_mask=mask).logits
    assert not torch.allclose(a, plain, atol=1e-3)  # the adapter learned something
    # Embeddings and norms are not adapted: the merged model keeps them bit for bit.
    merged_state = merged.state_dict()
    for key in ("model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(merged_state[key], base_file[key])


def test_lora_sft_resume_is_bit_exact(tiny_dir, records_file, tmp_path):
    sft.train(sft_config(tiny_dir, records_file, tmp_path / "straight", max_steps=6, epochs=2))
    sft.train(sft_config(tiny_dir, records_file, tmp_path / "split", max_steps=3, epochs=2))
    sft.train(
        sft_config(tiny_dir, records_file, tmp_path / "split", max_steps=6, epochs=2, resume=True)
    )
    a = load_file(tmp_path / "straight/final/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "split/final/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("single_base", [False, True])
def test_lora_gad_run_writes_merged_generator_and_discriminator(
    tiny_dir, records_file, tmp_path, single_base
):
    from transformers import AutoModelForCausalLM

    final = gad_stage.train(
        gad_config(tiny_dir, records_file, tmp_path / "run", single_base=single_base)
    )
    tokenizer = store.load_tokenizer(str(final))
    input_ids, mask = batch_of(tokenizer, ["Question 3?", "Yes. No. Maybe."])
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    adapters, _ = lora_roles.base_adapters(str(tiny_dir))
    policy = lora_roles.policy(adapters, cfg.GADConfig(**LORA), final / lora.ADAPTER_DIR)
    policy.eval()
    with torch.no_grad():
        a = merged(input_ids=input_ids, attention_mask=mask).logits
        b = policy(input_ids=input_ids, attention_mask=mask).logits
    assert torch.allclose(a, b, atol=1e-5)
    d_merged = discriminator.load(str(final / "discriminator")).eval()
    d_view = lora_roles.scorer(
        adapters, cfg.GADConfig(**LORA), final / "discriminator" / lora.ADAPTER_DIR, seed=0
    )
    d_view.eval()
    with torch.no_grad():
        s_merged = discriminator.scores(d_merged, input_ids, mask)
        s_view = discriminator.scores(d_view, input_ids, mask)
    assert torch.allclose(s_merged, s_view, atol=1e-5)
    rows = read_metrics(tmp_path / "run" / "gad")
    assert len(rows) == 4 and all("d/loss" in r and "g/kl" in r for r in rows)


def test_single_base_gad_resume_is_bit_exact(tiny_dir, records_file, tmp_path):
    def run(out, **kw):
        gad_stage.train(gad_config(tiny_dir, records_file, tmp_path / out, single_base=True, **kw))

    run("a", max_steps=4)
    run("b", max_steps=2)
    run("b", max_steps=4, resume=True)
    for part in ("adapter", "discriminator/adapter"):
        a = load_file(tmp_path / "a/gad/final" / part / "adapter_model.safetensors")
        b = load_file(tmp_path / "b/gad/final" / part / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    head_a = load_file(tmp_path / "a/gad/final/discriminator/adapter" / lora.HEAD_FILE)
    head_b = load_file(tmp_path / "b/gad/final/discriminator/adapter" / lora.HEAD_FILE)
    assert torch.equal(head_a["weight"], head_b["weight"])

    def numbers(run):
        rows = read_metrics(tmp_path / run / "gad")
        return [
            {k: repr(v) for k, v in r.items() if not k.startswith(("time/", "tokens/"))}
            for r in rows
        ]

    assert numbers("a") == numbers("b")


def test_single_base_needs_lora_and_the_students_discriminator(tiny_dir, records_file, tmp_path):
    with pytest.raises(cfg.ConfigError, match="lora_rank"):
        gad_stage.train(
            gad_config(tiny_dir, records_file, tmp_path / "x", single_base=True, lora_rank=0)
        )
    with pytest.raises(cfg.ConfigError, match="discriminator"):
        gad_stage.train(
            gad_config(
                tiny_dir, records_file, tmp_path / "y", single_base=True, discriminator="other"
            )
        )


def test_lora_settings_out_of_range_or_unknown_modules_are_named(tiny_dir, records_file, tmp_path):
    with pytest.raises(cfg.ConfigError, match="lora_dropout"):
        sft_config(tiny_dir, records_file, tmp_path / "a", lora_dropout=1.0)
    with pytest.raises(cfg.ConfigError, match="lora_rank"):
        sft_config(tiny_dir, records_file, tmp_path / "b", lora_rank=-1)
    with pytest.raises(cfg.ConfigError, match="no_such_proj"):
        sft.train(
            sft_config(tiny_dir, records_file, tmp_path / "c", lora_target_modules="no_such_proj")
        )


def test_single_base_two_processes_match_one(tiny_dir, records_file, tmp_path):
    """torchrun with 2 CPU processes: the adapters start equal on every process (drawn from the
    seed, not the per-process stream) and their gradients are averaged, so the losses equal the
    1-process run's."""
    from launch import assert_gad_runs_match, train_in_processes

    values = dict(
        data=str(records_file),
        model=str(tiny_dir),
        batch_prompts=4,
        n_samples=4,
        micro_batch_size=4,
        max_response_tokens=8,
        warmup_epochs=0.5,
        warmup_d_only_steps=1,
        epochs=100.0,
        max_steps=2,
        lr=1e-2,
        d_lr=1e-2,
        kl_coef=0.1,
        mixed_precision="no",
        save_every=0,
        per_prompt_seeds=True,
        single_base=True,
        **LORA,
    )
    train_in_processes(tmp_path, "gad", values | {"output_dir": str(tmp_path / "one")}, 1, 0)
    train_in_processes(tmp_path, "gad", values | {"output_dir": str(tmp_path / "two")}, 2, 29537)
    assert_gad_runs_match(tmp_path / "one", tmp_path / "two")


def test_a_full_parameter_warmup_is_not_continued_as_lora(tiny_dir, records_file, tmp_path):
    out = tmp_path / "run"
    gad_stage.train(gad_config(tiny_dir, records_file, out, stage="warmup", lora_rank=0))
    with pytest.raises(cfg.ConfigError, match="without LoRA"):
        gad_stage.train(gad_config(tiny_dir, records_file, out, stage="gad"))


def test_frozen_reference_runs_without_dropout(tiny_dir, tmp_path):
    config = cfg.GADConfig(**LORA, lora_dropout=0.5)
    adapters, tokenizer = lora_roles.base_adapters(str(tiny_dir))
    policy = lora_roles.policy(adapters, config, None)
    with torch.no_grad():
        for p in adapters.named_parameters("policy"):
            p[1].add_(0.1)  # B = 0 would hide the dropout
    adapters.save_adapter("policy", tmp_path / "entry")
    reference = lora_roles.frozen_reference(adapters, tmp_path / "entry")
    input_ids, mask = batch_of(tokenizer, ["The sky is blue today."])
    policy.train()
    with torch.no_grad():
        a = reference(input_ids=input_ids, attention_mask=mask).logits
        b = reference(input_ids=input_ids, attention_mask=mask).logits
        c = policy(input_ids=input_ids, attention_mask=mask).logits
        d = policy(input_ids=input_ids, attention_mask=mask).logits
    assert torch.equal(a, b)
    assert not torch.equal(c, d)  # the trained role does use its dropout
    assert adapters.peft.training
