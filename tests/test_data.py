import json

import pytest

from gad.data import chats


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "Seven is prime."},
]


def test_prompt_and_response_split():
    record = chats.validate({"messages": CHAT}, "x:1")
    assert record.prompt == CHAT[:2]
    assert record.response == "Seven is prime."
    bare = chats.validate({"messages": CHAT[:2]}, "x:1")
    assert bare.prompt == CHAT[:2] and bare.response is None


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ('{"messages": [{"role": "user", "content": "hi"}]', "not valid JSON"),
        ({"messages": []}, "field 'messages'"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "field 'messages[0].role'"),
        ({"messages": [{"role": "user", "content": 3}]}, "field 'messages[0].content'"),
        ({"messages": [{"role": "user", "content": "a"}], "meta": 5}, "field 'meta'"),
        ({"messages": [{"role": "user", "content": "a"}], "colour": 5}, "field 'colour'"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "has no prompt"),
    ],
)
def test_malformed_jsonl_names_file_line_field(tmp_path, row, field):
    good = {"messages": CHAT}
    path = write_jsonl(tmp_path / "d.jsonl", [good, good | {"id": "b"}, row])
    with pytest.raises(chats.DataError) as err:
        chats.read_records(path)
    assert f"{path}:3:" in str(err.value)
    assert field in str(err.value)
    loaded = chats.read_records(path, skip_invalid=True)
    assert len(loaded.records) == 2
    assert len(loaded.skipped) == 1 and f"{path}:3:" in loaded.skipped[0]


def test_malformed_parquet_names_file_row_field(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [
        {"id": "a", "messages": [{"role": "user", "content": "hi"}]},
        {"id": "b", "messages": [{"role": "wizard", "content": "hi"}]},
    ]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(chats.DataError, match=r"d.parquet:2: field 'messages\[0\].role'"):
        chats.read_records(path)
    assert [r.id for r in chats.read_records(path, skip_invalid=True).records] == ["a"]


def test_ids_are_stable_and_unique(tmp_path):
    prompt = {"messages": CHAT[:2]}
    path = write_jsonl(tmp_path / "d.jsonl", [prompt, prompt, {"messages": CHAT, "id": "mine"}])
    first = [r.id for r in chats.read_records(path).records]
    assert first == [r.id for r in chats.read_records(path).records]
    assert len(set(first)) == 3 and first[1] == first[0] + "-2" and first[2] == "mine"
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"messages": CHAT, "id": "x"}] * 2)
    with pytest.raises(chats.DataError, match=r"dup.jsonl:2: field 'id': 'x' repeats line 1"):
        chats.read_records(dup)


def _check_mask(tokenizer, record):
    encoded = chats.encode_sft(
        tokenizer, [record], max_prompt_tokens=4096, max_response_tokens=4096
    ).examples[0]
    eot = chats.end_of_turn_id(tokenizer)
    response_ids = encoded.input_ids[encoded.prompt_len :]
    # The response is exactly the answer text followed by the end-of-turn token...
    assert response_ids[-1] == eot
    assert tokenizer.decode(response_ids[:-1]) == record.response
    # ...and the prompt is exactly what generation would be conditioned on.
    assert encoded.input_ids[: encoded.prompt_len] == chats.encode_prompt(tokenizer, record.prompt)
    from gad.train.engine import collate

    batch = collate([encoded], pad_id=tokenizer.pad_token_id)
    labelled = batch["labels"][0] != -100
    assert labelled.sum().item() == len(response_ids)
    assert batch["labels"][0][labelled].tolist() == response_ids
    return encoded, eot


def test_response_mask_tiny_template(tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    record = chats.validate({"messages": CHAT}, "x:1")
    encoded, eot = _check_mask(tokenizer, record)
    assert tokenizer.convert_ids_to_tokens(eot) == "<|im_end|>"


@pytest.mark.slow
def test_response_mask_smollm2_template(smollm2_tokenizer):
    record = chats.validate({"messages": CHAT}, "x:1")
    encoded, eot = _check_mask(smollm2_tokenizer, record)
    assert smollm2_tokenizer.convert_ids_to_tokens(eot) == "<|im_end|>"
    # The template's rendering of the whole conversation starts with our prompt + response.
    full = smollm2_tokenizer.apply_chat_template(CHAT, tokenize=False)
    ours = smollm2_tokenizer.decode(encoded.input_ids)
    assert full.startswith(ours) and full[len(ours) :].strip() == ""


def test_long_prompts_reported_not_cut(tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    short = chats.validate({"id": "s", "messages": CHAT}, "x:1")
    long = chats.validate(
        {"id": "l", "messages": [{"role": "user", "content": "word " * 400}, CHAT[2]]}, "x:2"
    )
    out = chats.encode_sft(tokenizer, [short, long], max_prompt_tokens=100, max_response_tokens=3)
    assert [e.id for e in out.examples] == ["s"]
    assert out.prompt_too_long == ["l"]
    assert (
        out.truncated == ["s"] and len(out.examples[0].input_ids) - out.examples[0].prompt_len == 3
    )


# ---------------------------------------------------------------- formats and encodings


def test_prompt_completion_and_sharegpt_read_as_messages(tmp_path):
    rows = [
        {"prompt": "Name a prime number.", "completion": "Seven is prime."},
        {"prompt": CHAT[:2], "completion": CHAT[2:]},
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Name a prime number."},
                {"from": "gpt", "value": "Seven is prime."},
            ],
            "id": "share",
        },
        {"prompt": "Only a prompt."},
    ]
    records = chats.read_records(write_jsonl(tmp_path / "d.jsonl", rows)).records
    assert records[0].messages == [CHAT[1], CHAT[2]]
    assert records[1].messages == records[2].messages == CHAT
    assert records[2].id == "share"
    assert records[3].messages == [{"role": "user", "content": "Only a prompt."}]
    assert records[3].response is None


def test_bom_crlf_and_gzip_are_read(tmp_path):
    import gzip

    text = "".join(json.dumps({"messages": CHAT, "id": str(i)}) + "\r\n" for i in range(3))
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    for name in ("bom.jsonl", "d.jsonl.gz"):
        records = chats.read_records(tmp_path / name).records
        assert [r.id for r in records] == ["0", "1", "2"] and records[0].messages == CHAT


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n', r"d.jsonl:1: not UTF-8"),
        (b"\x1f\x8b\x08\x00\x00\x00", r"d.jsonl: is gzip-compressed.*\.jsonl\.gz"),
        (b"PK\x03\x04rest", r"d.jsonl: is a zip archive"),
        (b"PAR1\x00\x00", r"d.jsonl: is a Parquet file.*name it \.parquet"),
        (b"\xff\xfe{\x00", r"d.jsonl: is UTF-16 text"),
        (b'{"prompt": "a"}\n\x00\x01\x02\n', r"d.jsonl:2: binary data"),
        (b'{"text": "hello"}\n', r"d.jsonl:1: field 'text': unknown field; accepted formats"),
        (b'{"id": "x"}\n', r"d.jsonl:1: field 'messages': missing; accepted formats"),
        (b'{"messages": [], "prompt": "x"}\n', r"field 'prompt': unknown field"),
        (b'{"prompt": 3}\n', r"d.jsonl:1: field 'prompt': must be a string or a list"),
        (b'{"conversations": [{"from": "human"}]}\n', r"'conversations\[0\].value'"),
        (b"[" * 100000 + b"\n", r"d.jsonl:1: not valid JSON"),
    ],
)
def test_unreadable_files_get_a_named_error(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(chats.DataError, match=message):
        chats.read_records(path)


def test_directory_and_corrupt_parquet_are_named(tmp_path):
    with pytest.raises(chats.DataError, match=r"is a directory"):
        chats.read_records(tmp_path)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(chats.DataError, match=r"bad.parquet: not a readable Parquet file"):
        chats.read_records(tmp_path / "bad.parquet")
    (tmp_path / "bad.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00truncated")
    with pytest.raises(chats.DataError, match=r"bad.jsonl.gz: cannot read"):
        chats.read_records(tmp_path / "bad.jsonl.gz")


def test_semantic_errors_name_file_and_line(tmp_path):
    class FakeTokenizer:
        pass

    rows = [{"messages": CHAT}, {"messages": CHAT[:2], "id": "bare"}]
    records = chats.read_records(write_jsonl(tmp_path / "d.jsonl", rows)).records
    with pytest.raises(chats.DataError, match=r"d.jsonl:2: field 'messages': no assistant turn"):
        chats.encode_sft(FakeTokenizer(), records[1:], max_prompt_tokens=9, max_response_tokens=9)
    turned = chats.read_records(write_jsonl(tmp_path / "e.jsonl", [{"messages": CHAT + CHAT[1:2]}]))
    with pytest.raises(chats.DataError, match=r"e.jsonl:1: .*last turn is from 'user'"):
        chats.encode_sft(
            FakeTokenizer(), turned.records, max_prompt_tokens=9, max_response_tokens=9
        )


def test_parquet_with_another_column_set_lists_the_formats(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "a"}]), path)
    with pytest.raises(chats.DataError, match=r"qa.parquet:1: field 'answer': unknown field; acc"):
        chats.read_records(path)
    # TRL's prompt/completion columns are read as they are.
    path = tmp_path / "trl.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "q", "completion": "a"}]), path)
    (record,) = chats.read_records(path).records
    assert record.messages == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
