"""Every shape of today's chat data maps to exact canonical messages; the shipped samples load with format=auto.

Records are written by hand (or are the shipped samples in ftune/assets/data/shapes); the expected canonical
records and error lines are literal.
"""

import json

import pytest

from ftune.config.schema import DataCfg
from ftune.data.formats import read_source, record_features, resolve_format, to_canonical
from ftune.data.messages import RecordError, split_think
from ftune.data.templates import TEMPLATES_DIR

SHAPES = TEMPLATES_DIR.parent / "data" / "shapes"
ROLES = DataCfg().roles
WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}


def canonical(record) -> dict:
    """The canonical form of one record, its format detected as training detects it."""
    fmt = resolve_format([("f.jsonl:1", record)], "f.jsonl", "auto")
    return to_canonical(record, fmt, "f.jsonl:1", ROLES)


def test_sharegpt_function_call_and_observation_turns_with_a_tools_string_and_system_column():
    record = {
        "conversations": [
            {"from": "human", "value": "Rain in Oslo?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
            {"from": "observation", "value": '{"rain": true}'},
            {"from": "gpt", "value": "Yes."},
        ],
        "system": "Use tools.",
        "tools": json.dumps([WEATHER]),
    }
    assert canonical(record) == {
        "messages": [
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": "Rain in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {"role": "tool", "content": '{"rain": true}'},
            {"role": "assistant", "content": "Yes."},
        ],
        "tools": [{"type": "function", "function": WEATHER}],
    }


def test_openai_tool_calls_with_string_arguments_ids_null_content_and_tool_call_ids():
    record = {
        "messages": [
            {"role": "user", "content": "Rain in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call00001", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": {"rain": True}},
            {"role": "assistant", "content": "Yes.", "weight": 1},
        ],
        "tools": [{"type": "function", "function": WEATHER}],
    }
    assert canonical(record) == {
        "messages": [
            {"role": "user", "content": "Rain in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [CALL | {"id": "call00001"}]},
            {"role": "tool", "content": '{"rain": true}', "tool_call_id": "call00001", "name": "get_weather"},
            {"role": "assistant", "content": "Yes.", "train": True},
        ],
        "tools": [{"type": "function", "function": WEATHER}],
    }


def test_typed_parts_give_content_reasoning_and_tool_calls():
    record = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Rain"}, {"type": "text", "value": " in Oslo?"}]},
        {"role": "assistant", "content": [
            {"type": "reasoning", "value": "Look it up."},
            {"type": "text", "value": "Checking."},
            {"type": "tool_call", "value": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
    ]}
    assert canonical(record) == {"messages": [
        {"role": "user", "content": "Rain in Oslo?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "Look it up.", "tool_calls": [CALL]},
    ]}
    assert record_features(record, "messages", canonical(record)) == {"typed parts", "reasoning", "tool calls"}


def test_a_tool_result_given_as_json_is_written_as_its_json_text():
    record = {"messages": [{"role": "user", "content": "Top cities?"}, {"role": "assistant", "tool_calls": [CALL]},
                           {"role": "tool", "content": [{"city": "Oslo"}, {"city": "Lima"}]},
                           {"role": "tool", "content": [{"type": "text", "text": "done"}]},
                           {"role": "assistant", "content": "Oslo and Lima."}]}
    assert [m["content"] for m in canonical(record)["messages"][2:4]] == ['[{"city": "Oslo"}, {"city": "Lima"}]',
                                                                         "done"]


def test_a_bare_list_of_messages_per_line_is_its_own_format():
    record = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert resolve_format([("f.jsonl:1", record)], "f.jsonl", "auto") == "message_list"
    assert canonical(record) == {"messages": record}


@pytest.mark.parametrize(
    ("content", "reasoning", "answer"),
    [
        ("<think>\nSum it.\n</think>\n\n4", "Sum it.", "4"),
        ("<think>Sum it.</think>4", "Sum it.", "4"),
        ("no reasoning", "", "no reasoning"),
    ],
)
def test_think_tags_in_content_split_as_qwen3_splits_them(content, reasoning, answer):
    assert split_think(content) == (reasoning, answer)


def test_reasoning_field_wins_over_think_tags_and_weights_become_train_flags():
    record = {"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "reasoning": "Greet back.", "weight": 0},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "<think>\nWave.\n</think>\n\nBye", "train": True},
    ]}
    assert canonical(record)["messages"][1:] == [
        {"role": "assistant", "content": "Hello", "reasoning_content": "Greet back.", "train": False},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye", "reasoning_content": "Wave.", "train": True},
    ]


@pytest.mark.parametrize(
    ("record", "reason", "message"),
    [
        ({"messages": [{"role": "user", "content": "Hi", "train": True}, {"role": "assistant", "content": "A"}]},
         "bad weight or train flag",
         "f.jsonl:1: messages[0]: a user message cannot be learned (only assistant messages are) (use "
         "data.train_on=everything to learn every token)"),
        ({"messages": [{"role": "user", "content": "Hi", "tool_calls": [CALL]}, {"role": "assistant", "content": "A"}]},
         "bad tool call", "f.jsonl:1: messages[0].tool_calls: only assistant messages make tool calls, this is user"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A"}], "tools": "[{"},
         "bad tools", "f.jsonl:1: tools: expected JSON, got invalid JSON (Expecting property name enclosed in double "
                      "quotes at column 3)"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A"}],
          "tools": [{"description": "no name"}]},
         "bad tools", "f.jsonl:1: tools[0]: expected a JSON schema with a name, got {'description': 'no name'}"),
        ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "function_call", "value": "[]"}]},
         "bad tool call", "f.jsonl:1: conversations[1].value: expected at least one tool call, got []"),
        ({"messages": [{"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": [{"type": "image_url", "image_url": "x"}]}]},
         "bad content part", "f.jsonl:1: messages[1].content[0]: expected a part with type text or reasoning or "
                             "tool_call, got {'type': 'image_url', 'image_url': 'x'}"),
    ],
)
def test_bad_tool_data_names_the_record_the_field_and_what_was_expected(record, reason, message):
    with pytest.raises(RecordError) as err:
        canonical(record)
    assert (err.value.reason, err.value.one_line()) == (reason, message)


# sample file: (detected format, features, messages of its first record's roles)
SAMPLES = {
    "sharegpt_tools.jsonl": ("sharegpt", {"tools", "tool calls"}, ["system", "user", "assistant", "tool",
                                                                   "assistant"]),
    "openai_tools.jsonl": ("messages", {"tools", "tool calls"}, ["user", "assistant", "tool", "assistant"]),
    "typed_parts.jsonl": ("messages", {"tools", "tool calls", "reasoning", "typed parts"},
                          ["user", "assistant", "tool", "assistant"]),
    "message_list.jsonl": ("message_list", set(), ["user", "assistant"]),
    "weights.jsonl": ("messages", {"per-message weights"}, ["user", "assistant", "user", "assistant"]),
    "reasoning.jsonl": ("messages", {"reasoning"}, ["user", "assistant", "user", "assistant"]),
}


@pytest.mark.parametrize("name", SAMPLES)
def test_each_shipped_sample_loads_with_format_auto_and_names_its_shape(name):
    fmt, features, roles = SAMPLES[name]
    records = read_source(str(SHAPES / name))
    assert resolve_format(records, name, "auto") == fmt
    found = set()
    for where, record in records:
        found |= record_features(record, fmt, to_canonical(record, fmt, where, ROLES))
    assert found >= features
    where, record = records[0]
    assert [m["role"] for m in to_canonical(record, fmt, where, ROLES)["messages"]] == roles
