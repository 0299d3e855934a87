"""Which Hugging Face architectures llama.cpp's converter maps, and onto which llama.cpp architecture.

llama.cpp's `convert_hf_to_gguf.py` is a script of its repository, not an installable module, so the model matrix
(scripts/model_matrix.py) reads this list from `llama_cpp_architectures.json`, written here from the converter's
own registry: every `@ModelBase.register("XForCausalLM", ...)` of a text model class and the `model_arch` it (or
the class it derives from) sets. Regenerate from the llama.cpp that llama-cpp-python vendors (its sdist, e.g.
what `pip download --no-binary :all: llama-cpp-python` fetches):
    python scripts/llama_cpp_archs.py llama_cpp_python-0.3.36/vendor/llama.cpp
"""

import argparse
import ast
import json
from pathlib import Path

OUT = Path(__file__).with_name("llama_cpp_architectures.json")


def registered_classes(tree: ast.Module) -> dict[str, tuple[list[str], list[str], str | None]]:
    """Converter class name -> (HF architectures it registers, its base class names, the MODEL_ARCH it sets)."""
    classes = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        names = [arg.value for dec in node.decorator_list if isinstance(dec, ast.Call)
                 and getattr(dec.func, "attr", None) == "register" for arg in dec.args
                 if isinstance(arg, ast.Constant)]
        arch = next((stmt.value.attr for stmt in node.body if isinstance(stmt, ast.Assign)
                     and any(getattr(t, "id", None) == "model_arch" for t in stmt.targets)
                     and isinstance(stmt.value, ast.Attribute)), None)
        classes[node.name] = (names, [getattr(base, "id", None) for base in node.bases], arch)
    return classes


def text_architectures(llama_cpp: Path) -> dict[str, str]:
    """HF architecture -> llama.cpp MODEL_ARCH member, for the converter's text models (not mmproj towers)."""
    classes = {}
    for path in sorted((llama_cpp / "conversion").glob("*.py")):
        classes |= registered_classes(ast.parse(path.read_text()))

    def arch_of(name: str) -> str | None:
        names, bases, arch = classes.get(name, ([], [], None))
        return arch or next((found for base in bases if base in classes and (found := arch_of(base))), None)

    def is_text(name: str) -> bool:
        return name == "TextModel" or any(is_text(base) for base in classes.get(name, ([], [], None))[1] if base)

    return {hf: arch for name, (names, _, _) in classes.items() if is_text(name) and (arch := arch_of(name))
            for hf in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("llama_cpp", type=Path, help="a llama.cpp source tree (with conversion/)")
    args = parser.parse_args()
    archs = text_architectures(args.llama_cpp)
    OUT.write_text(json.dumps(dict(sorted(archs.items())), indent=1) + "\n")
    print(f"{len(archs)} architectures -> {OUT}")


if __name__ == "__main__":
    main()
