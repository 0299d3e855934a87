"""metrics.jsonl always; wandb (offline without an API key) and TensorBoard on request; no secrets written."""

import json

import pytest

from ftune.config.schema import LoggerCfg
from ftune.report.metrics import MetricsLog

SECRET = "hf_not-a-real-token-123"
CONFIG = {"optim": {"lr": 0.001}, "model": {"name_or_path": "tiny"}}


def write_rows(run_dir, cfg: LoggerCfg) -> None:
    log = MetricsLog(run_dir / "metrics.jsonl", cfg, "run-a", CONFIG)
    log.log({"step": 1, "loss": 2.5, "lr": 1e-3})
    log.log({"step": 2, "eval_loss": 2.0})
    log.close()


def all_bytes(run_dir) -> bytes:
    return b"".join(p.read_bytes() for p in run_dir.rglob("*") if p.is_file())


def test_jsonl_rows_are_appended_one_per_line(tmp_path):
    write_rows(tmp_path, LoggerCfg(name="none"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 2.5, "lr": 1e-3}, {"step": 2, "eval_loss": 2.0}]


def test_tensorboard_writes_event_files_and_no_secret(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("HF_TOKEN", SECRET)
    write_rows(tmp_path, LoggerCfg(name="tensorboard"))
    assert list((tmp_path / "tensorboard" / "run-a").glob("events.out.tfevents.*"))
    assert SECRET.encode() not in all_bytes(tmp_path)


def test_wandb_goes_offline_without_an_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    write_rows(tmp_path, LoggerCfg(name="wandb", project="ftune-test", tags=["t1"]))
    offline_runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert SECRET.encode() not in all_bytes(tmp_path)
