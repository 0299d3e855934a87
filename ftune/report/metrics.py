"""Where metric rows go: always `metrics.jsonl`, optionally wandb or TensorBoard.

Only the main process constructs a `MetricsLog`; other ranks get `NullLog`, so no rank-dependent code
path contains a collective.
"""

import json
import os
from pathlib import Path

from ftune.config.schema import LoggerCfg


class NullLog:
    """The log of a non-main process: accepts rows and drops them."""

    def log(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsLog:
    """Append each row as one JSON line (flushed at once, so a crash loses nothing) and fan out to a tracker."""

    def __init__(self, path: Path, cfg: LoggerCfg, run_name: str, config: dict):
        self.handle = path.open("a", encoding="utf-8")
        self.tracker = open_tracker(cfg, path.parent, run_name, config)

    def log(self, row: dict) -> None:
        self.handle.write(json.dumps(row) + "\n")
        self.handle.flush()
        if self.tracker is not None:
            self.tracker.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, row["step"])

    def close(self) -> None:
        self.handle.close()
        if self.tracker is not None:
            self.tracker.close()


class WandbTracker:
    """wandb, offline when no API key is configured (it syncs later with `wandb sync`)."""

    def __init__(self, cfg: LoggerCfg, run_dir: Path, run_name: str, config: dict):
        import wandb

        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        self.run = wandb.init(
            project=cfg.project, name=cfg.run_name or run_name, tags=list(cfg.tags), config=config,
            dir=str(run_dir), mode=mode,
        )

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class TensorBoardTracker:
    """TensorBoard event files under `<run_dir>/tensorboard/<name>`."""

    def __init__(self, cfg: LoggerCfg, run_dir: Path, run_name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard" / (cfg.run_name or run_name)))

    def log(self, values: dict, step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


TRACKERS = {"wandb": WandbTracker, "tensorboard": TensorBoardTracker}


def open_tracker(cfg: LoggerCfg, run_dir: Path, run_name: str, config: dict):
    """The tracker named by `logger.name`, or None for metrics.jsonl only."""
    return TRACKERS[cfg.name](cfg, run_dir, run_name, config) if cfg.name in TRACKERS else None
