"""Reward functions for math word problems in GSM8K's shape: an answer reward and a format reward.

The prompts file has the problem (GSM8K's `question`, read as the prompt with `data.columns.prompt=question`) and
its `answer`, whose last line is "#### <number>"; the trainer passes `answer` to the functions by name, one entry
per completion, as TRL's GRPOTrainer does. Plain TRL reward functions, loaded by their file's path:

    grpo.reward_funcs=[${ftune_asset:rewards/math_answer.py}:answer_reward,${ftune_asset:rewards/math_answer.py}:think_format_reward]

For a thinking model (Qwen3) the answer is what follows the closed think block; for any other, the whole text.
Like a user's reward file, this one imports the standard library only.
"""

import re

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
THINK_END = "</think>"


def text_of(completion) -> str:
    """The completion's text: a string for text prompts, a message list for conversational ones; else ""."""
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        completion = completion[-1].get("content")
    return completion if isinstance(completion, str) else ""


def final_number(text: str) -> float | None:
    """The last number of `text` ("1,234" is 1234), or None without one."""
    numbers = NUMBER.findall(text)
    return float(numbers[-1].replace(",", "")) if numbers else None


def answer_reward(prompts, completions, answer, **kwargs) -> list[float | None]:
    """1 where the completion's final number (after its think block) is the answer's "#### <number>", else 0.

    None for a row without an answer.
    """
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        if expected is None:
            rewards.append(None)
            continue
        wanted = final_number(str(expected).split("####")[-1])
        got = final_number(text_of(completion).split(THINK_END)[-1])
        rewards.append(float(wanted is not None and got is not None and abs(got - wanted) < 1e-6))
    return rewards


def think_format_reward(prompts, completions, **kwargs) -> list[float]:
    """1 where the completion closes its think block once and then answers (non-empty text after it), else 0."""
    rewards = []
    for completion in completions:
        text = text_of(completion)
        _, closed, after = text.partition(THINK_END)
        rewards.append(float(bool(closed) and text.count(THINK_END) == 1 and bool(after.strip())))
    return rewards
