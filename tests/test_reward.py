"""Reward model (`gad reward-model`), its losses, and RL against it (`--method reward-distill`,
`--reward-mix-alpha`), on tiny models and a synthetic task whose good answers are one word."""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

import pytest
import torch

from gad.config import load as cfg
from gad.core.tracking import read_metrics
from gad.data import chats
from gad.methods import gad, samples
from gad.methods import stage as gad_stage
from gad.models import discriminator, lora_roles, store
from gad.train import engine, loop, losses, reward, score_losses, sft

# ---------------------------------------------------------------- losses (hand-computed)


def test_pointwise_bce_by_hand():
    # -log σ(0) = log 2 for a good response scored 0; -log(1 - σ(2)) = log(1 + e^2) for a bad one.
    got = score_losses.pointwise_bce_loss(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]))
    assert got.item() == pytest.approx((math.log(2) + math.log(1 + math.e**2)) / 2, rel=1e-6)
    assert score_losses.pointwise_bce_loss(torch.tensor([50.0]), torch.tensor([1.0])).item() < 1e-12
    with pytest.raises(ValueError, match=r"\[B\]"):
        score_losses.pointwise_bce_loss(torch.zeros(2, 1), torch.zeros(2, 1))


def test_pairwise_bt_loss_by_hand():
    """The reward model's pairwise loss is the discriminator's BT loss with N = 1."""
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2
    assert score_losses.bt_discriminator_loss(chosen, rejected).item() == pytest.approx(expected)
    assert score_losses.discriminator_accuracy(chosen, rejected).item() == 0.5


def test_mixed_reward_by_hand():
    d = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    r = torch.tensor([[10.0, 10.0, 40.0], [1.0, 2.0, 3.0]])
    got = losses.mixed_reward(d, r, alpha=0.25)
    # Row 0: z(d) = [-1, 0, 1] (unbiased std 1); z(r) = [-10, -10, 20] / sqrt(300).
    zr = [-10 / math.sqrt(300), -10 / math.sqrt(300), 20 / math.sqrt(300)]
    row0 = [0.25 * zd + 0.75 * z for zd, z in zip([-1.0, 0.0, 1.0], zr, strict=True)]
    # Row 1: a constant D group contributes 0; z(r) = [-1, 0, 1].
    row1 = [0.75 * -1.0, 0.0, 0.75]
    assert got.tolist()[0] == pytest.approx(row0, abs=1e-5)
    assert got.tolist()[1] == pytest.approx(row1, abs=1e-5)
    assert torch.allclose(losses.mixed_reward(d, r, 1.0), losses.group_advantages(d))
    assert torch.allclose(losses.mixed_reward(d, r, 0.0), losses.group_advantages(r))
    # Scale-free: multiplying R by 1000 changes nothing.
    assert torch.allclose(losses.mixed_reward(d, 1000 * r, 0.25), got, atol=1e-5)
    with pytest.raises(ValueError, match="alpha"):
        losses.mixed_reward(d, r, 1.5)


def test_pairs_within_prompts():
    pairs = reward.make_pairs(["a", "a", "a", "b", "b"], [1.0, 0.0, 1.0, 0.0, 0.0])
    assert pairs == [(0, 1), (2, 1)]  # prompt b: equal labels, no pair
    assert reward.make_pairs(["a"] * 3, [9.0, 7.0, 2.0], min_gap=2.0) == [(0, 2), (1, 2)]
    assert reward.make_pairs(["a", "b"], [1.0, 0.0]) == []  # never across prompts


# ---------------------------------------------------------------- synthetic task

COLOURS = "red blue green cat dog sun moon tree".split()


def words(rng: random.Random, k: int) -> str:
    return " ".join(rng.choice(COLOURS) for _ in range(k))


def labelled(pid: str, question: str, answer: str, source: str, k: int, good: bool) -> dict:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    meta = {"prompt_id": pid, "source": source, "sample": k, "label": float(good), "good": good}
    return {"id": f"{pid}#{source[0]}{k}", "messages": messages, "meta": meta}


@pytest.fixture(scope="module")
def task(tiny_dir, tmp_path_factory):
    """Labels where a good answer holds the word "cat" and a bad one does not (same lengths:
    nothing but that word tells them apart); a reward model trained on them; and a tiny student
    that answers with 1 to 3 of 8 words, "cat" among them about a fifth of the time."""
    folder = tmp_path_factory.mktemp("reward")
    rng = random.Random(0)
    questions = {f"q{i}": f"Question {i}?" for i in range(48)}

    def answer(good: bool) -> str:
        n = rng.randint(1, 3)
        others = [w for w in COLOURS if w != "cat"]
        out = [rng.choice(others) for _ in range(n)]
        if good:
            out[rng.randrange(n)] = "cat"
        return " ".join(out)

    rows = []
    for pid, q in questions.items():
        rows += [labelled(pid, q, answer(True), "teacher", k, True) for k in range(2)]
        rows.append(labelled(pid, q, answer(True), "student", 0, True))
        rows += [labelled(pid, q, answer(False), "student", k, False) for k in (1, 2)]
    labels = folder / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    teacher = folder / "teacher.jsonl"
    teacher.write_text("".join(json.dumps(r) + "\n" for r in rows if r["id"].endswith("#t0")))
    rm_config = cfg.RewardConfig(
        data=str(labels),
        model=str(tiny_dir),
        output_dir=str(folder / "rm"),
        held_out=0.25,
        epochs=3,
        global_batch_size=4,
        micro_batch_size=32,
        lr=3e-3,
        max_response_tokens=16,
        mixed_precision="no",
        save_every=0,
    )
    rm = reward.train(rm_config)

    base_rows = []
    for q in questions.values():
        for _ in range(4):
            messages = [{"role": "user", "content": q}]
            messages.append({"role": "assistant", "content": words(rng, rng.randint(1, 3))})
            base_rows.append({"messages": messages})
    (folder / "base.jsonl").write_text("".join(json.dumps(r) + "\n" for r in base_rows))
    base = sft.train(
        cfg.SFTConfig(
            data=str(folder / "base.jsonl"),
            model=str(tiny_dir),
            output_dir=str(folder / "base"),
            epochs=8,
            lr=1e-2,
            micro_batch_size=16,
            mixed_precision="no",
            save_every=0,
        )
    )
    return {"folder": folder, "labels": labels, "teacher": teacher, "rm": rm, "base": base}


def digest(folder: Path) -> str:
    return hashlib.sha256((Path(folder) / "model.safetensors").read_bytes()).hexdigest()


def test_reward_model_learns_the_feature_on_held_out_prompts(task):
    summary = json.loads((task["rm"].parent / "summary.json").read_text())
    before = summary["held_out_before"]["eval/pairwise_accuracy"]
    after = summary["held_out_after"]["eval/pairwise_accuracy"]
    assert summary["held_out_pairs"] >= 30 and summary["train_pairs"] >= 150
    assert summary["teacher_responses"] > 0 and summary["student_responses"] > 0
    assert before < 0.75 and after >= 0.9, (before, after)  # near chance, then learnt
    assert summary["held_out_after"]["eval/pairwise_accuracy_student"] >= 0.8
    rows = read_metrics(task["rm"].parent)
    assert rows[0]["step"] == 0 and "eval/pairwise_accuracy" in rows[0]
    assert (task["rm"].parent / "config.yaml").exists()
    # The saved folder is a plain scalar-head model: discriminator.load is its loader.
    model = discriminator.load(str(task["rm"]))
    assert model.config.num_labels == 1


def test_held_out_split_is_by_prompt_and_deterministic(task, tiny_dir):
    config = cfg.RewardConfig(data=str(task["labels"]), held_out=0.25)
    tokenizer = store.load_tokenizer(str(tiny_dir))
    train_a, held_a, _ = reward.prepare(config, tokenizer)
    train_b, held_b, _ = reward.prepare(config, tokenizer)
    assert held_a.prompt_ids == held_b.prompt_ids and train_a.pairs == train_b.pairs
    assert not set(train_a.prompt_ids) & set(held_a.prompt_ids)
    only_teacher, _, counts = reward.prepare(
        cfg.RewardConfig(data=str(task["labels"]), held_out=0.25, sources="teacher"), tokenizer
    )
    assert counts["student_responses"] == 0 and only_teacher.pairs == []  # all teachers good


def test_bce_reward_model(task, tiny_dir, tmp_path):
    final = reward.train(
        cfg.RewardConfig(
            data=str(task["labels"]),
            model=str(tiny_dir),
            output_dir=str(tmp_path / "bce"),
            loss="bce",
            held_out=0.25,
            epochs=2,
            global_batch_size=16,
            micro_batch_size=32,
            lr=3e-3,
            max_response_tokens=16,
            mixed_precision="no",
            save_every=0,
        )
    )
    after = json.loads((final.parent / "summary.json").read_text())["held_out_after"]
    assert after["eval/pointwise_accuracy"] >= 0.8
    assert after["eval/score_good"] > 0 > after["eval/score_bad"]


class GradSnapshot:
    """Stands in for the optimizer: keeps the gradients of the step."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def step(self):
        self.grads = {
            n: None if p.grad is None else p.grad.clone() for n, p in self.model.named_parameters()
        }

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def test_bt_step_is_the_mean_over_all_pairs_however_split(task, tiny_dir, tmp_path):
    tokenizer = store.load_tokenizer(str(tiny_dir))
    pad = tokenizer.pad_token_id
    train_split, _, _ = reward.prepare(
        cfg.RewardConfig(data=str(task["labels"]), held_out=0.25), tokenizer
    )
    items = [0, 1, 2]
    pairs = [pair for g in items for pair in train_split.pair_groups[g]]
    accelerator = loop.make_accelerator("no", "none", tmp_path)
    results = []
    for micro in (2, 64):  # one prompt per pass vs all in one pass
        model = discriminator.build(str(tiny_dir), pad_token_id=pad, seed=0)
        config = cfg.RewardConfig(micro_batch_size=micro, max_grad_norm=0.0)
        snapshot = GradSnapshot(model)  # the optimizer's stand-in keeps the step's gradients
        loss_sum, correct, n, _ = reward._step(
            config, accelerator, model, snapshot, train_split, items, pad
        )
        grad = torch.cat([g.flatten() for g in snapshot.grads.values() if g is not None])
        results.append((loss_sum / n, n, grad))
    model = discriminator.build(str(tiny_dir), pad_token_id=pad, seed=0)
    s = engine.scores(model, train_split.examples, pad, 64)
    direct = score_losses.bt_discriminator_loss(
        s[[a for a, _ in pairs]], s[[b for _, b in pairs]]
    ).item()
    assert results[0][1] == results[1][1] == len(pairs) == 18  # 3 prompts x 3 good x 2 bad
    assert results[0][0] == pytest.approx(direct, rel=1e-5)
    assert results[1][0] == pytest.approx(direct, rel=1e-5)
    assert torch.allclose(results[0][2], results[1][2], atol=1e-6)


def test_labels_without_label_fields_are_refused(tmp_path):
    path = tmp_path / "plain.jsonl"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    path.write_text(json.dumps({"id": "r1", "messages": messages}) + "\n")
    with pytest.raises(
        chats.DataError, match=r"plain.jsonl:1: field 'meta.prompt_id'.*record 'r1'"
    ):
        reward.read_labels(str(path))


# ---------------------------------------------------------------- RL against the reward model


def rl_config(task, out: Path, **overrides) -> cfg.GADConfig:
    values = dict(
        data=str(task["labels"]),
        model=str(task["base"]),
        reward_model=str(task["rm"]),
        method="reward-distill",
        output_dir=str(out),
        batch_prompts=8,
        n_samples=8,
        micro_batch_size=32,
        max_response_tokens=16,
        warmup_epochs=0.25,
        epochs=100.0,
        max_steps=12,
        lr=1e-3,
        kl_coef=0.05,
        max_grad_norm=1.0,
        mixed_precision="no",
        save_every=0,
    )
    values.update(overrides)
    return cfg.build(cfg.GADConfig, values, "test")


def test_rl_raises_the_frozen_reward_and_leaves_it_unchanged(task, tmp_path):
    before = digest(task["rm"])
    gad_stage.train(rl_config(task, tmp_path / "run", stage="gad"))
    rewards = [r["reward/mean"] for r in read_metrics(tmp_path / "run/gad")]
    assert len(rewards) == 12
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.5, rewards
    assert digest(task["rm"]) == before
    assert digest(tmp_path / "run/gad/final/discriminator") == before
    assert all("d/grad_norm" not in r for r in read_metrics(tmp_path / "run/gad"))


def test_reward_distill_one_command(task, tmp_path):
    gad_stage.train(rl_config(task, tmp_path / "run", max_steps=2))
    sft_records = chats.read_records(tmp_path / "run/data/sft.jsonl").records
    assert len(sft_records) == 96  # every teacher response labelled good, no student one
    assert all(r.meta["source"] == "teacher" and r.meta["good"] for r in sft_records)
    prompts = chats.read_records(tmp_path / "run/data/prompts.jsonl").records
    assert len({r.meta["prompt_id"] for r in prompts}) == len(prompts) == 48
    warm = read_metrics(tmp_path / "run/warmup")
    # No discriminator to warm up: every warmup step is SFT, from the first one.
    assert [r["phase/train_g"] for r in warm] == [1] * len(warm) and len(warm) == 3
    assert all(r["phase/train_d"] == 0 for r in warm)
    assert len(read_metrics(tmp_path / "run/gad")) == 2
    assert (tmp_path / "run/gad/final/config.json").exists()


def test_reward_distill_needs_a_reward_model(task, tmp_path):
    with pytest.raises(cfg.ConfigError, match="needs reward_model"):
        gad_stage.train(rl_config(task, tmp_path / "x", reward_model=None))
    with pytest.raises(cfg.ConfigError, match="reward_mix_alpha"):
        gad_stage.train(rl_config(task, tmp_path / "y", reward_mix_alpha=0.5))


def test_combined_reward_mixes_online_d_with_frozen_rm(task, tmp_path, monkeypatch):
    seen: dict = {}
    real_mix, real_adv, real_inputs = (
        losses.mixed_reward,
        losses.group_advantages,
        samples.discriminator_inputs,
    )

    def spy_mix(d_pn, r_pn, alpha):
        seen.update(d=d_pn.clone(), r=r_pn.clone(), alpha=alpha)
        seen["mixed"] = real_mix(d_pn, r_pn, alpha)
        return seen["mixed"]

    def spy_adv(reward_pn, *args, **kwargs):
        seen["advantage_input"] = reward_pn.clone()
        return real_adv(reward_pn, *args, **kwargs)

    def spy_inputs(*args, **kwargs):
        # The samples' text as each scorer sees it; the reward model's are built last.
        seen["students"] = real_inputs(*args, **kwargs)
        return seen["students"]

    monkeypatch.setattr(gad.losses, "mixed_reward", spy_mix)
    monkeypatch.setattr(gad.losses, "group_advantages", spy_adv)
    monkeypatch.setattr(samples, "discriminator_inputs", spy_inputs)
    before = digest(task["rm"])
    config = rl_config(
        task,
        tmp_path / "mix",
        method="gad",
        data=str(task["teacher"]),
        stage="gad",
        reward_mix_alpha=0.5,
        max_steps=1,
    )
    gad_stage.train(config)
    assert seen["alpha"] == 0.5
    pad = store.load_tokenizer(str(task["base"])).pad_token_id
    rm = discriminator.load(str(task["rm"]))
    rm.config.pad_token_id = pad
    expected_r = engine.scores(rm, seen["students"], pad, 8).view(-1, 8)
    assert torch.allclose(seen["r"], expected_r, atol=1e-5)
    assert torch.equal(seen["advantage_input"], seen["mixed"])
    row = read_metrics(tmp_path / "mix/gad")[0]
    assert "d/grad_norm" in row  # the discriminator still learns
    assert row["reward/rm_mean"] == pytest.approx(expected_r.mean().item(), abs=1e-5)
    assert row["reward/d_mean"] == pytest.approx(seen["d"].mean().item(), abs=1e-5)
    assert digest(task["rm"]) == before
    assert digest(tmp_path / "mix/gad/final/discriminator") != before


def test_lora_reward_model_learns_and_its_merged_folder_scores_as_base_plus_adapter(
    task, tiny_dir, tmp_path
):
    from gad.models import lora

    final = reward.train(
        cfg.RewardConfig(
            data=str(task["labels"]),
            model=str(tiny_dir),
            output_dir=str(tmp_path / "rm-lora"),
            held_out=0.25,
            epochs=3,
            global_batch_size=4,
            micro_batch_size=32,
            lr=1e-2,
            max_response_tokens=16,
            mixed_precision="no",
            save_every=0,
            lora_rank=8,
            lora_alpha=16.0,
        )
    )
    summary = json.loads((final.parent / "summary.json").read_text())
    before = summary["held_out_before"]["eval/pairwise_accuracy"]
    after = summary["held_out_after"]["eval/pairwise_accuracy"]
    assert after >= 0.85 and after > before, (before, after)
    merged = discriminator.load(str(final)).eval()  # a plain scalar-head folder
    adapters, tokenizer = lora_roles.base_adapters(str(tiny_dir))
    view = lora_roles.scorer(
        adapters, cfg.RewardConfig(lora_rank=8), final / lora.ADAPTER_DIR, seed=0
    )
    view.eval()
    ids = [tokenizer(t)["input_ids"] for t in ("Question one? Yes.", "Question two? No, no.")]
    width = max(map(len, ids))
    input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in ids])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])
    with torch.no_grad():
        a = discriminator.scores(merged, input_ids, mask)
        b = discriminator.scores(view, input_ids, mask)
    assert torch.allclose(a, b, atol=1e-5)
