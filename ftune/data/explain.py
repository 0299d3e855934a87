"""What each token of a rendered example is, so that `ftune data` can show every kind in its own style.

Kinds: `tools` (the schemas the template writes into the prompt), `tool_result`, `reasoning` (a
`<think>...</think>` block), `tool_call`, `answer`, `end_of_turn` (the marker after a learned turn) and `prompt`
(system and user turns and template scaffolding). Whether a token is learned comes from its label, never from
here: this only names what the text is, found in the rendered text the labels were computed on.

- tools: the span where the conversation rendered with its tools differs from it rendered without them;
- tool results: each tool message's content (or its JSON-quoted form, as Llama 3.1 writes it), in order;
- within each learned run: the reasoning block, then the answer, then (for a turn that calls tools) the tool
  calls up to the end-of-turn marker.
"""

import json
import re

from ftune.data.labels import TokenizedExample, learned_runs
from ftune.data.messages import THINK_CLOSE, THINK_OPEN
from ftune.data.templates import ChatTemplate, render

KINDS = ("prompt", "tools", "tool_result", "reasoning", "tool_call", "answer", "end_of_turn")
THINK_BLOCK = re.compile(re.escape(THINK_OPEN) + ".*?" + re.escape(THINK_CLOSE), re.DOTALL)


def token_kinds(example: TokenizedExample, record: dict, tokenizer, template: ChatTemplate) -> list[str]:
    r"""The kind of each token of `example`, a rendering of the canonical `record` (see the module docstring).

    Example (ChatML): "<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello<|im_end|>\\n" with
    "Hello<|im_end|>" learned -> prompt for every token up to "Hello", answer, end_of_turn, prompt.
    """
    text = example.text
    if not text:  # a document for continued pre-training: all of it is learned text
        return ["answer"] * len(example.input_ids)
    kinds = ["prompt"] * len(text)
    if "messages" in record:
        mark_tools(kinds, text, record, tokenizer, template)
        mark_tool_results(kinds, text, record["messages"])
        for match in THINK_BLOCK.finditer(text):
            kinds[match.start() : match.end()] = ["reasoning"] * (match.end() - match.start())
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    learned = [(offsets[start][0], offsets[end - 1][1]) for start, end in learned_runs(example.labels)]
    for start, end in learned:
        mark_learned(kinds, text, start, end, record, template)
    return [kinds[start] if start < len(kinds) else "prompt" for start, _ in offsets]


def mark_tools(kinds: list[str], text: str, record: dict, tokenizer, template: ChatTemplate) -> None:
    """Mark where the tool schemas are: what the rendering without tools lacks (common prefix and suffix)."""
    messages, tools = record["messages"], record.get("tools")
    if not tools:
        return
    # the example may render the conversation up to an earlier turn (see labels.tokenize_conversation)
    end = next((end for end in range(len(messages), 0, -1)
                if render(template, messages[:end], tokenizer, tools=tools) == text), None)
    if end is None:
        return
    bare = render(template, messages[:end], tokenizer)
    prefix = next((i for i, (a, b) in enumerate(zip(text, bare, strict=False)) if a != b), min(len(text), len(bare)))
    suffix = next((i for i, (a, b) in enumerate(zip(reversed(text), reversed(bare), strict=False)) if a != b), 0)
    end = max(prefix, len(text) - suffix)
    kinds[prefix:end] = ["tools"] * (end - prefix)


def mark_tool_results(kinds: list[str], text: str, messages: list[dict]) -> None:
    """Mark each tool message's content where it is rendered, searching in conversation order."""
    cursor = 0
    for message in messages:
        if message["role"] != "tool":
            found = text.find(message["content"], cursor) if message["content"].strip() else -1
            cursor = found + len(message["content"]) if found >= 0 else cursor
            continue
        for piece in (message["content"], json.dumps(message["content"], ensure_ascii=False)):
            at = text.find(piece, cursor)
            if at >= 0:
                kinds[at : at + len(piece)] = ["tool_result"] * len(piece)
                cursor = at + len(piece)
                break


def mark_learned(kinds: list[str], text: str, start: int, end: int, record: dict, template: ChatTemplate) -> None:
    """Name the parts of one learned run: reasoning block, answer, tool calls, end-of-turn markers."""
    run = text[start:end]
    block = THINK_BLOCK.match(run.lstrip())
    cursor = start + (len(run) - len(run.lstrip()) + block.end() if block else 0)
    kinds[cursor:end] = ["answer"] * (end - cursor)
    calls = [call["function"]["name"] for message in record.get("messages", [])
             for call in message.get("tool_calls", [])]
    named = [text.find(name, cursor, end) for name in calls if 0 <= text.find(name, cursor, end)]
    if named:
        answers = [message["content"].strip() for message in record["messages"]
                   if message["role"] == "assistant" and message["content"].strip()]
        after = [text.find(answer, cursor, end) + len(answer) for answer in answers
                 if 0 <= text.find(answer, cursor, end) < min(named)]
        call_start = max([cursor, *after])
        kinds[call_start:end] = ["tool_call"] * (end - call_start)
    marker = text.find(template.end_of_turn, cursor, end) if template.end_of_turn else -1
    while marker >= 0:
        kinds[marker : marker + len(template.end_of_turn)] = ["end_of_turn"] * len(template.end_of_turn)
        marker = text.find(template.end_of_turn, marker + len(template.end_of_turn), end)
