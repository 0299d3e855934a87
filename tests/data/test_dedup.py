"""Duplicates and eval overlap: found exactly where they were planted, reported with counts, removed as asked.

The planted set is ftune/assets/data/dedup (its README says what is where): train lines 2 (exact copy of 1),
4 (near copy of 3), 6 (exact copy of validation 1) and 5 (near copy of validation 2).
"""

import dataclasses
import json

import numpy as np
import pytest

from ftune.config.schema import DataCfg as _DataCfg
from ftune.data import pipeline
from ftune.data.dedup import (
    EVAL_EXACT,
    EVAL_NEAR,
    EXACT,
    NEAR,
    DuplicateFinder,
    Finding,
    dedup_text,
    jaccard,
    overlap_warning,
    shingles,
    sketch,
)
from ftune.data.pipeline import SplitStats, build_split, build_train_split, tokenize_split
from ftune.data.templates import TEMPLATES_DIR

PLANTED = TEMPLATES_DIR.parent / "data" / "dedup"
TRAIN, EVAL = str(PLANTED / "train.jsonl"), str(PLANTED / "validation.jsonl")



def find_duplicates(records: list[tuple[str, dict]], held_out: list[tuple[str, dict]]) -> list[Finding]:
    """Every training record that repeats an earlier one or an eval record, in order, checked one by one.

    Example: records [a: "Hi", b: "Hi", c: "Bye"], held_out [v: "Bye"]
        -> [Finding("exact duplicate", "b", "a", 1.0), Finding("exact eval overlap", "c", "v", 1.0)]
    """
    finder = DuplicateFinder(held_out)
    findings = (finder.check(where, sketch(record, near=True)) for where, record in records)
    return [finding for finding in findings if finding]


@pytest.fixture
def tokenizer(make_tokenizer):
    return make_tokenizer("chatml")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path / "cache"))


def DataCfg(**settings):  # noqa: N802 (the config class, with the template these tests' tokenizer knows)
    return _DataCfg(**({"chat_template": "chatml"} | settings))


def chat(question: str, answer: str, system: str = "Be brief.") -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


def test_the_text_judged_leaves_out_the_system_turn_and_normalises_case_and_spaces():
    assert dedup_text(chat("Hi  There", "Hello")) == "user: hi there\nassistant: hello"
    assert dedup_text(chat("Hi there", "Hello", system="Another long shared prompt.")) == \
        dedup_text(chat("hi THERE", "hello"))
    assert dedup_text({"text": "A  Doc"}) == "a doc"


def test_shingles_hash_each_distinct_5gram_once_and_jaccard_counts_the_shared_ones():
    assert len(shingles("abcdef")) == 2 and len(shingles("abc")) == 1
    assert len(shingles("abcdeabcde")) == 5  # abcde, bcdea, cdeab, deabc, eabcd; abcde again
    assert jaccard(shingles("abcdef"), shingles("abcdeX")) == pytest.approx(1 / 3)  # abcde shared of 3
    assert jaccard(np.array([1, 2], np.uint64), np.array([1, 3], np.uint64)) == pytest.approx(1 / 3)


def test_beyond_the_near_search_limit_only_exact_duplicates_are_looked_for(tokenizer, monkeypatch):
    monkeypatch.setattr(pipeline, "NEAR_SEARCH_LIMIT", 3)
    _, stats = tokenize_split(TRAIN, tokenizer, DataCfg(path=TRAIN, eval_path=EVAL))
    assert stats.dedup["counts"] == {EXACT: 1, NEAR: 0, EVAL_EXACT: 1, EVAL_NEAR: 0}
    assert (stats.dedup["records"], stats.dedup["near_searched"]) == (7, 2)  # lines 1 and 3 (2 is exact)
    _, stats = tokenize_split(TRAIN, tokenizer, DataCfg(path=TRAIN, eval_path=EVAL, dedup="near"))
    assert stats.dedup["counts"] == {EXACT: 1, NEAR: 1, EVAL_EXACT: 1, EVAL_NEAR: 1}  # near searches them all


def test_exact_near_and_eval_findings_in_order_with_their_similarity():
    records = [
        ("t:1", chat("Rewrite in the past tense: The dog eats its dinner slowly.", "The dog ate its dinner slowly.")),
        ("t:2", chat("Rewrite in the past tense: The dog eats its dinner slowly.", "The dog ate its dinner slowly.")),
        ("t:3", chat("Rewrite in the past tense: The dog eats its dinner slowly!", "The dog ate its dinner slowly!")),
        ("t:4", chat("Name a colour.", "Blue.")),
        ("t:5", chat("Something entirely different here.", "Indeed, nothing alike.")),
    ]
    held_out = [("v:1", chat("Name a colour.", "Blue."))]
    findings = find_duplicates(records, held_out)
    assert [(f.kind, f.where, f.other) for f in findings] == [
        (EXACT, "t:2", "t:1"), (NEAR, "t:3", "t:1"), (EVAL_EXACT, "t:4", "v:1")]
    near = findings[1].similarity
    assert near == round(jaccard(shingles(dedup_text(records[2][1])), shingles(dedup_text(records[0][1]))), 3)
    assert 0.8 <= near < 1


def test_a_pair_below_the_threshold_is_not_reported():
    records = [("t:1", chat("Rewrite: Tom reads the paper.", "Tom read the paper.")),
               ("t:2", chat("Rewrite: Leo runs home.", "Leo ran home."))]
    assert find_duplicates(records, []) == []


def test_planted_set_is_reported_and_kept_with_dedup_none(tokenizer):
    examples, stats = tokenize_split(TRAIN, tokenizer, DataCfg(path=TRAIN, eval_path=EVAL))
    assert (stats.read, stats.kept, stats.dropped) == (7, 7, {})
    assert stats.dedup["counts"] == {EXACT: 1, NEAR: 1, EVAL_EXACT: 1, EVAL_NEAR: 1}
    assert stats.dedup["removed"] == {EXACT: 0, NEAR: 0, EVAL_EXACT: 0, EVAL_NEAR: 0}
    assert [(e["kind"], e["where"], e["other"]) for e in stats.dedup["examples"]] == [
        (EXACT, f"{TRAIN}:2", f"{TRAIN}:1"), (NEAR, f"{TRAIN}:4", f"{TRAIN}:3"),
        (EVAL_EXACT, f"{TRAIN}:6", f"{EVAL}:1"), (EVAL_NEAR, f"{TRAIN}:5", f"{EVAL}:2")]


@pytest.mark.parametrize(
    ("mode", "dropped"),
    [("exact", {EXACT: 1, EVAL_EXACT: 1}), ("near", {EXACT: 1, NEAR: 1, EVAL_EXACT: 1, EVAL_NEAR: 1})],
)
def test_dedup_removes_what_it_names_and_counts_it_as_dropped(mode, dropped, tokenizer):
    examples, stats = tokenize_split(TRAIN, tokenizer, DataCfg(path=TRAIN, eval_path=EVAL, dedup=mode))
    assert stats.dropped == dropped
    assert stats.read == stats.kept + sum(stats.dropped.values()) == 7
    assert sum(stats.dedup["removed"].values()) == sum(dropped.values())


def test_the_eval_set_is_not_checked_against_itself_and_without_an_eval_set_only_duplicates(tokenizer):
    _, stats = tokenize_split(EVAL, tokenizer, DataCfg(path=TRAIN, eval_path=EVAL, dedup="near"))
    assert stats.dedup["eval_checked"] is False and stats.dropped == {}
    _, stats = tokenize_split(TRAIN, tokenizer, DataCfg(path=TRAIN, eval_path=None, dedup="near"))
    assert stats.dropped == {EXACT: 1, NEAR: 1}


def test_a_changed_eval_set_rebuilds_the_training_rows(tokenizer, tmp_path):
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text(open(TRAIN).read())
    held_out.write_text(json.dumps(chat("Unrelated question?", "Unrelated answer.")) + "\n")
    data = DataCfg(path=str(train), eval_path=str(held_out), dedup="near")
    assert build_train_split(tokenizer, data, seed=0).stats.kept == 5
    held_out.write_text(open(EVAL).read())
    split = build_train_split(tokenizer, data, seed=0)
    assert (split.from_cache, split.stats.kept) == (False, 3)
    assert build_split(str(held_out), tokenizer, data).stats.kept == 3  # the eval split itself keeps everything


def test_the_overlap_warning_is_loud_and_names_the_first_pair():
    stats = SplitStats()
    stats.dedup = {"mode": "none", "threshold": 0.8, "counts": {EXACT: 0, NEAR: 0, EVAL_EXACT: 1, EVAL_NEAR: 1},
                   "removed": {EXACT: 0, NEAR: 0, EVAL_EXACT: 0, EVAL_NEAR: 0}, "eval_checked": True,
                   "examples": [dataclasses.asdict(Finding(EVAL_EXACT, "t.jsonl:6", "v.jsonl:1", 1.0))]}
    assert overlap_warning(stats.dedup, "v.jsonl") == (
        "WARNING: 2 training example(s) overlap the eval set v.jsonl (1 exact, 1 near; 0 removed by data.dedup=none): "
        "eval loss on them measures memorisation. First: t.jsonl:6 ~ v.jsonl:1 (Jaccard 1)"
    )
    assert overlap_warning({}, "v.jsonl") is None
