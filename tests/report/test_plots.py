"""The PNG plots of a run (`ftune.report.plots`): which files are written for which logged metrics.

And which curves each figure holds (labels, steps and values), read from the figures before they are closed.
"""

import math
import struct

import pytest

from ftune.report.plots import write_plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def figures(monkeypatch):
    """Every figure `write_plots` draws, kept as `{title: figure}` when pyplot closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn, close = {}, plt.close

    def keep(fig=None):
        drawn[fig.axes[0].get_title()] = fig
        close(fig)

    monkeypatch.setattr(plt, "close", keep)
    return drawn


def curves(fig) -> dict[str, tuple[list, list]]:
    """Each labelled line of a figure's axes: label -> (steps, values)."""
    lines = [line for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")]
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in lines}


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return struct.unpack(">II", data[16:24])


SFT_ROWS = [
    {"step": 1, "loss": 3.0, "lr": 1e-4},
    {"step": 2, "loss": 2.5, "lr": 1e-4},
    {"step": 2, "eval_loss": 2.75, "eval_ppl": 15.6},
    {"step": 3, "loss": 2.0, "lr": 1e-4},
    {"step": 4, "loss": 1.5, "lr": 1e-4},
    {"step": 4, "eval_loss": 2.25, "eval_ppl": 9.49},
]


def test_a_run_without_preferences_or_probe_gets_the_loss_plot_alone(tmp_path, figures):
    plot_dir = tmp_path / "run" / "plots"
    assert write_plots(SFT_ROWS, plot_dir) == [plot_dir / "loss.png"]
    assert sorted(p.name for p in plot_dir.iterdir()) == ["loss.png"]  # no staging file left behind
    assert png_size(plot_dir / "loss.png") == (770, 440)  # 7 x 4 inches at 110 dpi
    (fig,) = figures.values()
    axes = fig.axes[0]
    assert (axes.get_title(), axes.get_xlabel(), axes.get_ylabel()) == (
        "Loss", "optimizer step", "loss (the objective's mean: per token, pair, ...)")
    assert curves(fig) == {"train loss": ([1, 2, 3, 4], [3.0, 2.5, 2.0, 1.5]), "eval loss": ([2, 4], [2.75, 2.25])}
    assert [text.get_text() for text in axes.get_legend().get_texts()] == ["train loss", "eval loss"]
    assert {line.get_marker() for line in axes.get_lines()} == {"o"}  # few points: each one marked


def test_preference_runs_get_reward_plots_with_train_and_eval_curves(tmp_path, figures):
    rows = [{"step": 1, "loss": 0.69, "reward_accuracy": 0.0, "reward_margin": 0.0},
            {"step": 2, "loss": 0.6, "reward_accuracy": 0.75, "reward_margin": 0.5},
            {"step": 2, "eval_loss": 0.65, "eval_reward_accuracy": 0.5, "eval_reward_margin": 0.25}]
    written = write_plots(rows, tmp_path)
    assert written == [tmp_path / "loss.png", tmp_path / "reward_accuracy.png", tmp_path / "reward_margin.png"]
    assert all(png_size(path) == (770, 440) for path in written)
    assert set(figures) == {"Loss", "Reward accuracy", "Reward margin"}
    assert curves(figures["Reward accuracy"]) == {"train reward_accuracy": ([1, 2], [0.0, 0.75]),
                                                  "eval reward_accuracy": ([2], [0.5])}
    assert curves(figures["Reward margin"]) == {"train reward_margin": ([1, 2], [0.0, 0.5]),
                                                "eval reward_margin": ([2], [0.25])}
    assert figures["Reward margin"].axes[0].get_ylabel() == "reward margin (chosen vs rejected)"



def test_grpo_runs_get_a_curve_per_reward_function_and_the_completion_lengths(tmp_path, figures):
    rows = [{"step": 1, "loss": 0.1, "reward": 0.5, "reward_tense": 0.25, "reward_std": 0.3, "completion_length": 9.0,
             "completion_length_min": 4.0, "completion_length_max": 24.0},
            {"step": 2, "loss": 0.1, "reward": 1.0, "reward_tense": 0.75, "reward_std": 0.2, "completion_length": 8.0,
             "completion_length_min": 5.0, "completion_length_max": 20.0},
            {"step": 2, "eval_reward": 0.9, "eval_reward_tense": 0.7}]
    written = write_plots(rows, tmp_path)
    assert written == [tmp_path / "loss.png", tmp_path / "rewards.png", tmp_path / "completion_length.png"]
    assert curves(figures["Rewards"]) == {"train reward": ([1, 2], [0.5, 1.0]), "eval reward": ([2], [0.9]),
                                          "train reward_tense": ([1, 2], [0.25, 0.75]),
                                          "eval reward_tense": ([2], [0.7])}
    assert curves(figures["Completion length"]) == {"mean": ([1, 2], [9.0, 8.0]), "min": ([1, 2], [4.0, 5.0]),
                                                    "max": ([1, 2], [24.0, 20.0])}


def test_the_probe_plot_shows_the_drift_against_a_zero_line(tmp_path, figures):
    rows = [*SFT_ROWS[:3], {"step": 2, "probe_ppl": 10.0, "probe_drift": 0.0},
            {"step": 4, "probe_ppl": 10.5, "probe_drift": 0.05}]
    assert write_plots(rows, tmp_path) == [tmp_path / "loss.png", tmp_path / "probe.png"]
    axes = figures["Forgetting probe"].axes[0]
    assert axes.get_ylabel() == "probe perplexity drift vs base"
    assert curves(figures["Forgetting probe"]) == {"probe drift": ([2, 4], [0.0, 0.05])}
    (zero,) = [line for line in axes.get_lines() if line.get_label().startswith("_")]
    assert list(zero.get_ydata()) == [0.0, 0.0] and zero.get_linestyle() == "--"
    assert not [line for line in figures["Loss"].axes[0].get_lines() if line.get_label().startswith("_")]


@pytest.mark.parametrize(("points", "marker"), [(29, "o"), (30, "None")])
def test_from_30_points_a_curve_is_a_line_without_markers(tmp_path, figures, points, marker):
    rows = [{"step": step, "loss": 1.0 / step} for step in range(1, points + 1)]
    write_plots(rows + [{"step": points, "eval_loss": 0.5}], tmp_path)
    (line, eval_line) = figures["Loss"].axes[0].get_lines()
    assert (line.get_marker(), eval_line.get_marker()) == (marker, "o")
    assert list(line.get_xdata()) == list(range(1, points + 1))


def test_a_non_finite_loss_is_plotted_as_logged(tmp_path, figures):
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": math.nan}, {"step": 3, "loss": math.inf}]
    write_plots(rows, tmp_path)
    steps, values = curves(figures["Loss"])["train loss"]
    assert steps == [1, 2, 3] and values[0] == 2.0 and math.isnan(values[1]) and values[2] == math.inf
    assert png_size(tmp_path / "loss.png") == (770, 440)


@pytest.mark.filterwarnings("ignore:No artists with labels found")
def test_no_rows_still_give_an_empty_loss_plot(tmp_path, figures):
    assert write_plots([], tmp_path) == [tmp_path / "loss.png"]
    assert curves(figures["Loss"]) == {} and png_size(tmp_path / "loss.png") == (770, 440)


def test_plots_drawn_again_replace_the_old_files(tmp_path, figures):
    write_plots([{"step": 1, "loss": 1.0}], tmp_path)
    first = (tmp_path / "loss.png").read_bytes()
    write_plots(SFT_ROWS, tmp_path)
    assert (tmp_path / "loss.png").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]
