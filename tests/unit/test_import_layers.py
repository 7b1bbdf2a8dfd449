"""The package's layers import one way: no cycle between loraplex's subpackages (imports inside functions count)."""
from __future__ import annotations

import ast
from pathlib import Path

import loraplex

ROOT = Path(loraplex.__file__).parent
# The intended order, lowest first; a unit may import only units before it (and top-level leaf modules).
LAYERS = ["ops", "layers", "models", "lora", "kv_cache", "scheduler", "sampling", "engine", "routing", "llm", "platform",
          "server", "scaleout", "ray_serve", "merge", "cli"]


def _unit(module: str) -> str | None:
    """``loraplex.a.b`` → ``a`` (a subpackage or a top-level module)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "loraplex" and len(parts) > 1 else None


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        src = rel.parts[0]
        pkg = ["loraplex", *rel.parts[:-1]]  # the package a relative import starts from
        deps = graph.setdefault(src, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
                mods = [base] + [f"{base}.{a.name}" for a in node.names] if base == "loraplex" else [base]
            else:
                continue
            for m in mods:
                unit = _unit(m)
                if unit and unit != src and ((ROOT / unit).is_dir() or (ROOT / f"{unit}.py").is_file()):
                    deps.add(unit)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of units (first = last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (c := visit(v)):
                return c
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state and (c := visit(u)):
            return c
    return None


def test_find_cycle_finds_one():  # the checker itself can fail
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_subpackages():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle between loraplex units: {' -> '.join(cycle)}"


def test_layers_import_downwards_only():
    graph = import_graph()
    rank = {u: i for i, u in enumerate(LAYERS)}
    upward = sorted(f"{u} -> {v}" for u, deps in graph.items() if u in rank
                    for v in deps if v in rank and rank[v] > rank[u])
    assert not upward, f"imports against the layer order {LAYERS}: {upward}"
