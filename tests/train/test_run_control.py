"""Runs users can leave alone: exact resume after SIGKILL, SIGINT, the NaN guard, early stopping, forgetting guard."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftune.cache import cache_dir
from ftune.cli import main
from ftune.config.compose import ASSETS_DIR, load_run_config

SHORT = ["recipe=tiny_lora", "trainer.micro_batch_size=4", "trainer.eval_every=0", "trainer.mixed_precision=no"]


def start_train(*overrides: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "ftune", "train", *overrides], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, text: str = "", timeout: float = 300) -> None:
    """Wait until `path` exists (and holds `text`) while `process` runs; the timeout only stops a hang."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text()):
        assert process.poll() is None, f"run ended before {path} appeared: {process.stderr.read()}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "adapter_model.safetensors")


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def eval_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval_loss" in r]


def kill_after_checkpoint_then_resume(run: list[str], step: int, tmp_path: Path, before_resume=None) -> Path:
    """Train `run` straight through, and again killed (SIGKILL) once checkpoint `step` is written, then resumed.

    `before_resume()`, when given, runs just before the resume. Asserts the resumed run's final adapter equals the
    uninterrupted one's; returns the resumed run's directory.
    """
    straight = tmp_path / "straight"
    assert main(["train", *run, f"output_dir={straight}"]) == 0

    killed = tmp_path / "killed"
    process = start_train(*run, f"output_dir={killed}")
    wait_for(killed / "checkpoints" / f"step-{step}" / "train_state.json", process)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (killed / "final").exists()
    if before_resume is not None:
        before_resume()
    assert main(["train", *run, f"output_dir={killed}", "resume=auto"]) == 0

    expected, resumed = adapter(straight), adapter(killed)
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)
    return killed


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume_equals_uninterrupted_run(tmp_path):
    run = [*SHORT, "trainer.max_steps=20", "trainer.save_every=5", "trainer.grad_accum=2"]
    killed = kill_after_checkpoint_then_resume(run, 5, tmp_path)
    assert summary(killed)["steps"] == 20


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vera", "loha", "lokr", "adalora"])
def test_the_other_peft_methods_resume_exactly(tmp_path, method):
    """With their dropouts on (VeRA's on the input, LoHa's and LoKr's rank dropout), so the RNG state counts too.

    AdaLoRA is killed while its budget shrinks (6 steps: 1 of warmup, 1 final), so its importance estimates must
    come back from the checkpoint for the same singular values to be cut.
    """
    run = [*SHORT, f"method={method}", "lora.dropout=0.1", "trainer.max_steps=6", "trainer.save_every=3"]
    kill_after_checkpoint_then_resume(run, 3, tmp_path)


@pytest.mark.slow
def test_streaming_sigkill_after_checkpoint_then_resume_equals_uninterrupted_run(tmp_path):
    """The stream's position is the micro-batches taken; a killed run replays the stream to it (several passes in)."""
    source = tmp_path / "chat.jsonl"  # 60 conversations: about 7 packed micro-batches a pass
    source.write_text("".join(Path(load_run_config([])[0].data.path).read_text().splitlines(keepends=True)[:60]))
    run = [*SHORT, f"data.path={source}", "data.streaming=true", "data.packing=true", "data.max_length=256",
           "data.shuffle_buffer=16", "trainer.max_steps=24", "trainer.save_every=8", "trainer.grad_accum=2"]
    killed = kill_after_checkpoint_then_resume(run, 8, tmp_path)
    assert summary(killed)["steps"] == 24 and summary(killed)["epochs"] > 2  # the kill fell in a later pass


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["model", "precompute"])
def test_a_killed_dpo_run_resumes_exactly(reference, tmp_path):
    """Pairs, the reference pass and the pair-normalised step resume like SFT's tokens.

    A precomputed reference whose cache is gone by the resume is computed again, with the start weights, before
    the checkpoint's load.
    """
    pairs = ASSETS_DIR / "data" / "pairs"
    for split, count in (("train", 64), ("validation", 16)):  # a precomputed table covers every pair: few, fast
        lines = (pairs / f"{split}.jsonl").read_text().splitlines(keepends=True)[:count]
        (tmp_path / f"{split}.jsonl").write_text("".join(lines))
    run = ["recipe=tiny_dpo", *SHORT[1:], "trainer.max_steps=8", "trainer.save_every=4", "trainer.grad_accum=2",
           f"pref.reference={reference}", f"data.path={tmp_path / 'train.jsonl'}",
           f"data.eval_path={tmp_path / 'validation.jsonl'}"]
    resumed = kill_after_checkpoint_then_resume(run, 4, tmp_path, before_resume=clear_reference_cache)
    assert summary(resumed)["steps"] == 8


def clear_reference_cache() -> None:
    shutil.rmtree(cache_dir("reference"))


@pytest.mark.slow
def test_sigint_saves_a_resumable_checkpoint_and_exits_130(tmp_path):
    run_dir = tmp_path / "run"
    process = start_train(*SHORT, "trainer.max_steps=400", f"output_dir={run_dir}")
    wait_for(run_dir / "metrics.jsonl", process, '"loss"')  # a step is logged: the loop's signal handler is set
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    stopped = summary(run_dir)
    assert stopped["stop_reason"] == "interrupted"
    checkpoint = run_dir / "checkpoints" / f"step-{stopped['steps']}"
    assert (checkpoint / "train_state.json").is_file()
    assert main(["train", *SHORT, "trainer.max_steps=400", f"output_dir={run_dir}", "resume=auto",
                 f"trainer.max_steps={stopped['steps'] + 2}"]) == 0
    assert summary(run_dir)["steps"] == stopped["steps"] + 2


def test_non_finite_loss_stops_with_exit_3_and_finite_weights_saved(tmp_path, capsys):
    run_dir = tmp_path / "nan"
    # An absurd learning rate without clipping overflows the logits within a few steps.
    code = main(["train", *SHORT, "trainer.max_steps=30", "optim.lr=1e30", "optim.max_grad_norm=0",
                 "optim.warmup_ratio=0", f"output_dir={run_dir}"])
    assert code == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ftune: error: step ") and "the loss is" in err
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    assert checkpoints
    weights = load_file(checkpoints[-1] / "model.safetensors")
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    assert not (run_dir / "final").exists()


def test_early_stop_keeps_the_best_step_and_final_holds_its_weights(tmp_path):
    run_dir = tmp_path / "early"
    # min_delta is larger than any possible gain, so only the first evaluation counts as an improvement.
    assert main(["train", "recipe=tiny_lora", "trainer.max_steps=60", "trainer.eval_every=5",
                 "early_stop.patience=2", "early_stop.min_delta=100", f"output_dir={run_dir}"]) == 0
    result = summary(run_dir)
    assert result["stop_reason"] == "early_stop"
    assert result["best_step"] == 5 and result["steps"] == 15 and result["final_weights_step"] == 5
    best = load_file(run_dir / "checkpoints" / "step-5" / "model.safetensors")
    final = adapter(run_dir)  # PEFT drops the adapter name ("default") from the keys it saves
    assert len(final) == len(best) > 0
    for name, tensor in final.items():
        torch.testing.assert_close(tensor, best[name.replace(".weight", ".default.weight")], rtol=0, atol=0)


def test_forgetting_guard_stops_a_drifting_full_fine_tune(tmp_path):
    run_dir = tmp_path / "drift"
    assert main(["train", "recipe=tiny_lora", "method=full", "optim.lr=3e-3", "trainer.max_steps=60",
                 "trainer.eval_every=4", "probe.max_drift=0.05", f"output_dir={run_dir}"]) == 0
    result = summary(run_dir)
    assert result["stop_reason"] == "forgetting_guard"
    evals = eval_rows(run_dir)
    assert evals[-1]["probe_drift"] > 0.05
    assert result["steps"] < 60
    within = [r for r in evals if r["probe_drift"] <= 0.05]
    best_within = min(within, key=lambda r: r["eval_loss"])["step"] if within else None
    assert result["best_step"] == best_within


@pytest.mark.slow
def test_forgetting_guard_stops_on_a_benchmark_probe(tmp_path):
    """probe.tasks: the shipped lm-eval task is scored at each evaluation and its drift stops the run."""
    pytest.importorskip("lm_eval")
    run_dir = tmp_path / "task_drift"
    assert main(["train", "recipe=tiny_lora", "method=full", "optim.lr=3e-3", "trainer.max_steps=60",
                 "trainer.eval_every=4", "probe.path=null", "probe.tasks=[tinyworld_tense]", "probe.limit=16",
                 "probe.max_drift=0.05", f"output_dir={run_dir}"]) == 0
    result = summary(run_dir)
    assert result["stop_reason"] == "forgetting_guard" and result["steps"] < 60
    evals = [r for r in (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
             if "tinyworld_tense_drift" in r]
    assert [r["step"] for r in evals] == list(range(4, result["steps"] + 1, 4))
    earlier = [r["tinyworld_tense_drift"] for r in evals[:-1]]
    assert evals[-1]["tinyworld_tense_drift"] > 0.05 >= max(earlier, default=0.0)
    assert all(0.0 <= r["tinyworld_tense_score"] <= 1.0 for r in evals)
