"""Bad data: every broken file stops preparation with file, line and what is wrong; or is skipped and counted."""

from __future__ import annotations

import json

import pytest

from dtrain.config import DatasetConfig
from dtrain.data import DataError, prepare_data

GOOD_TEXT = json.dumps({"text": "a good row"})
GOOD_CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]})


def chat(*pairs) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in pairs]})


# (file name, format, file lines, expected location, expected message)
CASES = [
    ("malformed.jsonl", "text", [GOOD_TEXT, '{"text": "unterminated}'], 2, "malformed JSON: Unterminated string"),
    (
        "latin1.jsonl",
        "text",
        [GOOD_TEXT, GOOD_TEXT, b'{"text": "caf\xe9"}'],
        3,
        "not valid UTF-8 (byte 0xe9 at column 14)",
    ),
    ("array_row.jsonl", "text", ["[1, 2]"], 1, "expected a JSON object, got list"),
    ("missing_text.jsonl", "text", [GOOD_TEXT, '{"body": "x"}'], 2, "missing field 'text' (fields present: body)"),
    ("number_text.jsonl", "text", ['{"text": 42}'], 1, "field 'text' must be a string, got int"),
    ("empty_text.jsonl", "text", [GOOD_TEXT, '{"text": "  "}'], 2, "field 'text' is empty"),
    ("no_output.jsonl", "instruction", ['{"instruction": "do it"}'], 1, "missing field 'output'"),
    ("empty_chat.jsonl", "chat", [GOOD_CHAT, '{"messages": []}'], 2, "empty conversation"),
    (
        "two_users.jsonl",
        "chat",
        [chat(("user", "a"), ("user", "b"), ("assistant", "c"))],
        1,
        "message 1: expected assistant, got user",
    ),
    (
        "ends_with_user.jsonl",
        "chat",
        [chat(("user", "a"), ("assistant", "b"), ("user", "c"))],
        1,
        "no assistant reply at the end",
    ),
    (
        "late_system.jsonl",
        "chat",
        [chat(("user", "a"), ("assistant", "b"), ("system", "c"), ("assistant", "d"))],
        1,
        "message 2: expected user, got system",
    ),
    ("unknown_role.jsonl", "chat", [chat(("user", "a"), ("robot", "b"))], 1, "message 1: unknown role 'robot'"),
    ("no_content.jsonl", "chat", ['{"messages": [{"role": "user"}]}'], 1, "message 0: missing field 'content'"),
    ("messages_string.jsonl", "chat", ['{"messages": "hello"}'], 1, "is a string that is not a JSON list"),
    ("empty_reply.jsonl", "chat", [chat(("user", "a"), ("assistant", " "))], 1, "message 1: empty assistant reply"),
    ("broken.json", "text", ['[{"text": "a"},', '{"text": "b"', "]"], 3, "malformed JSON: Expecting ',' delimiter"),
    ("null_text.jsonl", "text", [GOOD_TEXT, '{"text": null}'], 2, "field 'text' is null"),
    ("unclosed.csv", "text", ["text", '"good"', '"bad, unclosed', '"x"'], 3, "malformed CSV record starting here"),
    ("no_instruction.jsonl", "instruction", ['{"output": "x"}'], 1, "missing field 'instruction'"),
    ("number_input.jsonl", "instruction", ['{"instruction": "a", "input": 5, "output": "b"}'], 1, "field 'input'"),
    ("message_not_object.jsonl", "chat", ['{"messages": ["hi"]}'], 1, "message 0: expected an object, got str"),
    ("role_not_string.jsonl", "chat", ['{"messages": [{"role": 1, "content": "x"}]}'], 1, "field 'role' must be"),
    ("messages_number.jsonl", "chat", ['{"messages": 5}'], 1, "field 'messages' must be a list, got int"),
    ("no_messages.jsonl", "chat", ['{"conv": []}'], 1, "missing field 'messages' (fields present: conv)"),
    ("trailing_garbage.jsonl", "text", ['{"text": "a"} x'], 1, "malformed JSON: Extra data"),
]


def _write(path, lines) -> None:
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")


@pytest.mark.parametrize(("name", "fmt", "lines", "line", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_file_error_names_file_line_and_problem(tmp_path, make_cfg, tokenizer, name, fmt, lines, line, message):
    path = tmp_path / name
    _write(path, lines)
    with pytest.raises(DataError) as error:
        prepare_data(make_cfg((path, fmt)), tokenizer, rank=0, world_size=1)
    assert f"{path}:{line}: " in str(error.value)
    assert message in str(error.value)


def test_bad_csv_row_names_the_row(tmp_path, make_cfg, tokenizer):
    path = tmp_path / "bad.csv"
    path.write_text("text,other\nfine,1\n,2\n")
    with pytest.raises(DataError, match=r"bad\.csv row 2: field 'text' is null"):
        prepare_data(make_cfg((path, "text")), tokenizer, rank=0, world_size=1)


def test_skip_mode_counts_each_reason_and_keeps_good_rows(tmp_path, make_cfg, tokenizer):
    path = tmp_path / "mixed.jsonl"
    bad = [b'{"messages": []}', b"not json", b'{"messages": "x"}', b"\xff\xfe", chat(("user", "a"), ("user", "b"))]
    _write(path, [GOOD_CHAT, *bad, GOOD_CHAT, b'{"messages": []}'])
    report = prepare_data(make_cfg((path, "chat"), on_bad_row="skip"), tokenizer, rank=0, world_size=1).report
    assert report.examples == 2 and report.datasets[0].rows == 8
    assert report.skipped == {
        "empty conversation": 2,
        "malformed JSON": 1,
        "wrong type": 1,
        "not UTF-8": 1,
        "bad role sequence": 1,
    }
    assert report.datasets[0].first_skipped["empty conversation"].startswith(f"{path}:2: ")
    assert "skipped (empty conversation): 2, first at" in str(report)


def test_a_dataset_with_only_bad_rows_is_an_error_not_an_empty_run(tmp_path, make_cfg, tokenizer):
    path = tmp_path / "all_bad.jsonl"
    _write(path, ["not json"] * 3)
    cfg = make_cfg(DatasetConfig(path=str(path)), on_bad_row="skip")
    with pytest.raises(DataError, match="no usable training examples"):
        prepare_data(cfg, tokenizer, rank=0, world_size=1)
