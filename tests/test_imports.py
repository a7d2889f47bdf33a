"""The package's import graph: no circles, and no function-local imports of our own modules.

Both tests read the source with `ast`; nothing of `slide2vec_dask` is imported, so they
run in well under a second and cannot be fooled by an import order that happens to work.

The graph
---------
One node per module of the package (``slide2vec_dask/slide/base.py`` is
``slide2vec_dask.slide.base``; a package is its ``__init__.py``).  Every ``import`` /
``from ... import`` statement anywhere in a file counts — at module level, inside a class,
inside a function (however deeply nested) — with one exception: statements under
``if TYPE_CHECKING:`` never run, so they are left out.  Imports of names outside the
package (the standard library, torch, dask, ...) are not nodes.

An edge goes from the importing module to the module whose code the statement *needs*:

* ``import a.b.c`` (and ``import a.b.c as x``) -> ``a.b.c``;
* ``from a.b import c`` -> ``a.b.c`` when ``a/b/c.py`` (or ``a/b/c/``) exists, i.e. ``c`` is a
  submodule; otherwise ``c`` is a name defined in ``a/b/__init__.py`` and the edge goes to
  ``a.b``; ``from a.b import *`` -> ``a.b``;
* relative imports are resolved against the importing module's package first
  (``from .open import x`` in ``slide2vec_dask/slide/base.py`` is ``slide2vec_dask.slide.open``);
* a dotted name that is not a module of its own (``import a.b.attr``) falls back to its
  longest prefix that is one.

Package ``__init__``s that Python runs on the way to a submodule (``import a.b.c`` first
runs ``a/__init__.py`` and ``a/b/__init__.py``) are edges too — but only those that are not
packages of the importer itself.  Python runs a module's own packages before the module, so
their ``__init__`` is always done or already running when it imports a sibling: counting
``a.b.x -> a.b`` for ``a.b.x``'s ``from a.b.c import f`` would make every package that
re-exports its submodules' names a circle, while Python handles that case fine.  A module
*outside* ``a.b`` that imports ``a.b.c`` does run ``a/b/__init__.py`` and everything that
imports, so that is a real dependency (``slide2vec_dask`` itself is everyone's package and so
never an implicit edge).  What does break inside a package — a submodule importing a *name*
from its own package's ``__init__`` while that ``__init__`` imports the submodule — is
``from a.b import name``, an explicit edge to ``a.b`` under the rules above, and shows up as
a circle.

Dynamic imports (``importlib.import_module(some_string)``, the package's lazy
``__getattr__``) are not statements and are not in the graph: they are lookups by name in
tables (readers, exporters, presets, aggregators) and run only when that entry is used.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "slide2vec_dask"
ROOT = Path(__file__).resolve().parents[1]

# Function-local imports of one of our modules from another that may stay, each with its reason:
# (importer, imported) -> reason, "*" for any module.  Keep this small: a local import of our own
# code hides a dependency from the reader.  The only reason is import time: modules that load
# torch at their top level, and the console script.
TORCH = "imports torch at its top level; who only names it must not pay for torch"
LOCAL_IMPORT_ALLOWED: dict[tuple[str, str], str] = {
    ("*", f"{PACKAGE}.encoders.aggregators.longnet"): TORCH,
    ("*", f"{PACKAGE}.encoders.aggregators._moozy_nn"): TORCH,
    ("*", f"{PACKAGE}.encoders.aggregators.titan"): TORCH,
    ("*", f"{PACKAGE}.encoders.ctranspath"): TORCH,
    ("*", f"{PACKAGE}.encoders.pooling"): TORCH,
    ("*", f"{PACKAGE}.clusters.local"): "imports distributed (~0.5 s), which only a run that starts a cluster needs",
    ("*", f"{PACKAGE}.telemetry.plugin"): "imports distributed, which only a run on a cluster needs",
    ("*", f"{PACKAGE}.clusters.slurm"): ("imports dask and dask-jobqueue's helpers; `clusters` is imported on every "
                                          "embedding call (client resolution) and must not pay for them"),
    (f"{PACKAGE}.config", f"{PACKAGE}.exporters.registry"): (
        "config is imported by nearly everything and stays light; listing the export formats imports "
        "every format module, the store and the tiling, which sit above it"),
    (f"{PACKAGE}.cli", "*"): ("the console script answers --help, `models` and usage errors in ~20 ms with only "
                              "the standard library loaded (config alone costs ~0.3 s: numpy, the slide "
                              "package); each command imports what it runs (test_cli.test_import_is_light)"),
}


def _allowed(edge: Edge) -> tuple[str, str] | None:
    for key in ((edge.source, edge.target), ("*", edge.target), (edge.source, "*")):
        if key in LOCAL_IMPORT_ALLOWED:
            return key
    return None


@dataclass(frozen=True)
class Edge:
    source: str       # importing module
    target: str       # imported module
    path: str         # importing file, relative to the repository
    line: int
    local: bool       # inside a function body
    via: str | None = None   # set when target is a package whose __init__ runs on the way to `via`

    def where(self) -> str:
        notes = (["in a function"] if self.local else []) + (
            [f"runs its __init__ on the way to {self.via}"] if self.via else [])
        return f"{self.path}:{self.line}{' (' + '; '.join(notes) + ')' if notes else ''}"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ours that ``name`` names, or its longest prefix that is one; None if not ours."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _imports(tree: ast.Module):
    """(node, local) for every import statement not under ``if TYPE_CHECKING:``."""
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, local = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, local
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend((child, local) for child in node.orelse)
            continue
        inner = local or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        stack.extend((child, inner) for child in ast.iter_child_nodes(node))


def _ancestors(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def import_edges(root: Path = ROOT) -> list[Edge]:
    modules = package_modules(root)
    edges: list[Edge] = []
    for source, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        rel = str(path.relative_to(root))
        for node, local in _imports(tree):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [_resolve(alias.name, modules) for alias in node.names]
            else:
                if node.level:
                    anchor = source.split(".")
                    if not is_package:
                        anchor = anchor[:-1]
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if alias.name != "*" and sub in modules:
                        targets.append(sub)
                    else:
                        targets.append(_resolve(base, modules))
            own = _ancestors(source) | ({source} if is_package else set())
            for target in targets:
                if target is None or target == source:
                    continue
                edges.append(Edge(source, target, rel, node.lineno, local))
                for package in sorted(_ancestors(target) - own):
                    if package in modules:
                        edges.append(Edge(source, package, rel, node.lineno, local, via=target))
    return list(dict.fromkeys(edges))  # `from m import a, b` is one edge


def strongly_connected(nodes, successors: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(successors.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(successors.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _shortest_cycle(start: str, members: set[str], successors: dict[str, set[str]]) -> list[str]:
    """A shortest path start -> ... -> start inside one component (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(successors.get(node, ())):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return path[::-1] + [start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    return [start]


def import_cycles(edges: list[Edge]) -> list[str]:
    """One report per circle (strongly connected component of more than one module)."""
    successors: dict[str, set[str]] = {}
    for edge in edges:
        successors.setdefault(edge.source, set()).add(edge.target)
    nodes = set(successors) | {e.target for e in edges}
    reports = []
    for component in strongly_connected(nodes, successors):
        if len(component) < 2:
            continue
        members = set(component)
        short = lambda m: m.removeprefix(PACKAGE + ".")  # noqa: E731
        cycle = _shortest_cycle(component[0], members, successors)
        lines = [f"circle of {len(component)} modules: {', '.join(map(short, component))}",
                 f"  e.g. {' -> '.join(map(short, cycle))}",
                 "  edges inside it:"]
        for edge in sorted(edges, key=lambda e: (e.source, e.target, e.line)):
            if edge.source in members and edge.target in members:
                lines.append(f"    {short(edge.source)} -> {short(edge.target)}   {edge.where()}")
        reports.append("\n".join(lines))
    return reports


def local_package_imports(edges: list[Edge]) -> list[Edge]:
    """The function-local imports of our own modules that LOCAL_IMPORT_ALLOWED does not allow."""
    return [e for e in edges if e.local and e.via is None and _allowed(e) is None]


def test_no_import_circles():
    edges = import_edges()
    assert edges, "no imports found: is the package where this test thinks it is?"
    cycles = import_cycles(edges)
    assert not cycles, "import circles in slide2vec_dask:\n\n" + "\n\n".join(cycles)


def test_resolution_rules(tmp_path):
    """The rules of the module docstring, on a tiny package of known shape."""
    files = {
        "slide2vec_dask/__init__.py": "",
        "slide2vec_dask/a/__init__.py": "from slide2vec_dask.a.x import X\n",
        "slide2vec_dask/a/x.py": ("from . import y\nfrom .y import name\nimport slide2vec_dask.b.z.attr\n"
                                  "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                  "    from slide2vec_dask.b import q\n"),
        "slide2vec_dask/a/y.py": "def f():\n    from slide2vec_dask.a import X\n",
        "slide2vec_dask/b/__init__.py": "from .. import a\n",
        "slide2vec_dask/b/z.py": "import os\n",
        "slide2vec_dask/b/w.py": "from slide2vec_dask.b.z import os\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    edges = import_edges(tmp_path)
    got = {(e.source, e.target, e.line, e.local) for e in edges}
    p = PACKAGE
    assert got == {
        (f"{p}.a", f"{p}.a.x", 1, False),
        (f"{p}.a.x", f"{p}.a.y", 1, False),          # `from . import y`: y is a module
        (f"{p}.a.x", f"{p}.a.y", 2, False),          # `from .y import name`
        (f"{p}.a.x", f"{p}.b.z", 3, False),          # `import ...z.attr` -> longest module prefix
        (f"{p}.a.x", f"{p}.b", 3, False),            # ... which runs b/__init__ (not a's package)
        (f"{p}.b.w", f"{p}.b.z", 1, False),          # a sibling: b/__init__ is w's own, no edge
        (f"{p}.a.y", f"{p}.a", 2, True),             # a name from the package __init__, locally
        (f"{p}.b", f"{p}.a", 1, False),              # `from .. import a` in a package __init__
    }
    cycles = import_cycles(edges)
    assert len(cycles) == 1 and "a, a.x, a.y" in cycles[0]


def test_no_function_local_imports_of_our_own_modules():
    """Lazy imports are for heavy third-party libraries (torch, timm, pyvips, ...), not for our
    own modules: a local import of one of ours either hides a circle or hides a dependency.
    The few that must stay are in LOCAL_IMPORT_ALLOWED, each with its reason."""
    edges = import_edges()
    used = {_allowed(e) for e in edges if e.local and e.via is None}
    stale = [key for key in LOCAL_IMPORT_ALLOWED if key not in used]
    offending = local_package_imports(edges)
    listing = "\n".join(f"  {e.source} -> {e.target}   {e.where()}"
                        for e in sorted(offending, key=lambda e: (e.path, e.line)))
    if offending:
        print(f"{len(offending)} function-local imports of slide2vec_dask modules:\n{listing}")
    assert not stale, f"LOCAL_IMPORT_ALLOWED lists imports that are gone: {stale}"
    assert not offending, (f"{len(offending)} function-local imports of slide2vec_dask modules "
                           f"(move them to the top, or allow-list them with a reason):\n{listing}")
