"""Chat beyond strict user/assistant turns: tools, tool calls, tool results, same-role runs, roles_to_train.

Each test prints the trained spans (run with -s to see them) and asserts them as text.
"""

from __future__ import annotations

import json

import pytest

from dtrain.config import DatasetConfig
from dtrain.data import RowError
from dtrain.data.chat import chat_example
from dtrain.data.formats import IGNORE
from dtrain.tiny import CHAT_TEMPLATE, train_tokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
TOOL_CHAT = {
    "tools": [WEATHER],
    "messages": [
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_0", "name": "weather", "content": "rain, 4 C"},
        {"role": "assistant", "content": "Rain and 4 C."},
    ],
}
CALL_TEXT = '<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>'
# Llama-2 style: the template itself refuses conversations whose roles do not alternate.
STRICT = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["hello world", "the weather in Oslo is rain"] * 3, 300)


def chat_ds(**fields) -> DatasetConfig:
    return DatasetConfig(format="chat", **fields)


def trained_spans(tok, example) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    spans, run = [], []
    for token, label in zip(example.input_ids.tolist(), example.labels.tolist(), strict=True):
        if label != IGNORE:
            run.append(token)
        elif run:
            spans, run = spans + [tok.decode(run)], []
    spans += [tok.decode(run)] if run else []
    print("trained spans:", spans)
    return spans


def test_tool_calls_are_trained_tool_results_are_not(tok):
    example = chat_example(TOOL_CHAT, chat_ds(), tok, CHAT_TEMPLATE)
    text = tok.decode(example.input_ids.tolist())
    assert '{"type": "function", "function": {"name": "weather"' in text  # tools reach the template
    assert "<|im_start|>tool\nrain, 4 C<|im_end|>" in text
    assert trained_spans(tok, example) == [CALL_TEXT + "<|im_end|>", "Rain and 4 C.<|im_end|>"]


def test_roles_to_train_selects_messages_by_role(tok):
    with_tool = chat_example(TOOL_CHAT, chat_ds(roles_to_train=["assistant", "tool"]), tok, CHAT_TEMPLATE)
    # Found by prefix rendering: a non-assistant message is trained with its header.
    assert trained_spans(tok, with_tool) == [
        CALL_TEXT + "<|im_end|>\n<|im_start|>tool\nrain, 4 C<|im_end|>\n",
        "Rain and 4 C.<|im_end|>\n",
    ]
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    users = chat_example({"messages": messages + messages[:1]}, chat_ds(roles_to_train=["user"]), tok, CHAT_TEMPLATE)
    assert trained_spans(tok, users) == ["<|im_start|>user\nhello<|im_end|>\n"] * 2


def test_consecutive_messages_of_one_role_where_the_template_allows(tok):
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "user", "content": "world"},
        {"role": "assistant", "content": "the"},
        {"role": "assistant", "content": "weather"},
    ]
    example = chat_example({"messages": messages}, chat_ds(), tok, CHAT_TEMPLATE)
    assert trained_spans(tok, example) == ["the<|im_end|>", "weather<|im_end|>"]
    with pytest.raises(RowError, match="chat template refuses this conversation: Conversation roles must alternate"):
        chat_example({"messages": messages}, chat_ds(), tok, STRICT)


def test_tools_and_calls_stored_as_json_strings_give_the_same_tokens(tok):
    as_strings = {"tools": json.dumps(TOOL_CHAT["tools"]), "messages": json.dumps(TOOL_CHAT["messages"])}
    reference = chat_example(TOOL_CHAT, chat_ds(), tok, CHAT_TEMPLATE)
    example = chat_example(as_strings, chat_ds(), tok, CHAT_TEMPLATE)
    assert example.input_ids.tolist() == reference.input_ids.tolist()
    assert example.labels.tolist() == reference.labels.tolist()


def test_a_conversation_must_end_with_a_trained_role(tok):
    with pytest.raises(RowError, match="no assistant/tool reply at the end"):
        chat_example(
            {"messages": TOOL_CHAT["messages"][:1]}, chat_ds(roles_to_train=["assistant", "tool"]), tok, CHAT_TEMPLATE
        )
