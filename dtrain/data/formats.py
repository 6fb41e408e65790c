"""Turn one parsed row into one tokenized example: token ids plus labels (-100 where nothing is trained).
format: chat lives in dtrain.data.chat.

Every function here is pure given the tokenizer. Labels are NOT shifted (the model shifts them), and the label of
an example's first token is always -100: in a packed block that position would otherwise be "predicted" from the
previous document's last token, so masking it keeps labels from crossing a document boundary, and it makes the
trained-token count identical with and without packing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dtrain.data.errors import RowError

IGNORE = -100


@dataclass
class Example:
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE where not trained

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def make_example(ids: list[int], trained: list[bool]) -> Example:
    input_ids = np.asarray(ids, dtype=np.int32)
    labels = np.where(np.asarray(trained, dtype=bool), input_ids, IGNORE).astype(np.int32)
    if len(labels):
        labels[0] = IGNORE
    return Example(input_ids, labels)


def get_text(row: dict[str, Any], name: str, *, required: bool = True, allow_empty: bool = False) -> str:
    value = row.get(name)
    if value is None and name in row and required:
        raise RowError("missing field", f"field {name!r} is null")
    if value is None:
        if required:
            raise RowError("missing field", f"missing field {name!r} (fields present: {', '.join(map(str, row))})")
        return ""
    if not isinstance(value, str):
        raise RowError("wrong type", f"field {name!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError("empty field", f"field {name!r} is empty")
    return value


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _wrap(tokenizer, ids: list[int], trained: list[bool]) -> tuple[list[int], list[bool]]:
    """bos + ids + eos, where the tokenizer has them; eos is trained whenever the last token is (learn to stop)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    head = [bos] if bos is not None else []
    tail = [eos] if eos is not None else []
    return head + ids + tail, [False] * len(head) + trained + [bool(trained and trained[-1])] * len(tail)


def text_example(row: dict[str, Any], ds, tokenizer) -> Example:
    """Continued pre-training: every token after the first is trained."""
    ids = encode(tokenizer, get_text(row, ds.text_field))
    return make_example(*_wrap(tokenizer, ids, [True] * len(ids)))


def instruction_example(row: dict[str, Any], ds, tokenizer, template: str) -> Example:
    """Alpaca style: the rendered prompt is context only; the output (and eos) is trained."""
    instruction = get_text(row, ds.instruction_field)
    extra = get_text(row, ds.input_field, required=False, allow_empty=True)
    output = get_text(row, ds.output_field)
    input_block = f"### Input:\n{extra}\n\n" if extra.strip() else ""
    prompt = template.format(instruction=instruction, input=extra, input_block=input_block)
    # Prompt and answer are tokenized apart so the boundary is exact (a merge across it would blur the mask).
    prompt_ids, output_ids = encode(tokenizer, prompt), encode(tokenizer, output)
    return make_example(
        *_wrap(tokenizer, prompt_ids + output_ids, [False] * len(prompt_ids) + [True] * len(output_ids))
    )
