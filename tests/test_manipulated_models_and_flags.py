"""Follow-ups found while merging: saved manipulated models load strictly, ``check``
seeds random weights by ``--seed``, ``check`` refuses the CIFAR default images for other models,
a render's wall time is not part of its settings hash, and audit.json records the model's
structured provenance (the last is covered in tests/test_weights.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from fvsanity.cli import main
from fvsanity.errors import FVSanityError
from fvsanity.fool import build_silent_units, load_manipulated, make_routes, save_manipulated
from fvsanity.generate import render, settings_hash
from fvsanity.testing import tiny_model


def _saved_silent(tmp_path):
    tiny = tiny_model()
    calib = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.4
    silent = build_silent_units(tiny, make_routes(tiny, "fc:0-1", shift=1), calib, mode="trigger", margin_range=1.0)
    return save_manipulated(silent, tmp_path / "m")


@pytest.mark.parametrize("tamper", ["nan", "shape", "missing", "unexpected", "truncated"])
def test_saved_manipulated_model_loads_strictly(tamper, tmp_path):
    folder = _saved_silent(tmp_path)
    load_manipulated(folder, base=tiny_model(seed=3))  # the untouched folder loads
    path = folder / "model.safetensors"
    sd = load_file(str(path))
    key = next(k for k, v in sd.items() if v.is_floating_point() and v.ndim >= 2)
    if tamper == "nan":
        sd[key] = sd[key].clone()
        sd[key].view(-1)[0] = float("nan")
    elif tamper == "shape":
        sd[key] = sd[key][:1].clone()
    elif tamper == "missing":
        del sd[key]
    elif tamper == "unexpected":
        sd["extra.weight"] = torch.zeros(2)
    if tamper == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:
        save_file(sd, str(path))
    with pytest.raises(FVSanityError) as e:
        load_manipulated(folder, base=tiny_model(seed=3))
    msg = str(e.value)
    assert "\n" not in msg
    assert str(path) in msg
    if tamper in ("nan", "shape", "missing"):
        assert key in msg
    if tamper == "unexpected":
        assert "extra.weight" in msg


def test_check_random_weights_follow_seed(data_root, tmp_path):
    prints = {}
    for seed in (1, 2, 1):
        out = tmp_path / f"s{seed}_{len(prints)}"
        rc = main(["check", "--model", "cifar10-resnet20", "--random-weights", "--seed", str(seed), "--unit", "linear:0",
                   "--images", str(data_root / "cifar10-test"), "--limit", "30", "--steps", "1", "--seeds", "1",
                   "--top-k", "3", "--n-other", "5", "--n-boot", "0", "--n-perm", "10", "--no-progress", "--out", str(out)])
        assert rc == 0
        prints[len(prints)] = json.loads((out / "fvs" / "fv.json").read_text())["settings"]["model_fingerprint"]
    assert prints[0] != prints[1]  # --seed 1 vs --seed 2: other random weights
    assert prints[0] == prints[2]  # --seed 1 twice: the same weights


def test_check_refuses_cifar_default_images_for_imagenet_model(tmp_path, capsys):
    rc = main(["check", "--model", "imagenet-squeezenet", "--random-weights", "--unit", "classifier.1:1",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("fvsanity: error: --images DIR is required for imagenet-squeezenet")


def test_settings_hash_ignores_wall_time():
    lm = tiny_model()
    a = render(lm, ["fc:0"], seeds=1, steps=2, progress=False)
    b = render(lm, ["fc:0"], seeds=1, steps=2, progress=False)
    assert a.settings_hash == b.settings_hash
    assert settings_hash(dict(a.settings, seconds=a.settings["seconds"] + 100.0)) == a.settings_hash
    changed = dict(a.settings, steps=3)
    assert settings_hash(changed) != a.settings_hash


def test_closed_loop_gives_no_flag_without_enough_references():
    """A unit whose path check lacks references gets flagged=None and is left out of the fractions;
    Only "diverges" evidence flags, "inconclusive" is neither flagged nor cleared."""
    from types import SimpleNamespace as NS

    from fvsanity.fool.pipeline import _decision_counts, _flag_units, _flagged_fraction

    def unit(name, outcome, status="ok", reason=""):
        layer = NS(name="fc", outcome=outcome, reason=reason, normalized=0.0, ci_low=-1.0, ci_high=1.0)
        verdict = NS(outcome=outcome, status=status, sufficient=status == "ok", to_json=lambda: {"outcome": outcome})
        return NS(unit=name, layers=[layer], verdict=verdict)

    ref = NS(units=[unit(f"fc:{i}", "natural-like") for i in range(4)])
    bad = "insufficient references: 0 other natural image(s), need >= 2"
    test = NS(units=[unit("fc:0", "diverges"), unit("fc:1", "natural-like"),
                     unit("fc:2", "inconclusive", status=bad, reason=bad),
                     unit("fc:3", "inconclusive", reason="needs >= 5 FV seeds")])
    flagged_any, per_unit = _flag_units(ref, test)
    assert [p["flagged"] for p in per_unit] == [True, False, None, None]
    assert [p["decision"] for p in per_unit] == ["flagged", "cleared", "inconclusive", "inconclusive"]
    assert per_unit[2]["why"] == [bad] and per_unit[0]["why"] == ["diverges at fc"]
    assert per_unit[3]["why"] == ["inconclusive at its own layer (needs >= 5 FV seeds)"]
    assert flagged_any is True
    assert _flagged_fraction(per_unit) == 0.5  # 1 of the 2 decided units
    assert _decision_counts(per_unit) == {"flagged": 1, "cleared": 1, "inconclusive": 2}
    assert math.isnan(_flagged_fraction([per_unit[2]]))
    # a layer that already diverged on the reference model is no new evidence
    same = NS(units=[unit("fc:0", "diverges")])
    assert _flag_units(same, same)[1][0]["decision"] == "inconclusive"


def test_register_model_refuses_a_duplicate_name():
    from fvsanity.models import list_models, register_model

    assert "cifar10-resnet20" in list_models()
    with pytest.raises(FVSanityError, match="'cifar10-resnet20' is already registered"):
        register_model("cifar10-resnet20")


def test_offline_torchvision_weights_are_not_downloaded(monkeypatch, tmp_path):
    """FVSANITY_OFFLINE=1 means no network attempt: an uncached torchvision checkpoint is one line."""
    import torch.hub

    from fvsanity.errors import MissingWeightsError
    from fvsanity.models import load_model

    calls = []

    def no_network(url, *args, **kwargs):
        calls.append(url)
        raise OSError("network")

    monkeypatch.setenv("FVSANITY_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty hub cache
    with pytest.raises(MissingWeightsError, match=r"not cached at .*FVSANITY_OFFLINE=1") as e:
        load_model("resnet18")
    assert "\n" not in str(e.value)
    assert calls == []  # no download was attempted


def test_fv_images_decode_like_natural_images(tmp_path):
    """A 16-bit PNG given as --fv is scaled to [0, 1] like a natural image (PIL alone clips it to white)."""
    import numpy as np
    from PIL import Image

    from fvsanity.generate import load_fvs

    a = np.full((8, 8), 32896, dtype=np.uint16)  # 32896 / 65535 = 128 / 255
    Image.fromarray(a).save(tmp_path / "fv.png")
    lm = tiny_model()
    units, images = load_fvs(str(tmp_path / "fv.png"), ["fc:0"], lm)
    assert images.shape == (1, 1, 3, 8, 8)
    assert torch.allclose(images, torch.full_like(images, 128 / 255))
