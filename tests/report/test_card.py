"""The model card's text from the facts it is handed (`ftune.report.card`), exactly.

The Markdown of a bare card and of a full one, which rows are left out, how figures are printed, and what reaches
the Hub front matter. (tests/train/test_card.py gathers the facts of a run directory and renders them.)
"""

import math

import pytest
import yaml

import ftune
from ftune.report.card import (
    CardFacts,
    escape_pipes,
    hub_id_or_none,
    parity_rows,
    render_card,
    shown,
    summary_line,
    table,
    training_rows,
)

VERSION = ftune.__version__


def split_card(card: str) -> tuple[dict, str]:
    """The front matter (parsed) and the Markdown after it."""
    empty, front, body = card.split("---\n", 2)
    assert empty == ""
    return yaml.safe_load(front), body


def test_a_bare_card_is_front_matter_a_title_a_line_and_the_version():
    front, body = split_card(render_card(CardFacts(title="bare")))
    assert front == {"library_name": "transformers", "license": "unknown", "pipeline_tag": "text-generation",
                     "tags": ["ftune"]}
    assert body == (f"\n# bare\n\nExport, made with ftune {VERSION}.\n\n"
                    f"## Training\n\n| | |\n| --- | --- |\n| ftune version | {VERSION} |\n")


FULL = CardFacts(
    title="base lora (tiny_lora)", base_model="org/base", library="peft", method="lora",
    hyperparameters={"lora.r": 8, "lora.target_modules": ["q_proj", "v_proj"], "optim.lr": 0.0002},
    data_sources=[("data/train.jsonl", 3), ("org/chat", None)], datasets=["org/chat"], max_length=512, steps=40,
    epochs=1.5, stop_reason="max_steps", eval_metrics={"eval_loss": 1.234567, "probe_drift": -0.0123456,
                                                       "eval_ppl": math.nan},
    hardware="1 x GPU", wall_time_s=75.4, logged_time_s=60.6, license="apache-2.0", tags=["lora", "dpo"],
    parity={"runtime": "peft 0.17", "checks": {"max |logit diff|": {"value": 0.00012345, "tolerance": 0.001,
                                                                    "passed": True},
                                               "template": {"value": "identical", "tolerance": None,
                                                            "passed": False}},
            "figures": {"kl": 1.5e-7, "tokens": 12}},
)


def test_a_full_card_has_every_fact_in_its_table_row_by_row():
    front, body = split_card(render_card(FULL))
    assert front == {"base_model": "org/base", "datasets": ["org/chat"], "library_name": "peft",
                     "license": "apache-2.0", "pipeline_tag": "text-generation", "tags": ["ftune", "lora", "dpo"]}
    assert body == f"""
# base lora (tiny_lora)

lora fine-tune of `org/base`, made with ftune {VERSION}.

## Training

| | |
| --- | --- |
| method | lora |
| hyperparameters | lora.r=8, lora.target_modules=['q_proj', 'v_proj'], optim.lr=0.0002 |
| data | `data/train.jsonl` (3 records); `org/chat` (? records) |
| sequence length | 512 |
| steps | 40 |
| epochs | 1.5 |
| stopped by | max_steps |
| hardware | 1 x GPU |
| wall time | 75 s |
| time from first to last step | 61 s |
| ftune version | {VERSION} |

## Final evaluation

| | |
| --- | --- |
| eval_loss | 1.235 |
| probe_drift | -0.01235 |
| eval_ppl | nan |

## Export parity (the served model against the trained one)

| | |
| --- | --- |
| runtime | peft 0.17 |
| max \\|logit diff\\| | 0.000123 (tolerance 0.001): pass |
| template | identical: FAIL |
| kl | 1.5e-07 (measured, not checked) |
| tokens | 12 (measured, not checked) |
"""


def test_no_evaluation_and_no_parity_leave_their_sections_out():
    card = render_card(CardFacts(title="t", method="full", steps=3))
    assert "## Training" in card and "## Final evaluation" not in card and "## Export parity" not in card


@pytest.mark.parametrize(("name", "expected"), [
    ("org/base", "org/base"),
    (None, None),
    ("", None),
    ("/models/base", None),
    ("./org/base", None),
    ("~/base", None),
    ("runs/x/final", None),
    ("gpt2", None),  # only org/name is taken: a bare name may as well be a directory
])
def test_only_an_org_name_id_reaches_the_front_matter(tmp_path, monkeypatch, name, expected):
    monkeypatch.chdir(tmp_path)
    assert hub_id_or_none(name) == expected


def test_a_local_directory_that_reads_like_an_org_name_id_stays_out_of_the_front_matter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "base").mkdir(parents=True)
    assert hub_id_or_none("models/base") is None
    front, body = split_card(render_card(CardFacts(title="t", base_model="models/base", method="lora")))
    assert "base_model" not in front and "lora fine-tune of `models/base`" in body


@pytest.mark.parametrize(("method", "base", "expected"), [
    ("qlora", "org/base", f"qlora fine-tune of `org/base`, made with ftune {VERSION}.\n"),
    ("full", None, f"full fine-tune, made with ftune {VERSION}.\n"),
    (None, "/models/base", f"Export of `/models/base`, made with ftune {VERSION}.\n"),
    (None, None, f"Export, made with ftune {VERSION}.\n"),
])
def test_the_summary_line_names_the_method_and_the_base(method, base, expected):
    assert summary_line(CardFacts(title="t", method=method, base_model=base)) == expected


def test_training_rows_keep_zeros_and_drop_only_unknown_or_empty_values():
    facts = CardFacts(title="t", steps=0, epochs=0.0, wall_time_s=0.4, logged_time_s=3599.6, hyperparameters={},
                      data_sources=[])
    assert training_rows(facts) == {"steps": "0", "epochs": "0.0", "wall time": "0 s",
                                    "time from first to last step": "3600 s", "ftune version": VERSION}


def test_parity_rows_give_each_check_its_figure_tolerance_and_verdict_then_the_bare_figures():
    parity = {"runtime": "llama-cpp-python 0.3", "quant": "q8_0", "checks": {
        "top-1 agreement": {"value": 0.9876, "tolerance": 0.95, "passed": True},
        "max |diff|": {"value": 2.0, "tolerance": 0.123456, "passed": False},
        "generation": {"value": "identical", "passed": True},
        "ids": {"value": None, "tolerance": None, "passed": True},
    }, "figures": {"mean kl": 0.000123456, "steps": 7}}
    assert parity_rows(parity) == {
        "runtime": "llama-cpp-python 0.3",
        "top-1 agreement": "0.988 (tolerance 0.95): pass",
        "max |diff|": "2 (tolerance 0.123): FAIL",
        "generation": "identical: pass",
        "ids": "None: pass",
        "mean kl": "0.000123 (measured, not checked)",
        "steps": "7 (measured, not checked)",
    }


@pytest.mark.parametrize(("value", "expected"), [
    (0.0123456, "0.0123"), (1.0, "1"), (12345.678, "1.23e+04"), (1e-7, "1e-07"), (math.nan, "nan"),
    (math.inf, "inf"), (3, "3"), (True, "True"), ("identical", "identical"), (None, "None"),
])
def test_floats_are_shown_to_three_significant_digits_and_everything_else_as_it_is(value, expected):
    assert shown(value) == expected


def test_a_table_escapes_pipes_in_keys_and_values_and_is_empty_without_rows():
    assert table("Empty", {}) == ""
    assert table("T", {"a|b": "1 | 2", "c": "3"}) == "## T\n\n| | |\n| --- | --- |\n| a\\|b | 1 \\| 2 |\n| c | 3 |\n"
    assert escape_pipes(1.5) == "1.5"
