"""fvsanity.activations: streamed pooled activations match a hand-written forward; hooks go away."""

from __future__ import annotations

import pytest
import torch

from fvsanity.activations import (
    collect,
    collect_with_responses,
    pool_activation,
    top_k_exemplars,
    unit_response,
)
from fvsanity.data import from_tensor
from fvsanity.errors import FVSanityError
from fvsanity.hooks import count_hooks
from fvsanity.units import Unit, parse_unit


def _manual(lm, x):
    """TinyCNN's forward written out by hand: {layer: full output}."""
    m = lm.model
    h = lm.preprocess(x)
    out = {}
    out["relu1"] = m.relu1(m.conv1(h))
    h = m.pool1(out["relu1"])
    out["relu2"] = m.relu2(m.conv2(h))
    h = m.pool2(out["relu2"])
    out["relu3"] = m.relu3(m.conv3(h))
    out["fc"] = m.fc(torch.flatten(m.gap(out["relu3"]), 1))
    return out


@pytest.fixture
def images():
    return torch.rand(11, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_collect_equals_manual_forward(tiny, images):
    with torch.no_grad():
        ref = _manual(tiny, images)
    layers = ["relu1", "relu2", "relu3", "fc"]
    for pool in ("mean", "max", None):
        got = collect(tiny, images, layers, pool=pool, batch_size=4)
        for name in layers:
            want = pool_activation(ref[name], pool)
            assert got[name].shape == want.shape
            torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6)
    got = collect(tiny, images, ["relu2"])
    assert got["relu2"].shape == (11, 16)
    torch.testing.assert_close(got["relu2"], ref["relu2"].mean((2, 3)), rtol=1e-5, atol=1e-6)
    assert count_hooks(tiny.model) == 0


def test_batch_size_and_input_kind_do_not_change_results(tiny, images):
    a = collect(tiny, images, ["relu3", "fc"], batch_size=1)
    b = collect(tiny, images, ["relu3", "fc"], batch_size=64)
    c = collect(tiny, from_tensor(images), ["relu3", "fc"], batch_size=3)
    d = collect(tiny, iter([images[:5], images[5:]]), ["relu3", "fc"])
    for name in ("relu3", "fc"):
        torch.testing.assert_close(a[name], b[name])
        torch.testing.assert_close(a[name], c[name])
        torch.testing.assert_close(a[name], d[name])


def test_forward_stops_after_deepest_layer(tiny, images):
    collect(tiny, images[:1], ["relu1"])  # layer shapes get inferred (one full forward) and cached
    calls = []
    h = tiny.model.fc.register_forward_hook(lambda *_: calls.append(1))
    try:
        collect(tiny, images, ["relu1", "relu2"], batch_size=4)
        assert calls == []  # fc never ran
        collect(tiny, images, ["relu1", "fc"], batch_size=4)
        assert len(calls) == 3
    finally:
        h.remove()


def test_hooks_removed_even_on_exception(tiny, images):
    def bad_batches():
        yield images[:4]
        yield torch.rand(2, 3, 16)  # wrong rank: the forward raises mid-stream

    before = count_hooks(tiny.model)
    with pytest.raises(Exception):  # noqa: B017 - whatever the forward raises
        collect(tiny, bad_batches(), ["relu1", "fc"])
    assert count_hooks(tiny.model) == before == 0
    with pytest.raises(FVSanityError, match="unknown pool"):
        collect(tiny, images, ["relu1"], pool="median")
    assert count_hooks(tiny.model) == 0


def test_unit_responses_and_top_k(tiny, images):
    with torch.no_grad():
        ref = _manual(tiny, images)
    units = [parse_unit("relu2:3", tiny), parse_unit("relu1:2@5,6", tiny), parse_unit("fc:1", tiny)]
    vec = torch.randn(16, generator=torch.Generator().manual_seed(2))
    units.append(Unit("relu3", direction=vec))
    acts, resp = collect_with_responses(tiny, images, ["relu1"], units, batch_size=4)
    want = torch.stack(
        [
            ref["relu2"][:, 3].mean((1, 2)),
            ref["relu1"][:, 2, 5, 6],
            ref["fc"][:, 1],
            ref["relu3"].mean((2, 3)) @ vec,
        ],
        1,
    )
    torch.testing.assert_close(resp, want, rtol=1e-5, atol=1e-6)
    assert set(acts) == {"relu1"}
    for j, u in enumerate(units):
        idx, val = top_k_exemplars(tiny, u, images, k=4, batch_size=3)
        order = torch.argsort(want[:, j], descending=True)[:4]
        assert idx.tolist() == order.tolist()
        torch.testing.assert_close(val, want[order, j], rtol=1e-5, atol=1e-6)
    # direct call on a layer output
    torch.testing.assert_close(unit_response(ref["relu2"], units[0]), want[:, 0])


def test_top_k_ties_and_range(tiny):
    resp = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0])
    idx, val = top_k_exemplars(tiny, "fc:0", None, k=3, responses=resp)
    assert idx.tolist() == [1, 2, 4] and val.tolist() == [3.0, 3.0, 3.0]
    with pytest.raises(FVSanityError, match="valid: 1..5"):
        top_k_exemplars(tiny, "fc:0", None, k=6, responses=resp)


def test_real_squeezenet_all_blocks_small_batch(imagenet_root):
    from fvsanity.data import load_images
    from fvsanity.models import load_model

    lm = load_model("imagenet-squeezenet")
    nat = load_images(imagenet_root / "imagenet-samples", lm, limit=4, seed=0)
    acts = collect(lm, nat, lm.block_layers, batch_size=2)
    assert list(acts) == lm.block_layers
    assert acts["classifier.1"].shape == (4, 1000) and acts["features.12"].shape == (4, 512)
    assert all(torch.isfinite(a).all() for a in acts.values())
    with torch.no_grad():
        logits = lm(nat.load().images)
    # classifier.1 is pre-ReLU z; the logits are mean(relu(z)) over space, so elementwise
    # relu(max z) >= logits >= mean z
    mx = collect(lm, nat, ["classifier.1"], pool="max")["classifier.1"]
    assert (mx.clamp_min(0) + 1e-3 >= logits).all() and (logits + 1e-3 >= acts["classifier.1"]).all()
    assert count_hooks(lm.model) == 0
