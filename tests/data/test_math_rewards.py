"""The shipped math reward functions (ftune/assets/rewards/math_answer.py) on the shipped arithmetic problems."""

import importlib.util
import json

import pytest

from ftune.config.compose import ASSETS_DIR

PROBLEMS = ASSETS_DIR / "data" / "arithmetic" / "train.jsonl"


@pytest.fixture(scope="module")
def rewards():
    spec = importlib.util.spec_from_file_location("math_answer", ASSETS_DIR / "rewards" / "math_answer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def problems() -> list[dict]:
    return [json.loads(line) for line in PROBLEMS.read_text().splitlines()]


def test_every_problem_has_a_question_and_a_gsm8k_answer_that_adds_up():
    rows = problems()
    assert len(rows) == 200 and all(set(row) == {"question", "answer"} for row in rows)
    for row in rows:
        sums, total = row["answer"].split("\n#### ")
        assert eval(sums.split(" = ")[0]) == int(total) == int(sums.split(" = ")[1])  # noqa: S307 (our own digits)


def test_the_answer_reward_reads_the_final_number_after_the_think_block(rewards):
    answers = ["3 + 4 = 7\n#### 7"] * 5 + [None]
    completions = [[{"role": "assistant", "content": text}] for text in (
        "<think>3 and 4 make 7, not 8</think>\nThe answer is 7.", "<think>7?</think> It is 8.", "7",
        "<think>1,000 or 7</think>", "no number", "7")]
    assert rewards.answer_reward([None] * 6, completions, answer=answers) == [1.0, 0.0, 1.0, 0.0, 0.0, None]
    assert rewards.answer_reward([None], ["a total of 1,234"], answer=["#### 1234"]) == [1.0]


def test_the_format_reward_wants_one_closed_think_block_then_an_answer(rewards):
    texts = ["<think>x</think> 7", "<think>x</think>", "no think", "<think>a</think> b </think> c", None]
    assert rewards.think_format_reward([None] * 5, texts) == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_the_qwen3_recipe_reads_the_problems_with_their_answers():
    from ftune.config.compose import load_run_config

    cfg = load_run_config(["recipe=grpo_qlora_qwen3_8b"])[0]
    assert cfg.data.columns == {"prompt": "question"} and len(cfg.grpo.reward_funcs) == 2
    assert all(spec.split(":")[0].endswith("math_answer.py") for spec in cfg.grpo.reward_funcs)
