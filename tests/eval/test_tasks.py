"""lm-eval glue: reading the harness's results, the drift of a benchmark, and the shipped offline task."""

import pytest

from ftune.eval.tasks import TaskScore, drift, flat_scores, task_scores

LM_EVAL_RESULT = {
    "name": "tinyworld_tense", "alias": "tinyworld_tense", "sample_len": 50,
    "acc,none": 0.98, "acc_stderr,none": 0.02, "acc_norm,none": 0.96, "acc_norm_stderr,none": "N/A",
    "exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.1,
}
"""One task's entry of lm-eval's `results`, as `evaluate` returns it (metric,filter keys)."""


def test_task_scores_pair_each_metric_with_its_standard_error():
    scores = task_scores(LM_EVAL_RESULT, {"acc": True, "acc_norm": True, "exact_match": True})
    assert scores == {
        "acc": TaskScore(0.98, 0.02, True),
        "acc_norm": TaskScore(0.96, None, True),  # lm-eval writes N/A where it has no stderr
        "exact_match[strict-match]": TaskScore(0.5, 0.1, True),
    }
    assert flat_scores({"t": scores})["t/acc"] == 0.98 and flat_scores({"t": scores})["t/acc_stderr"] == 0.02


def test_metric_direction_comes_from_lm_eval():
    assert task_scores({"perplexity,none": 12.0}, {"perplexity": False})["perplexity"].higher_is_better is False


@pytest.mark.parametrize(("value", "base", "higher_is_better", "expected"), [
    (0.9, 1.0, True, 0.1),      # accuracy fell by a tenth of the base's
    (1.0, 0.8, True, -0.25),    # improved: negative drift
    (11.0, 10.0, False, 0.1),   # perplexity rose by 10%
    (0.5, 0.0, True, 0.0),      # no base score to lose
])
def test_drift_is_the_share_of_the_base_score_lost(value, base, higher_is_better, expected):
    assert drift(value, base, higher_is_better) == pytest.approx(expected)


def test_the_shipped_task_loads_offline_from_its_own_files(monkeypatch):
    pytest.importorskip("lm_eval")
    from ftune.eval.tasks import load_tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = load_tasks(["tinyworld_tense"], None, "tasks")
    task = tasks["tinyworld_tense"]
    docs = list(task.test_docs())
    assert len(docs) == 200 and task.OUTPUT_TYPE == "multiple_choice"
    first = docs[0]
    assert task.doc_to_text(first) == first["context"] and task.doc_to_choice(first) == first["choices"]
    assert task.doc_to_target(first) == first["answer"] and len(first["choices"]) == 4


def test_a_users_task_directory_is_searched_and_a_missing_one_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    import shutil

    from ftune.errors import ConfigError
    from ftune.eval.tasks import SHIPPED_TASKS, load_tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    mine = tmp_path / "tasks" / "mine"
    shutil.copytree(SHIPPED_TASKS / "tinyworld_tense", mine)
    yaml = (mine / "tinyworld_tense.yaml").read_text().replace("task: tinyworld_tense", "task: my_tense")
    (mine / "tinyworld_tense.yaml").unlink()
    (mine / "my_tense.yaml").write_text(yaml)
    assert list(load_tasks(["my_tense"], str(tmp_path / "tasks"), "tasks")) == ["my_tense"]
    with pytest.raises(ConfigError, match="task_dir=.*: no such directory"):
        load_tasks(["my_tense"], str(tmp_path / "nowhere"), "tasks")
