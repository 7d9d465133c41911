"""Progress bars only where a person watches: none under a pipe or file, forced by
FVSANITY_PROGRESS=always, refused with one line for an invalid value."""

from __future__ import annotations

import io

import pytest

from fvsanity.errors import EnvError
from fvsanity.progress import interactive, progress_bar


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_bars_are_drawn_on_a_terminal_and_not_into_a_file(monkeypatch):
    monkeypatch.delenv("FVSANITY_PROGRESS", raising=False)
    tty, log = _Tty(), io.StringIO()
    for _ in progress_bar(range(50), file=tty, mininterval=0):
        pass
    for _ in progress_bar(range(50), file=log, mininterval=0):
        pass
    assert "50/50" in tty.getvalue() and log.getvalue() == ""


def test_the_environment_overrides_the_terminal_test(monkeypatch):
    monkeypatch.setenv("FVSANITY_PROGRESS", "always")
    assert interactive(io.StringIO())
    monkeypatch.setenv("FVSANITY_PROGRESS", "never")
    assert not interactive(_Tty())
    monkeypatch.setenv("FVSANITY_PROGRESS", "sometimes")
    with pytest.raises(EnvError, match="FVSANITY_PROGRESS='sometimes' is not valid; valid: always, never, auto"):
        interactive()


def test_cli_refuses_an_invalid_progress_setting(monkeypatch, capsys):
    from fvsanity.cli import main

    monkeypatch.setenv("FVSANITY_PROGRESS", "sometimes")
    assert main(["layers", "--list"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "fvsanity: error: FVSANITY_PROGRESS='sometimes' is not valid; valid: always, never, auto"]


def test_cli_prints_python_warnings_as_one_line(monkeypatch):
    import subprocess
    import sys

    code = ("import warnings, fvsanity.cli as c\n"
            "c.build_parser = (lambda b: lambda: (lambda p: (p._subparsers._group_actions[0].choices['layers']"
            ".set_defaults(func=lambda a: warnings.warn('a setting that\\n  reads oddly') or 0), p)[1])(b()))"
            "(c.build_parser)\n"
            "raise SystemExit(c.main(['layers', '--list']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines() == ["fvsanity: warning: a setting that reads oddly"]
