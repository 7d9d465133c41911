import importlib.util
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Tests find the shared real data through FVSANITY_DATA; default to ../shared/data beside the repo.
_default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "FVSANITY_DATA" not in os.environ and _default.is_dir():
    os.environ["FVSANITY_DATA"] = str(_default)
os.environ.setdefault("FVSANITY_OFFLINE", "1")  # tests never download


@pytest.fixture
def data_root():
    """The CIFAR-10 ResNet-20 data: $FVSANITY_DATA, else the copy packaged in fvsanity/assets."""
    from fvsanity.testing import data_root as _root

    root = _root()
    if root is None:
        pytest.skip("no CIFAR-10 ResNet-20 data: neither FVSANITY_DATA nor the packaged copy")
    return root


@pytest.fixture
def imagenet_root():
    """The SqueezeNet weights and ImageNet samples (only in the shared data, not packaged)."""
    from fvsanity.testing import imagenet_root as _root

    root = _root()
    if root is None:
        pytest.skip("SqueezeNet weights / ImageNet samples not found (set FVSANITY_DATA to the shared data)")
    return root


@pytest.fixture
def no_packaged_data(tmp_path, monkeypatch):
    """Hide the packaged copy (fvsanity/assets), as on an install without it."""
    from fvsanity import _paths

    monkeypatch.setattr(_paths, "PACKAGED_DIR", tmp_path / "no-packaged-assets")


REPO = Path(__file__).resolve().parents[1]


def git_status(*paths: str) -> str | None:
    """``git status --porcelain`` of ``paths`` in this checkout (None where git or the checkout is missing)."""
    try:
        r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", *paths],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


@pytest.fixture
def experiment_smoke(tmp_path, monkeypatch):
    """``run(name, *argv)``: ``experiments/<name>/run.py --smoke *argv`` in process, WITHOUT
    ``--out``; returns the folder it wrote to. Asserts that the run left ``figures/`` and
    ``experiments/`` as they were (``git status``, compared with before the run) and wrote into
    one fresh temporary folder (``tempfile.mkdtemp``, pointed into ``tmp_path`` here) holding its
    results.json. ``out_flag="--figures"`` passes that flag with ``tmp_path / "out"`` instead and
    checks the outputs landed there. ``module``: an already imported run.py."""

    def run(name: str, *argv: str, module=None, out_flag: str | None = None) -> Path:
        if module is None:
            spec = importlib.util.spec_from_file_location(f"exp_smoke_{name}", REPO / "experiments" / name / "run.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        temp = tmp_path / "tempdir"
        temp.mkdir(exist_ok=True)
        monkeypatch.setattr(tempfile, "tempdir", str(temp))
        given = tmp_path / "out" if out_flag else None
        before = git_status("figures", "experiments")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # what the scripts choose for themselves (detection keeps the caller's)
        try:
            rc = module.main(["--smoke", *argv, *([out_flag, str(given)] if out_flag else [])])
        finally:
            torch.set_num_threads(threads)  # the scripts set their own thread count: not for later tests
        assert rc == 0
        assert git_status("figures", "experiments") == before, f"{name} --smoke changed figures/ or experiments/"
        made = sorted(temp.glob(f"fvsanity-{name}-smoke-*"))
        if given is None:
            assert len(made) == 1, f"{name} --smoke without --out: one fresh temporary folder, got {made}"
            given = made[0]
        else:
            assert not made, f"{name} --smoke {out_flag}: wrote a temporary folder as well: {made}"
        assert (given / "results.json").is_file(), f"{name} --smoke: no results.json in {given}"
        return given

    return run


@pytest.fixture
def tiny():
    from fvsanity.testing import tiny_model

    return tiny_model()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
