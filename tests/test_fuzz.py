"""Fuzzing the readers: random mutations of valid record files and configs either load or
raise the named error (DataError / ConfigError, both UserError); nothing else escapes."""

import gzip
import json

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gad.config import load as cfg
from gad.data import chats

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "Seven is prime."},
]
VALID_ROWS = [
    {"id": "a", "messages": CHAT, "meta": {"src": 1}},
    {"messages": CHAT[1:]},
    {"prompt": "Name a prime.", "completion": "Seven."},
    {"prompt": CHAT[:2], "completion": CHAT[2:]},
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
]
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)


def valid_bytes(rows: list[dict], crlf: bool, bom: bool) -> bytes:
    end = "\r\n" if crlf else "\n"
    text = "".join(json.dumps(r, ensure_ascii=False) + end for r in rows)
    return (b"\xef\xbb\xbf" if bom else b"") + text.encode()


@st.composite
def byte_mutations(draw, blob: bytes) -> bytes:
    """Flip, insert, delete and truncate bytes of `blob`."""
    out = bytearray(blob)
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "duplicate"]))
        at = draw(st.integers(0, max(0, len(out) - 1)))
        if op == "flip" and out:
            out[at] = draw(st.integers(0, 255))
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and out:
            del out[at : at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del out[at:]
        elif op == "duplicate":
            out[at:at] = out[at : at + draw(st.integers(1, 40))]
    return bytes(out)


@st.composite
def json_mutations(draw) -> list[dict]:
    """Valid rows with keys removed, added or given values of the wrong shape."""
    rows = [
        json.loads(json.dumps(r))
        for r in draw(st.lists(st.sampled_from(VALID_ROWS), min_size=1, max_size=4))
    ]
    for _ in range(draw(st.integers(0, 3))):
        row = draw(st.sampled_from(rows))
        target = row
        for _ in range(draw(st.integers(0, 2))):  # sometimes go one or two levels down
            children = [v for v in target.values() if isinstance(v, dict | list) and v]
            if not children:
                break
            child = draw(st.sampled_from(children))
            target = draw(st.sampled_from(child)) if isinstance(child, list) else child
            if not isinstance(target, dict):
                break
        if not isinstance(target, dict):
            continue
        op = draw(st.sampled_from(["drop", "set", "add"]))
        keys = sorted(target)
        if op == "drop" and keys:
            del target[draw(st.sampled_from(keys))]
        elif op == "set" and keys:
            target[draw(st.sampled_from(keys))] = draw(json_values)
        else:
            target[draw(st.text(max_size=10))] = draw(json_values)
    return rows


def read_or_named_error(path) -> None:
    for skip in (False, True):
        try:
            loaded = chats.read_records(path, skip_invalid=skip)
        except chats.DataError as err:
            assert str(err) and "\n" not in str(err)
            assert isinstance(err, cfg.UserError)
            continue
        for record in loaded.records:
            assert record.id and record.messages
            assert all(m["role"] in chats.ROLES for m in record.messages)


@SETTINGS
@given(
    rows=json_mutations(),
    crlf=st.booleans(),
    bom=st.booleans(),
    suffix=st.sampled_from([".jsonl", ".jsonl.gz", ".parquet"]),
    data_=st.data(),
)
def test_mutated_record_files_load_or_raise_data_error(tmp_path, rows, crlf, bom, suffix, data_):
    blob = data_.draw(byte_mutations(valid_bytes(rows, crlf, bom)))
    if suffix == ".jsonl.gz" and data_.draw(st.booleans()):
        blob = gzip.compress(blob)  # sometimes a good gzip of mutated text, sometimes raw bytes
    path = tmp_path / f"records{suffix}"
    path.write_bytes(blob)
    read_or_named_error(path)


@SETTINGS
@given(rows=json_mutations())
def test_mutated_parquet_rows_load_or_raise_data_error(tmp_path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "records.parquet"
    try:
        pq.write_table(pa.Table.from_pylist(rows), path)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return  # not representable in Parquet at all: nothing a user could hand gad
    read_or_named_error(path)


CONFIG_CLASSES = list(cfg.CONFIGS)


@SETTINGS
@given(cls=st.sampled_from(CONFIG_CLASSES), data_=st.data())
def test_mutated_config_files_load_or_raise_config_error(tmp_path, cls, data_):
    text = yaml.safe_dump(cfg.to_dict(cls()), sort_keys=False)
    blob = data_.draw(byte_mutations(text.encode()))
    path = tmp_path / "run.yaml"
    path.write_bytes(blob)
    try:
        config = cfg.load(cls, path)
    except cfg.ConfigError as err:
        assert str(err) and isinstance(err, cfg.UserError)
        return
    assert isinstance(config, cls)


@SETTINGS
@given(cls=st.sampled_from(CONFIG_CLASSES), data_=st.data())
def test_random_config_values_build_or_raise_config_error(cls, data_):
    import dataclasses

    names = [f.name for f in dataclasses.fields(cls)]
    values = data_.draw(
        st.dictionaries(st.sampled_from(names) | st.text(max_size=6), json_values, max_size=4)
    )
    try:
        config = cfg.load(cls, None, values)
    except cfg.ConfigError as err:
        assert str(err) and "\n" not in str(err)
        return
    assert isinstance(config, cls)
