"""The model card (`README.md` with Hugging Face front matter) of a run's `final/` and of every export.

It is rendered from values it is handed (`CardFacts`): what was trained and how, on what, with which result,
and, for an export, how closely the served model matched the trained one. The front matter is written by
`huggingface_hub.ModelCardData`, so the Hub reads base model, library, license, tags and datasets from it.
"""

from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import ModelCardData

import ftune

EVAL_KEYS = ("eval_loss", "eval_ppl", "probe_ppl", "probe_drift")
"""The final evaluation's figures a card reports, in this order (`probe_drift` is the forgetting probe's)."""


@dataclass
class CardFacts:
    """Everything a model card states; None (or empty) where a value is not known, e.g. an export of a bare adapter."""

    title: str
    base_model: str | None = None
    library: str = "transformers"
    """Front matter `library_name`: peft (an adapter), transformers (a model) or gguf (a llama.cpp file)."""
    method: str | None = None
    hyperparameters: dict[str, object] = field(default_factory=dict)
    data_sources: list[tuple[str, int | None]] = field(default_factory=list)
    """(path or hub id, number of records when counted) of each training source."""
    datasets: list[str] = field(default_factory=list)
    """Hub dataset ids among the sources (front matter `datasets`)."""
    max_length: int | None = None
    steps: int | None = None
    epochs: float | None = None
    stop_reason: str | None = None
    eval_metrics: dict[str, float] = field(default_factory=dict)
    hardware: str | None = None
    wall_time_s: float | None = None
    """The whole run, setup included (summary.json); unknown while `final/` is written, just before the summary."""
    logged_time_s: float | None = None
    """From the first to the last logged training step (metrics.jsonl): what `final/`'s card can state."""
    license: str = "unknown"
    tags: list[str] = field(default_factory=list)
    parity: dict | None = None
    """An export's parity report (`ftune.export`): the checks run against the trained model and their figures."""


def render_card(facts: CardFacts) -> str:
    """The card's full text: YAML front matter, then what was trained, its results and the export's parity."""
    front = ModelCardData(base_model=hub_id_or_none(facts.base_model), library_name=facts.library,
                          license=facts.license, tags=["ftune", *facts.tags], datasets=facts.datasets or None,
                          pipeline_tag="text-generation")
    parts = [f"---\n{front.to_yaml()}\n---\n", f"# {facts.title}\n", summary_line(facts),
             table("Training", training_rows(facts))]
    if facts.eval_metrics:
        parts.append(table("Final evaluation", {key: f"{value:.4g}" for key, value in facts.eval_metrics.items()}))
    if facts.parity is not None:
        parts.append(table("Export parity (the served model against the trained one)", parity_rows(facts.parity)))
    return "\n".join(part for part in parts if part)


def hub_id_or_none(name: str | None) -> str | None:
    """`name` when it reads as a Hub id (`org/name`) and is no local path; a local path means nothing on the Hub."""
    if not name or name.startswith(("/", ".", "~")) or name.count("/") != 1 or Path(name).exists():
        return None
    return name


def summary_line(facts: CardFacts) -> str:
    """One sentence: the method and the base model."""
    method = f"{facts.method} fine-tune" if facts.method else "Export"
    base = f" of `{facts.base_model}`" if facts.base_model else ""
    return f"{method}{base}, made with ftune {ftune.__version__}.\n"


def training_rows(facts: CardFacts) -> dict[str, str]:
    """The training table: only the rows whose values are known."""
    rows = {
        "method": facts.method,
        "hyperparameters": ", ".join(f"{key}={value}" for key, value in facts.hyperparameters.items()),
        "data": "; ".join(f"`{path}` ({'?' if count is None else count} records)"
                          for path, count in facts.data_sources),
        "sequence length": facts.max_length,
        "steps": facts.steps,
        "epochs": facts.epochs,
        "stopped by": facts.stop_reason,
        "hardware": facts.hardware,
        "wall time": None if facts.wall_time_s is None else f"{facts.wall_time_s:.0f} s",
        "time from first to last step": None if facts.logged_time_s is None else f"{facts.logged_time_s:.0f} s",
        "ftune version": ftune.__version__,
    }
    return {key: str(value) for key, value in rows.items() if value not in (None, "")}


def parity_rows(parity: dict) -> dict[str, str]:
    """Each parity check as `figure (tolerance)` with its verdict, then the figures measured without a check."""
    rows = {"runtime": parity.get("runtime", "")}
    for name, check in parity.get("checks", {}).items():
        tolerance = f" (tolerance {check['tolerance']:.3g})" if check.get("tolerance") is not None else ""
        rows[name] = f"{shown(check.get('value'))}{tolerance}: {'pass' if check['passed'] else 'FAIL'}"
    for name, value in parity.get("figures", {}).items():
        rows[name] = f"{shown(value)} (measured, not checked)"
    return rows


def shown(value) -> str:
    """A figure as the card prints it: 3 significant digits for floats."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def table(title: str, rows: dict[str, str]) -> str:
    """A two-column Markdown table under a heading; empty when there are no rows."""
    if not rows:
        return ""
    body = "\n".join(f"| {escape_pipes(key)} | {escape_pipes(value)} |" for key, value in rows.items())
    return f"## {title}\n\n| | |\n| --- | --- |\n{body}\n"


def escape_pipes(text) -> str:
    """`text` with its `|` escaped, so that a figure such as max |logit diff| stays inside its table cell."""
    return str(text).replace("|", "\\|")
