"""The package's shape: imports run one way (no cycles, no stage importing a later one) and the
code stays in pieces a reader can hold (functions and modules of bounded length)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "kolors_story"

# Top-level modules every stage may use: files, errors, settings, configs, records, story, accounting.
FOUNDATION = {"files", "errors", "settings", "configs", "records", "story", "accounting"}
# What each stage may import besides the foundation (the data flow: models -> lora/evaluate ->
# data -> generate -> train; the memory plan counts models and LoRAs; the entry layers
# bench/cli/download see everything).
ALLOWED = {
    "foundation": set(),
    "models": set(),
    "lora": {"models"},
    "plan": {"models", "lora"},
    "evaluate": {"models"},
    "data": {"models", "evaluate"},
    "generate": {"models", "lora", "evaluate"},
    "train": {"models", "lora", "data", "evaluate", "generate"},
}
ENTRY = {"bench", "cli", "download"}
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, module: str) -> set[str]:
    """Every kolors_story module ``module`` imports, at module level or inside functions."""
    found = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("kolors_story")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("kolors_story"):
                continue
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from kolors_story.bench import flops`
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {i for i in _imports(p, m) if i in modules and i != m} for m, p in modules.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    top = parts[1]
    return "foundation" if top in FOUNDATION else top


def test_no_import_cycles():
    graph = _graph()
    # A cycle through a package's own __init__ (re-exports) is not a cycle of the code itself.
    edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def _allowed(layer: str, target: str) -> bool:
    if target in ("package", layer, "foundation"):
        return True
    return target in ALLOWED[layer]


def test_stages_import_only_earlier_stages():
    wrong = []
    for module, deps in _graph().items():
        layer = _layer(module)
        if layer in ENTRY or layer == "package":
            continue
        wrong += [f"{module} imports {dep}" for dep in deps if not _allowed(layer, _layer(dep))]
    assert not wrong, "imports against the data flow:\n" + "\n".join(sorted(wrong))


def test_the_rules_themselves_catch_data_importing_generate():
    """The check above would fail if the data stage imported generation (the layout issue's example)."""
    assert not _allowed(_layer("kolors_story.data.cache"), _layer("kolors_story.generate.render"))
    assert not _allowed(_layer("kolors_story.records"), _layer("kolors_story.train.run"))  # foundation stays below
    assert _allowed(_layer("kolors_story.train.validation"), _layer("kolors_story.generate.render"))


def _length_note(path: Path) -> str | None:
    """A module may say at its top why it is long: ``# Long module: <reason>``."""
    for line in path.read_text(encoding="utf-8").splitlines()[:15]:
        if line.startswith("# Long module:"):
            return line
    return None


def test_functions_and_modules_stay_short():
    too_long = []
    for module, path in sorted(_modules().items()):
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) > MAX_MODULE_LINES and not _length_note(path):
            too_long.append(f"{module}: {len(lines)} lines")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{module}.{node.name}: {n} lines")
    assert not too_long, f"over {MAX_FUNCTION_LINES} lines a function / {MAX_MODULE_LINES} a module:\n" + "\n".join(too_long)


def test_every_module_says_what_it_owns():
    missing = [m for m, p in _modules().items() if not ast.get_docstring(ast.parse(p.read_text(encoding="utf-8")))
               and m != "kolors_story"]
    assert not missing, f"modules without a docstring: {missing}"
