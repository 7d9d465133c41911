"""experiments/path_similarity: cached FVs are reused only for the same steps, seeds and amp."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


def _load_run():
    path = Path(__file__).resolve().parents[1] / "experiments" / "path_similarity" / "run.py"
    spec = importlib.util.spec_from_file_location("exp_path_similarity_reuse", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_get_fvs_reuses_matching_fvs_and_refuses_other_amp(tmp_path):
    from fvsanity.generate import render
    from fvsanity.testing import tiny_model

    run = _load_run()
    lm = tiny_model(size=16)
    units = ["fc:0", "fc:1"]
    render(lm, units, seeds=2, steps=2, amp=False).save(tmp_path / "fvs")
    cfg = {"steps": 2, "seeds": 2}
    got = run.get_fvs(lm, units[1:], cfg, tmp_path / "fvs", allow_generate=False, progress=False)
    assert [str(u) for u in got.units] == ["fc:1"] and got.images.shape[:2] == (1, 2)
    assert torch.equal(got.images[0], torch.load(tmp_path / "fvs" / "fv.pt", weights_only=True)["images"][1])
    # FVs rendered in float32 are not reused for a bf16-autocast config (and vice versa)
    with pytest.raises(SystemExit, match="--no-generate"):
        run.get_fvs(lm, units, dict(cfg, amp=True), tmp_path / "fvs", allow_generate=False, progress=False)
    with pytest.raises(SystemExit, match="--no-generate"):
        run.get_fvs(lm, units, dict(cfg, steps=3), tmp_path / "fvs", allow_generate=False, progress=False)
