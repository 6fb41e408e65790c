"""Read rows from local files, naming file and line for every problem.

.jsonl and .json are parsed here, line by line with strict UTF-8, because `datasets`' JSON loader reports a
malformed line without its line number. .parquet and .csv go through `datasets`. Each row comes back as
`(where, row)`, where `where` is "path:line" (or "path row N"), or as `(where, RowError)` for a row that could not
be parsed, so the caller decides between stopping and skipping.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dtrain.data.errors import DataError, RowError

RowOrError = tuple[str, "dict[str, Any] | RowError"]


def read_rows(path: str | Path) -> Iterator[RowOrError]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json(path)
    elif suffix in (".parquet", ".csv"):
        if suffix == ".csv" and (problem := _csv_problem(path)):
            raise DataError(f"{path}:{problem[0]}: {problem[1]}")
        yield from _read_with_datasets(path, suffix[1:])
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .parquet, .csv)")


def _read_jsonl(path: Path) -> Iterator[RowOrError]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark is not part of the row
                raw = raw[3:]
            if not raw.strip():
                continue  # blank lines separate nothing and hold nothing: not rows
            yield f"{path}:{number}", _parse_line(raw.rstrip(b"\r\n"))


def _parse_line(raw: bytes) -> dict[str, Any] | RowError:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return RowError("not UTF-8", f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return RowError("malformed JSON", f"malformed JSON: {e.msg} (column {e.colno})")
    if not isinstance(value, dict):
        return RowError("not an object", f"expected a JSON object, got {type(value).__name__}")
    return value


def _read_json(path: Path) -> Iterator[RowOrError]:
    """A .json file holds a list of objects; one that is really JSON lines is read as such."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON lines in a .json file
            yield from _read_jsonl(path)
            return
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    if isinstance(value, dict):
        yield f"{path}:1", value  # a single object is a single row
        return
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a list of objects, got {type(value).__name__}")
    for number, row in enumerate(value, start=1):
        where = f"{path} record {number}"
        ok = isinstance(row, dict)
        yield where, row if ok else RowError("not an object", f"expected a JSON object, got {type(row).__name__}")


def _csv_problem(path: Path) -> tuple[int, str] | None:
    """(line, problem) of the first malformed CSV record: the parser behind `datasets` reads an unclosed quote to
    the end of the file as one field, or fails without a line number."""
    import csv

    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f, strict=True)
        start = 1
        try:
            for _ in reader:
                start = reader.line_num + 1
        except csv.Error as e:
            return start, f"malformed CSV record starting here: {e}"
    return None


def _read_with_datasets(path: Path, kind: str) -> Iterator[RowOrError]:
    import datasets

    try:
        table = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # pyarrow / pandas parse errors come in many types; all mean "cannot read this file"
        raise DataError(f"{path}: cannot read as {kind}: {type(e).__name__}: {e}") from None
    for number, row in enumerate(table, start=1):
        yield f"{path} row {number}", row
