"""The training stream (`data.streaming`) against the in-memory path.

Same examples, disjoint shares per process, bounded buffers, seeded shuffles, isolated packed documents, and a
resumed loader that continues with the batches of an uninterrupted one.
"""

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from ftune.config.schema import DataCfg
from ftune.data.formats import iter_source
from ftune.data.mask import IGNORE_INDEX
from ftune.data.pipeline import tokenize_split
from ftune.data.stream import (
    build_stream_loader,
    grouped_by_length,
    open_stream,
    packed,
    shuffled,
    stream_records,
    streamed_by_datasets,
)
from ftune.errors import DataError

CHAT = str(Path(__file__).resolve().parents[2] / "ftune" / "assets" / "data" / "chat" / "train.jsonl")
HI_HELLO = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def chat_examples(tokenizer):
    """The shipped chat data as the in-memory path labels it."""
    examples, stats = tokenize_split(CHAT, tokenizer, streaming_cfg(CHAT))
    assert stats.kept == stats.read  # one example per record: rank r's share is examples[r::world]
    return examples


def streaming_cfg(path: str, **settings) -> DataCfg:
    return DataCfg(path=path, eval_path=None, **({"streaming": True, "shuffle_buffer": 0} | settings))


def pairs(examples) -> list[tuple[list[int], list[int]]]:
    return [(list(map(int, e["input_ids"])), list(map(int, e["labels"]))) for e in examples]


def test_streamed_examples_are_the_in_memory_examples_then_the_next_pass(tokenizer, chat_examples):
    stream = open_stream(tokenizer, streaming_cfg(CHAT), seed=0, batch_size=4)
    rows = list(itertools.islice(stream, len(chat_examples) + 2))
    assert pairs(rows[: len(chat_examples)]) == pairs(chat_examples)
    assert pairs(rows[len(chat_examples):]) == pairs(chat_examples[:2])  # unshuffled, the next pass starts over
    assert stream.passes == pytest.approx(1 + 2 / len(chat_examples))


def test_bad_records_are_skipped_or_stop_the_stream_as_in_memory(tokenizer, tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([json.dumps({"messages": HI_HELLO}), "{not json", json.dumps({"messages": []}),
                               json.dumps({"messages": HI_HELLO[::-1] + HI_HELLO})]) + "\n")
    skipping = streaming_cfg(str(path), on_bad_record="skip")
    expected, stats = tokenize_split(str(path), tokenizer, skipping)
    stream = open_stream(tokenizer, skipping, seed=0, batch_size=1)
    assert pairs(itertools.islice(stream, len(expected))) == pairs(expected)
    assert stream.stats.dropped == stats.dropped and len(stats.dropped) == 3  # bad JSON, no messages, unrenderable
    with pytest.raises(DataError, match=r"mixed.jsonl:2: expected a JSON object"):
        list(itertools.islice(open_stream(tokenizer, streaming_cfg(str(path)), seed=0, batch_size=1), 5))


@pytest.mark.parametrize("world", [2, 3])
def test_processes_take_disjoint_shares_that_cover_the_stream(tokenizer, chat_examples, world):
    shares = []
    for rank in range(world):
        stream = open_stream(tokenizer, streaming_cfg(CHAT), seed=0, batch_size=4, rank=rank, world=world)
        shares.append(pairs(itertools.islice(stream, len(chat_examples[rank::world]))))
        assert shares[rank] == pairs(chat_examples[rank::world])  # records rank, rank + world, ...
    assert sorted(itertools.chain(*shares)) == sorted(pairs(chat_examples))


def test_a_process_with_nothing_to_train_on_says_so(tokenizer, tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"messages": HI_HELLO}) + "\n")
    stream = open_stream(tokenizer, streaming_cfg(str(path)), seed=0, batch_size=1, rank=1, world=2)
    with pytest.raises(DataError, match=r"no example left to train on in process 1's share"):
        next(iter(stream))


def pulled_and_yielded(size: int, count: int, seed: int) -> tuple[list[int], int]:
    """`shuffled` over range(count), and the most items it held at once (read but not yet given out)."""
    read = 0

    def source():
        nonlocal read
        for item in range(count):
            read += 1
            yield item

    out, held = [], 0
    for item in shuffled(source(), size, random.Random(seed)):
        held = max(held, read - len(out) - 1)  # the item just given out is no longer held
        out.append(item)
    return out, held


def test_shuffle_holds_at_most_its_buffer_and_is_a_seeded_permutation():
    order, held = pulled_and_yielded(size=16, count=1000, seed=1)
    assert sorted(order) == list(range(1000)) and order != list(range(1000))
    assert held <= 16
    assert all(item - position <= 16 for position, item in enumerate(order))  # early by at most the buffer
    assert pulled_and_yielded(16, 1000, seed=1)[0] == order
    assert pulled_and_yielded(16, 1000, seed=2)[0] != order
    assert pulled_and_yielded(0, 10, seed=1) == (list(range(10)), 0)


def test_stream_order_is_seeded_and_reshuffled_each_pass(tokenizer, chat_examples):
    def first_rows(seed: int, count: int) -> list:
        stream = open_stream(tokenizer, streaming_cfg(CHAT, shuffle_buffer=64), seed=seed, batch_size=4)
        return pairs(itertools.islice(stream, count))

    total = len(chat_examples)
    rows = first_rows(seed=7, count=2 * total)
    assert rows == first_rows(seed=7, count=2 * total)
    assert rows[:total] != first_rows(seed=8, count=total)
    assert rows[:total] != rows[total:] and sorted(rows[:total]) == sorted(rows[total:]) == sorted(pairs(chat_examples))


def test_group_by_length_sorts_windows_longest_first():
    examples = [{"input_ids": [0] * length} for length in (2, 5, 1, 4, 3)]
    assert [len(e["input_ids"]) for e in grouped_by_length(examples, 3)] == [5, 2, 1, 4, 3]


def test_packing_windows_hold_a_bounded_number_of_rows():
    examples = [{"input_ids": np.arange(n), "labels": np.arange(n)} for n in (3, 2, 4, 1)]
    rows = list(packed(examples, max_length=5, window_rows=1))
    assert [row["seq_lens"] for row in rows] == [[3, 2], [4, 1]]
    assert rows[0]["input_ids"] == [0, 1, 2, 0, 1] and rows[0]["position_ids"] == [0, 1, 2, 0, 1]
    assert rows[0]["labels"] == [IGNORE_INDEX, 1, 2, IGNORE_INDEX, 1]  # nothing is predicted across documents


def test_packed_stream_isolates_documents_and_fills_its_rows(tokenizer, chat_examples):
    cfg = streaming_cfg(CHAT, packing=True, max_length=256, shuffle_buffer=100)
    stream = open_stream(tokenizer, cfg, seed=0, batch_size=4)
    rows = []
    for row in stream:
        rows.append(row)
        if stream.pass_number:  # the first row of the second pass
            rows.pop()
            break
    documents = []
    for row in rows:
        assert sum(row["seq_lens"]) == len(row["input_ids"]) <= 256
        starts = np.cumsum([0, *row["seq_lens"][:-1]])
        assert [row["position_ids"][s] for s in starts] == [0] * len(starts)  # positions restart per document
        assert all(row["labels"][s] == IGNORE_INDEX for s in starts)
        documents += [tuple(row["input_ids"][s : s + n]) for s, n in zip(starts, row["seq_lens"], strict=True)]
    assert sorted(documents) == sorted(tuple(e["input_ids"]) for e in chat_examples)  # each once, whole
    fill = sum(len(row["input_ids"]) for row in rows) / (256 * len(rows))
    assert fill > 0.9


@pytest.mark.parametrize("packing", [False, True])
def test_a_resumed_loader_continues_with_the_batches_of_an_uninterrupted_one(tokenizer, packing):
    cfg = streaming_cfg(CHAT, packing=packing, max_length=128, shuffle_buffer=50, group_by_length=not packing)
    straight = list(itertools.islice(build_stream_loader(tokenizer, cfg, "sdpa", 8, seed=3), 70))
    resumed = build_stream_loader(tokenizer, cfg, "sdpa", 8, seed=3).skip_first_batches(55)
    for expected, batch in zip(straight[55:], resumed, strict=False):
        assert expected.keys() == batch.keys()
        assert all(torch.equal(expected[key], batch[key]) for key in expected)


def test_hub_style_directories_are_streamed_by_datasets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]
    (tmp_path / "snapshot" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "snapshot" / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "plain.parquet")
    assert streamed_by_datasets(str(tmp_path / "snapshot")) and streamed_by_datasets("org/name:train")
    assert not streamed_by_datasets(str(tmp_path / "plain.parquet")) and not streamed_by_datasets(str(tmp_path))
    assert [record for _, record in stream_records(str(tmp_path / "snapshot"))] == records
    assert list(stream_records(str(tmp_path / "plain.parquet"))) == list(iter_source(str(tmp_path / "plain.parquet")))
