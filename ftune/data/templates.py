"""Chat templates by name: the exact text each model family was fine-tuned on, rendered through transformers.

A model learns its chat format byte for byte, so each registry entry reproduces what that family's official
template renders (BOS/EOS placement, trimming, default system prompts), written out in
`ftune/assets/chat_templates/<name>.jinja` so that training needs no hub download and so that `ftune eval`
prompts exactly as training did. Where an official template would quietly render something else (drop a
turn, print a role the model never saw), ours raises instead. Each file opens with a Jinja comment (which
renders nothing) saying which official template it reproduces and where it deliberately differs.

Rendering is what `tokenizer.apply_chat_template(..., chat_template=jinja, tokenize=False)` does (transformers'
compiled template and context, called directly: see `compiled`), which matters for the Jinja sources:
- transformers compiles templates with `trim_blocks=True, lstrip_blocks=True`, so the multi-line sources
  render no stray newlines as long as every tag strips with `-`;
- the tokenizer's named special tokens (`bos_token`, `eos_token`, ...) are in the Jinja context, but a token
  the tokenizer lacks is simply undefined and renders as "", so `resolve_template` checks for them;
- keys whose value is None are dropped from every message before rendering;
- the conversation's tool schemas go in as `tools=`, messages as transformers passes them (OpenAI's shape,
  `ftune.data.messages`), without ftune's own `train` flag.

Four registry entries are the families' official templates verbatim (`qwen3`, `llama3.1`, `mistral_tools`,
`qwen_tools`: tools, tool calls and reasoning); the others are ftune's rewrites of official templates that
render the same text and raise where the official one would silently drop a turn. A record a template cannot
express (tools on a template without tool support, reasoning it does not print) is refused in
`ftune.data.labels`, which checks that every learned part is rendered.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import jinja2
import jinja2.meta
import jinja2.nodes

from ftune.compat import compile_chat_template
from ftune.data.messages import ROLES
from ftune.errors import ConfigError, DataError

EOS_FROM_TOKENIZER = "{{ eos_token }}"
"""`end_of_turn` of families whose turns end with the tokenizer's EOS; `resolve_template` fills it in."""

TOKENIZER_TEMPLATE = "tokenizer"
"""The name that selects the tokenizer's own `chat_template` instead of a registry entry."""

_PROBE = [
    {"role": "user", "content": "ftune probe question"},
    {"role": "assistant", "content": "ftune probe answer"},
]


@dataclass(frozen=True)
class ChatTemplate:
    """A chat format: its Jinja source and the marker that ends each assistant turn.

    Attributes:
        name: the registry name, or "tokenizer" for the tokenizer's own template.
        jinja: Jinja source, rendered as transformers renders chat templates.
        end_of_turn: the text the model emits after each assistant turn; it is learned with the turn so that
            the fine-tuned model stops. `EOS_FROM_TOKENIZER` in the registry, the EOS text once resolved.
        model_ids: documentation only: public model ids whose official template this one matches.
    """

    name: str
    jinja: str
    end_of_turn: str
    model_ids: tuple[str, ...] = ()


TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "assets" / "chat_templates"
"""One `<name>.jinja` file per registry entry; its comment header says what it reproduces and how it differs."""

_REGISTRY: dict[str, tuple[str, tuple[str, ...]]] = {
    # name: (end of turn, public model ids whose official template it matches)
    "chatml": ("<|im_end|>", ("teknium/OpenHermes-2.5-Mistral-7B",)),
    "llama2": (
        EOS_FROM_TOKENIZER,
        ("meta-llama/Llama-2-7b-chat-hf", "meta-llama/Llama-2-13b-chat-hf", "meta-llama/Llama-2-70b-chat-hf"),
    ),
    "llama3": ("<|eot_id|>", ("meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Meta-Llama-3-70B-Instruct")),
    "mistral": (EOS_FROM_TOKENIZER, ("mistralai/Mistral-7B-Instruct-v0.3",)),
    "mistral_v1": (EOS_FROM_TOKENIZER, ("mistralai/Mistral-7B-Instruct-v0.1", "mistralai/Mistral-7B-Instruct-v0.2")),
    "gemma": (
        "<end_of_turn>",
        ("google/gemma-3-1b-it", "google/gemma-3-4b-it", "google/gemma-3-12b-it", "google/gemma-3-27b-it"),
    ),
    "phi3": (
        "<|end|>",
        ("microsoft/Phi-3.5-mini-instruct", "microsoft/Phi-3-mini-4k-instruct", "microsoft/Phi-3-mini-128k-instruct"),
    ),
    "qwen": ("<|im_end|>", ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-72B-Instruct")),
    "alpaca": (EOS_FROM_TOKENIZER, ()),  # a prompt format for base models (tatsu-lab/stanford_alpaca)
    "qwen3": (
        "<|im_end|>",
        ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-1.7B", "Qwen/Qwen3-4B", "Qwen/Qwen3-8B", "Qwen/Qwen3-14B", "Qwen/Qwen3-32B",
         "Qwen/Qwen3-30B-A3B"),
    ),
    "llama3.1": (
        "<|eot_id|>",
        ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-70B-Instruct",
         "meta-llama/Llama-3.1-405B-Instruct"),
    ),
    "mistral_tools": (EOS_FROM_TOKENIZER, ("mistralai/Mistral-7B-Instruct-v0.3",)),
    "qwen_tools": (
        "<|im_end|>", ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-72B-Instruct"),
    ),
}

TEMPLATES: dict[str, ChatTemplate] = {
    name: ChatTemplate(name, (TEMPLATES_DIR / f"{name}.jinja").read_text(encoding="utf-8"), end_of_turn, model_ids)
    for name, (end_of_turn, model_ids) in _REGISTRY.items()
}


def resolve_template(name: str, tokenizer) -> ChatTemplate:
    """The chat template called `name`, made concrete for `tokenizer`.

    Args:
        name: a key of `TEMPLATES`, or "tokenizer" for the tokenizer's own `chat_template`.
        tokenizer: the tokenizer that will render and encode the conversations.

    Returns:
        The template, with `end_of_turn` filled in from the tokenizer where the family ends turns with EOS.

    Raises:
        ConfigError: unknown name; "tokenizer" but the tokenizer has no template or no recognisable
            end-of-turn marker; or the template needs a special token (BOS, EOS) the tokenizer lacks.
    """
    if name == TOKENIZER_TEMPLATE:
        return _tokenizer_template(tokenizer)
    if name not in TEMPLATES:
        known = ", ".join([*TEMPLATES, TOKENIZER_TEMPLATE])
        raise ConfigError(f"data.chat_template: unknown chat template {name!r}", f"expected one of: {known}")
    template = TEMPLATES[name]
    _check_special_tokens(template, tokenizer)
    if template.end_of_turn == EOS_FROM_TOKENIZER:
        template = dataclasses.replace(template, end_of_turn=tokenizer.eos_token)
    return template


def render(
    template: ChatTemplate, messages: list[dict], tokenizer, add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
) -> str:
    """Render a conversation to text exactly as the model family expects it.

    Args:
        template: a template from `resolve_template`.
        messages: canonical messages (`ftune.data.messages`); roles are system, user, assistant or tool.
        tokenizer: supplies `bos_token`, `eos_token` and the other named special tokens to the template.
        add_generation_prompt: end with the header that asks the model for the next assistant turn.
        tools: the conversation's tool schemas, passed to the template as `tools=` (None: no tools).

    Returns:
        The rendered text, special tokens written out as text (encode it without adding special tokens).

    Raises:
        DataError: a message is malformed, or the template cannot render this conversation (a system turn
            where the family has none, non-alternating turns, a tool turn without a slot).
        ConfigError: the tokenizer's own template is not valid Jinja.
    """
    return Rendering(template, messages, tokenizer, tools).upto(len(messages), add_generation_prompt)


class Rendering:
    """One conversation, checked and put in the shape templates read once, then rendered up to any turn.

    Labels render a conversation up to each learned turn, twice per turn (`ftune.data.labels`); checking and
    converting its messages once instead of at every render saves a fifth of the rendering time.

    Raises:
        DataError: a message is malformed (see `render`).
    """

    def __init__(self, template: ChatTemplate, messages: list[dict], tokenizer, tools: list[dict] | None = None):
        _check_messages(messages)
        self.template, self.messages, self.tools = template, messages, tools or None
        self.plain = [template_message(message) for message in messages]
        self.special_tokens = tokenizer.special_tokens_map

    def upto(self, turns: int, add_generation_prompt: bool = False) -> str:
        """The first `turns` messages rendered, with the generation prompt after them if asked (see `render`)."""
        try:
            return compiled(self.template.jinja).render(
                messages=self.plain[:turns], tools=self.tools, documents=None,
                add_generation_prompt=add_generation_prompt, **self.special_tokens,
            )
        except jinja2.TemplateSyntaxError as err:
            raise ConfigError(f"chat template {self.template.name!r} is not valid Jinja: {err}") from None
        except (jinja2.TemplateError, TypeError) as err:  # TypeError: a template calling a string method on a list
            roles = "/".join(message["role"] for message in self.messages[:turns])
            raise DataError(
                f"chat template {self.template.name!r} cannot render a {roles} conversation: {err}",
                "fix the conversation, or pick a template that allows it with data.chat_template",
            ) from None


def compiled(jinja: str) -> jinja2.Template:
    """`jinja` compiled as transformers compiles chat templates (sandbox, trim_blocks, its filters), cached.

    `render` calls the compiled template with the context `apply_chat_template(..., tokenize=False)` builds, not
    through it: for ftune's canonical messages (plain JSON from `ftune.data.messages`) its per-call work (turning
    message objects into dicts twice, copying every value into plain types) cost three times the Jinja
    rendering, and labels render each learned turn twice. transformers has no public entry point below
    `apply_chat_template`, hence its private compiler (`ftune.compat.compile_chat_template`), whose cache
    `apply_chat_template` shares; `tests/data/test_templates.py` pins the result to `apply_chat_template`'s for
    every registry template.
    """
    return compile_chat_template(jinja)


def template_message(message: dict) -> dict:
    """A canonical message as `apply_chat_template` hands it to a template.

    Without ftune's own `train` flag and without None values, and with the reasoning also under `thinking`
    (transformers' alias, which gpt-oss templates read).
    """
    plain = {key: value for key, value in message.items() if key != "train" and value is not None}
    reasoning = plain.get("reasoning_content")
    return {"thinking": reasoning, **plain, "reasoning_content": reasoning} if reasoning is not None else plain


def _check_messages(messages: list[dict]) -> None:
    """Reject what every template would mis-render: transformers drops None values and templates guess."""
    if not isinstance(messages, list) or not messages:
        raise DataError("a conversation must be a non-empty list of messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise DataError(f"messages[{index}] must be a dict with a 'role' in {ROLES}, got {message!r}")
        if not isinstance(message.get("content"), str):
            raise DataError(f"messages[{index}] ({message['role']}) must have string 'content'")


def template_for_artefact(tokenizer, data_cfg) -> tuple[str, list[int]]:
    """The chat template a trained model must carry, and the token ids generation must stop at.

    A model learns the exact text it was trained on, so whatever template the run rendered with (a named one,
    or the tokenizer's own) has to travel with the weights: set as `tokenizer.chat_template` before
    `save_pretrained` (transformers writes it to chat_template.jinja, which inference servers read), and the
    ids as `generation_config.eos_token_id`, so that generation stops where training taught the model to.

    Example, data.chat_template=qwen3 on a base without a template, "<|im_end|>" id 1, EOS "<|endoftext|>" id 2:
        -> (the text of ftune/assets/chat_templates/qwen3.jinja, [1, 2])

    Args:
        tokenizer: the run's tokenizer.
        data_cfg: the run's `DataCfg` (its `chat_template`).

    Returns:
        (Jinja source, [end-of-turn id, then the tokenizer's EOS id when that is another token]).

    Raises:
        ConfigError: the template cannot be resolved for this tokenizer (as at the start of training).
    """
    template = resolve_template(data_cfg.chat_template, tokenizer)
    end_of_turn = tokenizer.convert_tokens_to_ids(template.end_of_turn)
    if end_of_turn is None or tokenizer.convert_ids_to_tokens(end_of_turn) != template.end_of_turn:
        raise ConfigError(f"chat template {template.name!r} ends turns with {template.end_of_turn!r}, which is no "
                          "single token of this tokenizer, so generation could not stop there",
                          f"add it with model.add_special_tokens=[{template.end_of_turn!r}], or pick the model "
                          "family's template")
    ids = [end_of_turn]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return template.jinja, ids


def _tokenizer_template(tokenizer) -> ChatTemplate:
    """Wrap the tokenizer's own template; its end-of-turn marker is read off a rendered probe."""
    try:
        jinja = tokenizer.get_chat_template()
    except ValueError:
        known = ", ".join(TEMPLATES)
        raise ConfigError(
            "data.chat_template=tokenizer, but the tokenizer has no chat template",
            f"set data.chat_template=<one of: {known}>",
        ) from None
    template = ChatTemplate(TOKENIZER_TEMPLATE, jinja, end_of_turn="")
    return dataclasses.replace(template, end_of_turn=_infer_end_of_turn(template, tokenizer))


def _infer_end_of_turn(template: ChatTemplate, tokenizer) -> str:
    """The first special or added token after the probe answer, with only whitespace in between.

    Whitespace may sit between the answer and its marker (Llama 2 renders "answer </s>"); anything else
    means the marker is not what the model emits right after answering, so we refuse to guess.
    """
    answer = _PROBE[-1]["content"]
    try:
        text = render(template, _PROBE, tokenizer)
    except DataError as err:
        raise ConfigError(
            f"the tokenizer's chat template cannot render a user/assistant probe: {err}"
        ) from None
    after = text[text.find(answer) + len(answer) :] if answer in text else ""
    candidates = {*tokenizer.added_tokens_encoder, tokenizer.eos_token} - {None}
    found = [(after.find(token), -len(token), token) for token in candidates if token in after]
    if found:
        start, _, token = min(found)
        if not after[:start].strip():
            return token
    known = ", ".join(TEMPLATES)
    raise ConfigError(
        "cannot infer the end-of-turn marker of the tokenizer's chat template: no special token follows a "
        "probe answer",
        f"set data.chat_template=<one of: {known}>",
    )


def _check_special_tokens(template: ChatTemplate, tokenizer) -> None:
    """A special token the tokenizer lacks renders as "" in Jinja, silently dropping BOS or EOS."""
    ast = jinja2.Environment().parse(template.jinja)
    guarded = {
        test.node.name
        for test in ast.find_all(jinja2.nodes.Test)
        if test.name == "defined" and isinstance(test.node, jinja2.nodes.Name)
    }
    needed = jinja2.meta.find_undeclared_variables(ast) - guarded
    for name in sorted(needed & {"bos_token", "eos_token"}):
        if getattr(tokenizer, name, None) is None:
            raise ConfigError(
                f"chat template {template.name!r} writes {name}, but the tokenizer has none",
                f"use the model family's own tokenizer, or set tokenizer.{name}",
            )
