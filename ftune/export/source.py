"""What `ftune export` exports: a run's `final/`, an adapter directory, or a standalone model directory.

Every check that needs no weights runs here, before anything loads: the directories exist, an adapter names
(or is given) its base and can be merged when the format needs merged weights, and `out` overlaps no input.
"""

from dataclasses import dataclass
from pathlib import Path

import yaml

from ftune.config.commands import ExportCfg
from ftune.config.schema import QuantCfg
from ftune.errors import ConfigError, ResourceError
from ftune.model.adapters import can_merge
from ftune.model.merge import ADAPTER_CONFIG, canonical_base, check_output_dir, read_adapter_config, shared_base

FINAL_DIR = "final"
"""A run's trained artefact (`ftune.train.artefacts` writes it)."""


@dataclass(frozen=True)
class ExportSource:
    """A trained model to export: an adapter and its base, or a standalone model; the run it came from if any."""

    directory: Path
    """The adapter or model directory, which also holds the tokenizer and chat template the model was trained with."""
    base: str | None
    """The adapter's base (a hub id or an absolute path); None for a standalone model."""
    peft_config: object | None
    """The adapter's PEFT config; None for a standalone model."""
    run_dir: Path | None
    quant: QuantCfg | None = None
    """How the run quantized the base it trained the adapter on (QLoRA); None for full precision or unknown."""

    @property
    def is_adapter(self) -> bool:
        return self.peft_config is not None


def resolve_source(cfg: ExportCfg) -> ExportSource:
    """The export's input, checked without loading weights; also refuses an `out` that would overwrite an input.

    `out` may lie inside the run directory (e.g. `out=runs/a/gguf`), never in or around `final/` or the base.

    Raises:
        ResourceError: a missing directory, a run without `final/`, or a directory that holds neither an adapter
            nor a model.
        ConfigError: an adapter that cannot be merged into a format that needs merged weights, or a bad `out`.
    """
    run_dir = Path(cfg.run) if cfg.run is not None else None
    key, directory = source_directory(cfg, run_dir)
    if (directory / ADAPTER_CONFIG).is_file() or key == "adapter":
        peft_config = read_adapter_config(str(directory), key)
        if cfg.format != "adapter" and not can_merge(peft_config.peft_type.value.lower()):
            raise ConfigError(f"{key}={directory}: a {peft_config.peft_type.value} adapter adds virtual tokens "
                              f"instead of changing weights, so format={cfg.format} cannot merge it",
                              "use format=adapter")
        base = canonical_base(cfg.base) if cfg.base is not None else shared_base([peft_config], [str(directory)])
        source = ExportSource(directory, base, peft_config, run_dir, training_quant(run_dir))
    elif (directory / "config.json").is_file():
        source = ExportSource(directory, None, None, run_dir)
    else:
        raise ResourceError(f"{key}={directory}: holds neither {ADAPTER_CONFIG} nor config.json",
                            "expected an adapter or a model directory, e.g. <run>/final")
    inputs = [str(path) for path in (directory, source.base) if path is not None]  # out may lie in the run dir
    check_output_dir(Path(cfg.out), inputs, cfg.overwrite)
    return source


def source_directory(cfg: ExportCfg, run_dir: Path | None) -> tuple[str, Path]:
    """(the key that named it, the directory to export): `final/` of a run, or the adapter or model given.

    Raises:
        ResourceError: the directory (or the run's `final/`) does not exist.
    """
    if run_dir is not None:
        if not run_dir.is_dir():
            raise ResourceError(f"run={run_dir}: no such directory", "expected a run directory (output_dir= of train)")
        if not (run_dir / FINAL_DIR).is_dir():
            raise ResourceError(f"run={run_dir}: no {FINAL_DIR}/ (the run has not finished)",
                                "finish it with ftune train ... resume=auto, or export adapter=<checkpoint>")
        return "run", run_dir / FINAL_DIR
    key, path = ("adapter", cfg.adapter) if cfg.adapter is not None else ("model", cfg.model)
    if not Path(path).is_dir():
        raise ResourceError(f"{key}={path}: no such directory", f"expected a local {key} directory")
    return key, Path(path)


def training_quant(run_dir: Path | None) -> QuantCfg | None:
    """The run's `quant` settings when it trained on a quantized base (read from its config.yaml)."""
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return None
    quant = yaml.safe_load((run_dir / "config.yaml").read_text()).get("quant") or {}
    return QuantCfg(**quant) if quant.get("bits") else None
