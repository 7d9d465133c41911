import os
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
