"""What a run shows on the terminal: a progress bar with loss, learning rate and tokens/s, and small tables.

Rich redraws the bar in place on a terminal; when output is not a terminal (CI, `| tee`), a plain line is
printed every tenth of the run instead, so logs stay readable.
"""

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)


class TrainProgress:
    """Progress of the optimizer steps, with the last logged loss, lr and throughput."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True):
        self.total = total
        self.enabled = enabled
        self.interactive = console.is_terminal and enabled
        self.every = max(1, total // 10)
        self.bar = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not self.interactive,
        )
        self.task = self.bar.add_task("train", total=total, completed=start, stats="")

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def update(self, step: int, row: dict | None) -> None:
        stats = "" if row is None else f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row['tokens_per_s']:.0f} tok/s"
        self.bar.update(self.task, completed=step, stats=stats)
        if self.enabled and not self.interactive and row is not None and (step % self.every == 0 or step == self.total):
            console.print(f"step {step}/{self.total}  {stats}", highlight=False)


def print_table(title: str, rows: dict[str, object]) -> None:
    """A two-column key/value table."""
    table = Table(title=title, show_header=False, title_justify="left")
    for key, value in rows.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
