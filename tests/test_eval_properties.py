"""`gad eval` on random valid-but-mismatched inputs: answers and references whose ids partly
overlap, records with and without metadata, short and empty answers. Every reported mean must
equal a recomputation, written here from the definitions (README, `gad.eval_run`), over the
records that were matched; nothing goes through the evaluation module's helpers."""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gad.config import load as cfg
from gad.eval import run as eval_run

WORDS = ["the", "cat", "sat", "a", "dog", "ran", "on", "mat", "!!!", "x1", "été", "the_end"]
PIDS = [f"p{i}" for i in range(6)]

texts = st.lists(st.sampled_from(WORDS), max_size=6).map(" ".join)
samples = st.lists(
    st.tuples(texts, st.booleans(), st.sampled_from([None, "stop", "length"])),
    min_size=1,
    max_size=3,
)
answer_sets = st.dictionaries(st.sampled_from(PIDS), samples, min_size=1)
reference_sets = st.dictionaries(st.sampled_from(PIDS), st.tuples(texts, st.booleans()), min_size=1)


def chat(pid: str, text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"question {pid}"}, {"role": "assistant", "content": text}]


def answer_records(answers: dict) -> list[dict]:
    """Sample 0 without metadata keeps the prompt's id; the others carry `meta.prompt_id`."""
    rows = []
    for pid, group in answers.items():
        for k, (text, with_meta, finish) in enumerate(group):
            meta = {"finish_reason": finish} if finish else {}
            if k == 0 and not with_meta:
                rows.append({"id": pid, "messages": chat(pid, text), "meta": meta})
            else:
                meta["prompt_id"] = pid
                rows.append({"id": f"{pid}#{k}", "messages": chat(pid, text), "meta": meta})
    return rows


def reference_records(references: dict) -> list[dict]:
    return [
        {"id": pid, "messages": chat(pid, text), "meta": {"prompt_id": pid} if meta else {}}
        for pid, (text, meta) in references.items()
    ]


def lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = (
                table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
            )
    return table[-1][-1]


def f1(overlap: float, n_cand: int, n_ref: int) -> float:
    if overlap == 0:
        return 0.0
    p, r = overlap / n_cand, overlap / n_ref
    return 2 * p * r / (p + r)


def rouge(cand: str, ref: str) -> float | None:
    a, b = re.findall(r"[a-z0-9]+", cand.lower()), re.findall(r"[a-z0-9]+", ref.lower())
    return None if not a or not b else f1(lcs(a, b), len(a), len(b))


def ngram(cand: str, ref: str, n: int) -> float | None:
    def grams(text: str) -> Counter:
        words = re.findall(r"[^\W_]+", text.lower())
        return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))

    a, b = grams(cand), grams(ref)
    if not a or not b:
        return None
    overlap = sum(min(count, b[g]) for g, count in a.items())
    return f1(overlap, sum(a.values()), sum(b.values()))


def check_mean(reported: dict, values: list[float | None]) -> None:
    measured = [v for v in values if v is not None]
    assert reported["n"] == len(measured)
    if measured:
        assert reported["mean"] == pytest.approx(sum(measured) / len(measured), abs=1e-12)
    else:
        assert reported["mean"] is None


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers=answer_sets, references=reference_sets)
def test_every_reported_mean_is_the_mean_of_the_matched_records(answers, references):
    with tempfile.TemporaryDirectory() as tmp:
        a_path, r_path = Path(tmp) / "a.jsonl", Path(tmp) / "r.jsonl"
        rows, refs = answer_records(answers), reference_records(references)
        a_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        r_path.write_text("".join(json.dumps(r) + "\n" for r in refs))
        config = cfg.EvalConfig(
            answers=str(a_path), reference=str(r_path), bootstrap_reps=10, output=f"{tmp}/o.json"
        )
        pid = {r["id"]: r["meta"].get("prompt_id", r["id"]) for r in rows}
        matched = [r for r in rows if pid[r["id"]] in references]
        if not matched:
            with pytest.raises(eval_run.EvalError, match="no answer in"):
                eval_run.run_eval(config)
            return
        result = eval_run.run_eval(config)

    metrics = result["metrics"]
    text = {r["id"]: r["messages"][-1]["content"] for r in rows}
    check_mean(metrics["length_mean"], [float(len(text[r["id"]].split())) for r in rows])
    said = [r["meta"]["finish_reason"] == "length" for r in rows if "finish_reason" in r["meta"]]
    check_mean(metrics["truncated_share"], [float(x) for x in said])
    pairs = [(text[r["id"]], references[pid[r["id"]]][0]) for r in matched]
    check_mean(metrics["rouge_l"], [rouge(c, t) for c, t in pairs])
    for n in range(1, 5):
        check_mean(metrics[f"ngram_f1_{n}"], [ngram(c, t, n) for c, t in pairs])
    assert result["matched"] == len(matched)
    assert result["unmatched_answers"] == len(rows) - len(matched)
    answered = {pid[r["id"]] for r in matched}
    assert result["unmatched_references"] == len(set(references) - answered)
