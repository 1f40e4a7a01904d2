"""SODA (`gad train --method soda`): the DPO loss, the snapshot's end-of-turn rule, a run that
moves the margin against the starting model's log-probs, exact resume, LoRA."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from gad.config import load as cfg
from gad.core.tracking import read_metrics
from gad.data import chats
from gad.methods import soda
from gad.methods import stage as gad_stage
from gad.models import lora, store
from gad.train import engine, losses

WORDS = "yes no maybe sure fine good okay right true false red blue green cat dog sun".split()


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("soda") / "teacher.jsonl"
    with open(path, "w") as f:
        for i in range(16):
            messages = [
                {"role": "user", "content": f"Question {i}?"},
                {"role": "assistant", "content": f"{WORDS[i].capitalize()}."},
            ]
            f.write(json.dumps({"id": f"q{i}", "messages": messages}) + "\n")
    return path


def soda_config(tiny_dir, teacher_file, out, **overrides):
    values = dict(
        method="soda",
        data=str(teacher_file),
        model=str(tiny_dir),
        output_dir=str(out),
        batch_prompts=4,
        micro_batch_size=4,
        max_response_tokens=8,
        epochs=100.0,
        max_steps=4,
        lr=3e-3,
        max_grad_norm=1.0,
        mixed_precision="no",
        save_every=0,
    )
    values.update(overrides)
    return cfg.build(cfg.GADConfig, values, "test")


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# ------------------------------------------------------------------ the loss


def test_dpo_loss_equals_the_hand_computed_values():
    policy_c = torch.tensor([-5.0, -3.0], requires_grad=True)
    policy_r, ref_c, ref_r = torch.tensor([-3.0, -6.0]), torch.tensor([-6.0, -3.5]), [-4.5, -5.0]
    loss, stats = losses.dpo_loss(policy_c, policy_r, ref_c, torch.tensor(ref_r), beta=0.1)
    # Pair 1: r_w = 0.1·(-5 + 6) = 0.1, r_l = 0.1·(-3 + 4.5) = 0.15, margin -0.05.
    # Pair 2: r_w = 0.1·(-3 + 3.5) = 0.05, r_l = 0.1·(-6 + 5) = -0.1, margin 0.15.
    expected = (math.log(1 + math.exp(0.05)) + math.log(1 + math.exp(-0.15))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["margin"].item() == pytest.approx((-0.05 + 0.15) / 2, abs=1e-6)
    assert stats["accuracy"].item() == 0.5
    assert stats["chosen_reward"].item() == pytest.approx((0.1 + 0.05) / 2, abs=1e-6)
    assert stats["rejected_reward"].item() == pytest.approx((0.15 - 0.1) / 2, abs=1e-6)
    # d loss / d log πθ(y_w) of pair b = -β·σ(-margin_b) / B.
    loss.backward()
    grads = [-0.1 * sigmoid(0.05) / 2, -0.1 * sigmoid(-0.15) / 2]
    assert policy_c.grad.tolist() == pytest.approx(grads, abs=1e-7)

    # β scales the rewards and the margin: at β = 1 the margins are -0.5 and 1.5.
    loss_1, stats_1 = losses.dpo_loss(policy_c, policy_r, ref_c, torch.tensor(ref_r), beta=1.0)
    expected_1 = (math.log(1 + math.exp(0.5)) + math.log(1 + math.exp(-1.5))) / 2
    assert loss_1.item() == pytest.approx(expected_1, abs=1e-6)
    assert stats_1["margin"].item() == pytest.approx(10 * stats["margin"].item(), abs=1e-6)
    # A policy equal to its reference: every reward 0, the loss log 2.
    same, _ = losses.dpo_loss(ref_c, torch.tensor(ref_r), ref_c, torch.tensor(ref_r), beta=5.0)
    assert same.item() == pytest.approx(math.log(2), abs=1e-6)
    with pytest.raises(ValueError, match=r"\[B\]"):
        losses.dpo_loss(policy_c, policy_r, ref_c, torch.zeros(3))


# ------------------------------------------------------------------ end-of-turn rule


def test_a_cut_answer_has_no_end_of_turn_token(tiny_dir, teacher_file, tmp_path):
    tokenizer = store.load_tokenizer(str(tiny_dir))
    eot = chats.end_of_turn_id(tokenizer)
    prompt = [{"role": "user", "content": "Question?"}]

    def answer(text, reason):
        messages = prompt + [{"role": "assistant", "content": text}]
        return chats.Record("r", messages, {"finish_reason": reason})

    config = soda_config(tiny_dir, teacher_file, tmp_path, max_response_tokens=8)
    finished, cut, too_long = soda.rejected_examples(
        tokenizer,
        [answer("Yes.", "stop"), answer("Yes.", "length"), answer("yes " * 20, "stop")],
        config,
    )
    assert finished.input_ids[-1] == eot and not finished.truncated
    assert eot not in cut.input_ids[cut.prompt_len :] and cut.truncated
    # Finished, but longer than max_response_tokens: cut here, so no end-of-turn either.
    assert len(too_long.input_ids) - too_long.prompt_len == 8
    assert eot not in too_long.input_ids[too_long.prompt_len :] and too_long.truncated

    # The chosen side follows the same rule: a teacher answer cut by its writer.
    cut_teacher = tmp_path / "cut.jsonl"
    chats.write_records(cut_teacher, [answer("Yes.", "length")])
    out = tmp_path / "run"
    gad_stage.train(soda_config(tiny_dir, cut_teacher, out, batch_prompts=1, max_steps=1))
    rejected = json.loads((out / "soda" / soda.SNAPSHOT_FILE).read_text())
    chosen = chats.encode_sft(
        tokenizer, [answer("Yes.", "length")], max_prompt_tokens=64, max_response_tokens=8
    ).examples[0]
    assert eot not in chosen.input_ids[chosen.prompt_len :]
    [snap] = soda.rejected_examples(tokenizer, [chats.validate(rejected, "snap")], config)
    assert (eot in snap.input_ids[snap.prompt_len :]) == (
        rejected["meta"]["finish_reason"] == "stop"
    )


# ------------------------------------------------------------------ runs


def pairs_of(folder, tokenizer, teacher_file, run):
    """Chosen and rejected examples of a run, in the snapshot's order, as the stage built them."""
    snapshot = chats.read_records(Path(run) / "soda" / soda.SNAPSHOT_FILE).records
    teacher = {r.id: r for r in chats.read_records(teacher_file).records}
    limits = dict(max_prompt_tokens=2048, max_response_tokens=8)
    chosen = chats.encode_sft(tokenizer, [teacher[r.id] for r in snapshot], **limits).examples
    rejected = chats.encode_sft(tokenizer, snapshot, **limits).examples
    return snapshot, chosen, rejected


def sequence_logprobs(folder, examples):
    model, tokenizer = store.load(str(folder))
    parts = engine.length_sorted_chunks(examples, 8)
    rows = engine.logprobs(model.eval(), examples, engine.pad_id_of(tokenizer), parts, 1.0)
    return torch.stack([r.sum() for r in rows])


def test_soda_raises_the_margin_against_the_starting_models_logprobs(
    tiny_dir, teacher_file, tmp_path
):
    final = gad_stage.train(soda_config(tiny_dir, teacher_file, tmp_path, max_steps=8))
    assert final == tmp_path / "soda" / "final"
    tokenizer = store.load_tokenizer(str(tiny_dir))
    snapshot, chosen, rejected = pairs_of(tiny_dir, tokenizer, teacher_file, tmp_path)
    assert len(snapshot) == 16 and {r.meta["finish_reason"] for r in snapshot} <= {"stop", "length"}
    # The reference is the starting model: recomputed from its folder, the same numbers.
    ref_c = torch.tensor([r.meta["ref_logp_chosen"] for r in snapshot])
    ref_r = torch.tensor([r.meta["ref_logp_rejected"] for r in snapshot])
    assert torch.allclose(sequence_logprobs(tiny_dir, chosen), ref_c, atol=1e-4)
    assert torch.allclose(sequence_logprobs(tiny_dir, rejected), ref_r, atol=1e-4)
    # At the start the policy is the reference (margin 0); after training it prefers the
    # teacher's answers over its own snapshot's.
    _, stats = losses.dpo_loss(
        sequence_logprobs(final, chosen), sequence_logprobs(final, rejected), ref_c, ref_r, 0.1
    )
    assert stats["margin"].item() > 0.5 and stats["accuracy"].item() > 0.9
    rows = read_metrics(tmp_path / "soda")
    assert rows[0]["step"] == 0 and 0 <= rows[0]["snapshot/finished_share"] <= 1
    assert rows[0]["snapshot/length_mean"] > 0
    steps = [r for r in rows if "soda/loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert steps[0]["soda/margin"] == pytest.approx(0.0, abs=1e-5)
    assert steps[-1]["soda/margin"] > steps[0]["soda/margin"] + 0.1
    assert all(math.isfinite(r["soda/grad_norm"]) for r in steps)
    for key in ("soda/accuracy", "soda/chosen_reward", "soda/rejected_reward"):
        assert key in steps[-1]


def test_soda_resume_is_bit_exact(tiny_dir, teacher_file, tmp_path):
    gad_stage.train(soda_config(tiny_dir, teacher_file, tmp_path / "a", max_steps=4))
    gad_stage.train(soda_config(tiny_dir, teacher_file, tmp_path / "b", max_steps=2))
    snapshot = (tmp_path / "b" / "soda" / soda.SNAPSHOT_FILE).read_text()
    gad_stage.train(soda_config(tiny_dir, teacher_file, tmp_path / "b", max_steps=4, resume=True))
    assert (tmp_path / "b" / "soda" / soda.SNAPSHOT_FILE).read_text() == snapshot  # reused
    a = load_file(tmp_path / "a/soda/final/model.safetensors")
    b = load_file(tmp_path / "b/soda/final/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def numbers(run):
        rows = read_metrics(tmp_path / run / "soda")
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]

    assert numbers("a") == numbers("b")


def test_lora_soda_trains_the_adapter_only_and_writes_a_merged_folder(
    tiny_dir, teacher_file, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = soda_config(tiny_dir, teacher_file, tmp_path, lora_rank=4, lora_alpha=8.0, lr=1e-2)
    final = gad_stage.train(config)
    merged = AutoModelForCausalLM.from_pretrained(final).state_dict()
    base, _ = store.load(str(tiny_dir))
    stacked = PeftModel.from_pretrained(base, final / lora.ADAPTER_DIR).merge_and_unload()
    assert all(torch.allclose(merged[k], v, atol=1e-6) for k, v in stacked.state_dict().items())
    # Only the adapted linear layers moved; everything else is the base's, bit for bit.
    start = store.load(str(tiny_dir))[0].state_dict()
    moved = {k for k in start if not torch.equal(start[k], merged[k])}
    assert moved and all(k.endswith("proj.weight") for k in moved)
    checkpoint = tmp_path / "soda" / "checkpoints" / "step-000004"
    assert (checkpoint / "adapter_model.safetensors").exists()
    assert not (checkpoint / "model.safetensors").exists()
    # The LoRA reference is the bare base: the starting model's numbers.
    tokenizer = store.load_tokenizer(str(tiny_dir))
    snapshot, chosen, _ = pairs_of(tiny_dir, tokenizer, teacher_file, tmp_path)
    ref_c = torch.tensor([r.meta["ref_logp_chosen"] for r in snapshot])
    assert torch.allclose(sequence_logprobs(tiny_dir, chosen), ref_c, atol=1e-4)


# ------------------------------------------------------------------ settings


def test_soda_settings_are_checked_and_reach_the_cli(tiny_dir, teacher_file, tmp_path):
    with pytest.raises(cfg.ConfigError, match="soda_beta"):
        soda_config(tiny_dir, teacher_file, tmp_path, soda_beta=0.0)
    for bad, name in [({"stage": "warmup"}, "stage"), ({"eval_every": 2}, "eval_every")]:
        with pytest.raises(cfg.ConfigError, match=name):
            gad_stage.train(soda_config(tiny_dir, teacher_file, tmp_path / name, **bad))
    with pytest.raises(cfg.ConfigError, match="single_base"):
        config = soda_config(tiny_dir, teacher_file, tmp_path / "sb", lora_rank=4, single_base=True)
        gad_stage.train(config)
    # A GAD-only setting is refused by name, not silently ignored; its default passes.
    for bad in ({"d_lr": 1e-4}, {"n_samples": 4}, {"kl_coef": 0.0}, {"discriminator": "x"}):
        [(name, _)] = bad.items()
        with pytest.raises(cfg.ConfigError, match=f"^{name}: method=soda does not use it"):
            gad_stage.train(soda_config(tiny_dir, teacher_file, tmp_path / name, **bad))

    from gad.cli import app

    args = ["train", str(teacher_file), "--method", "soda", "--soda-beta", "0.2", "--model"]
    args += [str(tiny_dir), "--output-dir", str(tmp_path / "cli"), "--max-steps", "1"]
    args += ["--batch-prompts", "2", "--max-response-tokens", "4", "--mixed-precision", "no"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "soda" / "final" / "config.json").exists()
    assert "soda_beta: 0.2" in (tmp_path / "cli" / "config.yaml").read_text()
    refused = ["train", str(teacher_file), "--method", "soda", "--d-lr", "1e-4", "--model"]
    refused += [str(tiny_dir), "--output-dir", str(tmp_path / "c2"), "--max-steps", "1"]
    result = CliRunner().invoke(app, refused)
    assert result.exit_code != 0
    assert "d_lr: method=soda does not use it" in result.output
    assert "Traceback" not in result.output


def test_two_processes_match_one(tiny_dir, teacher_file, tmp_path):
    """torchrun with 2 CPU processes: each samples its share of the snapshot (per-prompt seeds:
    the same answers), the main process joins them; the same pairs, references and losses."""
    from launch import train_in_processes

    values = dict(
        method="soda",
        data=str(teacher_file),
        model=str(tiny_dir),
        batch_prompts=4,
        micro_batch_size=4,
        max_response_tokens=8,
        max_steps=3,
        lr=3e-3,
        max_grad_norm=1.0,
        mixed_precision="no",
        save_every=0,
        per_prompt_seeds=True,
    )
    train_in_processes(tmp_path, "gad", values | {"output_dir": str(tmp_path / "one")}, 1, 0)
    train_in_processes(tmp_path, "gad", values | {"output_dir": str(tmp_path / "two")}, 2, 29531)
    snapshots = [
        chats.read_records(tmp_path / run / "soda" / soda.SNAPSHOT_FILE) for run in ("one", "two")
    ]
    one, two = ([(r.id, r.messages, r.meta["finish_reason"]) for r in s.records] for s in snapshots)
    assert one == two and len(one) == 16
    assert not list((tmp_path / "two" / "soda").glob("snapshot.part-*"))
    r1, r2 = read_metrics(tmp_path / "one" / "soda"), read_metrics(tmp_path / "two" / "soda")
    assert len(r1) == len(r2) == 4
    for a, b in zip(r1[1:], r2[1:], strict=True):
        for key in ("soda/loss", "soda/margin", "soda/accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
