"""A small templated English "world": people, places, things and what they do, in several tenses.

ftune ships its own base model and data because nothing may be downloaded. This module is the only source of
that text: the pretraining corpus, the tense-rewriting task and the forgetting probe all come from it, drawn
with different seeds. Sentences are built as tense-free structures (`Sentence`) and rendered in a tense on
demand, so the same sentence can be shown in two tenses (the fine-tuning task) and the verb tables can be
filtered (regular vs irregular verbs, chosen tenses) to make splits for a forgetting study.
"""

import random
from typing import Literal, NamedTuple

# base, 3rd person singular, past simple, past participle, -ing form, complement frame (see FRAMES).
REGULAR_VERBS = (
    ("walk", "walks", "walked", "walked", "walking", "to_place"),
    ("talk", "talks", "talked", "talked", "talking", "to_person"),
    ("cook", "cooks", "cooked", "cooked", "cooking", "food"),
    ("clean", "cleans", "cleaned", "cleaned", "cleaning", "room"),
    ("open", "opens", "opened", "opened", "opening", "thing"),
    ("paint", "paints", "painted", "painted", "painting", "room"),
    ("wash", "washes", "washed", "washed", "washing", "thing"),
    ("watch", "watches", "watched", "watched", "watching", "show"),
    ("visit", "visits", "visited", "visited", "visiting", "person"),
    ("play", "plays", "played", "played", "playing", "game"),
    ("help", "helps", "helped", "helped", "helping", "person"),
    ("call", "calls", "called", "called", "calling", "person"),
    ("carry", "carries", "carried", "carried", "carrying", "thing"),
    ("study", "studies", "studied", "studied", "studying", "subject"),
    ("fix", "fixes", "fixed", "fixed", "fixing", "thing"),
    ("travel", "travels", "traveled", "traveled", "traveling", "to_place"),
    ("arrive", "arrives", "arrived", "arrived", "arriving", "at_place"),
    ("stay", "stays", "stayed", "stayed", "staying", "at_place"),
    ("listen", "listens", "listened", "listened", "listening", "music"),
    ("move", "moves", "moved", "moved", "moving", "thing"),
    ("work", "works", "worked", "worked", "working", "at_place"),
    ("finish", "finishes", "finished", "finished", "finishing", "text"),
    ("order", "orders", "ordered", "ordered", "ordering", "food"),
    ("bake", "bakes", "baked", "baked", "baking", "pastry"),
    ("push", "pushes", "pushed", "pushed", "pushing", "thing"),
    ("answer", "answers", "answered", "answered", "answering", "reply"),
    ("stop", "stops", "stopped", "stopped", "stopping", "vehicle"),
    ("drop", "drops", "dropped", "dropped", "dropping", "thing"),
    ("plan", "plans", "planned", "planned", "planning", "event"),
    ("try", "tries", "tried", "tried", "trying", "food"),
    ("hurry", "hurries", "hurried", "hurried", "hurrying", "to_place"),
)
IRREGULAR_VERBS = (
    ("go", "goes", "went", "gone", "going", "to_place"),
    ("eat", "eats", "ate", "eaten", "eating", "food"),
    ("drink", "drinks", "drank", "drunk", "drinking", "drink"),
    ("see", "sees", "saw", "seen", "seeing", "show"),
    ("write", "writes", "wrote", "written", "writing", "text"),
    ("read", "reads", "read", "read", "reading", "text"),
    ("buy", "buys", "bought", "bought", "buying", "food"),
    ("bring", "brings", "brought", "brought", "bringing", "thing"),
    ("take", "takes", "took", "taken", "taking", "thing"),
    ("make", "makes", "made", "made", "making", "food"),
    ("find", "finds", "found", "found", "finding", "thing"),
    ("sing", "sings", "sang", "sung", "singing", "song"),
    ("swim", "swims", "swam", "swum", "swimming", "water"),
    ("run", "runs", "ran", "run", "running", "to_place"),
    ("drive", "drives", "drove", "driven", "driving", "to_place"),
    ("ride", "rides", "rode", "ridden", "riding", "vehicle"),
    ("fly", "flies", "flew", "flown", "flying", "to_city"),
    ("speak", "speaks", "spoke", "spoken", "speaking", "to_person"),
    ("teach", "teaches", "taught", "taught", "teaching", "subject"),
    ("sell", "sells", "sold", "sold", "selling", "thing"),
    ("build", "builds", "built", "built", "building", "structure"),
    ("draw", "draws", "drew", "drawn", "drawing", "picture"),
    ("catch", "catches", "caught", "caught", "catching", "vehicle"),
    ("throw", "throws", "threw", "thrown", "throwing", "thing"),
    ("leave", "leaves", "left", "left", "leaving", "place"),
    ("meet", "meets", "met", "met", "meeting", "person"),
    ("wear", "wears", "wore", "worn", "wearing", "clothes"),
    ("lose", "loses", "lost", "lost", "losing", "thing"),
    ("break", "breaks", "broke", "broken", "breaking", "thing"),
    ("choose", "chooses", "chose", "chosen", "choosing", "food"),
    ("feed", "feeds", "fed", "fed", "feeding", "animal"),
    ("hold", "holds", "held", "held", "holding", "thing"),
    ("hide", "hides", "hid", "hidden", "hiding", "thing"),
    ("win", "wins", "won", "won", "winning", "contest"),
    ("forget", "forgets", "forgot", "forgotten", "forgetting", "thing"),
    ("sit", "sits", "sat", "sat", "sitting", "in_place"),
    ("sleep", "sleeps", "slept", "slept", "sleeping", "in_place"),
)
TENSES = ("present", "past", "present_perfect", "future", "present_progressive", "past_progressive")
TIME_PHRASES = {
    "present": ("every morning", "every day", "on Sundays", "after school", "twice a week", "in the evening"),
    "past": ("yesterday", "last week", "last night", "two days ago", "last summer", "this morning"),
    "present_perfect": ("today", "this week", "this year", "twice this month", "recently", "this morning"),
    "future": ("tomorrow", "next week", "tonight", "next summer", "soon", "after lunch"),
    "present_progressive": ("now", "right now", "at the moment", "today", "this afternoon"),
    "past_progressive": ("at noon", "all afternoon", "last night", "when the phone rang", "at eight o'clock"),
}
# tense -> (auxiliary for he/she, for they, index of the verb form after it): "Where did Tom go?"
QUESTION_AUX = {
    "present": ("does", "do", 0), "past": ("did", "did", 0), "present_perfect": ("has", "have", 3),
    "future": ("will", "will", 0), "present_progressive": ("is", "are", 4),
    "past_progressive": ("was", "were", 4),
}  # fmt: skip
PLACE_KINDS = {"place", "city", "room", "water"}
JOINERS = (" and", ", and", ", but", ", so", " because")

# Word lists, as comma-separated strings to keep the tables compact; split once below. Kinds named in a verb
# frame (see FRAMES) fill its complement: bare nouns get a determiner, entries starting "the "/"a " do not.
WORDS = {
    "she": "Anna, Maria, Sofia, Emma, Lucy, Clara, Julia, Nina, Sara, Laura, Olivia, Mia, Grace, Alice, "
    "Hannah, Ella, Rosa, Lily, Eva, Chloe, Zoe, Amy, Kate, Helen, Irene, Lena, Nora, Ruth, Vera, Paula, "
    "Diana, Fiona, Ivy, Jane, Lisa, Molly, Nadia, Ada, Beth",
    "he": "Tom, Ben, Sam, Leo, Max, Jack, Noah, Omar, Paul, Peter, Luke, Adam, David, Daniel, Hugo, Ivan, "
    "Jonas, Karl, Liam, Marco, Oscar, Ravi, Simon, Theo, Victor, Felix, George, Henry, Oliver, Mark, Nick, "
    "Owen, Ryan, Eric, Kenji, Amir, Tariq, Lucas",
    "role": "teacher, baker, doctor, farmer, driver, nurse, painter, student, neighbor, cook",
    "group": "the children, the students, my parents, the farmers, our neighbors, the two friends",
    "adjective": "old, new, small, big, red, blue, green, little, yellow, black, white",
    "mass": "bread, soup, rice, pasta, salad, tea, coffee, milk, juice, water, lemonade, chickens, ducks, "
    "cookies, muffins",  # "some bread", never "a bread"
    "bare": "chess, football, tennis, cards, basketball, music",  # never an article
    "place": "park, market, library, school, station, beach, bakery, museum, garden, office, farm, forest, "
    "village, harbor, cafe, zoo, square, hospital",
    "city": "Paris, Rome, London, Lisbon, Berlin, Madrid, Vienna, Oslo, Cairo, Tokyo",
    "room": "kitchen, garage, bedroom, classroom, shop, bathroom, garden, hall, attic",
    "thing": "box, door, window, bag, key, ball, chair, lamp, bottle, basket, map, umbrella, bicycle, table, "
    "letter, cup",
    "food": "bread, soup, cake, apple, sandwich, salad, rice, pasta, pie, cookie, orange, pizza",
    "pastry": "bread, cake, pie, cookies, pizza, muffins",
    "drink": "tea, coffee, milk, juice, water, lemonade",
    "show": "film, movie, game, match, play, show",
    "text": "letter, book, story, poem, report, email, newspaper, note",
    "reply": "the question, the phone, the door, the letter, the email",
    "game": "chess, football, tennis, cards, basketball, the piano, the guitar",
    "contest": "the race, the game, the match, a prize, the contest",
    "subject": "history, math, music, science, French, art, geography",
    "music": "the radio, music, the news, the teacher, the birds",
    "vehicle": "bus, train, bike, horse, taxi",
    "structure": "house, wall, shed, bridge, boat, tower, fence",
    "picture": "picture, map, flower, cat, tree, house",
    "song": "song, lullaby, hymn, tune",
    "clothes": "hat, coat, scarf, jacket, dress, sweater",
    "animal": "cat, dog, horse, chickens, ducks, rabbit, goat",
    "event": "party, trip, picnic, wedding, dinner",
    "water": "lake, river, sea, pool, pond",
}
WORDS = {kind: tuple(text.split(", ")) for kind, text in WORDS.items()}
BARE_KINDS = {"city", "subject"}  # names and school subjects: "to Paris", "math"
DEFINITE = {"place", "room", "water"}  # known, nearby places: "the park", never "a park"
DESCRIBED = {"thing", "structure", "clothes", "animal", "picture"}  # kinds that an adjective fits
# frame -> (preposition, noun kind); "person" frames draw people instead of nouns.
FRAMES = {
    "to_place": ("to", "place"), "at_place": ("at", "place"), "place": ("", "place"),
    "in_place": ("in", "room"), "to_city": ("to", "city"), "to_person": ("to", "person"),
    "person": ("", "person"), "music": ("to", "music"), "water": ("in", "water"),
}  # fmt: skip
VerbFilter = Literal["all", "regular", "irregular"]


class Clause(NamedTuple):
    """One subject doing one thing, without a tense: `render` conjugates it."""

    subject: str  # "Tom", "the children", "she"
    pronoun: str  # "he", "she" or "they": refers back to the subject and decides agreement
    verb: tuple[str, ...]
    rest: str  # the complement, e.g. "to the park"


class Sentence(NamedTuple):
    """One or two clauses; `joiner` links them (e.g. ", but")."""

    clauses: tuple[Clause, ...]
    joiner: str = ""


def select_verbs(verbs: VerbFilter) -> tuple[tuple[str, ...], ...]:
    """The verb table for a split; "regular" and "irregular" never share a verb."""
    tables = {"regular": REGULAR_VERBS, "irregular": IRREGULAR_VERBS, "all": REGULAR_VERBS + IRREGULAR_VERBS}
    return tables[verbs]


def conjugate(verb: tuple[str, ...], tense: str, plural: bool) -> str:
    """The verb phrase of `verb` in `tense`, agreeing with a 3rd person subject."""
    base, s3, past, participle, ing = verb[:5]
    forms = {
        "present": base if plural else s3,
        "past": past,
        "present_perfect": ("have " if plural else "has ") + participle,
        "future": "will " + base,
        "present_progressive": ("are " if plural else "is ") + ing,
        "past_progressive": ("were " if plural else "was ") + ing,
    }
    return forms[tense]


def noun_phrase(rng: random.Random, kind: str) -> str:
    """A noun of `kind` with a fitting determiner and sometimes an adjective ("a small box", "the park")."""
    noun = rng.choice(WORDS[kind])
    if kind in BARE_KINDS or noun in WORDS["bare"] or noun.startswith(("the ", "a ")):
        return noun
    if kind in DESCRIBED and rng.random() < 0.3:
        noun = f"{rng.choice(WORDS['adjective'])} {noun}"
    if kind in DEFINITE or rng.random() < 0.4:
        return f"the {noun}"
    if noun.split()[-1] in WORDS["mass"]:
        return f"some {noun}" if rng.random() < 0.5 else noun
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def person(rng: random.Random) -> tuple[str, str]:
    """A singular or plural person as (how to name them, pronoun)."""
    roll = rng.random()
    if roll < 0.6:
        pronoun = rng.choice(("she", "he"))
        return rng.choice(WORDS[pronoun]), pronoun
    if roll < 0.75:
        return f"the {rng.choice(WORDS['role'])}", rng.choice(("she", "he"))
    if roll < 0.9:
        return f"{rng.choice(WORDS['she'])} and {rng.choice(WORDS['he'])}", "they"
    return rng.choice(WORDS["group"]), "they"


def make_clause(rng: random.Random, verbs: VerbFilter = "all", subject: tuple[str, str] | None = None) -> Clause:
    """A clause with a random verb from the `verbs` split and a complement that fits the verb."""
    verb = rng.choice(select_verbs(verbs))
    preposition, kind = FRAMES.get(verb[5], ("", verb[5]))
    obj = person(rng)[0] if kind == "person" else noun_phrase(rng, kind)
    name, pronoun = subject or person(rng)
    return Clause(name, pronoun, verb, f"{preposition} {obj}".strip())


def make_sentence(rng: random.Random, verbs: VerbFilter = "all", subject: tuple[str, str] | None = None) -> Sentence:
    """A tense-free sentence: one clause, or two linked by a conjunction (the second often a pronoun)."""
    first = make_clause(rng, verbs, subject)
    if rng.random() < 0.6:
        return Sentence((first,))
    again = (first.pronoun, first.pronoun) if rng.random() < 0.5 else None
    return Sentence((first, make_clause(rng, verbs, again)), rng.choice(JOINERS))


def render_clause(clause: Clause, tense: str) -> str:
    """The clause as text in `tense` (no capital, no full stop)."""
    return f"{clause.subject} {conjugate(clause.verb, tense, clause.pronoun == 'they')} {clause.rest}"


def render(sentence: Sentence, tense: str, time: str = "", time_first: bool = False) -> str:
    """The sentence as text in `tense`, with an optional time phrase at the front or the end."""
    parts = [render_clause(clause, tense) for clause in sentence.clauses]
    text = f"{sentence.joiner} ".join(parts)
    if time:
        text = f"{time}, {text}" if time_first else f"{text} {time}"
    return text[0].upper() + text[1:] + "."


def ask(clause: Clause, tense: str, about: Literal["subject", "complement"]) -> str:
    """A question in `tense` that the clause answers: "Who cooked soup?" or "Where did Tom go?"."""
    if about == "subject":
        return f"Who {conjugate(clause.verb, tense, plural=False)} {clause.rest}?"
    preposition, kind = FRAMES.get(clause.verb[5], ("", clause.verb[5]))
    wh = "Where" if kind in PLACE_KINDS else "Who" if kind == "person" else "What"
    singular, plural, form = QUESTION_AUX[tense]
    aux = plural if clause.pronoun == "they" else singular
    dangling = f" {preposition}" if preposition and wh != "Where" else ""  # "Who did Tom talk to?"
    return f"{wh} {aux} {clause.subject} {clause.verb[form]}{dangling}?"


def random_render(rng: random.Random, sentence: Sentence, tense: str) -> str:
    """Render with a time phrase fitting the tense about half the time, as running text does."""
    if rng.random() < 0.5:
        return render(sentence, tense)
    return render(sentence, tense, rng.choice(TIME_PHRASES[tense]), time_first=rng.random() < 0.3)


def make_document(rng: random.Random, verbs: VerbFilter = "all", tenses: tuple[str, ...] = TENSES) -> str:
    """2-6 sentences about one main person, told in one tense that a time phrase sets at the start.

    Like a short story or a routine, the text stays with its person (mostly by pronoun) and its tense; that
    coherence is what the model can learn beyond the word lists, and it keeps held-out perplexity low.
    """
    hero, tense = person(rng), rng.choice(tenses)
    first = make_sentence(rng, verbs, hero)
    sentences = [render(first, tense, rng.choice(TIME_PHRASES[tense]), time_first=rng.random() < 0.6)]
    for _ in range(rng.randint(1, 5)):
        sentence = make_sentence(rng, verbs, (hero[1], hero[1]) if rng.random() < 0.8 else None)
        if rng.random() < 0.9:
            sentences.append(render(sentence, tense))
        else:  # an aside in another tense says when it happens
            other = rng.choice(tenses)
            sentences.append(render(sentence, other, rng.choice(TIME_PHRASES[other])))
    return " ".join(sentences)


def generate_sentences(n: int, seed: int, verbs: VerbFilter = "all", tenses: list[str] | None = None) -> list[str]:
    """`n` independent sentences; the same arguments always give the same list."""
    rng = random.Random(seed)
    allowed = tuple(tenses or TENSES)
    return [random_render(rng, make_sentence(rng, verbs), rng.choice(allowed)) for _ in range(n)]


def generate_documents(n: int, seed: int, verbs: VerbFilter = "all", tenses: list[str] | None = None) -> list[str]:
    """`n` short documents (2-6 sentences); the same arguments always give the same list."""
    rng = random.Random(seed)
    return [make_document(rng, verbs, tuple(tenses or TENSES)) for _ in range(n)]
