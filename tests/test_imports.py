"""The library never imports the command line: parsed from the package's source (every import,
at module level or inside a function), nothing outside ``fvsanity/commands`` and
``fvsanity/cli.py`` imports ``fvsanity.commands`` or ``fvsanity.cli``."""

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
    imps = _imports(PKG / "audit.py")
    assert "fvsanity.errors" in imps and "fvsanity.compare.path" in imps


def test_library_never_imports_the_cli():
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        mod = _module_name(path)
        if _is_cli(mod):
            continue
        bad = sorted(n for n in _imports(path) if _is_cli(n))
        if bad:
            offenders.append(f"{mod} imports {', '.join(bad)}")
    assert offenders == []
