"""Composition, overrides and validation of recipes: the errors a user sees name the key and what is allowed."""

import pytest

from ftune.config.compose import expand_sweep, list_recipes, load_run_config
from ftune.config.schema import RunCfg
from ftune.config.validate import validate
from ftune.errors import ConfigError


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_shipped_recipe_composes_and_validates(recipe):
    typed, resolved = load_run_config([f"recipe={recipe}"])
    assert isinstance(typed, RunCfg)
    assert typed.recipe == recipe
    assert validate(typed) == []


def test_every_recipe_opens_with_the_command_that_runs_it():
    from ftune.config.compose import RECIPES_DIR

    for recipe in list_recipes():
        head = (RECIPES_DIR / f"{recipe}.yaml").read_text().splitlines()[:4]
        assert any(f"ftune train recipe={recipe}" in line for line in head), recipe


def test_overrides_reach_the_typed_config():
    typed, resolved = load_run_config(["recipe=tiny_lora", "optim.lr=3e-4", "lora.r=16", "trainer.max_steps=50"])
    assert (typed.optim.lr, typed.lora.r, typed.trainer.max_steps) == (3e-4, 16, 50)
    assert resolved.optim.lr == 3e-4


def test_default_recipe_is_tiny_lora():
    typed, _ = load_run_config([])
    assert typed.recipe == "tiny_lora" and typed.method.name == "lora"


def test_asset_paths_resolve_to_the_package():
    typed, _ = load_run_config([])
    assert typed.model.name_or_path.endswith("ftune/assets/models/tiny")
    assert "${" not in typed.data.path


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lrr=1", "optim.lrr: unknown key (known keys here: name, lr,"),
        ("+foo=1", "foo: unknown key"),
        ("lora.r=-4", "lora.r=-4 is too small (expected >= 1)"),
        ("trainer.max_steps=abc", "trainer.max_steps: Value 'abc'"),
        ("data.train_on=prompt", "data.train_on='prompt' is not allowed (expected one of: all_assistant,"),
        ("optim=sgd", "no option 'optim/sgd' (available optim: adamw, "),
        ("recipe=nope", "recipe=nope: no such recipe (available: "),
        ("optim.betas=[0.9]", "optim.betas=[0.9] (expected two values in [0, 1))"),
    ],
)
def test_bad_overrides_fail_with_one_clear_line(override, expected):
    with pytest.raises(ConfigError) as err:
        load_run_config([override])
    line = err.value.one_line()
    assert expected in line
    assert "\n" not in line


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_run_config(["lora.r=0", "lora.dropout=1.5"])
    assert "lora.r=0" in err.value.message and "lora.dropout=1.5" in err.value.message


def test_sweep_expands_to_the_cartesian_product():
    jobs = expand_sweep(["lora.r=4,8", "optim.lr=1e-3,2e-3", "seed=1"])
    assert len(jobs) == 4
    assert ["lora.r=4", "optim.lr=0.001", "seed=1"] in jobs
    assert all(job[-1] == "seed=1" for job in jobs)
