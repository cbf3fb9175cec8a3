"""The package's shape, read from its source: no import circle, files small enough to hold
in one's head, and the runtime and the bundle format independent of the workstation side.

Static (AST) checks; tests/runtime/test_runtime.py checks in a subprocess which modules
loading and generating actually import."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "edgepack"
MAX_PY_LINES = 600
MAX_C_LINES = 900
# Files over the limit that are still being split (issue 16, phase 2b); remove each entry
# with its split, so the list can only shrink.
TOO_LONG_FOR_NOW: set[str] = set()  # files over the limit while a split is under way (none now)
INDEPENDENT = ("edgepack.runtime", "edgepack.format")
WORKSTATION = ("edgepack.export", "edgepack.plan", "edgepack.hub", "edgepack.serve", "edgepack.cli")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imported(node: ast.AST, module: str, is_package: bool, known: dict[str, Path]) -> list[str]:
    """edgepack modules one import statement names (``from pkg import sub`` names pkg.sub
    when that is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("edgepack")]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # relative: resolve against this module's package
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        name = ".".join(base + ([node.module] if node.module else []))
    else:
        name = node.module or ""
    if not name.startswith("edgepack"):
        return []
    return [f"{name}.{a.name}" if f"{name}.{a.name}" in known else name for a in node.names]


def _import_statements(tree: ast.Module) -> list[ast.stmt]:
    """Every import statement of a module, the lazy ones inside functions included, but
    not ``if TYPE_CHECKING:`` blocks (annotations only, never run)."""
    out, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif not (isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)):
            todo += [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)]
    return out


def _graph() -> dict[str, set[str]]:
    known = _modules()
    graph = {}
    for module, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        nodes = _import_statements(tree)
        names = {n for node in nodes for n in _imported(node, module, path.name == "__init__.py", known)}
        graph[module] = {n for n in names if n in known and n != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

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
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    """Lazy imports inside functions count too: a circle through them still means the
    modules cannot be read (or moved) one without the other."""
    assert _cycles(_graph()) == []


def test_the_scan_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# load("owner/name") pulls the bundle through the Hub client first (pull runs on the box
# too); a folder load imports none of it, which tests/runtime's subprocess test checks
LAZY_ON_THE_BOX = {("edgepack.runtime", "edgepack.hub")}


def test_runtime_and_format_import_nothing_from_the_workstation_side():
    """Not even inside a function: a small box installs and runs these alone."""
    graph = _graph()
    wrong = {m: sorted(n for n in names if n.startswith(WORKSTATION) and (m, n) not in LAZY_ON_THE_BOX)
             for m, names in graph.items() if m.startswith(INDEPENDENT)}
    assert {m: names for m, names in wrong.items() if names} == {}


def test_plan_imports_nothing_from_the_exporter():
    graph = _graph()
    wrong = {m: sorted(n for n in names if n.startswith("edgepack.export"))
             for m, names in graph.items() if m.startswith("edgepack.plan")}
    assert {m: names for m, names in wrong.items() if names} == {}


def test_files_stay_small():
    too_long = {}
    for path in sorted(PACKAGE.rglob("*")):
        limit = {".py": MAX_PY_LINES, ".c": MAX_C_LINES, ".h": MAX_C_LINES}.get(path.suffix)
        rel = path.relative_to(PACKAGE).as_posix()
        if limit and rel not in TOO_LONG_FOR_NOW:
            lines = len(path.read_text().splitlines())
            if lines > limit:
                too_long[rel] = lines
    assert too_long == {}
    still_long = {rel for rel in TOO_LONG_FOR_NOW if len((PACKAGE / rel).read_text().splitlines()) > MAX_PY_LINES}
    assert still_long == TOO_LONG_FOR_NOW, "split: drop it from TOO_LONG_FOR_NOW"
