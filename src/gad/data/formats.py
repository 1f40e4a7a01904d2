"""The files chat records come in: JSONL (UTF-8, a BOM and CRLF line ends are fine),
`.jsonl.gz`, or Parquet, and the named refusal of anything else (a zip, UTF-16 text, binary
data) before a single record is read.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gad.config.load import UserError


class DataError(UserError, ValueError):
    """A malformed record; the message names file, line and field."""


_MAGIC = {
    b"\x1f\x8b": "gzip-compressed",
    b"PK\x03\x04": "a zip archive",
    b"BZh": "bzip2-compressed",
    b"\xfd7zXZ\x00": "xz-compressed",
    b"\x28\xb5\x2f\xfd": "zstd-compressed",
    b"PAR1": "a Parquet file",
    b"\xff\xfe": "UTF-16 text",
    b"\xfe\xff": "UTF-16 text",
}


def _without_nulls(row: dict[str, Any]) -> dict[str, Any]:
    """Parquet has no "absent": a null entry (top level or in a message) was not given."""
    out = {}
    for key, value in row.items():
        if value is None:
            continue
        if isinstance(value, list):
            value = [_without_nulls(v) if isinstance(v, dict) else v for v in value]
        out[key] = value
    return out


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DataError(f"{path}: reading Parquet needs `pip install pyarrow`") from err
    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as err:
        detail = " ".join(str(err).split())[:200]
        raise DataError(f"{path}: not a readable Parquet file ({detail})") from err
    for i, row in enumerate(rows, start=1):
        yield i, _without_nulls(row)


def _text_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of a JSONL file, gunzipped when named `.gz`."""
    gz = path.suffix == ".gz"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from err
    kind = next((k for magic, k in _MAGIC.items() if head.startswith(magic)), None)
    if kind is not None and not (gz and kind == "gzip-compressed"):
        if kind == "a Parquet file":
            hint = "name it .parquet"
        elif kind == "UTF-16 text":
            hint = "re-save it as UTF-8"
        elif kind == "gzip-compressed":
            hint = "name it .jsonl.gz (read as is) or decompress it"
        else:
            hint = "decompress it (only .jsonl.gz is read as is)"
        raise DataError(f"{path}: is {kind}, not JSONL text; {hint}")
    try:
        with gzip.open(path, "rb") if gz else open(path, "rb") as f:
            yield from enumerate(f, start=1)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot read ({err})") from err


def rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, decoded object) of a JSONL or Parquet file; undecodable lines yield a
    DataError in place of the object, unreadable files raise one."""
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a record file")
    if path.suffix == ".parquet":
        yield from _parquet_rows(path)
        return
    for i, raw in _text_lines(path):
        if i == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte-order mark, as some editors write
        if b"\x00" in raw:
            raise DataError(f"{path}:{i}: binary data (NUL bytes), not JSONL text")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield (
                i,
                DataError(
                    f"{path}:{i}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                    f"{err.start + 1}); re-save the file as UTF-8"
                ),
            )
            continue
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as err:
            yield i, DataError(f"{path}:{i}: not valid JSON ({err.msg} at column {err.colno})")
        except RecursionError:
            yield i, DataError(f"{path}:{i}: not valid JSON (nested too deeply)")
