"""Decide, after each evaluation, whether it is the best so far and whether the run should stop."""

from dataclasses import dataclass

from ftune.config.schema import EarlyStopCfg
from ftune.train.state import TrainState

DRIFT_SUFFIX = "_drift"
"""Evaluation-row keys that measure forgetting against the base: `probe_drift`, `<task>_drift`."""


@dataclass
class Verdict:
    improved: bool
    """This evaluation is the new best (and within the forgetting guard)."""
    stop_reason: str | None
    """`early_stop` or `forgetting_guard` when the run should stop now, else None."""


def judge(state: TrainState, row: dict, cfg: EarlyStopCfg, max_drift: float | None) -> Verdict:
    """Update `state`'s best and patience from an evaluation row and say what follows.

    An evaluation whose drift exceeds `max_drift` on any probe (`probe_drift` of the perplexity, `<task>_drift`
    of each probe task: every `*_drift` of the row) never counts as best, so the best checkpoint is always one
    that stayed within the forgetting guard.
    """
    drifts = [value for key, value in row.items() if key.endswith(DRIFT_SUFFIX)]
    drifted = max_drift is not None and any(drift > max_drift for drift in drifts)
    if cfg.metric == "none":  # nothing ranks the evaluations (only probe tasks are measured): the guard alone
        return Verdict(False, "forgetting_guard" if drifted else None)
    if cfg.metric not in row:
        raise KeyError(f"early_stop.metric={cfg.metric!r} is not in the evaluation row {sorted(row)}")
    value = row[cfg.metric]
    improved = not drifted and (state.best_metric is None or beats(value, state.best_metric, cfg))
    if improved:
        state.best_metric, state.best_step, state.evals_without_improvement = value, state.step, 0
    else:
        state.evals_without_improvement += 1
    if drifted:
        return Verdict(improved, "forgetting_guard")
    if cfg.patience and state.evals_without_improvement >= cfg.patience:
        return Verdict(improved, "early_stop")
    return Verdict(improved, None)


def beats(value: float, best: float, cfg: EarlyStopCfg) -> bool:
    """Whether `value` improves on `best` by more than `min_delta` in the direction of `mode`."""
    return value < best - cfg.min_delta if cfg.mode == "min" else value > best + cfg.min_delta
