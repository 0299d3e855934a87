"""The shipped GRPO task: its prompts files (ftune/assets/data/prompts) and its reward file (ftune/assets/rewards).

The reward functions are loaded by path, as a user's file is, and called with TRL's arguments: conversational
completions, the prompts file's columns as keyword lists. A right answer (each row's `reference`) earns 1 from both;
the same kind of sentence about the row's person and time, in any other tense, earns 0 from the tense reward.
"""

import ast
import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))  # scripts/ is not a package

import build_datasets  # noqa: E402
import tinyworld as world  # noqa: E402

REWARD_FILE = REPO / "ftune" / "assets" / "rewards" / "tinyworld_tense.py"
PROMPT_FILES = [REPO / "ftune" / "assets" / "data" / "prompts" / f"{split}.jsonl" for split in ("train", "validation")]
COLUMNS = {"prompt", "person", "time", "tense", "reference"}


def load_rewards():
    """The reward file as a module, loaded from its path (not importable by name, as a user's file)."""
    spec = importlib.util.spec_from_file_location("tinyworld_tense_rewards", REWARD_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rewards = load_rewards()


def read_rows() -> list[dict]:
    return [json.loads(line) for path in PROMPT_FILES for line in path.read_text().splitlines()]


def as_messages(texts: list) -> list[list[dict]]:
    """Completions as TRL passes them for conversational prompts."""
    return [[{"role": "assistant", "content": text}] for text in texts]


def score(rows: list[dict], texts: list) -> tuple[list, list]:
    """Both rewards for one completion per row, the columns passed by keyword as the trainer does."""
    columns = {key: [row[key] for row in rows] for key in COLUMNS - {"prompt"}}
    prompts, completions = [row["prompt"] for row in rows], as_messages(texts)
    return (rewards.tense_reward(prompts, completions, **columns),
            rewards.one_sentence_reward(prompts, completions, **columns))


def wrong_tense_answer(row: dict, tense: str, rng: random.Random) -> str:
    """A sentence about the row's person at the row's time, with its verb in `tense`."""
    plural = " and " in row["person"] or row["person"] in world.WORDS["group"]
    clause = world.make_clause(rng, subject=(row["person"], "they" if plural else "he"))
    while clause.verb[0] == "read":  # "they read": present and past alike, so never wrong
        clause = world.make_clause(rng, subject=(row["person"], "they" if plural else "he"))
    return world.render(world.Sentence((clause,)), tense, row["time"], time_first=True)


def test_prompts_files_parse_and_carry_the_columns_the_rewards_read():
    for path in PROMPT_FILES:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) == build_datasets.PROMPT_SPLITS[path.stem][0], path
        for row in rows:
            assert set(row) == COLUMNS
            [message] = row["prompt"]
            assert message["role"] == "user"
            assert row["person"] in message["content"] and row["time"] in message["content"]
            assert row["tense"] in build_datasets.CHOICE_TENSES
            assert row["time"] in build_datasets.UNAMBIGUOUS_TIMES[row["tense"]]  # the time decides the tense
    train, validation = ([json.dumps(row["prompt"]) for row in map(json.loads, p.read_text().splitlines())]
                         for p in PROMPT_FILES)
    assert len(set(train)) > 0.9 * len(train) and len(set(validation)) > 0.9 * len(validation)


def test_prompts_are_regenerated_identically():
    for path in PROMPT_FILES:
        count, seed = build_datasets.PROMPT_SPLITS[path.stem]
        rng = random.Random(seed)
        assert [build_datasets.make_prompt(rng) for _ in range(count)] == [
            json.loads(line) for line in path.read_text().splitlines()
        ]


def test_every_reference_answer_earns_both_rewards():
    rows = read_rows()
    tense, form = score(rows, [row["reference"] for row in rows])
    assert tense == [1.0] * len(rows) and form == [1.0] * len(rows)
    as_text = rewards.tense_reward(None, [row["reference"] for row in rows], tense=[row["tense"] for row in rows])
    assert as_text == tense  # text completions (non-conversational prompts) are scored alike


def test_a_wrong_tense_for_the_time_earns_no_tense_reward():
    rng, rows = random.Random(0), read_rows()
    for other in world.TENSES:
        wrong = [row for row in rows if row["tense"] != other]
        tense, form = score(wrong, [wrong_tense_answer(row, other, rng) for row in wrong])
        assert tense == [0.0] * len(wrong), other
        assert form == [1.0] * len(wrong)  # still one finished sentence: only the tense is wrong


def test_the_tense_reward_is_the_share_of_verbs_in_the_asked_tense():
    row = {"prompt": [], "person": "Nora", "time": "yesterday", "tense": "past", "reference": ""}
    texts = ["Yesterday, Nora baked a cake, but she will eat it.",  # one verb of two
             "Yesterday, the cook watched a play.",  # "cook" and "play" are nouns here
             "Nora read a book."]  # "read": present or past, so right for the past
    tense, _ = score([row] * 3, texts)
    assert tense == [0.5, 1.0, 1.0]


@pytest.mark.parametrize(("text", "expected"), [
    ("Tomorrow, Nora will bake a cake.", 1.0),
    ("Nora will bake a cake. She will sing.", 0.5),
    ("Nora will bake a cake. She will", 0.0),  # cut at the length limit
    ("nora will bake a cake.", 0.0),
    ("", 0.0),
])
def test_one_sentence_reward(text, expected):
    assert rewards.one_sentence_reward(None, as_messages([text])) == [expected]


def test_garbage_completions_score_low_without_raising():
    garbage = [None, "", "   ", 42, [], [{}], [{"role": "assistant"}], [{"role": "assistant", "content": None}],
               {"content": "Nora baked."}, "!!! ... ???", "<|im_end|>", "will", "the the the"]
    completions = [c if isinstance(c, list) else [{"role": "assistant", "content": c}] for c in garbage] + garbage
    n = len(completions)
    assert rewards.tense_reward([None] * n, completions, tense=["past"] * n) == [0.0] * n
    assert rewards.one_sentence_reward([None] * n, completions) == [0.0] * n


def test_a_row_without_a_tense_gets_none_from_the_tense_reward():
    assert rewards.tense_reward(None, ["Nora baked.", "Nora bakes."], tense=[None, "past"]) == [None, 0.0]


def test_the_verb_table_is_tinyworlds():
    verbs = world.REGULAR_VERBS + world.IRREGULAR_VERBS
    assert sorted(map(tuple, rewards.TRIPLES)) == sorted(verb[:3] for verb in verbs)


def test_the_reward_file_imports_the_standard_library_only():
    tree = ast.parse(REWARD_FILE.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported and imported <= set(sys.stdlib_module_names)
