"""Sources and formats: every record format maps to exact messages or text; every bad input is one exact line.

Records are written by hand; the expected canonical records and error messages are literal.
"""

import json
from pathlib import Path

import datasets
import pyarrow
import pyarrow.parquet
import pytest

from ftune.config.schema import DataCfg
from ftune.data.formats import (
    FORMATS,
    RecordError,
    load_conversations,
    load_texts,
    read_records,
    read_source,
    resolve_format,
    source_signature,
    to_canonical,
)
from ftune.errors import ConfigError, DataError, ResourceError

HI_HELLO = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
ROLES = DataCfg().roles


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def canonical(record: dict, fmt: str = "auto", roles=ROLES) -> dict:
    """The canonical form of one record, its format detected as training detects it."""
    records = [("f.jsonl:1", record)]
    return to_canonical(record, resolve_format(records, "f.jsonl", fmt), "f.jsonl:1", roles)


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "name": "x"}]},
         {"messages": HI_HELLO}),
        ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
         {"messages": HI_HELLO}),
        ({"instruction": "Add", "input": "2 2", "output": "4"},
         {"messages": [{"role": "user", "content": "Add\n\n2 2"}, {"role": "assistant", "content": "4"}]}),
        ({"instruction": "Hi", "input": "", "output": "Hello"}, {"messages": HI_HELLO}),
        ({"instruction": "Hi", "output": "Hello"}, {"messages": HI_HELLO}),
        ({"instruction": "Hi", "input": None, "output": "Hello"}, {"messages": HI_HELLO}),
        ({"prompt": "Hi", "completion": "Hello"}, {"messages": HI_HELLO}),
        ({"text": "one two"}, {"text": "one two"}),
    ],
)
def test_each_format_is_detected_and_mapped_exactly(record, expected):
    assert canonical(record) == expected


def test_the_config_offers_exactly_the_formats_there_are():
    from dataclasses import fields

    from ftune.config.validate import allowed_values

    assert allowed_values(next(f for f in fields(DataCfg) if f.name == "format")) == ("auto", *FORMATS)


def test_detection_names_the_format_and_an_explicit_format_wins():
    first = {"text": "a", "prompt": "b", "completion": "c"}
    records = [("f.jsonl:1", RecordError("x", "bad line")), ("f.jsonl:2", first)]
    assert resolve_format(records, "f.jsonl", "auto") == "prompt_completion"  # first in FORMATS order
    assert resolve_format(records, "f.jsonl", "text") == "text"


def test_undetectable_format_names_the_record_and_the_expected_fields():
    with pytest.raises(DataError) as err:
        resolve_format([("f.jsonl:1", {"question": "Hi"})], "f.jsonl", "auto")
    assert err.value.one_line() == (
        "f.jsonl:1: cannot tell the format from the fields ['question'] (expected the fields of one of: "
        "preference (prompt, chosen, rejected); implicit_preference (chosen, rejected); unpaired_preference (prompt, "
        "completion, label); messages (messages); sharegpt (conversations); alpaca (instruction, output); "
        "prompt_completion (prompt, completion); text (text)) (rename the fields, or set data.format)"
    )


def test_sharegpt_roles_are_mapped_by_config():
    record = {"conversations": [{"from": "bot_user", "value": "Hi"}, {"from": "bot", "value": "Hello"}]}
    assert canonical(record, roles={"bot_user": "user", "bot": "assistant"}) == {"messages": HI_HELLO}
    with pytest.raises(ConfigError, match=r"^data.roles.bot='robot': expected one of system, user, assistant, tool"):
        canonical(record, roles={"bot_user": "user", "bot": "robot"})


@pytest.mark.parametrize(
    ("record", "reason", "message"),
    [
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
         "empty or non-string content", "f.jsonl:1: messages[1].content: expected a non-empty string, got ''"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 4}]},
         "empty or non-string content", "f.jsonl:1: messages[1].content: expected a non-empty string, got 4"),
        ({"messages": [{"role": "bot", "content": "Hi"}]},
         "unknown role", "f.jsonl:1: messages[0].role: unknown role 'bot' (expected one of system, user, assistant, "
                         "tool)"),
        ({"messages": [{"role": "user", "content": "Hi"}]},
         "no assistant turn", "f.jsonl:1: messages: expected an assistant turn (nothing would be learned), got "
                              "roles ['user']"),
        ({"messages": [{"role": "user"}]},
         "missing field", "f.jsonl:1: messages[0]: expected an object with 'role' and 'content', got "
                          "{'role': 'user'}"),
        ({"messages": []},
         "missing field", "f.jsonl:1: messages: expected a non-empty list of {role, content} objects, got []"),
        ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}]},
         "unknown role", "f.jsonl:1: conversations[1].from: unknown role 'bot' (expected one of system, human, "
                         "user, gpt, assistant, tool, function_call, observation) (map it with "
                             "+data.roles.bot=<system|user|assistant|tool>)"),
        ({"instruction": "Add", "input": 2, "output": "4"},
         "empty or non-string content", "f.jsonl:1: input: expected a string (or no input), got 2"),
        ({"prompt": "Hi", "completion": " "},
         "empty or non-string content", "f.jsonl:1: completion: expected a non-empty string, got ' '"),
        ({"text": ["a"]}, "empty or non-string content", "f.jsonl:1: text: expected a non-empty string, got ['a']"),
    ],
)
def test_bad_records_name_the_place_the_field_and_what_was_expected(record, reason, message):
    with pytest.raises(RecordError) as err:
        canonical(record)
    assert (err.value.reason, err.value.one_line()) == (reason, message)


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        ("alpaca", "f.jsonl:1: output: missing (format alpaca needs instruction, output; the record has "
                   "['input', 'instruction'])"),
        ("messages", "f.jsonl:1: messages: missing (format messages needs messages; the record has "
                     "['input', 'instruction'])"),
    ],
)
def test_a_record_missing_its_fields_names_the_first_missing_one(fmt, message):
    with pytest.raises(RecordError) as err:
        to_canonical({"instruction": "Add", "input": "2"}, fmt, "f.jsonl:1", ROLES)
    assert (err.value.reason, err.value.one_line()) == ("missing field", message)


def test_jsonl_keeps_a_broken_line_as_its_error_and_numbers_lines_from_one(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": \n[1]\n')
    records = read_source(str(path))
    assert [where for where, _ in records] == [f"{path}:1", f"{path}:3", f"{path}:4"]
    assert records[0][1] == {"text": "a"}
    assert records[1][1].one_line() == (
        f"{path}:3: expected a JSON object, got invalid JSON (Expecting value at column 10)"
    )
    with pytest.raises(RecordError) as err:
        to_canonical(records[2][1], "text", records[2][0], ROLES)
    assert err.value.one_line() == f"{path}:4: expected a JSON object, got a list"


def test_a_line_separator_inside_a_json_string_does_not_split_the_line(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text('{"text": "a\u2028b"}\n', encoding="utf-8")
    assert read_source(str(path)) == [(f"{path}:1", {"text": "a\u2028b"})]


def test_json_csv_and_parquet_files_and_a_directory_of_them(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"prompt": "Hi", "completion": "Hello"}]))
    (tmp_path / "b.csv").write_text('prompt,completion\nHi,"Hel\nlo"\n2+2=,4\n')
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([{"messages": HI_HELLO}]), tmp_path / "c.parquet")
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "notes.txt").write_text("not data")
    assert read_source(str(tmp_path)) == [
        (f"{tmp_path}/a.json[0]", {"prompt": "Hi", "completion": "Hello"}),
        (f"{tmp_path}/b.csv:3", {"prompt": "Hi", "completion": "Hel\nlo"}),  # the line the record ends on
        (f"{tmp_path}/b.csv:4", {"prompt": "2+2=", "completion": "4"}),
        (f"{tmp_path}/c.parquet[0]", {"messages": HI_HELLO}),
        (f"{tmp_path}/d.jsonl:1", {"text": "x"}),
    ]


def test_json_lines_under_a_json_name_read_as_jsonl(tmp_path):
    path = tmp_path / "f.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert read_source(str(path)) == [(f"{path}:1", {"text": "a"}), (f"{path}:2", {"text": "b"})]


def test_datasets_saved_to_disk_and_a_local_builder_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}]).save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "t"}]),
                          "validation": datasets.Dataset.from_list([{"text": "v"}])}).save_to_disk(str(tmp_path / "dd"))
    (tmp_path / "builder" / "data").mkdir(parents=True)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([{"text": "p"}]),
                                tmp_path / "builder" / "data" / "train-00000-of-00001.parquet")
    assert read_source(str(tmp_path / "single")) == [(f"{tmp_path}/single[0]", {"text": "a"}),
                                                     (f"{tmp_path}/single[1]", {"text": "b"})]
    assert read_source(f"{tmp_path}/dd") == [(f"{tmp_path}/dd[0]", {"text": "t"})]
    assert read_source(f"{tmp_path}/dd:validation") == [(f"{tmp_path}/dd:validation[0]", {"text": "v"})]
    assert read_source(str(tmp_path / "builder")) == [(f"{tmp_path}/builder[0]", {"text": "p"})]


def test_unreadable_sources_are_one_line_errors(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "bad.csv").write_bytes(b"text\n\xff\xfe\n")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "dict.json").write_text('{"text": "a"}')
    cases = {
        "bad.parquet": (DataError, "bad.parquet: cannot read as Parquet (Parquet magic bytes not found in footer. "
                                   "Either the file is corrupted or this is not a parquet file.)"),
        "bad.csv": (DataError, "bad.csv: not UTF-8 text (byte 5: invalid start byte)"),
        "empty.jsonl": (DataError, "empty.jsonl: no records (expected one record per line or row (.jsonl, .json, "
                                   ".parquet, .csv))"),
        "dict.json": (DataError, "dict.json: expected a JSON list of records, got a JSON dict (or write one JSON "
                                 "object per line in a .jsonl file)"),
        "missing.jsonl": (ResourceError, "missing.jsonl: no such file or directory (check data.path, "
                                         "data.eval_path and data.mix)"),
    }
    for name, (kind, message) in cases.items():
        with pytest.raises(kind) as err:
            read_source(str(tmp_path / name))
        assert err.value.one_line() == f"{tmp_path}/{message}"


def test_a_hub_id_that_cannot_be_loaded_offline_is_a_resource_error():
    with pytest.raises(ResourceError, match=r"^ftune-test/no-such-set: no such file or directory, nor a hub dataset"):
        read_source("ftune-test/no-such-set")
    with pytest.raises(ResourceError, match=r"^train.jsonl: no such file or directory$"):  # a file name, not a hub id
        read_source("train.jsonl")


def test_a_directory_signature_changes_when_a_file_is_added(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    before = source_signature(str(tmp_path))
    assert source_signature(str(tmp_path)) == before
    write_jsonl(tmp_path / "b.jsonl", [{"text": "b"}])
    assert source_signature(str(tmp_path)) != before


def test_load_conversations_reads_any_chat_format_and_load_texts_text(tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "Hi", "completion": "Hello"}])
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "one"}])
    assert list(load_conversations(chat)) == [(f"{chat}:1", HI_HELLO)]
    assert list(load_texts(text)) == [(f"{text}:1", "one")]
    with pytest.raises(DataError, match="expected conversations, got format text"):
        list(load_conversations(text))


def saved_by_windows(text: str) -> bytes:
    r"""`text` as Windows tools and Excel save it: a UTF-8 byte-order mark, then CRLF line ends."""
    return b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8")


def save(tmp_path, name: str, content: str | bytes) -> Path:
    """`content` (text: plain UTF-8 with LF; bytes: as given) saved as `name`, plain and Windows files apart."""
    directory = tmp_path / ("windows" if isinstance(content, bytes) else "plain")
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def read_as(tmp_path, name: str, content: str | bytes) -> list[tuple[str, object]]:
    """The records of `content` saved as `name`, located relative to its directory."""
    path = save(tmp_path, name, content)
    return [(where.removeprefix(f"{path.parent}/"), record) for where, record in read_source(str(path))]


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("f.jsonl", '{"text": "a"}\n\n{"prompt": "Hi", "completion": "Hello"}\n',
         [("f.jsonl:1", {"text": "a"}), ("f.jsonl:3", {"prompt": "Hi", "completion": "Hello"})]),
        ("f.json", '[\n  {"text": "a"},\n  {"text": "b"}\n]\n',
         [("f.json[0]", {"text": "a"}), ("f.json[1]", {"text": "b"})]),
        ("f.json", '{"text": "a"}\n{"text": "b"}\n', [("f.json:1", {"text": "a"}), ("f.json:2", {"text": "b"})]),
        ("f.csv", 'prompt,completion\nHi,"Hel\nlo"\n2+2=,4\n',
         [("f.csv:3", {"prompt": "Hi", "completion": "Hel\nlo"}), ("f.csv:4", {"prompt": "2+2=", "completion": "4"})]),
    ],
)
def test_a_file_saved_with_a_byte_order_mark_and_crlf_reads_as_the_plain_file(tmp_path, name, text, expected):
    assert read_as(tmp_path, name, text) == expected
    assert read_as(tmp_path, name, saved_by_windows(text)) == expected


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("f.jsonl", '{"text": "a"}\n\n{"text": \n', "f.jsonl:3: expected a JSON object, got invalid JSON (Expecting "
                                                  "value at column 10)"),
        ("f.json", '[\n  {"text": "a"},\n  {"text" "b"}\n]\n', "f.json:3: expected JSON, got invalid JSON (Expecting "
                                                            "':' delimiter at column 11)"),
        ("f.csv", 'prompt,completion\n"Hi\nthere",Hello\n2+2=,4,5\n', "f.csv:4: expected 2 values (the header's "
                                                                      "columns), got 3"),
    ],
)
def test_line_numbers_in_errors_are_the_same_with_crlf(tmp_path, name, text, message):
    for content in (text, saved_by_windows(text)):
        path = save(tmp_path, name, content)
        try:
            records = read_source(str(path))
        except DataError as err:  # a JSON file fails whole
            assert err.one_line() == f"{path.parent}/{message}"
        else:
            bad = [record for _, record in records if isinstance(record, RecordError)]
            assert [err.one_line() for err in bad] == [f"{path.parent}/{message}"]


def test_a_bad_byte_after_a_byte_order_mark_is_named_by_its_offset_in_the_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n\xff\n')
    with pytest.raises(DataError) as err:
        read_source(str(path))
    assert err.value.one_line() == f"{path}: not UTF-8 text (byte 17: invalid start byte)"


def test_probe_and_evaluation_texts_read_a_windows_file_too(tmp_path):
    (tmp_path / "text.jsonl").write_bytes(saved_by_windows('{"text": "one"}\n{"text": "two"}\n'))
    (tmp_path / "chat.csv").write_bytes(saved_by_windows("prompt,completion\nHi,Hello\n"))
    assert [text for _, text in load_texts(str(tmp_path / "text.jsonl"))] == ["one", "two"]
    assert [messages for _, messages in load_conversations(str(tmp_path / "chat.csv"))] == [HI_HELLO]


def test_columns_map_other_names_onto_a_format_s_fields(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "2+2=", "answer": "4", "prompt": "shadowed"}) + "\n")
    records = list(read_records(str(path), DataCfg(columns={"prompt": "question", "completion": "answer"})))
    assert records == [(f"{path}:1", {"prompt": "2+2=", "completion": "4"})]
    assert resolve_format(records, str(path), "auto") == "prompt_completion"
