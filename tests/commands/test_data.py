"""`ftune data` on the embedded model: statistics, rendered examples, rows written, and one-line bad-input errors."""

import json

import pyarrow
import pyarrow.parquet
import pytest

from ftune.cli import main
from ftune.data.mask import IGNORE_INDEX
from ftune.data.show import render_tokens
from ftune.data.templates import TEMPLATES_DIR

ASSETS = TEMPLATES_DIR.parent / "data"

TWO_TURNS = {"messages": [
    {"role": "system", "content": "Answer with one word."},
    {"role": "user", "content": "Is the sky blue?"},
    {"role": "assistant", "content": "Yes."},
    {"role": "user", "content": "Is grass red?"},
    {"role": "assistant", "content": "No."},
]}
ONE_TURN = {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello."}]}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def shapes():
    return ASSETS / "shapes"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


def write_lines(path, lines) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def run_data(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["data", "recipe=tiny_lora", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def learned_text(row: dict, tokenizer) -> str:
    return tokenizer.decode([label for label in row["labels"] if label != IGNORE_INDEX], skip_special_tokens=False)


def test_rows_written_are_what_the_model_learns(tmp_path, capsys, tokenizer):
    data, out = write_lines(tmp_path / "chat.jsonl", [TWO_TURNS, ONE_TURN]), tmp_path / "rows.jsonl"
    code, _, err = run_data(capsys, f"data.path={data}", "n=2", f"out={out}")
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [learned_text(row, tokenizer) for row in rows] == ["Yes.<|im_end|>No.<|im_end|>", "Hello.<|im_end|>"]
    assert all(row["position_ids"] == list(range(len(row["input_ids"]))) for row in rows)
    assert [sorted(row) for row in rows] == [["input_ids", "labels", "position_ids"]] * 2
    assert not list(tmp_path.glob(".tmp-rows.jsonl*"))  # the temporary file was renamed
    for label in ("examples read / kept", "tokens / learned", "packing fill", "batch fill", "cache", "time",
                  "row 0, document 0", "row 1, document 0", "⟦Hello.<|im_end|>⟧", f"wrote 2 rows to {out}"):
        assert label in err, label


def test_streaming_previews_the_first_streamed_rows_and_builds_nothing(tmp_path, capsys):
    data = write_lines(tmp_path / "chat.jsonl", [TWO_TURNS, ONE_TURN])
    streaming = (f"data.path={data}", "data.streaming=true", "trainer.max_steps=9")
    code, _, err = run_data(capsys, *streaming, "data.shuffle_buffer=0", "n=2")
    assert code == 0
    assert f"data.streaming=true: no cache and no statistics; the first 2 rows of the stream of {data}" in err
    assert "row 1, document 0" in err and "⟦Hello.<|im_end|>⟧" in err and "examples read / kept" not in err
    assert not (tmp_path / "cache").exists()
    code, _, err = run_data(capsys, *streaming, f"out={tmp_path / 'rows.jsonl'}")
    assert code == 2 and "ftune: error: data.streaming=true builds no rows to write or count" in err


def test_packed_rows_restart_positions_per_document(tmp_path, capsys, tokenizer):
    data, out = write_lines(tmp_path / "chat.jsonl", [TWO_TURNS, ONE_TURN]), tmp_path / "rows.jsonl"
    code, _, err = run_data(capsys, f"data.path={data}", "data.packing=true", "n=3", f"out={out}")
    assert code == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    first = tokenizer.apply_chat_template(TWO_TURNS["messages"], tokenize=False)
    length = len(tokenizer(first, add_special_tokens=False)["input_ids"])
    assert row["position_ids"] == list(range(length)) + list(range(len(row["input_ids"]) - length))
    assert learned_text(row, tokenizer) == "Yes.<|im_end|>No.<|im_end|>Hello.<|im_end|>"
    assert "row 0, document 1" in err and "row 1" not in err


def test_json_report_and_a_second_build_served_from_the_cache(tmp_path, capsys):
    data = write_lines(tmp_path / "chat.jsonl", [TWO_TURNS, ONE_TURN, ONE_TURN])
    first = json.loads(run_data(capsys, f"data.path={data}", "--json")[1])
    second = json.loads(run_data(capsys, f"data.path={data}", "--json")[1])
    assert (first["from_cache"], second["from_cache"]) == (False, True)
    assert second["stats"] == first["stats"]
    stats = first["stats"]
    assert (stats["read"], stats["kept"], stats["rows"], stats["dropped"]) == (3, 3, 3, {})
    assert stats["sources"] == [{"path": data, "format": "messages", "features": [], "examples": 3}]
    assert first["packing_fill"] is None and 0 < first["batch_fill"] < 1


def test_mixing_chat_with_text_replay(tmp_path, capsys):
    chat = write_lines(tmp_path / "chat.jsonl", [ONE_TURN] * 8)
    text = write_lines(tmp_path / "text.jsonl", [{"text": "The cat sat on the mat."}] * 8)
    mix = f"data.mix=[{{path: {chat}, weight: 0.8}}, {{path: {text}, weight: 0.2}}]"
    stats = json.loads(run_data(capsys, mix, "--json")[1])["stats"]
    assert [(s["format"], s["drawn"]) for s in stats["sources"]] == [("messages", 8), ("text", 2)]
    assert stats["dropped"] == {"left out by the data.mix weights": 6}


def test_skip_counts_bad_records_and_goes_on(tmp_path, capsys):
    data = write_lines(tmp_path / "chat.jsonl", [ONE_TURN, '{"messages": [', {"prompt": "Hi"}, ONE_TURN])
    code, out, err = run_data(capsys, f"data.path={data}", "data.on_bad_record=skip", "--json")
    assert code == 0
    stats = json.loads(out)["stats"]
    assert (stats["read"], stats["kept"]) == (4, 2)
    assert stats["dropped"] == {"not a JSON object": 1, "missing field": 1}
    assert f"data: {data}: 1 record(s) skipped (missing field); the first: {data}:3: messages: missing" in err


BAD_INPUTS = {
    "malformed JSON line": (
        [ONE_TURN, '{"messages": [{"role": "user"'],
        "{p}:2: expected a JSON object, got invalid JSON (Expecting ',' delimiter at column 30)",
    ),
    "record missing its fields": (
        [ONE_TURN, {"prompt": "Hi"}],
        "{p}:2: messages: missing (format messages needs messages; the record has ['prompt'])",
    ),
    "empty content": (
        [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\n"}]}],
        "{p}:1: messages[1].content: expected a non-empty string, got '\\n'",
    ),
    "non-string content": (
        [{"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "Hello"}]}],
        "{p}:1: messages[0].content: expected a non-empty string, got 7",
    ),
    "untyped content part": (
        [{"messages": [{"role": "user", "content": ["Hi"]}, {"role": "assistant", "content": "Hello"}]}],
        "{p}:1: messages[0].content[0]: expected a part with type text or reasoning or tool_call, got 'Hi'",
    ),
    "tool call without a name": (
        [{"messages": [{"role": "user", "content": "Hi"},
                       {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}]}],
        "{p}:1: messages[1].tool_calls[0]: expected a tool call with a function name, got {{'function': "
        "{{'arguments': {{}}}}}}",
    ),
    "tool call arguments not JSON": (
        [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "tool_calls": [
            {"function": {"name": "w", "arguments": "{city: Oslo}"}}]}]}],
        "{p}:1: messages[1].tool_calls[0].arguments: expected JSON, got invalid JSON (Expecting property name "
        "enclosed in double quotes at column 2)",
    ),
    "weight other than 0 or 1": (
        [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "weight": 0.5}]}],
        "{p}:1: messages[1].weight: expected 0 or 1, got 0.5",
    ),
    "unknown role": (
        [{"messages": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}],
        "{p}:1: messages[0].role: unknown role 'human' (expected one of system, user, assistant, tool)",
    ),
    "empty file": ([], "{p}: no records (expected one record per line or row (.jsonl, .json, .parquet, .csv))"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_naming_file_line_field_and_expectation(case, tmp_path, capsys):
    lines, message = BAD_INPUTS[case]
    data = write_lines(tmp_path / "bad.jsonl", lines)
    before = (tmp_path / "bad.jsonl").read_bytes()
    code, _, err = run_data(capsys, f"data.path={data}")
    assert code == 2
    assert err.strip().splitlines()[-1] == "ftune: error: " + message.format(p=data)
    assert "Traceback" not in err
    assert (tmp_path / "bad.jsonl").read_bytes() == before  # the user's file is never altered


def test_missing_path_unreadable_files_and_bad_mix_weights_exit_2(tmp_path, capsys):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 but not really")
    (tmp_path / "bad.csv").write_bytes(b"prompt,completion\n\xff,4\n")
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([ONE_TURN]), tmp_path / "good.parquet")
    cases = {
        f"data.path={tmp_path}/missing.jsonl":
            f"{tmp_path}/missing.jsonl: no such file or directory (check data.path, data.eval_path and data.mix)",
        f"data.path={tmp_path}/bad.parquet":
            f"{tmp_path}/bad.parquet: cannot read as Parquet (Parquet magic bytes not found in footer. Either the "
            "file is corrupted or this is not a parquet file.)",
        f"data.path={tmp_path}/bad.csv": f"{tmp_path}/bad.csv: not UTF-8 text (byte 18: invalid start byte)",
        f"data.mix=[{{path: {tmp_path}/good.parquet, weight: 1}}, {{path: {tmp_path}/good.parquet, weight: -0.2}}]":
            f"data.mix[1].weight=-0.2 (expected > 0: the share of training examples drawn from "
            f"{tmp_path}/good.parquet)",
    }
    for override, message in cases.items():
        code, _, err = run_data(capsys, override)
        assert (code, err.strip().splitlines()[-1]) == (2, f"ftune: error: {message}"), override


def test_bad_command_options_exit_2(tmp_path, capsys):
    assert run_data(capsys, "n=three")[0] == 2
    code, _, err = run_data(capsys, f"out={tmp_path}/no/such/dir/rows.jsonl")
    assert (code, err.strip()) == (2, f"ftune: error: out={tmp_path}/no/such/dir/rows.jsonl: no such directory "
                                      f"{tmp_path}/no/such/dir (create it, or write elsewhere)")


def test_render_styles_learned_tokens_green_and_special_tokens_bold(tokenizer):
    ids = tokenizer("<|im_start|>assistant\nHello.<|im_end|>\n", add_special_tokens=False)["input_ids"]
    header = len(tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
    labels = [IGNORE_INDEX] * header + ids[header:-1] + [IGNORE_INDEX]
    text = render_tokens(ids, labels, tokenizer)
    assert [(text.plain[s.start:s.end], str(s.style)) for s in text.spans] == [
        ("<|im_start|>", "bold dim"), ("assistant\n", "dim"), ("Hello.", "green"), ("<|im_end|>", "bold green"),
        ("\n", "dim"),
    ]
    assert render_tokens(ids, labels, tokenizer, marks=True).plain == (
        "<|im_start|>assistant\n⟦Hello.<|im_end|>⟧\n"
    )


SHAPES = {  # sample: (template that can express it, format detected, features named)
    "sharegpt_tools.jsonl": ("qwen_tools", "sharegpt", ["tool calls", "tools"]),
    "openai_tools.jsonl": ("qwen_tools", "messages", ["per-message weights", "tool calls", "tools"]),
    "typed_parts.jsonl": ("qwen3", "messages", ["reasoning", "tool calls", "tools", "typed parts"]),
    "message_list.jsonl": ("qwen_tools", "message_list", []),
    "weights.jsonl": ("qwen_tools", "messages", ["per-message weights"]),
    "reasoning.jsonl": ("qwen3", "messages", ["reasoning"]),
}


@pytest.mark.parametrize("name", SHAPES)
def test_each_shape_loads_with_format_auto_and_the_statistics_name_it(name, shapes, capsys):
    template, fmt, features = SHAPES[name]
    code, out, _ = run_data(capsys, f"data.path={shapes / name}", "data.format=auto", f"data.chat_template={template}",
                            "data.eval_path=null", "data.max_length=2048", "--json")
    assert code == 0
    [source] = json.loads(out)["stats"]["sources"]
    assert (source["format"], source["features"]) == (fmt, features)


def test_a_tool_conversation_shows_the_call_learned_and_the_result_and_schema_not(shapes, capsys):
    code, _, out = run_data(capsys, f"data.path={shapes / 'sharegpt_tools.jsonl'}", "data.format=auto",
                            "data.chat_template=qwen_tools", "data.eval_path=null", "data.max_length=2048", "n=1")
    assert code == 0
    assert "(sharegpt: tool calls, tools): 3 examples" in " ".join(out.split())
    example = out[out.index("row 0, document 0"):]
    assert "You answer questions with the tools you have.«tools»\n\n# Tools" in example  # schema: not learned
    assert ('<|im_start|>assistant\n⟦«tool call»<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
            "\n</tool_call><|im_end|>⟧\n") in example  # the call and its end-of-turn marker: learned
    assert '<tool_response>\n«tool result»{"city": "Oslo", "rain": true, "celsius": 7}\n</tool_response>' in example
    assert "⟦Yes, it is raining in Oslo, at 7 degrees.<|im_end|>⟧" in example
    assert example.count("⟦") == 2


def test_dedup_near_reports_and_removes_planted_duplicates_and_eval_overlap(capsys):
    planted = ASSETS / "dedup"
    args = [f"data.path={planted / 'train.jsonl'}", f"data.eval_path={planted / 'validation.jsonl'}"]
    code, _, out = run_data(capsys, *args, "data.dedup=near", "n=0")
    assert code == 0
    flat = " ".join(out.split())
    assert "examples read / kept │ 7 / 3" in flat
    assert "dropped │ 4 (exact duplicate: 1, near duplicate: 1, near eval" in flat
    assert "│ eval overlap │ 1 exact, 1 near; 2 removed from training │" in flat
    assert f"near duplicate: {planted / 'train.jsonl'}:4 repeats {planted / 'train.jsonl'}:3 (Jaccard 0.898)" in out
    assert (f"WARNING: 2 training example(s) overlap the eval set {planted / 'validation.jsonl'} (1 exact, 1 near; "
            "2 removed by data.dedup=near)") in out
    stats = json.loads(run_data(capsys, *args, "data.dedup=none", "--json")[1])["stats"]
    assert (stats["read"], stats["kept"], stats["dropped"]) == (7, 7, {})
    assert stats["dedup"]["counts"] == {"exact duplicate": 1, "near duplicate": 1, "exact eval overlap": 1,
                                        "near eval overlap": 1}


def test_render_styles_each_kind_bright_where_learned_and_dim_where_not(tokenizer):
    pieces = [("<|im_start|>user\n", "prompt", False), ("yes", "tool_result", False),
              ("<|im_end|>\n<|im_start|>assistant\n", "prompt", False), ("Hello.", "tool_call", True),
              ("<|im_end|>", "end_of_turn", True)]
    ids, labels, kinds = [], [], []
    for text, kind, learned in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids, kinds = ids + piece, kinds + [kind] * len(piece)
        labels += piece if learned else [IGNORE_INDEX] * len(piece)
    text = render_tokens(ids, labels, tokenizer, kinds=kinds)
    styles = {text.plain[s.start:s.end]: str(s.style) for s in text.spans}
    assert (styles["yes"], styles["Hello."], styles["<|im_end|>"]) == ("dim yellow", "cyan", "bold green")
    assert render_tokens(ids, labels, tokenizer, marks=True, kinds=kinds).plain == (
        "<|im_start|>user\n«tool result»yes<|im_end|>\n<|im_start|>assistant\n⟦«tool call»Hello.<|im_end|>⟧"
    )


def run_pairs(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["data", "recipe=tiny_lora", "objective=dpo", "data=tiny_pairs", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_pairs_show_the_prompt_once_and_both_responses_learned_and_are_written(tmp_path, capsys, tokenizer):
    out = tmp_path / "pairs.jsonl"
    code, _, err = run_pairs(capsys, "n=3", f"out={out}")
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 320 and all(sorted(row) == ["chosen_ids", "prompt_ids", "rejected_ids"] for row in rows)
    first = json.loads((ASSETS / "pairs" / "train.jsonl").read_text().splitlines()[0])
    assert tokenizer.decode(rows[0]["chosen_ids"]) == first["chosen"][0]["content"] + "<|im_end|>"
    assert tokenizer.decode(rows[0]["prompt_ids"]).endswith(
        first["prompt"][-1]["content"] + "<|im_end|>\n<|im_start|>assistant\n")
    for label in ("pairs read / kept", "320 / 320", "identical chosen and rejected", "prompts truncated",
                  "(preference: message lists, system)", f"wrote 320 rows to {out}",
                  f"chosen: ⟦{first['chosen'][0]['content']}<|im_end|>⟧",
                  f"rejected: ⟦{first['rejected'][0]['content']}<|im_end|>⟧"):
        assert label in err, label
    assert err.count(first["prompt"][-1]["content"]) == 1  # the prompt once, not once per response
    assert [line.split(":")[0].strip("─ ") for line in err.splitlines() if "pair " in line and "prompt" in line] == [
        "pair 0", "pair 1", "pair 2"]


def test_pairs_json_report_counts_drops_by_reason(tmp_path, capsys):
    pair = {"prompt": "Say hello.", "chosen": "Hello.", "rejected": "Bye."}
    data = write_lines(tmp_path / "p.jsonl", [pair, {**pair, "rejected": "Hello."}, {**pair, "chosen": ""}])
    code, out, _ = run_pairs(capsys, f"data.path={data}", "--json")
    assert code == 0
    stats = json.loads(out)["stats"]
    assert (stats["read"], stats["kept"]) == (3, 1)
    assert stats["dropped"] == {"chosen identical to rejected": 1, "empty response": 1}


@pytest.mark.parametrize(("lines", "extra", "message"), [
    ([{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
       "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}], (),
     "{p}:1: chosen and rejected differ at message 0, before their last assistant turn (an implicit prompt is every "
     "message but the last, the same in both) (give the shared turns as a prompt column)"),
    ([{"prompt": "a", "chosen": "b"}], (),
     "{p}:1: rejected: missing (a preference pair needs chosen and rejected, after a prompt or as whole "
     "conversations; the record has ['chosen', 'prompt'])"),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}], ("+data.columns.prompt=input",),
     "data.columns.prompt=input: {p} has no column 'input' (the first record, {p}:1, has ['chosen', 'prompt', "
     "'rejected'])"),
    ([{"prompt": "a", "chosen": "b", "rejected": "b"}], (),
     "{p}: no pair left to train on (read 1, dropped: {{'chosen identical to rejected': 1}})"),
])
def test_bad_preference_input_is_one_line_and_leaves_nothing_behind(lines, extra, message, tmp_path, capsys):
    data = write_lines(tmp_path / "p.jsonl", lines)
    code, _, err = run_pairs(capsys, f"data.path={data}", *extra)
    assert (code, err.strip().splitlines()[-1]) == (2, "ftune: error: " + message.format(p=data))
    cache = tmp_path / "cache" / "data"  # refused before the cache is looked up, or while building an entry
    assert not cache.exists() or not any(cache.iterdir())


def test_grpo_prompts_are_counted_with_the_columns_the_rewards_read(capsys):
    assert main(["data", "recipe=tiny_grpo", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stats"]["kept"] == 400 and report["columns"] == ["person", "reference", "tense", "time"]
    assert main(["data", "recipe=tiny_grpo", "n=1"]) == 0
    assert "prompt 0:" in capsys.readouterr().err
