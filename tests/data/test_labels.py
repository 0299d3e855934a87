"""Labels learn exactly each assistant answer plus its end-of-turn marker, for every template and tokenizer.

The expected learned texts are written by hand from the published formats: everything after the generation
prompt through the end-of-turn marker, i.e. the answer as the family renders it (trimmed or not) with the
whitespace the template puts around it. A learned run may decode with one leading space less: a Metaspace
decoder drops the leading space of what it decodes.
"""

import types

import pytest

from ftune.data.labels import tokenize_conversation, tokenize_text
from ftune.data.mask import IGNORE_INDEX
from ftune.data.templates import render, resolve_template
from ftune.errors import ConfigError, DataError

SYSTEM = {"role": "system", "content": "You are terse."}
TURNS = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": " What is 2+2? "},
    {"role": "assistant", "content": " 4\n"},
]


# name: the two learned runs under all_assistant
LEARNED = {
    "chatml": ["Hello!<|im_end|>", " 4\n<|im_end|>"],
    "qwen": ["Hello!<|im_end|>", " 4\n<|im_end|>"],
    "llama2": [" Hello! </s>", " 4 </s>"],
    "llama3": ["Hello!<|eot_id|>", "4<|eot_id|>"],
    "mistral": [" Hello!</s>", " 4</s>"],
    "mistral_v1": [" Hello!</s>", "  4\n</s>"],
    "gemma": ["Hello!<end_of_turn>", "4<end_of_turn>"],
    "phi3": ["Hello!<|end|>", " 4\n<|end|>"],
    "alpaca": ["Hello!</s>", " 4\n</s>"],
    "tokenizer": ["Hello!<|im_end|>", " 4\n<|im_end|>"],
}

CHATML_OWN = (  # Qwen2-7B-Instruct's template, as a tokenizer would ship it
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CASES = [
    *[(name, {}) for name in LEARNED if name != "tokenizer"],
    ("tokenizer", {}),
    ("llama2", {"metaspace": True}),
    ("mistral", {"metaspace": True}),
    ("mistral_v1", {"metaspace": True}),
    ("alpaca", {"metaspace": True}),
    ("llama2", {"trim_offsets": True}),
    ("llama3", {"trim_offsets": True}),
    ("chatml", {"trim_offsets": True}),
]


def _setup(name, options, make_tokenizer):
    """A tokenizer for the template's family, the resolved template, and the conversation to label."""
    if name == "tokenizer":
        tokenizer = make_tokenizer("chatml")
        tokenizer.chat_template = CHATML_OWN
    else:
        tokenizer = make_tokenizer(name, **options)
    # Mistral v0.3 renders no system prompt for a conversation ending in an answer, see below
    conversation = TURNS if name == "mistral" else [SYSTEM, *TURNS]
    return tokenizer, resolve_template(name, tokenizer), conversation


def _same_text(decoded, expected):
    return len(decoded) == len(expected) and all(
        text in (want, want.removeprefix(" ")) for text, want in zip(decoded, expected, strict=True)
    )


@pytest.mark.parametrize(("name", "options"), CASES)
def test_all_assistant_learns_each_answer_and_its_end_of_turn(name, options, make_tokenizer, learned_texts):
    tokenizer, template, conversation = _setup(name, options, make_tokenizer)
    [example] = tokenize_conversation(conversation, tokenizer, template, "all_assistant")
    text = render(template, conversation, tokenizer)
    assert example.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert _same_text(learned_texts(example, tokenizer), LEARNED[name])


@pytest.mark.parametrize(("name", "options"), CASES)
def test_last_assistant_learns_only_the_last_answer(name, options, make_tokenizer, learned_texts):
    tokenizer, template, conversation = _setup(name, options, make_tokenizer)
    [example] = tokenize_conversation(conversation, tokenizer, template, "last_assistant")
    assert _same_text(learned_texts(example, tokenizer), LEARNED[name][-1:])


@pytest.mark.parametrize(("name", "options"), CASES)
def test_everything_learns_every_token(name, options, make_tokenizer):
    tokenizer, template, conversation = _setup(name, options, make_tokenizer)
    [example] = tokenize_conversation(conversation, tokenizer, template, "everything")
    assert example.labels == example.input_ids
    text = render(template, conversation, tokenizer)
    assert example.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_literal_chatml_labels(make_word_tokenizer):
    # ids are positions in specials + words: <|im_start|>=0 <|im_end|>=1 <|endoftext|>=2 \n=3 assistant=4
    # user=5 Hi=6 Hello=7
    tokenizer = make_word_tokenizer(
        ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        ["\n", "assistant", "user", "Hi", "Hello"],
        eos="<|im_end|>",
    )
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    [example] = tokenize_conversation(conversation, tokenizer, resolve_template("chatml", tokenizer))
    # <|im_start|> user \n Hi <|im_end|> \n <|im_start|> assistant \n Hello <|im_end|> \n
    assert example.input_ids == [0, 5, 3, 6, 1, 3, 0, 4, 3, 7, 1, 3]
    assert example.labels == [-100, -100, -100, -100, -100, -100, -100, -100, -100, 7, 1, -100]


def test_literal_llama2_labels_learn_the_spaces_around_the_answer(make_word_tokenizer):
    # <s>=0 </s>=1 [INST]=2 [/INST]=3 " "=4 Hi=5 Hello=6
    tokenizer = make_word_tokenizer(
        ["<s>", "</s>", "[INST]", "[/INST]"], [" ", "Hi", "Hello"], bos="<s>", eos="</s>"
    )
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    [example] = tokenize_conversation(conversation, tokenizer, resolve_template("llama2", tokenizer))
    # <s> [INST] " " Hi " " [/INST] " " Hello " " </s>
    assert example.input_ids == [0, 2, 4, 5, 4, 3, 4, 6, 4, 1]
    assert example.labels == [-100, -100, -100, -100, -100, -100, 4, 6, 4, 1]


@pytest.mark.parametrize("answer", ["Hello", "\nHello"])
def test_a_space_ending_the_generation_prompt_is_not_learned(answer, make_tokenizer, learned_texts):
    # GPT-2-style offset trimming gives the lone space token "Ġ" after "assistant:" an empty range; it
    # belongs to the prompt, whether the answer starts with a word or a newline
    tokenizer = make_tokenizer("chatml", trim_offsets=True)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer}]
    [example] = tokenize_conversation(conversation, tokenizer, resolve_template("tokenizer", tokenizer))
    assert learned_texts(example, tokenizer) == [answer + "<|im_end|>"]


def test_qwen_tool_results_are_not_learned(make_tokenizer, learned_texts):
    tokenizer = make_tokenizer("chatml")
    conversation = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking."},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ]
    [example] = tokenize_conversation(conversation, tokenizer, resolve_template("qwen", tokenizer))
    assert _same_text(learned_texts(example, tokenizer), ["Checking.<|im_end|>", "Sunny.<|im_end|>"])


def test_a_conversation_without_an_answer_learns_nothing(make_tokenizer):
    tokenizer = make_tokenizer("chatml")
    [example] = tokenize_conversation([SYSTEM, TURNS[0]], tokenizer, resolve_template("chatml", tokenizer))
    assert example.input_ids and set(example.labels) == {IGNORE_INDEX}


@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
def test_mistral_system_prompt_cannot_be_trained_turn_by_turn(train_on, make_tokenizer):
    # Mistral v0.3 writes the system prompt into the last user turn of a prompt only, so no rendering of
    # the whole conversation contains the prompt the model sees at inference
    tokenizer = make_tokenizer("mistral")
    template = resolve_template("mistral", tokenizer)
    with pytest.raises(DataError, match="differently"):
        tokenize_conversation([SYSTEM, *TURNS], tokenizer, template, train_on)
    assert tokenize_conversation([SYSTEM, *TURNS], tokenizer, template, "everything")[0].labels


def test_an_opening_assistant_turn_is_refused(make_tokenizer):
    tokenizer = make_tokenizer("chatml")
    with pytest.raises(DataError, match=r"messages\[0\] is an assistant turn"):
        tokenize_conversation(TURNS[1:], tokenizer, resolve_template("chatml", tokenizer))


@pytest.mark.parametrize("decode_check", [True, False])
def test_a_token_straddling_header_and_answer_is_caught(decode_check, make_word_tokenizer):
    # this vocabulary merges the newline after "assistant" into the answer's first token: "\nHello"; the span
    # check finds the token crossing the answer's start even where the sampled decode check does not run
    tokenizer = make_word_tokenizer(
        ["<|im_start|>", "<|im_end|>"],
        ["\n", "\nHi", "\nHello", "assistant", "user"],
        pattern=r"\n?\w+|\s|[^\w\s]+",
    )
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    with pytest.raises(DataError, match="merges template text"):
        tokenize_conversation(conversation, tokenizer, resolve_template("chatml", tokenizer),
                              decode_check=decode_check)


def test_unknown_train_on_and_slow_tokenizers_are_config_errors(make_tokenizer):
    tokenizer = make_tokenizer("chatml")
    template = resolve_template("chatml", tokenizer)
    with pytest.raises(ConfigError, match="train_on"):
        tokenize_conversation(TURNS, tokenizer, template, "assistant_only")
    with pytest.raises(ConfigError, match="fast tokenizer"):
        tokenize_conversation(TURNS, types.SimpleNamespace(is_fast=False), template)


def test_text_ends_with_endoftext_where_the_tokenizer_has_it(make_word_tokenizer):
    # <|im_end|>=0 <|endoftext|>=1 " "=2 Hi=3 there=4; EOS is the end-of-turn marker, not the separator
    tokenizer = make_word_tokenizer(["<|im_end|>", "<|endoftext|>"], [" ", "Hi", "there"], eos="<|im_end|>")
    example = tokenize_text("Hi there", tokenizer)
    assert example.input_ids == [3, 2, 4, 1]
    assert example.labels == [3, 2, 4, 1]


def test_text_keeps_the_tokenizers_bos_and_ends_with_eos_once(make_word_tokenizer):
    # <s>=0 </s>=1 " "=2 Hi=3 there=4; this tokenizer wraps every text in <s> ... </s> itself
    tokenizer = make_word_tokenizer(
        ["<s>", "</s>"], [" ", "Hi", "there"], bos="<s>", eos="</s>", add_bos_eos=True
    )
    assert tokenize_text("Hi there", tokenizer).input_ids == [0, 3, 2, 4, 1]


def test_text_without_a_separator_token_is_a_config_error(make_word_tokenizer):
    tokenizer = make_word_tokenizer(["<s>"], ["Hi"], bos="<s>")
    with pytest.raises(ConfigError, match="document separator"):
        tokenize_text("Hi", tokenizer)


@pytest.mark.parametrize("configure", [
    lambda backend: backend.enable_truncation(max_length=4),
    lambda backend: backend.enable_padding(length=64),
])
def test_a_tokenizer_configured_to_truncate_or_pad_labels_as_a_plain_one(configure, make_tokenizer):
    """Labels encode through the `tokenizers` backend only where the tokenizer's own call would do the same."""
    plain, configured = make_tokenizer("chatml"), make_tokenizer("chatml")
    configure(configured.backend_tokenizer)
    template = resolve_template("chatml", plain)
    expected = tokenize_conversation([SYSTEM, *TURNS], plain, template)
    assert tokenize_conversation([SYSTEM, *TURNS], configured, template) == expected
