"""Path-level attribution (EAP / EAP-IG), real patching, circuit statistics, attribution graph."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from fvsanity.compare.attribution import (
    AttributionError,
    EdgeAttribution,
    LayerEdges,
    conv_edge_scores,
    edge_attribution,
    edge_layers,
    node_attribution,
    patch_edges,
    reference_images,
)
from fvsanity.compare.circuits import (
    STATISTICS,
    circuit_overlap,
    circuit_stats,
    compare_circuits,
    shared_mass,
    spearman,
    top_k_jaccard,
    weighted_jaccard,
)
from fvsanity.errors import FVSanityError
from fvsanity.hooks import count_hooks
from fvsanity.models import LoadedModel, Preprocess, prepare_model
from fvsanity.units import Unit, parse_unit

ROOT = Path(__file__).resolve().parents[1]


def _double(lm: LoadedModel) -> LoadedModel:
    """The model in float64. units.layer_shapes probes with a float32 image, so fill its shape
    cache while the model is still float32 (see the report: layer_shapes should use the model's dtype)."""
    first = next(n for n, m in lm.model.named_modules() if isinstance(m, nn.Conv2d))
    parse_unit(f"{first}:0", lm)
    lm.model.double()
    return lm


def _wrap(net: nn.Module, size: int) -> LoadedModel:
    lm = LoadedModel(
        name="hand",
        model=prepare_model(net),
        preprocess=Preprocess(size=(size, size), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
        block_layers=[],
        output_layer="",
    )
    return _double(lm)


# ---------------------------------------------------------------------------- hand-built models
class Hand(nn.Module):
    """conv1 (1x1, 3->2, no bias) -> ReLU -> conv2 (1x1, 2->1, bias 0.5); weights set by hand."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 2, 1, bias=False)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(2, 1, 1)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [2.0, 1.0, 0.0]]).view(2, 3, 1, 1))
            self.conv2.weight.copy_(torch.tensor([[1.0, -2.0]]).view(1, 2, 1, 1))
            self.conv2.bias.fill_(0.5)

    def forward(self, x):
        return self.conv2(self.relu(self.conv1(x)))


class LinearRes(nn.Module):
    """No nonlinearity: conv (stride 2) -> BN -> grouped dilated conv + identity shortcut -> pool -> fc."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2)
        self.shortcut = nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            self.bn1.running_mean.copy_(torch.randn(4, generator=g))
            self.bn1.running_var.copy_(torch.rand(4, generator=g) + 0.5)

    def forward(self, x):
        h = self.bn1(self.conv1(x))
        y = self.conv2(h) + self.shortcut(h)
        return self.fc(torch.flatten(self.pool(y), 1))


class TinyFire(nn.Module):
    """SqueezeNet-like: squeeze -> ReLU -> [expand1x1 | expand3x3] concatenated -> ReLU -> 1x1 classifier."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.squeeze = nn.Conv2d(3, 2, 1)
        self.expand1x1 = nn.Conv2d(2, 3, 1)
        self.expand3x3 = nn.Conv2d(2, 2, 3, padding=1)
        self.classifier = nn.Conv2d(5, 4, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.7)

    def forward(self, x):
        s = F.relu(self.squeeze(x))
        y = F.relu(torch.cat([self.expand1x1(s), self.expand3x3(s)], 1))
        return self.classifier(y)


# ---------------------------------------------------------------------------- known answers
def test_hand_built_edge_scores_match_hand_computation():
    lm = _wrap(Hand(), 1)
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).view(1, 3, 1, 1)
    # z1 = W1 x = [-2, 4] -> relu [0, 4]; m = 1*0 - 2*4 + 0.5 = -7.5; reference 0 -> m_ref = 0.5
    # conv2 edges: g = 1, delta = [0, -4]: S = W2 * delta = [0, 8]
    # conv1 edges: g1 = W2 * relu'(z1) = [0, -2], delta = -x: S[1] = W1[1] * (-x) * (-2) = [4, 4, 0]
    for method in ("eap", "eap-ig"):
        ea = edge_attribution(lm, "conv2:0", x, method=method, reference="zeros")
        assert ea.metric_clean.tolist() == [-7.5] and ea.metric_ref.tolist() == [0.5]
        torch.testing.assert_close(ea.layer("conv2").scores[0], torch.tensor([[0.0, 8.0]], dtype=torch.float64))
        torch.testing.assert_close(
            ea.layer("conv1").scores[0], torch.tensor([[0.0, 0.0, 0.0], [4.0, 4.0, 0.0]], dtype=torch.float64)
        )
        assert ea.layer("conv1").mask.tolist() == [[True, False, True], [True, True, False]]
        # node attribution of conv2's input (a cut): (a_c - a_r) * g = [0, 4 * -2], sums to m_c - m_r
        torch.testing.assert_close(ea.layer("conv2").node_in[0], torch.tensor([0.0, -8.0], dtype=torch.float64))
    # real patching: edge 0->1 etc. as the linear estimate, and edge 2->0 revives a dead ReLU:
    # z1_0 = -2 + 3 = 1 -> m = -6.5, a change of +1 that EAP (gradient 0 there) cannot see
    pe = patch_edges(lm, "conv2:0", "conv1", [(1, 0), (1, 1), (0, 0), (0, 2), (1, 2)], x, "zeros")
    assert pe[:, 0].tolist() == [4.0, 4.0, 0.0, 1.0, 0.0]
    assert patch_edges(lm, "conv2:0", "conv2", [(0, 1), (0, 0)], x, "zeros")[:, 0].tolist() == [8.0, 0.0]


def test_conv_edge_scores_match_naive_per_edge_convolution_and_sum_identity():
    g = torch.Generator().manual_seed(0)
    n, c_in, c_out, groups = 3, 4, 6, 2
    w = torch.randn(c_out, c_in // groups, 3, 3, generator=g, dtype=torch.float64)
    delta = torch.randn(n, c_in, 9, 9, generator=g, dtype=torch.float64)
    kw = dict(stride=2, padding=2, dilation=2)
    z = F.conv2d(delta, w, None, groups=groups, **kw)
    grad = torch.randn(z.shape, generator=g, dtype=torch.float64)
    s = conv_edge_scores(delta, grad, w, groups=groups, **kw)
    assert s.shape == (n, c_out, c_in)
    naive = torch.zeros(n, c_out, c_in, dtype=torch.float64)
    cin_g, cout_g = c_in // groups, c_out // groups
    for v in range(c_out):
        grp = v // cout_g
        for u in range(grp * cin_g, (grp + 1) * cin_g):
            contrib = F.conv2d(delta[:, u : u + 1], w[v : v + 1, u - grp * cin_g : u - grp * cin_g + 1], None, **kw)
            naive[:, v, u] = (contrib[:, 0] * grad[:, v]).sum((1, 2))
    torch.testing.assert_close(s, naive)
    # the scores of a layer sum to <g, conv(delta)> per image (no bias)
    torch.testing.assert_close(s.sum((1, 2)), (grad * z).sum((1, 2, 3)))


def test_layer_scores_sum_to_grad_dot_conv_delta_in_a_real_run(tiny):
    lm = _double(tiny)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ea = edge_attribution(lm, "fc:2", x, method="eap", reference="zeros")
    # recompute <g, conv2(delta)> independently with autograd on the conv2 output
    store = {}
    h = lm.model.conv2.register_forward_hook(lambda m, i, o: store.update(z=o, a=i[0]))
    try:
        xr = torch.zeros_like(x)
        lm(xr)
        a_ref = store["a"].detach()
        out = lm(x.clone().requires_grad_(True))
        (g,) = torch.autograd.grad(out[:, 2].sum(), [store["z"]])
        a_clean = store["a"].detach()
    finally:
        h.remove()
    conv = lm.model.conv2
    ident = (g * F.conv2d(a_ref - a_clean, conv.weight, None, conv.stride, conv.padding)).sum((1, 2, 3))
    torch.testing.assert_close(ea.layer("conv2").scores.sum((1, 2)), ident)
    assert count_hooks(lm.model) == 0


def test_linear_network_eap_equals_exact_patching_for_every_edge():
    lm = _wrap(LinearRes(), 8)
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert edge_layers(lm, "fc:1") == ["conv1", "conv2", "shortcut", "fc"]
    eap = edge_attribution(lm, "fc:1", x, method="eap")
    eap_ig = edge_attribution(lm, "fc:1", x, method="eap-ig", steps=3)
    assert eap.layer("shortcut").input_from == "conv2" and eap.layer("shortcut").kind == "skip"
    assert eap.layer("fc").rows == (1,)
    for lay in eap.layers:
        v_n, u_n = lay.scores.shape[1:]
        edges = [(lay.rows[r], u) for r in range(v_n) for u in range(u_n)]
        truth = patch_edges(lm, "fc:1", lay.name, edges, x)  # [E, N]
        est = lay.scores.permute(1, 2, 0).reshape(len(edges), -1)
        torch.testing.assert_close(est, truth, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(eap_ig.layer(lay.name).scores, lay.scores, rtol=1e-9, atol=1e-11)
        # structurally absent edges (other group of the grouped conv) score exactly zero
        assert bool((lay.scores[:, ~lay.mask] == 0).all())
    # skip edges: identity c -> c only
    assert eap.layer("shortcut").mask.equal(torch.eye(4, dtype=torch.bool))
    assert count_hooks(lm.model) == 0


def test_concatenated_branches_share_input_and_stack_outputs():
    from fvsanity.report.attribution_graph import graph_columns

    lm = _wrap(TinyFire(), 6)
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ea = edge_attribution(lm, "classifier:2", x, method="eap")
    assert ea.names == ["squeeze", "expand1x1", "expand3x3", "classifier"]
    assert ea.layer("expand3x3").input_from == "expand1x1"
    cols, place = graph_columns(ea.layers)
    assert [c["size"] for c in cols] == [3, 2, 5, 3]
    assert place[1]["in"] == place[2]["in"] == (1, 0)
    assert place[1]["out"] == (2, 0) and place[2]["out"] == (2, 3)  # expand3x3 channel c = concat 3 + c
    assert place[3]["in"] == (2, 0)
    # a handful of edges against real patching: first-order estimate, same sign and size here
    lay = ea.layer("expand3x3")
    truth = patch_edges(lm, "classifier:2", "expand3x3", [(0, 0), (1, 1)], x)
    assert torch.isfinite(truth).all() and torch.isfinite(lay.scores).all()


def test_ig_node_attribution_is_complete_at_a_cut(tiny):
    lm = _double(tiny)
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = reference_images(lm, x, "mean")
    with torch.no_grad():
        diff = lm(x)[:, 0] - lm(ref)[:, 0]
    na = node_attribution(lm, "fc:0", x, ["relu2", "conv3"], method="ig", steps=64)
    for name in ("relu2", "conv3"):  # both are cuts of TinyCNN
        assert na[name].shape == (4, 16)
        torch.testing.assert_close(na[name].sum(1), diff, rtol=2e-2, atol=2e-3)
    # the unit's own layer: exactly complete (the metric is linear in it)
    own = node_attribution(lm, "fc:0", x, ["fc"], method="ig", steps=2)["fc"]
    torch.testing.assert_close(own.sum(1), diff)
    # input side of a module works too
    inp = node_attribution(lm, "fc:0", x, ["conv3"], method="ig", steps=64, where="input")["conv3"]
    torch.testing.assert_close(inp.sum(1), diff, rtol=2e-2, atol=2e-3)
    assert count_hooks(lm.model) == 0


def test_zero_activations_give_finite_scores_and_all_zero_raises(tiny):
    lm = tiny
    black = torch.zeros(2, 3, 16, 16)
    ea = edge_attribution(lm, "fc:1", black, method="eap-ig", steps=4, reference="mean")
    for lay in ea.layers:
        assert torch.isfinite(lay.scores).all() and torch.isfinite(lay.node_in).all()
    na = node_attribution(lm, "fc:1", black, ["relu3"], method="ig", steps=4, reference="zeros")
    assert torch.isfinite(na["relu3"]).all() and float(na["relu3"].abs().sum()) == 0.0
    # clean == reference: every score is zero -> refuse (a metric with a vanishing gradient would too)
    with pytest.raises(AttributionError, match="all edge scores are zero"):
        edge_attribution(lm, "fc:1", black, method="eap", reference="zeros")
    # a dead layer (ReLU never fires) kills every gradient upstream of it
    with torch.no_grad():
        lm.model.conv3.bias.fill_(-1e4)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(AttributionError, match="all edge scores are zero"):
        edge_attribution(lm, "fc:1", x, method="eap")
    ok = edge_attribution(lm, "fc:1", x, method="eap", allow_zero=True)
    assert all(torch.isfinite(lay.scores).all() for lay in ok.layers)
    assert count_hooks(lm.model) == 0


def test_hooks_removed_when_a_call_raises(tiny):
    lm = tiny
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def boom(*_a, **_k):
        raise RuntimeError("boom")

    lm.model.conv3.forward = boom
    try:
        for call in (
            lambda: edge_attribution(lm, "fc:1", x, layers=["conv1", "conv2", "fc"]),
            lambda: node_attribution(lm, "fc:1", x, ["relu2"]),
            lambda: patch_edges(lm, "fc:1", "conv2", [(0, 0)], x),
        ):
            with pytest.raises(RuntimeError, match="boom"):
                call()
            assert count_hooks(lm.model) == 0
    finally:
        del lm.model.conv3.forward
    # and after normal calls
    edge_attribution(lm, "fc:1", x, method="eap")
    assert count_hooks(lm.model) == 0


def test_bad_input_gives_one_line_errors(tiny):
    x = torch.rand(2, 3, 16, 16)
    cases = [
        dict(method="nope"),
        dict(reference="nope"),
        dict(layers=["relu1"]),
        dict(layers=["fc", "bogus_layer"]),
        dict(reference=torch.rand(3, 3, 16, 16)),
    ]
    for kw in cases:
        with pytest.raises(FVSanityError) as e:
            edge_attribution(tiny, "conv2:1", x, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(FVSanityError, match="does not run before"):
        edge_attribution(tiny, "conv2:1", x, layers=["conv3"])
    with pytest.raises(FVSanityError, match="out of range"):
        patch_edges(tiny, "fc:1", "conv2", [(99, 0)], x)
    with pytest.raises(FVSanityError):
        edge_attribution(tiny, "fc:1", torch.rand(3, 16, 16))


def test_reference_images(tiny):
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    mean = reference_images(tiny, x, "mean")
    assert mean.shape == x.shape and torch.allclose(tiny.preprocess(mean), torch.zeros(1))
    blur = reference_images(tiny, x, "blur")
    assert blur.shape == x.shape and blur.std() < x.std()
    torch.testing.assert_close(blur.mean((2, 3)), x.mean((2, 3)), atol=0.03, rtol=0)
    assert reference_images(tiny, x, torch.ones(3, 16, 16)).shape == x.shape


def test_real_resnet20_last_layer_matches_patching_and_shortcut_maps(data_root):
    from fvsanity.models import load_model

    lm = load_model("cifar10-resnet20")
    from PIL import Image

    files = sorted((data_root / "cifar10-test" / "cat").glob("*.jpg"))[:2]
    x = torch.stack([lm.preprocess.load_pil(Image.open(f)) for f in files])
    ea = edge_attribution(lm, "linear:3", x, layers=1, method="eap")
    assert ea.names == ["linear"]
    lay = ea.layer("linear")
    truth = patch_edges(lm, "linear:3", "linear", [(3, u) for u in range(64)], x)
    torch.testing.assert_close(lay.scores[:, 0].T, truth, rtol=1e-4, atol=1e-5)
    # the shortcut runs after bn2: asking for it with a unit on bn2 is refused
    with pytest.raises(AttributionError, match="does not run before"):
        edge_attribution(lm, "layer2.0.bn2:0", x, layers=["layer2.0"], method="eap")
    # option-A shortcut of layer2.0: output channel v copies input channel v - 8 (8 <= v < 24)
    full = edge_attribution(lm, "linear:3", x, layers=["layer2.0"], method="eap")
    assert full.names == ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.shortcut"]
    sc = full.layer("layer2.0.shortcut").mask
    want = torch.zeros(32, 16, dtype=torch.bool)
    for v in range(8, 24):
        want[v, v - 8] = True
    assert sc.equal(want)


# ---------------------------------------------------------------------------- circuit statistics
def test_circuit_stats_known_answers():
    a = torch.randn(40, generator=torch.Generator().manual_seed(0))
    same = circuit_stats(a, a)
    assert all(same[k] == pytest.approx(1.0) for k in STATISTICS if k != "shared_mass")
    assert same["shared_mass"] == pytest.approx(float(a.abs().max() / a.abs().sum()))
    d = circuit_stats(torch.tensor([1.0, 2.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 3.0, 4.0]))
    for k in ("jaccard_top0p1pct", "jaccard_top1pct", "jaccard_top5pct", "weighted_jaccard", "shared_mass"):
        assert d[k] == 0.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1, 1], [1, 2, 3, 4]) == 0.0  # constant: defined as 0, not NaN
    assert top_k_jaccard([5, 4, 3, 2, 1, 0], [5, 0, 3, 0, 0, 0], 3) == pytest.approx(2 / 3)  # zeros never selected
    assert top_k_jaccard([0, 0], [0, 0], 1) == 1.0
    assert weighted_jaccard([1, 1], [1, 3]) == pytest.approx(0.75 / 1.25)
    assert weighted_jaccard([0, 0], [0, 0]) == 1.0 and weighted_jaccard([0, 0], [0, 1]) == 0.0
    assert shared_mass([1, 2, 3, 4], [0, 0, 0, 9]) == pytest.approx(0.4)
    assert shared_mass([0, 0, 0, 0], [0, 0, 0, 9]) == 0.0
    ties = np.array([[3.0, 1.0, 3.0, 0.0, 0.0, 2.0], [1, 1, 1, 1, 1, 1]])
    assert spearman(ties[0], ties[0][::-1]) == pytest.approx(spearmanr(ties[0], ties[0][::-1])[0], abs=1e-12)
    m = torch.tensor([True, False, True, True])
    assert circuit_stats([1.0, 99.0, 2.0, 3.0], [1.0, -5.0, 2.0, 3.0], mask=m)["spearman"] == pytest.approx(1.0)


def _synthetic(scores: torch.Tensor) -> EdgeAttribution:
    n, v, u = scores.shape
    lay = LayerEdges(
        name="conv", kind="conv", rows=tuple(range(v)), in_channels=u, scores=scores,
        mask=torch.ones(v, u, dtype=torch.bool), node_in=torch.zeros(n, u), node_out=torch.zeros(n, v),
    )
    return EdgeAttribution(Unit("x", 0), "eap", "mean", 1, (lay,), torch.zeros(n), torch.zeros(n))


def test_compare_circuits_calibration_and_permutation_p():
    g = torch.Generator().manual_seed(0)
    base_nat, base_oth = torch.randn(10, 20, generator=g), torch.randn(10, 20, generator=g)

    def group(base, n):
        return base + 0.8 * torch.randn(n, 10, 20, generator=g)

    nat, oth = _synthetic(group(base_nat, 16)), _synthetic(group(base_oth, 16))
    like_nat = compare_circuits(_synthetic(group(base_nat, 4)), nat, oth, n_perm=200, n_boot=100, generator=1)
    like_oth = compare_circuits(_synthetic(group(base_oth, 4)), nat, oth, n_perm=200, n_boot=100, generator=1)
    a, b = like_nat.layers[0], like_oth.layers[0]
    assert 0.6 < a.calibrated < 1.4 and a.p_value < 0.02 and a.ci_low < a.calibrated < a.ci_high
    assert -0.4 < b.calibrated < 0.4 and b.p_value > 0.05
    assert a.fv_vs_natural["spearman"] > a.null_other["spearman"]
    assert a.group_size == 4 and a.n_edges == 200
    j = like_nat.to_json()
    for key in ("name", "jaccard_top1pct", "spearman", "shared_mass", "null_same", "null_other",
                "calibrated", "ci_low", "ci_high", "p_value", "p_holm"):
        assert key in j["layers"][0]
    json.dumps(j)


def test_circuit_overlap_end_to_end_tiny(tiny, tmp_path):
    from fvsanity.report.attribution_graph import plot_attribution_graph, plot_overlap_profile

    g = torch.Generator().manual_seed(0)
    fv, nat, oth = (torch.rand(n, 3, 16, 16, generator=g) for n in (2, 6, 6))
    co = circuit_overlap(tiny, "fc:1", fv, nat, oth, steps=4, n_boot=20, n_perm=50, n_splits=5, generator=0)
    j = co.to_json()
    assert [la["name"] for la in j["layers"]] == ["conv1", "conv2", "conv3", "fc"]
    for la in co.layers:
        assert 0.0 <= la.p_value <= la.p_holm <= 1.0
        assert all(math.isfinite(v) for v in la.fv_vs_natural.values())
    fig = plot_attribution_graph(co.fv, co.natural, top=4, path=tmp_path / "graph.png")
    assert len(fig.axes) == 2 and (tmp_path / "graph.png").stat().st_size > 1000
    plot_overlap_profile([co, co], path=tmp_path / "profile.png")
    assert (tmp_path / "profile.png").is_file()
    assert count_hooks(tiny.model) == 0


def test_experiment_smoke(experiment_smoke):
    """--smoke without --out: a fresh temporary folder, figures/ untouched (the fixture checks)."""
    out = experiment_smoke("circuit_overlap")
    res = json.loads((out / "results.json").read_text())
    assert res["units"] and all("layers" in u["references"]["mean"] for u in res["units"])
    assert (out / "attribution_graph.png").is_file() and (out / "overlap_profile.png").is_file()
    assert (out / "cache").is_dir()  # the smoke run's cache stays in its own folder


def test_low_precision_model_scores_in_float32(tiny):
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = edge_attribution(tiny, "fc:1", x, method="eap")
    parse_unit("fc:1", tiny)  # fill the shape cache in float32 (see _double)
    tiny.model.to(torch.bfloat16)
    low = edge_attribution(tiny, "fc:1", x, method="eap")
    for a, b in zip(ref.layers, low.layers, strict=True):
        assert b.scores.dtype == torch.float32 and torch.isfinite(b.scores).all()
        scale = float(a.scores.abs().max())
        assert float((a.scores - b.scores).abs().max()) < 0.1 * scale
