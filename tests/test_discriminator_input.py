"""Issue 12: teacher and student answers reach the discriminator the same way, and the GAD
stage's additions (optimizer carry-over, replay pool, reward shaping, white-box, selection)."""

import json
import math

import pytest
import torch

from gad.config import load as cfg
from gad.core.tracking import read_metrics
from gad.data import chats
from gad.methods import samples
from gad.methods import stage as gad_stage
from gad.models import discriminator, store
from gad.train import engine, losses, sft
from gad.train.rollout import Completion
from tests.test_gad import (  # noqa: F401
    gad_config,
    near_student,
    one_word_share,
    same,
    teacher_file,
    trait_config,
    weights,
)

# (the fixtures above are test_gad's, shared)

PROMPT = [{"role": "user", "content": "Tell me about cats."}]
TEXT = "Cats sleep a lot, and they purr."


def char_by_char_ids(tokenizer, text):
    """A non-canonical tokenisation of `text`: one token per character."""
    ids = [i for ch in text for i in tokenizer(ch, add_special_tokens=False)["input_ids"]]
    assert tokenizer.decode(ids) == text
    return ids


@pytest.fixture(scope="module")
def tok_and_d(tiny_dir):
    tokenizer = store.load_tokenizer(str(tiny_dir))
    d = discriminator.build(str(tiny_dir), pad_token_id=tokenizer.pad_token_id, seed=0).eval()
    return tokenizer, d


def score(d, tokenizer, examples):
    batch = engine.collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        return discriminator.scores(d, batch["input_ids"], batch["attention_mask"])


@pytest.mark.parametrize("finish", ["stop", "length"])
def test_teacher_and_student_of_the_same_text_and_finish_get_the_same_input(tok_and_d, finish):
    tokenizer, d = tok_and_d
    eot = chats.end_of_turn_id(tokenizer)
    record = chats.Record("t", PROMPT + [{"role": "assistant", "content": TEXT}])
    record.meta["finish_reason"] = finish
    teacher = chats.discriminator_input(
        tokenizer,
        record.prompt,
        record.response,
        finished=chats.record_finished(record),
        max_response_tokens=64,
    )
    sampled = char_by_char_ids(tokenizer, TEXT) + ([eot] if finish == "stop" else [])
    canonical = chats.encode_response(tokenizer, PROMPT, TEXT, finished=finish == "stop")
    assert sampled != canonical  # the student's ids are not what teacher text encodes to
    completion = Completion(sampled, tokenizer.decode(sampled, skip_special_tokens=True), finish)
    (student,) = samples.discriminator_inputs(tokenizer, [PROMPT], [[completion]], 64)
    assert student.input_ids == teacher.input_ids
    assert (student.input_ids[-1] == eot) == (finish == "stop")
    assert student.truncated == teacher.truncated == (finish == "length")
    both = score(d, tokenizer, [teacher, student])
    assert torch.allclose(both[0], both[1], atol=1e-6)


def test_a_cut_at_the_limit_is_the_same_cut_on_both_sides(tok_and_d):
    tokenizer, _ = tok_and_d
    finished_teacher = chats.discriminator_input(
        tokenizer, PROMPT, TEXT, finished=True, max_response_tokens=4
    )
    eot = chats.end_of_turn_id(tokenizer)
    response = finished_teacher.input_ids[finished_teacher.prompt_len :]
    assert finished_teacher.truncated and eot not in response
    assert len(finished_teacher.input_ids) - finished_teacher.prompt_len == 4


def test_sft_targets_end_with_end_of_turn_only_when_the_answer_finished(tiny_dir):
    tokenizer = store.load_tokenizer(str(tiny_dir))
    eot = chats.end_of_turn_id(tokenizer)
    done = chats.Record("done", PROMPT + [{"role": "assistant", "content": TEXT}])
    cut = chats.Record("cut", PROMPT + [{"role": "assistant", "content": TEXT}])
    cut.meta["finish_reason"] = "length"
    long = chats.Record("long", PROMPT + [{"role": "assistant", "content": TEXT * 5}])
    out = chats.encode_sft(
        tokenizer, [done, cut, long], max_prompt_tokens=999, max_response_tokens=40
    )
    by_id = {e.id: e for e in out.examples}
    assert by_id["done"].input_ids[-1] == eot and not by_id["done"].truncated
    assert by_id["cut"].input_ids[-1] != eot and by_id["cut"].truncated
    assert by_id["long"].input_ids[-1] != eot and by_id["long"].truncated
    assert by_id["cut"].input_ids == by_id["done"].input_ids[:-1]
    assert out.unfinished == ["cut"] and out.truncated == ["long"]


def test_a_pad_id_inside_a_sample_does_not_move_the_pooled_position(tok_and_d):
    tokenizer, d = tok_and_d
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[5, 6, 7, pad], [5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = discriminator.scores(d, ids, mask)
        hidden = d(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        at_last = d.score(hidden[-1][:, -1]).squeeze(-1)
        pooled_by_pad = d(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    assert torch.allclose(ours, at_last)
    assert not torch.isclose(ours[0], pooled_by_pad[0])  # transformers pools at position 2
    # Right padding: the pooled position is the mask's last 1, not the pad's.
    padded = torch.tensor([[5, 6, 7, pad, pad]])
    with torch.no_grad():
        again = discriminator.scores(d, padded, torch.tensor([[1, 1, 1, 1, 0]]))
    assert torch.allclose(again, ours[:1], atol=1e-5)


def test_the_gad_stage_continues_the_warmup_optimizer_state(tiny_dir, teacher_file, tmp_path):
    def adam_steps(run):
        gad_stage.train(gad_config(tiny_dir, teacher_file, run, stage="warmup"))
        warm = torch.load(run / "warmup" / gad_stage.OPTIMIZERS_FILE, weights_only=False)
        gad_stage.train(gad_config(tiny_dir, teacher_file, run, stage="gad", max_steps=1))
        state = torch.load(run / "gad/checkpoints/step-000001/trainer_state.pt", weights_only=False)
        return {
            key: (float(warm[key]["state"][0]["step"]), float(opt["state"][0]["step"]))
            for key, opt in state["optimizers"].items()
        }

    kept = adam_steps(tmp_path / "kept")
    # 2 warmup steps: the first trains only D (warmup_d_only_steps=1), so G took 1 step and D 2.
    assert kept == {"generator": (1.0, 2.0), "discriminator": (2.0, 3.0)}
    reset_run = tmp_path / "reset"
    gad_stage.train(gad_config(tiny_dir, teacher_file, reset_run, stage="warmup"))
    gad_stage.train(
        gad_config(
            tiny_dir, teacher_file, reset_run, stage="gad", max_steps=1, reset_optimizers=True
        )
    )
    state = torch.load(
        reset_run / "gad/checkpoints/step-000001/trainer_state.pt", weights_only=False
    )
    assert {k: float(o["state"][0]["step"]) for k, o in state["optimizers"].items()} == {
        "generator": 1.0,
        "discriminator": 1.0,
    }


def test_replay_pool_is_first_in_first_out_and_draws_reproducibly():
    pool = samples.replay_push([], ["a", "b", "c"], capacity=4)
    pool = samples.replay_push(pool, ["d", "e"], capacity=4)
    assert pool == ["b", "c", "d", "e"]
    assert samples.replay_push(pool, ["x"], capacity=0) == []
    drawn = samples.replay_draw(pool, 3, seed=0, step=5)
    assert len(set(drawn)) == 3 and set(drawn) <= set(pool)
    assert drawn == samples.replay_draw(pool, 3, seed=0, step=5)
    assert sorted(samples.replay_draw(pool, 10, seed=0, step=5)) == pool


def test_length_correction_and_clip_by_hand():
    score = torch.tensor([3.0, -0.5, 0.2])
    length = torch.tensor([0.0, 9.0, 99.0])
    shaped = losses.shaped_reward(score, length, length_penalty=0.5, score_clip=1.0)
    # clip(3) = 1, -0.5 stays, 0.2 stays; minus 0.5 * log(1 + L): 0, 0.5 ln 10, 0.5 ln 100.
    expected = torch.tensor([1.0, -0.5 - 0.5 * 2.302585, 0.2 - 0.5 * 4.605170])
    assert torch.allclose(shaped, expected, atol=1e-5)
    assert torch.equal(losses.shaped_reward(score, length), score)


def test_whitebox_advantages_and_exact_token_kl_by_hand():
    teacher = torch.log(torch.tensor([[0.5, 0.25]]))
    student = torch.log(torch.tensor([[0.25, 0.25]]))
    assert torch.allclose(
        losses.whitebox_advantages(teacher, student), torch.tensor([[0.693147, 0.0]]), atol=1e-5
    )
    p = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    q = torch.log(torch.tensor([[[0.25, 0.75], [0.9, 0.1]]]))
    # Position 0: 0.5 ln 2 + 0.5 ln(2/3) = 0.143841; position 1: 0; position 1 masked anyway.
    kl = losses.token_kl_from_logits(p, q, torch.tensor([[1.0, 0.0]]))
    assert kl.item() == pytest.approx(0.143841, abs=1e-5)


def test_token_mean_weighs_every_token_the_same():
    pg_bt = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    mask_bt = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    zeros = torch.zeros(2, 3)
    advantage = -torch.ones(2)
    # With ratio 1 and A = -1 the per-token loss is 1; scale row 2's single token by 4 via A.
    advantage_bt = -pg_bt
    seq, _ = losses.policy_loss(zeros, zeros, advantage_bt, mask_bt, kl_coef=0.0)
    tok, _ = losses.policy_loss(zeros, zeros, advantage_bt, mask_bt, kl_coef=0.0, agg="token-mean")
    assert seq.item() == pytest.approx((1.0 + 4.0) / 2)  # mean of per-row means
    assert tok.item() == pytest.approx((3.0 + 4.0) / 4)  # mean over the 4 tokens
    assert losses.policy_loss(zeros, zeros, advantage, mask_bt, kl_coef=0.0)[0].item() == 1.0


def test_a_discriminator_with_its_own_tokenizer_moves_the_student_toward_the_trait(
    near_student, tmp_path
):
    base, teacher, questions = near_student
    other = store.build_tiny(tmp_path / "other-d", seed=7, vocab_size=400)
    student_tok, d_tok = store.load_tokenizer(str(base)), store.load_tokenizer(str(other))
    assert student_tok.get_vocab() != d_tok.get_vocab()
    start = one_word_share(base, questions)
    gad_stage.train(trait_config(base, teacher, tmp_path / "run", discriminator=str(other)))
    final_d = tmp_path / "run/gad/final/discriminator"
    assert store.load_tokenizer(str(final_d)).get_vocab() == d_tok.get_vocab()
    end = one_word_share(tmp_path / "run/gad/final", questions)
    assert end > start + 0.3, (start, end)


def test_whitebox_descends_the_teacher_kl_and_selection_picks_a_step(
    near_student, tiny_dir, tmp_path
):
    base, teacher_file_, questions = near_student
    teacher = sft.train(
        cfg.SFTConfig(
            data=str(teacher_file_),
            model=str(base),
            output_dir=str(tmp_path / "teacher"),
            epochs=6,
            lr=1e-2,
            micro_batch_size=16,
            mixed_precision="no",
            save_every=0,
            save_state=False,
        )
    )
    records = chats.read_records(teacher_file_).records
    chats.write_records(tmp_path / "train.jsonl", records[:48])
    chats.write_records(tmp_path / "held.jsonl", records[48:])
    context = tmp_path / "context.json"
    context.write_text(json.dumps([{"role": "system", "content": "Be brief."}]))
    config = cfg.GADConfig(
        data=str(tmp_path / "train.jsonl"),
        model=str(base),
        method="whitebox",
        teacher_model=str(teacher),
        teacher_context=str(context),
        output_dir=str(tmp_path / "run"),
        stage="gad",
        batch_prompts=8,
        n_samples=4,
        max_response_tokens=16,
        micro_batch_size=16,
        epochs=100.0,
        max_steps=12,
        lr=1e-3,
        kl_coef=0.0,
        max_grad_norm=1.0,
        mixed_precision="no",
        save_every=0,
        eval_every=4,
        eval_data=str(tmp_path / "held.jsonl"),
        eval_length_range=10.0,
    )
    gad_stage.train(config)
    rows = read_metrics(tmp_path / "run/gad")
    kls = [r["g/teacher_kl"] for r in rows if "g/teacher_kl" in r]
    assert len(kls) == 12 and sum(kls[-3:]) / 3 < sum(kls[:3]) / 3, kls
    assert not any(k.startswith("d/") for r in rows for k in r)
    selection = json.loads((tmp_path / "run/gad/selection.json").read_text())
    assert [e["step"] for e in selection["evals"]] == [0, 4, 8, 12]
    assert selection["metric"] == "eval/reverse_kl"
    best = min(selection["evals"], key=lambda e: e["eval/reverse_kl"])
    assert selection["chosen_step"] == best["step"]
    assert (tmp_path / "run/gad/best/model.safetensors").exists()


def test_stabilisers_run_in_the_loop_and_resume_bit_for_bit(tiny_dir, teacher_file, tmp_path):
    stabilisers = dict(d_replay_size=24, length_penalty=0.1, score_clip=2.0, loss_agg="token-mean")
    gad_stage.train(gad_config(tiny_dir, teacher_file, tmp_path / "a", max_steps=4, **stabilisers))
    gad_stage.train(gad_config(tiny_dir, teacher_file, tmp_path / "b", max_steps=2, **stabilisers))
    gad_stage.train(
        gad_config(tiny_dir, teacher_file, tmp_path / "b", max_steps=4, resume=True, **stabilisers)
    )
    for part in ("", "discriminator"):
        a, b = (weights(tmp_path / run / "gad/final" / part) for run in ("a", "b"))
        assert same(a, b), f"{part or 'generator'} differs after resume"
    rows = read_metrics(tmp_path / "a/gad")
    # The pool fills with 16 samples a step: none replayed at step 1, then 16 of at most 24.
    assert [r.get("d/replay_pairs", 0.0) for r in rows] == [0.0, 16.0, 16.0, 16.0]
    # Scores clipped to [-2, 2], minus 0.1 * log(1 + length) with length <= 10 tokens.
    assert all(-2.0 - 0.1 * math.log(11) - 1e-6 <= r["reward/mean"] <= 2.0 for r in rows)
