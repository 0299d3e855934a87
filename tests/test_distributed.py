"""Two-process data-parallel training on CPU: `accelerate launch --multi_gpu --num_processes 2` with gloo.

On a machine without GPUs, `--multi_gpu` alone starts two processes that each fall back to a single-process
run (both believing they are rank 0, both writing the run directory), and `--cpu` cannot be combined with
`--multi_gpu`. `ACCELERATE_USE_CPU=true` in the environment makes accelerate 1.15 choose MULTI_CPU with the gloo
backend, which is what DDP on CPU needs.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

WORKER = Path(__file__).parent / "dump_rank_weights.py"
RUN = ["recipe=tiny_lora", "trainer.max_steps=8", "trainer.eval_every=4", "trainer.micro_batch_size=4",
       "trainer.final_weights=last", "trainer.save_every=4", "optim.lr=0.003"]


def launch(target: list[str], output_dir: Path, cache: Path) -> subprocess.CompletedProcess:
    """`accelerate launch` two gloo processes on this CPU machine, one thread each, caching data in `cache`."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "offline", "FTUNE_CACHE": str(cache)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               *target, *RUN, f"output_dir={output_dir}"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache that starts cold: both ranks build the same data at once on the first run."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, cache):
    run_dir = tmp_path_factory.mktemp("ddp") / "cli"
    result = launch(["-m", "ftune", "train"], run_dir, cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


@pytest.fixture(scope="module")
def rank_weights(tmp_path_factory, cache):
    run_dir = tmp_path_factory.mktemp("ddp") / "worker"
    result = launch([str(WORKER)], run_dir, cache)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(run_dir / f"rank-{rank}.safetensors") for rank in (0, 1)]
    return [*ranks, load_file(run_dir / "final" / "adapter_model.safetensors")]


def test_two_processes_train_and_the_loss_falls(cli_run):
    run_dir, result = cli_run
    assert re.search(r"processes\s*│\s*2\b", result.stderr)  # ftune's run table: both ranks joined one run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r and "eval_loss" not in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert sum(r["loss"] for r in train[-2:]) < sum(r["loss"] for r in train[:2])
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]


def test_run_directory_is_written_once(cli_run):
    run_dir, _ = cli_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "loss" in r and "eval_loss" not in r]
    assert train_steps == list(range(1, 9))  # one row per step, not one per rank
    assert [r["step"] for r in rows if "eval_loss" in r] == [4, 8]
    assert sorted(p.name for p in run_dir.iterdir()) == \
        ["checkpoints", "config.yaml", "final", "metrics.jsonl", "plots", "summary.json"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-4", "step-8"]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8


def test_replicas_stay_identical_and_match_the_saved_adapter(rank_weights):
    rank0, rank1, final = rank_weights
    assert rank0.keys() == rank1.keys() and all("lora_" in name for name in rank0)
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)  # gradients were all-reduced
    assert any(rank0[name].abs().max() > 0 for name in rank0 if "lora_B" in name)  # B starts at zero: it trained
    held = {name.replace(".default", ""): weight for name, weight in rank0.items()}
    assert final.keys() == held.keys()
    assert all(torch.equal(final[name], held[name]) for name in final)  # final/ holds what every rank holds


def test_two_processes_train_on_a_stream(tmp_path, cache):
    """Each process streams its own share and the run ends: both take the same micro-batches per step.

    The shares' disjointness is tested in tests/data/test_stream.py; here the collective calls of every step
    must pair up between the two streams, or the run would hang.
    """
    run_dir = tmp_path / "stream"
    result = launch(["-m", "ftune", "train", "data.streaming=true", "data.packing=true", "data.shuffle_buffer=64"],
                    run_dir, cache)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r and "eval_loss" not in r] == list(range(1, 9))
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8


def test_gradual_unfreezing_under_ddp_trains_only_the_joined_blocks(tmp_path, cache, tiny_model_path):
    """Blocks frozen after DDP wrapped the model are found unused each step: the run neither hangs nor moves them.

    8 steps with a block joining every 2: blocks 5 to 2 train, blocks 0 and 1 keep the base's weights.
    """
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "unfreeze"
    result = launch(["-m", "ftune", "train", "method=full", "method.unfreeze_every=2", "optim.lr=1e-4"], run_dir,
                    cache)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trainable = [r["trainable_params"] for r in rows if "trainable_params" in r]
    assert len(trainable) == 8 and trainable == sorted(trainable) and len(set(trainable)) == 4
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).state_dict()
    for name, value in load_file(run_dir / "final" / "model.safetensors").items():
        frozen = name.startswith(("model.layers.0.", "model.layers.1."))
        assert torch.equal(value, base[name]) == frozen, name
