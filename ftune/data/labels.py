"""Token ids and labels for one example: what the model reads, and which of those tokens it learns.

What is learned is found in the rendered TEXT, never from guessed token offsets, because BPE merges across
the boundary between template scaffolding and content would shift them: each learned assistant turn is a
character span (what the model writes after its generation prompt, through its end-of-turn marker), and a
token is learned iff its character range meets such a span. The result is checked by decoding, so a
tokenizer that merges scaffolding into an answer fails loudly instead of training on the wrong tokens.
"""

from dataclasses import dataclass

from ftune.data.mask import IGNORE_INDEX
from ftune.data.templates import ChatTemplate, render
from ftune.errors import ConfigError, DataError

TRAIN_ON = ("all_assistant", "last_assistant", "everything")
"""What `data.train_on` may say: every assistant turn, the last one only, or every token."""

DOCUMENT_SEPARATOR = "<|endoftext|>"
"""Ends each pre-training document where the tokenizer has this token (GPT-2, Qwen, Phi), else EOS does."""


@dataclass
class TokenizedExample:
    """One training example.

    Attributes:
        input_ids: the token ids the model reads.
        labels: the same ids where the model learns them, `IGNORE_INDEX` (-100) where it does not.
    """

    input_ids: list[int]
    labels: list[int]


def tokenize_conversation(
    messages: list[dict], tokenizer, template: ChatTemplate, train_on: str = "all_assistant"
) -> TokenizedExample:
    r"""Render a conversation with its chat template, tokenize it, and label the tokens the model learns.

    A learned assistant turn is what the model writes after its generation prompt: the answer as the template
    renders it (trimmed by some families) through its end-of-turn marker, with the whitespace the template
    puts around the answer (Llama 2's " answer </s>"), since the model has to emit that to reach the marker.
    Role headers, "[/INST]", newlines after the marker, system, user and tool turns are never learned. The
    text is tokenized once, without adding special tokens: the templates already write BOS where the family
    wants it.

    Example (ChatML, a word-level vocabulary for readability), user "Hi" then assistant "Hello":

        text:   <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n
        tokens: <|im_start|> user \n Hi <|im_end|> \n <|im_start|> assistant \n Hello <|im_end|> \n
        ids:    [0,    5,    3,    6,    1,    3,    0,    4,    3,    7, 1, 3]
        labels: [-100, -100, -100, -100, -100, -100, -100, -100, -100, 7, 1, -100]

    Args:
        messages: `{"role", "content"}` dicts.
        tokenizer: a fast tokenizer (offsets are needed to map characters to tokens).
        template: from `resolve_template(name, tokenizer)`.
        train_on: "all_assistant", "last_assistant" or "everything" (every token, scaffolding included).

    Returns:
        The ids and labels; all labels are -100 when there is no assistant turn to learn.

    Raises:
        ConfigError: unknown `train_on`, or a slow tokenizer.
        DataError: the template cannot render the conversation, or renders an assistant turn differently
            once later turns follow (Mistral v0.3's system prompt), or the learned tokens do not decode to
            exactly the answers and their end-of-turn markers.
    """
    if train_on not in TRAIN_ON:
        raise ConfigError(f"data.train_on: unknown value {train_on!r}", f"expected one of {TRAIN_ON}")
    if not tokenizer.is_fast:
        raise ConfigError("labels need a fast tokenizer, for character offsets", "load it with use_fast=True")
    text = render(template, messages, tokenizer)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    if train_on == "everything":
        return TokenizedExample(ids, list(ids))
    turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if train_on == "last_assistant":
        turns = turns[-1:]
    spans = [_answer_span(messages, turn, text, tokenizer, template) for turn in turns]
    labels = [
        token if any(_overlaps(offset, span) for span in spans) else IGNORE_INDEX
        for token, offset in zip(ids, encoding["offset_mapping"], strict=True)
    ]
    _check_learned_text(ids, labels, [text[start:end] for start, end in spans], tokenizer)
    return TokenizedExample(ids, labels)


def tokenize_text(text: str, tokenizer) -> TokenizedExample:
    """Tokenize one document for continued pre-training: every token is learned, and a separator ends it.

    The separator is "<|endoftext|>" where the tokenizer has that token, since it is the document separator
    of the families that have it even when their EOS is an end-of-turn marker (Qwen2.5-Instruct's EOS is
    "<|im_end|>"); otherwise it is EOS. The tokenizer's own special tokens are kept (BOS for Llama, Mistral
    and Gemma tokenizers, nothing for GPT-2-style ones), as transformers' `run_clm` example tokenizes
    documents; a tokenizer that already appends the separator does not get a second one.

    Example, a tokenizer that adds BOS (id 0), EOS "</s>" id 1, text "Hi there" = ids 6, 9:

        ids     0  6  9  1
        labels  0  6  9  1

    Args:
        text: the document.
        tokenizer: any tokenizer with `<|endoftext|>` or an EOS token.

    Returns:
        The ids and labels (equal).

    Raises:
        ConfigError: the tokenizer has neither `<|endoftext|>` nor an EOS token.
    """
    separator = DOCUMENT_SEPARATOR if DOCUMENT_SEPARATOR in tokenizer.get_vocab() else tokenizer.eos_token
    if separator is None:
        raise ConfigError(
            f"continued pre-training needs a document separator, but the tokenizer has neither "
            f"{DOCUMENT_SEPARATOR} nor an EOS token",
            "set the tokenizer's eos_token",
        )
    ids = tokenizer(text)["input_ids"]
    separator_id = tokenizer.convert_tokens_to_ids(separator)
    if ids[-1:] != [separator_id]:
        ids.append(separator_id)
    return TokenizedExample(ids, list(ids))


def _answer_span(
    messages: list[dict], turn: int, text: str, tokenizer, template: ChatTemplate
) -> tuple[int, int]:
    """Character span of assistant turn `turn` in the full rendering `text`.

    The turn's prompt (earlier turns plus the generation prompt) must be a prefix of the conversation
    rendered up to this turn, and the learned part must sit at the same place in the full rendering: what
    the model learns to answer must be the prompt it gets at inference.
    """
    if turn == 0:
        raise DataError("messages[0] is an assistant turn", "open a conversation with a system or user turn")
    prompt = render(template, messages[:turn], tokenizer, add_generation_prompt=True)
    upto = render(template, messages[: turn + 1], tokenizer)
    if not upto.startswith(prompt):
        raise _prefix_error(template, turn)
    end = len(prompt) + _answer_length(upto[len(prompt) :], messages[turn]["content"], template, turn)
    if text[:end] != upto[:end]:
        raise _prefix_error(template, turn)
    return len(prompt), end


def _answer_length(segment: str, content: str, template: ChatTemplate, turn: int) -> int:
    """Length of the answer through its end-of-turn marker in `segment`, the text after its generation prompt.

    The answer is found as rendered, verbatim or else trimmed. Only whitespace may come before it (the " "
    of Llama 2's "[/INST] answer") and between it and its marker (Llama 2's "answer </s>").
    """
    for answer in (content, content.strip()):
        at = segment.find(answer)
        if at >= 0 and not segment[:at].strip():
            break
    else:
        raise DataError(
            f"chat template {template.name!r} does not write messages[{turn}] (assistant) right after its "
            "generation prompt",
            "use a template whose generation prompt ends where the answer starts",
        )
    answer_end = at + len(answer)
    marker = segment.find(template.end_of_turn, answer_end)
    if marker < 0 or segment[answer_end:marker].strip():
        raise DataError(
            f"chat template {template.name!r} does not end messages[{turn}] (assistant) with its "
            f"end-of-turn marker {template.end_of_turn!r}"
        )
    return marker + len(template.end_of_turn)


def _prefix_error(template: ChatTemplate, turn: int) -> DataError:
    """The template renders an earlier turn differently once later turns follow, so no span is right."""
    return DataError(
        f"chat template {template.name!r} renders the prompt of messages[{turn}] (assistant) differently "
        "from the same turns inside the whole conversation, so training would not match inference",
        "with mistral this is the system prompt (Mistral writes it only into a final user turn): drop it, "
        "or use train_on=everything",
    )


def _overlaps(offset: tuple[int, int], span: tuple[int, int]) -> bool:
    """Whether a token's character range meets a span.

    GPT-2-style offset trimming gives a lone space token the empty range (x, x) just past its space. It
    meets a span only strictly inside it: the space before Llama 2's "</s>" is learned, a space that ends
    the generation prompt (x at the span's start) is not.
    """
    start, end = offset
    return start < span[1] and end > span[0]


def _check_learned_text(ids: list[int], labels: list[int], expected: list[str], tokenizer) -> None:
    """Decode each run of learned tokens and compare it with the span it should be.

    A run may decode with one leading space more or less than its span: a generation prompt that ends with
    a space ("Assistant: ") gives it to the answer's first token ("ĠHello"), and sentencepiece-style
    (Metaspace) decoders drop the leading space of what they decode. Anything else means a token straddles
    scaffolding and content.
    """
    runs = [
        tokenizer.decode(ids[start:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        for start, end in _learned_runs(labels)
    ]
    if len(runs) != len(expected) or any(
        run not in (span, " " + span, span.removeprefix(" "))
        for run, span in zip(runs, expected, strict=True)
    ):
        raise DataError(
            f"the learned tokens decode to {runs!r}, expected {expected!r}: the tokenizer merges template "
            "text into the answers",
            "use a template whose role headers and end-of-turn marker are special tokens of this tokenizer",
        )


def _learned_runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive learned labels: [-100, 7, 1, -100, 9] -> [(1, 3), (4, 5)]."""
    runs, start = [], None
    for index, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = index
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, index))
            start = None
    return runs
