"""Preference runs end to end, with the shipped recipe's held-out reward accuracy and `ftune eval` on pairs.

Each loss's first value where the policy is the reference; the reference-free losses and KTO train; exact resume
is in train/test_run_control.py.
"""

import json
import math
from pathlib import Path

import pytest

import ftune.train.objectives.preference as preference
from ftune.cache import cache_dir
from ftune.cli import main
from ftune.config.compose import ASSETS_DIR

FAST = ["recipe=tiny_dpo", "trainer.micro_batch_size=4", "trainer.eval_every=0", "trainer.mixed_precision=no"]
NO_EVAL = [*FAST, "data.eval_path=null"]  # no held-out pass at the end: what these tests check is the training
KTO = ["objective=kto", "data.path=${ftune_asset:data/pairs/kto_train.jsonl}",
       "data.eval_path=${ftune_asset:data/pairs/kto_validation.jsonl}"]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize(("overrides", "expected"), [
    ([], math.log(2)),                                             # sigmoid: -log sigmoid(0)
    (["pref.loss=hinge"], 1.0),                                    # relu(1 - 0)
    (["pref.loss=ipo"], 25.0),                                     # (0 - 1 / (2 beta))^2 at beta 0.1
    (["pref.loss=robust", "pref.label_smoothing=0.1"], math.log(2)),
])
def test_the_first_loss_is_the_losss_value_at_a_zero_margin(overrides, expected, tmp_path):
    """Dropout is off and the reference is the policy with its adapter disabled: the first margin is exactly 0."""
    run_dir = tmp_path / "run"
    assert main(["train", *NO_EVAL, *overrides, "trainer.max_steps=1", f"output_dir={run_dir}"]) == 0
    first = rows(run_dir)[0]
    assert first["loss"] == pytest.approx(expected, abs=1e-4)
    assert first["reward_chosen"] == first["reward_rejected"] == 0.0


@pytest.mark.parametrize("overrides", [["pref.loss=simpo"], ["pref.loss=orpo"], KTO], ids=["simpo", "orpo", "kto"])
def test_reference_free_losses_and_kto_train(overrides, tmp_path):
    run_dir = tmp_path / "run"
    assert main(["train", *NO_EVAL, *overrides, "trainer.max_steps=8", "optim.lr=1e-3",
                 f"output_dir={run_dir}"]) == 0
    losses = [row["loss"] for row in rows(run_dir) if "loss" in row]
    assert len(losses) == 8 and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-4:]) / 4 < losses[0], losses
    assert (run_dir / "final" / "adapter_model.safetensors").exists()
    plots = {path.name for path in (run_dir / "plots").iterdir()}
    assert {"loss.png", "reward_accuracy.png", "reward_margin.png"} <= plots


def test_a_precomputed_reference_trains_as_the_frozen_copy_does_without_loading_one(tmp_path, monkeypatch):
    """Full fine-tuning: a frozen copy's losses and held-out metrics, with no copy loaded.

    The next run with the same model and data reads the table back instead of computing it again.
    """
    pairs = ASSETS_DIR / "data" / "pairs"
    for split, count in (("train", 16), ("validation", 8)):  # the table covers every pair: a few keep this fast
        lines = (pairs / f"{split}.jsonl").read_text().splitlines(keepends=True)[:count]
        (tmp_path / f"{split}.jsonl").write_text("".join(lines))
    full = [*FAST, "method=full", "trainer.max_steps=3", f"data.path={tmp_path / 'train.jsonl'}",
            f"data.eval_path={tmp_path / 'validation.jsonl'}"]
    assert main(["train", *full, f"output_dir={tmp_path / 'copy'}"]) == 0
    monkeypatch.setattr(preference, "load_frozen", refuse_to_load)
    tables = {}
    for run in ("first", "second"):
        assert main(["train", *full, "pref.reference=precompute", f"output_dir={tmp_path / run}"]) == 0
        tables[run] = {path: path.stat().st_mtime_ns for path in cache_dir("reference").glob("*.pt")}
    assert tables["first"] == tables["second"] and tables["first"]  # written once, then read back
    copy, precomputed, again = (rows(tmp_path / run) for run in ("copy", "first", "second"))
    assert precomputed[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    for row, expected in zip(precomputed, copy, strict=True):
        for key in ("loss", "reward_margin", "eval_loss", "eval_reward_accuracy", "eval_reward_margin"):
            assert row.get(key) == pytest.approx(expected.get(key), abs=1e-5), key  # batch shapes differ: 1e-6
    assert [row.get("loss") for row in again] == [row.get("loss") for row in precomputed]


def refuse_to_load(*args):
    raise AssertionError("a precomputed reference loads no frozen copy")


@pytest.mark.slow
def test_tiny_dpo_reaches_a_held_out_reward_accuracy_of_0_9(tmp_path):
    """The recipe's promise (40 steps); it is kept by step 20 already, where the test stops to save CI time."""
    run_dir = tmp_path / "run"
    assert main(["train", "recipe=tiny_dpo", "trainer.max_steps=20", f"output_dir={run_dir}"]) == 0
    accuracy = [row["eval_reward_accuracy"] for row in rows(run_dir) if "eval_reward_accuracy" in row]
    assert len(accuracy) == 2 and max(accuracy) >= 0.9, accuracy


def test_eval_scores_the_base_and_the_dpo_adapter_side_by_side_as_the_run_did(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", *FAST, "trainer.max_steps=4", "trainer.eval_every=4", "optim.lr=1e-3",
                 f"output_dir={run_dir}"]) == 0
    logged = [row for row in rows(run_dir) if "eval_reward_accuracy" in row][-1]
    capsys.readouterr()
    assert main(["eval", f"run={run_dir}", "probe.path=null", "--json"]) == 0
    base, adapter = json.loads(capsys.readouterr().out).values()
    assert (base["kind"], adapter["kind"], base["pairs"], adapter["pairs"]) == ("base", "adapter", 64, 64)
    assert "reward_accuracy" not in base and "eval_loss" not in adapter
    # the run's reference is that base: the same pairs, the same sign of each margin (a near-tie may flip)
    assert adapter["reward_accuracy"] == pytest.approx(logged["eval_reward_accuracy"], abs=1 / 64)
    assert adapter["pair_margin"] - base["pair_margin"] == pytest.approx(
        logged["eval_reward_margin"] / 0.1, rel=0.05)


@pytest.mark.parametrize(("overrides", "expected"), [
    (["objective=kto"], "train.jsonl: format preference is not the preference data this objective trains on"),
    (KTO[1:], "kto_train.jsonl: format unpaired_preference is not the preference data this objective trains on"),
], ids=["kto on pairs", "dpo on unpaired rows"])
def test_each_preference_objective_refuses_the_others_data_in_one_line(overrides, expected, tmp_path, capsys):
    """Before any model loads, exit 2, nothing written (KTO on pairs ended in a KeyError in its first step)."""
    out = tmp_path / "run"
    assert main(["train", "recipe=tiny_dpo", *overrides, f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ftune: error: ") and expected in err, err
    assert not out.exists()
