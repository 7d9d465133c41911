"""A NaN or infinity in an FV or in a natural image's activations stops the work with one line
naming where it appeared; nothing is written."""

from __future__ import annotations

import pytest
import torch

from fvsanity.activations import collect
from fvsanity.errors import DataError
from fvsanity.generate import render
from fvsanity.generate.render import NonFiniteFVError
from fvsanity.testing import tiny_model


def _blow_up_after(lm, steps_ok: int):
    """Make the tiny model's fc output NaN from its ``steps_ok + 1``-th optimization step on (a
    hook counting forwards under autograd; shape probes run without it)."""
    calls = {"n": 0}

    def hook(_m, _i, out):
        calls["n"] += torch.is_grad_enabled()
        return out * float("nan") if calls["n"] > steps_ok else out

    return dict(lm.model.named_modules())["fc"].register_forward_hook(hook)


def test_render_names_unit_seed_and_first_bad_step():
    lm = tiny_model()
    h = _blow_up_after(lm, 3)
    try:
        with pytest.raises(NonFiniteFVError, match=r"unit fc:1, seed 0, became non-finite .* at step 4 of 6") as e:
            render(lm, ["fc:1"], 2, steps=6, progress=False)
    finally:
        h.remove()
    assert "\n" not in str(e.value)


def test_visualize_leaves_existing_outputs_unchanged_on_nan(tmp_path, monkeypatch):
    """A run that meets a NaN exits 2 and leaves the FVs already in --out as they were."""
    import hashlib
    import importlib

    from fvsanity import cli
    render_mod = importlib.import_module("fvsanity.generate.render")

    out = tmp_path / "vis"
    args = ["visualize", "--model", "cifar10-resnet20", "--random-weights", "--unit", "linear:2", "--seeds", "1",
            "--steps", "2", "--out", str(out), "--no-progress"]
    assert cli.main(args) == 0
    before = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in out.iterdir() if p.is_file()}

    real = render_mod._optimize_chunk

    def poisoned(*a, **k):
        res = real(*a, **k)
        res["traces"][:, 1:] = float("nan")
        return res

    monkeypatch.setattr(render_mod, "_optimize_chunk", poisoned)
    assert cli.main(args) == 2
    after = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in out.iterdir() if p.is_file()}
    assert after == before


def test_natural_pass_names_the_image_that_gives_nan():
    lm = tiny_model()
    x = torch.rand(5, 3, 16, 16)
    x[3] = float("nan")
    with pytest.raises(DataError, match=r"image 3 gives non-finite"):
        collect(lm, x, ["relu2"], batch_size=2)
