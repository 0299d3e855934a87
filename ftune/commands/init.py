"""`ftune init [NAME] [--from RECIPE]`: write a commented starting recipe into the working directory.

    ftune init my --from qlora_7b          -> ./my.yaml; then: ftune train recipe=./my.yaml

The file starts from RECIPE through Hydra's defaults list and lists the values people change first (model, data,
method, LoRA, optimizer, schedule), each with the schema's own description as a comment; anything else can be
added under the same section names (`ftune train recipe=./my.yaml --cfg job` prints every key). It never
overwrites a file, like torchtune's `tune cp`.
"""

import textwrap
from pathlib import Path

from omegaconf import OmegaConf

from ftune.atomic import write_text
from ftune.config.compose import RECIPE_SUFFIXES, compose_config, find_recipe
from ftune.config.schema import RunCfg, field_docs
from ftune.errors import ConfigError
from ftune.report.console import console

STARTING_KEYS: dict[str, tuple[str, ...]] = {
    "model": ("name_or_path", "dtype", "attn_implementation", "gradient_checkpointing"),
    "data": ("path", "eval_path", "format", "chat_template", "max_length", "packing"),
    "method": ("name",),
    "lora": ("r", "alpha", "dropout", "target_modules"),
    "quant": ("bits",),
    "optim": ("name", "lr", "scheduler", "warmup_ratio"),
    "trainer": ("epochs", "max_steps", "micro_batch_size", "grad_accum", "eval_every", "save_every"),
}
"""The sections and keys a starting recipe spells out (the ones a first fine-tune of one's own changes)."""


def run(args) -> int:
    """Write NAME.yaml into the working directory, starting from `--from`."""
    target = recipe_target(args.name)
    base = find_recipe(args.base)
    if not base.shipped and base.path.parent != Path.cwd().resolve():
        raise ConfigError(f"--from {args.base}: a recipe outside the working directory",
                          "start from a shipped recipe or a recipe file in this directory")
    if base.path == target.resolve():
        raise ConfigError(f"ftune init {args.name} --from {args.base}: the recipe would start from itself",
                          "pick another NAME")
    write_text(target, starting_recipe(target, base.name))
    console.print(f"wrote {target.name}: train it with  ftune train recipe=./{target.name}", markup=False,
                  highlight=False, soft_wrap=True)
    return 0


def recipe_target(name: str) -> Path:
    """`./NAME.yaml` (NAME may carry its suffix); refuses an existing file.

    Raises:
        ConfigError: the file exists, or NAME is a path rather than a file name.
    """
    if "/" in name:
        raise ConfigError(f"ftune init {name}: expected a file name, not a path", "run it in the target folder")
    target = Path.cwd() / (name if Path(name).suffix in RECIPE_SUFFIXES else f"{name}.yaml")
    if target.exists():
        raise ConfigError(f"{target}: already exists (ftune init never overwrites)", "pick another NAME or remove it")
    return target


def starting_recipe(target: Path, base: str) -> str:
    """The text of the new recipe: a header, the defaults list, and the starting keys with their descriptions."""
    composed = compose_config([f"recipe={base}"])
    lines = [
        f"# {target.name}: an ftune recipe. Train it with:  ftune train recipe=./{target.name}",
        f"# It starts from the recipe `{base}` and sets what differs. Values here win over {base}'s, and",
        "# command-line overrides (optim.lr=1e-4) win over both. `--cfg job` prints every key of the run.",
        "defaults:",
        f"  - {base}",
        "  - _self_",
    ]
    for section, keys in STARTING_KEYS.items():
        if section == "quant" and not composed.quant.bits:
            continue
        if section == "lora" and composed.method.name != "lora":
            continue
        lines += ["", f"{section}:"]
        docs = field_docs(type(getattr(RunCfg(), section)))
        values = OmegaConf.to_container(composed[section], resolve=False)  # keep ${ftune_asset:...} as written
        for key in keys:
            lines += [f"  # {line}" for line in textwrap.wrap(docs.get(key, ""), 112)]
            value = OmegaConf.to_yaml({key: values[key]}).rstrip()
            lines += [f"  {line}" for line in value.splitlines()]
    return "\n".join(lines) + "\n"
