"""`judge`: best-checkpoint and early-stop verdicts from literal evaluation rows.

Each test feeds rows as the loop logs them (`step, eval_loss, eval_ppl, probe_ppl, probe_drift`) and checks both
the verdict and what `judge` wrote into the TrainState, because the loop saves that state and `best_step` decides
which checkpoint pruning keeps and which weights `final_weights=best` exports. `judge` sees the config after
`early_stop.metric=auto` is resolved, so every config here names its metric.
"""

import pytest

from ftune.config.schema import EarlyStopCfg
from ftune.train.early_stop import Verdict, judge
from ftune.train.state import TrainState


def stop_cfg(metric: str = "eval_loss", **fields) -> EarlyStopCfg:
    """An early-stop config as the loop receives it: `auto` already resolved to a metric of the row."""
    return EarlyStopCfg(metric=metric, **fields)


def run_evals(rows: list[dict], cfg: EarlyStopCfg, max_drift: float | None = None) -> tuple[TrainState, list]:
    """Judge `rows` in order, each at the step it names, as the loop does after every evaluation."""
    state = TrainState()
    verdicts = []
    for row in rows:
        state.step = row["step"]
        verdicts.append(judge(state, row, cfg, max_drift))
    return state, verdicts


def test_first_evaluation_is_always_the_best():
    state, verdicts = run_evals([{"step": 10, "eval_loss": 3.0}], stop_cfg())
    assert verdicts == [Verdict(improved=True, stop_reason=None)]
    assert (state.best_step, state.best_metric, state.evals_without_improvement) == (10, 3.0, 0)


def test_mode_min_keeps_the_lowest_loss():
    rows = [{"step": 10, "eval_loss": 3.0}, {"step": 20, "eval_loss": 2.5}, {"step": 30, "eval_loss": 2.7}]
    state, verdicts = run_evals(rows, stop_cfg(mode="min"))
    assert [v.improved for v in verdicts] == [True, True, False]
    assert (state.best_step, state.best_metric, state.evals_without_improvement) == (20, 2.5, 1)


def test_mode_max_keeps_the_highest_metric():
    rows = [{"step": 10, "accuracy": 0.5}, {"step": 20, "accuracy": 0.4}, {"step": 30, "accuracy": 0.6}]
    state, verdicts = run_evals(rows, stop_cfg(metric="accuracy", mode="max"))
    assert [v.improved for v in verdicts] == [True, False, True]
    assert (state.best_step, state.best_metric, state.evals_without_improvement) == (30, 0.6, 0)


def test_an_equal_value_is_not_an_improvement():
    """Ties keep the earlier checkpoint as best (strict comparison), in both modes."""
    for mode in ("min", "max"):
        rows = [{"step": 1, "m": 2.0}, {"step": 2, "m": 2.0}]
        state, verdicts = run_evals(rows, stop_cfg(metric="m", mode=mode))
        assert [v.improved for v in verdicts] == [True, False], mode
        assert state.best_step == 1


@pytest.mark.parametrize(
    ("mode", "best", "value", "improved"),
    [
        ("min", 2.0, 1.95, False),  # better by 0.05: not more than min_delta
        ("min", 2.0, 1.85, True),  # better by 0.15
        ("min", 2.0, 1.90, False),  # better by exactly min_delta (up to float rounding): not enough
        ("max", 2.0, 2.05, False),
        ("max", 2.0, 2.15, True),
    ],
)
def test_min_delta_is_the_margin_an_improvement_must_exceed(mode, best, value, improved):
    cfg = stop_cfg(metric="m", mode=mode, min_delta=0.1)
    state, verdicts = run_evals([{"step": 1, "m": best}, {"step": 2, "m": value}], cfg)
    assert verdicts[1].improved is improved
    assert state.best_metric == (value if improved else best)
    assert state.best_step == (2 if improved else 1)


def test_patience_counts_evaluations_without_improvement_then_stops():
    rows = [{"step": s, "eval_loss": loss} for s, loss in [(10, 3.0), (20, 3.1), (30, 3.2), (40, 3.05)]]
    state, verdicts = run_evals(rows, stop_cfg(patience=3))
    assert [v.stop_reason for v in verdicts] == [None, None, None, "early_stop"]
    assert all(not v.improved for v in verdicts[1:])
    assert (state.evals_without_improvement, state.best_step, state.best_metric) == (3, 10, 3.0)


def test_an_improvement_resets_patience():
    losses = [3.0, 3.1, 2.9, 3.0, 3.0]
    rows = [{"step": 10 * (i + 1), "eval_loss": loss} for i, loss in enumerate(losses)]
    state, verdicts = run_evals(rows, stop_cfg(patience=2))
    assert [v.stop_reason for v in verdicts] == [None, None, None, None, "early_stop"]
    assert (state.best_step, state.best_metric) == (30, 2.9)


def test_patience_zero_never_stops():
    rows = [{"step": s, "eval_loss": 3.0 + s} for s in range(1, 21)]
    state, verdicts = run_evals(rows, stop_cfg(patience=0))
    assert all(v.stop_reason is None for v in verdicts)
    assert state.evals_without_improvement == 19


def test_drift_beyond_max_drift_stops_and_is_never_best():
    """The forgetting guard stops the run, and the drifted evaluation cannot become the best checkpoint."""
    rows = [
        {"step": 10, "eval_loss": 3.0, "probe_drift": 0.02},
        {"step": 20, "eval_loss": 2.0, "probe_drift": 0.25},  # a much better loss, but past the guard
    ]
    state, verdicts = run_evals(rows, stop_cfg(),
                                  max_drift=0.1)
    assert verdicts == [Verdict(True, None), Verdict(False, "forgetting_guard")]
    assert (state.best_step, state.best_metric, state.evals_without_improvement) == (10, 3.0, 1)


def test_drift_within_max_drift_is_judged_normally():
    rows = [{"step": 10, "eval_loss": 3.0, "probe_drift": 0.1}, {"step": 20, "eval_loss": 2.0, "probe_drift": 0.1}]
    state, verdicts = run_evals(rows, stop_cfg(), max_drift=0.1)  # equal to the limit is allowed
    assert verdicts == [Verdict(True, None), Verdict(True, None)]
    assert state.best_step == 20


def test_a_drifted_first_evaluation_leaves_no_best():
    rows = [{"step": 5, "eval_loss": 3.0, "probe_drift": 0.5}]
    state, verdicts = run_evals(rows, stop_cfg(), max_drift=0.1)
    assert verdicts == [Verdict(False, "forgetting_guard")]
    assert state.best_step is None and state.best_metric is None


def test_without_max_drift_the_drift_is_ignored():
    rows = [{"step": 10, "eval_loss": 3.0, "probe_drift": 5.0}]
    state, verdicts = run_evals(rows, stop_cfg(), max_drift=None)
    assert verdicts == [Verdict(True, None)]
    assert state.best_step == 10


def test_forgetting_guard_takes_precedence_over_patience():
    """When both would stop, the reason reported is the guard: it is the one the user must act on."""
    rows = [{"step": 10, "eval_loss": 3.0, "probe_drift": 0.0}, {"step": 20, "eval_loss": 3.5, "probe_drift": 0.3}]
    _, verdicts = run_evals(rows, stop_cfg(patience=1), max_drift=0.1)
    assert verdicts[1].stop_reason == "forgetting_guard"


def test_a_metric_missing_from_the_row_is_an_error():
    with pytest.raises(KeyError, match="probe_ppl"):
        judge(TrainState(step=1), {"step": 1, "eval_loss": 3.0}, stop_cfg(metric="probe_ppl"), None)


def test_a_benchmark_drift_beyond_the_guard_stops_and_never_counts_as_best():
    rows = [{"step": 10, "eval_loss": 3.0, "tinyworld_tense_drift": 0.0},
            {"step": 20, "eval_loss": 2.0, "tinyworld_tense_drift": 0.2}]
    state, verdicts = run_evals(rows, stop_cfg(), max_drift=0.1)
    assert verdicts == [Verdict(True, None), Verdict(False, "forgetting_guard")]
    assert state.best_step == 10


def test_with_no_ranking_metric_only_the_guard_decides():
    """Only probe tasks measured (no held-out data, no probe text): early_stop.metric resolves to none."""
    rows = [{"step": 10, "t_drift": 0.01}, {"step": 20, "t_drift": 0.3}]
    state, verdicts = run_evals(rows, stop_cfg(metric="none"), max_drift=0.1)
    assert verdicts == [Verdict(False, None), Verdict(False, "forgetting_guard")]
    assert state.best_step is None
