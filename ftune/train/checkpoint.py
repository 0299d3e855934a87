"""Checkpoints that a crash cannot corrupt: written under a temporary name, then renamed into place.

Weights, optimizer, scheduler and RNG states go through accelerate's `save_state`/`load_state` (which also
handles sharded FSDP/DeepSpeed states); ftune adds the `TrainState`, the atomic rename, and a save hook
that keeps only trainable weights, so an adapter checkpoint does not copy the frozen base.
"""

import re
import shutil
from pathlib import Path

from ftune.atomic import publish_dir, staging_path
from ftune.errors import ResourceError
from ftune.train.state import STATE_FILE, TrainState

CHECKPOINT_DIR = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_steps(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first (temporary directories are never listed)."""
    root = run_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.glob("step-*") if (m := STEP_DIR.match(p.name))]
    return sorted(c for c in found if (c[1] / STATE_FILE).is_file())


def save_checkpoint(accelerator, run_dir: Path, state: TrainState, keep_last: int) -> Path:
    """Save the full training state as `checkpoints/step-N`, then keep the newest `keep_last` and the best.

    Every process calls this (sharded states are saved by each rank, into the same staging directory); only the
    main one publishes it (`ftune.atomic`) and prunes. A failure removes the staging directory.
    """
    final = run_dir / CHECKPOINT_DIR / f"step-{state.step}"
    staging = staging_path(final, shared=True)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state.save(staging)  # written last: its presence marks the checkpoint complete
            publish_dir(staging, final)
            prune_checkpoints(run_dir, keep_last, state.best_step)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(run_dir: Path, keep_last: int, best_step: int | None) -> None:
    """Remove all but the newest `keep_last` checkpoints, never the best one (final/ may reload it)."""
    for step, old in checkpoint_steps(run_dir)[:-keep_last]:
        if step != best_step:
            shutil.rmtree(old)


def resolve_resume(resume: str, run_dir: Path) -> Path:
    """The checkpoint `resume=auto|PATH` names.

    Raises:
        ResourceError: no complete checkpoint to resume from.
    """
    if resume == "auto":
        found = checkpoint_steps(run_dir)
        if not found:
            raise ResourceError(f"resume=auto: no complete checkpoint under {run_dir / CHECKPOINT_DIR}")
        return found[-1][1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ResourceError(f"resume={resume}: not a complete ftune checkpoint (no {STATE_FILE})")
    return path


def load_checkpoint(accelerator, path: Path) -> TrainState:
    """Restore weights, optimizer, scheduler and RNG states from `path` and return its TrainState.

    `strict=False` because checkpoints hold only trainable weights; the frozen rest comes from the base.
    """
    accelerator.load_state(str(path), strict=False)
    return TrainState.load(path)


def save_trainable_weights_only(accelerator) -> None:
    """Make `accelerator.save_state` store only parameters that train (all of them in full fine-tuning)."""

    def keep_trainable(models, weights, _output_dir):
        for index, model in enumerate(models):
            trainable = {name for name, p in model.named_parameters() if p.requires_grad}
            weights[index] = {k: v for k, v in weights[index].items() if k in trainable}

    accelerator.register_save_state_pre_hook(keep_trainable)


def best_checkpoint(run_dir: Path, state: TrainState) -> Path | None:
    """The checkpoint of the best evaluation, if one was saved."""
    return dict(checkpoint_steps(run_dir)).get(state.best_step)
