"""The shape of the tree: ``shared/`` is Ray-free, acyclic, and organised in subpackages."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT / "shared"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _shared_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SHARED.rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """Every module named by an import anywhere in the file (functions and TYPE_CHECKING too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_shared_top_level_holds_only_errors_and_models() -> None:
    top = sorted(p.name for p in SHARED.glob("*.py"))
    assert top == ["__init__.py", "errors.py", "models.py"]
    for package in (p for p in SHARED.iterdir() if p.is_dir() and p.name != "__pycache__"):
        init = package / "__init__.py"
        assert init.exists(), f"{package} is not a package"
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init} says nothing of its purpose"


def test_no_import_cycle_between_shared_modules() -> None:
    modules = _shared_modules()
    graph = {name: {m for m in _imports(path) if m in modules} for name, path in modules.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [])
    assert cycles == []


def test_shared_never_imports_ray_or_actors() -> None:
    # Statically: no module under shared/ names ray or actors in any import.
    offenders = {
        name: sorted(m for m in _imports(path) if m.split(".")[0] in {"ray", "actors"})
        for name, path in _shared_modules().items()
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    # And at run time: importing every module leaves ray out of sys.modules.
    names = sorted(_shared_modules())
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'actors'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
