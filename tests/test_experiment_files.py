"""File safety of the experiment scripts: a crash while saving never loses what was there."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest


def _load_run(name: str):
    path = Path(__file__).resolve().parents[1] / "experiments" / name / "run.py"
    spec = importlib.util.spec_from_file_location(f"exp_{name}_files", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "fv.json").write_text(text)
    (path / "fv.pt").write_bytes(text.encode() * 3)
    return path


def _contents(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_replace_dir_swaps_in_the_new_folder_and_leaves_nothing_else(tmp_path):
    run = _load_run("path_similarity")
    dest = _folder(tmp_path / "fvs", "old")
    new = _folder(tmp_path / "fvs_tmp", "new")
    run.replace_dir(new, dest)
    assert _contents(dest) == {"fv.json": b"new", "fv.pt": b"newnewnew"}
    assert [p.name for p in tmp_path.iterdir()] == ["fvs"]
    # into a place where nothing was yet
    run.replace_dir(_folder(tmp_path / "b_tmp", "b"), tmp_path / "b")
    assert _contents(tmp_path / "b") == {"fv.json": b"b", "fv.pt": b"bbb"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "fvs"]


def test_replace_dir_crash_while_moving_in_keeps_the_old_folder(tmp_path, monkeypatch):
    run = _load_run("path_similarity")
    dest = _folder(tmp_path / "fvs", "old")
    new = _folder(tmp_path / "fvs_tmp", "new")
    real = os.replace
    calls = []

    def crash_on_move_in(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if Path(src) == new:
            raise KeyboardInterrupt  # killed between moving the old folder aside and moving the new one in
        return real(src, dst)

    monkeypatch.setattr(run.os, "replace", crash_on_move_in)
    with pytest.raises(KeyboardInterrupt):
        run.replace_dir(new, dest)
    monkeypatch.setattr(run.os, "replace", real)
    assert calls[0][0] == "fvs" and calls[1] == ("fvs_tmp", "fvs")  # the old one was moved aside first ...
    assert _contents(dest) == {"fv.json": b"old", "fv.pt": b"oldoldold"}  # ... and is back
    assert _contents(new) == {"fv.json": b"new", "fv.pt": b"newnewnew"}  # the new one is not lost either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fvs", "fvs_tmp"]
