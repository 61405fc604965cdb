"""The house's imports: no module of the project imports itself back through others (type-only imports count: a
circle of them is still a knot to read), and uvicorn's private modules are imported by the one server module that
says it uses them."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# package roots (pyproject.toml's packages.find)
ROOTS = ("profiles", "operator", "simulator", "gateway", "devcluster", "bench", "console")


def modules() -> dict[str, Path]:
    found = {}
    for root in ROOTS:
        for path in (REPO / root).glob("*/**/*.py"):
            rel = path.relative_to(REPO / root).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports (relative imports resolved; `from p import m` is p.m when that exists)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return result


def test_no_module_imports_itself_back():
    found = modules()
    graph = {name: imports_of(name, path, set(found)) for name, path in found.items()}
    # a package's __init__ importing its own submodules is how a package shows its parts, not a knot
    graph = {name: {m for m in deps if not m.startswith(name + ".")} for name, deps in graph.items()}
    assert cycles(graph) == []


def test_the_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", ["uvicorn.protocols", "uvicorn.protocols.http.httptools_impl", "uvicorn.server"])
def test_uvicorns_private_modules_only_in_the_server_that_says_so(module):
    allowed = REPO / "gateway/cxygpt_gateway/servers/uvicorn_native.py"
    users = []
    for path in (REPO / "gateway").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == module or n.startswith(module + ".") for n in names):
                users.append(path)
    assert set(users) <= {allowed}
    assert "private interface" in allowed.read_text().split('"""')[1]
