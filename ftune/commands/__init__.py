"""One module per subcommand, each with `run(args) -> exit code`; they only wire config, library and report."""

from omegaconf import OmegaConf

from ftune.config.compose import load_command_config


def command_config(schema: type, args, check, adjust=None):
    """Parse a recipe-less command's `key=value` arguments (merge, eval) into `schema`, checked by `check`.

    Returns:
        The typed config, or None after printing it when `--cfg job` asks only for the config.
    """
    cfg, resolved = load_command_config(schema, args.overrides, check=check, adjust=adjust)
    if args.cfg == "job":
        print(OmegaConf.to_yaml(resolved), end="")
        return None
    return cfg
