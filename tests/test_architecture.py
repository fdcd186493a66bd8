"""The package's shape: an acyclic import graph, a trainer that imports no measurement or report code, one import
name per file, nothing at the repository root that shadows another package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "petlbench"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path, module: str, top_level_only: bool) -> set[str]:
    """petlbench modules `path` imports (module level only, or anywhere in the file)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            submodules = {f"{base}.{alias.name}" for alias in node.names}
            found |= submodules if all(_is_module(m) for m in submodules) else {base, *submodules}
    return {name for name in found if name.startswith("petlbench")}


def import_graph(top_level_only: bool) -> dict[str, set[str]]:
    """petlbench module -> the petlbench modules it imports (names that are modules of the package)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {m for m in _imports(path, name, top_level_only) if m in modules and m != name}
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph`, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_at_module_level() -> None:
    assert find_cycle(import_graph(top_level_only=True)) is None


def test_no_import_cycle_between_subpackages() -> None:
    """Counting imports inside functions too, the sub-packages form a layered graph (cli on top, core at the bottom)."""
    packages: dict[str, set[str]] = {}
    for module, targets in import_graph(top_level_only=False).items():
        source = ".".join(module.split(".")[:2])
        packages.setdefault(source, set()).update(".".join(t.split(".")[:2]) for t in targets)
    for name, targets in packages.items():
        targets.discard(name)
    assert find_cycle(packages) is None, packages


@pytest.mark.parametrize("module", ["petlbench.engine.training", "petlbench.engine.step"])
def test_the_trainer_imports_no_measurement_or_report_code(module: str) -> None:
    graph = import_graph(top_level_only=False)
    reached, todo = set(), [module]
    while todo:
        for nxt in graph[todo.pop()] - reached:
            reached.add(nxt)
            todo.append(nxt)
    assert not {m for m in reached if m.startswith(("petlbench.profiling", "petlbench.reports", "petlbench.cli"))}


def test_repository_root_shadows_no_package_and_methods_have_one_name(tmp_path: Path) -> None:
    """From the repository root, an installed `datasets` package still wins over our data folder, and `methods`
    cannot be imported under a second name."""
    other = tmp_path / "site" / "datasets"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("ORIGIN = 'the real one'\n")
    code = (
        f"import sys; sys.path.append({str(tmp_path / 'site')!r})\n"
        "import datasets; assert datasets.ORIGIN == 'the real one'\n"
        "try:\n    import methods\nexcept ImportError as e:\n    print('refused:', e)\nelse:\n    sys.exit(1)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "petlbench.methods" in done.stdout
    assert not list((ROOT / "datasets").rglob("*.py"))
