"""format: chat — a conversation rendered by the chat template, messages of `roles_to_train` trained.

A row holds a list of messages ({role, content}, plus `tool_calls` on assistant messages and `tool_call_id` / `name`
on tool results, passed to the template as given) and optionally its tool definitions (`tools_field`), which go to
`apply_chat_template(tools=...)`. Roles are system, user, assistant and tool; their order is the template's business:
several messages of one role in a row are fine where the template renders them, and a template that refuses a
conversation (`raise_exception`) makes a row error with the template's own words.

Which tokens are trained:
- roles_to_train [assistant] and a template with {% generation %} markers (any spelling transformers accepts, as its
  own parser decides: dtrain.data.chat_template): exactly what the markers enclose;
- otherwise each trained message is "the text the template adds for it": render(messages[:k+1]) minus
  render(messages[:k]) (with the generation prompt before an assistant message, so its header is not trained).
  That needs a template whose rendering of a prefix is a prefix of the full rendering (ChatML, Llama, Mistral...).

A row's tool definitions and tool calls must reach the rendered text: a template that drops them (plain ChatML
renders neither) would train the tool-call turn on an empty reply, so such a row is an error (or skipped).
"""

from __future__ import annotations

import json
from typing import Any

import jinja2

from dtrain.config.data import CHAT_ROLES
from dtrain.data.chat_template import dropped_tool_parts, has_generation_markers
from dtrain.data.errors import RowError
from dtrain.data.formats import Example, get_text, make_example

DEFAULT_ROLE_ALIASES = {"human": "user", "gpt": "assistant"}  # sharegpt's names, accepted without a role_map
PASSED_THROUGH = ("tool_calls", "tool_call_id", "name")  # message keys handed to the template when present


def training_chat_template(cfg, tokenizer) -> str | None:
    """The template chats are rendered with: data.chat_template, else the tokenizer's (its default when it carries
    several). Exports write this one into the tokenizer they save."""
    template = cfg.data.chat_template or getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()))
    return template


def chat_example(row: dict[str, Any], ds, tokenizer, template: str) -> Example:
    roles = list(ds.roles_to_train)
    messages = normalize_messages(row, ds, roles)
    tools = _json_field(row, ds.tools_field, required=False)
    try:
        _check_tools_rendered(tokenizer, messages, template, tools, ds.tools_field)
        if roles == ["assistant"] and has_generation_markers(template):
            ids, mask = _render_with_generation_marks(tokenizer, messages, template, tools)
        else:
            ids, mask = _render_by_prefixes(tokenizer, messages, template, tools, roles)
    except jinja2.TemplateError as e:
        raise RowError("chat template", f"the chat template refuses this conversation: {e}") from None
    return make_example(ids, mask)


def _check_tools_rendered(tokenizer, messages, template, tools, tools_field: str) -> None:
    if not tools and not any(m.get("tool_calls") for m in messages):
        return

    def render(msgs, row_tools) -> str:
        return tokenizer.apply_chat_template(msgs, tools=row_tools, chat_template=template, tokenize=False)

    dropped = dropped_tool_parts(render, messages, tools)
    if dropped:
        named = [f"{d} (field {tools_field!r})" if d == "the tool definitions" else d for d in dropped]
        raise RowError(
            "tools not rendered",
            f"the chat template does not render {' and '.join(named)}: they would vanish from the training text; "
            "use a template that renders tools (data.chat_template) or drop them from the data",
        )


def normalize_messages(row: dict[str, Any], ds, roles_to_train: list[str]) -> list[dict[str, Any]]:
    """The row's messages as [{role, content, ...}] with known roles, checked for something to train."""
    messages = _json_field(row, ds.messages_field, required=True)
    if not messages:
        raise RowError("empty conversation", f"field {ds.messages_field!r} is an empty conversation")
    aliases = {**DEFAULT_ROLE_ALIASES, **ds.role_map}
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RowError("wrong type", f"message {i}: expected an object, got {type(message).__name__}")
        try:
            raw_role = get_text(message, ds.role_field)
            has_calls = bool(message.get("tool_calls"))
            content = get_text(message, ds.content_field, required=not has_calls, allow_empty=True)
        except RowError as e:
            raise RowError(e.reason, f"message {i}: {e.detail}") from None
        role = aliases.get(raw_role, raw_role)
        if role not in CHAT_ROLES:
            raise RowError("unknown role", f"message {i}: unknown role {raw_role!r} (map it with role_map)")
        extra = {key: message[key] for key in PASSED_THROUGH if message.get(key) is not None}
        out.append({"role": role, "content": content, **extra})
    check_trainable(out, roles_to_train)
    return out


def check_trainable(messages: list[dict[str, Any]], roles_to_train: list[str]) -> None:
    """The conversation ends with a message of a trained role, and no trained message is empty."""
    roles = " ".join(m["role"] for m in messages)
    if messages[-1]["role"] not in roles_to_train:
        raise RowError("bad role sequence", f"no {'/'.join(roles_to_train)} reply at the end (roles: {roles})")
    for i, message in enumerate(messages):
        if message["role"] in roles_to_train and not (message["content"].strip() or message.get("tool_calls")):
            raise RowError("empty field", f"message {i}: empty {message['role']} reply")


def _json_field(row: dict[str, Any], name: str, *, required: bool) -> list | None:
    """A list field, which csv / parquet files often store as a JSON string."""
    value = row.get(name)
    if value is None:
        if required:
            raise RowError("missing field", f"missing field {name!r} (fields present: {', '.join(map(str, row))})")
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowError("wrong type", f"field {name!r} is a string that is not a JSON list") from None
    if not isinstance(value, list):
        raise RowError("wrong type", f"field {name!r} must be a list, got {type(value).__name__}")
    return value


def _render_with_generation_marks(tokenizer, messages, template, tools) -> tuple[list[int], list[bool]]:
    out = tokenizer.apply_chat_template(
        messages,
        tools=tools,
        chat_template=template,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]


def _render_by_prefixes(tokenizer, messages, template, tools, roles_to_train) -> tuple[list[int], list[bool]]:
    """Character spans of the trained messages, found by rendering prefixes, mapped to tokens by the fast
    tokenizer's offsets."""

    def render(msgs, gen_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            msgs, tools=tools, chat_template=template, tokenize=False, add_generation_prompt=gen_prompt
        )

    full = render(messages, False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] not in roles_to_train:
            continue
        # transformers renders no empty conversation: a trained first message starts the text (its first token, the
        # bos here, is never trained anyway: see formats.make_example)
        before = render(messages[:k], message["role"] == "assistant") if k else ""
        after = render(messages[: k + 1], False)
        if not (full.startswith(after) and after.startswith(before)):
            raise RowError(
                "chat template",
                f"message {k}: the chat template does not render conversation prefixes as prefixes; "
                "add {% generation %} markers to it (data.chat_template) and train the assistant role only",
            )
        spans.append((len(before), len(after)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(start <= a and b <= end for start, end in spans) and b > a for a, b in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask
