r"""The pipeline on literal records: exact ids and labels for every format, statistics, skipping, mixing, cache.

The word-level tokenizer's ids are positions in SPECIALS + WORDS:
<|im_start|>=0 <|im_end|>=1 <|endoftext|>=2 "\\n"=3 " "=4 assistant=5 user=6 system=7 Hi=8 Hello=9 one=10 two=11
"""

import dataclasses
import json
import os

import numpy as np
import pytest

from ftune.config.schema import DataCfg, DataSourceCfg
from ftune.data.pipeline import (
    LEFT_OUT_BY_MIX,
    NOTHING_TO_LEARN,
    SplitStats,
    build_split,
    build_train_split,
    mix,
    mix_counts,
    mixed_stats,
    tokenize_split,
)
from ftune.data.store import TokenFile
from ftune.errors import DataError

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
WORDS = ["\n", " ", "assistant", "user", "system", "Hi", "Hello", "one", "two"]
X = -100
HI_HELLO = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
# <|im_start|> user \n Hi <|im_end|> \n <|im_start|> assistant \n Hello <|im_end|> \n
CHAT_IDS = [0, 6, 3, 8, 1, 3, 0, 5, 3, 9, 1, 3]
CHAT_LABELS = [X, X, X, X, X, X, X, X, X, 9, 1, X]


@pytest.fixture
def tokenizer(make_word_tokenizer):
    tok = make_word_tokenizer(SPECIALS, WORDS, eos="<|im_end|>")
    tok.pad_token = "<|endoftext|>"
    return tok


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path / "cache"))


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def cfg(path: str, **settings) -> DataCfg:
    return DataCfg(path=path, eval_path=None, **({"chat_template": "chatml"} | settings))


@pytest.mark.parametrize(
    "record",
    [
        {"messages": HI_HELLO},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"instruction": "Hi", "input": "", "output": "Hello"},
        {"prompt": "Hi", "completion": "Hello"},
    ],
)
def test_every_chat_format_tokenizes_to_the_same_labelled_conversation(record, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    examples, stats = tokenize_split(path, tokenizer, cfg(path))
    assert examples == [{"input_ids": CHAT_IDS, "labels": CHAT_LABELS}]
    assert (stats.read, stats.kept, stats.tokens, stats.learned_tokens) == (1, 1, 12, 2)


def test_text_records_learn_every_token_and_end_with_the_separator(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "one two"}])
    examples, stats = tokenize_split(path, tokenizer, cfg(path, chat_template="no-such-template"))
    assert examples == [{"input_ids": [10, 4, 11, 2], "labels": [10, 4, 11, 2]}]  # no chat template needed
    assert stats.sources == [{"path": path, "format": "text", "features": [], "examples": 1}]


@pytest.mark.parametrize(
    ("max_length", "ids", "labels", "truncated", "truncated_learned"),
    [
        (12, CHAT_IDS, CHAT_LABELS, 0, 0),
        (11, CHAT_IDS[:11], CHAT_LABELS[:11], 1, 0),  # only the newline after <|im_end|> is cut
        (10, CHAT_IDS[:10], CHAT_LABELS[:10], 1, 1),  # <|im_end|> is cut: a learned token lost
    ],
)
def test_truncation_keeps_the_start_and_counts_lost_learned_tokens(
    max_length, ids, labels, truncated, truncated_learned, tokenizer, tmp_path
):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": HI_HELLO}])
    examples, stats = tokenize_split(path, tokenizer, cfg(path, max_length=max_length))
    assert examples == [{"input_ids": ids, "labels": labels}]
    assert (stats.truncated, stats.truncated_learned) == (truncated, truncated_learned)


def test_an_example_truncated_to_nothing_learned_is_dropped_and_counted(tokenizer, tmp_path):
    long_prompt = [{"role": "user", "content": "Hi Hi Hi"}, {"role": "assistant", "content": "Hello"}]  # 16 tokens
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": HI_HELLO}, {"messages": long_prompt}])
    examples, stats = tokenize_split(path, tokenizer, cfg(path, max_length=12))
    assert examples == [{"input_ids": CHAT_IDS, "labels": CHAT_LABELS}]
    assert (stats.read, stats.kept, stats.truncated, stats.truncated_learned) == (2, 1, 1, 1)
    assert stats.dropped == {NOTHING_TO_LEARN: 1}


BAD_RECORDS = [
    {"messages": HI_HELLO},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
    {"messages": [{"role": "bot", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    '{"messages": [',
    {"messages": [{"role": "user", "content": "Hi"}]},
    {"text": "one"},
    {"messages": HI_HELLO},
]


def test_skip_counts_bad_records_by_reason_and_keeps_the_good_ones(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", BAD_RECORDS)
    examples, stats = tokenize_split(path, tokenizer, cfg(path, on_bad_record="skip"))
    assert examples == [{"input_ids": CHAT_IDS, "labels": CHAT_LABELS}] * 2
    assert (stats.read, stats.kept) == (7, 2)
    assert stats.dropped == {
        "empty or non-string content": 1,
        "unknown role": 1,
        "not a JSON object": 1,
        "no assistant turn": 1,
        "missing field": 1,
    }


def test_error_mode_stops_at_the_first_bad_record_naming_it(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", BAD_RECORDS)
    with pytest.raises(DataError) as err:
        tokenize_split(path, tokenizer, cfg(path))
    assert err.value.one_line() == f"{path}:2: messages[1].content: expected a non-empty string, got ''"


def test_a_conversation_the_template_cannot_render_is_named_by_its_line(tokenizer, tmp_path):
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "Hi"},
                           {"role": "assistant", "content": "Hello"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    with pytest.raises(DataError) as err:
        tokenize_split(path, tokenizer, cfg(path, chat_template="phi3"))
    assert err.value.one_line() == (
        f"{path}:1: chat template 'phi3' cannot render a user/tool/assistant conversation: phi3 has no tool turn "
        "(fix the conversation, or pick a template that allows it with data.chat_template)"
    )


def test_a_source_with_nothing_left_is_an_error(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": HI_HELLO}])
    with pytest.raises(DataError) as err:
        tokenize_split(path, tokenizer, cfg(path, max_length=9))
    assert err.value.one_line() == f"{path}: no example left to train on (dropped: {{'{NOTHING_TO_LEARN}': 1}})"


@pytest.mark.parametrize(
    ("sizes", "weights", "counts"),
    [
        ([400, 200], [0.8, 0.2], [400, 100]),  # total min(400/0.8, 200/0.2) = 500
        ([400, 200], [1, 1], [200, 200]),  # total 400: the smaller source is taken whole
        ([400, 200], [4, 1], [400, 100]),  # weights are relative
        ([10, 10, 10], [0.5, 0.25, 0.25], [10, 5, 5]),
        ([3, 1000], [0.5, 0.5], [3, 3]),
    ],
)
def test_mix_counts_take_each_share_of_the_largest_total_without_repeats(sizes, weights, counts):
    assert mix_counts(sizes, weights) == counts


def test_mix_draws_a_seeded_sample_and_merges_the_statistics(tmp_path):
    a = TokenFile(tmp_path / "a", lengths=np.array([2, 3, 4, 5]), learned=np.array([1, 2, 3, 4]))
    b = TokenFile(tmp_path / "b", lengths=np.array([3]), learned=np.array([2]))
    stats_a = SplitStats(read=5, kept=4, dropped={NOTHING_TO_LEARN: 1}, sources=[{"path": "a", "examples": 4}])
    stats_b = SplitStats(read=1, kept=1, truncated=1, sources=[{"path": "b", "examples": 1}])
    drawn = mix([4, 1], [0.5, 0.5], seed=0)
    assert [d.tolist() for d in drawn] == [d.tolist() for d in mix([4, 1], [0.5, 0.5], seed=0)]  # deterministic
    assert len(drawn[0]) == 1 and drawn[1].tolist() == [0]
    stats = mixed_stats([stats_a, stats_b], [a, b], drawn, [0.5, 0.5])
    first = int(drawn[0][0])
    assert (stats.read, stats.kept, stats.truncated) == (6, 2, 1)
    assert (stats.tokens, stats.learned_tokens) == (a.lengths[first] + 3, a.learned[first] + 2)
    assert stats.dropped == {NOTHING_TO_LEARN: 1, LEFT_OUT_BY_MIX: 3}
    assert [(s["weight"], s["drawn"]) for s in stats.sources] == [(0.5, 1), (0.5, 1)]
    seeds = {int(mix([4, 1], [0.5, 0.5], seed)[0][0]) for seed in range(20)}
    assert len(seeds) > 1  # the seed decides which examples are drawn


def test_build_train_split_mixes_chat_with_text_replay(tokenizer, tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": HI_HELLO}] * 4)
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "one two"}] * 4)
    data = cfg(chat, mix=[DataSourceCfg(chat, 0.75), DataSourceCfg(text, 0.25)])
    split = build_train_split(tokenizer, data, seed=1)
    assert split.rows.to_list() == [{"input_ids": CHAT_IDS, "labels": CHAT_LABELS}] * 4 + [
        {"input_ids": [10, 4, 11, 2], "labels": [10, 4, 11, 2]}
    ]
    assert split.stats.dropped == {LEFT_OUT_BY_MIX: 3}
    assert [(s["format"], s["drawn"]) for s in split.stats.sources] == [("messages", 4), ("text", 1)]


def test_a_mix_entry_has_its_own_format(tokenizer, tmp_path):
    # bad weights and unknown formats are refused before any data loads (tests/config/test_validate_rules.py)
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "one two", "messages": HI_HELLO}])
    data = cfg(text, format="messages", mix=[DataSourceCfg(text, 1.0, "text")])
    assert build_train_split(tokenizer, data, seed=0).rows.to_list() == [
        {"input_ids": [10, 4, 11, 2], "labels": [10, 4, 11, 2]}
    ]


def test_packing_fills_rows_and_reports_capacity(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": HI_HELLO}] * 3)
    split = build_split(path, tokenizer, cfg(path, packing=True, max_length=24))
    assert [row["seq_lens"] for row in split.rows] == [[12, 12], [12]]
    assert split.rows[0]["labels"] == CHAT_LABELS + [X] + CHAT_LABELS[1:]
    assert split.rows[0]["position_ids"] == list(range(12)) * 2
    assert (split.stats.tokens, split.stats.rows, split.stats.row_capacity) == (36, 2, 48)


def test_a_second_build_is_served_from_the_cache(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": HI_HELLO}])
    first = build_split(path, tokenizer, cfg(path))
    second = build_split(path, tokenizer, cfg(path))
    assert (first.from_cache, second.from_cache) == (False, True)
    assert second.rows.to_list() == first.rows.to_list() == [{"input_ids": CHAT_IDS, "labels": CHAT_LABELS}]
    assert second.stats == first.stats
    assert build_split(path, tokenizer, cfg(path, pad_to_multiple_of=64)).from_cache  # applied per batch


@pytest.mark.parametrize(
    "change",
    [{"max_length": 11}, {"train_on": "everything"}, {"chat_template": "qwen"}, {"packing": True},
     {"on_bad_record": "skip"}, {"roles": {"human": "user"}}, {"format": "messages"}],
)
def test_a_changed_setting_rebuilds(change, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": HI_HELLO}])
    build_split(path, tokenizer, cfg(path))
    assert not build_split(path, tokenizer, dataclasses.replace(cfg(path), **change)).from_cache


def test_changed_content_weights_or_seed_rebuild_and_the_file_is_never_altered(tokenizer, tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": HI_HELLO}] * 2)
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "one"}] * 2)
    before = (open(chat, "rb").read(), os.stat(chat).st_mtime_ns)
    mixed = cfg(chat, mix=[DataSourceCfg(chat, 0.5), DataSourceCfg(text, 0.5)])
    assert not build_train_split(tokenizer, mixed, seed=0).from_cache
    assert build_train_split(tokenizer, mixed, seed=0).from_cache
    assert not build_train_split(tokenizer, mixed, seed=1).from_cache
    assert not build_train_split(tokenizer, cfg(chat, mix=[DataSourceCfg(chat, 0.6), DataSourceCfg(text, 0.4)]),
                                 seed=0).from_cache
    assert (open(chat, "rb").read(), os.stat(chat).st_mtime_ns) == before
    assert build_train_split(tokenizer, cfg(chat), seed=0).from_cache is False
    assert build_train_split(tokenizer, cfg(chat), seed=5).from_cache  # without a mix the seed changes nothing
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": HI_HELLO}] * 3)
    rebuilt = build_train_split(tokenizer, cfg(chat), seed=0)
    assert (rebuilt.from_cache, rebuilt.stats.kept) == (False, 3)


def test_a_directory_source_rebuilds_when_a_file_is_added(tokenizer, tmp_path):
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "a.jsonl", [{"messages": HI_HELLO}])
    directory = str(tmp_path / "d")
    assert build_split(directory, tokenizer, cfg(directory)).stats.kept == 1
    assert build_split(directory, tokenizer, cfg(directory)).from_cache
    write_jsonl(tmp_path / "d" / "b.jsonl", [{"messages": HI_HELLO}])
    split = build_split(directory, tokenizer, cfg(directory))
    assert (split.from_cache, split.stats.kept) == (False, 2)


def test_a_jsonl_saved_with_a_byte_order_mark_and_crlf_builds_the_same_rows(tokenizer, tmp_path):
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"messages": HI_HELLO}] * 2)
    windows = tmp_path / "windows.jsonl"
    windows.write_bytes(b"\xef\xbb\xbf" + open(plain, "rb").read().replace(b"\n", b"\r\n"))
    split = build_split(str(windows), tokenizer, cfg(str(windows)))
    assert split.rows.to_list() == build_split(plain, tokenizer, cfg(plain)).rows.to_list()
    assert split.rows.to_list() == [{"input_ids": CHAT_IDS, "labels": CHAT_LABELS}] * 2


@pytest.mark.parametrize(("check", "decoded"), [("sample", 2), ("all", 20)])
def test_check_labels_sample_decodes_every_16th_record_and_all_decodes_each(check, decoded, tokenizer, tmp_path,
                                                                           monkeypatch):
    from ftune.data import labels

    calls = []
    check_learned_text = labels._check_learned_text
    monkeypatch.setattr(labels, "_check_learned_text", lambda *args: calls.append(1) or check_learned_text(*args))
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": HI_HELLO}] * 20)
    examples, _ = tokenize_split(path, tokenizer, cfg(path, check_labels=check, num_proc=1))
    assert examples == [{"input_ids": CHAT_IDS, "labels": CHAT_LABELS}] * 20
    assert len(calls) == decoded  # records 0 and 16 with a sample
