"""Reward functions for ftune's shipped GRPO task: one sentence about a person at a given time.

A prompt of ftune/assets/data/prompts/ asks, say, "Write a sentence about Nora tomorrow."; the time decides the tense
of a right answer ("Tomorrow, Nora will bake a cake."). The prompts file names that tense in its `tense` column (one
of "present", "past", "future", "present_progressive"), and the trainer passes each column of the file to the
functions as a keyword argument: a list with one entry per completion, as TRL's GRPOTrainer does. So these are plain
TRL reward functions, `fn(prompts, completions, **columns) -> list[float | None]`, named by file and function:

    grpo:
      reward_funcs:
        - ${ftune_asset:rewards/tinyworld_tense.py}:tense_reward
        - ${ftune_asset:rewards/tinyworld_tense.py}:one_sentence_reward
      reward_weights: [1.0, 0.5]

`tense_reward` is the task's answer; `one_sentence_reward` asks for the form (one finished sentence). Neither checks
that the sentence is about the prompt's person (the `person` column): a third function could. Like a user's reward
file, this one imports the standard library only.
"""

import re

# The verbs of the embedded model's world (scripts/tinyworld.py) as "base 3rd-person past" triples: enough to tell
# "Nora bakes" (present) from "Nora baked" (past). The other tenses are told by their auxiliary ("will bake").
VERB_TABLE = """
walk walks walked, talk talks talked, cook cooks cooked, clean cleans cleaned, open opens opened,
paint paints painted, wash washes washed, watch watches watched, visit visits visited, play plays played,
help helps helped, call calls called, carry carries carried, study studies studied, fix fixes fixed,
travel travels traveled, arrive arrives arrived, stay stays stayed, listen listens listened, move moves moved,
work works worked, finish finishes finished, order orders ordered, bake bakes baked, push pushes pushed,
answer answers answered, stop stops stopped, drop drops dropped, plan plans planned, try tries tried,
hurry hurries hurried, go goes went, eat eats ate, drink drinks drank, see sees saw, write writes wrote,
read reads read, buy buys bought, bring brings brought, take takes took, make makes made, find finds found,
sing sings sang, swim swims swam, run runs ran, drive drives drove, ride rides rode, fly flies flew,
speak speaks spoke, teach teaches taught, sell sells sold, build builds built, draw draws drew,
catch catches caught, throw throws threw, leave leaves left, meet meets met, wear wears wore, lose loses lost,
break breaks broke, choose chooses chose, feed feeds fed, hold holds held, hide hides hid, win wins won,
forget forgets forgot, sit sits sat, sleep sleeps slept
"""
TRIPLES = [entry.split() for entry in VERB_TABLE.split(",")]
SIMPLE_FORMS = {
    "present": {form for base, third, _ in TRIPLES for form in (base, third)},
    "past": {past for _, _, past in TRIPLES},
}
# An auxiliary sets the tense of the verb after it: "will bake", "is baking", "has baked", "was baking".
AUXILIARIES = {
    "will": "future", "is": "present_progressive", "are": "present_progressive", "am": "present_progressive",
    "was": "past_progressive", "were": "past_progressive", "has": "present_perfect", "have": "present_perfect",
}  # fmt: skip
DETERMINERS = {"the", "a", "an", "my", "our", "some"}  # "the cook", "a play": a noun, not a verb


def text_of(completion) -> str:
    """The completion's text: a string for text prompts, a message list for conversational ones; else ""."""
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        completion = completion[-1].get("content")  # [{"role": "assistant", "content": "..."}]
    return completion if isinstance(completion, str) else ""


def verb_tenses(text: str) -> list[set[str]]:
    """The tenses each verb of `text` can be in, in order.

    "Nora read a book and will sing." -> [{"present", "past"}, {"future"}] ("read" is both).
    """
    words = re.findall(r"[a-z]+", text.lower())
    tenses, skip = [], False
    for before, word, after in zip(["", *words], words, [*words[1:], ""], strict=False):
        if skip:  # the verb after an auxiliary belongs to it
            skip = False
        elif word in AUXILIARIES and after:
            tenses.append({AUXILIARIES[word]})
            skip = True
        elif before not in DETERMINERS:
            can_be = {tense for tense, forms in SIMPLE_FORMS.items() if word in forms}
            if can_be:
                tenses.append(can_be)
    return tenses


def tense_reward(prompts, completions, tense, **kwargs) -> list[float | None]:
    """The share of the completion's verbs in the tense that the prompt's time asks for; 0 without a verb.

    None (no reward from this function) for a row without a `tense`, as TRL's reward functions do for rows they
    do not apply to.
    """
    rewards = []
    for completion, wanted in zip(completions, tense, strict=True):
        verbs = verb_tenses(text_of(completion))
        if wanted is None:
            rewards.append(None)
        else:
            rewards.append(sum(wanted in can_be for can_be in verbs) / len(verbs) if verbs else 0.0)
    return rewards


def one_sentence_reward(prompts, completions, **kwargs) -> list[float]:
    """1 for one finished sentence, 1/n for n of them, 0 for no sentence or one cut off at the length limit."""
    rewards = []
    for completion in completions:
        text = text_of(completion).strip()
        finished = re.fullmatch(r"([A-Z][^.!?]*\.\s*)+", text)  # sentences starting with a capital, ending in "."
        rewards.append(1 / text.count(".") if finished else 0.0)
    return rewards
