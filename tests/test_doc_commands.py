"""Every ``fvsanity ...`` command line in README.md and docs/ parses with the real parser: no
flag, choice or command in the docs that the CLI does not have (a renamed flag fails here)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _commands(page: Path) -> list[tuple[int, str]]:
    text = page.read_text(encoding="utf-8")
    out = []
    for m in re.finditer(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        start = text[: m.start()].count("\n") + 2
        joined = m.group(1).replace("\\\n", " ")
        for k, line in enumerate(joined.splitlines()):
            line = line.split(" #", 1)[0].strip()
            for part in re.split(r"&&|;|\|", line):
                part = part.strip()
                if part.startswith(("fvsanity ", "python -m fvsanity ")) and "..." not in part:
                    out.append((start + k, part))
    return out


CASES = [(p, n, c) for p in PAGES for n, c in _commands(p)]


def test_the_docs_hold_commands_to_check():
    assert len(CASES) >= 15


@pytest.mark.parametrize("page, line, command", CASES, ids=[f"{p.name}:{n}" for p, n, _ in CASES])
def test_documented_command_parses(page, line, command):
    from fvsanity.cli import build_parser

    argv = shlex.split(command.replace("$FVSANITY_DATA", "DATA"))
    argv = argv[3:] if argv[:3] == ["python", "-m", "fvsanity"] else argv[1:]
    if "--help" in argv or "--version" in argv:
        return
    build_parser().parse_args(argv)  # UsageError (one line) for an unknown flag, command or choice
