"""Preference data: input shapes, pair tokens on every template, truncation, drops, cache, collators and loader.

Pairs are tokenized on every registry template (token by token on two); truncation must keep the responses; what
is dropped is counted by reason; the collators' tensors are written out exactly.
"""

import json

import numpy as np
import pytest
import torch

from ftune.config.schema import DataCfg
from ftune.data.formats import rename_columns, resolve_format
from ftune.data.pipeline import build_split
from ftune.data.preference import (
    BOUNDARY_MERGE,
    DIFFERENT_PROMPTS,
    EMPTY_RESPONSE,
    IDENTICAL,
    OBJECTIVE_FORMATS,
    PAIRED,
    RESPONSE_TOO_LONG,
    KtoCollator,
    PairCollator,
    build_preference_loader,
    build_preference_split,
    fit_prompt,
    to_preference,
    tokenize_pair,
)
from ftune.data.templates import TEMPLATES, render, resolve_template
from ftune.errors import ConfigError, DataError

WHERE = "f.jsonl:1"
USER = {"role": "user", "content": "Hi there"}
SYSTEM = {"role": "system", "content": "You are terse."}
CHOSEN = {"role": "assistant", "content": "Hello!"}
REJECTED = {"role": "assistant", "content": "What is the answer"}
WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TOOL_TEMPLATES = ("qwen3", "qwen_tools", "llama3.1", "mistral_tools")

EXPECTED = {"prompt": [SYSTEM, USER], "chosen": CHOSEN, "rejected": REJECTED, "tools": []}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path / "cache"))


def write_lines(path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def detected(record: dict, columns: dict | None = None) -> tuple[str, dict]:
    """The format `auto` detects for one record (after `data.columns`), and the record mapped by it."""
    [(where, renamed)] = list(rename_columns([(WHERE, record)], columns or {}, "f.jsonl"))
    fmt = resolve_format([(where, renamed)], "f.jsonl", "auto")
    return fmt, to_preference(renamed, fmt, where)


@pytest.mark.parametrize(("record", "columns"), [
    ({"prompt": [SYSTEM, USER], "chosen": [CHOSEN], "rejected": [REJECTED]}, None),
    ({"prompt": "Hi there", "system": "You are terse.", "chosen": "Hello!", "rejected": "What is the answer"}, None),
    ({"prompt": [SYSTEM, USER], "chosen": "Hello!", "rejected": [REJECTED], "score_chosen": 9, "id": "a1",
      "messages": [USER, CHOSEN]}, None),  # extra columns, a `messages` one included, are ignored
    ({"input": [SYSTEM, USER], "good": [CHOSEN], "bad": [REJECTED]},
     {"prompt": "input", "chosen": "good", "rejected": "bad"}),
])
def test_explicit_prompt_shapes_map_to_one_pair(record, columns):
    assert detected(record, columns) == ("preference", EXPECTED)


def test_implicit_prompt_is_the_shared_conversation_before_the_last_turn():
    record = {"chosen": [SYSTEM, USER, CHOSEN], "rejected": [SYSTEM, USER, REJECTED], "score": 0.5}
    assert detected(record) == ("implicit_preference", EXPECTED)
    assert detected({"chosen": [USER, CHOSEN], "rejected": [USER, REJECTED], "system": "You are terse."}) == (
        "implicit_preference", EXPECTED)


def test_implicit_pairs_that_differ_earlier_are_refused_naming_the_line():
    record = {"chosen": [USER, CHOSEN], "rejected": [{"role": "user", "content": "Other"}, REJECTED]}
    with pytest.raises(DataError) as err:
        detected(record)
    assert err.value.reason == DIFFERENT_PROMPTS
    assert err.value.one_line().startswith("f.jsonl:1: chosen and rejected differ at message 0, before their last "
                                           "assistant turn")


def test_tools_go_into_the_prompt_and_kto_rows_keep_their_label():
    fmt, pair = detected({"prompt": [USER], "chosen": "Hello!", "rejected": "What is the answer", "tools": [WEATHER]})
    assert (fmt, pair["tools"]) == ("preference", [{"type": "function", "function": WEATHER}])
    fmt, row = detected({"prompt": "Hi there", "completion": "Hello!", "label": False})
    assert (fmt, row) == ("unpaired_preference", {"prompt": [USER], "completion": CHOSEN, "tools": [], "label": False})


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "Hi", "chosen": "a"}, "f.jsonl:1: rejected: missing (format implicit_preference needs chosen, "
                                      "rejected; the record has ['chosen', 'prompt'])"),
    ({"prompt": [USER, CHOSEN], "chosen": "a", "rejected": "b"}, "f.jsonl:1: prompt: ends with an assistant turn"),
    ({"prompt": "Hi", "chosen": [CHOSEN, CHOSEN], "rejected": "b"},
     "f.jsonl:1: chosen: expected a string or a list of one assistant message"),
    ({"prompt": "Hi", "chosen": [USER], "rejected": "b"}, "f.jsonl:1: chosen[0].role: expected assistant"),
    ({"prompt": "Hi", "completion": "a", "label": "yes"}, "f.jsonl:1: label: expected true or false, got 'yes'"),
])
def test_malformed_records_are_refused_with_where_and_what(record, message):
    fmt = "preference" if "chosen" in record and "prompt" in record and "rejected" in record else None
    fmt = fmt or ("unpaired_preference" if "label" in record else "implicit_preference")
    with pytest.raises(DataError) as err:
        to_preference(record, fmt, WHERE)
    assert err.value.one_line().startswith(message)


def test_empty_responses_are_kept_for_counting_not_refused():
    pair = to_preference({"prompt": "Hi", "chosen": " ", "rejected": [{"role": "assistant", "content": None}]},
                         "preference", WHERE)
    assert (pair["chosen"], pair["rejected"]) == (None, None)


def test_columns_naming_no_column_or_no_field_are_refused():
    with pytest.raises(ConfigError, match=r"^data.columns.prompt=input: f.jsonl has no column 'input' \(the first "
                                          r"record, f.jsonl:1, has \['chosen', 'prompt'\]\)$"):
        list(rename_columns([(WHERE, {"prompt": "a", "chosen": "b"})], {"prompt": "input"}, "f.jsonl"))
    with pytest.raises(ConfigError, match="data.columns.promt: unknown field 'promt'"):
        list(rename_columns([], {"promt": "input"}, "f.jsonl"))


def template_case(name, make_tokenizer, tools=None):
    """A tokenizer of the template's family, the template, and a pair (Mistral v0.3 without a system prompt)."""
    tokenizer = make_tokenizer(name)
    prompt = [USER] if name in ("mistral", "mistral_tools") else [SYSTEM, USER]
    return tokenizer, resolve_template(name, tokenizer), {"prompt": prompt, "chosen": CHOSEN, "rejected": REJECTED,
                                                          "tools": tools or []}


@pytest.mark.parametrize("name", [*TEMPLATES, *(f"{name}+tools" for name in TOOL_TEMPLATES)])
def test_every_template_gives_the_whole_tokenization_after_the_prompt_through_the_end_of_turn(name, make_tokenizer):
    name, _, with_tools = name.partition("+")
    tools = [{"type": "function", "function": WEATHER}] if with_tools else None
    tokenizer, template, pair = template_case(name, make_tokenizer, tools)
    prompt_ids, responses = tokenize_pair(pair, PAIRED, WHERE, tokenizer, template)
    assert prompt_ids == tokenizer(render(template, pair["prompt"], tokenizer, True, tools),
                                   add_special_tokens=False)["input_ids"]
    end_of_turn = tokenizer.convert_tokens_to_ids(template.end_of_turn)
    for name_, ids in responses.items():
        whole = tokenizer(render(template, [*pair["prompt"], pair[name_]], tokenizer, tools=tools),
                          add_special_tokens=False)["input_ids"]
        assert whole[: len(prompt_ids) + len(ids)] == prompt_ids + ids
        # after the marker only a newline, or Phi-3's closing EOS: never generated, so not learned (as in SFT)
        assert tokenizer.decode(whole[len(prompt_ids) + len(ids) :], skip_special_tokens=True).strip() == ""
        assert ids[-1] == end_of_turn and ids.count(end_of_turn) == 1  # learned, once
        assert pair[name_]["content"] in tokenizer.decode(ids)
        if tokenizer.bos_token_id is not None:
            assert (prompt_ids + ids).count(tokenizer.bos_token_id) == whole.count(tokenizer.bos_token_id) <= 1


def test_chatml_pair_token_by_token(make_word_tokenizer):
    # <|im_start|>=0 <|im_end|>=1 <|endoftext|>=2 \n=3 assistant=4 user=5 Hi=6 Hello=7 Bye=8
    tokenizer = make_word_tokenizer(["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
                                    ["\n", "assistant", "user", "Hi", "Hello", "Bye"], eos="<|im_end|>")
    pair = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": {"role": "assistant", "content": "Hello"},
            "rejected": {"role": "assistant", "content": "Bye"}, "tools": []}
    prompt_ids, responses = tokenize_pair(pair, PAIRED, WHERE, tokenizer, resolve_template("chatml", tokenizer))
    # <|im_start|> user \n Hi <|im_end|> \n <|im_start|> assistant \n | Hello <|im_end|> (the "\n" after: not learned)
    assert prompt_ids == [0, 5, 3, 6, 1, 3, 0, 4, 3]
    assert responses == {"chosen": [7, 1], "rejected": [8, 1]}


def test_llama2_pair_token_by_token_has_one_bos_and_learns_the_eos(make_word_tokenizer):
    # <s>=0 </s>=1 [INST]=2 [/INST]=3 " "=4 Hi=5 Hello=6 Bye=7
    tokenizer = make_word_tokenizer(["<s>", "</s>", "[INST]", "[/INST]"], [" ", "Hi", "Hello", "Bye"], bos="<s>",
                                    eos="</s>")
    pair = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": {"role": "assistant", "content": "Hello"},
            "rejected": {"role": "assistant", "content": "Bye"}, "tools": []}
    prompt_ids, responses = tokenize_pair(pair, PAIRED, WHERE, tokenizer, resolve_template("llama2", tokenizer))
    # <s> [INST] " " Hi " " [/INST] | " " Hello " " </s>
    assert prompt_ids == [0, 2, 4, 5, 4, 3]
    assert responses == {"chosen": [4, 6, 4, 1], "rejected": [4, 7, 4, 1]}


def test_a_prompt_whose_end_merges_into_the_response_is_refused(make_word_tokenizer):
    # " Hello" is one token, so "assistant: " + "Hello" does not tokenize as the prompt's tokens then the response's
    tokenizer = make_word_tokenizer(["<|im_end|>"], ["assistant", "user", ":", " ", " Hi", " Hello", "\n"],
                                    eos="<|im_end|>", pattern=r" ?\w+|\s|[^\w\s]+")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>\n' }}"
                               "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    pair = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": {"role": "assistant", "content": "Hello"},
            "rejected": {"role": "assistant", "content": "Hi"}, "tools": []}
    with pytest.raises(DataError) as err:
        tokenize_pair(pair, PAIRED, WHERE, tokenizer, resolve_template("tokenizer", tokenizer))
    assert err.value.reason == BOUNDARY_MERGE
    # the prompt: user : " Hi" <|im_end|> \n assistant : " "; the whole: ... assistant : " Hello" <|im_end|> \n
    assert err.value.one_line().startswith("f.jsonl:1: chosen: the tokens of the whole conversation do not start "
                                           "with the prompt's 8 tokens")


@pytest.mark.parametrize(("prompt", "longest", "max_length", "max_prompt_length", "expected"), [
    ([9, 1, 2, 3, 4], 3, 8, 0, [9, 1, 2, 3, 4]),  # fits
    ([9, 1, 2, 3, 4], 3, 6, 0, [9, 3, 4]),  # cut from the left, the BOS kept
    ([5, 1, 2, 3, 4], 3, 6, 0, [2, 3, 4]),  # no BOS to keep
    ([9, 1, 2, 3, 4], 1, 8, 2, [9, 4]),  # max_prompt_length
    ([9, 1, 2, 3, 4], 5, 6, 0, [4]),  # one token left: no room for the BOS as well
    ([9, 1, 2, 3, 4], 6, 6, 0, None),  # the response would lose a token (or have no prompt): dropped
])
def test_truncation_cuts_the_prompt_from_the_left_and_never_a_response(prompt, longest, max_length,
                                                                       max_prompt_length, expected):
    cfg = DataCfg(max_length=max_length, max_prompt_length=max_prompt_length)
    assert fit_prompt(prompt, longest, cfg, bos_id=9) == expected


PAIR = {"prompt": "Hi there", "chosen": "Hello!", "rejected": "What is the answer"}


def tiny_cfg(path: str, **settings) -> DataCfg:
    return DataCfg(path=path, eval_path=None, chat_template="chatml", num_proc=1, **settings)


def test_dropped_pairs_are_counted_by_reason_and_never_kept(tmp_path, make_tokenizer):
    long = {**PAIR, "rejected": " ".join(["what is the answer"] * 40)}
    records = [PAIR, {**PAIR, "rejected": "Hello!"}, {**PAIR, "chosen": ""}, long, {**PAIR, "prompt": "Hi " * 60}]
    tokenizer = make_tokenizer("chatml")
    rows, stats = build_preference_split(tiny_cfg(write_lines(tmp_path / "p.jsonl", records), max_length=64),
                                         tokenizer)
    assert (stats.read, stats.kept, stats.truncated) == (5, 2, 1)
    assert stats.dropped == {IDENTICAL: 1, EMPTY_RESPONSE: 1, RESPONSE_TOO_LONG: 1}
    assert [len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) for row in rows] == list(
        rows.lengths)
    assert rows.lengths.max() <= 64
    assert stats.sources == [{"path": str(tmp_path / "p.jsonl"), "format": "preference", "features": [], "pairs": 2}]


def test_a_file_without_any_pair_left_is_one_line_and_leaves_no_cache_entry(tmp_path, make_tokenizer):
    path = write_lines(tmp_path / "p.jsonl", [{**PAIR, "rejected": "Hello!"}])
    with pytest.raises(DataError, match=r"p.jsonl: no pair left to train on \(read 1, dropped: \{'chosen identical "
                                        r"to rejected': 1\}\)"):
        build_preference_split(tiny_cfg(path), make_tokenizer("chatml"))
    assert list((tmp_path / "cache" / "data").iterdir()) == []


def test_bad_records_stop_the_build_or_are_skipped_and_counted(tmp_path, make_tokenizer):
    bad = {"chosen": [USER, CHOSEN], "rejected": [{"role": "user", "content": "Other"}, REJECTED]}
    path = write_lines(tmp_path / "p.jsonl", [{"chosen": [USER, CHOSEN], "rejected": [USER, REJECTED]}, bad])
    with pytest.raises(DataError, match=r"p.jsonl:2: chosen and rejected differ at message 0"):
        build_preference_split(tiny_cfg(path), make_tokenizer("chatml"))
    rows, stats = build_preference_split(tiny_cfg(path, on_bad_record="skip"), make_tokenizer("chatml"))
    assert (len(rows), stats.dropped) == (1, {DIFFERENT_PROMPTS: 1})


def test_objectives_take_their_own_shapes_and_sft_refuses_pairs(tmp_path, make_tokenizer):
    tokenizer = make_tokenizer("chatml")
    pairs = tiny_cfg(write_lines(tmp_path / "p.jsonl", [PAIR]))
    unpaired = tiny_cfg(write_lines(tmp_path / "k.jsonl", [{"prompt": "Hi", "completion": "Hello!", "label": True}]))
    with pytest.raises(DataError, match="k.jsonl: format unpaired_preference is not the preference data this "
                                        "objective trains on"):
        build_preference_split(unpaired, tokenizer, formats=OBJECTIVE_FORMATS["dpo"])
    rows, _ = build_preference_split(unpaired, tokenizer, formats=OBJECTIVE_FORMATS["kto"])
    assert sorted(rows[0]) == ["completion_ids", "label", "prompt_ids", "row"] and rows[0]["label"] is True
    with pytest.raises(DataError, match="p.jsonl: format preference is preference data, which this objective does "
                                        "not train on"):
        build_split(pairs.path, tokenizer, pairs)


def test_unsupported_settings_are_refused_before_reading(tmp_path, make_tokenizer):
    with pytest.raises(ConfigError, match=r"^data.packing=true: not supported for preference data"):
        build_preference_split(tiny_cfg(str(tmp_path / "missing.jsonl"), packing=True), make_tokenizer("chatml"))


def test_pairs_are_cached_and_identical_for_any_number_of_workers(make_tokenizer, tiny_model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    cfg = DataCfg(path=str(tiny_model_path.parents[1] / "data" / "pairs" / "train.jsonl"), num_proc=1)
    built, stats = build_preference_split(cfg, tokenizer)
    cached, cached_stats = build_preference_split(cfg, tokenizer)
    # another key (a prompt limit no prompt reaches), so that two workers build the same rows again
    workers, _ = build_preference_split(DataCfg(path=cfg.path, num_proc=2, max_prompt_length=4096), tokenizer)
    assert (built.from_cache, cached.from_cache, workers.from_cache) == (False, True, False)
    assert cached_stats == stats and stats.kept == 320 and not stats.dropped
    assert list(built) == list(cached) == list(workers)
    assert np.array_equal(built.lengths, workers.lengths)


def test_pair_collator_stacks_chosen_then_rejected_with_exact_tensors():
    rows = [{"prompt_ids": [5, 6], "chosen_ids": [7, 8], "rejected_ids": [9]},
            {"prompt_ids": [4], "chosen_ids": [3], "rejected_ids": [2, 1, 3]}]
    batch = PairCollator(pad_token_id=0, pad_to_multiple_of=1)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [4, 3, 0, 0], [5, 6, 9, 0], [4, 2, 1, 3]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 3, -100, -100], [-100, -100, 9, -100],
                                        [-100, 2, 1, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert (batch["num_tokens"].item(), batch["num_pairs"].item()) == (13, 2)
    assert PairCollator(0, pad_to_multiple_of=8)(rows)["input_ids"].shape == (4, 8)


def test_shared_prompt_rows_hold_each_pair_once_with_exact_tensors():
    """The docstring's example: one row per pair, rejected sees the prompt and itself, positions restart."""
    rows = [{"prompt_ids": [5, 6], "chosen_ids": [7, 8], "rejected_ids": [9]},
            {"prompt_ids": [4], "chosen_ids": [3], "rejected_ids": [2, 1]}]
    batch = PairCollator(pad_token_id=0, shared_mask="sdpa")(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 3, 2, 1, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 1, 2, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, 9], [-100, 3, 2, 1, -100]]
    assert batch["logp_source"].tolist() == [1, 2, 1, 5, 5, 7]  # the second row starts at 5 (width 5)
    assert batch["logp_target"].tolist() == [7, 8, 9, 3, 2, 1]
    assert batch["logp_slot"].tolist() == [0, 0, 2, 1, 3, 3]  # chosen 0, 1; rejected 2, 3
    assert batch["attention_mask"].shape == (2, 1, 5, 5) and batch["attention_mask"].dtype == torch.bool
    assert batch["attention_mask"][0, 0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0],
                                                            [1, 1, 1, 1, 0], [1, 1, 0, 0, 1]]
    assert batch["attention_mask"][1, 0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0],
                                                            [1, 0, 1, 1, 0], [0, 0, 0, 0, 1]]  # padding: itself
    assert (batch["num_tokens"].item(), batch["num_pairs"].item()) == (9, 2)
    eager = PairCollator(pad_token_id=0, shared_mask="eager")(rows)["attention_mask"]
    assert eager.dtype == torch.float32 and torch.equal(eager == 0, batch["attention_mask"])


def test_kto_collator_labels_rows_and_pairs_each_prompt_with_the_previous_completion():
    rows = [{"prompt_ids": [5], "completion_ids": [7, 8], "label": True},
            {"prompt_ids": [6], "completion_ids": [9], "label": False}]
    batch = KtoCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[5, 7, 8], [6, 9, 0]]
    assert batch["labels"].tolist() == [[-100, 7, 8], [-100, 9, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["kto_label"].tolist() == [True, False] and batch["kto_label"].dtype == torch.bool
    assert batch["num_tokens"].item() == 5
    assert batch["kl_input_ids"].tolist() == [[5, 9, 0], [6, 7, 8]]
    assert batch["kl_labels"].tolist() == [[-100, 9, -100], [-100, 7, 8]]
    assert batch["kl_attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_loader_batches_every_pair_once_in_order_or_grouped_by_length():
    rows = [{"prompt_ids": [1] * n, "chosen_ids": [2], "rejected_ids": [3, 3]} for n in (1, 5, 2, 6, 3, 4)]
    ordered = build_preference_loader(rows, batch_size=2, pad_id=0, shuffle=False)
    assert [batch["input_ids"].shape for batch in ordered] == [(4, 7), (4, 8), (4, 6)]
    grouped = build_preference_loader(rows, batch_size=2, pad_id=0, shuffle=True, seed=3, group_by_length=True)
    seen = [int(batch["attention_mask"][2:].sum(1)[i]) for batch in grouped for i in range(2)]
    assert sorted(seen) == [n + 2 for n in (1, 2, 3, 4, 5, 6)]  # each pair once (its prompt + rejected)
