"""The package's import graph, parsed from its source (every import, at module level or inside a
function, relative imports resolved): the library never imports the command line (nothing
outside ``fvsanity/commands`` and ``fvsanity/cli.py`` imports ``fvsanity.commands`` or
``fvsanity.cli``), and the graph has no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "fvsanity"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)  # `from . import commands`
    return out


def _is_cli(name: str) -> bool:
    return name in ("fvsanity.cli", "fvsanity.commands") or name.startswith("fvsanity.commands.")


def test_import_parser_resolves_relative_imports():
    imps = _imports(PKG / "auditing.py")
    assert "fvsanity.errors" in imps and "fvsanity.compare.path" in imps


def test_library_never_imports_the_cli():
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        mod = _module_name(path)
        if _is_cli(mod) or mod == "fvsanity.__main__":  # `python -m fvsanity` is the command line
            continue
        bad = sorted(n for n in _imports(path) if _is_cli(n))
        if bad:
            offenders.append(f"{mod} imports {', '.join(bad)}")
    assert offenders == []


# ------------------------------------------------------------------------------ cycles
def _module_edges(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports: ``from X import a`` counts as ``X.a`` when that is a
    module (``from . import fool``), else as ``X``; ``import X.Y`` as ``X.Y``."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                if f"{target}.{a.name}" in modules:
                    out.add(f"{target}.{a.name}")
                elif target in modules:
                    out.add(target)
    out.discard(mod)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (every import statement of the package)."""
    paths = sorted(PKG.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _module_edges(p, modules) for p in paths}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component of more than one module,
    found by Tarjan's algorithm and then a breadth-first walk inside the component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for comp in comps:
        inside, start = set(comp), comp[0]
        prev: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in prev:  # shortest way back to start
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & inside):
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        path = [start]
        while True:
            path.append(prev[path[-1]])
            if path[-1] == start:
                break
        cycles.append(path[::-1])
    return cycles


def test_cycle_finder_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e2"}, "e2": {"e"}}
    assert find_cycles(g) == [["a", "b", "c", "a"], ["e", "e2", "e"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_import_graph_sees_function_level_and_relative_imports():
    g = import_graph()
    assert "fvsanity.fingerprint" in g["fvsanity.models.loaded"]  # inside LoadedModel.fingerprint
    assert "fvsanity.fool" in g["fvsanity"]  # `from . import fool`
    assert "fvsanity.checking" in g["fvsanity.fool.pipeline"]  # inside a function


def test_package_has_no_import_cycles():
    """Not even through imports inside functions: a module never reaches itself again."""
    cycles = find_cycles(import_graph())
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_models_never_import_fool_or_cache():
    """Manipulated models load through the model registry's loader hook (registered by
    fvsanity.fool); the fingerprint comes from fvsanity.fingerprint, not the caches."""
    g = import_graph()
    models = {m: e for m, e in g.items() if m == "fvsanity.models" or m.startswith("fvsanity.models.")}
    bad = sorted(f"{m} -> {t}" for m, e in models.items() for t in e
                 if t.startswith(("fvsanity.fool", "fvsanity.cache", "fvsanity.generate")))
    assert bad == []


def test_every_subpackage_declares_its_public_names():
    import importlib

    for init in sorted(PKG.rglob("__init__.py")):
        if "assets" in init.parts:
            continue
        mod = importlib.import_module(_module_name(init))
        assert isinstance(getattr(mod, "__all__", None), list), f"{mod.__name__} has no __all__"
        for name in mod.__all__:
            if not hasattr(mod, name):
                importlib.import_module(f"{mod.__name__}.{name}")  # a submodule named in __all__


def test_the_facade_names_the_jobs():
    import fvsanity

    for name in ("visualize", "check", "audit", "wrap", "load_model", "CheckReport", "CheckSettings", "AuditSettings"):
        assert name in fvsanity.__all__ and callable(getattr(fvsanity, name))
    import fvsanity.auditing  # the module behind fvsanity.audit keeps its own name

    assert fvsanity.audit is not fvsanity.auditing and callable(fvsanity.audit)
    import fvsanity.fool.pipeline  # the callable package keeps its submodules

    assert callable(fvsanity.fool) and fvsanity.fool.pipeline.run_fool is not None
