"""The code layout the README promises: no import cycles in the engine, and method files import only the engine."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _modules():
    files = list((REPO / "bench").rglob("*.py")) + list((REPO / "methods").rglob("*.py"))
    return {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p for p in files}


def _imports(path: Path, known) -> set:
    """Every module of `known` that `path` imports, at top level or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {t for t in [node.module] + [f"{node.module}.{a.name}" for a in node.names] if t in known}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
    return out - {"bench", "methods"}


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    state, cycles = {}, []

    def visit(node, stack):  # depth-first; an edge back to an open module closes a cycle
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_method_files_import_no_other_method():
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("methods."):
            others = {m for m in _imports(path, modules) if m.startswith("methods")}
            assert not others, f"{name} imports {others}"
