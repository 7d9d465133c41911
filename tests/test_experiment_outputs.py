"""Committed results are written only on purpose: where every experiment script writes.

The rule (experiments/_outdir.py): ``--out DIR`` if given; ``--smoke`` without it a fresh
temporary folder (never figures/); otherwise ``figures/<experiment>/``, announced in one line
("writing results to figures/<experiment> (full run)"), with caches in ``runs/<experiment>``.

Each experiment's ``--smoke`` run is exercised once, by the test named in SMOKE_TESTS, through the
``experiment_smoke`` fixture (tests/conftest.py): it runs the smoke WITHOUT ``--out`` and asserts
that ``git status --porcelain figures/ experiments/`` is as before and that the outputs landed in
the fresh temporary folder. The tests here check that every experiment has such a test, and the
rule itself, without running any experiment.
"""

from __future__ import annotations

import ast
import importlib.util
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"

# experiment -> the test that runs its --smoke through the experiment_smoke fixture
SMOKE_TESTS = {
    "circuit_overlap": "test_attribution.py::test_experiment_smoke",
    "detection": "test_detect.py::test_detection_smoke_run_covers_every_registered_method_and_writes_the_results_schema",
    "fooling_circuit": "test_fool.py::test_experiment_smoke",
    "maco": "test_generate_seams.py::test_maco_experiment_smoke",
    "path_similarity": "test_path.py::test_experiment_smoke",
    "silent_units": "test_fool.py::test_experiment_smoke",  # and test_splits.py (--figures alias)
    "slingshot": "test_slingshot.py::test_experiment_smoke",
}


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def outdir(tmp_path, monkeypatch):
    """experiments/_outdir.py with its repository (figures/, runs/) moved into tmp_path."""
    mod = _load(EXPERIMENTS / "_outdir.py", "exp_outdir_under_test")
    monkeypatch.setattr(mod, "REPO", tmp_path)
    monkeypatch.setattr(mod, "FIGURES", tmp_path / "figures")
    monkeypatch.setattr(mod, "RUNS", tmp_path / "runs")
    temp = tmp_path / "tempdir"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    return mod


def test_every_experiment_smoke_run_is_checked_for_a_clean_repository():
    """Each experiments/<name>/run.py has a --smoke test that goes through the experiment_smoke
    fixture (a new experiment must add one here)."""
    found = sorted(p.parent.name for p in EXPERIMENTS.glob("*/run.py"))
    assert found == sorted(SMOKE_TESTS)
    for name, node in SMOKE_TESTS.items():
        file, func = node.split("::")
        tree = ast.parse((ROOT / "tests" / file).read_text())
        defs = {f.name: f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
        assert func in defs, f"{name}: {node} does not exist"
        args = [a.arg for a in defs[func].args.args]
        assert "experiment_smoke" in args, f"{name}: {node} does not use the experiment_smoke fixture"


SCRIPTS = sorted(p for p in EXPERIMENTS.glob("*/*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_experiment_script_takes_out_dir(script, capsys):
    """One flag convention: every script under experiments/ has ``--out DIR``."""
    mod = _load(script, f"exp_help_{script.parent.name}_{script.stem}")
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    assert "--out DIR" in capsys.readouterr().out


def test_a_smoke_run_without_out_writes_to_a_fresh_temporary_folder_and_says_where(outdir, capsys):
    a = outdir.output_dir("detection", None, True)
    b = outdir.output_dir("detection", None, True)
    temp = Path(tempfile.gettempdir())
    assert a != b and a.parent == temp and b.parent == temp and a.is_dir()
    assert a.name.startswith("fvsanity-detection-smoke-")
    err = capsys.readouterr().err
    assert f"smoke run: writing to {a}" in err and f"smoke run: writing to {b}" in err
    assert not (outdir.FIGURES).exists()
    assert outdir.work_dir("detection", a, True) == a / "work"  # a smoke run's caches stay in its folder


def test_a_smoke_run_never_writes_into_figures(outdir):
    with pytest.raises(SystemExit, match="never writes into figures/"):
        outdir.output_dir("maco", outdir.FIGURES / "maco", True)
    with pytest.raises(SystemExit, match="never writes into figures/"):
        outdir.output_dir("maco", outdir.FIGURES, True)
    assert not outdir.FIGURES.exists()


def test_a_full_run_writes_figures_and_says_so_before_it_starts(outdir, capsys):
    got = outdir.output_dir("detection", None, False)
    assert got == outdir.FIGURES / "detection" and got.is_dir()
    assert capsys.readouterr().err.strip() == "writing results to figures/detection (full run)"
    # caches of a full run go to runs/<experiment> (gitignored), never into figures/
    assert outdir.work_dir("detection", got, False) == outdir.RUNS / "detection"
    assert outdir.work_dir("detection", got, False, "elsewhere") == Path("elsewhere")
    assert not list(Path(tempfile.gettempdir()).iterdir())


def test_out_dir_is_used_as_given(outdir, tmp_path, capsys):
    for smoke in (False, True):
        got = outdir.output_dir("maco", tmp_path / f"mine{smoke}", smoke)
        assert got == tmp_path / f"mine{smoke}" and got.is_dir()
    assert "writing results to" in capsys.readouterr().err
    assert not list(Path(tempfile.gettempdir()).iterdir())


def test_figures_is_a_deprecated_alias_of_out(outdir, capsys):
    import argparse

    ap = argparse.ArgumentParser()
    outdir.add_out_argument(ap, "slingshot", alias="--figures")
    assert ap.parse_args(["--figures", "x"]).out == "x"
    assert "--figures is deprecated: use --out" in capsys.readouterr().err
    assert ap.parse_args(["--out", "y"]).out == "y" and ap.parse_args([]).out is None


def test_single_file_helpers_take_a_folder_or_their_old_file_path(outdir, tmp_path, capsys):
    """sweep.py, detector_size.py, ssim_seeds.py, tune.py: ``--out DIR`` holds the file; a path
    with a suffix (the READMEs' commands) is the file itself; no --out: figures/<experiment>/,
    announced as a full run."""
    assert outdir.output_file("slingshot", tmp_path / "d", "ssim_seeds.json") == tmp_path / "d" / "ssim_seeds.json"
    assert outdir.output_file("slingshot", tmp_path / "e" / "s400.json", "ssim_seeds.json") == tmp_path / "e" / "s400.json"
    assert (tmp_path / "e").is_dir()
    capsys.readouterr()
    got = outdir.output_file("silent_units", None, "sweep.json")
    assert got == outdir.FIGURES / "silent_units" / "sweep.json"
    assert capsys.readouterr().err.strip() == "writing results to figures/silent_units (full run)"
