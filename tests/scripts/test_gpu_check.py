"""`scripts/gpu_check.py --cpu-smoke`: the GPU check's code path end to end on a tiny random Llama, on CPU."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


def test_cpu_smoke_writes_the_summary(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(tmp_path)], check=True,
                   capture_output=True, text=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["device"] == "cpu"
    [row] = summary["rows"]
    assert (row["model"], row["method"], row["tokens_per_step"]) == ("smoke", "lora", 2 * 64)
    assert row["ftune"]["tokens_per_s"] > 0 and row["ftune"]["peak_gb"] is None  # no accelerator to read
    assert 0 < row["plan_gb"] < 0.1
    if importlib.util.find_spec("trl") is not None:  # the bench extra
        assert row["trl"]["tokens_per_s"] > 0 and row["speed_ratio_vs_trl"] > 0
    packing = summary["packing"]
    assert packing["attention"] == "sdpa" and packing["relative_gap"] < 1e-5  # packed rows give the same loss
