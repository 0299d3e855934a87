"""Compose a recipe (shipped, or a user's own file) and command-line overrides into a validated `RunCfg`.

We call Hydra's compose API rather than `@hydra.main` so that ftune, not Hydra, owns the process: Hydra never
changes the working directory or writes `outputs/`, and composition errors become one-line `ConfigError`s with
exit code 2 instead of Hydra's multi-line report and exit 1. Every subcommand parses its `key=value`,
`+key=value` and `~key` arguments through Hydra's override grammar (`compose_schema`), and sweeps (`-m`) are
expanded with Hydra's own override parser, so the grammar is exactly Hydra's everywhere.

Where configs come from, first match wins:
1. `recipe=` names a shipped recipe (`ftune/recipes/NAME.yaml`), a file next to the working directory
   (`recipe=my` for `./my.yaml`), or a path (`recipe=./my.yaml`, `recipe=/abs/my.yaml`).
2. Config groups (`model=`, `data=`, ...) are searched in `--config-dir` folders, then `./configs` of the
   working directory and of the recipe's folder, then ftune's own `ftune/configs`.
3. A user recipe starts from a shipped one with Hydra's defaults list: `defaults: [tiny_lora, _self_]`.
"""

import dataclasses
import itertools
import typing
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from ftune.config.schema import RunCfg
from ftune.config.validate import SCALAR_WORDS, field_problems, resolve_automatic, validate
from ftune.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parents[1]
ASSETS_DIR = PACKAGE_DIR / "assets"
CONFIGS_DIR = PACKAGE_DIR / "configs"
RECIPES_DIR = PACKAGE_DIR / "recipes"
DEFAULT_RECIPE = "tiny_lora"
SCHEMA_NAME = "ftune_schema"
RECIPE_SUFFIXES = (".yaml", ".yml")

ConfigStore.instance().store(name=SCHEMA_NAME, node=RunCfg)
if not OmegaConf.has_resolver("ftune_asset"):
    OmegaConf.register_new_resolver("ftune_asset", lambda rel: str(ASSETS_DIR / rel))


@dataclass(frozen=True)
class Recipe:
    """A recipe file: its name (what `recipe` and the default output_dir say) and where it lives."""

    name: str
    path: Path

    @property
    def shipped(self) -> bool:
        return self.path.parent == RECIPES_DIR


def shipped_recipes() -> list[str]:
    """Names of the recipes ftune ships."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def local_recipes(where: Path | None = None) -> list[str]:
    """Recipe files in the working directory: YAML files whose first key is a Hydra `defaults` list."""
    where = where or Path.cwd()
    return sorted(p.name for p in where.iterdir() if p.suffix in RECIPE_SUFFIXES and looks_like_recipe(p))


def looks_like_recipe(path: Path) -> bool:
    """Whether a YAML file declares a defaults list (every recipe does; other YAML files in a project do not)."""
    try:
        return any(line.startswith("defaults:") for line in path.read_text(encoding="utf-8-sig").splitlines())
    except (OSError, UnicodeDecodeError):
        return False


def find_recipe(value: str, where: Path | None = None) -> Recipe:
    """The recipe `recipe=VALUE` means: a path, a file in the working directory, or a shipped name.

    Raises:
        ConfigError: nothing by that name or path.
    """
    where = where or Path.cwd()
    as_path = Path(value).expanduser()
    if as_path.suffix in RECIPE_SUFFIXES or "/" in value:
        path = as_path if as_path.is_absolute() else where / as_path
        if not path.is_file():
            raise ConfigError(f"recipe={value}: no such file ({path})")
        return Recipe(path.stem, path.resolve())
    local = next((where / f"{value}{s}" for s in RECIPE_SUFFIXES if (where / f"{value}{s}").is_file()), None)
    if local is not None:
        return Recipe(value, local.resolve())
    if value in shipped_recipes():
        return Recipe(value, RECIPES_DIR / f"{value}.yaml")
    here = ", ".join(local_recipes(where)) or "none"
    raise ConfigError(f"recipe={value}: no such recipe",
                      f"shipped: {', '.join(shipped_recipes())}; in {where}: {here}; or recipe=./FILE.yaml")


RENAMED_OPTIONS = {
    "method/distill": "method=distill is now objective=distill (method says what trains: full, lora, ...)",
}
"""Config group options that moved, and the one line that says where."""
NOT_RECIPE_GROUPS = ("accelerate", "deepspeed", "hub")
"""Folders of configs/ that are launcher or model files, not recipe config groups."""


def group_dirs(recipe_dir: Path | None = None, config_dirs: tuple[str, ...] = ()) -> list[Path]:
    """Folders holding config groups, in search order: the user's first, ftune's own last."""
    candidates = [Path(d).resolve() for d in config_dirs] + [(Path.cwd() / "configs").resolve()]
    if recipe_dir is not None:
        candidates.append(recipe_dir / "configs")
    found = [d for d in dict.fromkeys(candidates) if d.is_dir()]
    return [*found, CONFIGS_DIR]


def list_groups(config_dirs: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Config groups and the options of each, as `group=option` overrides accept them (user folders included)."""
    groups: dict[str, set[str]] = {}
    for root in group_dirs(None, config_dirs):
        for d in root.iterdir():
            if d.is_dir() and d.name not in NOT_RECIPE_GROUPS:
                groups.setdefault(d.name, set()).update(p.stem for p in d.glob("*.yaml"))
    return {name: sorted(options) for name, options in sorted(groups.items()) if options}


def recipe_value(overrides: list[str]) -> str:
    """The value of the last `recipe=...` override, or the default recipe."""
    values = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") == "recipe"]
    return values[-1] if values else DEFAULT_RECIPE


def compose_config(overrides: list[str], config_dirs: tuple[str, ...] = ()) -> DictConfig:
    """Compose the recipe `recipe=` names with the overrides into a DictConfig typed by `RunCfg`.

    Raises:
        ConfigError: unknown recipe, key, group option, a badly typed value or an unparsable override.
    """
    recipe = find_recipe(recipe_value(overrides))
    overrides = [o for o in overrides if o.split("=", 1)[0].lstrip("+") != "recipe"]
    for item in overrides:
        if (renamed := RENAMED_OPTIONS.get(item.lstrip("+").replace("=", "/", 1))) is not None:
            raise ConfigError(renamed)
    search = [recipe.path.parent, *group_dirs(recipe.path.parent, config_dirs), RECIPES_DIR]
    searchpath = "hydra.searchpath=[" + ",".join(f"file://{d}" for d in dict.fromkeys(search)) + "]"
    jobs = [*listify(RunCfg, overrides), f"recipe={recipe.name}", searchpath]
    try:
        with initialize_config_dir(config_dir=str(recipe.path.parent), version_base="1.3"):
            cfg = compose(config_name=recipe.path.stem, overrides=jobs)
        # Hydra lets `+new_key=...` through at the root; merging into the schema rejects it.
        return OmegaConf.merge(OmegaConf.structured(RunCfg), OmegaConf.to_container(cfg))
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise ConfigError(describe_error(err, RunCfg, f"recipe {recipe.name}")) from err


def compose_schema(schema: type, overrides: list[str]) -> DictConfig:
    """Parse a command's `key=value` arguments (merge, eval) into its schema with Hydra's override grammar.

    Raises:
        ConfigError: an unknown key, a badly typed value or an unparsable argument.
    """
    name = f"ftune_{schema.__name__.lower()}"
    ConfigStore.instance().store(name=name, node=schema)
    try:
        with initialize(version_base="1.3", config_path=None):
            cfg = compose(config_name=name, overrides=listify(schema, overrides))
        return OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.to_container(cfg))
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise ConfigError(describe_error(err, schema, None)) from err


def check_override_shape(overrides: list[str]) -> None:
    """Every argument is `key=value`, `+key=value` or `~key` (Hydra's own message for others is cryptic).

    Raises:
        ConfigError: naming the first argument that is none of these.
    """
    for item in overrides:
        key, eq, _ = item.partition("=")
        if not key.lstrip("+~") or (not eq and not key.startswith("~")):
            raise ConfigError(f"argument {item!r}: expected key=value (or +key=value to add a key, ~key to remove one)")


def listify(schema: type, overrides: list[str]) -> list[str]:
    """Wrap a scalar given for a list field in a one-element list: `lora.target_modules=all-linear`.

    PEFT and most peers spell a single target as a string; OmegaConf would refuse it for a list field. A mapping
    stays as it is, for the schema to refuse (wrapped, it would pass as a list holding one mapping).
    """
    check_override_shape(overrides)
    rewritten = []
    for item in overrides:
        key, eq, value = item.partition("=")
        field = schema_field(schema, key.lstrip("+"))
        is_list = field is not None and typing.get_origin(unwrap_optional(field.type)) is list
        if eq and is_list and value and value.lstrip()[:1] not in ("[", "{") and value != "null":
            item = f"{key}=[{value}]"
        rewritten.append(item)
    return rewritten


def schema_field(schema: type, dotted: str) -> dataclasses.Field | None:
    """The dataclass field a dotted key (`optim.lr`, `data.mix[0].weight`) names, or None if it names none."""
    node, found = schema, None
    for part in dotted.replace("[", ".[").split("."):
        if part.startswith("[") or not part:
            continue  # a list index: stay on the element type
        if node is None or not dataclasses.is_dataclass(node):
            return None
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return None
        found = fields[part]
        node = element_type(found.type)
    return found


def unwrap_optional(annotation):
    """`X | None` -> X; anything else unchanged."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if type(None) in typing.get_args(annotation) and len(args) == 1 else annotation


def element_type(annotation):
    """The type a nested key continues in: the dataclass itself, or the element of a list of dataclasses."""
    annotation = unwrap_optional(annotation)
    if typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]
    return annotation if dataclasses.is_dataclass(annotation) else None


def expected(annotation) -> str:
    """What a field of this type takes, in a user's words (never a library's class names)."""
    optional = type(None) in typing.get_args(annotation)
    annotation = unwrap_optional(annotation)
    words = SCALAR_WORDS.get(annotation)
    if words is None:
        origin = typing.get_origin(annotation)
        if origin is list:
            words = "a list, e.g. [a, b] (one value is taken as a one-element list on the command line)"
        elif origin is dict:
            words = "a mapping, e.g. {key: value}; add one entry with +KEY.NAME=VALUE"
        elif dataclasses.is_dataclass(annotation):
            words = f"a group of keys ({', '.join(f.name for f in dataclasses.fields(annotation))})"
        else:
            words = "a value of another type"
    return f"{words} or null" if optional else words


def describe_error(err: Exception, schema: type, context: str | None) -> str:
    """One line saying which key or argument is wrong and what it expects, in ftune's words."""
    cause = err if isinstance(err, OmegaConfBaseException) else (err.__cause__ or err)
    if isinstance(err, MissingConfigException) and err.missing_cfg_file in RENAMED_OPTIONS:
        return f"{context}: {RENAMED_OPTIONS[err.missing_cfg_file]}"
    if isinstance(err, MissingConfigException) and err.options is not None:
        group = (err.missing_cfg_file or "").rsplit("/", 1)[0]
        return f"{context}: no option '{err.missing_cfg_file}' (available {group}: {', '.join(err.options)})"
    if isinstance(err, MissingConfigException):
        return f"{context}: {' '.join(str(err).split())}"
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return describe_key_error(cause, schema, str(err))
    text = " ".join(str(err).split("See https")[0].split())
    if "missing EQUAL" in text or isinstance(err, ValueError):
        return f"{text.split(' missing')[0]}: expected key=value (or +key=value to add a key, ~key to remove one)"
    if isinstance(err, OverrideParseException):
        return f"{err.override}: cannot parse this argument ({QUOTING_HINT})"
    return scrub(text)


QUOTING_HINT = ("quote a value holding spaces or any of [ ] { } ( ) , : = < > inside the argument, e.g. "
                "\"model.add_tokens=['<tense>','</tense>']\", and close every bracket")
"""What an argument Hydra's override grammar cannot parse usually needs (its own message names lexer states)."""


def describe_key_error(cause: OmegaConfBaseException, schema: type, outer: str) -> str:
    """An error OmegaConf raised about one key: unknown, or a value of the wrong type."""
    key = cause.full_key
    field = schema_field(schema, key)
    override = outer.removeprefix("Error merging override ").lstrip("+~").split("=")[0]
    if override.startswith(f"{key}.") and field is not None and element_type(field.type) is None:
        return f"{override}: unknown key ({key} is {expected(field.type)}, it has no keys)"
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) or field is None:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        parent_field = schema_field(schema, parent) if parent else None
        if parent_field is not None and element_type(parent_field.type) is None:
            return f"{key}: unknown key ({parent} is {expected(parent_field.type)}, it has no keys)"
        return f"{key}: unknown key (known keys here: {', '.join(known_keys(schema, key))})"
    if outer.startswith("Error merging override ~"):
        return f"~{key}: cannot remove a key ftune defines (set it instead: {key}=VALUE, or {key}=null)"
    given, annotation = getattr(cause, "value", None), unwrap_optional(field.type)
    if key.endswith("]") and typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]  # the key is an item of the list: what each item must be
    return f"{key}: expected {expected(annotation)}" + (f", got {given!r}" if given is not None else "")


def known_keys(schema: type, full_key: str) -> list[str]:
    """The schema's field names at the level of `full_key` (for 'unknown key' messages)."""
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    field = schema_field(schema, parent) if parent else None
    node = element_type(field.type) if field is not None else schema
    return [f.name for f in dataclasses.fields(node or schema)]


INTERNAL_WORDS = {"DictConfig": "a mapping", "ListConfig": "a list", "ConfigCompositionException": "error"}
"""Class names of OmegaConf/Hydra that their messages may carry, and what a user reads instead."""


def scrub(text: str) -> str:
    """Replace library class names in a message a user will read."""
    for word, plain in INTERNAL_WORDS.items():
        text = text.replace(word, plain)
    return text


def load_run_config(overrides: list[str], config_dirs: tuple[str, ...] = ()) -> tuple[RunCfg, DictConfig]:
    """Compose, resolve, type and validate a run config; all problems are reported at once.

    `auto` settings are decided here (`resolve_automatic`), so config.yaml records what ran.

    Returns:
        The typed config and the resolved DictConfig (what `--cfg job` prints and config.yaml stores).
    """
    cfg = compose_config(overrides, config_dirs)
    try:
        OmegaConf.resolve(cfg)
        resolve_automatic(cfg)
        typed = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(describe_error(err, RunCfg, f"recipe {recipe_value(overrides)}")) from err
    problems = validate(typed)
    if problems:
        raise ConfigError("; ".join(problems))
    return typed, cfg


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Expand `-m` sweep overrides (`lora.r=4,8`, `range(...)`, ...) into one override list per job."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise ConfigError(describe_error(err, RunCfg, None)) from err
    choices = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() else [o.input_line]
        for o in parsed
    ]
    return [list(job) for job in itertools.product(*choices)]


def load_command_config(schema: type, overrides: list[str], check=None, adjust=None):
    """Parse a command's arguments (merge, eval) into its typed schema and check its rules.

    `check(typed) -> list[str]` adds the command's cross-field rules; all problems are reported at once.
    `adjust(composed) -> DictConfig` may fill settings from elsewhere (eval's `run=`) before values are checked.

    Returns:
        The typed config and the resolved DictConfig (what `--cfg job` prints).

    Raises:
        ConfigError: an unknown key, a badly typed value, or a problem the field or cross-field rules find.
    """
    cfg = compose_schema(schema, overrides)
    if adjust is not None:
        cfg = adjust(cfg)
    try:
        OmegaConf.resolve(cfg)
        typed = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(describe_error(err, schema, None)) from err
    problems = list(field_problems(typed, prefix="")) + (check(typed) if check else [])
    if problems:
        raise ConfigError("; ".join(problems))
    return typed, cfg


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
