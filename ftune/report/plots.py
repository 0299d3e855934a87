"""PNG plots of a run, drawn from metrics.jsonl rows: loss curves and probe drift, steps on x."""

from pathlib import Path

from ftune.atomic import atomic_file


def write_plots(rows: list[dict], plot_dir: Path) -> list[Path]:
    """Draw `loss.png` (train and eval loss) and, when the probe ran, `probe.png`; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render straight to files
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = [plot_series(rows, plot_dir / "loss.png", "Loss", "loss (mean per learned token)",
                           {"train loss": "loss", "eval loss": "eval_loss"})]
    if any("probe_drift" in r for r in rows):
        written.append(plot_series(rows, plot_dir / "probe.png", "Forgetting probe", "probe perplexity drift vs base",
                                   {"probe drift": "probe_drift"}, zero_line=True))
    return written


def plot_series(rows: list[dict], path: Path, title: str, ylabel: str, series: dict[str, str],
                zero_line: bool = False) -> Path:
    """One figure with a line per (label, metric key) over the rows that have that key."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, key in series.items():
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=label)
    if zero_line:
        ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(path) as staging:
        fig.savefig(staging, format="png")
    plt.close(fig)
    return path
