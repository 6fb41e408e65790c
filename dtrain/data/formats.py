"""Turn one parsed row into one tokenized example: token ids plus labels (-100 where nothing is trained).

Every function here is pure given the tokenizer. Labels are NOT shifted (the model shifts them), and the label of
an example's first token is always -100: in a packed block that position would otherwise be "predicted" from the
previous document's last token, so masking it keeps labels from crossing a document boundary, and it makes the
trained-token count identical with and without packing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from dtrain.data.errors import RowError

IGNORE = -100
ROLES = ("system", "user", "assistant")
DEFAULT_ROLE_ALIASES = {"human": "user", "gpt": "assistant"}  # sharegpt's names, accepted without a role_map


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


def normalize_messages(row: dict[str, Any], ds) -> list[dict[str, str]]:
    """The row's messages as [{role, content}] with roles system/user/assistant, in a sequence that makes sense."""
    messages = row.get(ds.messages_field)
    if messages is None:
        raise RowError(
            "missing field", f"missing field {ds.messages_field!r} (fields present: {', '.join(map(str, row))})"
        )
    if isinstance(messages, str):  # csv / parquet files often store the list as a JSON string
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise RowError("wrong type", f"field {ds.messages_field!r} is a string that is not a JSON list") from None
    if not isinstance(messages, list):
        raise RowError("wrong type", f"field {ds.messages_field!r} must be a list, got {type(messages).__name__}")
    if not messages:
        raise RowError("empty conversation", f"field {ds.messages_field!r} is an empty conversation")
    aliases = {**DEFAULT_ROLE_ALIASES, **ds.role_map}
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RowError("wrong type", f"message {i}: expected an object, got {type(message).__name__}")
        try:
            raw_role = get_text(message, ds.role_field)
            content = get_text(message, ds.content_field, allow_empty=True)
        except RowError as e:
            raise RowError(e.reason, f"message {i}: {e.detail}") from None
        role = aliases.get(raw_role, raw_role)
        if role not in ROLES:
            raise RowError("unknown role", f"message {i}: unknown role {raw_role!r} (map it with role_map)")
        out.append({"role": role, "content": content})
    check_role_sequence(out)
    return out


def check_role_sequence(messages: list[dict[str, str]]) -> None:
    """Optional system first, then user/assistant alternating from user, ending with an assistant reply."""
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            index = i + len(messages) - len(turns)
            raise RowError(
                "bad role sequence",
                f"message {index}: expected {expected}, got {message['role']}"
                f" (roles: {' '.join(m['role'] for m in messages)})",
            )
    if not turns or turns[-1]["role"] != "assistant":
        raise RowError(
            "bad role sequence", f"no assistant reply at the end (roles: {' '.join(m['role'] for m in messages)})"
        )
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and not message["content"].strip():
            raise RowError("empty field", f"message {i}: empty assistant reply")


def chat_example(row: dict[str, Any], ds, tokenizer, template: str) -> Example:
    """Rendered with the chat template; only assistant turns are trained."""
    messages = normalize_messages(row, ds)
    if "{% generation %}" in template or "{%- generation %}" in template:
        ids, mask = _render_with_generation_marks(tokenizer, messages, template)
    else:
        ids, mask = _render_by_prefixes(tokenizer, messages, template)
    return make_example(ids, mask)


def _render_with_generation_marks(tokenizer, messages, template) -> tuple[list[int], list[bool]]:
    out = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]


def _render_by_prefixes(tokenizer, messages, template) -> tuple[list[int], list[bool]]:
    """Find each assistant reply as the text the template adds between "prompt so far" and "prompt + reply".

    This needs a template whose rendering of a conversation prefix is a prefix of the full rendering (true for
    ChatML, Llama, Mistral...). Character spans are then mapped to tokens with the fast tokenizer's offsets.
    """

    def render(msgs, gen_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            msgs, chat_template=template, tokenize=False, add_generation_prompt=gen_prompt
        )

    full = render(messages, False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, after = render(messages[:k], True), render(messages[: k + 1], False)
        if not (full.startswith(after) and after.startswith(before)):
            raise RowError(
                "chat template",
                "the chat template does not render conversation prefixes as prefixes; "
                "add {% generation %} markers to it (data.chat_template)",
            )
        spans.append((len(before), len(after)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(start <= a and b <= end for start, end in spans) and b > a for a, b in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask
