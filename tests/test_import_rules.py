"""The one-way flow of docs/design.md, read from the source: which ftune package may import which.

Every `import ftune.X`, `from ftune.X import ...` and `from ftune import X` in a package's modules (at any depth,
deferred imports included) is checked against the table below, so a shortcut that reverses the flow fails here.
`ftune/compat.py`, which every layer may import, imports no ftune module at all.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ftune"

FORBIDDEN = {
    "config": {"data", "kernels", "model", "plan", "train", "eval", "report", "commands"},
    "kernels": {"config", "data", "model", "plan", "train", "eval", "report", "commands"},
    "data": {"kernels", "model", "plan", "train", "eval", "commands"},
    "model": {"data", "plan", "train", "eval", "commands"},
    "plan": {"data", "train", "eval", "commands"},
    "report": {"data", "kernels", "model", "plan", "train", "eval", "commands"},
    "eval": {"plan", "train", "commands"},
    "train": {"plan", "commands"},
}
"""Package -> the ftune packages its modules must not import (`commands/` and `cli.py` import the rest)."""


def imported_packages(source: Path) -> set[str]:
    """The first-level ftune packages a module imports (`ftune.train.loop` -> `train`)."""
    names = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "ftune" and node.level == 0:
            names.update(f"ftune.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name.split(".")[1] for name in names if name.startswith("ftune.") and name.count(".") >= 1}


def violations(package: str) -> list[str]:
    """`module -> package` for each import of `package`'s modules that FORBIDDEN rules out."""
    found = []
    for source in sorted((PACKAGE / package).rglob("*.py")):
        for imported in sorted(imported_packages(source) & FORBIDDEN[package]):
            found.append(f"{source.relative_to(PACKAGE.parent)} imports ftune.{imported}")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_follow_the_flow(package):
    assert (PACKAGE / package).is_dir()
    assert violations(package) == []


def test_compat_imports_nothing_of_ftune():
    """`ftune/compat.py` fences library internals for every layer, so it may import no ftune module itself."""
    assert imported_packages(PACKAGE / "compat.py") == set()


def test_the_check_sees_a_reversed_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import torch\nfrom ftune.train.loop import fit\nfrom ftune import data\n\n"
                      "def f():\n    import ftune.eval.loss\n")
    assert imported_packages(module) == {"train", "eval", "data"}
