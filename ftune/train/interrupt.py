"""Turn SIGINT/SIGTERM into a request the loop honours at the end of the current step (after a checkpoint).

A second Ctrl-C raises KeyboardInterrupt at once, for a user who does not want to wait for the save.
"""

import signal

import torch

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopSignals:
    """Context manager that records the first SIGINT/SIGTERM instead of dying mid-step."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self):
        for signum in EXIT_CODES:
            self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self, accelerator) -> bool:
        """Whether any process got a signal; every rank must agree, or one would leave the collectives."""
        flag = torch.tensor(int(self.signum is not None), device=accelerator.device)
        return bool(accelerator.reduce(flag, "max").item())

    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM (128 + signal number, as shells report them)."""
        return EXIT_CODES.get(self.signum, 130)
