"""configs/accelerate/*.yaml (DeepSpeed settings included), checked with accelerate's own config classes.

Each file must load as accelerate's `ClusterConfig` (which rejects unknown top-level keys), pass `accelerate
launch`'s own validation, and nest only keys that `accelerate launch` has options for (it copies nested keys
onto its arguments without checking them). The FSDP and DeepSpeed files must then build the plugins accelerate
creates in each process, from the environment its launcher would set.
"""

import os
import re
from pathlib import Path
from unittest import mock

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = ROOT / "configs" / "accelerate"
CONFIGS = sorted(ACCELERATE.glob("*.yaml"))


def launch_args(path: Path):
    """`accelerate launch --config_file path` as accelerate's launcher validates it: (args, file config)."""
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


def test_the_shipped_set():
    names = {p.stem for p in CONFIGS}
    assert {"single_gpu", "ddp", "ddp_multinode", "fsdp", "fsdp_multinode", "zero2", "zero3"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_loads_with_accelerates_config_classes(path):
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    assert path.read_text().startswith("#")  # says what it is for and how to launch it
    dests = {action.dest for action in launch_command_parser()._actions}
    nested = [key if key.startswith("fsdp_") else f"fsdp_{key}" for key in config.fsdp_config]
    nested += list(config.deepspeed_config)
    assert [key for key in nested if key not in dests] == []
    args, _ = launch_args(path)
    assert args.num_processes == config.num_processes


@pytest.mark.parametrize("path", [p for p in CONFIGS if "multinode" in p.stem], ids=lambda p: p.stem)
def test_multinode_placeholders(path):
    config = load_config_from_file(str(path))
    assert config.num_machines > 1 and config.num_processes % config.num_machines == 0
    assert config.main_process_ip and config.main_process_port and config.machine_rank == 0
    assert "--machine_rank" in path.read_text()  # the comment says what changes per machine


@pytest.mark.parametrize("name", ["fsdp", "fsdp_multinode"])
def test_fsdp_is_version_2_with_transformer_wrap_and_sharded_state(name):
    args, _ = launch_args(ACCELERATE / f"{name}.yaml")
    with mock.patch.dict(os.environ, prepare_multi_gpu_env(args)):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.transformer_cls_names_to_wrap is None  # falls back to the model's _no_split_modules
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert plugin.cpu_ram_efficient_loading and plugin.reshard_after_forward is True


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_hold_their_settings_and_work_from_any_directory(stage, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no path in the file is relative to a checkout (an installed wheel has none)
    args, defaults = launch_args(ACCELERATE / f"zero{stage}.yaml")
    assert defaults.distributed_type == DistributedType.DEEPSPEED
    assert "deepspeed_config_file" not in defaults.deepspeed_config
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()
    config = plugin.deepspeed_config
    assert plugin.zero_stage == stage and plugin.zero3_init_flag == (stage == 3)
    assert config["gradient_accumulation_steps"] == 1  # ftune accumulates itself (grad_accum > 1 is refused)
    assert config["gradient_clipping"] == 1.0
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "none"
    if stage == 3:  # final/ as one ordinary model
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_recipes_name_existing_accelerate_configs():
    named = {m for recipe in (ROOT / "recipes").glob("*.yaml")
             for m in re.findall(r"--config_file (\S+)", recipe.read_text())}
    assert named and all((ROOT / path).is_file() for path in named)
