"""Checkpoints through a real single-process `accelerate.Accelerator` on CPU, on a tiny model and optimizer.

What matters to a user: pruning keeps the newest `keep_last` checkpoints and never the best one's, a half-written
checkpoint (killed before `train_state.json` landed) is invisible to listing and to `resume=auto`, a bad `resume=`
is a one-line ResourceError naming the path, and a load restores exactly what was saved.
"""

import pytest
import torch
from torch import nn

from ftune.atomic import staging_path
from ftune.errors import EXIT_BAD_INPUT, ResourceError
from ftune.train.checkpoint import (
    CHECKPOINT_DIR,
    checkpoint_steps,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    save_trainable_weights_only,
)
from ftune.train.state import STATE_FILE, TrainState


class TwoLayers(nn.Module):
    """A frozen layer (as the base of an adapter run) feeding a trainable one (the adapter)."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 4)
        self.trained = nn.Linear(4, 2)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.trained(self.frozen(x))


@pytest.fixture
def prepared():
    """(accelerator, model, optimizer) prepared as `ftune train` prepares them, with the trainable-only save hook.

    The Accelerator takes whatever precision an earlier test left in the process (no argument asks for one):
    the checks here compare saved and loaded state, which precision does not change.
    """
    from accelerate import Accelerator

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = TwoLayers()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    save_trainable_weights_only(accelerator)
    yield accelerator, model, optimizer


def train_step(model, optimizer) -> None:
    loss = model(torch.randn(8, 4)).pow(2).sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def saved_steps(run_dir) -> list[int]:
    return [step for step, _ in checkpoint_steps(run_dir)]


def test_keeps_the_newest_keep_last_and_never_prunes_the_best(prepared, tmp_path):
    accelerator, _, _ = prepared
    state = TrainState()
    kept = []
    for step, best in [(1, None), (2, 2), (3, 2), (4, 2), (5, 2), (6, 5)]:
        state.step, state.best_step = step, best
        path = save_checkpoint(accelerator, tmp_path, state, keep_last=2)
        assert path == tmp_path / CHECKPOINT_DIR / f"step-{step}"
        kept.append(saved_steps(tmp_path))
    assert kept == [
        [1],
        [1, 2],
        [2, 3],  # 1 is older than the newest two
        [2, 3, 4],  # 2 is older than the newest two but is the best: kept
        [2, 4, 5],
        [5, 6],  # the best moved to 5, so 2 is no longer protected
    ]
    on_disk = sorted(p.name for p in (tmp_path / CHECKPOINT_DIR).iterdir())
    assert on_disk == ["step-5", "step-6"]  # pruned directories are gone and no staging directory is left


def test_keep_last_one_with_a_best_keeps_two(prepared, tmp_path):
    accelerator, _, _ = prepared
    for step in range(1, 5):
        save_checkpoint(accelerator, tmp_path, TrainState(step=step, best_step=1), keep_last=1)
    assert saved_steps(tmp_path) == [1, 4]


def test_an_interrupted_write_is_never_listed_nor_resumed(prepared, tmp_path):
    accelerator, _, _ = prepared
    for step in (2, 4):
        save_checkpoint(accelerator, tmp_path, TrainState(step=step), keep_last=5)
    root = tmp_path / CHECKPOINT_DIR
    (root / "step-6").mkdir()  # killed after the weights, before train_state.json: newer but incomplete
    (root / "step-6" / "model.safetensors").write_bytes(b"half")
    staging = staging_path(root / "step-8", shared=True)  # killed in the staging directory, just before the rename
    staging.mkdir()
    TrainState(step=8).save(staging)

    assert saved_steps(tmp_path) == [2, 4]
    assert resolve_resume("auto", tmp_path) == root / "step-4"
    with pytest.raises(ResourceError, match="step-6"):
        resolve_resume(str(root / "step-6"), tmp_path)


def test_saving_over_an_interrupted_write_of_the_same_step_completes_it(prepared, tmp_path):
    """A resumed run reaches the step it died at again: the stale directories must not block or survive."""
    accelerator, _, _ = prepared
    root = tmp_path / CHECKPOINT_DIR
    (root / "step-3").mkdir(parents=True)
    (root / "step-3" / "junk").write_text("from the killed run")
    staging = staging_path(root / "step-3", shared=True)
    staging.mkdir()
    (staging / "junk").write_text("from the killed run")
    save_checkpoint(accelerator, tmp_path, TrainState(step=3), keep_last=2)
    assert saved_steps(tmp_path) == [3]
    assert sorted(p.name for p in root.iterdir()) == ["step-3"]
    assert not (root / "step-3" / "junk").exists()


def test_resume_auto_without_a_checkpoint_names_the_directory(tmp_path):
    with pytest.raises(ResourceError) as error:
        resolve_resume("auto", tmp_path / "run")
    assert str(tmp_path / "run" / CHECKPOINT_DIR) in error.value.one_line()
    assert error.value.exit_code == EXIT_BAD_INPUT


def test_resume_auto_with_only_incomplete_checkpoints_is_an_error(tmp_path):
    (tmp_path / CHECKPOINT_DIR / "step-3").mkdir(parents=True)
    with pytest.raises(ResourceError, match="no complete checkpoint"):
        resolve_resume("auto", tmp_path)


@pytest.mark.parametrize("exists", [False, True])
def test_resume_path_without_train_state_names_the_path(tmp_path, exists):
    path = tmp_path / "elsewhere" / "step-9"
    if exists:
        path.mkdir(parents=True)
    with pytest.raises(ResourceError) as error:
        resolve_resume(str(path), tmp_path)
    assert str(path) in error.value.one_line() and STATE_FILE in error.value.one_line()


def test_resume_path_to_a_complete_checkpoint_is_taken_as_is(tmp_path):
    path = tmp_path / "elsewhere"
    path.mkdir()
    TrainState(step=9).save(path)
    assert resolve_resume(str(path), tmp_path / "run") == path


def test_save_then_load_restores_train_state_weights_and_optimizer(prepared, tmp_path):
    accelerator, model, optimizer = prepared
    for _ in range(3):
        train_step(model, optimizer)
    state = TrainState(step=3, epoch=1, batch_in_epoch=2, tokens=99, learned_tokens=50, best_metric=1.5,
                       best_step=3, evals_without_improvement=0, base_probe_ppl=12.0)
    path = save_checkpoint(accelerator, tmp_path, state, keep_last=2)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    frozen = model.frozen.weight.clone()

    for _ in range(2):  # move the trainable weights and the optimizer on past the checkpoint
        train_step(model, optimizer)
    assert not torch.equal(model.trained.weight, weights["trained.weight"])

    loaded = load_checkpoint(accelerator, path)
    assert loaded == state
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], moments)
    assert torch.equal(model.frozen.weight, frozen)


def test_only_trainable_weights_are_saved(prepared, tmp_path):
    """An adapter checkpoint must not copy the frozen base (`save_trainable_weights_only`)."""
    from safetensors.torch import load_file

    accelerator, _, _ = prepared
    path = save_checkpoint(accelerator, tmp_path, TrainState(step=1), keep_last=1)
    saved = load_file(path / "model.safetensors")
    assert set(saved) == {"trained.weight", "trained.bias"}
