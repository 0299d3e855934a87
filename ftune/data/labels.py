"""Token ids and labels for one example: what the model reads, and which of those tokens it learns.

What is learned is found in the rendered TEXT, never from guessed token offsets, because BPE merges across
the boundary between template scaffolding and content would shift them: each learned assistant turn is a
character span (what the model writes after its generation prompt, through its end-of-turn marker), and a
token is learned iff its character range meets such a span. The result is checked by decoding, so a
tokenizer that merges scaffolding into an answer fails loudly instead of training on the wrong tokens.

Agent and reasoning data: a learned turn includes its tool calls (with their closing markup) and its
`<think>` block (unless `data.train_on_reasoning=false`); tool results and tool schemas are prompt. Each turn
is learned where the template renders it as it does when that turn is generated, which for Qwen3 (reasoning
only after the last user query) means one example per earlier turn. Whatever a record holds but the template
would not print (schemas, reasoning, tool calls, content beside a call) is refused, never dropped silently.
"""

import itertools
from dataclasses import dataclass

import numpy as np

from ftune.data.mask import IGNORE_INDEX
from ftune.data.messages import THINK_CLOSE, THINK_OPEN
from ftune.data.templates import ChatTemplate, Rendering, render
from ftune.errors import ConfigError, DataError

TRAIN_ON = ("all_assistant", "last_assistant", "everything")
"""What `data.train_on` may say: every assistant turn, the last one only, or every token."""

TOOL_TEMPLATES = ("qwen3", "qwen_tools", "llama3.1", "mistral_tools")
"""The registry templates that write tool schemas and tool calls."""

DOCUMENT_SEPARATOR = "<|endoftext|>"
"""Ends each pre-training document where the tokenizer has this token (GPT-2, Qwen, Phi), else EOS does."""


@dataclass
class TokenizedExample:
    """One training example.

    Attributes:
        input_ids: the token ids the model reads.
        labels: the same ids where the model learns them, `IGNORE_INDEX` (-100) where it does not.
        text: the rendered conversation the ids encode ("" for a document), for `ftune data` to explain them.
    """

    input_ids: list[int]
    labels: list[int]
    text: str = ""


def tokenize_conversation(
    messages: list[dict],
    tokenizer,
    template: ChatTemplate,
    train_on: str = "all_assistant",
    tools: list[dict] | None = None,
    train_on_reasoning: bool = True,
    decode_check: bool = True,
) -> list[TokenizedExample]:
    r"""Render a conversation with its chat template, tokenize it, and label the tokens the model learns.

    A learned assistant turn is what the model writes after its generation prompt: its reasoning block (with
    `train_on_reasoning`), the answer as the template renders it (trimmed by some families), its tool calls,
    and its end-of-turn marker, with the whitespace the template puts around them (Llama 2's " answer </s>"),
    since the model has to emit all of that to reach the marker. Role headers, "[/INST]", newlines after the
    marker, tool schemas, system, user and tool turns are never learned, nor a message flagged `train: False`.
    The text is tokenized once per example, without adding special tokens: the templates already write BOS
    where the family wants it.

    Labels follow what the template renders turn by turn: a turn is learned where the whole conversation
    renders it as the template renders it when that turn is being generated. Where a template renders an
    earlier turn differently once later turns follow (Qwen3 drops the reasoning of turns before the last user
    query; Mistral moves its tool list to the last user turn), that turn is learned in a further example that
    ends with it, so the result is one example per distinct rendering.

    Example (ChatML, a word-level vocabulary for readability), user "Hi" then assistant "Hello":

        text:   <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n
        tokens: <|im_start|> user \n Hi <|im_end|> \n <|im_start|> assistant \n Hello <|im_end|> \n
        ids:    [0,    5,    3,    6,    1,    3,    0,    4,    3,    7, 1, 3]
        labels: [-100, -100, -100, -100, -100, -100, -100, -100, -100, 7, 1, -100]

    Args:
        messages: canonical messages (`ftune.data.messages`).
        tokenizer: a fast tokenizer (offsets are needed to map characters to tokens).
        template: from `resolve_template(name, tokenizer)`.
        train_on: "all_assistant", "last_assistant" or "everything" (every token, scaffolding included).
        tools: the conversation's tool schemas (rendered into the prompt, never learned).
        train_on_reasoning: learn the reasoning block of each learned turn, or keep it out of the loss.
        decode_check: decode the learned tokens and compare them with the learned text; without it they are
            decoded only where a token straddles a span's edge (`_check_learned_text`).

    Returns:
        The examples (one unless the template renders earlier turns differently later); a single example with
        every label -100 when there is no assistant turn to learn.

    Raises:
        ConfigError: unknown `train_on`, or a slow tokenizer.
        DataError: the template cannot render the conversation; renders a turn's prompt differently from the
            conversation up to that turn (Mistral v0.3's system prompt); drops something the record holds (the
            tool schemas, a turn's reasoning, tool calls or content); or the learned tokens do not decode to
            exactly the learned text.
    """
    if train_on not in TRAIN_ON:
        raise ConfigError(f"data.train_on: unknown value {train_on!r}", f"expected one of {TRAIN_ON}")
    if not tokenizer.is_fast:
        raise ConfigError("labels need a fast tokenizer, for character offsets", "load it with use_fast=True")
    rendering = Rendering(template, messages, tokenizer, tools)
    text = rendering.upto(len(messages))
    _check_tools_rendered(text, messages, tokenizer, template, tools)
    if train_on == "everything":
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return [TokenizedExample(ids, list(ids), text)]
    pending = learned_turns(messages, train_on)
    plans = {turn: _plan_turn(rendering, turn, train_on_reasoning, text) for turn in pending}
    examples = []
    while True:
        fits = [turn for turn in pending if text.startswith(plans[turn].rendered)]
        if fits or not pending:
            examples.append(_label(text, [plans[turn] for turn in fits], tokenizer, decode_check))
        pending = [turn for turn in pending if turn not in fits]
        if not pending:
            return examples
        # the last turn left is rendered as the end of its own conversation, so this rendering fits it
        text = rendering.upto(pending[-1] + 1)


def learned_turns(messages: list[dict], train_on: str) -> list[int]:
    """Indices of the assistant turns `train_on` learns, less those flagged `train: False`.

    Example, train_on "all_assistant": [user, assistant, user, assistant (train False)] -> [1]
    """
    turns = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
    if train_on == "last_assistant":
        turns = turns[-1:]
    return [turn for turn in turns if messages[turn].get("train", True)]


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


@dataclass
class TurnPlan:
    """Where one assistant turn is learned, in the conversation rendered up to and including that turn.

    Attributes:
        rendered: that rendering, through the turn's end-of-turn marker; a rendering of more turns shows this
            turn as it is generated exactly when it starts with this text.
        start: character offset where the learned text begins (after the reasoning block without
            `train_on_reasoning`).
        end: character offset where it ends (after the end-of-turn marker).
    """

    rendered: str
    start: int
    end: int


def _plan_turn(rendering: Rendering, turn: int, train_on_reasoning: bool, whole: str) -> TurnPlan:
    """The learned span of assistant turn `turn`, found in the conversation rendered up to it.

    The turn's prompt (earlier turns plus the generation prompt) must be a prefix of that rendering: what the
    model learns to answer must be the prompt it gets at inference. `whole` is the whole conversation rendered,
    which is that rendering when the turn is the last (renders are most of the labelling time).
    """
    if turn == 0:
        raise DataError("messages[0] is an assistant turn", "open a conversation with a system or user turn")
    messages, template = rendering.messages, rendering.template
    prompt = rendering.upto(turn, add_generation_prompt=True)
    upto = whole if turn == len(messages) - 1 else rendering.upto(turn + 1)
    if not upto.startswith(prompt):
        raise _prefix_error(template, turn)
    reasoning_end, end = _locate_output(upto[len(prompt) :], messages[turn], template, turn)
    start = len(prompt) + (0 if train_on_reasoning else reasoning_end)
    return TurnPlan(upto[: len(prompt) + end], start, len(prompt) + end)


def _label(text: str, plans: list[TurnPlan], tokenizer, decode_check: bool) -> TokenizedExample:
    """Tokenize `text` and learn the tokens that meet the plans' spans, checked by decoding.

    The overlap test runs on numpy arrays of the token offsets: a Python loop over every token and span was a
    third of the labelling time on multi-turn chats.
    """
    ids, offsets = encode_with_offsets(text, tokenizer)
    spans = [(plan.start, plan.end) for plan in plans]
    learned = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        learned |= _overlaps(offsets, (start, end))
    labels = np.where(learned, ids, IGNORE_INDEX).tolist()
    if decode_check or _straddles(offsets, spans):
        _check_learned_text(ids, labels, [text[start:end] for start, end in spans], tokenizer)
    return TokenizedExample(ids, labels, text)


def encode_with_offsets(text: str, tokenizer) -> tuple[list[int], np.ndarray]:
    """Token ids of `text` (no special tokens added) and each token's character range, as `[tokens, 2]`.

    Through the `tokenizers` backend directly when that is what the tokenizer's own call would run (no
    truncation, padding or special-token splitting configured on it): the Python wrapping of a single call
    cost half as much as the encoding itself. Otherwise through the tokenizer, which sets those per call.
    """
    backend = tokenizer.backend_tokenizer
    if backend.truncation is None and backend.padding is None and not backend.encode_special_tokens:
        encoding = backend.encode(text, add_special_tokens=False)
        ids, offsets = encoding.ids, encoding.offsets
    else:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    # flattened first: numpy converts a list of tuples element by element, five times slower
    flat = np.fromiter(itertools.chain.from_iterable(offsets), dtype=np.int64, count=2 * len(offsets))
    return ids, flat.reshape(-1, 2)


def _straddles(offsets: np.ndarray, spans: list[tuple[int, int]]) -> bool:
    """Whether a token crosses the edge of a span (starts before it and ends after it).

    That is the sign of a tokenizer merging scaffolding into an answer, which the decode check then names.

    Example: offsets [(0, 4), (4, 9)], span (6, 9) -> True (the token 4-9 crosses 6)
    """
    edges = np.array([edge for span in spans for edge in span])
    return bool(((offsets[:, :1] < edges) & (offsets[:, 1:] > edges)).any())


def _locate_output(segment: str, message: dict, template: ChatTemplate, turn: int) -> tuple[int, int]:
    r"""(end of the reasoning block, end of the end-of-turn marker) in `segment`, the text after the prompt.

    The parts are found in the order templates write them: reasoning, content (verbatim or trimmed, after
    only whitespace), each tool call's function name, then the marker. Only whitespace may separate a plain
    answer from its marker (Llama 2's "answer </s>"); tool calls end with markup of their own.

    Example (Qwen3): segment "<think>\nSum.\n</think>\n\n4<|im_end|>\n" -> (23, 34)
    """
    cursor = reasoning_end = _reasoning_end(segment, message, template, turn)
    content, calls = message["content"], message.get("tool_calls", [])
    if content.strip():
        cursor = _content_end(segment, content, cursor, template, turn, bool(calls))
    for call in calls:
        at = segment.find(call["function"]["name"], cursor)
        if at < 0:
            raise DataError(f"chat template {template.name!r} does not write the tool calls of messages[{turn}] "
                            "(assistant)", f"use a template with tool calls: {', '.join(TOOL_TEMPLATES)}")
        cursor = at + len(call["function"]["name"])
    marker = segment.find(template.end_of_turn, cursor)
    if marker < 0 or (not calls and segment[cursor:marker].strip()):
        raise DataError(
            f"chat template {template.name!r} does not end messages[{turn}] (assistant) with its "
            f"end-of-turn marker {template.end_of_turn!r}"
        )
    return reasoning_end, marker + len(template.end_of_turn)


def _reasoning_end(segment: str, message: dict, template: ChatTemplate, turn: int) -> int:
    """Where the `<think>...</think>` block that opens `segment` ends (with the whitespace after it), else 0.

    A template that renders no block for a turn with reasoning would drop it silently, so that is refused.
    Qwen3 writes an empty block for a final turn without reasoning; it is part of what the model emits.
    """
    lead = len(segment) - len(segment.lstrip())
    close = segment.find(THINK_CLOSE, lead) if segment.startswith(THINK_OPEN, lead) else -1
    reasoning = message.get("reasoning_content", "").strip()
    if reasoning and (close < 0 or reasoning not in segment[lead:close]):
        raise DataError(f"chat template {template.name!r} does not write the reasoning of messages[{turn}] "
                        "(assistant), so it would be silently dropped",
                        "use a template that writes reasoning (qwen3), or leave reasoning_content out")
    if close < 0:
        return 0
    end = close + len(THINK_CLOSE)
    return end + len(segment[end:]) - len(segment[end:].lstrip())


def _content_end(segment: str, content: str, cursor: int, template: ChatTemplate, turn: int, calls: bool) -> int:
    """End of the answer in `segment`, found verbatim or trimmed after only whitespace from `cursor`."""
    for answer in (content, content.strip()):
        at = segment.find(answer, cursor)
        if at >= 0 and not segment[cursor:at].strip():
            return at + len(answer)
    if calls:
        raise DataError(f"chat template {template.name!r} drops the content of messages[{turn}] (assistant), which "
                        "also calls tools", "put the text in an assistant turn of its own, or use qwen3 or qwen_tools")
    raise DataError(
        f"chat template {template.name!r} does not write messages[{turn}] (assistant) right after its "
        "generation prompt",
        "use a template whose generation prompt ends where the answer starts",
    )


def _check_tools_rendered(text: str, messages: list[dict], tokenizer, template: ChatTemplate,
                          tools: list[dict] | None) -> None:
    """Refuse tool schemas the template ignores: the model would learn to call tools it was never shown."""
    if tools and render(template, messages, tokenizer) == text:
        raise DataError(f"chat template {template.name!r} does not write the tool schemas (tools)",
                        f"use a template with tools: {', '.join(TOOL_TEMPLATES)}, or the tokenizer's own")


def _prefix_error(template: ChatTemplate, turn: int) -> DataError:
    """The template renders a turn's prompt differently from the conversation up to that turn: no span is right."""
    return DataError(
        f"chat template {template.name!r} renders the prompt of messages[{turn}] (assistant) differently "
        "from the same turns inside the whole conversation, so training would not match inference",
        "with mistral this is the system prompt (Mistral writes it only into a final user turn): drop it, "
        "or use train_on=everything",
    )


def _overlaps(offsets: np.ndarray, span: tuple[int, int]) -> np.ndarray:
    """Which tokens' character ranges (rows of `offsets`) meet a span.

    GPT-2-style offset trimming gives a lone space token the empty range (x, x) just past its space. It
    meets a span only strictly inside it: the space before Llama 2's "</s>" is learned, a space that ends
    the generation prompt (x at the span's start) is not.

    Example: offsets [(0, 2), (2, 2), (2, 5)], span (2, 5) -> [False, False, True]
    """
    return (offsets[:, 0] < span[1]) & (offsets[:, 1] > span[0])


def _check_learned_text(ids: list[int], labels: list[int], expected: list[str], tokenizer) -> None:
    """Decode each run of learned tokens and compare it with the span it should be.

    A run may decode with one leading space more or less than its span: a generation prompt that ends with
    a space ("Assistant: ") gives it to the answer's first token ("ĠHello"), and sentencepiece-style
    (Metaspace) decoders drop the leading space of what they decode. Anything else means a token straddles
    scaffolding and content.
    """
    runs = [
        tokenizer.decode(ids[start:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        for start, end in learned_runs(labels)
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


def learned_runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive learned labels: [-100, 7, 1, -100, 9] -> [(1, 3), (4, 5)]."""
    runs, start = [], None
    for index, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = index
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, index))
            start = None
    return runs
