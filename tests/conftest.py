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
    from fvsanity.testing import data_root as _root

    root = _root()
    if root is None:
        pytest.skip("shared real data not found (set FVSANITY_DATA)")
    return root


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
