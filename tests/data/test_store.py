"""Rows on disk: the same rows from 1 or 2 worker processes, packing planned from lengths, rows gathered exactly."""

import bisect
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
from datasets.table import MemoryMappedTable

from ftune.config.schema import DataCfg
from ftune.data import batches, pipeline
from ftune.data.packing import pack, pack_plan
from ftune.data.store import ROWS_FILE, Documents, TokenWriter, token_positions, write_rows
from ftune.data.templates import TEMPLATES_DIR

CHAT = TEMPLATES_DIR.parent / "data" / "chat" / "train.jsonl"


def reference_bfd(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing as ftune packed before its rows went to disk: a sorted list of (free, row)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    rows, free = [], []
    for index in order:
        slot = bisect.bisect_left(free, (lengths[index], -1))
        if slot == len(free):
            rows.append([index])
            bisect.insort(free, (max_length - lengths[index], len(rows) - 1))
            continue
        space, row = free.pop(slot)
        rows[row].append(index)
        bisect.insort(free, (space - lengths[index], row))
    return rows


def test_pack_plan_from_lengths_fills_the_rows_best_fit_decreasing_exactly():
    members, sizes = pack_plan(np.array([3, 2, 4]), 5)
    assert (members.tolist(), sizes.tolist()) == ([2, 0, 1], [1, 2])
    lengths = [random.Random(seed).randint(1, 64) for seed in range(3000)]
    members, sizes = pack_plan(np.array(lengths), 64)
    rows = np.split(members, np.cumsum(sizes)[:-1])
    assert [row.tolist() for row in rows] == reference_bfd(lengths, 64)


def test_token_positions_lay_spans_end_to_end():
    assert token_positions(np.array([10, 3]), np.array([2, 3])).tolist() == [10, 11, 3, 4, 5]


def examples_of(lengths: list[int], first_id: int) -> list[dict]:
    ids = [list(range(first_id + 100 * n, first_id + 100 * n + length)) for n, length in enumerate(lengths)]
    return [{"input_ids": i, "labels": [-100] + i[1:]} for i in ids]


def write_tokens(directory, examples: list[dict]):
    writer = TokenWriter(directory)
    lengths = np.array([len(e["input_ids"]) for e in examples])
    writer.write(np.concatenate([e["input_ids"] for e in examples]), np.concatenate([e["labels"] for e in examples]),
                 lengths, lengths - 1)
    return writer.close()


@pytest.mark.parametrize("packing_length", [None, 9])
def test_rows_gathered_from_two_sources_equal_the_rows_built_in_memory(packing_length, tmp_path, monkeypatch):
    from ftune.data.store import read_rows

    monkeypatch.setattr("ftune.data.store.ROWS_PER_CHUNK", 2)  # several chunks, each from a fresh memmap
    first, second = examples_of([3, 5, 2, 7], 1000), examples_of([4, 1, 6], 5000)
    files = [write_tokens(tmp_path / "a", first), write_tokens(tmp_path / "b", second)]
    documents = Documents(files, np.array([0, 0, 1, 1]), np.array([1, 3, 0, 2]))  # drawn: a[1], a[3], b[0], b[2]
    drawn = [first[1], first[3], second[0], second[2]]
    row_tokens = write_rows(tmp_path, documents, packing_length)
    rows, lengths = read_rows(tmp_path)
    expected = pack(drawn, packing_length) if packing_length else drawn
    assert rows.to_list() == expected
    assert lengths.tolist() == row_tokens.tolist() == [len(row["input_ids"]) for row in expected]


def chat_source(tmp_path) -> str:
    """The shipped chat records, with planted duplicates and records that do not fit their format."""
    lines = CHAT.read_text().splitlines()[:45]
    lines[10] = lines[3]  # an exact duplicate
    lines[20] = '{"messages": [{"role": "user", "content": "Hi"}]}'  # no assistant turn
    lines[30] = '{"messages": ['  # not JSON
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("packing", [False, True])
def test_two_workers_write_byte_identical_rows_and_statistics(packing, tmp_path, monkeypatch, tiny_model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    source = chat_source(tmp_path)
    monkeypatch.setattr(batches, "RECORDS_PER_BATCH", 4)  # 12 batches over the workers
    built = {}
    for num_proc in (1, 2):
        monkeypatch.setenv("FTUNE_CACHE", str(tmp_path / f"cache-{num_proc}"))
        cfg = DataCfg(path=source, eval_path=None, num_proc=num_proc, packing=packing, max_length=128,
                      on_bad_record="skip", check_labels="all")
        split = pipeline.build_split(source, tokenizer, cfg)
        entry = next((tmp_path / f"cache-{num_proc}" / "data").iterdir())
        built[num_proc] = (hashlib.sha256((entry / ROWS_FILE).read_bytes()).hexdigest(), split.stats,
                           split.lengths.tolist())
    assert built[1] == built[2]
    stats = built[1][1]
    assert (stats.read, stats.kept, sum(stats.dropped.values())) == (45, 43, 2)
    assert stats.dedup["counts"]["exact duplicate"] == 1


def test_the_cache_key_ignores_num_proc(tmp_path, tiny_model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    sources = [pipeline.DataSourceCfg(str(CHAT), 1.0, "auto")]
    keys = {pipeline.split_fingerprint(sources, tokenizer, DataCfg(num_proc=n, eval_path=None), 0) for n in (0, 1, 4)}
    assert len(keys) == 1


def test_the_rows_of_a_split_are_memory_mapped_not_loaded(tmp_path, monkeypatch, tiny_model_path):
    from transformers import AutoTokenizer

    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path / "cache"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    split = pipeline.build_split(str(CHAT), tokenizer, DataCfg(path=str(CHAT), eval_path=None, num_proc=1))
    assert isinstance(split.rows.data, MemoryMappedTable)
    entry = Path(split.rows.cache_files[0]["filename"]).parent
    about = json.loads((entry / "about.json").read_text())
    assert about["rows"] == split.stats.rows == len(split.lengths) == len(split.rows) == 400
    assert about["sources"] == [str(CHAT)] and about["settings"]["max_length"] == 512
