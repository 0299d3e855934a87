"""`ftune eval`'s options: training's key names, and `run=` taking a run's settings under explicit keys."""

import pytest
from omegaconf import OmegaConf

from ftune.config.commands import RUN_CONFIG_FILE, EvalCfg, eval_problems, with_run_settings
from ftune.config.compose import load_command_config
from ftune.errors import ConfigError


@pytest.fixture
def run_dir(tmp_path):
    """A run directory whose config.yaml differs from eval's defaults in data, probe and trainer settings."""
    run = tmp_path / "run"
    run.mkdir()
    trained = {"data": {"eval_path": "held.jsonl", "packing": True, "max_length": 64, "chat_template": "chatml"},
               "probe": {"path": "general.jsonl", "max_length": 32, "tasks": ["tinyworld_tense"], "limit": 5},
               "trainer": {"micro_batch_size": 3, "mixed_precision": "bf16"}}
    (run / RUN_CONFIG_FILE).write_text(OmegaConf.to_yaml(trained))
    return run


def load(overrides: list[str]) -> EvalCfg:
    return load_command_config(EvalCfg, overrides, eval_problems,
                               adjust=lambda cfg: with_run_settings(cfg, overrides))[0]


def test_run_supplies_data_probe_precision_and_the_model(run_dir):
    cfg = load([f"run={run_dir}"])
    assert (cfg.data.eval_path, cfg.data.packing, cfg.data.max_length, cfg.data.chat_template) == \
        ("held.jsonl", True, 64, "chatml")
    assert (cfg.probe.path, cfg.probe.max_length, cfg.probe.tasks, cfg.probe.limit) == \
        ("general.jsonl", 32, ["tinyworld_tense"], 5)
    assert (cfg.batch_size, cfg.mixed_precision, cfg.model) == (3, "bf16", str(run_dir / "final"))


def test_keys_given_on_the_command_line_win_over_the_run(run_dir):
    cfg = load([f"run={run_dir}", "data.packing=false", "probe.path=null", "batch_size=1", "model=other"])
    assert (cfg.data.packing, cfg.data.max_length, cfg.probe.path, cfg.probe.max_length) == (False, 64, None, 32)
    assert (cfg.batch_size, cfg.model) == (1, "other")


def test_a_directory_without_a_run_config_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=f"run={tmp_path}: no config.yaml in it"):
        load([f"run={tmp_path}"])


def test_eval_takes_trainings_key_names():
    cfg = load(["model=m", "data.eval_path=x.jsonl", "data.packing=true", "data.max_length=128", "probe.path=null"])
    assert (cfg.data.eval_path, cfg.data.packing, cfg.data.max_length, cfg.probe.path) == ("x.jsonl", True, 128, None)
    with pytest.raises(ConfigError, match="packing: unknown key"):
        load(["model=m", "packing=true"])
