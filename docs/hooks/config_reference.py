"""MkDocs hook: the configuration reference, generated from `ftune/config/schema.py` at every build.

Each field of the schema's dataclasses carries its documentation as an attribute docstring (the string literal
right after it), and its allowed values as the helper it is declared with (`choice`, `registry_choice`,
`bounded`). Python keeps no attribute docstrings at run time, so this hook reads the module's source with `ast`
(as `ftune.config.schema.field_docs` does for `ftune init`), imports nothing of ftune, torch or transformers,
and replaces the marker `<!-- config-reference -->` of the page that holds it with one section per config group:
a table of key, type, default and doc. The reference therefore cannot drift from the code: a field added,
renamed or re-documented in the schema is in the next build. The values a registry allows (data formats, PEFT
methods, optimizers) are read the same way from the dict literal of the module that implements them.
"""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "ftune" / "config" / "schema.py"
COMMANDS = REPO / "ftune" / "config" / "commands.py"
"""The options of the commands that take no recipe (`ftune merge`, `ftune eval`, `ftune export`), same style."""
ROOT = "RunCfg"
"""The dataclass of a whole run: its scalar fields are the top-level keys, its dataclass fields the groups."""
MARKER = "<!-- config-reference -->"
CODE_SPAN = re.compile(r"(`[^`]*`)")


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Replace the marker with the generated reference (MkDocs calls this for every page)."""
    if MARKER not in markdown:
        return markdown
    run = reference(SCHEMA.read_text(encoding="utf-8"))
    commands = command_reference(COMMANDS.read_text(encoding="utf-8"))
    return markdown.replace(MARKER, run + "\n" + commands)


def module_parts(source: str) -> tuple[dict, dict]:
    """(class name -> its node, module-level constant name -> value) of a module's source."""
    tree = ast.parse(source)
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    constants = {
        node.targets[0].id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, ast.Constant)
    }
    return classes, constants


def reference(source: str) -> str:
    """The run's Markdown: one section per config group of `ROOT`, in the order `ROOT` lists them."""
    classes, constants = module_parts(source)
    root = classes[ROOT]
    top, groups = [], []
    for name, annotation, value, doc in fields(root):
        nested = dataclass_in(annotation, classes)
        if nested:
            groups.append((name, nested))
        else:
            top.append((name, annotation, value, doc))
    parts = [section("Top-level keys", docstring(root), [row("", *item, constants) for item in top])]
    for name, nested in groups:
        parts.extend(group_sections(name, classes[nested], classes, constants))
    return "\n\n".join(parts) + "\n"


def command_reference(source: str) -> str:
    """One section per command dataclass (its docstring opens with the command, e.g. "`ftune merge`: ...")."""
    classes, constants = module_parts(source)
    parts = []
    for node in classes.values():
        title = CODE_SPAN.match(docstring(node))
        if title and title.group(1).startswith("`ftune "):
            rows = [row("", *item, constants) for item in fields(node)]
            intro = docstring(node)[title.end():].lstrip(": ")
            parts.append(section(f"{title.group(1)} options", intro[:1].upper() + intro[1:], rows))
    return "\n\n".join(parts) + "\n"


def group_sections(prefix: str, node: ast.ClassDef, classes: dict, constants: dict) -> list[str]:
    """The section of one group (`model`, `data`, ...), then one for each dataclass nested in it (`data.mix[]`)."""
    rows, nested_sections = [], []
    for name, annotation, value, doc in fields(node):
        rows.append(row(prefix, name, annotation, value, doc, constants))
        nested = dataclass_in(annotation, classes)
        if nested:
            item = f"{prefix}.{name}[]" if ast.unparse(annotation).startswith("list[") else f"{prefix}.{name}"
            nested_sections.extend(group_sections(item, classes[nested], classes, constants))
    return [section(f"`{prefix}`", docstring(node), rows), *nested_sections]


def fields(node: ast.ClassDef):
    """(name, annotation, value, docstring) of each annotated field of a dataclass, in order."""
    body = node.body
    for index, stmt in enumerate(body):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            after = body[index + 1] if index + 1 < len(body) else None
            doc = after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) else ""
            yield stmt.target.id, stmt.annotation, stmt.value, " ".join(str(doc).split())


def docstring(node: ast.ClassDef) -> str:
    return " ".join((ast.get_docstring(node) or "").split())


def dataclass_in(annotation: ast.expr, classes: dict) -> str | None:
    """The schema dataclass an annotation names (`ModelCfg`, `list[DataSourceCfg]`), or None."""
    names = {node.id for node in ast.walk(annotation) if isinstance(node, ast.Name)}
    return next((name for name in sorted(names) if name in classes), None)


def section(title: str, intro: str, rows: list[str]) -> str:
    head = "| key | type | default | doc |\n| --- | --- | --- | --- |"
    return "\n\n".join(part for part in (f"## {title}", text(intro), head + "\n" + "\n".join(rows)) if part)


def row(prefix: str, name: str, annotation: ast.expr, value: ast.expr | None, doc: str, constants: dict) -> str:
    key = f"{prefix}.{name}" if prefix else name
    default, allowed = declared(value, constants)
    doc = text(doc) + (f" *Allowed:* {allowed}." if allowed else "")
    cells = [f"`{key}`", f"`{ast.unparse(annotation)}`", default, doc]
    return "| " + " | ".join(cells) + " |"  # a pipe inside a code span does not split a cell


def declared(value: ast.expr | None, constants: dict) -> tuple[str, str]:
    """(the default as Markdown, the allowed values as Markdown or "") of a field's declaration."""
    if value is None:
        return "required", ""
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name):
        args = [literal(arg, constants) for arg in value.args]
        kwargs = {kw.arg: kw.value for kw in value.keywords}
        if value.func.id == "choice":
            return code(args[0]), ", ".join(code(arg) for arg in args)
        if value.func.id == "registry_choice":
            names = [args[0], *args[2:], *registry_keys(args[1])]
            module, _, registry = args[1].partition(":")
            where = f"`{registry}` in `{module.replace('.', '/')}.py`"
            return code(args[0]), ", ".join(code(name) for name in dict.fromkeys(names)) + f" (from {where})"
        if value.func.id == "bounded":
            return code(args[0]), bounds(*args[1:3])
        if value.func.id == "field" and "default_factory" in kwargs:
            return factory_default(kwargs["default_factory"]), ""
    return code(literal(value, constants)), ""


def literal(node: ast.expr, constants: dict):
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    return ast.literal_eval(node)


def factory_default(factory: ast.expr) -> str:
    if isinstance(factory, ast.Lambda):
        return code(ast.literal_eval(factory.body))
    if isinstance(factory, ast.Name) and factory.id in ("list", "dict"):
        return code([] if factory.id == "list" else {})
    return "(a group)"


def bounds(low=None, high=None) -> str:
    if low is not None and high is not None:
        return f"{code(low)} to {code(high)}"
    if low is not None:
        return f">= {code(low)}"
    return f"<= {code(high)}" if high is not None else ""


def registry_keys(registry: str) -> list[str]:
    """The keys of a registry (`module:NAME`), read from the dict literal of the module that defines it."""
    module, _, name = registry.partition(":")
    path = REPO / Path(*module.split(".")).with_suffix(".py")
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.AnnAssign):
            target = node.target
        else:
            target = node.targets[0] if isinstance(node, ast.Assign) else None
        if isinstance(target, ast.Name) and target.id == name and isinstance(node.value, ast.Dict):
            return [key.value for key in node.value.keys if isinstance(key, ast.Constant)]
    raise ValueError(f"{registry}: no dict literal {name} in {path}")


def code(value) -> str:
    """A value as YAML writes it, in a code span."""
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return "`[" + ", ".join(code(item).strip("`") for item in value) + "]`"
    if isinstance(value, dict):
        return "`{" + ", ".join(f"{key}: {item}" for key, item in value.items()) + "}`"
    return f"`{value}`"


def text(doc: str) -> str:
    """Docstring prose as Markdown: `<`, `>`, `*` and `|` escaped outside code spans, so they print as written."""
    parts = CODE_SPAN.split(doc)
    for index in range(0, len(parts), 2):
        prose = parts[index].replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")
        parts[index] = prose.replace("|", "\\|")
    return "".join(parts)
