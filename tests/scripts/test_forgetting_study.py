"""The forgetting study script end to end with its --quick budget: results file, plots, and a learning LoRA."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "forgetting_study.py"
RUN_KEYS = ("probe_drift", "task_ppl_before", "task_ppl_after", "probe_ppl_before", "probe_ppl_after")


@pytest.mark.slow  # five training runs and an evaluation: about a minute on 2 CPU cores
def test_quick_study_writes_results_and_plots(tmp_path):
    results_file = tmp_path / "results" / "forgetting.json"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path / "work"), "--json", str(results_file)],
        check=True,
    )

    results = json.loads(results_file.read_text())
    for method in ("lora", "full"):
        assert all(isinstance(results[method][key], float) for key in RUN_KEYS), results[method]
    assert [run["r"] for run in results["sweep"]] == [1, 4, 8, 32]
    assert all({"task_ppl_after", "probe_drift", "trainable_params"} <= run.keys() for run in results["sweep"])
    params = [run["trainable_params"] for run in results["sweep"]]
    assert 0 < params[0] < params[1] < params[2] < params[3] < results["full"]["trainable_params"]
    assert isinstance(results["claim_confirmed"], bool)
    assert (tmp_path / "results" / "forgetting_drift.png").stat().st_size > 0
    assert (tmp_path / "results" / "forgetting_rank.png").stat().st_size > 0
    lora = results["lora"]
    assert lora["task_ppl_after"] < lora["task_ppl_before"]  # even 15 steps teach LoRA some of its task
