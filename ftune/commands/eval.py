"""`ftune eval`: task loss, forgetting probe and generation scores of several models, side by side.

Example: `ftune eval model=runs/tiny_lora/X/final models=[merged] out=eval.json`.
"""

import json
from pathlib import Path

from ftune.atomic import write_text
from ftune.commands import command_config

COLUMNS = ("eval_loss", "eval_ppl", "probe_ppl", "probe_drift", "exact_match", "f1", "answer_tokens")
"""The metrics shown in the table, in order (the JSON holds every metric)."""


def run(args) -> int:
    """Parse `key=value` options, evaluate every model, print the table (or JSON with --json), write `out`."""
    from ftune.config.commands import EvalCfg, eval_problems
    from ftune.eval.compare import evaluate_models

    cfg = command_config(EvalCfg, args, eval_problems)
    if cfg is None:
        return 0
    rows = evaluate_models(cfg)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_comparison(rows)
    if cfg.out is not None:
        write_text(Path(cfg.out), json.dumps(rows, indent=2) + "\n")
    return 0


def print_comparison(rows: dict[str, dict]) -> None:
    """One row per model and one column per metric, on stdout (the result, where training logs go to stderr)."""
    from rich.console import Console
    from rich.table import Table

    columns = [c for c in COLUMNS if any(c in row for row in rows.values())]
    table = Table(title="ftune eval", title_justify="left")
    table.add_column("model", overflow="fold")
    table.add_column("kind")
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    for name, row in rows.items():
        table.add_row(name, row["kind"], *(format_metric(column, row.get(column)) for column in columns))
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
        console.width = 160
    console.print(table)


def format_metric(column: str, value: float | None) -> str:
    """A table cell: drift as a signed percentage, other metrics to 4 significant digits, '-' when absent."""
    if value is None:
        return "-"
    return f"{value:+.2%}" if column == "probe_drift" else f"{value:.4g}"
