"""Compose a recipe and command-line overrides into a validated `RunCfg`.

We call Hydra's compose API rather than `@hydra.main` so that ftune, not Hydra, owns the process: Hydra never
changes the working directory or writes `outputs/`, and composition errors become one-line `ConfigError`s with
exit code 2 instead of Hydra's multi-line report and exit 1. Sweeps (`-m`) are expanded with Hydra's own
override parser, so the override grammar is exactly Hydra's.
"""

import dataclasses
import itertools
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from ftune.config.schema import RunCfg
from ftune.config.validate import validate
from ftune.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parents[1]
ASSETS_DIR = PACKAGE_DIR / "assets"
CONFIGS_DIR = PACKAGE_DIR / "configs"
RECIPES_DIR = PACKAGE_DIR / "recipes"
DEFAULT_RECIPE = "tiny_lora"
SCHEMA_NAME = "ftune_schema"

ConfigStore.instance().store(name=SCHEMA_NAME, node=RunCfg)
if not OmegaConf.has_resolver("ftune_asset"):
    OmegaConf.register_new_resolver("ftune_asset", lambda rel: str(ASSETS_DIR / rel))


def list_recipes() -> list[str]:
    """Names accepted by `recipe=`."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


NOT_RECIPE_GROUPS = ("accelerate", "deepspeed", "hub")
"""Folders of configs/ that are launcher or model files, not recipe config groups."""


def list_groups() -> dict[str, list[str]]:
    """Config groups in configs/ and the options of each, as `group=option` overrides accept them."""
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(CONFIGS_DIR.iterdir())
        if d.is_dir() and d.name not in NOT_RECIPE_GROUPS and any(d.glob("*.yaml"))
    }


def recipe_name(overrides: list[str]) -> str:
    """The value of the last `recipe=NAME` override, or the default recipe."""
    names = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") == "recipe"]
    return names[-1] if names else DEFAULT_RECIPE


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose `recipes/<recipe>.yaml` with the overrides into a DictConfig typed by `RunCfg`.

    Raises:
        ConfigError: unknown recipe, key, group option, a badly typed value or an unparsable override.
    """
    name = recipe_name(overrides)
    if name not in list_recipes():
        raise ConfigError(f"recipe={name}: no such recipe", f"available: {', '.join(list_recipes())}")
    overrides = [o for o in overrides if o.split("=", 1)[0].lstrip("+") != "recipe"] + [f"recipe={name}"]
    search = f"hydra.searchpath=[file://{CONFIGS_DIR}]"
    try:
        with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
            cfg = compose(config_name=name, overrides=[*overrides, search])
        # Hydra lets `+new_key=...` through at the root; merging into the schema rejects it.
        return OmegaConf.merge(OmegaConf.structured(RunCfg), OmegaConf.to_container(cfg))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(describe_compose_error(err, name)) from err


def describe_compose_error(err: Exception, recipe: str) -> str:
    """One line saying which key or override is wrong and what is allowed."""
    cause = err if isinstance(err, OmegaConfBaseException) else (err.__cause__ or err)
    if isinstance(err, MissingConfigException) and err.options is not None:
        group = (err.missing_cfg_file or "").rsplit("/", 1)[0]
        return f"recipe {recipe}: no option '{err.missing_cfg_file}' (available {group}: {', '.join(err.options)})"
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        key = getattr(cause, "full_key", None) or "?"
        return f"{key}: unknown key (known keys here: {', '.join(known_keys(key))})"
    if isinstance(cause, ValidationError):
        key = getattr(cause, "full_key", None) or "?"
        return f"{key}: {str(cause).splitlines()[0]}"
    return " ".join(str(err).split("See https")[0].split())


def known_keys(full_key: str) -> list[str]:
    """The schema's field names at the level of `full_key` (for 'unknown key' messages)."""
    node: type = RunCfg
    for part in full_key.split(".")[:-1]:
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields or not dataclasses.is_dataclass(fields[part].default_factory()):
            break
        node = type(fields[part].default_factory())
    return [f.name for f in dataclasses.fields(node)]


def load_run_config(overrides: list[str]) -> tuple[RunCfg, DictConfig]:
    """Compose, resolve, type and validate a run config; all problems are reported at once.

    Returns:
        The typed config and the resolved DictConfig (what `--cfg job` prints and config.yaml stores).
    """
    cfg = compose_config(overrides)
    try:
        OmegaConf.resolve(cfg)
        typed = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(describe_compose_error(err, recipe_name(overrides))) from err
    problems = validate(typed)
    if problems:
        raise ConfigError("; ".join(problems))
    return typed, cfg


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Expand `-m` sweep overrides (`lora.r=4,8`, `range(...)`, ...) into one override list per job."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise ConfigError(describe_compose_error(err, recipe_name(overrides))) from err
    choices = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() else [o.input_line]
        for o in parsed
    ]
    return [list(job) for job in itertools.product(*choices)]


def load_command_config(schema: type, overrides: list[str], check=None):
    """Parse `key=value` arguments of a command without a recipe (merge, eval) into its typed schema.

    `check(typed) -> list[str]` adds the command's cross-field rules; all problems are reported at once.

    Raises:
        ConfigError: an unknown key, a badly typed value, or a problem `validate`'s field rules find.
    """
    from ftune.config.validate import field_problems

    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(overrides))
        typed = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        known = ", ".join(f.name for f in dataclasses.fields(schema))
        detail = "unknown key" if isinstance(err, (ConfigAttributeError, ConfigKeyError)) else str(err).splitlines()[0]
        raise ConfigError(f"{key}: {detail} (known keys: {known})") from err
    except ValueError as err:  # from_dotlist: an argument without '='
        raise ConfigError(f"{err} (expected key=value arguments)") from err
    problems = list(field_problems(typed, prefix="")) + (check(typed) if check else [])
    if problems:
        raise ConfigError("; ".join(problems))
    return typed


def pop_command_keys(overrides: list[str], keys: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """Split a command's own `key=value` options (e.g. `n=3 out=FILE` of `ftune data`) from recipe overrides."""
    own, rest = {}, []
    for item in overrides:
        key, _, value = item.partition("=")
        if key in keys:
            own[key] = value
        else:
            rest.append(item)
    return own, rest
