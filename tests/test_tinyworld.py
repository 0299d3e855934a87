"""The tinyworld generator behind the embedded model and datasets: determinism, verb splits, verb forms."""

import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # scripts/ is not a package

import build_datasets  # noqa: E402
import tinyworld as world  # noqa: E402

VERBS = {verb[0]: verb for verb in world.REGULAR_VERBS + world.IRREGULAR_VERBS}


def forms(table: tuple[tuple[str, ...], ...]) -> set[str]:
    """Every inflected form (not the complement frame) of the verbs in `table`."""
    return {form for verb in table for form in verb[:5]}


def test_same_seed_same_text_and_other_seed_other_text():
    assert world.generate_documents(30, seed=7) == world.generate_documents(30, seed=7)
    assert world.generate_sentences(30, seed=7) == world.generate_sentences(30, seed=7)
    assert world.generate_documents(30, seed=7) != world.generate_documents(30, seed=8)


def test_verb_tables_are_disjoint_and_large_enough():
    regular = {verb[0] for verb in world.REGULAR_VERBS}
    irregular = {verb[0] for verb in world.IRREGULAR_VERBS}
    assert not regular & irregular
    assert len(regular) >= 30 and len(irregular) >= 30


@pytest.mark.parametrize(("split", "table"), [("regular", world.REGULAR_VERBS), ("irregular", world.IRREGULAR_VERBS)])
def test_verb_split_draws_only_from_its_table(split, table):
    rng = random.Random(0)
    clauses = [c for _ in range(300) for c in world.make_sentence(rng, split).clauses]
    assert {clause.verb for clause in clauses} == set(table)  # only these verbs, and all of them


def test_regular_text_has_no_irregular_verb_form():
    words = {word.strip(".,").lower() for text in world.generate_documents(300, 0, "regular") for word in text.split()}
    assert words & forms(world.IRREGULAR_VERBS) == set()
    assert "walked" in words


@pytest.mark.parametrize(
    ("base", "tense", "plural", "expected"),
    [
        ("go", "past", False, "went"),
        ("eat", "past", True, "ate"),
        ("write", "present_perfect", True, "have written"),
        ("swim", "present_perfect", False, "has swum"),
        ("fly", "present", False, "flies"),
        ("buy", "past", False, "bought"),
        ("run", "past_progressive", True, "were running"),
        ("carry", "past", False, "carried"),
        ("stop", "present_progressive", False, "is stopping"),
        ("sit", "future", True, "will sit"),
    ],
)
def test_conjugate_gives_the_correct_form(base, tense, plural, expected):
    assert world.conjugate(VERBS[base], tense, plural) == expected


def test_render_and_ask_agree_with_the_subject():
    tom = world.Clause("Tom", "he", VERBS["go"], "to the park")
    kids = world.Clause("the children", "they", VERBS["eat"], "an apple")
    assert (
        world.render(world.Sentence((tom, kids), ", and"), "past")
        == "Tom went to the park, and the children ate an apple."
    )
    assert world.render(world.Sentence((kids,)), "present", "every day", time_first=True) == (
        "Every day, the children eat an apple."
    )
    assert world.ask(tom, "past", "complement") == "Where did Tom go?"
    assert world.ask(kids, "present", "complement") == "What do the children eat?"
    assert world.ask(kids, "present_perfect", "subject") == "Who has eaten an apple?"


def test_tense_filter_keeps_only_those_tenses():
    for text in world.generate_sentences(200, 3, tenses=["future"]):
        assert " will " in text
    for text in world.generate_sentences(200, 3, tenses=["past"]):
        assert not {"will", "has", "have", "is", "are", "was", "were"} & set(text.rstrip(".").split())


def test_shipped_preference_files_are_what_the_generator_writes():
    for name, records in build_datasets.pair_files().items():
        shipped = (build_datasets.DATA_DIR / name).read_text().splitlines()
        assert shipped == [json.dumps(record) for record in records], name


def test_shipped_pairs_prefer_the_asked_tense_to_a_misconjugated_one_and_hold_out_their_prompts():
    files = build_datasets.pair_files()
    train, held_out = files["pairs/train.jsonl"], files["pairs/validation.jsonl"]
    assert (len(train), len(held_out)) == (320, 64)
    assert not {json.dumps(pair["prompt"]) for pair in held_out} & {json.dumps(pair["prompt"]) for pair in train}
    for pair in train + held_out:  # the same words but the verb phrase, which the chosen answer conjugates right
        chosen, rejected = pair["chosen"][0]["content"].split(), pair["rejected"][0]["content"].split()
        assert chosen != rejected and chosen[0] == rejected[0] and chosen[-1] == rejected[-1]
    future = [pair for pair in train if "the future" in pair["prompt"][-1]["content"]]
    assert len(future) > 20
    for pair in future:  # "will" then the bare verb, never its 3rd person form
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert " will " in chosen and " will " in rejected
        assert verb_after_will(rejected) == verb_after_will(chosen) + "s" or verb_after_will(rejected).endswith("es")


def verb_after_will(text: str) -> str:
    return text.split(" will ")[1].split()[0]


def test_shipped_kto_rows_are_the_pairs_unpaired():
    files = build_datasets.pair_files()
    for split in ("train", "validation"):
        pairs, rows = files[f"pairs/{split}.jsonl"], files[f"pairs/kto_{split}.jsonl"]
        assert rows == [{"prompt": pair["prompt"], "completion": pair[answer], "label": answer == "chosen"}
                        for pair in pairs for answer in ("chosen", "rejected")]
