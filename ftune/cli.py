"""ftune's command line: subcommand dispatch, Hydra-style overrides, exit codes and one-line errors.

    ftune train recipe=tiny_lora optim.lr=3e-4      train (Hydra overrides; `--cfg job` prints the config)
    ftune train -m lora.r=4,8                       one run per combination (a sweep)

Each subcommand is a module of `ftune.commands` with `run(args) -> exit code`, imported only when called so
that `ftune --help` stays instant.

Exit codes (docs/configuration.md, "Exit codes"): 0 success, 2 bad config/override/input, 3 guard stop, 130
interrupted (143 on SIGTERM), 1 otherwise (including a full disk or an unwritable output, as one line).
Tracebacks are printed only with --debug.
"""

import argparse
import errno
import importlib
import logging
import os
import sys
import warnings
from dataclasses import dataclass

from ftune.compat import BITSANDBYTES_CPU_LOGGER
from ftune.errors import EXIT_FAILURE, EXIT_INTERRUPTED, FtuneError

WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM)
"""OSErrors a user fixes on their side (disk full, quota, permissions): one line, exit 1."""

PROG = "ftune"


@dataclass(frozen=True)
class Command:
    """A subcommand: its one-line help and the flags it honours (only those appear in its --help)."""

    summary: str
    flags: tuple[str, ...] = ()
    takes_recipe: bool = False


COMMANDS: dict[str, Command] = {
    "train": Command("fine-tune a model from a recipe (LoRA, QLoRA, full)", ("cfg", "multirun", "config_dir"), True),
    "data": Command("build a recipe's training data as train does, show what is learned [n=3] [out=ROWS.jsonl]",
                    ("cfg", "json", "config_dir", "cache_info", "cache_clear"), True),
    "plan": Command("count parameters and estimate memory per GPU on the meta device (no download, no weights)",
                    ("cfg", "multirun", "json", "config_dir"), True),
    "merge": Command("fold an adapter (or a weighted combination of adapters) into a standalone model", ("cfg",)),
    "eval": Command("compare models on held-out loss, the forgetting probe, lm-eval benchmarks and generations",
                    ("cfg", "json")),
    "export": Command("write a run, adapter or model as hf, gguf or adapter, checked against the trained model",
                      ("cfg",)),
    "init": Command("write a commented starting recipe into the working directory (never overwrites)"),
}
"""Subcommand name -> what it is; the code lives in `ftune.commands.<name>.run`."""

FLAGS: dict[str, tuple[tuple[str, ...], dict]] = {
    "cfg": (("--cfg",), {"choices": ["job"], "help": "print the resolved config and exit"}),
    "multirun": (("-m", "--multirun"), {"action": "store_true", "help": "sweep comma-separated override values"}),
    "json": (("--json",), {"action": "store_true", "help": "machine-readable output"}),
    "cache_info": (("--cache-info",), {"action": "store_true",
                                       "help": "list the tokenized-data cache: each entry's size and what made it"}),
    "cache_clear": (("--cache-clear",), {"action": "store_true",
                                         "help": "remove the tokenized-data cache (and builds a crash left)"}),
    "config_dir": (("--config-dir",), {"action": "append", "default": [], "metavar": "DIR",
                                       "help": "a folder of your own config groups (DIR/model/NAME.yaml, ...); "
                                               "./configs is searched too"}),
}
"""The optional flags a command may honour, as argparse arguments."""


def recipe_epilog() -> str:
    """The recipes and config groups a user can pick, for `ftune train --help`."""
    from ftune.config.compose import CONFIGS_DIR, DEFAULT_RECIPE, list_groups, local_recipes, shipped_recipes

    groups = "\n".join(f"  {group}=: {', '.join(options)}" for group, options in list_groups().items())
    local = ", ".join(f"./{name}" for name in local_recipes()) or "none (ftune init NAME writes one)"
    return (
        f"recipes (recipe=NAME or recipe=./FILE.yaml, default {DEFAULT_RECIPE}):\n"
        f"  shipped: {', '.join(shipped_recipes())}\n  here: {local}\n"
        f"config groups (GROUP=OPTION):\n{groups}\n"
        "any key can be overridden: optim.lr=3e-4 lora.r=16 trainer.max_steps=50\n"
        f"launcher configs for accelerate launch --config_file: {CONFIGS_DIR / 'accelerate'}"
    )


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per command."""
    from ftune.config.compose import DEFAULT_RECIPE

    parser = argparse.ArgumentParser(prog=PROG, description="Config-driven fine-tuning of language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        cmd = sub.add_parser(name, help=command.summary, description=command.summary,
                             epilog=recipe_epilog() if command.takes_recipe else None,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == "init":
            cmd.add_argument("name", nargs="?", default="my_recipe", help="file to write: NAME.yaml")
            cmd.add_argument("--from", dest="base", default=DEFAULT_RECIPE, metavar="RECIPE",
                             help=f"the recipe to start from (default {DEFAULT_RECIPE})")
        else:
            cmd.add_argument("overrides", nargs="*", metavar="key=value",
                             help="overrides: key=value, +key=value (add), ~key (remove)")
        for flag in command.flags:
            names, options = FLAGS[flag]
            cmd.add_argument(*names, **options)
        cmd.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def quiet_libraries() -> None:
    """Silence library output a user cannot act on; ftune prints its own progress and statistics.

    - datasets' progress bars when ftune writes its tokenized-data cache;
    - bitsandbytes' warning, on CPUs with AVX512-BF16, that it cannot download an optional kernel from the hub,
      and the `kernels` package's note, on the same import with HF_HUB_OFFLINE=1, that it skips the kernel's
      publisher check (ftune asks for no hub kernel; both would stand in front of ftune's own first line);
    - lm-eval's warnings that ftune hands it a loaded model and a custom dataset hook (both on purpose);
    - transformers' "Loading weights" progress bar (the hub's switch, read when transformers is imported), and its
      notes that PEFT reads `is_gradient_checkpointing` and enables checkpointing by names deprecated for v6.
    """
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", r"`(is_)?gradient_checkpointing(_enable)?` is deprecated", FutureWarning)
    logging.getLogger(BITSANDBYTES_CPU_LOGGER).setLevel(logging.ERROR)
    logging.getLogger("kernels").setLevel(logging.ERROR)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Run a command; map errors to one line on stderr and the documented exit codes (docs/configuration.md)."""
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        return importlib.import_module(f"ftune.commands.{args.command}").run(args)
    except FtuneError as err:
        if args.debug:
            raise
        print(f"{PROG}: error: {err.one_line()}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        if args.debug or err.errno not in WRITE_ERRORS:
            raise
        print(f"{PROG}: error: cannot write {err.filename or 'output'}: {err.strerror} (nothing half-written was "
              "left: outputs are renamed into place only when complete)", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
