"""The CLI's contract: help texts, exit codes and one-line errors (docs/configuration.md, "Exit codes")."""

import subprocess
import sys

import pytest

from ftune.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftune", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "train" in result.stdout


def test_train_help_lists_recipes_and_groups():
    result = run_cli("train", "--help")
    assert result.returncode == 0
    assert "tiny_lora" in result.stdout
    for group in ("model=", "data=", "method=", "optim=", "trainer=", "logger="):
        assert group in result.stdout


def test_misspelt_key_exits_2_with_one_line_and_no_traceback():
    result = run_cli("train", "optim.lrr=1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "ftune: error: optim.lrr: unknown key (known keys here: name, lr, weight_decay, betas, eps, scheduler,"
        " warmup_ratio, max_grad_norm, loraplus_lr_ratio)"
    ]
    assert "Traceback" not in result.stderr


def test_cfg_job_prints_the_resolved_config(capsys):
    assert main(["train", "--cfg", "job", "optim.lr=0.0003"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.0003" in out and "${" not in out


def test_unknown_command_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        main(["trian"])
    assert exit_info.value.code == 2


def test_bad_value_exits_2(capsys):
    assert main(["train", "lora.r=-4"]) == 2
    assert "lora.r=-4 is too small" in capsys.readouterr().err
