r"""Canonical conversations: messages with tool calls, tool results, reasoning and per-message training flags.

Every chat format (`formats.FORMATS`) maps its turns here, so that templates and labels see one shape, the one
transformers passes to chat templates (OpenAI's):

    {"messages": [
        {"role": "system", "content": "You check the weather."},
        {"role": "user", "content": "Rain in Oslo?"},
        {"role": "assistant", "content": "", "reasoning_content": "I should look it up.",
         "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}},
                         "id": "call00001"}]},
        {"role": "tool", "content": "{\"rain\": true}", "tool_call_id": "call00001"},
        {"role": "assistant", "content": "Yes, it rains.", "train": False}],
     "tools": [{"type": "function", "function": {"name": "weather", "parameters": {...}}}]}

What is accepted, per message (`canonical_message`):
- `content`: a string, or a list of typed parts `{"type": "text"|"reasoning"|"tool_call", "value"|"text": ...}`
  (text parts are concatenated, reasoning parts become `reasoning_content`, tool_call parts `tool_calls`);
  it may be empty or null on an assistant message that makes tool calls, and a tool result may be a JSON object;
- `tool_calls`: `{"type": "function", "function": {"name", "arguments"}}` or `{"name", "arguments"}`, the
  arguments an object or a JSON string of one (templates print objects: a string would be printed quoted);
- `reasoning_content` (or `reasoning`), else a leading `<think>...</think>` in an assistant's content, split
  exactly as Qwen3's official template splits it;
- `weight` (0 or 1, OpenAI's fine-tuning flag) or `train` (true/false): `train: False` keeps the message in
  the prompt but out of the loss. Only assistant messages are learned, so a true flag elsewhere is refused;
- `tool_call_id` and `name` on tool messages; every other key is dropped.
Per conversation: `tools`, a list of JSON schemas (or a JSON string of one, as ShareGPT datasets store it),
each wrapped as `{"type": "function", "function": schema}`; and a `system` string (LLaMA-Factory's column),
which opens the conversation unless a system turn already does.
"""

import json
from collections.abc import Mapping

from ftune.config.schema import CANONICAL_ROLES, MAPPABLE_ROLES, TOOL_CALL_ROLE
from ftune.errors import ConfigError, DataError

ROLES = CANONICAL_ROLES
ROLE_NAMES = {role: role for role in ROLES}
"""The `messages` format names ftune's roles directly."""


SHAREGPT_TOOL_ROLES = {"function_call": TOOL_CALL_ROLE, "observation": "tool"}
"""ShareGPT's tool turns (LLaMA-Factory, glaive); `data.roles` entries take precedence."""

PART_TYPES = ("text", "reasoning", "tool_call")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

INVALID_RECORD = "not a JSON object"
MISSING_FIELD = "missing field"
EMPTY_CONTENT = "empty or non-string content"
UNKNOWN_ROLE = "unknown role"
NO_ASSISTANT = "no assistant turn"
BAD_TOOL_CALL = "bad tool call"
BAD_TOOLS = "bad tools"
BAD_PART = "bad content part"
BAD_FLAG = "bad weight or train flag"
"""Reasons under which skipped records are counted."""


class RecordError(DataError):
    """A record that does not fit its format; `reason` names the kind of problem for the skip statistics."""

    def __init__(self, reason: str, message: str, hint: str | None = None):
        super().__init__(message, hint)
        self.reason = reason

    def __reduce__(self):
        return RecordError, (self.reason, self.message, self.hint)


def show(value: object, width: int = 40) -> str:
    """A value's repr for an error message, cut to `width` characters."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def conversation(turns: object, where: str, field: str, keys: tuple[str, str], roles: Mapping[str, str],
                 record: object = None) -> dict:
    """The canonical record of a conversation: its messages, checked, and its tools when it has any.

    Example, ShareGPT (field "conversations", keys ("from", "value")) with a tool call and its result:
        [{"from": "human", "value": "Rain?"}, {"from": "function_call", "value": '{"name": "w", "arguments": {}}'},
         {"from": "observation", "value": "yes"}, {"from": "gpt", "value": "It rains."}]
        -> [{"role": "user", "content": "Rain?"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                                 "function": {"name": "w", "arguments": {}}}]},
            {"role": "tool", "content": "yes"}, {"role": "assistant", "content": "It rains."}]

    Args:
        turns: the list of turns.
        where: the record's location, for messages.
        field: the list's name in the record (messages, conversations; record for a bare list).
        keys: the names of a turn's role and content.
        roles: turn role names -> ftune roles (or `TOOL_CALL_ROLE`).
        record: the whole record, for its `tools` and `system` fields (None for a bare list of messages).

    Raises:
        RecordError: the first problem found, naming `field[index].key`.
    """
    if not isinstance(turns, list) or not turns:
        raise RecordError(MISSING_FIELD, f"{where}: {field}: expected a non-empty list of {{{keys[0]}, {keys[1]}}} "
                                         f"objects, got {show(turns)}")
    messages = [canonical_message(turn, f"{where}: {field}[{index}]", keys, roles, field)
                for index, turn in enumerate(turns)]
    fields = record if isinstance(record, dict) else {}
    messages = with_system(messages, fields, where)
    if not any(message["role"] == "assistant" for message in messages):
        raise RecordError(NO_ASSISTANT, f"{where}: {field}: expected an assistant turn (nothing would be learned), "
                                        f"got roles {[m['role'] for m in messages]}")
    tools = tools_list(fields.get("tools"), f"{where}: tools")
    return {"messages": messages, "tools": tools} if tools else {"messages": messages}


def with_system(messages: list[dict], fields: dict, where: str) -> list[dict]:
    """The messages opened by the record's `system` column, unless it is blank or a system turn already opens them.

    Example: [{"role": "user", "content": "Hi"}], {"system": "Be terse."}
        -> [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    """
    system = fields.get("system")
    if system is not None and not isinstance(system, str):
        raise RecordError(EMPTY_CONTENT, f"{where}: system: expected a string, got {show(system)}")
    if system and system.strip() and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}, *messages]
    return messages


def canonical_message(turn: object, at: str, keys: tuple[str, str], roles: Mapping[str, str], field: str) -> dict:
    """One turn as a canonical message (see the module docstring for what is accepted).

    Raises:
        RecordError: a missing role or content, an unknown role, empty content, a malformed tool call or flag.
        ConfigError: `data.roles` maps a name to something that is no role.
    """
    role_key, content_key = keys
    if not isinstance(turn, dict) or role_key not in turn or (content_key not in turn and "tool_calls" not in turn):
        raise RecordError(MISSING_FIELD, f"{at}: expected an object with {role_key!r} and {content_key!r}, "
                                         f"got {show(turn)}")
    role = message_role(turn[role_key], at, role_key, roles, field)
    if role == TOOL_CALL_ROLE:
        calls = tool_calls(turn[content_key], f"{at}.{content_key}")
        message = {"role": "assistant", "content": "", "tool_calls": calls}
    else:
        message = content_message(turn, role, at, content_key)
    flag = training_flag(turn, at)
    if flag is not None:
        if flag and message["role"] != "assistant":
            raise RecordError(BAD_FLAG, f"{at}: a {message['role']} message cannot be learned (only assistant "
                                        "messages are)", "use data.train_on=everything to learn every token")
        message["train"] = flag
    return message


def message_role(name: object, at: str, role_key: str, roles: Mapping[str, str], field: str) -> str:
    """The ftune role that a turn's role name maps to."""
    role = roles.get(name) if isinstance(name, str) else None
    if role is None:
        hint = f"map it with +data.roles.{name}=<{'|'.join(ROLES)}>" if field == "conversations" else None
        raise RecordError(UNKNOWN_ROLE, f"{at}.{role_key}: unknown role {show(name)} (expected one of "
                                        f"{', '.join(roles)})", hint)
    if role not in MAPPABLE_ROLES:
        raise ConfigError(f"data.roles.{name}={role!r}: expected one of {', '.join(MAPPABLE_ROLES)}")
    return role


def content_message(turn: dict, role: str, at: str, content_key: str) -> dict:
    """A message from a turn's content (a string or typed parts), reasoning and tool calls."""
    content = turn.get(content_key)
    at_content = f"{at}.{content_key}"
    if role == "tool" and isinstance(content, dict | list) and not is_typed(content):  # a JSON result
        text, reasoning, calls = json.dumps(content, ensure_ascii=False), "", []
    elif isinstance(content, list):
        text, reasoning, calls = typed_parts(content, at_content)
    else:
        text, reasoning, calls = content, "", []
    calls = calls + (tool_calls(turn["tool_calls"], f"{at}.tool_calls") if turn.get("tool_calls") else [])
    if calls and role != "assistant":
        raise RecordError(BAD_TOOL_CALL, f"{at}.tool_calls: only assistant messages make tool calls, this is {role}")
    if text is None and calls:
        text = ""
    if not isinstance(text, str) or not (text.strip() or calls):
        raise RecordError(EMPTY_CONTENT, f"{at_content}: expected a non-empty string, got {show(content)}")
    reasoning = reasoning or explicit_reasoning(turn, at)
    if role == "assistant" and not reasoning:
        reasoning, text = split_think(text)
    message = {"role": role, "content": text}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    if role == "tool":
        message |= {key: turn[key] for key in ("tool_call_id", "name") if isinstance(turn.get(key), str)}
    return message


def explicit_reasoning(turn: dict, at: str) -> str:
    """`reasoning_content` (DeepSeek's and transformers' name) or `reasoning` (vLLM's), when a string."""
    for key in ("reasoning_content", "reasoning"):
        value = turn.get(key)
        if value is not None and not isinstance(value, str):
            raise RecordError(EMPTY_CONTENT, f"{at}.{key}: expected a string, got {show(value)}")
        if value:
            return value
    return ""


def split_think(content: str) -> tuple[str, str]:
    r"""Reasoning written into the content as `<think>...</think>`, split as Qwen3's official template splits it.

    Example: "<think>\nSum it.\n</think>\n\n4" -> ("Sum it.", "4"); "4" -> ("", "4")
    """
    if THINK_CLOSE not in content:
        return "", content
    before, _, _ = content.partition(THINK_CLOSE)
    reasoning = before.rstrip("\n").split(THINK_OPEN)[-1].lstrip("\n")
    return reasoning, content.split(THINK_CLOSE)[-1].lstrip("\n")


def is_typed(content: object) -> bool:
    """Whether a content is a non-empty list of typed parts (rather than, for a tool, a JSON array result)."""
    return isinstance(content, list) and bool(content) and all(
        isinstance(part, dict) and part.get("type") in PART_TYPES for part in content)


def typed_parts(parts: list, at: str) -> tuple[str, str, list[dict]]:
    """(text, reasoning, tool calls) of a content given as typed parts.

    Example: [{"type": "reasoning", "value": "Look it up."}, {"type": "text", "text": "Checking."},
              {"type": "tool_call", "value": '{"name": "w", "arguments": {"city": "Oslo"}}'}]
        -> ("Checking.", "Look it up.", [{"type": "function", "function": {"name": "w", ...}}])
    """
    texts, reasonings, calls = [], [], []
    for index, part in enumerate(parts):
        where = f"{at}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in PART_TYPES:
            raise RecordError(BAD_PART, f"{where}: expected a part with type {' or '.join(PART_TYPES)}, got "
                                        f"{show(part)}")
        value = next((part[key] for key in ("value", "text", kind) if key in part), None)
        if kind == "tool_call":
            calls.append(tool_call(value, f"{where}.value"))
            continue
        if not isinstance(value, str):
            raise RecordError(BAD_PART, f"{where}.value: expected a string, got {show(value)}")
        (texts if kind == "text" else reasonings).append(value)
    return "".join(texts), "".join(reasonings), calls


def tool_calls(value: object, at: str) -> list[dict]:
    """A list of tool calls (or one call, or a JSON string of either) in canonical form."""
    value = parse_json(value, at, BAD_TOOL_CALL) if isinstance(value, str) else value
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise RecordError(BAD_TOOL_CALL, f"{at}: expected at least one tool call, got []")
    return [tool_call(call, f"{at}[{index}]" if isinstance(value, list) else at) for index, call in enumerate(calls)]


def tool_call(value: object, at: str) -> dict:
    r"""One tool call as `{"type": "function", "function": {"name", "arguments": {...}}}` (plus its `id`).

    Example: '{"name": "w", "arguments": "{\"city\": \"Oslo\"}"}'
        -> {"type": "function", "function": {"name": "w", "arguments": {"city": "Oslo"}}}
    """
    value = parse_json(value, at, BAD_TOOL_CALL) if isinstance(value, str) else value
    function = value.get("function", value) if isinstance(value, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name.strip():
        raise RecordError(BAD_TOOL_CALL, f"{at}: expected a tool call with a function name, got {show(value)}")
    arguments = function.get("arguments", function.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = parse_json(arguments, f"{at}.arguments", BAD_TOOL_CALL)
    if not isinstance(arguments, dict):
        raise RecordError(BAD_TOOL_CALL, f"{at}.arguments: expected a JSON object, got {show(arguments)}")
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if isinstance(value.get("id"), str):
        call["id"] = value["id"]
    return call


def tools_list(value: object, at: str) -> list[dict]:
    """A conversation's tool schemas as `[{"type": "function", "function": schema}]`; none gives []."""
    if value is None or value == "":
        return []
    value = parse_json(value, at, BAD_TOOLS) if isinstance(value, str) else value
    if not isinstance(value, list):
        raise RecordError(BAD_TOOLS, f"{at}: expected a list of tool schemas, got {show(value)}")
    tools = []
    for index, tool in enumerate(value):
        schema = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(schema, dict) or not isinstance(schema.get("name"), str):
            raise RecordError(BAD_TOOLS, f"{at}[{index}]: expected a JSON schema with a name, got {show(tool)}")
        tools.append({"type": "function", "function": schema})
    return tools


def training_flag(turn: dict, at: str) -> bool | None:
    """`train` (a bool) or OpenAI's `weight` (0 or 1) as whether the message is learned; None when absent."""
    if "train" in turn:
        if not isinstance(turn["train"], bool):
            raise RecordError(BAD_FLAG, f"{at}.train: expected true or false, got {show(turn['train'])}")
        return turn["train"]
    if "weight" in turn:
        if turn["weight"] not in (0, 1) or isinstance(turn["weight"], bool):
            raise RecordError(BAD_FLAG, f"{at}.weight: expected 0 or 1, got {show(turn['weight'])}")
        return turn["weight"] == 1
    return None


def parse_json(text: str, at: str, reason: str) -> object:
    """The JSON value of a string field."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise RecordError(reason, f"{at}: expected JSON, got invalid JSON ({err.msg} at column {err.colno})") from None


def features(record: dict) -> set[str]:
    """What a canonical conversation uses beyond plain turns, for the statistics.

    Example: {"messages": [..., {"role": "assistant", "content": "", "tool_calls": [...]}], "tools": [...]}
        -> {"tools", "tool calls"}
    """
    found = {"tools"} if record.get("tools") else set()
    for message in record.get("messages", []):
        found |= {name for key, name in MESSAGE_FEATURES.items() if key in message}
    return found


MESSAGE_FEATURES = {"tool_calls": "tool calls", "reasoning_content": "reasoning", "train": "per-message weights"}
"""Canonical message keys -> the feature the statistics name."""
