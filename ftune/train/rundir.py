"""The run directory before the first step: checked while setup runs, written only once setup has succeeded.

A fresh run writes nothing until data, model and optimizer are built, so a failed start (a missing model, an
unknown template) leaves no directory and the same command can simply be run again. A resumed run is compared
with the config it started with: changes that keep resume exact are applied and listed, changes that break it
stop the run unless `resume_force=true`.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ftune.atomic import write_text
from ftune.config.commands import RUN_CONFIG_FILE
from ftune.errors import ConfigError

RESUME_SAFE_KEYS = (
    "trainer.max_steps", "trainer.epochs", "trainer.eval_every", "trainer.eval_batches", "trainer.save_every",
    "trainer.keep_last", "trainer.log_every", "trainer.num_workers", "trainer.nan_guard", "trainer.final_weights",
    "early_stop.patience", "early_stop.min_delta", "probe.max_drift", "logger.",
)
"""Keys (or prefixes ending in '.') a resumed run may change: how long it runs, how often it evaluates, saves and
logs, when it stops. The steps already taken stay exactly those of the original run. Anything else (model,
method, data, sequence length, batch shape, precision, optimizer, seed, the early-stopping metric) would make the
continuation differ from the run the checkpoint belongs to."""

NOT_COMPARED = ("recipe", "output_dir", "resume", "resume_force")
"""Keys that say how this invocation was spelled, not what trains."""


@dataclass
class ResumeChanges:
    """What differs between a resumed run's config and the config its checkpoint was trained with."""

    applied: dict[str, list] = field(default_factory=dict)
    """Key -> [old, new] for changes that keep resume exact."""
    forced: dict[str, list] = field(default_factory=dict)
    """Key -> [old, new] for changes that break exact resume, accepted with resume_force=true."""

    def as_row(self, step: int) -> dict:
        """The metrics.jsonl event that records them."""
        return {"step": step, "event": "resume", "changed": self.applied, "forced": self.forced}


def check_fresh_output_dir(run_dir: Path) -> None:
    """A new run needs an empty or absent `output_dir` it can create; checked without writing anything.

    Raises:
        ConfigError: the directory holds something, or cannot be created or written.
    """
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise ConfigError(f"output_dir={run_dir}: already holds a run", "pass resume=auto or a new output_dir")
    check_writable(run_dir)


def check_writable(run_dir: Path) -> None:
    """The nearest existing ancestor of `run_dir` must be a directory we may write into.

    Raises:
        ConfigError: it is a file, or not writable.
    """
    ancestor = run_dir
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir={run_dir}: cannot write to {ancestor}", "choose a directory you can write")


def compare_with_checkpoint_config(checkpoint: Path, resolved: DictConfig, force: bool) -> ResumeChanges:
    """Compare the new config with the one the checkpoint's run wrote (`<run>/config.yaml`).

    Raises:
        ConfigError: keys that break exact resume changed and `force` is off; the message names them.
    """
    saved = checkpoint.parent.parent / RUN_CONFIG_FILE
    if not saved.is_file():
        raise ConfigError(f"resume: {saved} is missing", "a checkpoint is resumed inside the run that wrote it")
    old = flatten(OmegaConf.to_container(OmegaConf.load(saved), resolve=True))
    new = flatten(OmegaConf.to_container(resolved, resolve=True))
    changes = ResumeChanges()
    for key in sorted(set(old) | set(new)):
        if key.split(".")[0] in NOT_COMPARED or old.get(key) == new.get(key):
            continue
        target = changes.applied if is_resume_safe(key) else changes.forced
        target[key] = [old.get(key), new.get(key)]
    if changes.forced and not force:
        listed = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in changes.forced.items())
        raise ConfigError(f"resume: changed since the run started, which breaks exact resume: {listed}",
                          "restore them, start a new output_dir, or pass resume_force=true to continue anyway")
    return changes


def is_resume_safe(key: str) -> bool:
    """Whether changing `key` keeps a resumed run exact (see RESUME_SAFE_KEYS)."""
    return any(key == safe or (safe.endswith(".") and key.startswith(safe)) for safe in RESUME_SAFE_KEYS)


def flatten(node: object, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are values (a changed list is one changed key)."""
    if not isinstance(node, dict):
        return {prefix.rstrip("."): node}
    flat: dict[str, object] = {}
    for key, value in node.items():
        flat |= flatten(value, f"{prefix}{key}.")
    return flat


def write_run_config(run_dir: Path, resolved: DictConfig) -> None:
    """Create the run directory and write config.yaml (the config that runs from now on)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / RUN_CONFIG_FILE, OmegaConf.to_yaml(resolved))
