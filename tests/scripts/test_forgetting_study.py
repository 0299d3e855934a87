"""The forgetting study end to end with its --quick budget: every curve, seeds with spread, the frontier plot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "forgetting_study.py"


@pytest.mark.slow  # six short training runs (three points, two seeds) and an evaluation of the base
def test_quick_study_writes_the_frontier_with_spread(tmp_path):
    pytest.importorskip("lm_eval")
    results_file = tmp_path / "results" / "forgetting.json"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path / "work"), "--json", str(results_file)],
        check=True,
    )

    results = json.loads(results_file.read_text())
    assert [p["curve"] for p in results["points"]] == ["full FT", "LoRA r=2", "full FT + replay"]
    for point in results["points"]:
        assert len(point["seeds"]) == 2
        for key in ("task_improvement", "control_drift", "benchmark_drift"):
            values = [run[key] for run in point["seeds"]]
            assert point[key]["mean"] == pytest.approx(sum(values) / 2)
            assert point[key]["std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    full, lora, replay = results["points"]
    assert replay["replay"] == 0.3 and full["replay"] == 0.0
    assert 0 < lora["trainable_params"] < full["trainable_params"] == replay["trainable_params"]
    assert full["seeds"][0]["control_drift"] != full["seeds"][1]["control_drift"]  # the seed changes the run
    assert results["base"]["task_ppl"] > 1.0 and 0.0 <= results["base"]["benchmark_acc"] <= 1.0
    assert results["claim_holds"] in (True, False, None)
    assert (tmp_path / "results" / "forgetting_frontier.png").stat().st_size > 0
