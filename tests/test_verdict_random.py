"""Random-weight networks never read "natural-like" (fault run: a random ResNet-18 read
"natural-like from conv1 on (12 of 12 layers)" on references that barely separated).

``fvsanity check`` in process, on real photos (the shared ImageNet samples), with small random
models: a torchvision ResNet-18 at 64 px and a timm ViT-Tiny, 5 FV seeds (so "natural-like" is
attainable: 2^-5 < 0.05), a few FV steps. Every layer is "inconclusive" or "diverges"; a layer
whose references do not separate from unrelated images shows no normalized similarity (null).
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from fvsanity.cli import main
from fvsanity.compare.verdict import NATURAL_LIKE, REASON_NOT_SEPARATED
from fvsanity.models import list_models, register_model

R18 = "verdict-random-resnet18-64px"


def _resnet18_64(pretrained: bool = False):
    from fvsanity.models import load_model

    lm = load_model("resnet18", pretrained=False, seed=0)
    pre = dataclasses.replace(lm.preprocess, size=(64, 64), resize=None)
    return dataclasses.replace(lm, name=R18, preprocess=pre, config=None)


if R18 not in list_models():
    register_model(R18)(_resnet18_64)

FAST = ["--random-weights", "--seeds", "5", "--n-boot", "20", "--n-perm", "20", "--no-progress", "--limit", "40",
        "--top-k", "10", "--n-other", "40"]


def _check(tmp_path, imagenet_root, model, unit, steps):
    out = tmp_path / "o"
    rc = main(["check", "--model", model, "--unit", unit, "--images", str(imagenet_root / "imagenet-samples"),
               "--steps", str(steps), "--out", str(out), *FAST])
    assert rc == 0
    return json.loads((out / "check.json").read_text())


def _no_natural_like(doc):
    for u in doc["units"]:
        assert u["verdict"]["outcome"] != NATURAL_LIKE and u["verdict"]["natural_like_from"] is None
        assert u["verdict"]["counts"][NATURAL_LIKE] == 0
        for r in u["layers"]:
            assert r["outcome"] != NATURAL_LIKE, (r["name"], r["normalized"], r["reason"])
            if not r["separated"]:  # no scale: no normalized number, and the reason says why
                assert r["normalized"] is None and r["ci_low"] is None and r["ci_high"] is None
                assert r["reason"].startswith(REASON_NOT_SEPARATED)
                assert r["separation"]["separated"] is False and r["separation"]["reason"] == r["reason"]
    assert doc["summary"]["unit_layers"][NATURAL_LIKE] == 0


def test_random_resnet18_is_never_natural_like(tmp_path, imagenet_root, capsys):
    doc = _check(tmp_path, imagenet_root, R18, "layer4.1:3", steps=4)
    _no_natural_like(doc)
    u = doc["units"][0]
    assert len(u["layers"]) == 12 and u["n_fv"] == 5
    printed = capsys.readouterr().out
    assert "natural-like from" not in printed and "layer4.1:3: " in printed


def test_random_vit_tiny_is_never_natural_like(tmp_path, imagenet_root):
    doc = _check(tmp_path, imagenet_root, "timm:vit_tiny_patch16_224", "blocks.1:3", steps=2)
    _no_natural_like(doc)
    assert [r["name"] for r in doc["units"][0]["layers"]] == ["blocks.0", "blocks.1"]


@pytest.mark.parametrize("bad", [{"min_separation": -1}, {"separation_precision": 0}, {"separation_precision": 1.5}])
def test_separation_settings_are_checked(bad):
    from fvsanity.compare.verdict import VerdictError, VerdictSettings

    with pytest.raises(VerdictError):
        VerdictSettings(**bad)
