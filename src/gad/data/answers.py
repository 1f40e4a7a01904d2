"""Final answers of verifiable tasks: extractors, the teacher's majority vote, ground truth.

An extractor (`EXTRACTORS`: `number`, `choice`, `boxed`) reads a response's final answer in a
canonical form, or None when it has none. `majority_vote` turns one prompt's extracted teacher
answers into a pseudo-label, or says why there is none (`no_answer`, `tie`, `low_share`).
`read_truth` and `accuracy` read a `gad tasks` truth file and score answers against it; `gad
label` labels with the vote and reads the truth only to report, `gad eval --metric accuracy`
scores with it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gad.data import chats

# ---------------------------------------------------------------- answer extractors

Extractor = Callable[[str], str | None]

# A number not glued to a word or a decimal point on its left. The minus sign counts only when
# it does not follow a word character or ")": in "7-3" it is an operator, in "= -3" a sign.
_NUMBER = re.compile(r"(?<![\w.)\]])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_ANSWER_PHRASE = re.compile(r"\banswer\b\s*(?:is\b|:|=)", re.IGNORECASE)
_HASHES = "####"
_CHOICE = "ABCDEFGHIJ"  # up to 10 options, as MMLU-Pro


def normalize_number(text: str) -> str:
    """Canonical form of a number: no thousands commas, no leading zeros, no trailing decimal
    zeros, no negative zero ("1,200.50" -> "1200.5", "-0.0" -> "0", "007" -> "7")."""
    s = text.replace(",", "").strip()
    negative = s.startswith("-")
    whole, _, frac = s.lstrip("-").partition(".")
    frac = frac.rstrip("0")
    out = (whole.lstrip("0") or "0") + (f".{frac}" if frac else "")
    return f"-{out}" if negative and out != "0" else out


def _numbers(text: str) -> list[str]:
    return _NUMBER.findall(text)


def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if none."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    depth, i = 1, starts[-1]
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[starts[-1] : i - 1].strip() if depth == 0 else None


def _after_answer_phrase(text: str) -> tuple[str, str] | None:
    """(clause, rest) after the last "answer is" / "answer:" / "answer =": the clause runs to
    the end of its line or sentence, the rest to the end of the text. None without a phrase."""
    found = list(_ANSWER_PHRASE.finditer(text))
    if not found:
        return None
    rest = text[found[-1].end() :]
    # A sentence ends at a period followed by a space or the end, not at a decimal point.
    return re.split(r"\n|\.(?:\s|$)", rest.lstrip(), maxsplit=1)[0], rest


def extract_number(text: str) -> str | None:
    """The final numeric answer of a response, normalised (`normalize_number`), or None.

    In order: the number in the last `\\boxed{}`; the first number after the last "####" (GSM8K
    style); in the clause after the last "answer is" / "answer:" the number after its last "="
    if it has one ("The answer is 3 + 4 = 7"), else its first number ("The answer is 42, 2 more
    than 40"), else the first number after the phrase ("Answer:" then "**42**" on the next
    line); otherwise the last number of the text, so the numbers of the reasoning before it are
    ignored. Thousands commas are allowed; a "-" right after a digit is an operator, not a sign
    ("7-3" holds 7 and 3).
    """
    boxed = _last_boxed(text)
    if boxed is not None:
        found = _numbers(boxed)
        if found:
            return normalize_number(found[-1])
    if _HASHES in text:
        found = _numbers(text.rsplit(_HASHES, 1)[1])
        if found:
            return normalize_number(found[0])
    phrase = _after_answer_phrase(text)
    if phrase is not None:
        clause, rest = phrase
        # "answer is: 3 + 4 = 7" means 7; "answer is:\n**7**" has it on the next line.
        found = _numbers(clause.rsplit("=", 1)[-1]) or _numbers(rest)
        if found:
            return normalize_number(found[0])
    found = _numbers(text)
    return normalize_number(found[-1]) if found else None


_LETTER = f"[{_CHOICE}]"
# The phrase is matched in any case, the letter only as a capital: "the answer is a ..." is
# not a choice.
_CHOICE_PHRASE = re.compile(
    rf"\b(?:answer|option|choice)(?:\s+is\b|\s*:)?[\s*]*[(\[]?((?-i:{_LETTER}))\b(?![\w'])",
    re.IGNORECASE,
)
_CHOICE_ALONE = re.compile(rf"^\W{{0,2}}({_LETTER})(?:\s*$|[).:\]])")
_CHOICE_PAREN = re.compile(rf"\(({_LETTER})\)")


def extract_choice(text: str) -> str | None:
    """The multiple-choice letter (A-J) a response picks, or None.

    In order: a letter alone in the last `\\boxed{}`; the letter after the last "answer is" /
    "answer:" / "option" / "choice" ("The answer is (B)"); a response that is just a letter
    ("B", "B.", "(B)", "B) Paris"); the last parenthesised letter "(C)". Only capitals count,
    and a leading letter only when punctuation or nothing follows it ("A cat..." is no choice).
    """
    boxed = _last_boxed(text)
    if boxed is not None:
        m = _CHOICE_ALONE.match(boxed.strip())
        if m:
            return m.group(1).upper()
    found = list(_CHOICE_PHRASE.finditer(text))
    if found:
        return found[-1].group(1).upper()
    m = _CHOICE_ALONE.match(text.strip())
    if m:
        return m.group(1)
    found = _CHOICE_PAREN.findall(text)
    return found[-1] if found else None


def normalize_expression(text: str) -> str:
    """A light canonical form of a math expression: no spaces, `$`, `\\left`/`\\right`,
    `\\!`, `\\,` or trailing period; a plain number as `normalize_number` writes it."""
    s = re.sub(r"\\left|\\right|\\[!,;]|\$|\s", "", text).rstrip(".")
    if re.fullmatch(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?", s):
        return normalize_number(s)
    return s


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}`, normalised (`normalize_expression`), or None."""
    boxed = _last_boxed(text)
    return normalize_expression(boxed) if boxed else None


EXTRACTORS: dict[str, Extractor] = {
    "number": extract_number,
    "choice": extract_choice,
    "boxed": extract_boxed,
}
"""The extractors by the name `LabelConfig.extractor` and `EvalConfig.extractor` use."""


def truth_key(extractor: Extractor, answer: str) -> str:
    """A ground-truth answer in the form the extractor gives ("1,000" -> "1000", "B" -> "B");
    a bare expression that the extractor does not recognise is normalised as is."""
    found = extractor(answer)
    return found if found is not None else normalize_expression(answer)


# ---------------------------------------------------------------- majority vote

VoteStatus = Literal["ok", "no_answer", "tie", "low_share"]


@dataclass(frozen=True)
class Vote:
    """The teacher's vote on one prompt."""

    label: str | None
    """The pseudo-label (the top answer) when `status == "ok"`, else None."""
    share: float
    """Top answer's count / all samples, abstentions included (0 when nobody answered)."""
    votes: dict[str, int]
    """Count per extracted answer, most votes first (equal counts: first seen first)."""
    samples: int
    """Teacher samples of the prompt."""
    abstained: int
    """Samples without an extractable answer."""
    status: VoteStatus
    """`ok`, or why the prompt is set aside: `no_answer`, `tie`, `low_share`."""


def majority_vote(answers: Sequence[str | None], min_share: float) -> Vote:
    """Majority vote over one prompt's extracted teacher answers (None = abstained).

    Checked in this order: no answer at all -> `no_answer`; two or more answers with the top
    count -> `tie` (set aside whatever the share: no order-dependent tie-break); top count /
    len(answers) below `min_share` -> `low_share`; else `ok` with that answer as the label.
    """
    given = [a for a in answers if a is not None]
    counts = Counter(given)  # insertion-ordered: equal counts keep first-seen order
    votes = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
    abstained = len(answers) - len(given)
    if not given:
        return Vote(None, 0.0, {}, len(answers), abstained, "no_answer")
    top = max(counts.values())
    share = top / len(answers)
    leaders = [a for a, c in votes.items() if c == top]
    if len(leaders) > 1:
        return Vote(None, share, votes, len(answers), abstained, "tie")
    if share < min_share:
        return Vote(None, share, votes, len(answers), abstained, "low_share")
    return Vote(leaders[0], share, votes, len(answers), abstained, "ok")


# ---------------------------------------------------------------- ground truth


def read_truth(path: str | Path) -> dict[str, str]:
    """Ground-truth answers by prompt id from a truth file (`{"id", "answer"}` per line, as
    `gad tasks` writes); errors name the file, line and field."""
    path = Path(path)
    if not path.exists():
        raise chats.DataError(f"{path}: no such file")
    truth: dict[str, str] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise chats.DataError(f"{where}: not valid JSON ({err.msg})") from err
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str | int):
            raise chats.DataError(f"{where}: field 'id': must be a string")
        if not isinstance(obj.get("answer"), str | int | float):
            raise chats.DataError(f"{where}: field 'answer': must be a string or a number")
        truth[str(obj["id"])] = str(obj["answer"])
    return truth


def prompt_id(record: chats.Record) -> str:
    """`meta.prompt_id` (a sample of a prompt), else the record id."""
    key = record.meta.get("prompt_id") if record.meta else None
    return str(key) if key is not None else record.id


def accuracy(
    records: list[chats.Record], truth: dict[str, str], extractor: Extractor
) -> dict[str, Any]:
    """Per-record correctness of answers against ground truth, matched by prompt id.

    Returns `values` (1.0/0.0 per record with a truth entry, in record order), `answered`
    (records with an extractable answer) and `no_truth` (ids of records without a truth entry).
    """
    values: list[float] = []
    answered = 0
    no_truth: list[str] = []
    for record in records:
        key = prompt_id(record)
        if key not in truth:
            no_truth.append(record.id)
            continue
        got = extractor(record.response or "")
        answered += got is not None
        values.append(float(got is not None and got == truth_key(extractor, truth[key])))
    return {"values": values, "answered": answered, "no_truth": no_truth}
