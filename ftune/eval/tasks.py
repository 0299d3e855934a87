"""Standard benchmarks through lm-evaluation-harness: its registry, metrics and standard errors; ftune only wires.

Tasks are named as lm-eval names them (`hellaswag`, `mmlu`), or come from ftune's shipped tasks
(`ftune/assets/tasks`, e.g. `tinyworld_tense`, offline) or a user's directory of task YAML (`task_dir=`). A loaded
model (a PEFT model stays unmerged on its base) is handed to lm-eval's `HFLM` as it is, so what is scored is
exactly the model `ftune eval` and the training loop hold. lm-eval is the optional extra `ftune[eval]`.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

from ftune.errors import ConfigError, ResourceError
from ftune.eval.probe import adapters_disabled
from ftune.model.dropout import eval_mode

SHIPPED_TASKS = Path(__file__).resolve().parents[1] / "assets" / "tasks"
"""ftune's own lm-eval tasks (YAML plus local data), always on the task path."""

INSTALL_HINT = "pip install 'ftune[eval]' (lm-eval)"


def require_lm_eval(key: str) -> None:
    """Fail in one line when `key` asks for benchmarks and lm-eval is not installed.

    Raises:
        ConfigError: lm-eval is missing.
    """
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(f"{key} needs lm-eval, which is not installed", INSTALL_HINT)


def task_manager(names: list[str], task_dir: str | None, key: str):
    """lm-eval's task registry with ftune's tasks and `task_dir` first; its own tasks only when a name needs them.

    Indexing lm-eval's ~15,000 task files takes most of a minute on two CPU cores, so a run that asks only for
    shipped or local tasks skips it.

    Raises:
        ConfigError: `task_dir` is not a directory, or a name is in none of the registries.
    """
    from lm_eval.tasks import TaskManager

    if task_dir is not None and not Path(task_dir).is_dir():
        raise ConfigError(f"task_dir={task_dir}: no such directory", "expected a directory of lm-eval task YAML")
    paths = [str(SHIPPED_TASKS), *([task_dir] if task_dir else [])]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if all(name in manager.all_tasks for name in names):
        return manager
    manager = TaskManager(include_path=paths)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"{key}={names}: {', '.join(unknown)} is not an lm-eval task",
                          "expected a name from `lm-eval ls tasks`, a shipped task (tinyworld_tense), or one in "
                          "task_dir=DIR")
    return manager


def load_tasks(names: list[str], task_dir: str | None, key: str) -> dict:
    """lm-eval's task dictionary of `names` (groups such as mmlu with their subtasks), datasets loaded once.

    Datasets load here, before any model, so a missing one fails in seconds, not after the models load.

    Raises:
        ConfigError: lm-eval missing, or an unknown task.
        ResourceError: a task's dataset is neither cached nor downloadable.
    """
    require_lm_eval(key)
    from lm_eval.tasks import get_task_dict

    manager = task_manager(names, task_dir, key)
    tasks = {}
    for name in names:
        try:
            tasks.update(get_task_dict([name], manager))
        except (ConnectionError, OSError) as err:  # datasets: offline mode, no network, or a missing local file
            raise ResourceError(f"{key}: the dataset of task {name} is not in the datasets cache and could not be "
                                "downloaded", "run once with a network to cache it, or use an "
                                "offline task: tinyworld_tense, or your own in task_dir=DIR") from err
    return tasks


@dataclass(frozen=True)
class TaskScore:
    """One metric of one task, as lm-eval reports it."""

    value: float
    stderr: float | None
    higher_is_better: bool


def run_tasks(model, tokenizer, tasks: dict, names: list[str], limit: int | None,
              batch_size: int) -> dict[str, dict[str, TaskScore]]:
    """Score a loaded model on lm-eval's task dictionary `tasks`; `{name: {metric: TaskScore}}` for `names`.

    lm-eval's `evaluate` scores an `LM` on prepared tasks; unlike `simple_evaluate` it neither reseeds the global
    random generators (a training run that probes keeps its dropout and data order) nor collects environment
    details on every call (seconds each).
    """
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = evaluate(lm=lm, task_dict=tasks, limit=limit, log_samples=False)
    return {name: task_scores(results["results"][name], results["higher_is_better"].get(name, {}))
            for name in names}


def task_scores(result: dict, higher_is_better: dict) -> dict[str, TaskScore]:
    """lm-eval's `{"acc,none": v, "acc_stderr,none": s, ...}` as `{metric: TaskScore}` (filter kept when not none)."""
    scores = {}
    for key, value in result.items():
        metric, _, filter_name = key.partition(",")
        if not filter_name or "_stderr" in metric or not isinstance(value, int | float):
            continue
        name = metric if filter_name == "none" else f"{metric}[{filter_name}]"
        stderr = result.get(f"{metric}_stderr,{filter_name}")
        scores[name] = TaskScore(float(value), float(stderr) if isinstance(stderr, int | float) else None,
                                 higher_is_better.get(metric, True))
    return scores


def flat_scores(scores: dict[str, dict[str, TaskScore]]) -> dict[str, float | None]:
    """`{"task/metric": value, "task/metric_stderr": stderr}`: the form rows and JSON hold."""
    row: dict[str, float | None] = {}
    for task, metrics in scores.items():
        for metric, score in metrics.items():
            row[f"{task}/{metric}"] = score.value
            row[f"{task}/{metric}_stderr"] = score.stderr
    return row


@dataclass
class TaskProbe:
    """Benchmarks as the forgetting probe of a training run: each task's first metric against the base model's.

    A task's drift is the share of the base model's score lost, `(base - now) / base` (signed by the metric's
    direction), so `probe.max_drift` means the same for a benchmark as for the probe perplexity: the fraction by
    which the model got worse.
    """

    tasks: dict
    """lm-eval's task dictionary (`load_tasks`)."""
    names: list[str]
    tokenizer: object
    limit: int | None
    batch_size: int
    base: dict[str, float] = field(default_factory=dict)
    """Each task's metric for the base model, measured once at setup (`measure_base`)."""

    def scores(self, model) -> dict[str, TaskScore]:
        """The first metric of each task (lm-eval's main one, e.g. `acc`) for `model`."""
        with eval_mode(model):
            results = run_tasks(model, self.tokenizer, self.tasks, self.names, self.limit, self.batch_size)
        return {task: next(iter(metrics.values())) for task, metrics in results.items()}

    def measure_base(self, model) -> None:
        """Score the base: `model` before its first step, with any adapters disabled."""
        with adapters_disabled(model):
            self.base = {task: score.value for task, score in self.scores(model).items()}

    def row(self, model) -> dict[str, float]:
        """`{task}_score` and `{task}_drift` of each task, for the evaluation row."""
        row = {}
        for task, score in self.scores(model).items():
            row[f"{task}_score"] = score.value
            row[f"{task}_drift"] = drift(score.value, self.base[task], score.higher_is_better)
        return row


def drift(value: float, base: float, higher_is_better: bool) -> float:
    """The fraction of the base score lost (negative when the model improved); 0 against a base of 0."""
    if base == 0 or not math.isfinite(base):
        return 0.0
    lost = (base - value) if higher_is_better else (value - base)
    return lost / abs(base)
