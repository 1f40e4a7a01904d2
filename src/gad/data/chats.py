"""Chat records: reading, validation, ids, and tokenisation with the model's chat template.

A record is `{"messages": [{"role", "content"}, ...], "id"?: str, "meta"?: {...}}`. Its prompt is
every message but a final assistant turn; that final turn, if present, is the response. Two other
common shapes are read into the same form: `{"prompt", "completion"?}` (strings or message lists,
as TRL takes them) and ShareGPT `{"conversations": [{"from": "human"|"gpt"|"system", "value"}]}`.
Files are JSONL (UTF-8, a BOM and CRLF line ends are fine), `.jsonl.gz`, or Parquet (`formats`).

Tokenisation keeps teacher and student sequences identical in shape (SPEC §3, discriminator): the
prompt is the template's rendering with the generation prompt, and the response is the template's
assistant content followed by its end-of-turn token *if and only if the answer finished*. A
teacher answer cut at its token limit (`meta.finish_reason == "length"`, or cut here) ends on a
content token, like a student sample that hit `max_response_tokens`; otherwise "ends with
end-of-turn" would tell the discriminator who wrote it, and an SFT target would teach the
student to stop mid-sentence. `discriminator_input` is the one path by which both sides' text
reaches the discriminator.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gad.data import formats
from gad.data.formats import DataError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
ACCEPTED = (
    'accepted formats: {"messages": [{"role", "content"}, ...]}; '
    '{"prompt", "completion"} (strings or message lists); '
    'ShareGPT {"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}; '
    'each with optional "id" and "meta"'
)


@dataclass
class Record:
    """One conversation, with a stable id."""

    id: str
    messages: list[dict[str, str]]
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = field(default="", compare=False, repr=False)
    """`file:line` the record was read from ("" when made in memory), for error messages."""

    @property
    def where(self) -> str:
        """Where an error about this record points: its `file:line`, else its id."""
        return self.source or f"record '{self.id}'"

    def error(self, field_name: str, problem: str) -> DataError:
        """A DataError naming this record's file, line, id and `field_name`."""
        named = f" (record '{self.id}')" if self.source else ""
        return DataError(f"{self.where}: field '{field_name}': {problem}{named}")

    @property
    def prompt(self) -> list[dict[str, str]]:
        """All messages but a final assistant turn."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            return self.messages[:-1]
        return self.messages

    @property
    def response(self) -> str | None:
        """The final assistant turn's text, or None when the record is a bare prompt."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            return self.messages[-1]["content"]
        return None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "messages": self.messages}
        if self.meta:
            out["meta"] = self.meta
        return out


@dataclass
class Loaded:
    """Records read from a file, plus what was skipped (with `skip_invalid`) and why."""

    records: list[Record]
    skipped: list[str] = field(default_factory=list)


def prompt_key(messages: list[dict[str, str]]) -> str:
    """Content hash of a prompt: the id of a record that has none."""
    blob = json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()
    return "p" + hashlib.sha1(blob).hexdigest()[:12]


def _check_messages(messages: Any, name: str, where: str) -> list[dict[str, str]]:
    """A list of `{"role", "content"}` messages (field `name` in errors)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{name}': must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: field '{name}[{i}]': must be an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: field '{name}[{i}].role': must be one of {ROLES}")
        if not isinstance(content, str):
            raise DataError(f"{where}: field '{name}[{i}].content': must be a string")
        extra = set(message) - {"role", "content"}
        if extra:
            raise DataError(f"{where}: field {f'{name}[{i}].{sorted(extra)[0]}'!r}: unknown field")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _turns(value: Any, name: str, role: str, where: str) -> list[dict[str, str]]:
    """`prompt` / `completion`: a string (one `role` turn) or a list of messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return _check_messages(value, name, where)
    raise DataError(f"{where}: field '{name}': must be a string or a list of messages")


def _sharegpt(turns: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field 'conversations': must be a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        name = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: field '{name}': must be an object")
        if not isinstance(turn.get("from"), str) or turn["from"] not in SHAREGPT_ROLES:
            roles = sorted(SHAREGPT_ROLES)
            raise DataError(f"{where}: field '{name}.from': must be one of {roles}")
        if not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: field '{name}.value': must be a string")
        extra = set(turn) - {"from", "value"}
        if extra:
            raise DataError(f"{where}: field {f'{name}.{sorted(extra)[0]}'!r}: unknown field")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return messages


def validate(obj: Any, where: str) -> Record:
    """Check one decoded record (any accepted format); `where` is `file:line` for errors."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        fields = {"messages"}
    elif "conversations" in obj:
        fields = {"conversations"}
    elif "prompt" in obj:
        fields = {"prompt", "completion"}
    else:
        other = sorted(set(obj) - {"id", "meta"})
        problem = f"field {other[0]!r}: unknown field" if other else "field 'messages': missing"
        raise DataError(f"{where}: {problem}; {ACCEPTED}")
    unknown = set(obj) - {"id", "meta"} - fields
    if unknown:
        raise DataError(f"{where}: field {sorted(unknown)[0]!r}: unknown field; {ACCEPTED}")
    if "messages" in fields:
        messages = _check_messages(obj["messages"], "messages", where)
    elif "conversations" in fields:
        messages = _sharegpt(obj["conversations"], where)
    else:
        messages = _turns(obj["prompt"], "prompt", "user", where)
        if "completion" in obj:
            messages += _turns(obj["completion"], "completion", "assistant", where)
    if all(m["role"] == "assistant" for m in messages):
        name = sorted(fields)[-1]
        raise DataError(f"{where}: field '{name}': has no prompt (only assistant turns)")
    record_id = obj.get("id")
    if record_id is not None and (
        not isinstance(record_id, str | int) or isinstance(record_id, bool) or record_id == ""
    ):
        raise DataError(f"{where}: field 'id': must be a non-empty string")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise DataError(f"{where}: field 'meta': must be an object")
    return Record(id=str(record_id) if record_id is not None else "", messages=messages, meta=meta)


def read_records(path: str | Path, *, skip_invalid: bool = False) -> Loaded:
    """Read and validate every record; give each a stable unique id.

    A record without an id gets the hash of its prompt (and `-2`, `-3`... for repeats), so a
    re-run of the same file names the same records. Duplicate explicit ids are an error.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    loaded = Loaded(records=[])
    seen: dict[str, int] = {}
    for line_no, obj in formats.rows(path):
        where = f"{path}:{line_no}"
        try:
            if isinstance(obj, DataError):
                raise obj
            record = validate(obj, where)
            record.source = where
            if record.id:
                if record.id in seen:
                    raise DataError(
                        f"{where}: field 'id': '{record.id}' repeats line {seen[record.id]}"
                    )
            else:
                base = prompt_key(record.prompt)
                record.id, k = base, 1
                while record.id in seen:
                    k += 1
                    record.id = f"{base}-{k}"
        except DataError as err:
            if not skip_invalid:
                raise
            loaded.skipped.append(str(err))
            continue
        seen[record.id] = line_no
        loaded.records.append(record)
    return loaded


def write_records(path: str | Path, records: Iterable[Record]) -> None:
    """Write records as JSONL (atomically: a temp file renamed over the target)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------- tokenisation


def end_of_turn_id(tokenizer: Any) -> int:
    """The token the chat template closes an assistant turn with (e.g. `<|im_end|>`).

    Found by rendering a one-word assistant turn and taking the first special token after the
    content, so it follows the template rather than a table of known models.
    """
    cached = getattr(tokenizer, "_gad_end_of_turn_id", None)
    if cached is not None:
        return cached
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Zebra"}]
    ids = tokenizer.apply_chat_template(probe, tokenize=False)
    content_at = ids.rfind("Zebra")
    tail = tokenizer(ids[content_at + len("Zebra") :], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if t.special
    }
    found = next((i for i in tail if i in special), tokenizer.eos_token_id)
    if found is None:
        raise DataError("the tokenizer's chat template closes no turn and it has no eos token")
    tokenizer._gad_end_of_turn_id = found
    return found


def _template_ids(tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding-like dict from tokenize=True; go through text so
    # the result is a plain list whatever the version.
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer: Any, prompt: list[dict[str, str]]) -> list[int]:
    """Prompt ids: the chat template with the assistant generation prompt appended."""
    return _template_ids(tokenizer, prompt, add_generation_prompt=True)


def encode_response(
    tokenizer: Any, prompt: list[dict[str, str]], response: str, *, finished: bool = True
) -> list[int]:
    """Response ids as the template renders them, ending with the end-of-turn token iff
    `finished` (a cut-off answer ends on its last content token).

    The template's text after the prompt is used (not the bare string) so templates that
    rewrite assistant content stay exact; anything after the end-of-turn token (a newline in
    ChatML) is not part of the response, because generation stops at that token.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    full = _template_ids(tokenizer, prompt + [{"role": "assistant", "content": response}])
    eot = end_of_turn_id(tokenizer)
    if full[: len(prompt_ids)] != prompt_ids:
        # Tokens merged across the prompt/response boundary: fall back to the plain text.
        content = tokenizer(response, add_special_tokens=False)["input_ids"]
    else:
        rest = full[len(prompt_ids) :]
        content = rest[: rest.index(eot)] if eot in rest else rest
    return content + [eot] if finished else content


def record_finished(record: Record) -> bool:
    """Whether the record's answer ended on its own (not cut at the writer's token limit)."""
    return record.meta.get("finish_reason") != "length"


@dataclass
class Example:
    """A tokenised prompt/response pair; `input_ids[prompt_len:]` is the response."""

    id: str
    input_ids: list[int]
    prompt_len: int
    truncated: bool
    """The response did not finish: cut at a token limit (here or by whoever wrote it), so it
    does not end with the end-of-turn token."""


@dataclass
class Encoded:
    """Tokenised records plus what could not be used, by id, for the run summary."""

    examples: list[Example]
    prompt_too_long: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    """Responses cut here at `max_response_tokens`."""
    unfinished: list[str] = field(default_factory=list)
    """Responses their writer already cut (`meta.finish_reason == "length"`)."""


def _no_response(record: Record) -> str:
    if any(m["role"] == "assistant" for m in record.messages):
        return f"the last turn is from '{record.messages[-1]['role']}', not an assistant answer"
    return "no assistant turn to learn from"


def encode_sft(
    tokenizer: Any,
    records: list[Record],
    *,
    max_prompt_tokens: int,
    max_response_tokens: int,
) -> Encoded:
    """Tokenise records that have a response. Over-long prompts are set aside, never cut.

    A response longer than `max_response_tokens` is cut and, like an answer its writer cut,
    does not end with end-of-turn."""
    out = Encoded(examples=[])
    for record in records:
        if record.response is None:
            raise record.error("messages", _no_response(record))
        prompt_ids = encode_prompt(tokenizer, record.prompt)
        if len(prompt_ids) > max_prompt_tokens:
            out.prompt_too_long.append(record.id)
            continue
        finished = record_finished(record)
        if not finished:
            out.unfinished.append(record.id)
        response_ids = encode_response(tokenizer, record.prompt, record.response, finished=finished)
        if len(response_ids) > max_response_tokens:
            response_ids = response_ids[:max_response_tokens]
            out.truncated.append(record.id)
            finished = False
        out.examples.append(
            Example(record.id, prompt_ids + response_ids, len(prompt_ids), not finished)
        )
    return out


def discriminator_input(
    tokenizer: Any,
    prompt: list[dict[str, str]],
    text: str,
    *,
    finished: bool,
    max_response_tokens: int,
    id: str = "",
) -> Example:
    """What the discriminator sees of one answer, whoever wrote it: the prompt under the
    discriminator's template, the answer's *text* encoded by the discriminator's tokenizer (a
    student's sampled ids may be a non-canonical tokenisation that teacher text never is), cut
    at `max_response_tokens`, and the end-of-turn token iff the answer finished uncut."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    response_ids = encode_response(tokenizer, prompt, text, finished=False)
    cut = len(response_ids) >= max_response_tokens
    response_ids = response_ids[:max_response_tokens]
    if finished and not cut:
        response_ids = response_ids + [end_of_turn_id(tokenizer)]
    return Example(id, prompt_ids + response_ids, len(prompt_ids), not (finished and not cut))
