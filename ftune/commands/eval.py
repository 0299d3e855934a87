"""`ftune eval`: held-out loss, forgetting probe, lm-eval benchmarks and generations of several models, side by side.

Examples: `ftune eval model=runs/tiny_lora/X/final models=[merged] out=eval.json`,
`ftune eval run=runs/tiny_lora/X tasks=[tinyworld_tense] limit=100`.
"""

import json
from functools import partial
from pathlib import Path

from ftune.atomic import write_text
from ftune.commands import command_config

COLUMNS = ("eval_loss", "eval_ppl", "pair_accuracy", "pair_margin", "reward_accuracy", "probe_ppl", "probe_drift",
           "exact_match", "f1", "answer_tokens")
"""The metrics shown in the table, in order, before the benchmarks' (the JSON holds every metric)."""
STDERR = "_stderr"


def run(args) -> int:
    """Parse `key=value` options, evaluate every model, print the table (or JSON with --json), write `out`."""
    from ftune.config.commands import EvalCfg, eval_problems, with_run_settings

    cfg = command_config(EvalCfg, args, eval_problems, adjust=partial(with_run_settings, overrides=args.overrides))
    if cfg is None:
        return 0
    comparison = compare(cfg)
    if args.json:
        print(json.dumps(comparison.rows, indent=2))
    else:
        print_comparison(comparison.rows)
        print_generations(comparison.generations, cfg.show)
    if cfg.out is not None:
        write_outputs(Path(cfg.out), comparison)
    return 0


def compare(cfg):
    """Evaluate every model; with `run=`, with the loss exactly as that run computed it (chunking, precision)."""
    from ftune.config.commands import run_trainer_cfg
    from ftune.eval.compare import evaluate_models
    from ftune.train.losses import build_step_loss

    if cfg.run is None:
        return evaluate_models(cfg)
    trainer = run_trainer_cfg(cfg.run)
    return evaluate_models(cfg, loss_for=lambda model: build_step_loss(model, trainer).without_teacher())


def write_outputs(out: Path, comparison) -> None:
    """The rows as JSON at `out`, and every generation to generations.jsonl next to it."""
    from ftune.eval.generation import GENERATIONS_FILE

    write_text(out, json.dumps(comparison.rows, indent=2) + "\n")
    if comparison.generations:
        write_text(out.with_name(GENERATIONS_FILE), "".join(json.dumps(r) + "\n" for r in comparison.generations))


def table_columns(rows: dict[str, dict]) -> list[str]:
    """The fixed metrics present in some row, then each benchmark metric (`task/metric`) without its stderr."""
    present = {key for row in rows.values() for key in row}
    benchmarks = sorted(key for key in present if "/" in key and not key.endswith(STDERR))
    return [c for c in COLUMNS if c in present] + benchmarks


def print_comparison(rows: dict[str, dict]) -> None:
    """One row per model and one column per metric, on stdout (the result, where training logs go to stderr)."""
    from rich.table import Table

    columns = table_columns(rows)
    table = Table(title="ftune eval", title_justify="left")
    table.add_column("model", overflow="fold")
    table.add_column("kind")
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    for name, row in rows.items():
        table.add_row(name, row["kind"], *(format_metric(column, row) for column in columns))
    wide_console().print(table)


def print_generations(records: list[dict], count: int) -> None:
    """The first `count` held-out prompts with the reference and every model's answer, side by side."""
    from rich.table import Table

    for index, record in enumerate(records[:count]):
        table = Table(title=f"generation {index + 1}: {record['prompt'][-1]['content']}", title_justify="left",
                      show_header=False)
        table.add_column("who", style="bold")
        table.add_column("text", overflow="fold")
        table.add_row("reference", record["reference"])
        for name, answer in record["answers"].items():
            table.add_row(f"{name} (F1 {answer['f1']:.2f})", answer["answer"])
        wide_console().print(table)


def wide_console():
    """A rich console on stdout, 160 columns wide when piped or captured (not squeezed into 80)."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console.width = 160
    return console


def format_metric(column: str, row: dict) -> str:
    """A table cell: signed percentage for drift, value ± stderr for a benchmark, else 4 digits; '-' if absent."""
    value = row.get(column)
    if value is None:
        return "-"
    if column == "probe_drift":
        return f"{value:+.2%}"
    stderr = row.get(column + STDERR)
    return f"{value:.4g} ± {stderr:.2g}" if stderr is not None else f"{value:.4g}"
