"""The README's Python quickstart runs as written (outside the repository, offline) and says
what the README says it prints."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(marker: str) -> str:
    text = README.read_text(encoding="utf-8")
    m = re.search(rf"<!-- readme-example: {marker} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README has no example marked {marker!r}"
    return m.group(1)


def test_readme_quickstart_is_short_with_one_import():
    code = _block("quickstart")
    lines = code.strip().splitlines()
    assert len(lines) <= 8
    assert [ln for ln in lines if ln.startswith(("import ", "from "))] == ["import fvsanity"]


def test_readme_quickstart_runs_and_prints_its_verdicts(tmp_path, monkeypatch, capsys, data_root):
    monkeypatch.chdir(tmp_path)  # outside the repository: no relative data paths
    exec(compile(_block("quickstart"), "README.md", "exec"), {"__name__": "__readme__"})  # noqa: S102
    out = capsys.readouterr().out
    verdicts = eval(out.splitlines()[0])  # noqa: S307 - the dict the example printed
    assert set(verdicts) == {"layer3.2:5", "linear:3"}
    assert set(verdicts.values()) <= {"natural-like", "diverges", "inconclusive"}
    assert (tmp_path / "runs" / "check" / "check.json").is_file()
    assert (tmp_path / "runs" / "check" / "path_similarity.png").is_file()
    # the README quotes its output: keep the quote true
    quoted = re.search(r"It prints `(\{.*?\})`", README.read_text(encoding="utf-8"), re.S).group(1)
    assert eval(quoted.replace("\n", " ")) == verdicts  # noqa: S307
