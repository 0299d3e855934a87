r"""Preference data: pairs (DPO and its family) and unpaired rows (KTO), from records to cached token ids.

Shapes (`ftune.data.formats.FORMATS`; `data.format=auto` detects them, `data.columns` maps other column names):

    preference           {"prompt": "Put this in the past: ..." or [messages, a system turn included],
                          "chosen": "Tom went home." or [{"role": "assistant", "content": "Tom went home."}],
                          "rejected": "Tom goes home." or [...]}
    implicit_preference  {"chosen": [user, assistant], "rejected": [user, other assistant]}: whole conversations
                         that share every message but the last, an assistant turn (the prompt is what they share)
    unpaired_preference  {"prompt": ..., "completion": ..., "label": true}     (KTO)

Other columns are ignored (scores, ids, a `messages` column); a `system` column opens the prompt unless a system
turn does, and `tools` (schemas) are rendered into the prompt. A response is one assistant message.

Tokens. The prompt is rendered with the chat template and its generation prompt, and tokenized once. A response's
ids are what the tokenization of the whole conversation (the prompt's messages and that response, rendered and
tokenized as one text) gives after the prompt's ids, through the end-of-turn marker the template writes after an
assistant turn: the model learns to stop. That span is found by the labelling code SFT uses
(`ftune.data.labels`, which also checks that the tokens decode to the response), so nothing is tokenized apart
and glued: no BOS or EOS is ever doubled. A pair whose whole tokenization does not start with the prompt's ids
(the tokenizer merges the prompt's end into the response) is refused with that reason.

    ChatML, prompt "Hi", chosen "Hello":
        whole text  <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n
        prompt_ids  the tokens of everything up to and including "assistant\n" (the generation prompt)
        chosen_ids  the tokens of "Hello<|im_end|>"; the "\n" after the marker is never generated, so not learned

Truncation keeps the responses: a prompt longer than `data.max_prompt_length`, or than what `data.max_length`
leaves beside the longest response, is cut from the left (a leading BOS stays); a pair whose longest response
does not fit `data.max_length` beside one prompt token is dropped and counted, never trained on. So are pairs with
an empty response, or with chosen identical to rejected (a few ties are normal in real data). Records that do not
fit their format are refused or skipped as `data.on_bad_record` says, as for SFT.

Records are tokenized in `data.num_proc` workers; rows are written as they come and served memory-mapped from the
data cache (`ftune.cache`), keyed as SFT rows are.
"""

import dataclasses
import json
from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import DataLoader

from ftune.atomic import atomic_dir
from ftune.cache import cache_dir, fingerprint
from ftune.config.schema import DataCfg, DataSourceCfg
from ftune.data.batches import DECODE_CHECK_EVERY, UNRENDERABLE, numbered_batches
from ftune.data.collate import KtoCollator, PairCollator
from ftune.data.formats import (
    FORMATS,
    PREFERENCE_FORMATS,
    Record,
    RecordError,
    read_records,
    require_fields,
    resolve_format,
)
from ftune.data.labels import learned_runs, tokenize_conversation
from ftune.data.messages import (
    EMPTY_CONTENT,
    MISSING_FIELD,
    ROLE_NAMES,
    canonical_message,
    features,
    show,
    tools_list,
    with_system,
)
from ftune.data.pipeline import (
    STATS_FILE,
    private_generator,
    report_skipped,
    say,
    skip_record,
    split_fingerprint,
    write_about,
)
from ftune.data.sampler import LengthGroupedSampler
from ftune.data.store import RowWriter, read_rows
from ftune.data.templates import ChatTemplate, render, resolve_template
from ftune.data.workers import map_ordered, resolve_num_proc
from ftune.errors import ConfigError, DataError

PAIRED_FORMATS = ("preference", "implicit_preference")
OBJECTIVE_FORMATS = {"dpo": PAIRED_FORMATS, "kto": ("unpaired_preference",)}
"""The preference formats each preference objective trains on (`objective.name`)."""

PAIRED = ("chosen", "rejected")
UNPAIRED = ("completion",)
"""The responses of a pair, and of an unpaired (KTO) row; each becomes `<name>_ids` in the rows."""

MESSAGE_KEYS = ("role", "content")

EMPTY_RESPONSE = "empty response"
IDENTICAL = "chosen identical to rejected"
RESPONSE_TOO_LONG = "a response longer than data.max_length allows"
"""Reasons a well-formed pair is dropped (counted, never trained on, whatever data.on_bad_record says)."""

BOUNDARY_MERGE = "prompt and response tokens merge"
DIFFERENT_PROMPTS = "chosen and rejected differ before the last turn"
BAD_RESPONSE = "bad response"
BAD_PROMPT = "bad prompt"
BAD_LABEL = "bad label"
"""Reasons a record is refused (or skipped and counted with data.on_bad_record=skip)."""


@dataclass
class PairStats:
    """What happened to the records of a preference split: `read` = `kept` + the sum of `dropped`."""

    read: int = 0
    kept: int = 0
    """Pairs (or unpaired rows) trained on."""
    truncated: int = 0
    """Kept pairs whose prompt was cut from the left."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Reason -> records: empty response, chosen identical to rejected, response too long, bad records (skip)."""
    prompt_tokens: int = 0
    response_tokens: int = 0
    """Tokens of the kept rows' prompts (counted once) and responses (all of them learned)."""
    sources: list[dict] = field(default_factory=list)
    """Per source: `path`, `format`, `features` (message lists, system, tools, ...), `pairs` kept."""

    def drop(self, reason: str, count: int = 1) -> None:
        if count:
            self.dropped[reason] = self.dropped.get(reason, 0) + count


@dataclass
class PairRows:
    """The rows of a preference split, memory-mapped, with each row's longest sequence (prompt + longest response).

    A row comes with its index, `row` (plus `first_row`: held-out rows follow the training ones), by which a
    precomputed reference looks up its log-probs; `key` names the cache entry, i.e. the tokenized rows.
    """

    rows: object
    lengths: np.ndarray
    from_cache: bool = False
    key: str = ""
    first_row: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index] | {"row": self.first_row + index}

    def __iter__(self):
        return iter(self.rows)


def responses_of(fmt: str) -> tuple[str, ...]:
    """The response fields of a preference format: chosen and rejected, or the unpaired completion."""
    return UNPAIRED if fmt == "unpaired_preference" else PAIRED


def to_preference(record: object, fmt: str, where: str) -> dict:
    """Map a preference record to `{"prompt": [messages], <response>: message or None, ..., "tools": [...]}`.

    Unpaired rows also get `label`. A response is one canonical assistant message, or None when it is empty (the
    pair is then dropped and counted, not refused).

    Examples:
        preference {"prompt": "2+2=", "chosen": "4", "rejected": "5", "score": 0.9}
            -> {"prompt": [{"role": "user", "content": "2+2="}], "chosen": {"role": "assistant", "content": "4"},
                "rejected": {"role": "assistant", "content": "5"}, "tools": []}
        implicit_preference {"chosen": [user "2+2=", assistant "4"], "rejected": [user "2+2=", assistant "5"]}
            -> the same

    Raises:
        RecordError: a missing field, a malformed message, a prompt ending with an assistant turn, a response that
            is not one assistant message, conversations that differ before their last turn, a label not a bool.
    """
    if isinstance(record, RecordError):
        raise record
    require_fields(record, fmt, where)
    if fmt == "implicit_preference":
        prompt, responses = implicit_prompt(record, where)
    else:
        prompt = prompt_messages(record["prompt"], f"{where}: prompt")
        responses = {name: explicit_response(record[name], f"{where}: {name}") for name in responses_of(fmt)}
    canonical = {"prompt": with_system(prompt, record, where), **responses,
                 "tools": tools_list(record.get("tools"), f"{where}: tools")}
    if fmt == "unpaired_preference":
        canonical["label"] = label_value(record["label"], f"{where}: label")
    return canonical


def prompt_messages(value: object, at: str) -> list[dict]:
    """The prompt's messages: a string is one user turn; a list of messages must not end with an assistant turn."""
    if isinstance(value, str):
        if not value.strip():
            raise RecordError(EMPTY_CONTENT, f"{at}: expected a non-empty string or a list of messages, got "
                                             f"{show(value)}")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise RecordError(MISSING_FIELD, f"{at}: expected a non-empty string or a list of messages, got {show(value)}")
    return checked_prompt([canonical_message(turn, f"{at}[{index}]", MESSAGE_KEYS, ROLE_NAMES, "prompt")
                           for index, turn in enumerate(value)], at)


def checked_prompt(messages: list[dict], at: str) -> list[dict]:
    """Refuse a prompt that ends with an assistant turn: the response would follow another answer, not a request."""
    if messages[-1]["role"] == "assistant":
        raise RecordError(BAD_PROMPT, f"{at}: ends with an assistant turn (expected a user or tool turn last; the "
                                      "responses are the assistant turn that follows)")
    return [{key: value for key, value in message.items() if key != "train"} for message in messages]


def explicit_response(value: object, at: str) -> dict | None:
    """A response given as a string, or as a list of one assistant message."""
    if isinstance(value, str):
        return response_message({"role": "assistant", "content": value}, at)
    if not isinstance(value, list) or len(value) != 1:
        raise RecordError(BAD_RESPONSE, f"{at}: expected a string or a list of one assistant message, got "
                                        f"{show(value)}")
    return response_message(value[0], f"{at}[0]")


def response_message(turn: object, at: str) -> dict | None:
    """One response as a canonical assistant message; None when it has no content, reasoning or tool call."""
    if isinstance(turn, dict) and is_blank(turn):
        return None
    message = canonical_message(turn, at, MESSAGE_KEYS, ROLE_NAMES, "response")
    if message["role"] != "assistant":
        raise RecordError(BAD_RESPONSE, f"{at}.role: expected assistant (a response), got {message['role']!r}")
    message.pop("train", None)
    return message


def is_blank(turn: dict) -> bool:
    """Whether a message says nothing: no content (None, blank text, no parts), no tool call, no reasoning."""
    content = turn.get("content")
    blank = content is None or content == [] or (isinstance(content, str) and not content.strip())
    return blank and not any(turn.get(key) for key in ("tool_calls", "reasoning_content", "reasoning"))


def implicit_prompt(record: dict, where: str) -> tuple[list[dict], dict]:
    """The shared prompt and the two responses of an implicit pair (two whole conversations).

    Raises:
        RecordError: the conversations differ before their last turn, naming the first message that differs.
    """
    (chosen_prompt, chosen), (rejected_prompt, rejected) = (
        split_last_turn(record[name], f"{where}: {name}") for name in PAIRED)
    if chosen_prompt != rejected_prompt:
        index = next((i for i, (a, b) in enumerate(zip(chosen_prompt, rejected_prompt, strict=False)) if a != b),
                     min(len(chosen_prompt), len(rejected_prompt)))
        raise RecordError(DIFFERENT_PROMPTS, f"{where}: chosen and rejected differ at message {index}, before their "
                                             "last assistant turn (an implicit prompt is every message but the last, "
                                             "the same in both)", "give the shared turns as a prompt column")
    return chosen_prompt, {"chosen": chosen, "rejected": rejected}


def split_last_turn(turns: object, at: str) -> tuple[list[dict], dict | None]:
    """A whole conversation as (every message but the last, the last: the response)."""
    if not isinstance(turns, list) or len(turns) < 2:
        raise RecordError(BAD_RESPONSE, f"{at}: expected a conversation (a list of messages ending with the "
                                        f"assistant's answer), got {show(turns)}")
    prompt = [canonical_message(turn, f"{at}[{index}]", MESSAGE_KEYS, ROLE_NAMES, "conversation")
              for index, turn in enumerate(turns[:-1])]
    return checked_prompt(prompt, at), response_message(turns[-1], f"{at}[{len(turns) - 1}]")


def label_value(value: object, at: str) -> bool:
    """An unpaired row's label: true (a desirable completion) or false."""
    if not isinstance(value, bool):
        raise RecordError(BAD_LABEL, f"{at}: expected true or false, got {show(value)}")
    return value


def pair_features(record: dict, canonical: dict) -> set[str]:
    """What the statistics say a source's records use: message lists, a system prompt, tools, tool calls, reasoning.

    Example: {"prompt": [system, user], "chosen": [assistant], ...} -> {"message lists", "system"}
    """
    responses = [canonical[name] for name in (*PAIRED, *UNPAIRED) if canonical.get(name)]
    found = features({"messages": [*canonical["prompt"], *responses], "tools": canonical["tools"]})
    if any(isinstance(record.get(name), list) for name in ("prompt", *PAIRED, *UNPAIRED)):
        found.add("message lists")
    if canonical["prompt"][0]["role"] == "system":
        found.add("system")
    return found


def tokenize_pair(canonical: dict, names: tuple[str, ...], where: str, tokenizer, template: ChatTemplate,
                  decode_check: bool = True) -> tuple[list[int], dict[str, list[int]]]:
    """The prompt's ids and each response's ids (see the module docstring), untruncated.

    Raises:
        RecordError: the template cannot render the conversation, or the whole tokenization does not start with
            the prompt's ids (a boundary merge).
    """
    prompt, tools = canonical["prompt"], canonical["tools"] or None
    try:
        text = render(template, prompt, tokenizer, add_generation_prompt=True, tools=tools)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        responses = {name: response_ids([*prompt, canonical[name]], prompt_ids, tools, tokenizer, template,
                                        decode_check) for name in names}
    except RecordError:
        raise
    except DataError as err:
        raise RecordError(UNRENDERABLE, f"{where}: {err.message}", err.hint) from None
    for name, ids in responses.items():
        if ids is None:
            raise RecordError(BOUNDARY_MERGE, f"{where}: {name}: the tokens of the whole conversation do not start "
                                              f"with the prompt's {len(prompt_ids)} tokens: the tokenizer merges the "
                                              "end of the prompt into the response",
                              "use a template whose generation prompt ends with a special token or a newline")
    return prompt_ids, responses


def response_ids(messages: list[dict], prompt_ids: list[int], tools: list[dict] | None, tokenizer,
                 template: ChatTemplate, decode_check: bool) -> list[int] | None:
    """The ids the whole conversation's tokenization gives after `prompt_ids`, through the end-of-turn marker.

    The conversation ends with the response; its learned tokens (`tokenize_conversation`, the last assistant turn)
    are the response. None when the tokens before them are not exactly `prompt_ids`.
    """
    [example] = tokenize_conversation(messages, tokenizer, template, "last_assistant", tools, True, decode_check)
    [(start, end)] = learned_runs(example.labels)
    if example.input_ids[:start] != prompt_ids:
        return None
    return example.input_ids[start:end]


def fit_prompt(prompt_ids: list[int], longest: int, cfg: DataCfg, bos_id: int | None) -> list[int] | None:
    """The prompt cut from the left to what the longest response leaves; None when that response does not fit.

    The room is `max_length - longest`, at most `max_prompt_length` (when set); at least one prompt token must
    remain. A BOS that opens the prompt is kept: models expect it at the first position.

    Example, max_length 6, BOS B: prompt [B, 1, 2, 3, 4], longest 3 -> room 3 -> [B, 3, 4]; longest 6 -> None
    """
    room = cfg.max_length - longest
    if cfg.max_prompt_length:
        room = min(room, cfg.max_prompt_length)
    if room < 1:
        return None
    if len(prompt_ids) <= room:
        return prompt_ids
    if bos_id is not None and prompt_ids[0] == bos_id and room > 1:
        return [bos_id, *prompt_ids[len(prompt_ids) - room + 1 :]]
    return prompt_ids[len(prompt_ids) - room :]


@dataclass(frozen=True)
class PairContext:
    """What every batch of a source needs; handed to each worker once."""

    tokenizer: object
    template: ChatTemplate
    cfg: DataCfg
    fmt: str


@dataclass
class Outcome:
    """What became of one record: a row (maybe with its prompt truncated), a drop reason, or the error it gave."""

    row: dict | None = None
    truncated: bool = False
    dropped: str | None = None
    error: RecordError | None = None


@dataclass
class PairBatch:
    outcomes: list[Outcome] = field(default_factory=list)
    features: set[str] = field(default_factory=set)


def tokenize_pair_batch(context: PairContext, numbered: tuple[int, list[Record]]) -> PairBatch:
    """The outcome of each record of a batch, in order (what a worker computes)."""
    start, records = numbered
    batch = PairBatch()
    for position, (where, record) in enumerate(records):
        decode = context.cfg.check_labels == "all" or (start + position) % DECODE_CHECK_EVERY == 0
        try:
            canonical = to_preference(record, context.fmt, where)
            batch.features |= pair_features(record, canonical)
            batch.outcomes.append(pair_outcome(canonical, where, context, decode))
        except RecordError as err:
            batch.outcomes.append(Outcome(error=err))
    return batch


def pair_outcome(canonical: dict, where: str, context: PairContext, decode_check: bool) -> Outcome:
    """The row of a canonical pair, or why it is dropped (empty response, identical responses, too long)."""
    names = responses_of(context.fmt)
    if any(canonical[name] is None for name in names):
        return Outcome(dropped=EMPTY_RESPONSE)
    prompt_ids, responses = tokenize_pair(canonical, names, where, context.tokenizer, context.template, decode_check)
    if names == PAIRED and responses["chosen"] == responses["rejected"]:
        return Outcome(dropped=IDENTICAL)
    fitted = fit_prompt(prompt_ids, max(map(len, responses.values())), context.cfg, context.tokenizer.bos_token_id)
    if fitted is None:
        return Outcome(dropped=RESPONSE_TOO_LONG)
    row = {"prompt_ids": fitted, **{f"{name}_ids": ids for name, ids in responses.items()}}
    if "label" in canonical:
        row["label"] = canonical["label"]
    return Outcome(row=row, truncated=len(fitted) < len(prompt_ids))


def preference_format(path: str, cfg: DataCfg, formats: tuple[str, ...]) -> str:
    """The format of a preference source (its first record's, with `data.format=auto`), one of `formats`.

    Checked before the cache is looked up: the cached rows of the same file serve any objective, so a hit must not
    let DPO read unpaired rows or KTO read pairs.

    Raises:
        DataError: the source is in none of `formats`.
    """
    fmt = resolve_format(read_records(path, cfg), path, cfg.format)
    if fmt not in formats:
        fields = "; ".join(f"{name} ({', '.join(FORMATS[name])})" for name in formats)
        raise DataError(f"{path}: format {fmt} is not the preference data this objective trains on (expected the "
                        f"fields of: {fields})", "map other column names with data.columns")
    return fmt


def tokenize_preference_source(path: str, tokenizer, template: ChatTemplate, cfg: DataCfg, writer: RowWriter,
                               fmt: str) -> PairStats:
    """Tokenize every record of a preference source (in format `fmt`) into `writer`, counting what is dropped and why.

    Raises:
        DataError: a bad record (with `on_bad_record=error`), or no pair left.
        ConfigError: a `data.columns` entry names no column of the first record.
    """
    records = read_records(path, cfg)
    if cfg.format == "auto":
        say(f"data: {path}: format {fmt} (detected from its first record)")
    context = PairContext(tokenizer, template, cfg, fmt)
    stats, first_errors, shape = PairStats(), {}, set()
    for batch in map_ordered(tokenize_pair_batch, context, numbered_batches(records), resolve_num_proc(cfg.num_proc)):
        rows = [keep_outcome(outcome, cfg, stats, first_errors) for outcome in batch.outcomes]
        kept = [row for row in rows if row is not None]
        writer.write(kept, [row_length(row) for row in kept])
        shape |= batch.features
    report_skipped(path, stats, first_errors)
    if not stats.kept:
        raise DataError(f"{path}: no pair left to train on (read {stats.read}, dropped: {stats.dropped})")
    stats.sources.append({"path": path, "format": fmt, "features": sorted(shape), "pairs": stats.kept})
    return stats


def keep_outcome(outcome: Outcome, cfg: DataCfg, stats: PairStats, first_errors: dict) -> dict | None:
    """Count one record's outcome; its row when it is kept."""
    stats.read += 1
    if outcome.error is not None:
        skip_record(outcome.error, cfg, stats, first_errors)
        return None
    if outcome.dropped is not None:
        stats.drop(outcome.dropped)
        return None
    stats.kept += 1
    stats.truncated += outcome.truncated
    stats.prompt_tokens += len(outcome.row["prompt_ids"])
    stats.response_tokens += sum(len(ids) for key, ids in outcome.row.items() if key.endswith("_ids")
                                 and key != "prompt_ids")
    return outcome.row


def row_length(row: dict) -> int:
    """The longest sequence a row makes: its prompt and its longest response."""
    return len(row["prompt_ids"]) + max(len(ids) for key, ids in row.items() if key.endswith("_ids")
                                        and key != "prompt_ids")


def check_preference_settings(cfg: DataCfg) -> None:
    """Refuse data settings that preference data does not support, naming each (before anything is read).

    Raises:
        ConfigError: packing, streaming, data.mix or data.dedup set.
    """
    refused = {"data.packing=true": cfg.packing, "data.streaming=true": cfg.streaming, "data.mix": bool(cfg.mix),
               f"data.dedup={cfg.dedup}": cfg.dedup != "none"}
    for setting, is_set in refused.items():
        if is_set:
            raise ConfigError(f"{setting}: not supported for preference data (each pair is one padded row pair, "
                              "from data.path)", f"leave {setting.split('=')[0]} unset")


def preference_path(cfg: DataCfg, split: str) -> str:
    """The source of a split: `data.path` for train, `data.eval_path` for eval."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be train or eval, got {split!r}")
    path = cfg.path if split == "train" else cfg.eval_path
    if path is None:
        raise ConfigError("data.eval_path is null, so there are no held-out pairs", "set data.eval_path")
    return path


def build_preference_split(cfg: DataCfg, tokenizer, template: ChatTemplate | None = None, split: str = "train",
                           formats: tuple[str, ...] = PREFERENCE_FORMATS) -> tuple[PairRows, PairStats]:
    """The rows of the train (`data.path`) or eval (`data.eval_path`) split of preference data, and their story.

    Each row has `prompt_ids`, `chosen_ids`, `rejected_ids` (or, unpaired, `prompt_ids`, `completion_ids`,
    `label`). Served from the cache when the source, the code, the tokenizer, the template and every data
    setting that shapes the rows are unchanged; otherwise built into a staging directory and published whole
    (`ftune.atomic.atomic_dir`), so a refused source leaves nothing behind.

    Args:
        cfg: the data settings.
        tokenizer: a fast tokenizer.
        template: the resolved chat template; None resolves `data.chat_template` for `tokenizer`.
        split: "train" or "eval".
        formats: the formats accepted (`OBJECTIVE_FORMATS[objective.name]`: pairs for DPO, unpaired rows for KTO).

    Raises:
        ConfigError: an unsupported setting, a `data.columns` entry naming no column, no eval path.
        DataError: not in one of `formats`, a bad record (`on_bad_record=error`), or no pair left.
    """
    check_preference_settings(cfg)
    path = preference_path(cfg, split)
    template = template or resolve_template(cfg.chat_template, tokenizer)
    fmt = preference_format(path, cfg, formats)
    source = DataSourceCfg(path, 1.0, cfg.format)
    # the eval set is in SFT's key for its overlap check, which pairs do not have (data.dedup is refused)
    source_key = split_fingerprint([source], tokenizer, dataclasses.replace(cfg, eval_path=None), seed=0)
    entry = cache_dir("data") / fingerprint("pairs", source_key, template.jinja, template.end_of_turn)
    from_cache = (entry / STATS_FILE).is_file()
    if not from_cache:
        with atomic_dir(entry, replace=False) as staging:
            writer = RowWriter(staging)
            try:
                stats = tokenize_preference_source(path, tokenizer, template, cfg, writer, fmt)
            finally:
                writer.close()
            write_about(staging, [source], tokenizer, cfg, stats.kept,
                        stats.prompt_tokens + stats.response_tokens)
            (staging / STATS_FILE).write_text(json.dumps(dataclasses.asdict(stats)), encoding="utf-8")
    stats = PairStats(**json.loads((entry / STATS_FILE).read_text(encoding="utf-8")))
    rows, lengths = read_rows(entry)
    return PairRows(rows, lengths, from_cache, key=entry.name), stats


def build_preference_loader(rows, batch_size: int, pad_id: int, shuffle: bool, seed: int = 0,
                            group_by_length: bool = False, pad_to_multiple_of: int = 1,
                            workers: int = 0, collate: PairCollator | None = None) -> DataLoader:
    """Batches of pairs (`PairCollator`) or of unpaired rows (`KtoCollator`), as SFT's `build_loader` makes them.

    Args:
        rows: `PairRows`, or any list of row dicts (rows built by hand).
        batch_size: pairs (or unpaired rows) per batch.
        pad_id: the tokenizer's pad token id.
        shuffle: draw rows in random order (each iteration of the loader, by its own generator).
        seed: seeds the length-grouped order.
        group_by_length: draw rows of similar length together (shuffled within windows of 50 batches).
        pad_to_multiple_of: padded widths are rounded up to this (`ftune.data.collate.pad_multiple`).
        workers: DataLoader worker processes.
        collate: the collator to use (DPO's, whose layout the objective sets once the model is loaded); None
            makes one for the rows (pairs in two rows each, or unpaired rows).
    """
    unpaired = "completion_ids" in rows[0]
    collate = collate or (KtoCollator if unpaired else PairCollator)(pad_id, pad_to_multiple_of)
    sampler = None
    if shuffle and group_by_length:
        lengths = rows.lengths if isinstance(rows, PairRows) else np.array([row_length(row) for row in rows])
        sampler, shuffle = LengthGroupedSampler(lengths, batch_size, seed), False
    return DataLoader(rows, batch_size=batch_size, shuffle=shuffle, sampler=sampler, collate_fn=collate,
                      num_workers=workers, generator=private_generator())
