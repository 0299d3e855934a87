"""Reward functions: loaded from a user's file or a module, each refusal one line; scored as TRL scores them."""

import math
import sys

import pytest
import torch

from ftune.errors import ConfigError, FtuneError
from ftune.train.rewards import RewardError, RewardFunc, load_reward_funcs, reward_weights, score

REWARDS_PY = """\
from __future__ import annotations

from dataclasses import dataclass

LIMIT = 3
calls = []


@dataclass
class Verdict:  # a dataclass needs its module registered while it is defined
    score: float


def short(prompts, completions, **kwargs):
    calls.append("short")
    return [Verdict(1.0 if len(c) <= LIMIT else 0.0).score for c in completions]


def matches(prompts, completions, answer, **kwargs):
    return [1.0 if c == a else None for c, a in zip(completions, answer)]
"""


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A directory outside the package holding the user's rewards.py, made the current directory."""
    (tmp_path / "rewards.py").write_text(REWARDS_PY)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_users_file_loads_from_its_path_once_not_through_sys_path(user_dir):
    short, matches = load_reward_funcs(["rewards.py:short", "./rewards.py:matches"])
    assert (short.name, short.source) == ("short", "rewards.py:short")
    assert (matches.name, matches.source) == ("matches", "./rewards.py:matches")
    assert short.fn(["p"], ["abc", "abcd"]) == [1.0, 0.0]
    assert short.fn.__globals__ is matches.fn.__globals__  # one module: the file's state is shared
    assert "rewards" not in sys.modules and str(user_dir) not in sys.path


def test_a_file_in_a_subdirectory_and_an_absolute_path(user_dir):
    (user_dir / "sub").mkdir()
    (user_dir / "sub" / "more.py").write_text("def one(prompts, completions, **kw):\n    return [1.0] * len(prompts)\n")
    (funcs,) = load_reward_funcs([f"{user_dir / 'sub' / 'more.py'}:one"])
    assert funcs.name == "one" and funcs.fn(["a"], ["b"]) == [1.0]
    assert load_reward_funcs(["sub/more.py:one"])[0].name == "one"


def test_a_module_function(tmp_path, monkeypatch):
    (tmp_path / "ftune_test_reward_module.py").write_text("def exact(prompts, completions, **kw):\n    return [0.5]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    exact, join = load_reward_funcs(["ftune_test_reward_module:exact", "os.path:join"])
    assert (exact.name, exact.source, exact.fn([], [])) == ("exact", "ftune_test_reward_module:exact", [0.5])
    assert join.name == "join"


@pytest.mark.parametrize(("spec", "expected"), [
    ("rewards.py", "is not path/to/file.py:function or package.module:function"),
    ("rewards.py:", "is not path/to/file.py:function or package.module:function"),
    (":short", "is not path/to/file.py:function or package.module:function"),
    ("missing.py:short", "no file "),
    ("ftune_no_such_module_xyz:fn", "importing ftune_no_such_module_xyz raised ModuleNotFoundError: No module named"),
    ("raises.py:fn", "raises.py raised RuntimeError: bad import"),
    ("broken.py:fn", "syntax error in "),
    ("rewards.py:nope", "has no attribute 'nope'"),
    ("rewards.py:LIMIT", "LIMIT is not callable (int); expected fn(prompts, completions, **columns)"),
])
def test_each_refusal_is_one_line_naming_the_key_and_the_spec(user_dir, spec, expected):
    (user_dir / "raises.py").write_text("raise RuntimeError('bad import\\nsecond line')\n")
    (user_dir / "broken.py").write_text("def fn(prompts, completions):\n    return [\n\ndef other(:\n")
    with pytest.raises(ConfigError) as caught:
        load_reward_funcs(["rewards.py:short", spec], key="grpo.reward_funcs")
    line = caught.value.one_line()
    assert "\n" not in line and "second line" not in line and "Traceback" not in line
    assert line.startswith(f"grpo.reward_funcs: {spec!r}") and expected in line, line


def test_a_syntax_error_names_the_file_and_line(user_dir):
    (user_dir / "broken.py").write_text("def fn(prompts, completions):\n    return [1.0\n\nx = )\n")
    with pytest.raises(ConfigError) as caught:
        load_reward_funcs(["broken.py:fn"])
    assert f"syntax error in {user_dir / 'broken.py'}, line " in caught.value.one_line()
    assert "ftune_reward_broken" not in " ".join(sys.modules)  # a failed load leaves nothing behind


def test_a_missing_attribute_lists_what_the_file_defines(user_dir):
    with pytest.raises(ConfigError) as caught:
        load_reward_funcs(["rewards.py:shrt"])
    assert caught.value.hint == "it defines Verdict, matches, short"  # not its imports


def func(fn, name: str | None = None) -> RewardFunc:
    return RewardFunc(name or fn.__name__, fn, f"tests.py:{name or fn.__name__}")


def test_score_weights_columns_and_none_as_trl(user_dir):
    short, matches = load_reward_funcs(["rewards.py:short", "rewards.py:matches"])
    completions = ["ab", "abcdef", "xyz", "long answer"]
    prompts, columns = ["p1"] * 2 + ["p2"] * 2, {"answer": ["ab", "no", "xyz", "no"], "prompt": ["p1"] * 4}
    weighted, per_func = score([short, matches], [1.0, 2.0], prompts, completions, columns)
    nan = math.nan
    torch.testing.assert_close(per_func, torch.tensor([[1.0, 1.0], [0.0, nan], [1.0, 1.0], [0.0, nan]]),
                               equal_nan=True)
    # TRL 1.16 lines 2763-2764: (rewards_per_func * weights).nansum(dim=1), NaN where every function gave None
    torch.testing.assert_close(weighted, torch.tensor([3.0, 0.0, 3.0, 0.0]))
    _, per_func = score([matches], None, prompts, completions, columns)
    weighted, _ = score([matches], None, prompts, completions, columns)
    torch.testing.assert_close(weighted, per_func[:, 0], equal_nan=True)
    assert weighted.isnan().tolist() == [False, True, False, True]


def test_score_passes_completion_ids_only_when_given_and_never_prompt_as_a_column():
    seen = {}

    def strict(prompts, completions, answer):  # no **kwargs: any extra keyword would fail
        return [1.0] * len(completions)

    def spy(prompts, completions, **kwargs):
        seen.update(kwargs)
        return [len(ids) for ids in kwargs.get("completion_ids", [[]] * len(completions))]

    columns = {"answer": ["a", "b"], "prompt": ["p", "p"]}
    score([func(strict)], None, ["p", "p"], ["x", "y"], columns)
    weighted, _ = score([func(spy)], None, ["p", "p"], ["x", "y"], columns, completion_ids=[[1, 2], [3]])
    assert sorted(seen) == ["answer", "completion_ids"] and weighted.tolist() == [2.0, 1.0]


def test_async_tensor_and_tuple_returns_are_taken_as_trl_takes_them():
    async def later(prompts, completions, **kwargs):
        return [0.25] * len(completions)

    def as_tensor(prompts, completions, **kwargs):
        return torch.tensor([1.0, 2.0])

    def as_tuple(prompts, completions, **kwargs):
        return (True, None)

    _, per_func = score([func(later), func(as_tensor), func(as_tuple)], None, ["p"] * 2, ["a", "b"], {})
    torch.testing.assert_close(per_func, torch.tensor([[0.25, 1.0, 1.0], [0.25, 2.0, math.nan]]), equal_nan=True)


def reads_trainer_state(prompts, completions, **kwargs):
    return [kwargs["trainer_state"].global_step] * len(completions)


def raises_two_lines(prompts, completions, **kwargs):
    raise ValueError("cannot parse\nline two")


@pytest.mark.parametrize(("fn", "expected"), [
    (raises_two_lines, "reward function raises_two_lines (tests.py:raises_two_lines) raised ValueError: cannot parse"),
    (reads_trainer_state, "reward function reads_trainer_state (tests.py:reads_trainer_state) raised KeyError: "
                          "'trainer_state'"),
    (lambda prompts, completions, **kw: [1.0], "returned 1 rewards for 3 completions"),
    (lambda prompts, completions, **kw: 1.0, "returned a float; expected a list of 3 numbers or None"),
    (lambda prompts, completions, **kw: {"a": 1}, "returned a dict; expected a list"),
    (lambda prompts, completions, **kw: [1.0, "0.5", 2.0], "returned a str ('0.5') among its rewards"),
])
def test_a_bad_reward_function_stops_in_one_line_naming_it(fn, expected):
    with pytest.raises(RewardError) as caught:
        score([func(fn, "bad") if fn.__name__ == "<lambda>" else func(fn)], None, ["p"] * 3, ["a", "b", "c"], {})
    line = caught.value.one_line()
    assert "\n" not in line and "line two" not in line and expected in line, line
    if fn.__name__ == "<lambda>":
        assert line.startswith("reward function bad (tests.py:bad) returned")
    assert isinstance(caught.value, FtuneError) and caught.value.exit_code == 1


def test_weights():
    assert reward_weights(None, 3).tolist() == [1.0, 1.0, 1.0]
    assert reward_weights([0.5, 2], 2).tolist() == [0.5, 2.0]
    with pytest.raises(ConfigError) as caught:
        reward_weights([1.0], 2)
    assert caught.value.one_line() == ("grpo.reward_weights: 1 weights for 2 reward functions; expected one per "
                                       "function of grpo.reward_funcs, or none (all 1)")
    with pytest.raises(ConfigError, match="grpo.reward_weights: 3 weights for 1"):
        score([func(lambda prompts, completions, **kw: [1.0], "one")], [1, 2, 3], ["p"], ["c"], {})
