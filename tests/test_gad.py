import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gad.config import load as cfg
from gad.core.tracking import read_metrics
from gad.data import chats
from gad.methods import gad, samples
from gad.methods import stage as gad_stage
from gad.methods import state as gad_state
from gad.models import discriminator, store
from gad.train import engine, loop
from gad.train.rollout import Completion

WORDS = "yes no maybe sure fine good okay right true false red blue green cat dog sun".split()


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gad") / "teacher.jsonl"
    with open(path, "w") as f:
        for i in range(16):
            answer = f"{WORDS[i % len(WORDS)].capitalize()}."
            messages = [
                {"role": "user", "content": f"Question {i}?"},
                {"role": "assistant", "content": answer},
            ]
            f.write(json.dumps({"id": f"q{i}", "messages": messages}) + "\n")
    return path


def gad_values(tiny_dir, teacher_file, out, **overrides):
    values = dict(
        data=str(teacher_file),
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
        lr=3e-3,
        d_lr=3e-3,
        max_grad_norm=1.0,
        mixed_precision="no",
        save_every=0,
    )
    values.update(overrides)
    return values


def gad_config(tiny_dir, teacher_file, out, **overrides):
    return cfg.build(cfg.GADConfig, gad_values(tiny_dir, teacher_file, out, **overrides), "test")


def weights(folder):
    return load_file(Path(folder) / "model.safetensors")


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ discriminator


def test_identical_text_scores_identically_whatever_padding_and_source(tiny_dir):
    """SPEC: teacher and student sequences must be built the same way (no EOS shortcut)."""
    tokenizer = store.load_tokenizer(str(tiny_dir))
    d = discriminator.build(str(tiny_dir), pad_token_id=tokenizer.pad_token_id, seed=0).eval()
    prompt = [{"role": "user", "content": "Tell me about cats."}]
    text = "Cats sleep a lot."
    eot = chats.end_of_turn_id(tokenizer)
    # The teacher's text goes through the chat template...
    record = chats.validate({"messages": prompt + [{"role": "assistant", "content": text}]}, "t:1")
    teacher = chats.encode_sft(tokenizer, [record], max_prompt_tokens=99, max_response_tokens=99)
    teacher_ids = teacher.examples[0].input_ids
    # ...the student's sample is the ids the rollout produced, ending with the end-of-turn id.
    sampled = tokenizer(text, add_special_tokens=False)["input_ids"] + [eot]
    prompt_example = chats.Example("p", chats.encode_prompt(tokenizer, prompt), 0, False)
    prompt_example.prompt_len = len(prompt_example.input_ids)
    completion = Completion(token_ids=sampled, text=text, finish_reason="stop")
    student_ids = samples.student_examples([prompt_example], [[completion]])[0].input_ids
    assert student_ids == teacher_ids

    other = chats.encode_prompt(tokenizer, [{"role": "user", "content": "x " * 30}])
    pad = tokenizer.pad_token_id

    def batch(rows, side):
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            sl = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
            ids[r, sl] = torch.tensor(row)
            mask[r, sl] = 1
        return discriminator.scores(d, ids, mask)

    with torch.no_grad():
        alone = batch([teacher_ids], "right")[0]
        got = [
            batch([teacher_ids, other], "right")[0],
            batch([other, student_ids], "right")[1],
            batch([teacher_ids, other], "left")[0],
            batch([other, student_ids], "left")[1],
        ]
    for score in got:
        assert score.item() == pytest.approx(alone.item(), abs=1e-5)
    # A cut response is scored at its last real token, which differs from the finished one.
    with torch.no_grad():
        cut = batch([teacher_ids[:-1]], "right")[0]
    assert cut.item() != pytest.approx(alone.item(), abs=1e-4)


def test_discriminator_saves_and_loads_as_sequence_classifier(tiny_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    tokenizer = store.load_tokenizer(str(tiny_dir))
    d = discriminator.build(str(tiny_dir), pad_token_id=tokenizer.pad_token_id, seed=3)
    d.save_pretrained(tmp_path / "d")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "d")
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.equal(
            discriminator.scores(d, ids, mask), discriminator.scores(again, ids, mask)
        )


# ------------------------------------------------------------------ the loop


def test_rewards_are_the_discriminator_scores_before_its_update(
    tiny_dir, teacher_file, tmp_path, monkeypatch
):
    seen = {}
    real_advantages, real_inputs = gad.losses.group_advantages, samples.discriminator_inputs

    def spy_advantages(reward_pn, *args, **kwargs):
        seen["rewards"] = reward_pn.detach().clone()
        return real_advantages(reward_pn, *args, **kwargs)

    def spy_students(*args, **kwargs):
        # What the discriminator scores: the samples' text re-encoded, as teacher text is.
        seen["students"] = real_inputs(*args, **kwargs)
        return seen["students"]

    config = gad_config(tiny_dir, teacher_file, tmp_path / "run", stage="warmup")
    gad_stage.train(config)
    monkeypatch.setattr(gad.losses, "group_advantages", spy_advantages)
    monkeypatch.setattr(samples, "discriminator_inputs", spy_students)
    gad_stage.train(gad_config(tiny_dir, teacher_file, tmp_path / "run", stage="gad", max_steps=1))

    tokenizer = store.load_tokenizer(str(tiny_dir))
    from gad.train.engine import collate

    batch = collate(seen["students"], tokenizer.pad_token_id)

    def score(folder):
        d = discriminator.load(str(folder)).eval()
        with torch.no_grad():
            return discriminator.scores(d, batch["input_ids"], batch["attention_mask"])

    before = score(tmp_path / "run/warmup/final/discriminator")
    after = score(tmp_path / "run/gad/final/discriminator")
    rewards = seen["rewards"].reshape(-1)
    assert torch.allclose(rewards, before, atol=1e-5)
    assert not torch.allclose(rewards, after, atol=1e-3)  # the update did move the scores


def test_gad_stage_resume_is_bit_exact(tiny_dir, teacher_file, tmp_path):
    gad_stage.train(gad_config(tiny_dir, teacher_file, tmp_path / "a", max_steps=4))
    gad_stage.train(gad_config(tiny_dir, teacher_file, tmp_path / "b", max_steps=2))
    gad_stage.train(gad_config(tiny_dir, teacher_file, tmp_path / "b", max_steps=4, resume=True))
    for part in ("", "discriminator"):
        a = weights(tmp_path / "a/gad/final" / part)
        b = weights(tmp_path / "b/gad/final" / part)
        assert same(a, b), f"{part or 'generator'} differs after resume"

    def numbers(run):
        rows = read_metrics(tmp_path / run / "gad")
        # NaN (an accuracy over no cut sample) compares unequal to itself: compare as text.
        return [
            {k: repr(v) for k, v in r.items() if not k.startswith(("time/", "tokens/"))}
            for r in rows
        ]

    assert numbers("a") == numbers("b")


@pytest.mark.parametrize("lora", [{}, {"lora_rank": 2, "lora_alpha": 4.0}], ids=["full", "lora"])
def test_held_out_evaluation_leaves_the_training_as_it_was(tiny_dir, teacher_file, tmp_path, lora):
    """`eval_every` loads a teacher, samples the held-out prompts and saves the best step (a
    LoRA save loads a fresh adapter to merge); none of it may draw from the training's random
    stream: with or without the evaluation, the same run."""
    held = tmp_path / "held.jsonl"
    records = [
        chats.Record(
            f"h{i}",
            [
                {"role": "user", "content": f"Held out {i}?"},
                {"role": "assistant", "content": "Ok."},
            ],
        )
        for i in range(3)
    ]
    chats.write_records(held, records)
    gad_stage.train(gad_config(tiny_dir, teacher_file, tmp_path / "plain", max_steps=2, **lora))
    evaluated = dict(eval_every=1, eval_data=str(held), teacher_model=str(tiny_dir), **lora)
    gad_stage.train(gad_config(tiny_dir, teacher_file, tmp_path / "eval", max_steps=2, **evaluated))
    assert any("eval/reverse_kl" in r for r in read_metrics(tmp_path / "eval/gad"))
    assert (tmp_path / "eval/gad/best/model.safetensors").exists()
    for part in ("", "discriminator"):
        a = weights(tmp_path / "plain/gad/final" / part)
        b = weights(tmp_path / "eval/gad/final" / part)
        assert same(a, b), f"{part or 'generator'} differs with the held-out evaluation"


def test_offpolicy_and_reward_model_modes_keep_the_discriminator_frozen(
    tiny_dir, teacher_file, tmp_path
):
    gad_stage.train(
        gad_config(
            tiny_dir,
            teacher_file,
            tmp_path / "off",
            method="offpolicy",
            offpolicy_d_epochs=0.5,
            max_steps=2,
        )
    )
    warm = tmp_path / "off/warmup/final"
    assert same(weights(warm / "discriminator"), weights(tmp_path / "off/gad/final/discriminator"))
    assert not same(weights(warm), weights(tmp_path / "off/gad/final"))
    rows = read_metrics(tmp_path / "off/warmup")
    # Sequential warmup: SFT steps first (no discriminator), then discriminator-only steps.
    assert [r["phase/train_g"] for r in rows] == [1, 1, 0, 0]
    assert [r["phase/train_d"] for r in rows] == [0, 0, 1, 1]

    reward_model = warm / "discriminator"
    gad_stage.train(
        gad_config(
            tiny_dir, teacher_file, tmp_path / "rm", reward_model=str(reward_model), max_steps=2
        )
    )
    assert same(weights(reward_model), weights(tmp_path / "rm/gad/final/discriminator"))
    assert all("d/grad_norm" not in r for r in read_metrics(tmp_path / "rm/gad"))


def test_non_finite_steps_are_skipped_then_stop_with_a_checkpoint(
    tiny_dir, teacher_file, tmp_path, monkeypatch
):
    gad_stage.train(gad_config(tiny_dir, teacher_file, tmp_path / "nan", stage="warmup"))
    real = gad.losses.policy_loss

    def broken(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return loss * float("nan"), stats

    monkeypatch.setattr(gad.losses, "policy_loss", broken)
    before = weights(tmp_path / "nan/warmup/final")
    with pytest.raises(gad_stage.TrainingStopped, match="3 consecutive non-finite steps"):
        gad_stage.train(
            gad_config(tiny_dir, teacher_file, tmp_path / "nan", stage="gad", max_steps=6)
        )
    rows = read_metrics(tmp_path / "nan/gad")
    assert len(rows) == 2 and all(r["warnings"] for r in rows)  # the 3rd stops before logging
    ckpt = tmp_path / "nan/gad/checkpoints/step-000003"
    assert same(before, weights(ckpt))  # no update was applied


def test_accuracy_warning_fires(tiny_dir, teacher_file, tmp_path):
    gad_stage.train(
        gad_config(
            tiny_dir, teacher_file, tmp_path / "w", d_acc_warn=0.0, d_acc_warn_steps=2, max_steps=3
        )
    )
    warned = [r["step"] for r in read_metrics(tmp_path / "w/gad") if r["warnings"]]
    assert 2 in warned


def test_two_processes_match_one(tiny_dir, teacher_file, tmp_path):
    """torchrun with 2 CPU processes: the first steps' losses equal the 1-process run's."""
    from launch import assert_gad_runs_match, train_in_processes

    values = gad_values(
        tiny_dir,
        teacher_file,
        tmp_path,
        micro_batch_size=4,
        max_response_tokens=8,
        max_steps=2,
        per_prompt_seeds=True,
    )
    train_in_processes(tmp_path, "gad", values | {"output_dir": str(tmp_path / "one")}, 1, 0)
    train_in_processes(tmp_path, "gad", values | {"output_dir": str(tmp_path / "two")}, 2, 29527)
    assert_gad_runs_match(tmp_path / "one", tmp_path / "two")


# ------------------------------------------------------------------ GAD moves the student

COLOURS = "red blue green cat dog sun moon tree".split()


@pytest.fixture(scope="module")
def near_student(tiny_dir, tmp_path_factory):
    """A tiny student fine-tuned on answers of 1 to 6 words, and a teacher whose answers always
    carry the trait 'exactly one word'. The student has the trait ~20% of the time, so the
    discriminator's only lasting signal is the trait."""
    import random

    from gad.train import sft

    folder = tmp_path_factory.mktemp("trait")
    rng = random.Random(0)

    def answer(k):
        return " ".join(rng.choice(COLOURS) for _ in range(k))

    def write(path, rows):
        with open(path, "w") as f:
            for q, a in rows:
                messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                f.write(json.dumps({"messages": messages}) + "\n")

    questions = [f"Question {i}?" for i in range(64)]
    write(
        folder / "base.jsonl", [(q, answer(rng.randint(1, 6))) for q in questions for _ in "abcd"]
    )
    write(folder / "teacher.jsonl", [(q, answer(1)) for q in questions])
    base = sft.train(
        cfg.SFTConfig(
            data=str(folder / "base.jsonl"),
            model=str(tiny_dir),
            output_dir=str(folder / "base"),
            epochs=12,
            lr=1e-2,
            micro_batch_size=16,
            mixed_precision="no",
            save_every=0,
        )
    )
    return base, folder / "teacher.jsonl", questions


def one_word_share(folder, questions):
    from gad.train.rollout import Sampling, TransformersRollout

    model, tokenizer = store.load(str(folder))
    rollout = TransformersRollout(model, tokenizer, batch_size=64)
    torch.manual_seed(123)
    prompts = [chats.encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    groups = rollout.generate(prompts[:32], 4, Sampling(0.8, 1.0, 16))
    return sum(len(c.text.split()) == 1 for g in groups for c in g) / 128


def trait_config(base, teacher, out, **overrides):
    """16 GAD steps of the trait experiment (no generator warmup)."""
    values = dict(
        data=str(teacher),
        model=str(base),
        output_dir=str(out),
        batch_prompts=8,
        n_samples=8,
        max_response_tokens=16,
        micro_batch_size=16,
        warmup_generator=False,
        warmup_d_only_steps=0,
        warmup_epochs=0.5,
        epochs=100.0,
        max_steps=16,
        lr=1e-3,
        d_lr=3e-3,
        kl_coef=0.05,
        max_grad_norm=1.0,
        mixed_precision="no",
        save_every=0,
    )
    return cfg.GADConfig(**(values | overrides))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gad_moves_the_student_toward_the_teacher_trait(near_student, tmp_path, seed):
    base, teacher, questions = near_student
    start = one_word_share(base, questions)
    gad_stage.train(trait_config(base, teacher, tmp_path / "run", seed=seed))
    end = one_word_share(tmp_path / "run/gad/final", questions)
    assert start < 0.35
    assert end > start + 0.3, (start, end)
    lengths = [r["response/length_mean"] for r in read_metrics(tmp_path / "run/gad")]
    assert sum(lengths[-4:]) / 4 < sum(lengths[:4]) / 4


def test_smaller_discriminator_and_ce_loss(tiny_dir, teacher_file, tmp_path):
    """A discriminator of another size (same tokenizer) and the Eq. 4 loss run the same loop."""
    small = store.build_tiny(tmp_path / "small", seed=5, hidden_size=32, num_layers=1)
    gad_stage.train(
        gad_config(
            tiny_dir,
            teacher_file,
            tmp_path / "run",
            discriminator=str(small),
            d_loss="ce",
            max_steps=2,
        )
    )
    d = discriminator.load(str(tmp_path / "run/gad/final/discriminator"))
    assert d.config.hidden_size == 32 and d.config.num_labels == 1
    rows = read_metrics(tmp_path / "run/gad")
    # CE loss of an untrained head is near 2·log 2 (teacher term + student term), BT's near log 2.
    assert rows[0]["d/loss"] > 1.0


# ------------------------------------------------------------------ fused passes


class GradSnapshot:
    """Stands in for the optimizer: keeps the gradients `update_g` produced."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def step(self):
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters()}

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def test_fused_old_logprobs_and_length_sorted_batches_give_the_separate_pass_loss(
    tiny_dir, tmp_path
):
    """The reference implementation spends a forward pass on the old log-probs and batches
    sequences in prompt order; `update_g` takes them from its own forward, in length-sorted
    micro-batches. Same loss, same gradients."""
    from gad.train import losses

    torch.manual_seed(0)
    generator, tokenizer = store.load(str(tiny_dir))
    reference, _ = store.load(str(tiny_dir))
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.01 * torch.randn_like(p))
    students = [
        chats.Example(f"s{i}", torch.randint(5, 500, (6 + n,)).tolist(), 6, False)
        for i, n in enumerate([1, 9, 3, 12, 2, 7, 5, 11])
    ]
    advantage_b = torch.randn(len(students))
    config = cfg.GADConfig(micro_batch_size=3, temperature=0.7, kl_coef=0.1, max_grad_norm=0.0)
    accelerator = loop.make_accelerator("no", "none", tmp_path)
    snapshot = GradSnapshot(generator)
    m = gad_state.Models(generator, None, tokenizer, snapshot, None, reference)

    ref_logp = gad.ref_logprobs(config, accelerator, m, students)
    stats = gad.update_g(config, accelerator, m, students, advantage_b, ref_logp, len(students))

    # The separate passes: old and reference log-probs by their own forward, prompt order.
    generator.zero_grad()
    total = 0.0
    prompt_order = list(range(len(students)))
    for start in range(0, len(students), config.micro_batch_size):
        idx = prompt_order[start : start + config.micro_batch_size]
        batch = engine.collate([students[i] for i in idx], tokenizer.pad_token_id)
        with torch.no_grad():
            old_bt, _, _ = engine.response_logprobs(generator, batch, config.temperature)
            ref_bt, _, _ = engine.response_logprobs(reference, batch, config.temperature)
        logp_bt, mask_bt, _ = engine.response_logprobs(generator, batch, config.temperature)
        loss, _ = losses.policy_loss(
            logp_bt,
            old_bt,
            advantage_b[idx],
            mask_bt,
            clip_eps=config.clip_eps,
            kl_coef=config.kl_coef,
            ref_logp_bt=ref_bt,
        )
        (loss * len(idx) / len(students)).backward()
        total += loss.item() * len(idx) / len(students)

    assert stats["g/loss"] == pytest.approx(total, abs=1e-6)
    assert stats["g/clip_frac"] == 0.0 and stats["g/kl"] > 0
    for name, p in generator.named_parameters():
        torch.testing.assert_close(snapshot.grads[name], p.grad, atol=1e-6, rtol=1e-5)


def test_sigkill_in_steps_and_checkpoint_writes_then_resume_is_bit_exact(
    tiny_dir, teacher_file, tmp_path
):
    """`gad train` (warmup, then GAD) SIGKILLed in the middle of a checkpoint write and at
    random moments, restarted with resume each time, ends with the generator and discriminator
    of an uninterrupted run, bit for bit."""
    import random

    from launch import kill_after_progress, killable

    from gad.core import checkpoint

    def values(out, **kw):
        return gad_values(
            tiny_dir, teacher_file, out, save_every=1, keep_checkpoints=2, max_steps=5, **kw
        )

    clean = killable(tmp_path, "gad", values(tmp_path / "clean"))
    assert clean.wait(timeout=300) == 0, clean.stderr.read()[-3000:]
    out = tmp_path / "killed"
    again = values(out, resume=True)

    proc = killable(tmp_path, "gad", again, kill_in_save="gad/checkpoints/step-000002")
    assert proc.wait(timeout=300) == -9, proc.stderr.read()[-3000:]
    assert (out / "gad/checkpoints/step-000002.tmp").is_dir()
    assert checkpoint.latest(out / "gad") == out / "gad/checkpoints/step-000001"
    assert discriminator.load(str(checkpoint.latest(out / "gad") / "discriminator")) is not None

    def steps() -> int:
        path = out / "gad" / "metrics.jsonl"
        return path.read_bytes().count(b"\n") if path.exists() else 0

    rng, kills = random.Random(13), 1
    for _ in range(3):
        progressed = lambda done=steps(): steps() > done  # noqa: E731
        proc = killable(tmp_path, "gad", again)
        if kill_after_progress(proc, progressed, rng.uniform(0, 0.3)):
            kills += 1
        else:
            assert proc.returncode == 0, proc.stderr.read()[-3000:]
    proc = killable(tmp_path, "gad", again)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    assert kills >= 3, "the run ended before it could be killed"
    for part in ("", "discriminator"):
        a = weights(tmp_path / "clean/gad/final" / part)
        b = weights(out / "gad/final" / part)
        assert same(a, b), f"{part or 'generator'} differs after the kills"
    rows = lambda run: [r["step"] for r in read_metrics(run / "gad")]  # noqa: E731
    assert rows(out) == rows(tmp_path / "clean") == [1, 2, 3, 4, 5]


def test_global_std_is_the_sample_std():
    from types import SimpleNamespace

    one = SimpleNamespace(num_processes=1, device="cpu")
    values = torch.tensor([0.5, -1.0, 2.0, 0.25])
    assert engine.global_std(one, values) == pytest.approx(values.std().item(), rel=1e-6)
    assert engine.global_std(one, torch.tensor([3.0])) == 0.0


def test_d_update_every_k_updates_the_discriminator_on_every_kth_step_only(
    tiny_dir, teacher_file, tmp_path
):
    """k generator steps per discriminator step: between updates the discriminator only scores
    (its weights stay those of the last update) and its scores are still the rewards."""
    config = gad_config(tiny_dir, teacher_file, tmp_path / "k", max_steps=2, d_update_every=2)
    gad_stage.train(config)
    rows = read_metrics(tmp_path / "k/gad")
    assert ["d/loss" in r for r in rows] == [True, False]
    assert "d/student_score" in rows[1] and "reward/mean" in rows[1]
    assert "time/score" in rows[1] and "time/update_d" not in rows[1]
    once = gad_config(tiny_dir, teacher_file, tmp_path / "once", max_steps=1)
    gad_stage.train(once)
    for run in ("k", "once"):
        assert (tmp_path / run / "gad/final/discriminator").exists()
    a, b = (weights(tmp_path / run / "gad/final/discriminator") for run in ("k", "once"))
    assert same(a, b), "the discriminator changed on a step without its update"
    with pytest.raises(cfg.ConfigError, match="d_update_every"):
        gad_config(tiny_dir, teacher_file, tmp_path / "bad", d_update_every=0)


def test_engine_logprob_gap_is_the_mean_and_max_absolute_difference_on_response_tokens():
    gap = samples.GapTotals()
    logp_bt = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.25, -3.0]])
    engine_bt = torch.tensor([[-1.5, -2.0, -9.0], [-0.5, -1.25, -3.0]])
    mask_bt = torch.tensor([[1, 1, 0], [1, 1, 1]])  # the 9-nat difference is padding
    gap.add(logp_bt[:1], engine_bt[:1], mask_bt[:1])  # two micro-batches, summed
    gap.add(logp_bt[1:], engine_bt[1:], mask_bt[1:])
    assert gap.mean() == pytest.approx((0.5 + 0.0 + 0.0 + 1.0 + 0.0) / 5)
    assert gap.max == pytest.approx(1.0)
    flat = [Completion([1, 2], "a", "stop", [-0.1, -0.2]), Completion([3], "b", "length", [-1.0])]
    rows = samples.engine_logprobs([flat])
    assert [r.tolist() for r in rows] == [pytest.approx([-0.1, -0.2]), [-1.0]]
    assert samples.engine_logprobs([[Completion([1], "a", "stop")]]) is None
