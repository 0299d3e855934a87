"""Read data sources into records, and map each record of a known format to ftune's canonical shape.

Sources (`read_source`), tried in this order:
- a `.jsonl` file (one JSON object per line), `.json` (a list of objects; JSON Lines under a .json name are
  read as such), `.parquet` or `.csv` (a header line, then one record per row; every value is a string);
- a directory holding such files: all of them, directly inside it, in name order;
- a directory written by `datasets`' `save_to_disk` (a Dataset, or a DatasetDict as `DIR:SPLIT`), or any
  other directory `datasets.load_dataset` understands (e.g. a hub snapshot with `data/train-*.parquet`);
- a `datasets` hub id, `ID` or `ID:SPLIT` (default split `train`; slices such as `train[:90%]` work).

Text files (JSONL, JSON, CSV) are UTF-8, with or without a byte-order mark, with LF or CRLF line ends
(`text_lines`). Each record is located for error messages as `file:LINE` (JSONL and CSV, 1-based; a CSV header
is line 1) or `source[INDEX]` (a JSON list, Parquet, `datasets`: 0-based, as `records[INDEX]` reads it).

Formats (`FORMATS`: the fields that identify each one; `resolve_format` detects the first that fits):

    messages           {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", ...}], "tools": [...]}
    sharegpt           {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", ...}], "tools": "[...]"}
    alpaca             {"instruction": "Add", "input": "2 2", "output": "4"}
    prompt_completion  {"prompt": "2+2=", "completion": "4"}
    text               {"text": "A document for continued pre-training."}
    message_list       [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]

`to_canonical` maps the chat formats to `{"messages": [...]}` plus `"tools"` when there are any (see
`ftune.data.messages`: tool calls, tool results, reasoning, typed content parts, per-message `weight`/`train`;
at least one assistant turn, or nothing would be learned) and `text` to `{"text": ...}`. ShareGPT's
`function_call` and `observation` turns are the assistant's tool calls and the tool results. The statistics
name each source's format and what its conversations use (`record_features`).
A record that does not fit raises `RecordError`, naming where it is, the field and what was expected, with a
short `reason` under which `data.on_bad_record=skip` counts it. The user's files are only ever read.
"""

import codecs
import csv
import itertools
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from ftune.cache import file_signature
from ftune.compat import dataset_hash
from ftune.config.schema import DataCfg
from ftune.data.messages import (
    EMPTY_CONTENT,
    INVALID_RECORD,
    MISSING_FIELD,
    ROLE_NAMES,
    SHAREGPT_TOOL_ROLES,
    RecordError,
    conversation,
    features,
    show,
)
from ftune.errors import ConfigError, DataError, ResourceError

FORMATS: dict[str, tuple[str, ...]] = {
    "preference": ("prompt", "chosen", "rejected"),
    "implicit_preference": ("chosen", "rejected"),
    "unpaired_preference": ("prompt", "completion", "label"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "message_list": (),
}
"""Format name -> the fields a record of it must have (alpaca's `input` is optional); a `message_list` record is
a JSON list of messages rather than an object, so it has no fields and is detected by its type. Detection takes
the first that fits, so the preference formats come first: a pair may carry an extra `messages` column, and an
unpaired one has the fields of `prompt_completion` and a label."""

PREFERENCE_FORMATS = ("preference", "implicit_preference", "unpaired_preference")
"""The formats of preference data (`ftune.data.preference`): pairs for DPO and its family, unpaired rows for KTO."""

COLUMN_NAMES = tuple(sorted({name for fields in FORMATS.values() for name in fields} | {"input", "system", "tools"}))
"""The fields `data.columns` may map a source's columns to."""

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
PARQUET_BATCH = 1024
"""Parquet rows decoded to Python at a time."""

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
"""What a `datasets` hub id looks like (`name` or `org/name`); other missing paths are just missing."""

Record = tuple[str, object]
"""(where, record): a location such as `train.jsonl:3`, and the parsed value (or the RecordError it gave)."""


def read_source(source: str) -> list[Record]:
    r"""Every record of a file, directory or `datasets` source, located for error messages (`iter_source`, listed).

    Example, a JSONL file whose second line is broken:
        '{"text": "a"}\n{"text": \n' -> [("f.jsonl:1", {"text": "a"}), ("f.jsonl:2", RecordError(...))]
    """
    return list(iter_source(source))


def iter_source(source: str) -> Iterator[Record]:
    """Yield the records of a source one at a time, so that a large one is never held in memory whole.

    JSONL, CSV, Parquet and `datasets` sources are read lazily; a JSON list is parsed whole (JSON has no
    record boundary to stop at).

    Yields:
        (where, record) pairs; a line that is not JSON comes as its `RecordError`, so that
        `data.on_bad_record=skip` can count it and go on.

    Raises:
        ResourceError: the path does not exist and is no loadable hub id.
        DataError: a file cannot be read as its type, or the source holds no record at all.
    """
    path = Path(source)
    files = data_files(path) if path.is_dir() and not is_saved_dataset(path) else []
    if path.is_file():
        records = read_file(path)
    elif files:
        records = (record for file in files for record in read_file(file))
    else:
        records = read_dataset(source)
    empty = True
    for record in records:
        empty = False
        yield record
    if empty:
        raise DataError(f"{source}: no records", f"expected one record per line or row ({', '.join(FILE_SUFFIXES)})")


def data_files(directory: Path) -> list[Path]:
    """The data files directly inside `directory`, in name order (what a directory source reads)."""
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in FILE_SUFFIXES)


def is_saved_dataset(directory: Path) -> bool:
    """Whether `directory` was written by `datasets`' `save_to_disk` (its .json files are not data)."""
    return (directory / "dataset_info.json").is_file() or (directory / "dataset_dict.json").is_file()


def read_file(path: Path) -> Iterator[Record]:
    """The records of one file, read by its suffix.

    Raises:
        DataError: an unknown suffix, or a file that is not what its suffix says.
    """
    readers = {".jsonl": read_jsonl, ".json": read_json, ".parquet": read_parquet, ".csv": read_csv}
    if path.suffix not in readers:
        raise DataError(f"{path}: unknown data file type {path.suffix!r}", f"expected one of {', '.join(readers)}")
    return readers[path.suffix](path)


def read_text(path: Path) -> str:
    r"""The text of a UTF-8 file, without a byte-order mark and with every line ending as "\n" (`text_lines` joined).

    Example: b'\xef\xbb\xbf{"text": "a"}\r\n' -> '{"text": "a"}\n'
    """
    return "\n".join(text_lines(path))


def text_lines(path: Path) -> Iterator[str]:
    r"""The lines of a UTF-8 file, one at a time, without a byte-order mark or line ends.

    Every text format reads through here, so a file saved by Windows tools parses to the same records, with
    the same line numbers, as the plain one. CRLF and a lone CR end a line as Python's universal newlines
    make them; other separators (U+2028, form feed) stay, since JSON strings may hold them raw (so the file is
    split on bytes, not with str.splitlines).

    Example: b'\xef\xbb\xbf{"text": "a"}\r\nb' -> '{"text": "a"}', 'b'

    Raises:
        DataError: the file is not UTF-8, naming the first bad byte's offset in the file.
    """
    offset = 0
    with path.open("rb") as handle:
        for raw in handle:
            start = len(codecs.BOM_UTF8) if offset == 0 and raw.startswith(codecs.BOM_UTF8) else 0
            try:
                line = raw[start:].decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}: not UTF-8 text (byte {offset + start + err.start}: {err.reason})") from None
            offset += len(raw)
            yield from line.removesuffix("\n").removesuffix("\r").replace("\r\n", "\n").replace("\r", "\n").split("\n")


def read_jsonl(path: Path, lines: Iterable[str] | None = None) -> Iterator[Record]:
    """One record per non-blank line of `path` (or of its `lines`, as `text_lines` yields them, when already read).

    A line that is not JSON is kept as its RecordError (see `iter_source`).
    """
    for line_no, line in enumerate(text_lines(path) if lines is None else lines, start=1):
        if line.strip():
            yield f"{path}:{line_no}", parse_json_line(line, f"{path}:{line_no}")


def parse_json_line(line: str, where: str) -> object:
    """The JSON value of one line, or the RecordError that says why it is none."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        return RecordError(INVALID_RECORD, f"{where}: expected a JSON object, got invalid JSON ({err.msg} at column "
                                           f"{err.colno})")


def read_json(path: Path) -> Iterator[Record]:
    """A JSON list of records; a `.json` file that holds JSON Lines (as hub datasets often do) reads as JSONL.

    Raises:
        DataError: not valid JSON, or valid JSON that is not a list.
    """
    text = read_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":
            return read_jsonl(path, text.split("\n"))
        raise DataError(
            f"{path}:{err.lineno}: expected JSON, got invalid JSON ({err.msg} at column {err.colno})"
        ) from None
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of records, got a JSON {type(value).__name__}",
                        "or write one JSON object per line in a .jsonl file")
    return iter([(f"{path}[{index}]", record) for index, record in enumerate(value)])


def read_parquet(path: Path) -> Iterator[Record]:
    """The rows of a Parquet file as records (nested lists and structs become lists and dicts), a batch at a time.

    Raises:
        DataError: the file is not Parquet.
    """
    import pyarrow
    import pyarrow.parquet

    try:
        batches = pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH)
        index = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{path}[{index}]", row
                index += 1
    except (pyarrow.ArrowException, OSError) as err:
        raise DataError(f"{path}: cannot read as Parquet ({str(err).splitlines()[0]})") from None


def read_csv(path: Path) -> Iterator[Record]:
    r"""The rows of a CSV file with a header line, as records of strings located by line.

    Example: 'prompt,completion\n2+2=,4\n' -> [("f.csv:2", {"prompt": "2+2=", "completion": "4"})]

    Raises:
        DataError: the file is not valid CSV.
    """
    reader = csv.DictReader(line + "\n" for line in text_lines(path))
    try:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:  # more values than the header names
                columns = len(reader.fieldnames)
                row = RecordError(INVALID_RECORD, f"{where}: expected {columns} values (the header's columns), "
                                                  f"got {columns + len(row[None])}")
            yield where, row
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: cannot read as CSV ({err})") from None


def read_dataset(source: str) -> Iterator[Record]:
    """A `datasets` source: a `save_to_disk` directory, another dataset directory, or a hub id.

    `:SPLIT` after it picks a split (default train).

    Raises:
        ResourceError: no such path, or `datasets` cannot load it.
    """
    dataset, name = load_dataset_split(source)
    return ((f"{name}[{index}]", record) for index, record in enumerate(dataset))


def load_dataset_split(source: str):
    """The `datasets.Dataset` that `source` names, and its display name (`source` with the split)."""
    import datasets

    location, split = split_suffix(source)
    path = Path(location)
    if not path.exists() and (path.suffix in FILE_SUFFIXES or not HUB_ID.fullmatch(location)):
        raise ResourceError(f"{source}: no such file or directory", "check data.path, data.eval_path and data.mix")
    try:
        if is_saved_dataset(path):
            loaded = datasets.load_from_disk(location)
            dataset = loaded[split or "train"] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            dataset = datasets.load_dataset(location, split=split or "train")
    except Exception as err:  # datasets raises many types (FileNotFound, DatasetNotFound, ValueError, Hub errors)
        what = "cannot load it as a dataset" if path.exists() else "no such file or directory, nor a hub dataset"
        raise ResourceError(f"{source}: {what} ({str(err).splitlines()[0]})") from None
    return dataset, f"{location}:{split}" if split else location


def split_suffix(source: str) -> tuple[str, str | None]:
    """`ID:SPLIT` -> (ID, SPLIT); a source that exists as a path, or has no colon, has no split."""
    location, colon, split = source.rpartition(":")
    if Path(source).exists() or not colon:
        return source, None
    return location, split


def source_signature(source: str) -> dict:
    """What identifies a source's content for the cache.

    A file's signature; for a directory, that of every file under it; for a `datasets` source the fingerprint
    `datasets` gives the loaded dataset.
    """
    path = Path(source)
    if path.is_file():
        return file_signature(path)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file())
        return {"dir": str(path.resolve()), "files": [file_signature(f) for f in files]}
    dataset, name = load_dataset_split(source)
    return {"dataset": name, "fingerprint": dataset_hash(dataset)}


def rename_columns(records: Iterable[Record], columns: Mapping[str, str], source: str) -> Iterator[Record]:
    """The records with the columns `data.columns` maps read under their canonical names.

    Example, columns {"prompt": "input"}: ("f.jsonl:1", {"input": "Hi", "chosen": "a"})
        -> ("f.jsonl:1", {"prompt": "Hi", "chosen": "a"})

    Raises:
        ConfigError: a canonical name no format has, or a column the first record (object) lacks.
    """
    for name in columns:
        if name not in COLUMN_NAMES:
            raise ConfigError(f"data.columns.{name}: unknown field {name!r}",
                              f"expected one of {', '.join(COLUMN_NAMES)}")
    checked = not columns
    for where, record in records:
        if isinstance(record, dict) and columns:
            if not checked:
                check_columns(record, columns, where, source)
                checked = True
            renamed = {name: record[column] for name, column in columns.items() if column in record}
            mapped = {*columns, *columns.values()}
            record = {**{key: value for key, value in record.items() if key not in mapped}, **renamed}
        yield where, record


def check_columns(record: dict, columns: Mapping[str, str], where: str, source: str) -> None:
    """Refuse a `data.columns` entry that names no column of the first record: the mapping would do nothing."""
    for name, column in columns.items():
        if column not in record:
            raise ConfigError(f"data.columns.{name}={column}: {source} has no column {column!r} (the first record, "
                              f"{where}, has {sorted(record)})")


def read_records(source: str, cfg: DataCfg) -> Iterator[Record]:
    """The records of a source (`iter_source`) with the columns `data.columns` maps renamed (`rename_columns`)."""
    return rename_columns(iter_source(source), cfg.columns, source)


def resolve_format(records: Iterable[Record], source: str, fmt: str) -> str:
    """`fmt` (`data.format`), or with `auto` the format detected from the first record that is an object or a list.

    A list is a `message_list`; an object takes the first format in `FORMATS` whose fields it has.

    Example, fmt "auto": [("f.jsonl:1", {"instruction": "Add", "input": "", "output": "4"})] -> "alpaca"

    Raises:
        DataError: no record is an object or a list, or the first one has no format's fields.
    """
    if fmt != "auto":
        return fmt
    first = next(((where, r) for where, r in records if isinstance(r, dict | list)), None)
    if first is None:
        raise DataError(f"{source}: no record is a JSON object, so its format cannot be detected")
    where, record = first
    if isinstance(record, list):
        return "message_list"
    for name, fields in FORMATS.items():
        if fields and set(fields) <= set(record):
            return name
    if {"chosen", "rejected"} & set(record):  # one of the two: with both, implicit_preference fits
        missing = ({"chosen", "rejected"} - set(record)).pop()
        raise DataError(f"{where}: {missing}: missing (a preference pair needs chosen and rejected, after a prompt or "
                        f"as whole conversations; the record has {sorted(record)})")
    expected = "; ".join(f"{name} ({', '.join(fields)})" for name, fields in FORMATS.items() if fields)
    raise DataError(f"{where}: cannot tell the format from the fields {sorted(record)} (expected the fields of one "
                    f"of: {expected})", "rename the fields, or set data.format")


def to_canonical(record: object, fmt: str, where: str, roles: Mapping[str, str]) -> dict:
    r"""Map one record of format `fmt` to `{"messages": [...]}` (plus `"tools"`) or `{"text": ...}`, checking it.

    Examples:
        alpaca {"instruction": "Add", "input": "2 2", "output": "4"}
            -> {"messages": [{"role": "user", "content": "Add\n\n2 2"}, {"role": "assistant", "content": "4"}]}
        alpaca {"instruction": "Say hi", "input": "", "output": "Hi"}
            -> {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi"}]}
        prompt_completion {"prompt": "2+2=", "completion": "4"}
            -> {"messages": [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]}
        sharegpt {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
            -> {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
        message_list [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
            -> {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}

    Args:
        record: the parsed record (a RecordError from `read_source` is raised as it is).
        fmt: a key of `FORMATS`.
        where: the record's location, for messages.
        roles: ShareGPT `from` names -> ftune roles (`data.roles`; `function_call` and `observation` are known).

    Returns:
        The canonical record; messages keep only what `ftune.data.messages` describes.

    Raises:
        RecordError: the record lacks a field of its format, or a field is not what it must be.
    """
    if isinstance(record, RecordError):
        raise record
    if fmt == "message_list":
        if not isinstance(record, list):
            raise RecordError(INVALID_RECORD, f"{where}: expected a JSON list of messages, got a "
                                              f"{type(record).__name__}")
        return conversation(record, where, "record", ("role", "content"), ROLE_NAMES)
    require_fields(record, fmt, where)
    if fmt == "text":
        return {"text": string_field(record, "text", where)}
    if fmt == "messages":
        return conversation(record["messages"], where, "messages", ("role", "content"), ROLE_NAMES, record)
    if fmt == "sharegpt":
        return conversation(record["conversations"], where, "conversations", ("from", "value"),
                            {**roles, **{k: v for k, v in SHAREGPT_TOOL_ROLES.items() if k not in roles}}, record)
    prompt = alpaca_prompt(record, where) if fmt == "alpaca" else string_field(record, "prompt", where)
    answer = string_field(record, "output" if fmt == "alpaca" else "completion", where)
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def require_fields(record: object, fmt: str, where: str) -> None:
    """Refuse a record that is no JSON object, or lacks a field of its format.

    Raises:
        RecordError: naming the first missing field, what the format needs and what the record has.
    """
    if not isinstance(record, dict):
        raise RecordError(INVALID_RECORD, f"{where}: expected a JSON object, got a {type(record).__name__}")
    for name in FORMATS[fmt]:
        if name not in record:
            raise RecordError(MISSING_FIELD, f"{where}: {name}: missing (format {fmt} needs "
                                             f"{', '.join(FORMATS[fmt])}; the record has {sorted(record)})")


def record_features(record: object, fmt: str, canonical: dict) -> set[str]:
    """What a conversation uses beyond plain turns (tools, tool calls, reasoning, weights, typed parts).

    Example: messages {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}, ...]}
        -> {"typed parts"}
    """
    turns = record if fmt == "message_list" else record.get({"messages": "messages", "sharegpt": "conversations"}
                                                             .get(fmt, ""), [])
    content_key = "value" if fmt == "sharegpt" else "content"
    typed = any(isinstance(turn, dict) and isinstance(turn.get(content_key), list) for turn in turns)
    return features(canonical) | ({"typed parts"} if typed else set())


def alpaca_prompt(record: dict, where: str) -> str:
    """The user turn of an Alpaca record: the instruction, then a blank line and the input when there is one."""
    instruction, extra = string_field(record, "instruction", where), record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RecordError(EMPTY_CONTENT, f"{where}: input: expected a string (or no input), got {show(extra)}")
    return instruction + "\n\n" + extra if extra and extra.strip() else instruction


def string_field(record: dict, name: str, where: str) -> str:
    """`record[name]`, which must be a string with some non-blank text."""
    value = record[name]
    if not isinstance(value, str) or not value.strip():
        raise RecordError(EMPTY_CONTENT, f"{where}: {name}: expected a non-empty string, got {show(value)}")
    return value


def load_conversations(path: str, cfg: DataCfg | None = None) -> Iterator[tuple[str, list[dict]]]:
    """Yield (where, messages) for each record of a chat source (any format but `text`), stopping at a bad one.

    Args:
        path: a source as `read_source` takes it.
        cfg: `format` and `roles` are read from it; DataCfg's defaults (auto-detection) when None.

    Raises:
        DataError: the source is a `text` source, or a record does not fit its format.
    """
    cfg = cfg or DataCfg()
    records, first = itertools.tee(read_records(path, cfg))
    fmt = resolve_format(first, path, cfg.format)
    del first  # tee keeps what one copy read ahead of the other only while both exist
    if fmt == "text":
        raise DataError(f"{path}: expected conversations, got format text", "give a chat data set")
    for where, record in records:
        yield where, to_canonical(record, fmt, where, cfg.roles)["messages"]


def load_texts(path: str) -> Iterator[tuple[str, str]]:
    """Yield (where, text) for each record of a `text` source (continued pre-training, probes).

    Raises:
        DataError: a record has no non-empty string field `text`.
    """
    for where, record in iter_source(path):
        yield where, to_canonical(record, "text", where, ROLE_NAMES)["text"]
