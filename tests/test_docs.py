"""The docs site builds with ``mkdocs build --strict``: a broken link, a page missing from the
navigation or a missing file fails the suite."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("mkdocs")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, timeout=300)


def test_docs_build_strict(tmp_path):
    r = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "concepts" / "index.html").is_file()


def test_a_broken_docs_link_fails_the_build(tmp_path):
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs, symlinks=False, ignore=shutil.ignore_patterns("figures"))
    (docs / "figures").mkdir()
    for src in (ROOT / "figures").rglob("*.png"):
        dst = docs / "figures" / src.relative_to(ROOT / "figures")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(b"")
    for src in (ROOT / "figures").rglob("*.md"):
        dst = docs / "figures" / src.relative_to(ROOT / "figures")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text("")
    (docs / "commands.md").write_text((docs / "commands.md").read_text() + "\n[gone](no-such-page.md)\n")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    r = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert r.returncode != 0 and "no-such-page.md" in (r.stdout + r.stderr)
