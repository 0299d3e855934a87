"""The method frontier's arithmetic on made-up runs: step time, points, the notes' claims, the table and the plot."""

import json
import os
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))  # scripts/ is not a package

import forgetting_study as study  # noqa: E402
import method_frontier as frontier  # noqa: E402

BITFIT_REFUSAL = "ftune: error: method.train_only=['[.]bias$']: matches no parameter name of the model (...)"


def run(improvement: float, drift: float, params: int, step_s: float = 0.25, rss: float = 800.0) -> dict:
    """One seed's numbers, as `read_run` and `read_costs` give them."""
    return {"task_improvement": improvement, "control_drift": drift, "benchmark_drift": 0.0, "task_ppl": 5.0,
            "trainable_params": params, "train_wall_s": 60.0, "step_s": step_s, "peak_rss_mb": rss}


def point(name: str, lr: float, improvement: float, drift: float, params: int, std: float = 0.0) -> dict:
    """A point of two seeds `std * sqrt(2)` apart in task improvement and drift, so that its std is `std`."""
    half = std / 2 ** 0.5
    curve = study.Curve(name, "tiny_lora", (lr,))
    return frontier.describe_point(curve, lr, [run(improvement - half, drift - half, params),
                                               run(improvement + half, drift + half, params)])


def synthetic_results(without: tuple[str, ...] = ()) -> dict:
    """Full FT, LoRA, and the methods of the claims, with BitFit refused as ftune refuses it on the embedded model."""
    points = [
        point(frontier.FULL, 1e-5, 0.02, -0.01, 4_756_224),
        point(frontier.FULL, 5e-5, 0.06, 0.03, 4_756_224),
        point(frontier.FULL, 2e-4, 0.08, 0.20, 4_756_224),
        point(frontier.LORA, 3e-4, 0.03, -0.02, 221_952, std=0.001),
        point(frontier.LORA, 1e-3, 0.045, 0.01, 221_952, std=0.001),
        point(frontier.ADALORA, 3e-3, 0.05, 0.02, 333_432, std=0.001),
        point(frontier.VERA, 1e-2, 0.03, 0.00, 25_152),
        point(frontier.EWC, 5e-5, 0.04, 0.00, 4_756_224, std=0.002),  # full FT at +4%: -1% + 0.5 x 4% = +1%
        point(frontier.EWC, 2e-4, 0.07, 0.05, 4_756_224),  # full FT at +7%: 3% + 0.5 x 17% = +11.5%
        point(frontier.EWC, 1e-3, 0.10, 0.30, 4_756_224),  # beyond full FT's range: not judged
        point(frontier.UNFREEZING, 5e-5, 0.04, 0.02, 4_756_224),  # above full FT's +1%
        point(frontier.UNFREEZING, 2e-4, 0.07, 0.05, 4_756_224),
        point(frontier.NEFTUNE, 1e-3, 0.0455, 0.01, 221_952, std=0.001),
    ]
    curves = [{"name": name} for name in dict.fromkeys(p["curve"] for p in points)] + [{"name": frontier.BITFIT}]
    return {"points": [p for p in points if p["curve"] not in without], "refused": {frontier.BITFIT: BITFIT_REFUSAL},
            "settings": {"curves": curves}, "machine": {"cpu": "a test CPU"}, "wall_s": 12.0}


def test_step_time_runs_from_the_first_to_the_last_training_row_and_rss_comes_from_the_summary(tmp_path):
    rows = [{"step": 1, "loss": 3.0, "time": 100.0}, {"step": 2, "loss": 2.9, "time": 100.5},
            {"step": 4, "loss": 2.8, "time": 101.5}, {"step": 4, "eval_ppl": 6.0, "probe_drift": 0.1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "summary.json").write_text(json.dumps({"peak_rss_mb": 812.5, "wall_time_s": 90.0}))
    assert frontier.read_costs(tmp_path) == {"step_s": 0.5, "peak_rss_mb": 812.5}


def test_a_point_adds_step_time_spread_and_the_largest_rss_to_the_forgetting_studys_point():
    curve = study.Curve(frontier.VERA, "tiny_lora", (1e-2,), tag="vera")
    runs = [run(0.03, 0.01, 25_152, step_s=0.2, rss=700.0), run(0.05, 0.02, 25_152, step_s=0.4, rss=750.0)]
    described = frontier.describe_point(curve, 1e-2, runs)
    assert described == {**study.describe_point(curve, 1e-2, 0.0, runs),
                         "step_s": {"mean": pytest.approx(0.3), "std": pytest.approx(statistics.stdev([0.2, 0.4]))},
                         "peak_rss_mb": 750.0}


def test_each_claim_is_judged_from_the_points():
    claims = {c["claim"]: c for c in frontier.judge_claims(synthetic_results())}

    adalora = claims["AdaLoRA above LoRA"]  # 5.0% against 4.5%, spread 0.1 + 0.1 points
    assert adalora["verdict"] == frontier.HOLDS
    assert adalora["gain"] == pytest.approx(0.005) and adalora["spread"] == pytest.approx(0.002)
    neftune = claims["NEFTune improves"]  # 4.55% against 4.5%: within the spread
    assert neftune["verdict"] == frontier.FAILS and neftune["gain"] == pytest.approx(0.0005)

    vera = claims["VeRA with far fewer parameters"]
    assert vera["params_ratio"] == pytest.approx(221_952 / 25_152)  # 8.8x: not an order of magnitude
    assert vera["quality"] == pytest.approx(0.03 / 0.045)
    assert vera["verdict"] == frontier.FAILS

    assert claims["BitFit as a lower bound"]["verdict"] == frontier.NOT_APPLICABLE
    assert claims["BitFit as a lower bound"]["evidence"] == BITFIT_REFUSAL

    ewc = claims["EWC reduces forgetting"]
    assert ewc["full_drift_at_equal_improvement"] == pytest.approx([0.01, 0.115])
    assert ewc["verdict"] == frontier.HOLDS
    unfreezing = claims["gradual unfreezing reduces forgetting"]  # +2% against +1%, +5% against +11.5%
    assert unfreezing["verdict"] == "holds at 1 of 2 points"


def test_a_claim_without_its_methods_is_untestable_and_says_which_is_missing():
    claims = {c["claim"]: c for c in frontier.judge_claims(synthetic_results(without=(frontier.VERA, frontier.FULL)))}
    assert claims["VeRA with far fewer parameters"]["verdict"] == frontier.UNTESTABLE
    assert claims["VeRA with far fewer parameters"]["evidence"] == "VeRA: not in this study"
    assert claims["EWC reduces forgetting"]["evidence"] == "full FT: not in this study"
    assert claims["AdaLoRA above LoRA"]["verdict"] == frontier.HOLDS


def test_table_rows_follow_the_curves_and_mark_what_ftune_refused():
    rows = frontier.table_rows(synthetic_results())
    assert len(rows) == 14  # 13 points and BitFit
    assert rows[-1] == [frontier.BITFIT, "", "", frontier.NOT_APPLICABLE, "", "", "", ""]
    assert rows[4] == [frontier.LORA, "0.001", "221,952", "+4.50% ± 0.10%", "+1.00% ± 0.10%", "+0.00% ± 0.00%",
                       "250 ± 0", "800"]
    assert [row[0] for row in rows[:3]] == [frontier.FULL] * 3


def test_the_table_and_plot_are_written(tmp_path, capsys):
    results = synthetic_results()
    results["claims"] = frontier.judge_claims(results)
    frontier.print_table(results)
    printed = capsys.readouterr().out
    assert f"BitFit: {frontier.NOT_APPLICABLE}: {BITFIT_REFUSAL}" in printed
    assert "EWC reduces forgetting: holds" in printed
    frontier.plot_frontier(results, tmp_path / "method_frontier.png")
    assert (tmp_path / "method_frontier.png").read_bytes()[:4] == b"\x89PNG"


def test_a_diverged_point_stays_in_the_table_but_is_named_instead_of_plotted(tmp_path, monkeypatch):
    results = synthetic_results()
    results["points"][0]["task_improvement"] = {"mean": -2.1, "std": 1.4}
    drawn = []
    monkeypatch.setattr(frontier.study, "draw_curves", lambda ax, points, *args: drawn.extend(points))
    frontier.plot_frontier(results, tmp_path / "method_frontier.png")
    assert results["points"][0] not in drawn
    assert len(drawn) == len(results["points"]) - 1
    assert frontier.table_rows(results)[0][3] == "-210.00% ± 140.00%"


def test_every_method_gets_three_rates_distinct_run_names_and_one_rate_when_quick():
    curves = frontier.method_curves(study.FULL_BUDGET, quick=False)
    assert [c.name for c in curves] == [frontier.FULL, frontier.LORA, "DoRA r=8", frontier.ADALORA, frontier.VERA,
                                        "LoHa", "LoKr", "IA3", "prompt tuning", frontier.BITFIT, frontier.EWC,
                                        frontier.UNFREEZING, frontier.NEFTUNE]
    assert all(len(c.lrs) == 3 and list(c.lrs) == sorted(c.lrs) for c in curves)
    names = {study.run_name(c, lr, 0.0, 1) for c in curves for lr in c.lrs}
    assert len(names) == 3 * len(curves)  # every run has its own directory
    unfreezing = next(c for c in curves if c.name == frontier.UNFREEZING)
    assert unfreezing.overrides == ("method.unfreeze_every=20",)  # 6 blocks: the last joins at step 100 of 150

    quick = frontier.method_curves(frontier.QUICK_BUDGET, quick=True)
    assert [c.lrs for c in quick] == [c.lrs[1:2] for c in curves]
    assert quick[-2].overrides == ("method.unfreeze_every=1",)


def test_a_refused_method_returns_ftunes_line_instead_of_stopping(tmp_path):
    env = {**os.environ, "FTUNE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    line = study.run_ftune(["train", "recipe=tiny_full", "method=bitfit", f"output_dir={tmp_path / 'run'}"],
                           tmp_path / "train.log", env, refusal_ok=True)
    assert line.startswith("ftune: error: ") and "bias" in line
    assert not (tmp_path / "run").exists()
