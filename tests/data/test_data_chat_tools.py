"""Chat beyond strict user/assistant turns: tools, tool calls, tool results, same-role runs, roles_to_train.

Each test prints the trained spans (run with -s to see them) and asserts them as text.
"""

from __future__ import annotations

import json

import pytest

from dtrain.config import DatasetConfig
from dtrain.data import DataError, RowError, prepare_data
from dtrain.data.chat import chat_example
from dtrain.data.chat_template import cannot_render
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


# ChatML that shows neither tool definitions nor tool calls: the template most chat models without tool support ship.
PLAIN_CHATML = (
    "{{ bos_token }}{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_generation_markers_with_whitespace_control_train_what_transformers_marks(tok):
    """`{%- generation -%}` is a generation block to transformers: trained tokens are its assistant mask."""
    template = CHAT_TEMPLATE.replace("{% generation %}", "{%- generation -%}").replace(
        "{% endgeneration %}", "{%- endgeneration -%}"
    )
    example = chat_example(TOOL_CHAT, chat_ds(), tok, template)
    marked = tok.apply_chat_template(
        TOOL_CHAT["messages"], tools=TOOL_CHAT["tools"], chat_template=template, tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True,
    )  # fmt: skip
    assert example.input_ids.tolist() == list(marked["input_ids"])
    trained = [i for i, label in enumerate(example.labels.tolist()) if label != IGNORE]
    assert trained == [i for i, m in enumerate(marked["assistant_masks"]) if m and i > 0]
    assert trained_spans(tok, example) == [CALL_TEXT + "<|im_end|>", "Rain and 4 C.<|im_end|>"]  # no newline


def test_tools_a_template_does_not_render_are_an_error_naming_file_and_line(tmp_path, make_cfg, tokenizer):
    path = tmp_path / "tools.jsonl"
    calls_only = {"messages": TOOL_CHAT["messages"]}  # tool calls, no tool definitions
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    path.write_text("\n".join(json.dumps(row) for row in (good, TOOL_CHAT, calls_only, good)) + "\n")
    cfg = make_cfg((path, "chat"), chat_template=PLAIN_CHATML)
    with pytest.raises(DataError) as error:
        prepare_data(cfg, tokenizer, rank=0, world_size=1)
    assert f"{path}:2: the chat template does not render the tool definitions (field 'tools') and the tool_calls " \
           "of message 1" in str(error.value)  # fmt: skip
    skip = make_cfg((path, "chat"), chat_template=PLAIN_CHATML, on_bad_row="skip")
    report = prepare_data(skip, tokenizer, rank=0, world_size=1).report
    assert report.skipped == {"tools not rendered": 2} and report.examples == 2
    assert report.datasets[0].first_skipped["tools not rendered"].startswith(f"{path}:2: ")
    # The same rows under a template that renders tools prepare without a word.
    rendered = make_cfg((path, "chat"), chat_template=CHAT_TEMPLATE)
    assert prepare_data(rendered, tokenizer, rank=0, world_size=1).report.skipped == {}


def test_which_templates_cannot_render_tools_at_all():
    only_calls = CHAT_TEMPLATE.replace("{%- for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{%- endfor %}", "")
    assert cannot_render(PLAIN_CHATML) == ["tool definitions", "tool calls"]
    assert cannot_render(only_calls) == ["tool definitions"]
    assert cannot_render(CHAT_TEMPLATE) == [] and cannot_render(STRICT) == []  # STRICT refuses the probe: rows say
