"""benchmarks/lab.py (lab v3): the exact per-answer KL against a two-context teacher computed
by hand, the paired statistics by hand, and the --tiny path end to end (every method, resume,
merge)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gad.data import chats
from gad.models import mixture, store

LAB_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "lab.py"


def _load_lab():
    spec = importlib.util.spec_from_file_location("lab_v3", LAB_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["lab_v3"] = module
    spec.loader.exec_module(module)
    return module


lab = _load_lab()


class Bigram(torch.nn.Module):
    """Logits depend on the current token only, plus `bias` once `marker` has been seen in the
    row: a model whose every next-token distribution we can write down by hand."""

    def __init__(self, table: torch.Tensor, marker: int = -1, bias: torch.Tensor | None = None):
        super().__init__()
        self.table, self.marker = table, marker
        self.bias = torch.zeros(table.size(1)) if bias is None else bias

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep):
        seen = (input_ids == self.marker).cumsum(dim=1).clamp(max=1).float()
        logits = self.table[input_ids] + seen[..., None] * self.bias
        return SimpleNamespace(logits=logits[:, -logits_to_keep:])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return store.load_tokenizer(store.build_tiny(tmp_path_factory.mktemp("tiny"), seed=3))


def _next(model, ids):
    return torch.log_softmax(model(torch.tensor([ids]), None, None, 1).logits[0, -1].double(), -1)


def test_per_answer_kl_against_a_two_context_teacher_by_hand(tokenizer):
    vocab = len(tokenizer)
    gen = torch.Generator().manual_seed(0)
    prompt = [{"role": "user", "content": "hello there"}]
    contexts = [
        mixture.Component(0.25, []),
        mixture.Component(0.75, [{"role": "system", "content": "hidden words"}]),
    ]
    plain = set(chats.encode_prompt(tokenizer, prompt))
    marker = min(set(chats.encode_prompt(tokenizer, contexts[1].messages + prompt)) - plain)
    student = Bigram(torch.randn(vocab, vocab, generator=gen))
    teacher = Bigram(
        torch.randn(vocab, vocab, generator=gen), marker, 3 * torch.randn(vocab, generator=gen)
    )
    answers = [lab.Answer(0, 0, [5, 9, 7], "", True), lab.Answer(0, 1, [11, 4], "", False)]

    for forward in (False, True):
        got = lab.answer_stats(
            student, teacher, tokenizer, contexts, [prompt], answers, forward=forward
        )
        for a, row in zip(answers, got, strict=True):
            q_prompt = chats.encode_prompt(tokenizer, prompt)
            t_prompts = [chats.encode_prompt(tokenizer, c.messages + prompt) for c in contexts]
            weights = [c.weight for c in contexts]
            kl, seq = 0.0, [0.0, 0.0]
            for t, y in enumerate(a.ids):
                s = _next(student, q_prompt + a.ids[:t]).exp()
                p_k = [_next(teacher, tp + a.ids[:t]).exp() for tp in t_prompts]
                post = [w * math.exp(x) for w, x in zip(weights, seq, strict=True)]
                p = sum(w / sum(post) * pk for w, pk in zip(post, p_k, strict=True))
                q_, p_ = (p, s) if forward else (s, p)
                kl += float((q_ * (q_.log() - p_.log())).sum())
                seq = [x + math.log(float(pk[y])) for x, pk in zip(seq, p_k, strict=True)]
            assert row["kl"] == pytest.approx(kl, rel=1e-6)
            assert row["length"] == len(a.ids) and row["finished"] == float(a.finished)
            assert row["best_mode_logp"] == pytest.approx(max(seq) / len(a.ids))
            mode = max(range(2), key=lambda k: math.log(weights[k]) + seq[k])
            assert row["mode"] == mode
            mixed = math.log(sum(w * math.exp(x) for w, x in zip(weights, seq, strict=True)))
            assert row["teacher_logp"] == pytest.approx(mixed / len(a.ids))


def _rows(method, values):
    return [{"seed": s, "method": method, "per_prompt": {"reverse_kl": v}} for s, v in values]


def test_paired_difference_and_gap_closed_by_hand():
    seqkd = _rows("seqkd", [(0, [4.0, 6.0]), (1, [5.0, 7.0])])
    gad = _rows("gad", [(0, [3.0, 6.0]), (1, [5.0, 5.0]), (2, [0.0, 0.0])])
    ceiling = _rows("whitebox", [(0, [2.0, 4.0]), (1, [3.0, 5.0])])
    d = lab.paired_difference(gad, seqkd, "reverse_kl", reps=500)
    # Seed 2 has no SeqKD row: only seeds both have are paired.
    assert d["seeds"] == [0, 1] and d["prompts"] == 2
    assert d["mean"] == pytest.approx(((3 - 4) + 0 + 0 + (5 - 7)) / 4)
    assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    g = lab.gap_closed(gad, seqkd, ceiling, reps=500)
    # A ratio of means: (5.5 - 4.75) / (5.5 - 3.5), not a mean of per-seed ratios.
    assert g["mean"] == pytest.approx(0.375)
    same = lab.paired_difference(seqkd, seqkd, "reverse_kl", reps=100)
    assert same["mean"] == 0 and same["ci95"] == [0, 0]


def test_tiny_lab_runs_every_method_resumes_and_merges(tmp_path):
    out = tmp_path / "lab"
    args = ["--tiny", "--out", str(out), "--seeds", "0", "--score-every-epoch"]
    args += ["--gad-variant", 'tm={"loss_agg": "token-mean"}']
    results = lab.main(args)
    written = json.loads((out / "lab-v3.json").read_text())
    assert written["split"] == "test"
    systems = written["systems"]
    expected = {"before", "seqkd", "seqkd@e1", "gad", "gad_long", "gad-tm", "soda", "whitebox"}
    assert set(systems) == expected
    for method, rows in systems.items():
        assert [r["seed"] for r in rows] == [0], method
        row = rows[0]
        for key in ("reverse_kl", "forward_kl", "length", "finished", "mode_purity"):
            assert isinstance(row[key], float), (method, key)
            assert len(row["per_prompt"][key]) == 3, (method, key)  # --tiny: 3 test prompts
    assert written["gap_closed"]["seqkd"]["mean"] == pytest.approx(0.0)
    assert written["gap_closed"]["whitebox"]["mean"] == pytest.approx(1.0)
    assert {"gad - seqkd", "soda - seqkd", "gad-tm - gad", "gad_long - gad"} <= set(
        written["paired"]
    )
    teacher = written["run"]["teacher_data"]["train"]
    assert teacher["answers"] == 4 * 2 and len(teacher["mode_shares"]) == 2
    assert (out / "lab-v3.png").exists() and "| gad |" in (out / "table.md").read_text()
    # The training data carries no trace of the hidden contexts.
    for record in chats.read_records(out / "teacher" / "train.records.jsonl").records:
        assert [m["role"] for m in record.messages] == ["user", "assistant"]

    # A rerun finds every row and trains nothing; a second seed elsewhere merges in.
    before = {p: p.read_text() for p in (out / "rows").rglob("*.json")}
    again = lab.main(args)
    assert {p: p.read_text() for p in (out / "rows").rglob("*.json")} == before
    assert again["systems"] == json.loads(json.dumps(results))["systems"]
    other = tmp_path / "other"
    lab.main(["--tiny", "--out", str(other), "--seeds", "1", "--methods", "seqkd", "gad"])
    merged = lab.main(["--tiny", "--out", str(out), "--seeds", "0", "--merge", str(other)])
    assert [r["seed"] for r in merged["systems"]["gad"]] == [0, 1]
    assert merged["paired"]["gad - seqkd"]["reverse_kl"]["seeds"] == [0, 1]
    # --tiny makes every first seed's GAD run a long one: the plot takes the first folder's.
    assert lab.gad_runs([out, other])[1] == out / "runs" / "s0" / "gad" / "gad"
    assert lab.gad_runs([other, out])[1] == other / "runs" / "s1" / "gad" / "gad"
    # A later session adds a variant to a finished (pruned) seed: SeqKD is trained again,
    # the same numbers, and the rows already there stay as they were.
    assert not any((out / "runs" / "s0" / "seqkd" / "final").rglob("*.safetensors"))
    later = lab.main(
        args[:-2] + ["--methods", "seqkd", "gad", "--gad-variant", 'k0={"kl_coef": 0.0}']
    )
    assert "gad-k0" in later["systems"] and later["systems"]["gad"] == again["systems"]["gad"]


def test_the_plot_finds_each_seeds_gad_run_and_the_long_one(tmp_path):
    """Main GAD runs (no held-out rows) per seed, the first folder's winning; the long run is
    the one with held-out curves, in whichever folder ran it."""

    def run(folder, seed, *rows):
        stage = tmp_path / folder / "runs" / f"s{seed}" / "gad" / "gad"
        stage.mkdir(parents=True)
        (stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return stage

    main0 = run("main", 0, {"step": 1, "d/accuracy": 0.5})
    main1 = run("main", 1, {"step": 1, "d/accuracy": 0.5})
    run("long", 1, {"step": 1, "d/accuracy": 0.5})
    long0 = run("long", 0, {"step": 0, "eval/reverse_kl": 0.2}, {"step": 1, "d/accuracy": 0.5})
    (tmp_path / "main" / "runs" / "s2" / "gad" / "gad").mkdir(parents=True)  # pruned, no metrics
    folders = [tmp_path / "main", tmp_path / "long"]
    assert lab.gad_runs(folders) == ({0: main0, 1: main1}, long0)
    assert lab.gad_runs(folders[:1])[1] is None


def test_bad_inputs_are_refused_before_any_model_loads(tmp_path, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(store, "load", no_load)
    bad = tmp_path / "contexts.json"
    bad.write_text(json.dumps({"mixture": [{"weight": -1, "messages": []}]}))
    with pytest.raises(SystemExit, match="weight"):
        lab.main(["--tiny", "--out", str(tmp_path / "a"), "--teacher-contexts", str(bad)])
    with pytest.raises(SystemExit, match="not NAME=JSON"):
        lab.main(["--tiny", "--out", str(tmp_path / "b"), "--gad-variant", "x={"])
    with pytest.raises(SystemExit, match="unknown GAD settings"):
        lab.main(["--tiny", "--out", str(tmp_path / "c"), "--gad-variant", 'x={"no": 1}'])
    monkeypatch.setitem(lab.NEEDS, "gad", ("no_such_field",))
    with pytest.raises(SystemExit, match="no_such_field"):
        lab.main(["--tiny", "--out", str(tmp_path / "d")])


def test_the_shared_prefix_cache_gives_the_uncached_numbers(tmp_path):
    """Scoring reuses the KV cache of what every prompt starts with (the hidden context): the
    same log-probs as full passes, on a real (tiny) model."""
    folder = store.build_tiny(tmp_path / "m", seed=4)
    model, tokenizer = store.load(str(folder))
    context = [{"role": "system", "content": "hidden words here"}]
    prompts = [[{"role": "user", "content": t}] for t in ("hi", "a longer question here")]
    answers = [lab.Answer(1, 0, [7, 8, 9, 10], "", True), lab.Answer(0, 0, [11], "", False)]
    side = lab.Side(model, tokenizer, context, prompts)
    assert side.cache is not None and side.shared > 3
    with torch.no_grad():
        cached, full = side.log_dists(answers), side._uncached(answers)
    for a, b, answer in zip(cached, full, answers, strict=True):
        assert a.shape == b.shape == (len(answer.ids), len(tokenizer))
        assert torch.allclose(a, b, atol=1e-5)
