"""Write ftune's shipped datasets: chat, pairs, GRPO prompts, a forgetting probe, and the shipped lm-eval task's items.

    python scripts/build_datasets.py    # -> ftune/assets/data/{chat,probe,pairs,prompts,arithmetic}/ and tasks/

The lm-eval task (tense agreement, multiple choice) is described in its YAML. The preference pairs (`pairs/`) ask
for a rewrite as the chat task does, with the sentence in the asked tense as chosen and the same rewrite with its
verbs misconjugated as rejected; the KTO files hold the same answers unpaired, each with its label.
The task is new to the embedded model: its pretraining corpus (scripts/build_tiny_model.py) has tinyworld
sentences in every tense but never asks to rewrite one. The GRPO prompts (`prompts/`) ask for one sentence about a
person at a time ("Write a sentence about Nora tomorrow."); the time decides the tense, which the reward functions
of ftune/assets/rewards/tinyworld_tense.py check. Every split uses its own seed, distinct from the
pretraining and evaluation seeds, so all texts here are held out. Output is deterministic.
"""

import argparse
import json
import random
from pathlib import Path

import tinyworld as world

DATA_DIR = Path(__file__).resolve().parents[1] / "ftune" / "assets" / "data"
TASK_FILE = Path("tasks", "tinyworld_tense", "test.jsonl")
"""The shipped lm-eval task's items, relative to the assets directory (the parent of --out)."""
SPLITS = {"train": (400, 4), "validation": (50, 5)}  # split -> (conversations, seed)
PAIR_SPLITS = {"train": (320, 7), "validation": (64, 8)}  # split -> (pairs, seed)
PROMPT_SPLITS = {"train": (400, 9), "validation": (64, 10)}  # split -> (prompts, seed)
ARITHMETIC_SPLITS = {"train": (200, 11), "validation": (32, 12)}  # split -> (problems, seed)
ARITHMETIC_THINGS = ("apples", "books", "cups", "letters", "stamps", "pencils", "coins", "plates")
PROBE_DOCUMENTS, PROBE_SEED = 200, 3
TASK_ITEMS, TASK_SEED = 200, 6
CHOICE_TENSES = ("present", "past", "future", "present_progressive")
"""The tenses a tense-agreement item chooses between, in the order of its choices."""
UNAMBIGUOUS_TIMES = {
    "present": ("every morning", "every day", "on Sundays", "twice a week"),
    "past": ("yesterday", "last week", "two days ago", "last summer"),
    "future": ("tomorrow", "next week", "next summer", "after lunch"),
    "present_progressive": ("right now", "at the moment"),
}
"""Time phrases that fit exactly one of CHOICE_TENSES (tinyworld's "today" or "last night" fit two)."""
SYSTEM_SHARE = 0.8  # the rest of the conversations have no system prompt
SYSTEM_PROMPTS = (
    "You rewrite sentences in the tense the user asks for. Answer with the sentence only.",
    "Rewrite each sentence in the requested tense. Reply with the rewritten sentence and nothing else.",
    "You are a grammar assistant. Change the tense as asked and answer with the sentence only.",
    "Convert the sentence to the tense the user names. Give only the converted sentence.",
)
TENSE_NAMES = {
    "present": ("present simple", "simple present", "present tense"),
    "past": ("past simple", "past tense", "simple past"),
    "present_perfect": ("present perfect",),
    "future": ("future tense", "future with will"),
    "present_progressive": ("present progressive", "present continuous"),
    "past_progressive": ("past progressive", "past continuous"),
}
REQUESTS = (
    "Put this in the {tense}: {sentence}",
    "Rewrite in the {tense}: {sentence}",
    "Change this sentence to the {tense}: {sentence}",
    "Can you put this sentence in the {tense}? {sentence}",
)
FOLLOW_UPS = ("Now in the {tense}.", "And in the {tense}?", "Now put it in the {tense}.")
SENTENCE_REQUESTS = (
    "Write a sentence about {person} {time}.",
    "Write one sentence about {person} {time}.",
    "Tell me something about {person} {time}, in one sentence.",
)
"""GRPO prompts: none names the tense or has a verb that gives it away ("what {person} did"); only the time does."""


def make_conversation(rng: random.Random) -> list[dict[str, str]]:
    """One to three rewriting exchanges; a follow-up re-tenses the last answer or brings a new sentence."""
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < SYSTEM_SHARE else []
    sentence, tense = world.make_sentence(rng), rng.choice(world.TENSES)
    for turn in range(rng.choice((1, 1, 1, 2, 2, 3))):  # about half are multi-turn
        target = rng.choice([t for t in world.TENSES if t != tense])
        target_name = rng.choice(TENSE_NAMES[target])
        if turn > 0 and rng.random() < 0.5:
            user = rng.choice(FOLLOW_UPS).format(tense=target_name)
        else:
            if turn > 0:
                sentence, tense = (
                    world.make_sentence(rng),
                    rng.choice([t for t in world.TENSES if t != target]),
                )
            user = rng.choice(REQUESTS).format(tense=target_name, sentence=world.render(sentence, tense))
        messages += [
            {"role": "user", "content": user},
            {"role": "assistant", "content": world.render(sentence, target)},
        ]
        tense = target
    return messages


def make_pair(rng: random.Random) -> dict:
    """A rewriting request with the sentence in the asked tense as chosen and a wrong verb form of it as rejected.

    The rejected answer is the same rewrite with every verb phrase misconjugated (`wrong_form`): one contrast the
    embedded model's grammar can tell, for every tense and verb, so that preference tuning generalises to
    held-out pairs in a few dozen steps.
    """
    prompt = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < SYSTEM_SHARE else []
    sentence, tense = world.make_sentence(rng), rng.choice(world.TENSES)
    target = rng.choice([t for t in world.TENSES if t != tense])
    user = rng.choice(REQUESTS).format(tense=rng.choice(TENSE_NAMES[target]), sentence=world.render(sentence, tense))
    return {"prompt": [*prompt, {"role": "user", "content": user}],
            "chosen": [{"role": "assistant", "content": world.render(sentence, target)}],
            "rejected": [{"role": "assistant", "content": wrong_form(sentence, target)}]}


def wrong_form(sentence: world.Sentence, tense: str) -> str:
    """`sentence` in `tense` with each verb phrase wrong: broken agreement, or a past auxiliary on the bare verb.

    A past written "was run" rather than as a bare -ing form ("The doctor running"), which was too close to what
    the embedded model reads as grammatical to be learned from.
    """
    def clause(c: world.Clause) -> str:
        base, s3, _, participle, ing = c.verb[:5]
        plural = c.pronoun == "they"
        verb = {"present": base if not plural else s3,
                "past": ("were " if plural else "was ") + base,
                "present_perfect": ("has " if plural else "have ") + participle,
                "future": "will " + s3,
                "present_progressive": ("is " if plural else "are ") + ing,
                "past_progressive": ("was " if plural else "were ") + ing}[tense]
        return f"{c.subject} {verb} {c.rest}"

    text = f"{sentence.joiner} ".join(clause(c) for c in sentence.clauses)
    return text[0].upper() + text[1:] + "."


def unpaired(pairs: list[dict]) -> list[dict]:
    """KTO rows from pairs: each pair's prompt with its chosen answer (label true), then its rejected one (false)."""
    return [{"prompt": pair["prompt"], "completion": pair[answer], "label": answer == "chosen"}
            for pair in pairs for answer in ("chosen", "rejected")]


def pair_files() -> dict[str, list[dict]]:
    """The shipped preference files, by path under the data directory: pairs and KTO rows per split."""
    files = {}
    for split, (count, seed) in PAIR_SPLITS.items():
        rng = random.Random(seed)
        pairs = [make_pair(rng) for _ in range(count)]
        files[f"pairs/{split}.jsonl"], files[f"pairs/kto_{split}.jsonl"] = pairs, unpaired(pairs)
    return files


def make_prompt(rng: random.Random) -> dict:
    """A GRPO prompt: a sentence about a person at a time, whose tense the time decides.

    Columns: `prompt` (one user message), `person`, `time`, `tense` (the tinyworld tense the time asks for, one of
    CHOICE_TENSES) and `reference`, an answer that earns every reward ("Tomorrow, Nora will bake a cake.").
    The embedded model has seen "Write a few sentences about someone." answered with a story in a random tense, so
    its first answers get the tense right about one time in five; the time phrases are the ones that fit one tense
    only (UNAMBIGUOUS_TIMES), so the reward is never ambiguous.
    """
    name, pronoun = world.person(rng)
    tense = rng.choice(CHOICE_TENSES)
    time = rng.choice(UNAMBIGUOUS_TIMES[tense])
    clause = world.make_clause(rng, subject=(name, pronoun))
    user = rng.choice(SENTENCE_REQUESTS).format(person=name, time=time)
    return {"prompt": [{"role": "user", "content": user}], "person": name, "time": time, "tense": tense,
            "reference": world.render(world.Sentence((clause,)), tense, time, time_first=True)}



def make_arithmetic(rng: random.Random) -> dict:
    """A word problem in GSM8K's shape, `question` and `answer` ending in "#### <number>", for GRPO recipes.

    Example: {"question": "Nora has 12 books. Nora gets 7 more books and gives away 5. How many books does Nora have
    now?", "answer": "12 + 7 - 5 = 14" then a new line and "#### 14"}. Small enough for any model to check a reward
    pipeline with.
    """
    name, pronoun = world.person(rng)
    verb = "have" if pronoun == "they" else "has"
    things = rng.choice(ARITHMETIC_THINGS)
    start, more, less = rng.randint(5, 40), rng.randint(2, 30), rng.randint(1, 5)
    question = (f"{name[0].upper()}{name[1:]} {verb} {start} {things}. {name[0].upper()}{name[1:]} "
                f"{'get' if pronoun == 'they' else 'gets'} {more} more {things} and "
                f"{'give' if pronoun == 'they' else 'gives'} away {less}. How many {things} "
                f"{'do' if pronoun == 'they' else 'does'} {name} have now?")
    total = start + more - less
    return {"question": question, "answer": f"{start} + {more} - {less} = {total}\n#### {total}"}

def make_tense_item(rng: random.Random) -> dict:
    """A multiple-choice item: a time phrase and subject, then the clause in each tense; the time phrase decides.

    Example: context "Yesterday, Helen", choices [" eats a pear.", " ate a pear.", " will eat a pear.",
    " is eating a pear."], answer 1. Verbs are drawn from both tables, and `verbs` says which one.
    """
    clause = world.make_clause(rng)
    tense = rng.choice(CHOICE_TENSES)
    time = rng.choice(UNAMBIGUOUS_TIMES[tense])
    plural = clause.pronoun == "they"
    choices = [f" {world.conjugate(clause.verb, other, plural)} {clause.rest}." for other in CHOICE_TENSES]
    verbs = "regular" if clause.verb in world.REGULAR_VERBS else "irregular"
    return {"context": f"{time[0].upper()}{time[1:]}, {clause.subject}", "choices": choices,
            "answer": CHOICE_TENSES.index(tense), "verbs": verbs}


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write one JSON object per line, creating the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    print(f"wrote {path} ({len(records)} records)")


def main() -> None:
    """Write the chat, pairs, prompts, arithmetic and probe files under --out, and the lm-eval task's items."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DATA_DIR)
    out = parser.parse_args().out
    for split, (count, seed) in SPLITS.items():
        rng = random.Random(seed)
        write_jsonl(out / "chat" / f"{split}.jsonl", [{"messages": make_conversation(rng)} for _ in range(count)])
    for name, records in pair_files().items():
        write_jsonl(out / name, records)
    for split, (count, seed) in PROMPT_SPLITS.items():
        rng = random.Random(seed)
        write_jsonl(out / "prompts" / f"{split}.jsonl", [make_prompt(rng) for _ in range(count)])
    for split, (count, seed) in ARITHMETIC_SPLITS.items():
        rng = random.Random(seed)
        write_jsonl(out / "arithmetic" / f"{split}.jsonl", [make_arithmetic(rng) for _ in range(count)])
    probe = world.generate_documents(PROBE_DOCUMENTS, PROBE_SEED)
    write_jsonl(out / "probe" / "general.jsonl", [{"text": text} for text in probe])
    rng = random.Random(TASK_SEED)
    write_jsonl(out.parent / TASK_FILE, [make_tense_item(rng) for _ in range(TASK_ITEMS)])


if __name__ == "__main__":
    main()
