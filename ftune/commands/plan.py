"""`ftune plan recipe=NAME [overrides] [gpus=N] [sharding=none|zero2|zero3|fsdp] [--json]`.

Composes and validates the recipe as `ftune train` would, then counts parameters and estimates memory per GPU
on the meta device (`ftune.plan.estimate`, which traces one step of the run's own loss on fake tensors): nothing is
downloaded and no weight is loaded. `gpus` and `sharding` are this command's own options, not config keys: the
distribution is chosen at launch time (the accelerate config file), not in the recipe.
"""

import json

from omegaconf import OmegaConf

from ftune.config.compose import expand_sweep, load_run_config, pop_command_keys
from ftune.errors import ConfigError
from ftune.report.console import print_table

OWN_KEYS = ("gpus", "sharding")


def run(args) -> int:
    """Print the plan of each job (one, or a `-m` sweep): a table, or JSON with `--json`."""
    from ftune.plan.estimate import plan_rows, plan_run, plan_to_json
    from ftune.train.losses import build_step_loss

    own, overrides = pop_command_keys(args.overrides, OWN_KEYS)
    gpus, sharding = parse_gpus(own.get("gpus", "1")), own.get("sharding", "none")
    jobs = expand_sweep(overrides) if args.multirun else [overrides]
    configs = [load_run_config(job, tuple(args.config_dir)) for job in jobs]
    results = []
    for typed, resolved in configs:
        if args.cfg == "job":
            print(OmegaConf.to_yaml(resolved), end="")
            continue
        plan = plan_run(typed, gpus=gpus, sharding=sharding, step_loss=build_step_loss)
        if args.json:
            results.append(plan_to_json(plan))
        else:
            print_table(f"ftune plan: {typed.recipe}", plan_rows(plan))
    if args.json:
        print(json.dumps(results if args.multirun else results[0], indent=2))
    return 0


def parse_gpus(value: str) -> int:
    """The `gpus=N` option as an int.

    Raises:
        ConfigError: not a positive integer.
    """
    try:
        gpus = int(value)
    except ValueError:
        gpus = 0
    if gpus < 1:
        raise ConfigError(f"gpus={value}: expected a positive number of GPUs")
    return gpus
