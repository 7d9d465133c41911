"""An FV, a natural image's activations and a unit's check numbers depend on their own inputs and
settings only: never on what shares their batch, how many seeds or units are rendered together,
their order, a resume, or a rank.

Why these tests use real weights, several optimization steps and the machine's own thread count:
CPU kernels round differently for other batch shapes (~2e-7 in an input gradient; with one
thread the split of work, and so the difference, can vanish), and Adam steps amplify it (32
steps on ResNet-20 turn it into objective 25.0 vs 38.8). The comparisons are bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch

from fvsanity.activations import collect, pad_batch
from fvsanity.generate import render
from fvsanity.generate.render import plan_chunks, settings_hash

STEPS = 12


@pytest.fixture(scope="module")
def resnet20():
    from fvsanity.models import load_model

    return load_model("cifar10-resnet20")


def _row(res, unit: str, seed: int):
    i = [str(u) for u in res.units].index(unit)
    j = list(res.seeds).index(seed)
    return res.images[i, j], res.final[i, j], res.traces[i, j], res.activations[i][j]


@pytest.fixture(scope="module")
def alone(resnet20):
    return render(resnet20, ["linear:1"], 5, steps=STEPS, progress=False)


@pytest.mark.parametrize(
    "units,seeds",
    [
        (["linear:2", "linear:1"], 5),  # beside another unit, second row
        (["linear:1"], 8),  # more seeds in flight
        (["linear:1"], [4, 0, 2]),  # another order and a subset
        (["layer3.2:7", "linear:1", "linear:5"], [0, 3]),  # three units, other layers, two seeds
        (["layer1.0:2", "layer2.1:7", "layer3.2:7", "linear:1", "linear:5"], 3),  # linear:1 at another position
    ],
)
def test_fv_is_the_same_whatever_shares_its_batch(resnet20, alone, units, seeds):
    res = render(resnet20, units, seeds, steps=STEPS, progress=False)
    for s in (seeds if isinstance(seeds, list) else range(min(seeds, 5))):
        got, ref = _row(res, "linear:1", s), _row(alone, "linear:1", s)
        for a, b in zip(got, ref):
            assert torch.equal(a, b), (units, seeds, s)  # image, final objective, trace, activations
    assert res.settings_hash == alone.settings_hash


def test_fv_compute_width_is_recorded_and_hashed(resnet20, alone):
    """A different compute width is a different FV (other rounding): recorded and hashed, so a
    cache or a resumed audit never mixes the two."""
    other = render(resnet20, ["linear:1"], 5, steps=2, batch_size=3, progress=False)
    assert alone.settings["batch_size"] == 8 and other.settings["batch_size"] == 3
    same_but_width = dict(alone.settings, steps=2)
    assert settings_hash(same_but_width) != other.settings_hash


def test_chunks_have_one_shape():
    chunks = plan_chunks(2, [9, 0, 3], width=4)
    assert chunks == [[(0, 9, 0), (0, 0, 1), (0, 3, 2), (1, 9, 0)], [(1, 0, 1), (1, 3, 2), (1, 3, None), (1, 3, None)]]
    # the diversity term couples a row's seeds: one chunk per row, its seeds then padding
    assert plan_chunks(1, [5, 2], width=4, coupled=True) == [[(0, 5, 0), (0, 2, 1), (0, 2, None), (0, 2, None)]]
    assert plan_chunks(1, [5, 2, 7], width=2, coupled=True) == [[(0, 5, 0), (0, 2, 1), (0, 7, 2)]]


def test_position_in_the_batch_does_not_matter_at_imagenet_size(imagenet_root):
    """SqueezeNet at 227 px (a canvas whose per-image size is no multiple of the vector width):
    the same unit rendered first in its batch or sixth, beside other units, is bit-identical."""
    from fvsanity.models import load_model

    lm = load_model("imagenet-squeezenet")
    a = render(lm, ["classifier.1:7"], [0], steps=3, progress=False)
    b = render(lm, ["features.12:3", "classifier.1:9", "classifier.1:7"], [1, 0], steps=3, progress=False)
    for x, y in zip(_row(a, "classifier.1:7", 0), _row(b, "classifier.1:7", 0)):
        assert torch.equal(x, y)


def test_pad_batch_repeats_the_last_row():
    x = torch.arange(6.0).view(3, 2)
    assert torch.equal(pad_batch(x, 5), torch.tensor([[0.0, 1], [2, 3], [4, 5], [4, 5], [4, 5]]))
    assert pad_batch(x, 2) is x


def test_natural_activations_do_not_depend_on_the_batch_tail(resnet20, data_root):
    """Image i's pooled activations are the same whether the folder has 11 or 16 images (a
    ``--limit``, an added file): every forward is padded to the batch size."""
    from fvsanity.data import load_images

    nat = load_images(data_root / "cifar10-test", resnet20, limit=16)
    x = nat.decode(list(range(16)))
    layers = ["layer1.0", "layer3.2", "linear"]
    full = collect(resnet20, x, layers, batch_size=8)
    part = collect(resnet20, x[:11], layers, batch_size=8)
    for k in layers:
        assert torch.equal(full[k][:11], part[k]), k


def _units(out):
    res = {}
    for d in sorted((out / "units").iterdir()):
        if (d / "unit.json").is_file():
            rec = json.loads((d / "unit.json").read_text())
            for k in ("seconds", "finished_at"):
                rec.pop(k, None)
            res[d.name] = rec
    return res


def test_audit_numbers_do_not_depend_on_units_per_render_call(tmp_path, data_root):
    """``audit --fv-batch 1`` and ``--fv-batch 3`` (units rendered together) give the same
    unit.json for every unit, bit for bit, at enough steps for a difference to show."""
    from fvsanity import cli

    args = ["audit", "--model", "cifar10-resnet20", "--units", "linear:1,linear:4,layer3.2:5",
            "--images", str(data_root / "cifar10-test"), "--steps", str(STEPS), "--seeds", "2", "--limit", "60",
            "--top-k", "4", "--n-other", "12", "--n-boot", "10", "--n-perm", "10", "--no-progress",
            "--device", "cpu"]
    outs = {}
    for fvb in (1, 3):
        out = tmp_path / f"fvb{fvb}"
        assert cli.main(args + ["--fv-batch", str(fvb), "--out", str(out)]) == 0
        outs[fvb] = _units(out)
    assert sorted(outs[1]) == sorted(outs[3]) and len(outs[1]) == 3
    for uid in outs[1]:
        assert outs[1][uid] == outs[3][uid], uid
