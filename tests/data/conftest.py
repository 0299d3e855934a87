"""Small tokenizers that know each chat family's special tokens, built in memory: nothing comes from the hub.

`make_tokenizer(family)` trains a byte-level BPE (as Llama 3, Qwen and GPT-2 use) on a few hundred sentences;
`metaspace=True` gives a sentencepiece-style "▁" variant (as Llama 2 and Mistral use) and `trim_offsets=True`
GPT-2's offset trimming. `make_word_tokenizer` builds a word-level tokenizer from a literal vocabulary, so a
test can write the expected ids by hand.
"""

import functools
import string

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from ftune.data.mask import IGNORE_INDEX

# family: (special tokens, bos, eos), as the family's real tokenizer sets them
FAMILIES = {
    "chatml": (["<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|im_end|>"),
    "llama2": (["<s>", "</s>", "<unk>"], "<s>", "</s>"),
    "llama3": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
    ),
    "mistral": (["<s>", "</s>", "<unk>", "[INST]", "[/INST]"], "<s>", "</s>"),
    "gemma": (["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>"),
    "phi3": (
        ["<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        "<s>",
        "<|endoftext|>",
    ),
    "qwen3": (
        ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
         "<tool_response>", "</tool_response>"],
        None,
        "<|im_end|>",
    ),
    "llama3.1": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
         "<|eom_id|>", "<|python_tag|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
    ),
    "mistral_tools": (
        ["<s>", "</s>", "<unk>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
         "[TOOL_RESULTS]", "[/TOOL_RESULTS]"],
        "<s>",
        "</s>",
    ),
}

_WORDS = (
    "hi hello there you are terse what is the answer a short reply thanks sure below an instruction that "
    "describes task write response appropriately completes request user assistant system model tool result "
    "weather sunny rain name colour blue red probe question one two three four city oslo paris look it up "
    "checking function arguments parameters description type object string properties required"
).split()


def _corpus() -> list[str]:
    """Sentences mixing the words the tests use, so that BPE learns whole-word tokens for many of them."""
    sentences = [" ".join(_WORDS[(i * step + i) % len(_WORDS)] for step in range(1, 9)) for i in range(300)]
    phrases = ["Hello! What is 2+2? 4.", "You are terse.", "### Instruction:\n", "### Response:\n"]
    return sentences + [s.capitalize() + "." for s in sentences[:100]] + phrases * 20 + [string.printable]


@functools.cache
def _trained(family: str, metaspace: bool) -> str:
    """The trained tokenizer as JSON, so that every caller wraps a fresh, unshared copy."""
    specials, _, _ = FAMILIES[family]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>" if metaspace else None))
    if metaspace:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
        alphabet = []
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=800, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    return tokenizer.to_str()


@pytest.fixture(scope="session")
def make_tokenizer():
    """A factory of fresh fast tokenizers: `make(family_or_template, metaspace=False, trim_offsets=False)`.

    A template name gives the tokenizer family that template is tested with (`FAMILY`).
    """

    def make(family: str, metaspace: bool = False, trim_offsets: bool = False) -> PreTrainedTokenizerFast:
        family = FAMILY.get(family, family)
        _, bos, eos = FAMILIES[family]
        tokenizer = Tokenizer.from_str(_trained(family, metaspace))
        if trim_offsets:
            tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos)

    return make


@pytest.fixture(scope="session")
def make_word_tokenizer():
    """Factory of word-level tokenizers whose ids are the positions in `specials + words`.

    `pattern` splits the text into pieces (by default each word, each single whitespace character, each
    punctuation run); `add_bos_eos` adds a post-processor that wraps every text in BOS ... EOS.
    """

    def make(
        specials: list[str],
        words: list[str],
        bos: str | None = None,
        eos: str | None = None,
        pattern: str = r"\w+|\s|[^\w\s]+",
        add_bos_eos: bool = False,
    ) -> PreTrainedTokenizerFast:
        vocab = {token: index for index, token in enumerate([*specials, *words, "<unk>"])}
        tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
        tokenizer.decoder = decoders.Fuse()
        if add_bos_eos:
            tokenizer.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
            )
        return PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, additional_special_tokens=specials
        )

    return make


FAMILY = {
    "chatml": "chatml",
    "qwen": "chatml",
    "llama2": "llama2",
    "llama3": "llama3",
    "mistral": "mistral",
    "mistral_v1": "llama2",
    "gemma": "gemma",
    "phi3": "phi3",
    "alpaca": "llama2",
    "qwen3": "qwen3",
    "qwen_tools": "qwen3",
    "llama3.1": "llama3.1",
    "mistral_tools": "mistral_tools",
}
"""The test tokenizer family each template is rendered with (alpaca and mistral_v1 on Llama 2's vocabulary,
where "[INST]" is plain text as in Mistral's v1 tokenizer)."""


def decode_learned(example, tokenizer) -> list[str]:
    """The decoded runs of consecutive learned tokens, each learned label checked to be its own input id."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label == IGNORE_INDEX:
            runs, current = (runs + [current] if current else runs), []
        else:
            assert label == token
            current.append(token)
    runs += [current] if current else []
    return [tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False) for run in runs]


@pytest.fixture(scope="session")
def learned_texts():
    """`decode_learned`: what an example teaches, as text (tests compare it with what the template renders)."""
    return decode_learned
