"""Layer layouts (conv, tokens, vector) and timm vision transformers end to end.

Known answers for :func:`fvsanity.layouts.pool`, ``unit_values`` and ``to_map`` on constructed
tensors; layouts inferred on tiny random-weight timm ViTs; ``fvsanity visualize``, ``check`` and
``audit`` through the CLI on a tiny ViT registered here; the issue's traceback (a 224-px ViT whose
PatchEmbed refused the 238-px transformed canvas).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from fvsanity.cli import main
from fvsanity.errors import FVSanityError, UnitError
from fvsanity.layouts import LayerInfo, Layout, infer_layout, pool, to_map, unit_values
from fvsanity.models import CIFAR10_CLASSES, list_models, register_model, timm_loaded
from fvsanity.models.preprocess import CIFAR10
from fvsanity.units import Unit, parse_unit

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

TINY_VIT = "test-layouts-tiny-vit"


def _tiny_vit_net(seed: int = 0, **kw) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10) | kw
        return VisionTransformer(**args)


def _tiny_vit(seed: int = 0):
    return timm_loaded(_tiny_vit_net(seed), TINY_VIT, class_names=CIFAR10_CLASSES, preprocess=CIFAR10)


if TINY_VIT not in list_models():

    @register_model(TINY_VIT)
    def _registered_tiny_vit(pretrained: bool = True):
        """A random-weight 32-px ViT (4x4 patch grid of 8 px, D = 32, 2 blocks) with CIFAR-10
        classes and preprocessing, so the default CIFAR-10 images apply."""
        return _tiny_vit()


# ------------------------------------------------------------------------------ known answers
def test_conv_layout_known_answers():
    act = torch.arange(2 * 3 * 2 * 2, dtype=torch.float64).view(2, 3, 2, 2)
    lay = Layout("conv", channels=3, grid=(2, 2))
    # channel c of image b holds 12 b + 4 c + (0, 1, 2, 3)
    assert torch.equal(pool(act, lay), torch.tensor([[1.5, 5.5, 9.5], [13.5, 17.5, 21.5]], dtype=torch.float64))
    assert torch.equal(pool(act, lay, "max"), torch.tensor([[3.0, 7.0, 11.0], [15.0, 19.0, 23.0]], dtype=torch.float64))
    assert torch.equal(pool(act, lay, "sum"), 4 * pool(act, lay))
    assert to_map(act, lay) is act
    assert torch.equal(unit_values(act, Unit("l", 1), lay), torch.tensor([5.5, 17.5], dtype=torch.float64))
    assert torch.equal(unit_values(act, Unit("l", 2, y=1, x=0), lay), torch.tensor([10.0, 22.0], dtype=torch.float64))
    d = torch.tensor([1.0, 0.0, -1.0])
    assert torch.equal(unit_values(act, Unit("l", direction=d), lay), torch.tensor([-8.0, -8.0], dtype=torch.float64))


def test_tokens_layout_known_answers_prefix_excluded_grid_exact():
    b, prefix, h, w, d = 2, 2, 2, 3, 4
    n = prefix + h * w
    act = torch.arange(b * n * d, dtype=torch.float64).view(b, n, d)
    act[:, :prefix] = 1e6  # class/register tokens: must never enter pool, to_map or a neuron
    lay = Layout("tokens", channels=d, prefix_tokens=prefix, grid=(h, w))
    patches = act[:, prefix:]  # [B, 6, D]
    assert torch.equal(pool(act, lay), patches.mean(1))
    assert float(pool(act, lay).max()) < 1e3
    assert torch.equal(pool(act, lay, "max"), patches.amax(1))
    assert torch.equal(pool(act, lay, "sum", prefix=True), act.sum(1))
    m = to_map(act, lay)
    assert m.shape == (b, d, h, w)
    for yy in range(h):
        for xx in range(w):
            assert torch.equal(m[:, :, yy, xx], act[:, prefix + yy * w + xx, :])
    # neuron: channel 3 of the patch token at row 1, column 2 = token prefix + 1 * 3 + 2
    assert torch.equal(unit_values(act, Unit("l", 3, y=1, x=2), lay), act[:, prefix + 5, 3])
    assert torch.equal(unit_values(act, Unit("l", 1), lay), patches[:, :, 1].mean(1))
    v = torch.tensor([0.0, 1.0, 0.0, 2.0])
    assert torch.equal(unit_values(act, Unit("l", direction=v), lay), patches.mean(1) @ v.double())
    # the unit's own layout is used when none is passed
    assert torch.equal(unit_values(act, Unit("l", 3, y=1, x=2, layout=lay)), act[:, prefix + 5, 3])


def test_vector_layout_and_bad_input():
    act = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    lay = Layout("vector", channels=3)
    assert pool(act, lay) is act
    assert to_map(act, lay) is None
    assert torch.equal(unit_values(act, Unit("fc", 2), lay), torch.tensor([3.0, 6.0]))
    with pytest.raises(UnitError, match="no grid"):
        unit_values(act, Unit("fc", 2, y=0, x=0), lay)
    with pytest.raises(FVSanityError, match="unknown pool 'median'; valid: mean, max, sum"):
        pool(act, lay, "median")
    with pytest.raises(FVSanityError, match="unknown layout kind 'nhwc'; valid: conv, tokens, vector"):
        Layout("nhwc", channels=3)
    with pytest.raises(FVSanityError, match="tokens layout needs a 3-D output"):
        pool(torch.zeros(2, 3, 4, 4), Layout("tokens", channels=4, prefix_tokens=1, grid=(2, 2)))


# ------------------------------------------------------------------------------ inference
def test_infer_layout_on_timm_vits():
    from timm.models.deit import VisionTransformerDistilled

    lm = _tiny_vit()
    blk = lm.layer_info("blocks.1")
    assert isinstance(blk, LayerInfo) and blk.module_type == "Block" and blk.shape == (17, 32)
    assert blk.layout == Layout("tokens", channels=32, prefix_tokens=1, grid=(4, 4))
    assert lm.layer_info("blocks.0.mlp.fc1").layout == Layout("tokens", channels=128, prefix_tokens=1, grid=(4, 4))
    assert lm.layer_info("patch_embed").layout == Layout("tokens", channels=32, prefix_tokens=0, grid=(4, 4))
    assert lm.layer_info("patch_embed.proj").layout == Layout("conv", channels=32, grid=(4, 4))
    assert lm.layer_info("head").layout == Layout("vector", channels=10)
    assert lm.layers["norm"].layout.kind == "tokens" and list(lm.layers)[0] == "patch_embed"
    assert lm.block_layers == ["blocks.0", "blocks.1", "norm"] and lm.output_layer == "head"
    assert lm.config.fixed_input_size and lm.config.input_size == (32, 32)
    with pytest.raises(UnitError, match="unknown layer 'blocks.7'"):
        lm.layer_info("blocks.7")
    # register tokens and a distillation token count as prefix tokens
    reg = _tiny_vit_net(reg_tokens=2)
    assert infer_layout(reg, "blocks.0", (19, 32)) == Layout("tokens", channels=32, prefix_tokens=3, grid=(4, 4))
    deit = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    assert infer_layout(deit, "blocks.0", (18, 32)).prefix_tokens == 2
    # a 3-D output outside a ViT keeps the old reading (channel dim 1)
    assert infer_layout(torch.nn.Sequential(torch.nn.Conv1d(3, 5, 3)), "0", (5, 30)) == Layout("conv", channels=5)


def test_cnn_layouts_and_deprecated_shapes_alias():
    from fvsanity.testing import tiny_model
    from fvsanity.units import _shapes_for

    lm = tiny_model()
    info = lm.layer_info("relu2")
    assert info.layout.kind == "conv" and info.layout.channels == info.shape[0] and info.layout.grid == info.shape[1:]
    assert lm.layer_info("fc").layout == Layout("vector", channels=5)
    assert not lm.config.fixed_input_size
    assert _shapes_for(lm.model, lm.input_size, lm.preprocess) == {n: i.shape for n, i in lm.layers.items()}


def test_units_on_tokens_range_over_d_and_the_patch_grid():
    lm = _tiny_vit()
    u = parse_unit("blocks.1:31@3,3", lm)
    assert u.layout.kind == "tokens" and u.to_json()["layout"] == "tokens"
    with pytest.raises(UnitError, match=r"channel 32 out of range for 'blocks.1': valid 0..31"):
        parse_unit("blocks.1:32", lm)
    with pytest.raises(UnitError, match=r"valid patch grid y 0..3, x 0..3"):
        parse_unit("blocks.1:0@4,0", lm)
    with pytest.raises(UnitError, match="no spatial dims"):
        parse_unit("head:1@0,0", lm)


def test_objectives_and_activations_read_patch_tokens():
    from fvsanity.activations import collect_with_responses
    from fvsanity.generate.objectives import batched_unit_scores, for_unit
    from fvsanity.hooks import capture

    lm = _tiny_vit()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with capture(lm.model, ["blocks.1"], detach=True) as st:
        lm(x)
        a = st["blocks.1"]
    units = [parse_unit(s, lm) for s in ("blocks.1:5", "blocks.1:7@2,1", "blocks.1:9")]
    want = torch.stack([a[0, 1:, 5].mean(), a[1, 1 + 2 * 4 + 1, 7], a[2, 1:, 9].mean()])
    assert torch.allclose(batched_unit_scores({"blocks.1": a}, units), want, atol=1e-6)
    assert torch.allclose(for_unit(units[1])({"blocks.1": a}), a[:, 1 + 2 * 4 + 1, 7], atol=1e-6)
    acts, resp = collect_with_responses(lm, x, ["blocks.1"], units, batch_size=2)
    assert acts["blocks.1"].shape == (3, 32)
    assert torch.allclose(acts["blocks.1"], a[:, 1:].mean(1), atol=1e-6)
    assert torch.allclose(resp[:, 1], a[:, 1 + 2 * 4 + 1, 7], atol=1e-6)


# ------------------------------------------------------------------------------ fixed input size
def test_transforms_keep_a_fixed_input_size_and_size_is_checked():
    from fvsanity.generate import render
    from fvsanity.generate import transforms as T

    spec = T.TransformSpec.standard(224)
    img = torch.rand(2, 3, 224, 224)
    params = T.draw_params(spec, [0, 1], 1)[:, 0]
    assert T.apply(img, spec, params).shape[-1] == 238  # lucent's growth: what PatchEmbed refused
    assert T.apply(img, spec, params, out_size=(224, 224)).shape[-2:] == (224, 224)
    # no transform at all: the kept-size window is the image itself
    none = T.TransformSpec.none()
    assert torch.allclose(T.apply(img, none, T.draw_params(none, [0, 1], 1)[:, 0], out_size=(224, 224)), img, atol=1e-4)
    lm = _tiny_vit()
    with pytest.raises(FVSanityError, match=r"takes 32x32 px inputs only .*got --size 48x48: drop --size or pass 32"):
        render(lm, "blocks.1:0", steps=1, size=48, progress=False)
    # the slingshot's canvas: the same check, naming its own flag
    from fvsanity.fool.slingshot import _Shim

    with pytest.raises(FVSanityError, match=r"takes 32x32 px inputs only .*got --fv-size 48x48: drop --fv-size"):
        _Shim(lm, lm.model, 48)
    assert _Shim(lm, lm.model, 32).input_size == (32, 32)
    res = render(lm, ["blocks.1:0", "blocks.0:3@1,1"], seeds=2, steps=3, diversity=0.5, progress=False)
    assert res.images.shape == (2, 2, 3, 32, 32)
    assert bool(torch.isfinite(res.traces).all()) and bool(torch.isfinite(res.final).all())
    assert res.activations[0].shape == (2, 32)


# ------------------------------------------------------------------------------ attribution, fooling
def test_node_and_edge_attribution_on_a_vit():
    from fvsanity.compare.attribution import edge_attribution, node_attribution, reference_images
    from fvsanity.hooks import capture

    lm = _tiny_vit()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    u = parse_unit("blocks.1:3", lm)
    na = node_attribution(lm, u, x, ["blocks.0", "blocks.1"], steps=32)
    assert na["blocks.0"].shape == (3, 32) and na["blocks.1"].shape == (3, 32)
    ref = reference_images(lm, x, "mean")
    with capture(lm.model, ["blocks.1"], detach=True) as st:
        lm(x)
        m_clean = unit_values(st["blocks.1"], u)
        lm(ref)
        m_ref = unit_values(st["blocks.1"], u)
    # blocks.0 is a cut: IG is complete over all its tokens (class token included)
    assert torch.allclose(na["blocks.0"].sum(1), m_clean - m_ref, atol=5e-3)
    assert torch.allclose(na["blocks.1"].sum(1), m_clean - m_ref, atol=1e-5)
    ea = edge_attribution(lm, u, x, steps=2)
    names = [lay.name for lay in ea.layers]
    assert "blocks.1.mlp.fc1" in names and "blocks.1.mlp.fc2" in names
    fc2 = ea.layer("blocks.1.mlp.fc2")
    assert fc2.kind == "linear" and fc2.scores.shape == (3, 32, 128)
    assert bool(torch.isfinite(fc2.scores).all()) and float(fc2.scores.abs().sum()) > 0


def test_fooling_edits_refuse_a_token_layout_in_one_line():
    from fvsanity.fool.circuit import build_fooling_circuit
    from fvsanity.fool.routes import Route
    from fvsanity.fool.silent import build_silent_units

    lm = _tiny_vit()
    route = Route(parse_unit("blocks.1:3", lm), source=parse_unit("blocks.1:4", lm))
    msg = r"not defined on layer 'blocks.1' with a tokens layout; supported layouts: conv, vector"
    with pytest.raises(FVSanityError, match="fooling circuit.*" + msg):
        build_fooling_circuit(lm, torch.nn.Identity(), [route], threshold=0.0)
    with pytest.raises(FVSanityError, match="silent unit.*" + msg):
        build_silent_units(lm, [route], torch.rand(4, 3, 32, 32))


def test_fool_refuses_a_token_layer_before_any_training(tmp_path, capsys):
    """`fvsanity fool` on a ViT block stops at route planning (one line, exit 2), before the
    detector is trained: make_routes checks the layout first."""
    from fvsanity.fool.routes import make_routes

    lm = _tiny_vit()
    msg = r"fooling edit is not defined on layer 'blocks.1' with a tokens layout; supported layouts: conv, vector"
    with pytest.raises(FVSanityError, match=msg):
        make_routes(lm, "blocks.1:3", shift=1)
    out = tmp_path / "fool"
    assert main(["fool", "--model", TINY_VIT, "--random-weights", "--units", "blocks.1:3", "--shift", "1",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokens layout" in err[0]
    assert not (out / "model").exists()


# ------------------------------------------------------------------------------ CLI end to end
FAST = ["--steps", "3", "--seeds", "2", "--top-k", "3", "--n-other", "10", "--n-boot", "10", "--n-perm", "10",
        "--limit", "60", "--no-progress"]


def test_cli_visualize_check_audit_on_a_tiny_vit(tmp_path, capsys):
    model = ["--model", TINY_VIT, "--random-weights"]
    vis = tmp_path / "vis"
    assert main(["visualize", *model, "--unit", "blocks.1:3", "--unit", "blocks.0:5@1,2", "--steps", "3",
                 "--seeds", "2", "--no-progress", "--out", str(vis)]) == 0
    fv = json.loads((vis / "fv.json").read_text())
    assert [u["layout"] for u in fv["units"]] == ["tokens", "tokens"]
    assert all(math.isfinite(v) for row in fv["final_objective"] for v in row)
    assert (vis / "grid.png").is_file() and (vis / "blocks.1_c3_seed0.png").is_file()

    chk = tmp_path / "check"
    assert main(["check", *model, "--unit", "blocks.1:3", *FAST, "--circuits", "--out", str(chk)]) == 0
    res = json.loads((chk / "check.json").read_text())
    (unit,) = res["units"]
    assert unit["unit"] == "blocks.1:3" and unit["verdict"]["label"]
    assert [lay["name"] for lay in unit["layers"]] == ["blocks.0", "blocks.1"]
    assert json.loads((chk / "fvs" / "fv.json").read_text())["units"][0]["layout"] == "tokens"
    assert (chk / "path_similarity.png").is_file()
    # circuits: edges of the ViT's patch embedding and Linear modules (attention mixing is not an edge)
    circ = res["circuits"]["blocks.1:3"]
    names = [lay["name"] for lay in circ["layers"]]
    assert names[0] == "patch_embed.proj" and names[-2:] == ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    assert all(lay["n_edges"] > 0 and math.isfinite(lay["spearman"]) for lay in circ["layers"])

    aud = tmp_path / "audit"
    assert main(["audit", *model, "--units", "blocks.1:3,head:2", *FAST, "--out", str(aud)]) == 0
    audit = json.loads((aud / "audit.json").read_text())
    assert [u["unit"] for u in audit["units"]] == ["blocks.1:3", "head:2"]
    for u in audit["units"]:
        assert u["verdict"]["label"] and math.isfinite(u["natural_response"]["max"])
        assert all(math.isfinite(v) for v in u["fv"]["final_objective"])
    assert (aud / "report.html").is_file()


def test_cli_visualize_timm_vit_tiny_224_random_weights(tmp_path):
    """The issue's traceback: 224-px ViT, standard transforms grew the canvas to 238 px."""
    out = tmp_path / "vit"
    assert main(["visualize", "--model", "timm:vit_tiny_patch16_224", "--random-weights", "--unit", "blocks.5:3",
                 "--steps", "2", "--seeds", "1", "--no-progress", "--out", str(out)]) == 0
    fv = json.loads((out / "fv.json").read_text())
    assert fv["image_shape"] == [1, 1, 3, 224, 224] and fv["units"][0]["layout"] == "tokens"
    assert math.isfinite(fv["final_objective"][0][0])


def test_timm_vit_config_and_imagenet_class_names():
    from fvsanity.models import load_model

    lm = load_model("timm:vit_tiny_patch16_224", pretrained=False)
    assert lm.config.fixed_input_size and lm.config.interpolation == "bicubic" and lm.config.input_size == (224, 224)
    assert lm.preprocess.interpolation == "bicubic" and lm.preprocess.to_json()["interpolation"] == "bicubic"
    # natural images are resized as timm does (bicubic), not torchvision's bilinear
    from PIL import Image

    img = Image.fromarray((torch.rand(300, 260, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    bilinear = type(lm.preprocess)(**(lm.preprocess.to_json() | {"interpolation": "bilinear"}))
    assert lm.preprocess.load_pil(img).shape == (3, 224, 224)
    assert not torch.equal(lm.preprocess.load_pil(img), bilinear.load_pil(img))
    assert "interpolation" not in bilinear.to_json()  # older models' fingerprints unchanged
    assert len(lm.class_names) == 1000 and lm.class_names[0] == "tench"
    assert lm.block_layers == [f"blocks.{i}" for i in range(12)] + ["norm"] and lm.output_layer == "head"
