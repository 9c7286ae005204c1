"""The package's shape (docs/architecture.md): imports run one way (no cycles, no stage importing a
later one), the tiny model is reached only through its seam, only the entry layer and the config
package read Hydra's config, and the code stays in pieces a reader can hold (functions and modules
of bounded length)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "kolors_story"

# Top-level modules and packages every stage may use: files, errors, config, records, story, accounting.
FOUNDATION = {"files", "errors", "config", "records", "story", "accounting"}
# What each stage may import besides the foundation (the data flow: models -> lora/evaluate ->
# data -> generate -> train; the memory plan counts models and LoRAs; the entry layers
# bench/cli/download see everything). Stages reach the tiny model only through its seam (below);
# the tiny package itself builds on the stages (its pre-training scripts train with them).
ALLOWED = {
    "foundation": set(),
    "models": {"tiny"},
    "lora": {"models"},
    "plan": {"models", "lora", "tiny"},
    "evaluate": {"models", "tiny"},
    "data": {"models", "evaluate", "tiny"},
    "generate": {"models", "lora", "evaluate", "tiny"},
    "train": {"models", "lora", "data", "evaluate", "generate", "tiny"},
    "tiny": {"models", "lora", "evaluate", "data", "generate", "train"},
}
ENTRY = {"bench", "cli", "download", "export"}
ENTRY_MODULES = {"kolors_story.generate.compare"}  # a `python -m` tool of its own: composes its config
SEAM = "kolors_story.tiny"  # the one module of the tiny package the rest of the project may import
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400


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
    assert not _allowed(_layer("kolors_story.records"), _layer("kolors_story.train.job"))  # foundation stays below
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


def _is_entry(module: str) -> bool:
    return _layer(module) in ENTRY or module in ENTRY_MODULES


def test_the_tiny_model_is_reached_only_through_its_seam():
    """Outside kolors_story.tiny nothing imports the tiny package's modules, and no production module
    reads a ``.tiny`` setting: it calls the seam, which answers "nothing to do" for real settings."""
    wrong = []
    for module, path in _modules().items():
        if module == SEAM or module.startswith(SEAM + "."):
            continue
        wrong += [f"{module} imports {dep}" for dep in _imports(path, module) if dep.startswith(SEAM + ".")]
        if _layer(module) in ("foundation", "package") or _is_entry(module):
            continue  # the config schemas declare the tiny keys; the bench builds stand-ins on purpose
        reads = [n.lineno for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                 if isinstance(n, ast.Attribute) and n.attr == "tiny"]
        wrong += [f"{module}:{line} reads a .tiny setting" for line in reads]
    assert not wrong, "tiny-specific code outside the seam:\n" + "\n".join(sorted(wrong))


def _third_party_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_only_the_entry_layer_and_the_config_package_read_hydra():
    """Below the entry layer everything takes typed settings: no stage imports hydra or omegaconf."""
    wrong = []
    for module, path in _modules().items():
        if module.startswith("kolors_story.config") or _is_entry(module):
            continue
        wrong += [f"{module} imports {lib}" for lib in _third_party_imports(path) & {"hydra", "omegaconf"}]
    assert not wrong, "raw Hydra config below the entry layer:\n" + "\n".join(sorted(wrong))


def test_the_config_package_sits_below_every_stage():
    """config imports only the foundation (records, errors, files), never a stage or the entry layer."""
    wrong = [f"{m} imports {d}" for m, deps in _graph().items() if m.startswith("kolors_story.config")
             for d in deps if _layer(d) not in ("foundation", "package")]
    assert not wrong, "\n".join(sorted(wrong))


def test_every_package_is_named_in_the_architecture_page():
    page = (PACKAGE.parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    packages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    missing = [name for name in packages if f"`{name}/`" not in page]
    assert packages and not missing, f"docs/architecture.md does not name these packages: {missing}"


def test_every_module_says_what_it_owns():
    missing = [m for m, p in _modules().items() if not ast.get_docstring(ast.parse(p.read_text(encoding="utf-8")))
               and m != "kolors_story"]
    assert not missing, f"modules without a docstring: {missing}"
