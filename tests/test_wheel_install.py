"""A user's install: a wheel of this checkout, non-editable, in a fresh venv, used from a folder outside the checkout.

An editable install or a run from the checkout hides what only a real install shows: package data missing from
the wheel, top-level `configs`/`recipes` folders landing in site-packages, a runtime dependency that only a
test extra pulls in, a path resolved against the repository instead of the user's working directory.

Slow (a fresh venv with torch and every dependency: minutes, mostly pip); pip's cache is used, and nothing
needs the network once the cache or the configured local wheel folders hold the packages.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # the CPU build on CI, as in the README's quick start
EDITED_LR = 0.0025  # differs from tiny_lora's 1e-3, so the run's config.yaml can only show it if the edit took

pytestmark = pytest.mark.slow


def run(args: list, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run a command and fail the test with its output when it exits non-zero."""
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(map(str, args))} exited {result.returncode}\n"
        f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict, Path]:
    """(venv bin folder, environment, working folder outside the checkout) after installing the built wheel."""
    root = tmp_path_factory.mktemp("wheel_install")
    assert not root.resolve().is_relative_to(REPO), "the user's folder must lie outside the checkout"
    wheels, venv, work = root / "wheels", root / "venv", root / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", wheels, REPO], root, env, 600)
    (wheel,) = wheels.glob("ftune-*.whl")
    run([sys.executable, "-m", "venv", venv], root, env, 300)
    bin_dir = venv / "bin"
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    run([bin_dir / "python", "-m", "pip", "install", "-q", TORCH], root, env, 1200)  # first: the CPU build
    run([bin_dir / "python", "-m", "pip", "install", "-q", wheel], root, env, 1200)
    return bin_dir, env, work


def test_the_venv_imports_ftune_from_site_packages_not_the_checkout(installed):
    bin_dir, env, work = installed
    where = run([bin_dir / "python", "-c", "import ftune; print(ftune.__file__)"], work, env, 120).stdout.strip()
    assert "site-packages" in where and not Path(where).resolve().is_relative_to(REPO), where


def test_the_distribution_ships_recipes_inside_the_package_only(installed):
    """No top-level `configs`/`recipes` in site-packages, where another package's could collide with them."""
    bin_dir, env, work = installed
    script = "import importlib.metadata as m, json; print(json.dumps([str(f) for f in m.files('ftune')]))"
    files = json.loads(run([bin_dir / "python", "-c", script], work, env, 120).stdout)
    top_level = {Path(f).parts[0] for f in files}
    assert not {"configs", "recipes"} & top_level, sorted(top_level)
    assert "ftune/recipes/tiny_lora.yaml" in files
    assert any(f.startswith("ftune/configs/model/") for f in files)


def test_plan_qlora_7b_json_offline(installed):
    bin_dir, env, work = installed
    out = run([bin_dir / "ftune", "plan", "recipe=qlora_7b", "--json"], work, env, 300).stdout
    plan = json.loads(out)
    assert plan, "the plan is empty"


def test_init_edit_train_a_user_recipe(installed):
    """`ftune init` writes ./my.yaml from tiny_lora; a user edits optim.lr; the run trains with the edited value."""
    bin_dir, env, work = installed
    run([bin_dir / "ftune", "init", "my", "--from", "tiny_lora"], work, env, 120)
    recipe = work / "my.yaml"
    assert recipe.is_file()
    text = recipe.read_text()
    # The value of the first `lr:` inside the top-level `optim:` block, comments and other keys left alone.
    edited, count = re.subn(r"(?m)(^optim:[ \t]*\n(?:(?:[ \t]+.*|[ \t]*)\n)*?[ \t]+lr:[ \t]*)[^\s#]+",
                            rf"\g<1>{EDITED_LR}", text, count=1)
    assert count == 1, f"no optim.lr to edit in my.yaml:\n{text}"
    recipe.write_text(edited)

    run([bin_dir / "ftune", "train", "recipe=./my.yaml", "trainer.max_steps=5", "output_dir=run"], work, env, 900)
    resolved = yaml.safe_load((work / "run" / "config.yaml").read_text())
    assert float(resolved["optim"]["lr"]) == EDITED_LR
    assert (work / "run" / "final" / "adapter_config.json").is_file()
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["steps"] == 5


def test_a_zero3_launcher_file_from_the_package_trains_outside_the_checkout(installed):
    """`accelerate launch --config_file <site-packages>/ftune/configs/accelerate/zero3.yaml` from the user's folder.

    The file names no other file (its DeepSpeed settings are inside), so it works where the package is installed;
    two gloo processes on DeepSpeed's CPU accelerator stand in for GPUs. final/ is one gathered model.
    """
    bin_dir, env, work = installed
    run([bin_dir / "python", "-m", "pip", "install", "-q", "deepspeed"], work, env, 1200)
    script = "import ftune, pathlib; print(pathlib.Path(ftune.__file__).parent / 'configs/accelerate/zero3.yaml')"
    launcher = run([bin_dir / "python", "-c", script], work, env, 120).stdout.strip()
    launch_env = env | {"ACCELERATE_USE_CPU": "true", "DS_ACCELERATOR": "cpu"}
    run([bin_dir / "accelerate", "launch", "--config_file", launcher, "--num_processes", "2", "-m", "ftune", "train",
         "recipe=tiny_full", "trainer.max_steps=2", "trainer.mixed_precision=no", "output_dir=zero3"],
        work, launch_env, 900)
    summary = json.loads((work / "zero3" / "summary.json").read_text())
    assert summary["steps"] == 2
    check = ("from safetensors import safe_open; from transformers import AutoConfig; import sys\n"
             "names = safe_open(sys.argv[1] + '/model.safetensors', 'pt').keys()\n"
             "layers = AutoConfig.from_pretrained(sys.argv[1]).num_hidden_layers\n"
             "print(len([n for n in names if '.layers.' in n]) // layers, any('embed_tokens' in n for n in names))")
    per_layer, embeddings = run([bin_dir / "python", "-c", check, work / "zero3" / "final"], work, env,
                                120).stdout.split()
    assert int(per_layer) >= 9 and embeddings == "True"  # every block's weights, gathered from both shards
