"""Every registry template renders exactly its family's published format; bad names and conversations fail.

The expected strings are written by hand from each family's official template (see the comments in
`ftune/data/templates.py`). The conversation pads the second user and assistant turns with whitespace so
that each family's trimming shows.
"""

import pytest

from ftune.data.templates import TEMPLATES, ChatTemplate, render, resolve_template
from ftune.errors import ConfigError, DataError

SYSTEM = {"role": "system", "content": "You are terse."}
TURNS = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": " What is 2+2? "},
    {"role": "assistant", "content": " 4\n"},
]
WITH_SYSTEM = [SYSTEM, *TURNS]
PROMPT = WITH_SYSTEM[:4]  # rendered with add_generation_prompt=True


QWEN_DEFAULT_SYSTEM = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
)
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)

# name: (conversation with the system turn, without it, PROMPT with the generation prompt)
EXPECTED = {
    "chatml": (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n What is 2+2? <|im_end|>\n<|im_start|>assistant\n 4\n<|im_end|>\n",
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n What is 2+2? <|im_end|>\n<|im_start|>assistant\n 4\n<|im_end|>\n",
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n What is 2+2? <|im_end|>\n<|im_start|>assistant\n",
    ),
    "qwen": (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n What is 2+2? <|im_end|>\n<|im_start|>assistant\n 4\n<|im_end|>\n",
        QWEN_DEFAULT_SYSTEM
        + "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n What is 2+2? <|im_end|>\n<|im_start|>assistant\n 4\n<|im_end|>\n",
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n What is 2+2? <|im_end|>\n<|im_start|>assistant\n",
    ),
    "llama2": (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello! </s>"
        "<s>[INST] What is 2+2? [/INST] 4 </s>",
        "<s>[INST] Hi there [/INST] Hello! </s><s>[INST] What is 2+2? [/INST] 4 </s>",
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello! </s>"
        "<s>[INST] What is 2+2? [/INST]",
    ),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    # Mistral v0.3 writes the system prompt only into a final user turn: a conversation that ends with an
    # answer renders without it, a generation prompt with it.
    "mistral": (
        "<s>[INST] Hi there[/INST] Hello!</s>[INST]  What is 2+2? [/INST] 4</s>",
        "<s>[INST] Hi there[/INST] Hello!</s>[INST]  What is 2+2? [/INST] 4</s>",
        "<s>[INST] Hi there[/INST] Hello!</s>[INST] You are terse.\n\n What is 2+2? [/INST]",
    ),
    "mistral_v1": (
        "<s> [INST] You are terse.\n\nHi there [/INST] Hello!</s> [INST]  What is 2+2?  [/INST]  4\n</s>",
        "<s> [INST] Hi there [/INST] Hello!</s> [INST]  What is 2+2?  [/INST]  4\n</s>",
        "<s> [INST] You are terse.\n\nHi there [/INST] Hello!</s> [INST]  What is 2+2?  [/INST]",
    ),
    "gemma": (
        "<bos><start_of_turn>user\nYou are terse.\n\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
        "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
        "<bos><start_of_turn>user\nYou are terse.\n\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    ),
    "phi3": (
        "<|system|>\nYou are terse.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\nHello!<|end|>\n"
        "<|user|>\n What is 2+2? <|end|>\n<|assistant|>\n 4\n<|end|>\n<|endoftext|>",
        "<|user|>\nHi there<|end|>\n<|assistant|>\nHello!<|end|>\n"
        "<|user|>\n What is 2+2? <|end|>\n<|assistant|>\n 4\n<|end|>\n<|endoftext|>",
        "<|system|>\nYou are terse.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\nHello!<|end|>\n"
        "<|user|>\n What is 2+2? <|end|>\n<|assistant|>\n",
    ),
    "alpaca": (
        "<s>You are terse.\n\n### Instruction:\nHi there\n\n### Response:\nHello!</s>"
        "\n\n### Instruction:\n What is 2+2? \n\n### Response:\n 4\n</s>",
        "<s>" + ALPACA_PREAMBLE + "\n\n### Instruction:\nHi there\n\n### Response:\nHello!</s>"
        "\n\n### Instruction:\n What is 2+2? \n\n### Response:\n 4\n</s>",
        "<s>You are terse.\n\n### Instruction:\nHi there\n\n### Response:\nHello!</s>"
        "\n\n### Instruction:\n What is 2+2? \n\n### Response:\n",
    ),
}

EXPECTED["qwen_tools"] = EXPECTED["qwen"]  # Qwen2.5's official template renders the same without tools
EXPECTED["mistral_tools"] = EXPECTED["mistral"]  # Mistral v0.3's official template renders the same without tools
QWEN3_TURNS = (
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    "<|im_start|>user\n What is 2+2? <|im_end|>\n<|im_start|>assistant\n"
)
EXPECTED["qwen3"] = (  # the final turn always gets a <think> block, earlier ones none; no default system prompt
    "<|im_start|>system\nYou are terse.<|im_end|>\n" + QWEN3_TURNS + "<think>\n\n</think>\n\n 4\n<|im_end|>\n",
    QWEN3_TURNS + "<think>\n\n</think>\n\n 4\n<|im_end|>\n",
    "<|im_start|>system\nYou are terse.<|im_end|>\n" + QWEN3_TURNS,
)
LLAMA31_SYSTEM = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "Today Date: 26 Jul 2024\n\n"
)
LLAMA31_TURNS = (
    "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
EXPECTED["llama3.1"] = (  # a system turn always, with the knowledge and fixed "today" dates; contents trimmed
    LLAMA31_SYSTEM + "You are terse.<|eot_id|>" + LLAMA31_TURNS + "4<|eot_id|>",
    LLAMA31_SYSTEM + "<|eot_id|>" + LLAMA31_TURNS + "4<|eot_id|>",
    LLAMA31_SYSTEM + "You are terse.<|eot_id|>" + LLAMA31_TURNS,
)

CHATML_OWN = (  # Qwen2-7B-Instruct's template, as a tokenizer would ship it
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_the_registry_has_every_family():
    assert set(TEMPLATES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_template_renders_the_published_format(name, make_tokenizer):
    tokenizer = make_tokenizer(name)
    template = resolve_template(name, tokenizer)
    with_system, without_system, prompt = EXPECTED[name]
    assert render(template, WITH_SYSTEM, tokenizer) == with_system
    assert render(template, TURNS, tokenizer) == without_system
    assert render(template, PROMPT, tokenizer, add_generation_prompt=True) == prompt


def test_alpaca_single_turn_is_stanfords_prompt_plus_eos(make_tokenizer):
    tokenizer = make_tokenizer("llama2")
    conversation = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    expected = "<s>" + ALPACA_PREAMBLE + "\n\n### Instruction:\nName a colour.\n\n### Response:\nBlue.</s>"
    assert render(resolve_template("alpaca", tokenizer), conversation, tokenizer) == expected


def test_alpaca_writes_bos_only_where_the_tokenizer_has_one(make_tokenizer):
    tokenizer = make_tokenizer("chatml")  # Qwen-style: no BOS, EOS "<|im_end|>"
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    expected = ALPACA_PREAMBLE + "\n\n### Instruction:\nHi\n\n### Response:\nYo<|im_end|>"
    assert render(resolve_template("alpaca", tokenizer), conversation, tokenizer) == expected


def test_phi3_leaves_out_an_empty_system_turn_as_phi_3_5_does(make_tokenizer):
    tokenizer = make_tokenizer("phi3")
    conversation = [{"role": "system", "content": ""}, *TURNS[:2]]
    expected = "<|user|>\nHi there<|end|>\n<|assistant|>\nHello!<|end|>\n<|endoftext|>"
    assert render(resolve_template("phi3", tokenizer), conversation, tokenizer) == expected


def test_qwen_groups_tool_results_into_one_user_turn(make_tokenizer):
    tokenizer = make_tokenizer("chatml")
    conversation = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking."},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "rain"},
        {"role": "assistant", "content": "Mixed."},
    ]
    expected = (
        QWEN_DEFAULT_SYSTEM
        + "<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\nChecking.<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\nMixed.<|im_end|>\n"
    )
    assert render(resolve_template("qwen", tokenizer), conversation, tokenizer) == expected


def test_eos_families_end_turns_with_the_tokenizers_eos(make_tokenizer):
    for name in ("llama2", "mistral", "mistral_v1", "alpaca"):
        assert resolve_template(name, make_tokenizer(name)).end_of_turn == "</s>"
    assert resolve_template("llama3", make_tokenizer("llama3")).end_of_turn == "<|eot_id|>"


def test_tokenizer_template_renders_as_is_and_infers_its_end_of_turn(make_tokenizer):
    tokenizer = make_tokenizer("chatml")
    tokenizer.chat_template = CHATML_OWN
    template = resolve_template("tokenizer", tokenizer)
    assert template == ChatTemplate("tokenizer", CHATML_OWN, "<|im_end|>")
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n What is 2+2? <|im_end|>\n<|im_start|>assistant\n 4\n<|im_end|>\n"
    )
    assert render(template, TURNS, tokenizer) == expected


def test_tokenizer_template_end_of_turn_may_follow_whitespace(make_tokenizer):
    tokenizer = make_tokenizer("llama2")
    tokenizer.chat_template = TEMPLATES["llama2"].jinja  # renders "answer </s>"
    assert resolve_template("tokenizer", tokenizer).end_of_turn == "</s>"


def test_unknown_template_name_lists_the_known_ones(make_tokenizer):
    with pytest.raises(ConfigError, match="unknown chat template 'vicuna'") as error:
        resolve_template("vicuna", make_tokenizer("chatml"))
    assert all(name in error.value.hint for name in [*TEMPLATES, "tokenizer"])


def test_tokenizer_without_a_template_is_told_to_pick_one(make_tokenizer):
    with pytest.raises(ConfigError, match="has no chat template") as error:
        resolve_template("tokenizer", make_tokenizer("chatml"))
    assert "data.chat_template=" in error.value.hint and "chatml" in error.value.hint


def test_tokenizer_template_without_an_end_of_turn_token_is_refused(make_tokenizer):
    tokenizer = make_tokenizer("chatml")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    )
    with pytest.raises(ConfigError, match="end-of-turn marker"):
        resolve_template("tokenizer", tokenizer)


def test_tokenizer_template_that_is_not_jinja_is_a_config_error(make_tokenizer):
    tokenizer = make_tokenizer("chatml")
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}"
    with pytest.raises(ConfigError, match="not valid Jinja"):
        resolve_template("tokenizer", tokenizer)


def test_template_needing_a_bos_the_tokenizer_lacks_is_refused(make_tokenizer):
    with pytest.raises(ConfigError, match="writes bos_token"):
        resolve_template("llama3", make_tokenizer("chatml"))


FORBIDDEN = [
    ("llama2", ["user", "user"]),
    ("llama2", ["user", "assistant", "tool"]),
    ("llama2", ["system", "user", "assistant", "system"]),
    ("llama3", ["user", "assistant", "tool"]),
    ("mistral", ["user", "assistant", "assistant"]),
    ("mistral", ["user", "assistant", "tool"]),
    ("mistral_v1", ["user", "tool"]),
    ("mistral_v1", ["system", "system", "user"]),
    ("gemma", ["user", "assistant", "tool"]),
    ("gemma", ["system", "user", "assistant", "system"]),
    ("phi3", ["user", "assistant", "tool"]),
    ("alpaca", ["user", "user"]),
    ("alpaca", ["user", "tool"]),
]


@pytest.mark.parametrize(("name", "roles"), FORBIDDEN)
def test_conversations_a_family_cannot_express_raise_data_error(name, roles, make_tokenizer):
    tokenizer = make_tokenizer(name)
    conversation = [{"role": role, "content": f"turn {i}"} for i, role in enumerate(roles)]
    with pytest.raises(DataError, match=f"chat template '{name}' cannot render"):
        render(resolve_template(name, tokenizer), conversation, tokenizer)


@pytest.mark.parametrize(
    "message", [{"role": "narrator", "content": "x"}, {"role": "user", "content": None}, {"content": "x"}]
)
def test_malformed_messages_raise_data_error(message, make_tokenizer):
    tokenizer = make_tokenizer("chatml")
    with pytest.raises(DataError, match=r"messages\[0\]"):
        render(resolve_template("chatml", tokenizer), [message], tokenizer)


TOOL_CALL = [
    {"role": "user", "content": "Is it raining in Oslo?"},
    {"role": "assistant", "content": "", "reasoning_content": "Look it up.", "tool_calls": [
        {"type": "function", "id": "call00001", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
    {"role": "tool", "content": '{"rain": true}', "tool_call_id": "call00001"},
    {"role": "assistant", "content": "Yes.", "reasoning_content": "It rains.", "train": False},
]
WEATHER_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                   "parameters": {"type": "object"}}}]
RENDERABLE = [(name, WITH_SYSTEM, None) for name in sorted(EXPECTED)] + [
    (name, TOOL_CALL, WEATHER_TOOLS) for name in ("qwen3", "qwen_tools", "llama3.1")]


@pytest.mark.parametrize(("name", "messages", "tools"), RENDERABLE)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_is_what_apply_chat_template_renders(name, messages, tools, add_generation_prompt, make_tokenizer):
    """`render` calls transformers' compiled template itself (for speed): it must stay byte-identical."""
    tokenizer = make_tokenizer(name)
    template = resolve_template(name, tokenizer)
    messages = messages if not add_generation_prompt else messages[:-1]
    expected = tokenizer.apply_chat_template(
        [{key: value for key, value in message.items() if key != "train"} for message in messages], tools=tools,
        chat_template=template.jinja, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert render(template, messages, tokenizer, add_generation_prompt, tools) == expected
