"""Decide, after each evaluation, whether it is the best so far and whether the run should stop."""

from dataclasses import dataclass

from ftune.config.schema import EarlyStopCfg
from ftune.train.state import TrainState


@dataclass
class Verdict:
    improved: bool
    """This evaluation is the new best (and within the forgetting guard)."""
    stop_reason: str | None
    """`early_stop` or `forgetting_guard` when the run should stop now, else None."""


def judge(state: TrainState, row: dict, cfg: EarlyStopCfg, max_drift: float | None) -> Verdict:
    """Update `state`'s best and patience from an evaluation row and say what follows.

    An evaluation whose probe drift exceeds `max_drift` never counts as best, so the best checkpoint is
    always one that stayed within the forgetting guard.
    """
    if cfg.metric not in row:
        raise KeyError(f"early_stop.metric={cfg.metric!r} is not in the evaluation row {sorted(row)}")
    drifted = max_drift is not None and row.get("probe_drift", 0.0) > max_drift
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
