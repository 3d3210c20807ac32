"""The package layout of docs/DESIGN.md: imports go down the layers only, and no module imports itself back.

Reads the code as text (ast), so an import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A unit may import units of lower layers and itself, nothing above or beside it.
LAYERS: list[set[str]] = [
    {"lth", "lth.errors", "lth.validation", "lth.fsutil"},  # lth: the root __init__, the version only
    {"lth.config"},
    {"lth.data"},
    {"lth.provenance", "lth.models", "lth.tickets"},
    {"lth.pruning"},
    {"lth.training"},
    {"lth.tracking"},  # the port: no MLflow
    {"lth.tracking.mlflow"},  # the adapter: the one place that imports mlflow
    {"lth.study", "lth.report"},
    {"lth.cli"},
    {"lth.__main__"},
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
# Third-party packages only one unit may import.
OWNERS = {"mlflow": "lth.tracking.mlflow", "optuna": "lth.study", "ray": "lth.study"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted((SRC / "lth").rglob("*.py"))}


def imports(name: str, tree: ast.Module, is_pkg: bool) -> set[str]:
    """Every module name `name` imports (relative imports resolved, `from x import y` as x.y when y is a module)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join([*pkg, base] if base else pkg)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def unit(module: str) -> str:
    """The layout unit a module belongs to: the longest name in LAYERS it is, or lies under."""
    best = ""
    for u in RANK:
        if (module == u or module.startswith(u + ".")) and len(u) > len(best):
            best = u
    return best


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {m for m in imports(name, tree, (SRC / Path(*name.split("."))).is_dir()) if m in mods and m != name}
            for name, tree in mods.items()}


def test_every_module_belongs_to_a_layer() -> None:
    assert [m for m in modules() if not unit(m)] == []


def test_imports_go_down_the_layers() -> None:
    upward = []
    for name, deps in graph().items():
        for dep in deps:
            u, d = unit(name), unit(dep)
            if u != d and RANK[d] >= RANK[u]:
                upward.append(f"{name} -> {dep}")
    assert upward == [], "imports against the layer order of docs/DESIGN.md"


def test_third_party_owners() -> None:
    wrong = []
    for name, tree in modules().items():
        is_pkg = (SRC / Path(*name.split("."))).is_dir()
        for m in imports(name, tree, is_pkg):
            top = m.split(".")[0]
            if top in OWNERS and unit(name) != OWNERS[top]:
                wrong.append(f"{name} imports {m} (only {OWNERS[top]} may)")
    assert wrong == []


def _cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(g.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_circles() -> None:
    g = graph()
    # A package's __init__ importing its own submodules is how packages work, not a circle.
    g = {n: {d for d in deps if not (d.startswith(n + ".") and (SRC / Path(*n.split("."))).is_dir())}
         for n, deps in g.items()}
    assert _cycle(g) is None


def test_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("code", [
    "import lth.study.imp, lth.study.transfer, lth.report.build",
    "import lth.cli",
])
def test_no_mlflow_without_tracking(code: str) -> None:
    """Commands and workers that track nothing never pay for importing MLflow."""
    probe = f"{code}; import sys; print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_lth_help_loads_neither_torch_nor_mlflow() -> None:
    """`lth --help` (the command group and every command module) starts in milliseconds, not seconds."""
    probe = "import lth.cli, sys; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'mlflow', 'ray'}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
