"""ftune's command line: subcommand dispatch, Hydra-style overrides, exit codes and one-line errors.

    ftune train recipe=tiny_lora optim.lr=3e-4      train (Hydra overrides; `--cfg job` prints the config)
    ftune train -m lora.r=4,8                       one run per combination (a sweep)

Each subcommand is a module of `ftune.commands` with `run(args) -> exit code`, imported only when called so
that `ftune --help` stays instant.

Exit codes (DESIGN.md): 0 success, 2 bad config/override/input, 3 guard stop, 130 interrupted, 1 otherwise.
Tracebacks are printed only with --debug.
"""

import argparse
import importlib
import logging
import os
import sys

from ftune.errors import EXIT_INTERRUPTED, FtuneError

PROG = "ftune"

COMMANDS: dict[str, str] = {
    "train": "fine-tune a model from a recipe (LoRA, QLoRA, full)",
    "merge": "fold an adapter (or a weighted combination of adapters) into a standalone model",
    "eval": "compare models on held-out loss, the forgetting probe and generations",
    "data": "build a recipe's training data as train does, show what is learned [n=3] [out=ROWS.jsonl]",
    "plan": "count parameters and estimate memory per GPU on the meta device (no download, no weights)",
}
"""Subcommand name -> one-line help; the code lives in `ftune.commands.<name>.run`."""

RECIPE_COMMANDS = ("train", "data", "plan")
"""Commands that compose a recipe, whose help lists recipes and config groups."""


def recipe_epilog() -> str:
    """The recipes and config groups a user can pick, for `ftune train --help`."""
    from ftune.config.compose import list_groups, list_recipes

    groups = "\n".join(f"  {group}=: {', '.join(options)}" for group, options in list_groups().items())
    return (
        f"recipes (recipe=NAME, default tiny_lora):\n  {', '.join(list_recipes())}\n"
        f"config groups (GROUP=OPTION):\n{groups}\n"
        "any key can be overridden: optim.lr=3e-4 lora.r=16 trainer.max_steps=50"
    )


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per command."""
    parser = argparse.ArgumentParser(prog=PROG, description="Config-driven fine-tuning of language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, summary in COMMANDS.items():
        cmd = sub.add_parser(name, help=summary, description=summary,
                             epilog=recipe_epilog() if name in RECIPE_COMMANDS else None,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides (recipe=NAME first)")
        cmd.add_argument("--cfg", choices=["job"], help="print the resolved config and exit")
        cmd.add_argument("-m", "--multirun", action="store_true", help="sweep comma-separated override values")
        cmd.add_argument("--json", action="store_true", help="machine-readable output (where a command has it)")
        cmd.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def quiet_libraries() -> None:
    """Silence library output a user cannot act on; ftune prints its own progress and statistics.

    - datasets' progress bars when ftune writes its tokenized-data cache;
    - bitsandbytes' warning, on CPUs with AVX512-BF16, that it cannot download an optional kernel from the hub.
    """
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Run a command; map errors to one line on stderr and DESIGN.md's exit codes."""
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        return importlib.import_module(f"ftune.commands.{args.command}").run(args)
    except FtuneError as err:
        if args.debug:
            raise
        print(f"{PROG}: error: {err.one_line()}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
