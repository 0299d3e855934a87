"""The user's reward functions: loaded from `file.py:function` or `package.module:function`, called as TRL calls them.

A reward function has TRL's signature, so a user's TRL reward functions work unchanged:

    fn(prompts, completions, **kwargs) -> list[float | None]

one reward per completion (None: this function does not score that completion). What ftune passes as keywords,
against TRL 1.16's `GRPOTrainer._calculate_rewards` (trl/trainer/grpo_trainer.py, lines 1579-1682):

- every column of the prompts' dataset but `prompt`, repeated for each completion of the prompt, as TRL does (it
  leaves out `prompt`, `completion` and `completion_ids`, which come as the arguments of those names). This is how a
  reward sees its answer key.
- `completion_ids` (the completions' token ids) when the caller has them, as TRL always passes them: a length or
  format reward on tokens uses them, and a function that names the parameter would fail without it.
- not `trainer_state`, `log_extra`, `log_metric` or `environments`: they are TRL's own objects (its `TrainerState`,
  hooks into its completions table and metrics, its tool environments), and an imitation would promise what ftune's
  loop does not have. A function that reads one of them stops with a `RewardError` naming the function and the
  missing key, instead of computing something else.

TRL runs async reward functions concurrently; ftune awaits each in turn (`asyncio.run`). TRL's reward models
(an `nn.Module` or a model id as a reward function) are not user code and are not taken here.

None rewards become NaN; the weighted sum is TRL's: `nansum` over functions of weight * reward, NaN only where every
function returned None (an unscorable completion, lines 2759-2764), which `group_advantages` leaves out of its
group's statistics and gives advantage 0.
"""

import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import numbers
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ftune.errors import ConfigError, StepError, first_line

SPEC_FORMS = "path/to/file.py:function or package.module:function"
TRL_ARGUMENTS = ("prompt", "completion", "completion_ids")  # columns TRL does not pass as keywords
ERROR_CHARS = 200


class RewardError(StepError):
    """A reward function that raised or returned something other than one number (or None) per completion."""


@dataclass(frozen=True)
class RewardFunc:
    """A loaded reward function: its `__name__` (what the metrics call it), the callable, and the spec it came from."""

    name: str
    fn: Callable[..., Any]
    source: str


def load_reward_funcs(specs: Sequence[str], key: str = "grpo.reward_funcs") -> list[RewardFunc]:
    """Each spec's function, or a one-line ConfigError naming `key` and the spec: for start-up, before any model.

    A file path is relative to the current directory and loaded from that path (not through sys.path, so a file
    named like an installed module cannot shadow it or be shadowed); each file is loaded once, so functions of one
    file share its module state.
    """
    return [load_reward_func(spec, key) for spec in specs]


def load_reward_func(spec: str, key: str) -> RewardFunc:
    """One spec's function (see `load_reward_funcs`)."""
    target, _, attribute = str(spec).rpartition(":")
    if not target or not all(part.isidentifier() for part in attribute.split(".")):
        raise ConfigError(f"{key}: {spec!r} is not {SPEC_FORMS}")
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    module = load_file(spec, target, key) if is_file else import_module(spec, target, key)
    fn = module
    for part in attribute.split("."):
        if not hasattr(fn, part):
            names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                           and getattr(v, "__module__", None) == module.__name__)  # its own, not its imports
            raise ConfigError(f"{key}: {spec!r}: {target} has no attribute {attribute!r}",
                              f"it defines {', '.join(names[:10])}" if names else None)
        fn = getattr(fn, part)
    if not callable(fn):
        raise ConfigError(f"{key}: {spec!r}: {attribute} is not callable ({type(fn).__name__}); expected "
                          f"fn(prompts, completions, **columns) -> list[float | None]")
    return RewardFunc(getattr(fn, "__name__", attribute.rsplit(".", 1)[-1]), fn, str(spec))


def load_file(spec: str, target: str, key: str):
    """A reward file's module, executed once from its path under a name of its own, registered in sys.modules.

    Registered because dataclasses defined in the file need their module there, and so that a second spec of the
    same file gets the same module.
    """
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"{key}: {spec!r}: no file {path}", f"a path relative to {Path.cwd()}, or absolute")
    name = f"ftune_reward_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"{key}: {spec!r}: {path} cannot be loaded as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise import_error(spec, str(path), key, err) from None
    return module


def import_module(spec: str, target: str, key: str):
    """An installed (or sys.path) module, or the one-line ConfigError saying why it cannot be imported."""
    try:
        return importlib.import_module(target)
    except Exception as err:
        raise import_error(spec, target, key, err) from None


def import_error(spec: str, target: str, key: str, err: Exception) -> ConfigError:
    """One line for a module that failed to import: where a syntax error is, else the error's first line."""
    if isinstance(err, SyntaxError):
        where = f"{err.filename or target}, line {err.lineno}"
        return ConfigError(f"{key}: {spec!r}: syntax error in {where}: {err.msg}")
    return ConfigError(f"{key}: {spec!r}: importing {target} raised {type(err).__name__}: "
                       f"{first_line(err, ERROR_CHARS)}")


def reward_weights(weights: Sequence[float] | None, n_funcs: int, key: str = "grpo.reward_weights") -> torch.Tensor:
    """The weights as a float32 tensor: all ones for None, else one per reward function (a one-line ConfigError)."""
    if weights is None:
        return torch.ones(n_funcs)
    if len(weights) != n_funcs:
        raise ConfigError(f"{key}: {len(weights)} weights for {n_funcs} reward functions; expected one per function "
                          f"of grpo.reward_funcs, or none (all 1)")
    return torch.tensor([float(w) for w in weights], dtype=torch.float32)


def score(funcs: Sequence[RewardFunc], weights: Sequence[float] | torch.Tensor | None, prompts: list,
          completions: list, columns: dict[str, list], completion_ids: list | None = None,
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every function on every completion: the weighted rewards [n] and each function's rewards [n, k] (float32).

    `columns` are the dataset's other columns, one value per completion (already repeated for the G completions of
    a prompt); `prompts` too has one entry per completion, as TRL passes it. A function that raises, or does not
    return one number or None per completion, raises a one-line `RewardError` naming it.
    """
    n = len(completions)
    if len(prompts) != n or any(len(values) != n for values in columns.values()):
        raise ValueError(f"prompts and every column need one value per completion ({n})")
    weights = weights if isinstance(weights, torch.Tensor) else reward_weights(weights, len(funcs))
    kwargs = {name: values for name, values in columns.items() if name not in TRL_ARGUMENTS}
    if completion_ids is not None:
        kwargs["completion_ids"] = completion_ids
    per_func = torch.empty(n, len(funcs), dtype=torch.float32)
    for i, func in enumerate(funcs):
        per_func[:, i] = torch.tensor(call(func, prompts, completions, kwargs, n), dtype=torch.float32)
    weighted = (per_func * weights.to(per_func).unsqueeze(0)).nansum(dim=1)
    weighted[torch.isnan(per_func).all(dim=1)] = torch.nan  # unscorable: TRL's rewards[unscorable_mask] = nan
    return weighted, per_func


def call(func: RewardFunc, prompts: list, completions: list, kwargs: dict, n: int) -> list[float]:
    """One function's rewards as floats (None as NaN), or a RewardError naming it and what went wrong."""
    try:
        result = func.fn(prompts=prompts, completions=completions, **kwargs)
        if inspect.isawaitable(result):
            result = asyncio.run(result)
    except Exception as err:
        raise RewardError(f"reward function {func.name} ({func.source}) raised {type(err).__name__}: "
                          f"{first_line(err, ERROR_CHARS)}") from None
    if hasattr(result, "tolist"):
        result = result.tolist()  # a numpy array or a tensor, which TRL takes too
    if not isinstance(result, (list, tuple)):
        raise RewardError(f"reward function {func.name} ({func.source}) returned a {type(result).__name__}; "
                          f"expected a list of {n} numbers or None, one per completion")
    if len(result) != n:
        raise RewardError(f"reward function {func.name} ({func.source}) returned {len(result)} rewards for {n} "
                          f"completions; expected one per completion")
    bad = next((value for value in result if value is not None and not isinstance(value, numbers.Real)), None)
    if bad is not None:
        shown = " ".join(repr(bad).split())[:40]
        raise RewardError(f"reward function {func.name} ({func.source}) returned a {type(bad).__name__} ({shown}) "
                          f"among its rewards; expected numbers or None")
    return [torch.nan if value is None else float(value) for value in result]
