"""Generation metrics: exact match and SQuAD-style token F1 on literal texts, and what the model is prompted with."""

import pytest

from ftune.eval.generation import exact_match, split_last_answer, summarize, token_f1


@pytest.mark.parametrize(
    ("answer", "reference", "expected"),
    [
        ("the cat sat", "a cat sat down", 2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4)),
        ("The  Cat\nsat", "the cat sat", 1.0),  # lowercased, any whitespace splits
        ("cat cat", "cat", 2 * (1 / 2) * 1 / (1 / 2 + 1)),  # a repeated token counts once per occurrence
        ("dog", "cat", 0.0),
        ("", "", 1.0),
        ("", "cat", 0.0),
    ],
)
def test_token_f1(answer, reference, expected):
    assert token_f1(answer, reference) == pytest.approx(expected)


def test_exact_match_ignores_case_and_spacing_only():
    assert exact_match(" The cat  sat. ", "the cat sat.") == 1.0
    assert exact_match("the cat sat", "the cat sat.") == 0.0


def test_the_prompt_is_every_turn_before_the_last_answer():
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    prompt, reference = split_last_answer(messages)
    assert prompt == messages[:4] and reference == "a2"


def test_summary_averages_the_scores():
    from ftune.eval.generation import GenerationScore

    scores = [GenerationScore("a", "a", 1.0, 1.0, 3), GenerationScore("b", "c", 0.0, 0.0, 5)]
    assert summarize(scores) == {"exact_match": 0.5, "f1": 0.5, "answer_tokens": 4.0, "generated": 2}
