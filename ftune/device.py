"""The device a run on this machine trains on, for the settings whose default depends on it."""

import os

import torch


def local_device() -> str:
    """`cuda` where a GPU is visible and accelerate is not told to use the CPU (`ACCELERATE_USE_CPU`), else `cpu`."""
    cpu_forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    return "cuda" if torch.cuda.is_available() and not cpu_forced else "cpu"
