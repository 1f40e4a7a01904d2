"""`gad judge`: LLM-as-judge evaluation (the paper's protocol, MiniLLM / MT-Bench style).

Single mode (`baseline` unset). For every question the judge first writes its own reference
answer, then rates the reference and the candidate's answer in one prompt (the reference is
"Assistant 1", the candidate "Assistant 2"; `gad.rating` holds the prompt, the score parser,
the parse retries and the cache). Reported: the mean candidate (and reference) score, the
relative score `100 * sum(candidate) / (sum(candidate) + sum(reference))` (50 = parity with the
judge), and percentile-bootstrap confidence intervals of both (`bootstrap`).

Pairwise mode (`baseline` set). System A (`answers`) and system B (`baseline`) are rated with the
same template, with NO reference answer, in both orders: (A as Assistant 1, B as Assistant 2)
and (B as 1, A as 2). Per question the two scores of each system are summed over both orders;
A wins if its sum is higher, loses if lower, ties if equal (`pairwise_outcome`). A judge that
only follows position therefore produces ties. A question whose verdict failed in either order
is `failed`, never counted as a win, tie or loss.

Inputs: chat records (`gad collect` / `gad generate` output); the question is the record's
prompt (messages minus the last assistant turn), the answer its last assistant turn. Records
are matched by prompt id: `meta.prompt_id` if present, else the record id. In single mode each
candidate record is one item (several samples of a prompt share one cached reference answer);
in pairwise mode each prompt id must occur once per side.

Cached and resumable: every finished request is in the cache (`gad.rating`), so a rerun (or a
run after a kill) sends only what is missing. The API key is never logged, cached or written.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from gad.api import chat
from gad.api.rating import Cache, Judge, make_backend
from gad.api.rating import JudgeError as JudgeError  # the stage's error, raised by the protocol
from gad.config import load as cfg
from gad.config.load import JudgeConfig
from gad.core.progress import Bar
from gad.data import chats, evalsets

# ---------------------------------------------------------------- statistics


def bootstrap(
    candidate: list[float] | np.ndarray,
    reference: list[float] | np.ndarray,
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Percentile-bootstrap CIs over questions of the mean candidate score and relative score.

    Draws `idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))` (questions
    with replacement, paired), computes per resample the mean of `candidate[idx]` and
    `100 * sum(candidate[idx]) / (sum(candidate[idx]) + sum(reference[idx]))`, and returns the
    `(1 - confidence) / 2` and `(1 + confidence) / 2` percentiles (numpy's default linear
    interpolation) as `{"mean_ci": [lo, hi], "relative_ci": [lo, hi]}`.
    """
    c = np.asarray(candidate, dtype=float)
    r = np.asarray(reference, dtype=float)
    n = len(c)
    if n == 0:
        return {"mean_ci": [math.nan, math.nan], "relative_ci": [math.nan, math.nan]}
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    cs, rs = c[idx].sum(axis=1), r[idx].sum(axis=1)
    q = [100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2]
    return {
        "mean_ci": [float(x) for x in np.percentile(cs / n, q)],
        "relative_ci": [float(x) for x in np.percentile(100 * cs / (cs + rs), q)],
    }


def pairwise_outcome(a_first: tuple[float, float], b_first: tuple[float, float]) -> str:
    """`win` / `tie` / `lose` for A from the verdicts of both orders.

    `a_first` = (A's score, B's score) with A shown as Assistant 1; `b_first` = (B's score, A's
    score) with B shown first. A's total is `a_first[0] + b_first[1]`, B's `a_first[1] +
    b_first[0]`; the higher total wins, equal totals (within 1e-9) tie.
    """
    total_a = a_first[0] + b_first[1]
    total_b = a_first[1] + b_first[0]
    if abs(total_a - total_b) <= 1e-9:
        return "tie"
    return "win" if total_a > total_b else "lose"


# ---------------------------------------------------------------- inputs


def prompt_id(record: chats.Record) -> str:
    """Matching key: `meta["prompt_id"]` when present, else the record id."""
    key = record.meta.get("prompt_id") if record.meta else None
    return str(key) if key is not None else record.id


def _answered(path: str, setting: str) -> list[chats.Record]:
    records = evalsets.records_of(path, setting).records
    for record in records:
        if record.response is None:
            raise record.error("messages", "no final assistant answer to judge")
    return records


def _select(records: list[chats.Record], config: JudgeConfig) -> tuple[list[chats.Record], int]:
    """Records restricted to (and ordered like) `config.questions`; also how many are missing."""
    missing = 0
    if config.questions:
        wanted = evalsets.records_of(config.questions, "questions").records
        by_id: dict[str, list[chats.Record]] = {}
        for record in records:
            by_id.setdefault(prompt_id(record), []).append(record)
        chosen: list[chats.Record] = []
        for q in wanted:
            found = by_id.get(prompt_id(q), [])
            if not found:
                missing += 1
            for record in found:
                if record.prompt != q.prompt:
                    raise chats.DataError(
                        f"record '{record.id}' answers a different prompt than question "
                        f"'{prompt_id(q)}' of {config.questions}"
                    )
            chosen.extend(found)
        records = chosen
    if config.limit is not None:
        keep: list[str] = []
        for record in records:
            if prompt_id(record) not in keep:
                keep.append(prompt_id(record))
        allowed = set(keep[: config.limit])
        records = [r for r in records if prompt_id(r) in allowed]
    return records, missing


# ---------------------------------------------------------------- runs


def _round(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 4)


def _single(judge: Judge, config: JudgeConfig) -> tuple[list[dict], dict[str, Any]]:
    records, missing = _select(_answered(config.answers, "answers"), config)
    refs = judge.references([r.prompt for r in records])
    items, where = [], []
    for i, (record, ref) in enumerate(zip(records, refs, strict=True)):
        if ref["status"] == "ok":
            where.append(i)
            items.append((record.prompt, ref["text"], record.response or ""))
    verdicts = dict(zip(where, judge.verdicts(items), strict=True))
    rows: list[dict[str, Any]] = []
    cand, refscores = [], []
    for i, (record, ref) in enumerate(zip(records, refs, strict=True)):
        row: dict[str, Any] = {"id": record.id, "prompt_id": prompt_id(record)}
        if ref["status"] != "ok":
            row.update(status="error", error=ref["error"])
        else:
            v = verdicts[i]
            row["reference"] = ref["text"]
            row["status"] = v["status"]
            if v["status"] == "error":
                row["error"] = v["error"]
            else:
                row["verdict"] = v["text"]
                row["attempts"] = len(v["raw"])
                if v["status"] == "failed":
                    row["raw"] = v["raw"]
                else:
                    row["reference_score"], row["candidate_score"] = v["scores"]
                    refscores.append(v["scores"][0])
                    cand.append(v["scores"][1])
        rows.append(row)
    ci = bootstrap(
        cand, refscores, resamples=config.bootstrap, confidence=config.confidence, seed=config.seed
    )
    total_c, total_r = sum(cand), sum(refscores)
    summary = {
        "mode": "single",
        "questions": len(records),
        "scored": len(cand),
        "failed": sum(r["status"] == "failed" for r in rows),
        "errors": sum(r["status"] == "error" for r in rows),
        "missing": missing,
        "mean_candidate": _round(float(np.mean(cand))) if cand else None,
        "mean_candidate_ci": [_round(x) for x in ci["mean_ci"]],
        "mean_reference": _round(float(np.mean(refscores))) if refscores else None,
        "relative": _round(100 * total_c / (total_c + total_r)) if cand else None,
        "relative_ci": [_round(x) for x in ci["relative_ci"]],
        "confidence": config.confidence,
        "bootstrap": config.bootstrap,
    }
    return rows, summary


def _pairwise(judge: Judge, config: JudgeConfig) -> tuple[list[dict], dict[str, Any]]:
    assert config.baseline is not None
    a_records, missing = _select(_answered(config.answers, "answers"), config)
    b_by_id: dict[str, chats.Record] = {}
    for record in _answered(config.baseline, "baseline"):
        key = prompt_id(record)
        if key in b_by_id:
            raise chats.DataError(f"{config.baseline}: prompt id '{key}' is answered twice")
        b_by_id[key] = record
    pairs: list[tuple[chats.Record, chats.Record]] = []
    seen: set[str] = set()
    for a in a_records:
        key = prompt_id(a)
        if key in seen:
            raise chats.DataError(f"{config.answers}: prompt id '{key}' is answered twice")
        seen.add(key)
        b = b_by_id.get(key)
        if b is None:
            missing += 1
            continue
        if a.prompt != b.prompt:
            raise chats.DataError(f"prompt id '{key}': the two systems answered different prompts")
        pairs.append((a, b))
    items = []
    for a, b in pairs:
        items.append((a.prompt, a.response or "", b.response or ""))
        items.append((a.prompt, b.response or "", a.response or ""))
    verdicts = judge.verdicts(items)
    rows: list[dict[str, Any]] = []
    for k, (a, _) in enumerate(pairs):
        v1, v2 = verdicts[2 * k], verdicts[2 * k + 1]
        row: dict[str, Any] = {"id": a.id, "prompt_id": prompt_id(a)}
        for name, v in (("a_first", v1), ("b_first", v2)):
            row[name] = {k2: v.get(k2) for k2 in ("status", "scores", "text", "raw", "error")}
        if v1["status"] == "ok" and v2["status"] == "ok":
            row["status"] = "ok"
            row["outcome"] = pairwise_outcome(tuple(v1["scores"]), tuple(v2["scores"]))
            row["score_a"] = v1["scores"][0] + v2["scores"][1]
            row["score_b"] = v1["scores"][1] + v2["scores"][0]
            # Same preference in both orders (or a tie in both): the judge did not flip.
            pref1 = np.sign(v1["scores"][0] - v1["scores"][1])
            pref2 = np.sign(v2["scores"][1] - v2["scores"][0])
            row["position_consistent"] = bool(pref1 == pref2)
        else:
            row["status"] = "error" if "error" in (v1["status"], v2["status"]) else "failed"
        rows.append(row)
    ok = [r for r in rows if r["status"] == "ok"]
    counts = {o: sum(r["outcome"] == o for r in ok) for o in ("win", "tie", "lose")}
    n = len(ok)
    summary = {
        "mode": "pairwise",
        "questions": len(pairs),
        "scored": n,
        "failed": sum(r["status"] == "failed" for r in rows),
        "errors": sum(r["status"] == "error" for r in rows),
        "missing": missing,
        **counts,
        **{f"{o}_rate": _round(c / n) if n else None for o, c in counts.items()},
        "position_consistent": sum(r["position_consistent"] for r in ok),
    }
    return rows, summary


def _public_config(config: JudgeConfig) -> dict[str, Any]:
    return asdict(config)  # holds the key's variable name only, never the key


def judge(config: JudgeConfig, *, backend: chat.Client | None = None, quiet: bool = False) -> dict:
    """Judge `config.answers` (single mode) or `answers` vs `baseline` (pairwise mode).

    Writes `config.output` (atomically) and returns the same dict: `{"config", "summary",
    "questions": [per-question rows]}`. `backend` replaces the one the config names (tests).
    """
    started = time.monotonic()
    if not config.answers:
        raise cfg.ConfigError("'answers' is required: a chat-record file of answers to judge")
    if config.attempts < 1:
        raise cfg.ConfigError(f"'attempts' must be at least 1, got {config.attempts}")
    if backend is None:
        # A file with nothing to judge fails before the judge's model loads, not after.
        for setting in ("answers", "baseline", "questions"):
            if getattr(config, setting):
                evalsets.records_of(getattr(config, setting), setting)
        backend = make_backend(config)
    cache = Cache(config.cache_dir)
    protocol = Judge(backend, cache, config)
    # Counts requests, not questions: a question takes one to `attempts` + 1 of them.
    protocol.progress = Bar("judge", None, "req", enabled=not quiet)
    try:
        if config.baseline:
            rows, summary = _pairwise(protocol, config)
        else:
            rows, summary = _single(protocol, config)
    finally:
        protocol.progress.close()
        cache.close()
    summary.update(
        judge=protocol.identity,
        requests=backend.requests,
        cache_hits=protocol.cache_hits,
        seconds=round(time.monotonic() - started, 3),
    )
    result = {"config": _public_config(config), "summary": summary, "questions": rows}
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, output)
    if not quiet:
        print_summary(summary, output)
        errors = [str(r["error"]) for r in rows if r.get("error")]
        if errors:
            text, count = Counter(errors).most_common(1)[0]
            print(f"most common error ({count} of {len(errors)}): {text}")
    return result


def print_summary(summary: dict[str, Any], output: Path | str) -> None:
    """A rich table of the summary."""
    from rich.console import Console
    from rich.table import Table

    def ci(pair: list[float | None]) -> str:
        return "n/a" if None in pair else f"[{pair[0]:.2f}, {pair[1]:.2f}]"

    def num(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    pct = int(round(100 * summary.get("confidence", 0.95)))
    table = Table(title=f"judge ({summary['mode']}) -> {output}", show_header=False)
    rows: list[tuple[str, Any]] = [("judge", summary["judge"]["model"])]
    if summary["mode"] == "single":
        rows += [
            ("mean candidate score (1-10)", num(summary["mean_candidate"])),
            (f"  {pct}% CI", ci(summary["mean_candidate_ci"])),
            ("mean reference score", num(summary["mean_reference"])),
            ("relative score (50 = parity)", num(summary["relative"])),
            (f"  {pct}% CI", ci(summary["relative_ci"])),
        ]
    else:
        n = summary["scored"]
        for o in ("win", "tie", "lose"):
            rate = summary[f"{o}_rate"]
            rows.append((f"A {o}s", f"{summary[o]} ({'n/a' if rate is None else f'{rate:.1%}'})"))
        rows.append(("position-consistent verdicts", f"{summary['position_consistent']}/{n}"))
    rows += [
        ("questions", summary["questions"]),
        ("scored", summary["scored"]),
        ("failed (unparsable verdicts)", summary["failed"]),
        ("errors (no answer from the judge)", summary["errors"]),
        ("missing answers", summary["missing"]),
        ("requests", summary["requests"]),
        ("cache hits", summary["cache_hits"]),
        ("seconds", f"{summary['seconds']:.1f}"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    console = Console()
    console.print(table)
    if summary["failed"] or summary["errors"]:
        console.print(f"[yellow]failed/error questions are listed in {output} (status field)")
