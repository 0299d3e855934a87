"""PNG plots of a run, drawn from metrics.jsonl rows: loss curves, rewards, completion lengths and probe drift."""

from pathlib import Path

from ftune.atomic import atomic_file


def write_plots(rows: list[dict], plot_dir: Path) -> list[Path]:
    """Draw `loss.png`, the preference and GRPO reward plots, and `probe.png` (the probe).

    Each only where its metrics were logged; returns the files written.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: render straight to files
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = [plot_series(rows, plot_dir / "loss.png", "Loss", "loss (the objective's mean: per token, pair, ...)",
                           {"train loss": "loss", "eval loss": "eval_loss"})]
    for key, title in (("reward_accuracy", "Reward accuracy"), ("reward_margin", "Reward margin")):
        if any(key in r for r in rows):
            written.append(plot_series(rows, plot_dir / f"{key}.png", title, f"{title.lower()} (chosen vs rejected)",
                                       {f"train {key}": key, f"eval {key}": f"eval_{key}"}))
    written += online_reward_plots(rows, plot_dir)
    if any("probe_drift" in r for r in rows):
        written.append(plot_series(rows, plot_dir / "probe.png", "Forgetting probe", "probe perplexity drift vs base",
                                   {"probe drift": "probe_drift"}, zero_line=True))
    return written


def online_reward_plots(rows: list[dict], plot_dir: Path) -> list[Path]:
    """GRPO: `rewards.png` (the weighted reward and each function's, train and eval) and `completion_length.png`."""
    if not any("reward_std" in r for r in rows):  # GRPO's rows (a preference run logs its rewards per response)
        return []
    keys = sorted({k for r in rows for k in r if k.startswith("reward") and k != "reward_std"})
    splits = (("train", ""), ("eval", "eval_"))
    series = {f"{split} {key}": f"{prefix}{key}" for key in keys for split, prefix in splits}
    return [plot_series(rows, plot_dir / "rewards.png", "Rewards", "mean reward per completion", series),
            plot_series(rows, plot_dir / "completion_length.png", "Completion length", "tokens per completion",
                        {"mean": "completion_length", "min": "completion_length_min",
                         "max": "completion_length_max"})]


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
