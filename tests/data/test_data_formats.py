"""Each format on a known example: exact token ids and label masks, with a tokenizer trained on a fixed corpus."""

from __future__ import annotations

import json

import pytest

from dtrain.config import DatasetConfig
from dtrain.data import DataError, prepare_data
from dtrain.data.chat import chat_example
from dtrain.data.formats import instruction_example, text_example
from dtrain.tiny import CHAT_TEMPLATE, train_tokenizer

X = -100
TEMPLATE = "Q: {instruction}\n{input_block}A: "
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
# <s> <|im_start|> u s e r \n h i <|im_end|> \n <|im_start|> a s s i s t a n t \n o k <|im_end|> \n
CHAT_IDS = [1, 3, 89, 87, 73, 86, 203, 76, 77, 4, 203, 3, 69, 87, 87, 77, 87, 88, 69, 82, 88, 203, 83, 79, 4, 203]


@pytest.fixture(scope="module")
def tok():
    # Special tokens 0-4 (<pad> <s> </s> <|im_start|> <|im_end|>), then the 256 byte symbols, then 27 merges.
    return train_tokenizer(["hello world", "the cat sat on the mat", "hello there, cat"] * 3, 300)


def test_text_trains_every_token_after_bos(tok):
    example = text_example({"text": "hello cat"}, DatasetConfig(), tok)
    assert example.input_ids.tolist() == [1, 269, 267, 2]  # <s> hello Ġcat </s>
    assert example.labels.tolist() == [X, 269, 267, 2]


def test_instruction_trains_only_output_and_eos(tok):
    example = instruction_example({"instruction": "hi", "output": "ok"}, DatasetConfig(), tok, TEMPLATE)
    assert example.input_ids.tolist() == [1, 53, 30, 225, 76, 77, 203, 37, 30, 225, 83, 79, 2]
    assert example.labels.tolist() == [X] * 10 + [83, 79, 2]


def test_instruction_with_input_renders_input_block(tok):
    row = {"instruction": "hi", "input": "x", "output": "ok"}
    example = instruction_example(row, DatasetConfig(), tok, TEMPLATE)
    assert tok.decode(example.input_ids.tolist()) == "<s>Q: hi\n### Input:\nx\n\nA: ok</s>"
    assert example.labels.tolist()[-3:] == [83, 79, 2] and (example.labels[:-3] == X).all()


def test_chat_with_generation_markers_trains_assistant_reply_and_end_token(tok):
    example = chat_example(CHAT, DatasetConfig(format="chat"), tok, CHAT_TEMPLATE)
    assert example.input_ids.tolist() == CHAT_IDS
    assert example.labels.tolist() == [X] * 22 + [83, 79, 4, X]  # "ok<|im_end|>", not the newline after it


def test_chat_without_markers_finds_replies_by_prefix_rendering(tok):
    plain = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    example = chat_example(CHAT, DatasetConfig(format="chat"), tok, plain)
    assert example.input_ids.tolist() == CHAT_IDS
    # Without markers the reply is "what the template adds for the assistant turn", newline included.
    assert example.labels.tolist() == [X] * 22 + [83, 79, 4, 203]


def test_multi_turn_chat_with_system_trains_each_reply(tok):
    messages = [
        {"role": "system", "content": "be"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "cat"},
        {"role": "assistant", "content": "mat"},
    ]
    example = chat_example({"messages": messages}, DatasetConfig(format="chat"), tok, CHAT_TEMPLATE)
    trained = [t for t, label in zip(example.input_ids.tolist(), example.labels.tolist(), strict=True) if label != X]
    assert tok.decode(trained) == "ok<|im_end|>mat<|im_end|>"


def test_sharegpt_fields_map_to_the_same_tokens(tok):
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}]}
    ds = DatasetConfig(format="chat", messages_field="conversations", role_field="from", content_field="value")
    example = chat_example(row, ds, tok, CHAT_TEMPLATE)
    reference = chat_example(CHAT, DatasetConfig(format="chat"), tok, CHAT_TEMPLATE)
    assert example.input_ids.tolist() == reference.input_ids.tolist()
    assert example.labels.tolist() == reference.labels.tolist()
    custom = {"messages": [{"role": "person", "content": "hi"}, {"role": "bot", "content": "ok"}]}
    mapped = chat_example(
        custom, DatasetConfig(format="chat", role_map={"person": "user", "bot": "assistant"}), tok, CHAT_TEMPLATE
    )
    assert mapped.labels.tolist() == reference.labels.tolist()


def test_tokenizer_without_chat_template_is_a_clear_error_or_uses_the_configured_one(tmp_path, make_cfg, tokenizer):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(CHAT) + "\n")
    bare = train_tokenizer(["hello world"] * 3, 300)
    bare.chat_template = None
    with pytest.raises(DataError, match="no chat template.*set data.chat_template"):
        prepare_data(make_cfg((path, "chat")), bare, rank=0, world_size=1)
    prepared = prepare_data(make_cfg((path, "chat"), chat_template=CHAT_TEMPLATE), bare, rank=0, world_size=1)
    assert prepared.report.train.label_tokens == 3  # "ok" (2 bytes: no merges in this vocab) + <|im_end|>
