"""The template travels with the artefact: a tokenizer saved with `template_for_artefact` renders what training did.

The embedded model's tokenizer stands in for a base without a chat template (its own is removed); the run
trains with a named template; the saved directory is reloaded with `AutoTokenizer.from_pretrained` alone, as
inference servers and transformers users do, and its `generation_config.json` must stop at the end of a turn.
"""

import json

import pytest
from transformers import AutoTokenizer, GenerationConfig

from ftune.config.schema import DataCfg
from ftune.data.labels import tokenize_conversation
from ftune.data.templates import render, resolve_template, template_for_artefact
from ftune.errors import ConfigError

CONVERSATION = [
    {"role": "system", "content": "You check the weather."},
    {"role": "user", "content": "Rain in Oslo?"},
    {"role": "assistant", "content": "", "reasoning_content": "Look it up.",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
    {"role": "tool", "content": '{"rain": true}'},
    {"role": "assistant", "content": "Yes, it rains."},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.fixture
def base(tiny_model_path):
    """The embedded tokenizer without its chat template: a base model's tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    tokenizer.chat_template = None
    return tokenizer


@pytest.mark.parametrize("name", ["qwen3", "chatml"])
def test_a_saved_artefact_renders_exactly_what_training_rendered(name, base, tmp_path):
    template = resolve_template(name, base)
    messages = CONVERSATION if name == "qwen3" else [m for m in CONVERSATION if "tool_calls" not in m][:2] + [
        {"role": "assistant", "content": "Yes, it rains."}]
    tools = TOOLS if name == "qwen3" else None
    trained = tokenize_conversation(messages, base, template, tools=tools)[0]  # the whole conversation's example
    jinja, eos_ids = template_for_artefact(base, DataCfg(chat_template=name))
    base.chat_template = jinja
    base.save_pretrained(tmp_path)
    GenerationConfig(eos_token_id=eos_ids).save_pretrained(tmp_path)

    artefact = AutoTokenizer.from_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text(encoding="utf-8") == jinja
    assert artefact.apply_chat_template(messages, tools=tools, tokenize=False) == trained.text
    assert artefact(trained.text, add_special_tokens=False)["input_ids"] == trained.input_ids
    prompt = render(template, messages[:-1], base, add_generation_prompt=True, tools=tools)
    asked = artefact.apply_chat_template(messages[:-1], tools=tools, add_generation_prompt=True, tokenize=False)
    assert asked == prompt
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [base.convert_tokens_to_ids("<|im_end|>")] == eos_ids


def test_the_tokenizers_own_template_travels_as_it_is(tiny_model_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    jinja, eos_ids = template_for_artefact(tokenizer, DataCfg(chat_template="tokenizer"))
    assert jinja == tokenizer.get_chat_template()
    assert eos_ids == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_an_end_of_turn_that_is_no_single_token_is_refused(make_word_tokenizer):
    tokenizer = make_word_tokenizer(["<s>", "</s>"], ["Hi"], bos="<s>", eos="</s>")
    with pytest.raises(ConfigError, match="ends turns with '<\\|eot_id\\|>', which is no single token"):
        template_for_artefact(tokenizer, DataCfg(chat_template="llama3.1"))


def test_the_end_of_turn_comes_first_and_a_different_eos_follows(make_tokenizer):
    tokenizer = make_tokenizer("llama3.1")
    tokenizer.eos_token = "<|end_of_text|>"
    _, eos_ids = template_for_artefact(tokenizer, DataCfg(chat_template="llama3.1"))
    assert eos_ids == tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
