"""The layout's rules, read from the source with `ast`: no import cycles between project
modules; service/ imports nothing of the model lifecycle (models.train, models.eval, torch,
matplotlib); importing the app loads none of them; no module grows past 400 lines unless
docs/design.md names it."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "models")
FORBIDDEN_IN_SERVICE = ("models.train", "models.eval", "models.build", "torch", "matplotlib")
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(path: Path, name: str) -> set[str]:
    """Every module `path` imports (top level or inside functions), absolute names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(path, name) if m in modules and m != name}
            for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = _graph()
    # a package's __init__ importing its own submodules is not a cycle worth failing on
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    assert _cycles(graph) == []


def test_cycle_detector_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_service_imports_nothing_of_the_model_lifecycle():
    bad = []
    for name, path in _modules().items():
        if name.split(".")[0] != "service":
            continue
        for imported in _imports(path, name):
            if any(imported == f or imported.startswith(f + ".") for f in FORBIDDEN_IN_SERVICE):
                bad.append(f"{name} imports {imported}")
    assert bad == []


def test_importing_the_app_loads_no_lifecycle_module():
    code = ("import json, sys; import service.app; from service.app import create_app; import service.cli; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'matplotlib') "
            "or m.startswith(('models.train', 'models.eval', 'models.build')))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout) == []


def test_no_module_over_400_lines_unless_the_design_says_why():
    design = (ROOT / "docs" / "design.md").read_text()
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES and str(p.relative_to(ROOT)) not in design]
    assert long == []
