"""What a chat template does, decided by transformers' own Jinja environment: whether it has generation markers
(so `return_assistant_tokens_mask` marks what is trained), and whether it renders tool definitions and tool calls.

transformers compiles every chat template with its AssistantTracker extension, which parses `{% generation %}` in
any whitespace-control spelling (`{%- generation -%}`...) into a call of the tracker: asking that parser, not a
second pattern of ours, keeps dtrain's choice equal to what apply_chat_template marks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jinja2

# A conversation with one tool and one tool call, the names found nowhere else in it (`cannot_render`).
_PROBE_TOOLS = [{"type": "function", "function": {"name": "dtrain_probe_tool", "description": "", "parameters": {}}}]
_PROBE_MESSAGES = [
    {"role": "user", "content": "hi"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "dtrain_probe_call", "arguments": {}}}],
    },
    {"role": "tool", "content": "ok", "tool_call_id": "0"},
    {"role": "assistant", "content": "ok"},
]


@functools.lru_cache(maxsize=8)  # asked once per row, for one or two templates per run
def has_generation_markers(template: str) -> bool:
    from transformers.utils.chat_template_utils import _compile_jinja_template

    environment = _compile_jinja_template(template).environment
    trackers = {ext.identifier for ext in environment.extensions.values() if "generation" in ext.tags}
    blocks = environment.parse(template).find_all(jinja2.nodes.CallBlock)
    return any(getattr(block.call.node, "identifier", None) in trackers for block in blocks)


def dropped_tool_parts(render: Callable[..., str], messages: list[dict[str, Any]], tools: list | None) -> list[str]:
    """The parts of a conversation's tools that the template leaves out of its text: "the tool definitions" and
    "the tool_calls of message i". `render(messages, tools)` renders. A part counts as rendered when the text with
    it holds its function names more often than the text without it (whatever the template's notation; a header
    shown for tools without the definitions in it does not count)."""
    full = render(messages, tools)
    dropped = ["the tool definitions"] if tools and not _shows(full, render(messages, None), tools) else []
    for i, message in enumerate(messages):
        if message.get("tool_calls"):
            without = [*messages[:i], {k: v for k, v in message.items() if k != "tool_calls"}, *messages[i + 1 :]]
            if not _shows(full, render(without, tools), message["tool_calls"]):
                dropped.append(f"the tool_calls of message {i}")
    return dropped


def _shows(text: str, text_without: str, entries: list) -> bool:
    names = [_function_name(entry) for entry in entries]
    if not all(names):  # no name to look for: any difference counts
        return text != text_without
    return all(text.count(name) > text_without.count(name) for name in names)


def _function_name(entry: Any) -> str | None:
    """A tool's or a tool call's function name: OpenAI's {"function": {"name": ...}} or a bare {"name": ...}."""
    if not isinstance(entry, dict):
        return None
    inner = entry.get("function") if isinstance(entry.get("function"), dict) else entry
    name = inner.get("name")
    return name if isinstance(name, str) and name else None


def cannot_render(template: str) -> list[str]:
    """What of tools the template shows in no conversation: "tool definitions", "tool calls", both or neither
    ([] also when it refuses the probe conversation: then each row with tools says why)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(messages: list[dict[str, Any]], tools: list | None) -> str:
        (text,), _ = render_jinja_template([messages], tools=tools, chat_template=template, bos_token="", eos_token="")
        return text

    try:
        dropped = dropped_tool_parts(render, _PROBE_MESSAGES, _PROBE_TOOLS)
    except Exception:  # noqa: BLE001 - a template's raise_exception, or any other error of its own code
        return []
    names = {"the tool definitions": "tool definitions", "the tool_calls of message 1": "tool calls"}
    return [names[part] for part in dropped]
