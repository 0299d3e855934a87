"""Labels for agent and reasoning data: tool calls and end-of-turn markers learned, tool results never.

Tool schemas, system and user turns are never learned either; per-message flags drop a turn from the loss; what a
template cannot express is refused.

The shipped samples (ftune/assets/data/shapes) are labelled on several templates and checked token by token:
every learned token carries its own id and decodes, run by run, to exactly the text written here by hand from
the official formats, and every other token is -100.
"""

import json

import pytest

from ftune.config.schema import DataCfg
from ftune.data.formats import read_source, resolve_format, to_canonical
from ftune.data.labels import tokenize_conversation
from ftune.data.mask import IGNORE_INDEX
from ftune.data.templates import TEMPLATES_DIR, resolve_template
from ftune.errors import DataError

SHAPES = TEMPLATES_DIR.parent / "data" / "shapes"
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
TOOL_TURNS = [
    {"role": "user", "content": "Rain in Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": '{"rain": true}'},
    {"role": "assistant", "content": "It rains."},
]


def sample(name: str, index: int = 0) -> dict:
    """The canonical form of record `index` of a shipped sample file."""
    records = read_source(str(SHAPES / name))
    fmt = resolve_format(records, name, "auto")
    where, record = records[index]
    return to_canonical(record, fmt, where, DataCfg().roles)


@pytest.fixture
def label(make_tokenizer, learned_texts):
    """A function: (record, template name, **options) -> (learned texts per example, examples, tokenizer)."""

    def tokenize(record: dict, name: str, **options):
        tokenizer = make_tokenizer(name)
        template = resolve_template(name, tokenizer)
        examples = tokenize_conversation(record["messages"], tokenizer, template, tools=record.get("tools"),
                                         **options)
        return [learned_texts(example, tokenizer) for example in examples], examples, tokenizer

    return tokenize


SHAREGPT_CALL = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
# template: the learned runs of sharegpt_tools.jsonl's first record (a tool call, its result, the answer)
SHAREGPT_LEARNED = {
    "qwen_tools": [[f"<tool_call>\n{SHAREGPT_CALL}\n</tool_call><|im_end|>",
                    "Yes, it is raining in Oslo, at 7 degrees.<|im_end|>"]],
    # Qwen3 writes an empty <think> block only into a final turn, so the tool call is learned where it is final
    "qwen3": [["<think>\n\n</think>\n\nYes, it is raining in Oslo, at 7 degrees.<|im_end|>"],
              [f"<think>\n\n</think>\n\n<tool_call>\n{SHAREGPT_CALL}\n</tool_call><|im_end|>"]],
    "llama3.1": [['{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eot_id|>',
                  "Yes, it is raining in Oslo, at 7 degrees.<|eot_id|>"]],
}


@pytest.mark.parametrize("name", SHAREGPT_LEARNED)
def test_tool_calls_and_end_of_turn_are_learned_and_results_and_schemas_are_not(name, label):
    learned, examples, tokenizer = label(sample("sharegpt_tools.jsonl"), name)
    assert learned == SHAREGPT_LEARNED[name]
    text = tokenizer.decode(examples[0].input_ids, skip_special_tokens=False)
    assert "celsius" in text and "Current weather in a city" in text  # result and schema read, not learned
    assert not any("celsius" in run or "Current weather" in run for runs in learned for run in runs)


def test_openai_weights_leave_a_weight_0_turn_out_of_the_loss_on_two_templates(label):
    record = sample("openai_tools.jsonl", 1)
    call = '{"name": "get_weather", "arguments": {"city": "Lima"}}'
    assert label(record, "qwen_tools")[0] == [[
        f"<tool_call>\n{call}\n</tool_call><|im_end|>", "Lima is dry today, at 18 degrees.<|im_end|>"]]
    learned = label(record, "mistral_tools")[0]
    assert learned == [[
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Lima"}, "id": "call00002"}]</s>',
        " Lima is dry today, at 18 degrees.</s>"]]


@pytest.mark.parametrize(("train_on", "expected"), [("all_assistant", [["Chat.<|im_end|>"], ["owt<|im_end|>"]]),
                                                    ("last_assistant", [["Chat.<|im_end|>"], []])])
def test_weight_and_train_flags_combine_with_train_on(train_on, expected, label):
    learned = [label(sample("weights.jsonl", index), "qwen_tools", train_on=train_on)[0][0]
               for index in (0, 1)]
    assert learned == expected


def test_literal_qwen_tool_call_labels(make_word_tokenizer):
    # ids are positions in specials + words: <|im_start|>=0 <|im_end|>=1 <tool_call>=2 </tool_call>=3
    # <tool_response>=4 </tool_response>=5 \n=6 user=7 assistant=8 Rain=9 ?=10 {"=11 name=12 ":=13 " "=14
    # "=15 w=16 ",=17 arguments=18 {}}=19 yes=20 It=21 rains=22 .=23 system=24 Go=25
    tokenizer = make_word_tokenizer(
        ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"],
        ["\n", "user", "assistant", "Rain", "?", '{"', "name", '":', " ", '"', "w", '",', "arguments", "{}}", "yes",
         "It", "rains", ".", "system", "Go"],
        eos="<|im_end|>",
    )
    messages = [
        {"role": "system", "content": "Go"},
        {"role": "user", "content": "Rain?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                             "function": {"name": "w", "arguments": {}}}]},
        {"role": "tool", "content": "yes"},
        {"role": "assistant", "content": "It rains."},
    ]
    [example] = tokenize_conversation(messages, tokenizer, resolve_template("qwen_tools", tokenizer))
    tokens = tokenizer.convert_ids_to_tokens(example.input_ids)
    learned = [label != IGNORE_INDEX for label in example.labels]
    assert list(zip(tokens, learned, strict=True)) == [
        ("<|im_start|>", False), ("system", False), ("\n", False), ("Go", False), ("<|im_end|>", False),
        ("\n", False),
        ("<|im_start|>", False), ("user", False), ("\n", False), ("Rain", False), ("?", False), ("<|im_end|>", False),
        ("\n", False),
        ("<|im_start|>", False), ("assistant", False),
        ("\n", False),  # Qwen2.5 writes "\n<tool_call>" after the role: the newline is part of the generation prompt
        ("<tool_call>", True), ("\n", True), ('{"', True), ("name", True), ('":', True), (" ", True), ('"', True),
        ("w", True), ('",', True), (" ", True), ('"', True), ("arguments", True), ('":', True), (" ", True),
        ("{}}", True), ("\n", True), ("</tool_call>", True), ("<|im_end|>", True),
        ("\n", False),
        ("<|im_start|>", False), ("user", False), ("\n", False), ("<tool_response>", False), ("\n", False),
        ("yes", False), ("\n", False), ("</tool_response>", False), ("<|im_end|>", False), ("\n", False),
        ("<|im_start|>", False), ("assistant", False), ("\n", False),
        ("It", True), (" ", True), ("rains", True), (".", True), ("<|im_end|>", True),
        ("\n", False),
    ]


def test_typed_parts_with_reasoning_learn_the_think_blocks_on_qwen3(label):
    learned = label(sample("typed_parts.jsonl"), "qwen3")[0]
    call = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    assert learned == [[f"<think>\nI need the current temperature.\n</think>\n\n<tool_call>\n{call}\n</tool_call>"
                        "<|im_end|>", "<think>\n-3 degrees is cold.\n</think>\n\nYes, it is -3 degrees in Oslo."
                        "<|im_end|>"]]


@pytest.mark.parametrize(
    ("name", "messages", "tools", "message"),
    [
        ("qwen", TOOL_TURNS[:1] + [{"role": "assistant", "content": "Hi"}], TOOLS,
         "chat template 'qwen' does not write the tool schemas (tools)"),
        ("chatml", TOOL_TURNS, None, "chat template 'chatml' does not write the tool calls of messages[1]"),
        ("qwen_tools", [TOOL_TURNS[0], {"role": "assistant", "content": "Hi", "reasoning_content": "Think."}], None,
         "chat template 'qwen_tools' does not write the reasoning of messages[1] (assistant)"),
        ("llama3.1", [TOOL_TURNS[0], {"role": "assistant", "content": "Let me look.", "tool_calls": [CALL]}], TOOLS,
         "chat template 'llama3.1' drops the content of messages[1] (assistant), which also calls tools"),
    ],
)
def test_what_a_template_cannot_express_is_refused_with_the_reason(name, messages, tools, message, make_tokenizer):
    tokenizer = make_tokenizer(name)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        tokenize_conversation(messages, tokenizer, resolve_template(name, tokenizer), tools=tools)


def test_mistral_moves_its_tool_list_to_the_last_user_turn_so_the_first_turn_is_its_own_example(label):
    messages = [*TOOL_TURNS[:1], {"role": "assistant", "content": "Checking."},
                {"role": "user", "content": "Thanks."}, {"role": "assistant", "content": "Welcome."}]
    learned, examples, tokenizer = label({"messages": messages, "tools": TOOLS}, "mistral_tools")
    assert learned == [[" Welcome.</s>"], [" Checking.</s>"]]
    first = tokenizer.decode(examples[1].input_ids, skip_special_tokens=False)
    assert first.startswith("<s>[AVAILABLE_TOOLS] [") and first.endswith("[/INST] Checking.</s>")
    assert json.loads(first[first.index("[{"): first.index("[/AVAILABLE_TOOLS]")])[0]["function"]["name"] == \
        "get_weather"


# (sample, record, template, train_on_reasoning) -> the learned runs of each example, token by token
SAMPLE_MASKS = {
    ("message_list.jsonl", 1, "qwen_tools", True): [["Cold.<|im_end|>"]],
    ("message_list.jsonl", 1, "llama3.1", True): [["Cold.<|eot_id|>"]],
    ("message_list.jsonl", 1, "mistral_tools", True): None,  # Mistral drops a system prompt before an answer
    ("weights.jsonl", 0, "llama3.1", True): [["Chat.<|eot_id|>"]],
    ("weights.jsonl", 1, "mistral_tools", True): [[" owt</s>"]],
    ("typed_parts.jsonl", 1, "qwen_tools", True): [["Blueberries.<|im_end|>"]],
    ("typed_parts.jsonl", 1, "llama3.1", True): [["Blueberries.<|eot_id|>"]],
    ("typed_parts.jsonl", 0, "qwen_tools", True): None,  # Qwen2.5 prints no reasoning: refused, not dropped
    ("reasoning.jsonl", 0, "qwen3", True): [["<think>\n42 * 2 = 84.\n</think>\n\n84.<|im_end|>"],
                                            ["<think>\n12 + 30 = 42.\n</think>\n\n42.<|im_end|>"]],
    ("reasoning.jsonl", 0, "qwen3", False): [["84.<|im_end|>"], ["42.<|im_end|>"]],
    ("reasoning.jsonl", 1, "llama3.1", True): None,  # Llama 3.1 prints no reasoning
}


@pytest.mark.parametrize("case", SAMPLE_MASKS, ids=lambda case: "-".join(map(str, case)))
def test_each_sample_shape_is_masked_exactly_on_several_templates(case, label):
    name, index, template, reasoning = case
    if SAMPLE_MASKS[case] is None:
        with pytest.raises(DataError):
            label(sample(name, index), template, train_on_reasoning=reasoning)
        return
    learned, examples, _ = label(sample(name, index), template, train_on_reasoning=reasoning)
    assert learned == SAMPLE_MASKS[case]
    assert all(len(example.input_ids) == len(example.labels) for example in examples)
