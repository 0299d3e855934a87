"""Composition, overrides and validation of recipes: the errors a user sees name the key and what is allowed."""

import pytest

from ftune.config.compose import expand_sweep, load_run_config, shipped_recipes
from ftune.config.schema import RunCfg
from ftune.config.validate import validate
from ftune.errors import ConfigError


@pytest.mark.parametrize("recipe", shipped_recipes())
def test_every_shipped_recipe_composes_and_validates(recipe):
    typed, resolved = load_run_config([f"recipe={recipe}"])
    assert isinstance(typed, RunCfg)
    assert typed.recipe == recipe
    assert validate(typed) == []


def test_every_recipe_opens_with_the_command_that_runs_it():
    from ftune.config.compose import RECIPES_DIR

    for recipe in shipped_recipes():
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
        ("trainer.max_steps=abc", "trainer.max_steps: expected a whole number, got 'abc'"),
        ("data.train_on=prompt", "data.train_on='prompt' is not allowed (expected one of: all_assistant,"),
        ("optim=sgd", "no option 'optim/sgd' (available optim: adamw, "),
        ("recipe=nope", "recipe=nope: no such recipe (shipped: "),
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


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


USER_RECIPE = "defaults:\n  - tiny_lora\n  - _self_\noptim:\n  lr: 0.0005\n"


@pytest.mark.parametrize("spelling", ["./my.yaml", "my.yaml", "my", "ABSOLUTE"])
def test_a_user_recipe_file_starts_from_a_shipped_one(tmp_path, monkeypatch, spelling):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "my.yaml", USER_RECIPE)
    typed, _ = load_run_config([f"recipe={path if spelling == 'ABSOLUTE' else spelling}"])
    assert typed.recipe == "my" and typed.optim.lr == 0.0005  # the user's value
    assert typed.lora.r == 8 and typed.method.name == "lora"  # the base recipe's


def test_user_config_groups_from_the_working_directory_and_config_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = "name_or_path: {}\ndtype: bf16\nattn_implementation: eager\ngradient_checkpointing: false\n"
    write(tmp_path / "configs" / "model" / "mine.yaml", model.format("/models/mine"))
    write(tmp_path / "elsewhere" / "model" / "other.yaml", model.format("/models/other"))
    assert load_run_config(["model=mine"])[0].model.name_or_path == "/models/mine"
    typed, _ = load_run_config(["model=other"], config_dirs=(str(tmp_path / "elsewhere"),))
    assert (typed.model.name_or_path, typed.model.attn_implementation) == ("/models/other", "eager")


def test_a_missing_user_recipe_names_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"recipe=\./none\.yaml: no such file"):
        load_run_config(["recipe=./none.yaml"])


@pytest.mark.parametrize("value", ["all-linear", "q_proj"])
def test_a_scalar_is_taken_as_a_one_element_list(value):
    typed, _ = load_run_config([f"lora.target_modules={value}"])
    assert typed.lora.target_modules == [value]


def test_a_sweep_over_a_list_field_gives_one_element_lists():
    jobs = expand_sweep(["lora.target_modules=q_proj,v_proj"])
    assert [load_run_config(job)[0].lora.target_modules for job in jobs] == [["q_proj"], ["v_proj"]]
