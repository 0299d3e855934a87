"""The four official templates (Qwen3, Llama 3.1, Mistral v0.3, Qwen2.5, with tools) render ftune's data exactly.

Each asset is the family's official template verbatim below a comment, pinned here by the sha256 of that text.
ftune's rendering of a record in a dataset shape (ShareGPT with function_call/observation, OpenAI JSONL, typed
parts) must equal what transformers' `apply_chat_template` renders from the official text with the same
conversation written by hand in OpenAI's shape and passed with `tools=`. Qwen3's multi-turn reasoning is also
written out by hand, and its labels checked turn by turn.
"""

import hashlib
import json

import pytest

from ftune.config.schema import DataCfg
from ftune.data.formats import to_canonical
from ftune.data.labels import tokenize_conversation
from ftune.data.templates import TEMPLATES, render, resolve_template
from ftune.errors import DataError

OFFICIAL_SHA256 = {
    "qwen3": "87a2728cb8dc9fe424d624542f6060ec05a1d285ebbec578bb078900e33396b5",
    "llama3.1": "e10ca381b1ccc5cf9db52e371f3b6651576caee0a630b452e2816b2d404d4b65",
    "mistral_tools": "e16746b40344d6c5b5265988e0328a0bf7277be86f1c335156eae07e29c82826",
    "qwen_tools": "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f",
}
WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TOOLS = [{"type": "function", "function": WEATHER}]

# the same conversation, by hand in OpenAI's shape, and as a ShareGPT record would ship it
OPENAI = [
    {"role": "user", "content": "Is it raining in Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "id": "call00001", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
    {"role": "tool", "content": '{"rain": true}', "tool_call_id": "call00001"},
    {"role": "assistant", "content": "Yes, it rains in Oslo."},
]
OPENAI_RECORD = {"messages": [
    {"role": "user", "content": "Is it raining in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "call00001", "content": '{"rain": true}'},
    {"role": "assistant", "content": "Yes, it rains in Oslo."},
], "tools": [WEATHER]}
SHAREGPT_RECORD = {"conversations": [
    {"from": "human", "value": "Is it raining in Oslo?"},
    {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'},
    {"from": "observation", "value": '{"rain": true}'},
    {"from": "gpt", "value": "Yes, it rains in Oslo."},
], "tools": json.dumps([WEATHER])}


def official(name: str) -> str:
    """The official text of an asset: what follows its comment header."""
    jinja = TEMPLATES[name].jinja
    return jinja[jinja.index("-#}\n") + 4 :]


def canonical(record: dict, fmt: str) -> dict:
    return to_canonical(record, fmt, "f.jsonl:1", DataCfg().roles)


@pytest.mark.parametrize("name", OFFICIAL_SHA256)
def test_each_asset_holds_the_official_text_unchanged(name):
    assert hashlib.sha256(official(name).encode("utf-8")).hexdigest() == OFFICIAL_SHA256[name]


@pytest.mark.parametrize(
    ("name", "record", "fmt"),
    [(name, OPENAI_RECORD, "messages") for name in OFFICIAL_SHA256]
    # ShareGPT tool calls carry no ids, which Mistral requires (refused, see below)
    + [(name, SHAREGPT_RECORD, "sharegpt") for name in OFFICIAL_SHA256 if name != "mistral_tools"],
)
def test_ftune_renders_a_tool_conversation_as_the_official_template_does(name, record, fmt, make_tokenizer):
    tokenizer = make_tokenizer(name)
    converted = canonical(record, fmt)
    # call ids are only printed by Mistral, so the ShareGPT record (without ids) renders as OPENAI for the others
    expected = tokenizer.apply_chat_template(OPENAI, tools=TOOLS, chat_template=official(name), tokenize=False)
    assert render(resolve_template(name, tokenizer), converted["messages"], tokenizer,
                  tools=converted["tools"]) == expected
    assert "get_weather" in expected and "Weather in a city" in expected  # the call and the schema are there


def test_mistral_refuses_tool_calls_without_ids_with_its_own_reason(make_tokenizer):
    tokenizer = make_tokenizer("mistral_tools")
    converted = canonical(SHAREGPT_RECORD, "sharegpt")
    with pytest.raises(DataError, match="Tool call IDs should be alphanumeric strings with length 9"):
        render(resolve_template("mistral_tools", tokenizer), converted["messages"], tokenizer,
               tools=converted["tools"])


REASONING = [
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "reasoning_content": "12 + 30 = 42.", "content": "42."},
    {"role": "user", "content": "And doubled?"},
    {"role": "assistant", "content": "<think>\n42 * 2 = 84.\n</think>\n\n84."},
]
# Qwen3's official rendering: the first answer's reasoning is dropped (it precedes the last user query)
QWEN3_REASONING = (
    "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n42.<|im_end|>\n"
    "<|im_start|>user\nAnd doubled?<|im_end|>\n<|im_start|>assistant\n<think>\n42 * 2 = 84.\n</think>\n\n84."
    "<|im_end|>\n"
)
# ... and the first turn as the template renders it when that turn is the one being generated
QWEN3_FIRST_TURN = (
    "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n<think>\n12 + 30 = 42.\n</think>\n\n"
    "42.<|im_end|>\n"
)


def test_qwen3_renders_multi_turn_reasoning_as_the_official_template(make_tokenizer):
    tokenizer = make_tokenizer("qwen3")
    messages = canonical({"messages": REASONING}, "messages")["messages"]
    assert render(resolve_template("qwen3", tokenizer), messages, tokenizer) == QWEN3_REASONING
    assert tokenizer.apply_chat_template(REASONING, chat_template=official("qwen3"), tokenize=False) == QWEN3_REASONING


def test_qwen3_labels_follow_the_official_rendering_turn_by_turn(make_tokenizer, learned_texts):
    tokenizer = make_tokenizer("qwen3")
    messages = canonical({"messages": REASONING}, "messages")["messages"]
    last, first = tokenize_conversation(messages, tokenizer, resolve_template("qwen3", tokenizer))
    assert tokenizer.decode(last.input_ids, skip_special_tokens=False) == QWEN3_REASONING
    assert learned_texts(last, tokenizer) == ["<think>\n42 * 2 = 84.\n</think>\n\n84.<|im_end|>"]
    assert tokenizer.decode(first.input_ids, skip_special_tokens=False) == QWEN3_FIRST_TURN
    assert learned_texts(first, tokenizer) == ["<think>\n12 + 30 = 42.\n</think>\n\n42.<|im_end|>"]


def test_without_train_on_reasoning_the_think_block_is_read_but_not_learned(make_tokenizer, learned_texts):
    tokenizer = make_tokenizer("qwen3")
    messages = canonical({"messages": REASONING}, "messages")["messages"]
    examples = tokenize_conversation(messages, tokenizer, resolve_template("qwen3", tokenizer),
                                     train_on_reasoning=False)
    assert [learned_texts(example, tokenizer) for example in examples] == [["84.<|im_end|>"], ["42.<|im_end|>"]]


def test_qwen3_keeps_reasoning_across_tool_steps_after_the_last_query_in_one_example(make_tokenizer, learned_texts):
    tokenizer = make_tokenizer("qwen3")
    messages = [
        {"role": "user", "content": "Rain in Oslo?"},
        {"role": "assistant", "content": "", "reasoning_content": "Look it up.",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "yes"},
        {"role": "assistant", "content": "It rains.", "reasoning_content": "It said yes."},
    ]
    [example] = tokenize_conversation(messages, tokenizer, resolve_template("qwen3", tokenizer), tools=TOOLS)
    assert learned_texts(example, tokenizer) == [
        '<think>\nLook it up.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
        "</tool_call><|im_end|>",
        "<think>\nIt said yes.\n</think>\n\nIt rains.<|im_end|>",
    ]
