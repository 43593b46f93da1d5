"""The core's import graph, read from the source with `ast`: no cycles, no function-local
imports to dodge one, nothing from the plugins or the CLI, and generation independent of
training. A new edge that breaks one of these fails here with the offending path."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "n2a_core"
OUTSIDE_CORE = ("n2a_plugins", "cli", "benchmarks", "tests", "examples")


def module_name(path: Path) -> str:
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def core_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(CORE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path, modules: dict[str, Path], name: str | None = None) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in the file of module `name`.

    `from pkg import name` counts as an import of `pkg.name` when that is a module,
    else of `pkg`. Imports under `if TYPE_CHECKING:` never run and are left out."""
    tree = ast.parse(path.read_text(), str(path))
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, top_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, top_level) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    found.append((full if full in modules else base, child.lineno, top_level))
            inner = top_level and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, inner)

    visit(tree, True)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = core_modules()
    return {name: {m for m, _, _ in imports(path, modules) if m in modules and m != name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := dfs(start)):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return seen


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_sees_function_local_and_relative_imports(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("from . import loop\n\ndef f():\n    from n2a_core.specs import OptimSpec\n")
    found = imports(source, core_modules(), name="n2a_core.training.probe")
    assert ("n2a_core.training.loop", 1, True) in found
    assert ("n2a_core.specs", 4, False) in found


def test_core_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in n2a_core: " + " -> ".join(cycle)


def test_core_never_imports_plugins_or_cli():
    modules = core_modules()
    bad = [f"{path.relative_to(CORE.parent)}:{line} imports {name}"
           for path in modules.values() for name, line, _ in imports(path, modules)
           if name.split(".")[0] in OUTSIDE_CORE]
    assert not bad, "n2a_core must not depend on plugins, the CLI or tests: " + "; ".join(bad)


def test_core_imports_its_own_modules_at_the_top():
    """A function-local import of a core module hides a layering problem (usually a cycle)."""
    modules = core_modules()
    local = [f"{path.relative_to(CORE.parent)}:{line} imports {name} inside a function"
             for path in modules.values() for name, line, top in imports(path, modules)
             if not top and name.split(".")[0] == "n2a_core"]
    assert not local, "; ".join(local)


def test_generation_needs_nothing_from_training():
    graph = import_graph()
    training = sorted(m for m in reachable(graph, "n2a_core.generate") if m.startswith("n2a_core.training"))
    assert not training, f"n2a_core.generate reaches {training}"
    assert "n2a_core.training" not in reachable(graph, "n2a_core")  # `import n2a_core` stays light


def test_plugins_and_examples_import_only_the_public_api():
    """`n2a_core.__all__` is the plugin API: the built-ins and the examples use nothing else,
    so what a third-party plugin can reach is exactly what n2a's own plugins use."""
    import n2a_core

    api, root = set(n2a_core.__all__), CORE.parent
    offending = []
    for path in sorted([*(root / "n2a_plugins").rglob("*.py"), *(root / "examples").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                offending += [f"{where} import {a.name}" for a in node.names if a.name.startswith("n2a_core")]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("n2a_core"):
                if node.module != "n2a_core":
                    offending.append(f"{where} from {node.module} import ...")
                else:
                    offending += [f"{where} n2a_core.{a.name} is not in n2a_core.__all__"
                                  for a in node.names if a.name not in api]
    assert not offending, "; ".join(offending)


def test_the_public_api_names_what_it_exports():
    import n2a_core

    missing = [name for name in n2a_core.__all__ if not hasattr(n2a_core, name)]
    assert not missing and len(set(n2a_core.__all__)) == len(n2a_core.__all__), missing
