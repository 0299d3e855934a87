"""What a run shows on the terminal (`ftune.report.console`): `print_table`'s tables and training's progress.

The exact key/value tables, on stderr; plain progress lines every tenth of the run when output is no terminal, a
bar when it is one, nothing when disabled.
"""

import io
import math

import pytest
from rich.console import Console

from ftune.report import console as console_module
from ftune.report.console import TrainProgress, print_table

ROW = {"loss": 1.23456, "lr": 1e-3, "tokens_per_s": 1234.4}
STATS = "loss 1.2346  lr 1.00e-03  1234 tok/s"


def use_console(monkeypatch, **settings) -> io.StringIO:
    """Replace the module's console by one writing to a buffer, and return the buffer."""
    buffer = io.StringIO()
    monkeypatch.setattr(console_module, "console", Console(file=buffer, width=100, **settings))
    return buffer


@pytest.fixture
def screen(monkeypatch):
    """No terminal, no colours: the text as a log file gets it."""
    return use_console(monkeypatch, color_system=None, force_terminal=False)


@pytest.fixture
def colour_log(monkeypatch):
    """No terminal, but colours on (as with FORCE_COLOR in CI): any highlighting would show as escape codes."""
    return use_console(monkeypatch, color_system="standard", force_terminal=False)


def test_a_table_is_its_title_then_one_row_per_key_with_floats_to_four_digits(screen):
    print_table("ftune merge", {"adapter": "runs/x/final", "loss": 1.234567, "steps": 120, "lr": 2e-4,
                                "rows": 1234567, "tokens": 1234567.0, "ok": True, "base": None})
    assert screen.getvalue() == (
        "ftune merge               \n"
        "┌─────────┬──────────────┐\n"
        "│ adapter │ runs/x/final │\n"
        "│ loss    │ 1.235        │\n"
        "│ steps   │ 120          │\n"
        "│ lr      │ 0.0002       │\n"
        "│ rows    │ 1234567      │\n"
        "│ tokens  │ 1.235e+06    │\n"
        "│ ok      │ True         │\n"
        "│ base    │ None         │\n"
        "└─────────┴──────────────┘\n"
    )


@pytest.mark.parametrize(("value", "cell"), [(math.nan, "nan"), (math.inf, "inf"), (-0.000123456, "-0.0001235"),
                                             (0.0, "0"), (2.5e-10, "2.5e-10"), ("1.5", "1.5")])
def test_a_cell_prints_floats_with_4_significant_digits_and_strings_as_they_are(screen, value, cell):
    print_table("t", {"k": value})
    assert f"│ k │ {cell} │" in screen.getvalue().splitlines()


def test_no_rows_print_no_table(screen):
    print_table("empty", {})
    assert screen.getvalue() == "\n"  # rich draws nothing, not even the title, for a table without columns


def test_tables_go_to_stderr_keeping_stdout_for_results(capsys):
    print_table("eval @ step 10", {"eval_loss": 2.0})
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "eval @ step 10" in captured.err and "eval_loss" in captured.err and "│ 2 " in captured.err


def plain_lines(total: int, updates: dict[int, dict | None], start: int = 0, enabled: bool = True) -> list[str]:
    """Run a progress display over `updates` (step -> logged row or None) and return what the run logged."""
    with TrainProgress(total, start=start, enabled=enabled) as progress:
        for step, row in updates.items():
            progress.update(step, row)
    return console_module.console.file.getvalue().splitlines()


def test_without_a_terminal_a_line_is_printed_every_tenth_of_the_run_and_at_the_end(colour_log):
    """Exact lines even with colours on: the numbers are not highlighted."""
    lines = plain_lines(25, {step: ROW for step in range(1, 26)})
    assert lines == [f"step {step}/25  {STATS}" for step in (2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 25)]


def test_a_short_run_prints_every_step_and_a_resumed_one_only_the_steps_it_runs(colour_log):
    assert plain_lines(3, {1: ROW, 2: ROW, 3: ROW}) == [f"step {step}/3  {STATS}" for step in (1, 2, 3)]
    colour_log.truncate(0)
    colour_log.seek(0)
    assert plain_lines(40, {step: ROW for step in range(31, 41)}, start=30) == [
        f"step {step}/40  {STATS}" for step in (32, 36, 40)]


def test_steps_without_a_logged_row_print_nothing(colour_log):
    assert plain_lines(10, {1: ROW, 2: None, 3: ROW, 10: None}) == [f"step 1/10  {STATS}", f"step 3/10  {STATS}"]


def test_a_disabled_progress_prints_nothing(colour_log):
    assert plain_lines(4, {step: ROW for step in range(1, 5)}, enabled=False) == []


def test_on_a_terminal_the_bar_carries_the_stats_and_no_plain_line_is_printed(monkeypatch):
    buffer = use_console(monkeypatch, color_system=None, force_terminal=True)
    with TrainProgress(4) as progress:
        assert progress.interactive
        for step in range(1, 5):
            progress.update(step, ROW)
    shown = buffer.getvalue()
    assert "4/4" in shown and STATS in shown and "step 4/4" not in shown
