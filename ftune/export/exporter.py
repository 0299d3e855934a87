"""`export(cfg)`: write one serving format, prove it computes what the trained model does, then publish it.

Order: check the inputs without loading weights (`source`), write the format into a staging directory,
read it back with the runtime that serves it and compare (`hf`, `gguf_parity`, `adapter`), and only when
every check passed add `export_report.json` and the model card and rename the directory into place
(`ftune.atomic`). A failed check raises `ParityError` and leaves nothing behind; a push comes last.
"""

import importlib.util
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ftune.atomic import STAGING_PREFIX, atomic_dir
from ftune.config.architecture import config_dir
from ftune.config.commands import ExportCfg
from ftune.errors import ResourceError
from ftune.export.adapter import server_warnings, write_adapter
from ftune.export.hf import save_standalone, write_hf
from ftune.export.parity import require_passed
from ftune.export.push import push_export
from ftune.export.source import ExportSource, resolve_source
from ftune.report.card import CardFacts, render_card
from ftune.train.card import run_card_facts

REPORT_FILE = "export_report.json"
CARD_FILE = "README.md"
LIBRARY = {"hf": "transformers", "gguf": "gguf", "adapter": "peft"}
"""Front matter `library_name` of each format's card."""


@dataclass
class ExportResult:
    """What `export` wrote, how the parity checks went, the servers' warnings and the push."""

    out: Path
    files: list[str]
    parity: dict
    warnings: list[str]
    push: str | None


def export(cfg: ExportCfg) -> ExportResult:
    """Export `cfg`'s source in `cfg.format` to `cfg.out`, checked against the trained model.

    Raises:
        ResourceError: a missing input (or llama-cpp-python, for format=gguf).
        ConfigError: an input the format cannot take (checked before any weights load), or a bad `out`.
        ParityError: the export does not match the trained model; nothing was written.
    """
    source = resolve_source(cfg)
    if cfg.format == "gguf":
        check_gguf_source(source)
    warnings = server_warnings(source.peft_config) if cfg.format == "adapter" else []
    out = Path(cfg.out)
    with atomic_dir(out) as staging:
        parity = WRITERS[cfg.format](cfg, source, staging)
        require_passed(parity, f"format={cfg.format}")
        files = sorted(path.name for path in staging.iterdir()) + [REPORT_FILE, CARD_FILE]
        report = {"format": cfg.format, "quant": cfg.quant if cfg.format == "gguf" else None,
                  "source": str(source.directory.resolve()), "base": source.base, "files": files,
                  "parity": parity, "warnings": warnings}
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        (staging / CARD_FILE).write_text(render_card(card_facts(cfg, source, parity)), encoding="utf-8")
    pushed = push_export(out, cfg.repo_id, cfg.private) if cfg.push else None
    return ExportResult(out, files, parity, warnings, pushed)


def check_gguf_source(source: ExportSource) -> None:
    """Refuse, before any weights load, a missing `ftune[gguf]` extra or what the GGUF converter cannot map.

    The config is the model's own or the adapter base's (local, or ftune's shipped copy of a hub config); the
    tokenizer is the one saved with the source. When either is not at hand, `write_gguf` checks the merged
    model instead.

    Raises:
        ResourceError: gguf or llama-cpp-python is not installed.
        ConfigError: what the converter cannot map (`gguf_file.check_convertible`).
    """
    require_module("gguf")
    from ftune.export.gguf_file import check_convertible, read_json

    model = config_dir(str(source.directory) if not source.is_adapter else source.base)
    tokenizer = source.directory / "tokenizer.json"
    if model is not None and tokenizer.is_file():
        check_convertible(read_json(model / "config.json"), read_json(tokenizer))
    require_module("llama_cpp")


def require_module(name: str) -> None:
    """Raise a one-line `ResourceError` when `name` (a module of the `ftune[gguf]` extra) is not installed."""
    if importlib.util.find_spec(name) is None:
        raise ResourceError(f"format=gguf needs the {name} module (to write the file and check it with llama.cpp)",
                            "pip install 'ftune[gguf]'")


def write_gguf_export(cfg: ExportCfg, source: ExportSource, to: Path) -> dict:
    """Merge into a full-precision standalone model (a scratch directory), convert it, check the file with llama.cpp.

    Returns:
        The parity report: the merge check, then llama.cpp's checks against the trained model.
    """
    from ftune.export.gguf_file import write_gguf
    from ftune.export.gguf_parity import gguf_parity

    with tempfile.TemporaryDirectory(prefix=STAGING_PREFIX, dir=to.parent) as scratch:
        saved = save_standalone(source, "fp32", Path(scratch))
        path = to / f"{Path(cfg.out).name}-{cfg.quant}.gguf"
        write_gguf(Path(scratch), path, cfg.quant, name=Path(cfg.out).name)
        parity = gguf_parity(path, saved, cfg.quant)
    return parity | {"checks": saved.checks | parity["checks"], "figures": saved.figures}


WRITERS = {"hf": write_hf, "gguf": write_gguf_export, "adapter": write_adapter}
"""format -> the function that writes it into a staging directory and returns its parity report."""


def card_facts(cfg: ExportCfg, source: ExportSource, parity: dict) -> CardFacts:
    """The run's facts when the source is a run (else what the source itself says), plus format and parity."""
    if source.run_dir is not None:
        facts = run_card_facts(source.run_dir)
    else:
        method = source.peft_config.peft_type.value.lower() if source.is_adapter else None
        facts = CardFacts(title=source.directory.name, base_model=source.base, method=method,
                          tags=[method] if method else [])
    facts.library = LIBRARY[cfg.format]
    facts.tags = [*facts.tags, cfg.format, *([cfg.quant] if cfg.format == "gguf" else [])]
    facts.parity = parity
    return facts
