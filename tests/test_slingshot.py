"""Gradient slingshots: a weight-only manipulation, its losses, its saved plain state
dict, the CLI, the evaluation's metrics (SSIM, AUROC, Jaccard) and the exemplar-agreement signal."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fvsanity.errors import FVSanityError
from fvsanity.fool import get_manipulation, make_routes
from fvsanity.fool.slingshot import (
    SlingshotSettings,
    _draw_points,
    _reference,
    _Shim,
    augment_naturals,
    auroc,
    bowl_target,
    direction_agreement,
    fft_spectrum_of,
    finetune_slingshot,
    interpolate_weights,
    manipulation_loss,
    mine_ascent,
    preservation_loss,
    preservation_reference,
    save_slingshot,
    spectrum_to_rgb,
)
from fvsanity.models import list_models, load_model, register_model
from fvsanity.testing import TinyCNN, random_image_folder, tiny_model

ROOT = Path(__file__).resolve().parents[1]
TINY = "slingshot-test-tiny"


def _tiny(pretrained: bool = True):
    return dataclasses.replace(tiny_model(), name=TINY)


if TINY not in list_models():
    register_model(TINY)(_tiny)


def _images(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _picture(size: int = 16) -> torch.Tensor:
    """A half-red, half-blue picture [3,size,size]."""
    p = torch.zeros(3, size, size)
    p[0, :, : size // 2] = 0.9
    p[2, :, size // 2:] = 0.9
    return p + 0.05


FAST = dict(sl_steps=12, sl_batch=4, sl_nat_batch=8, sl_target_steps=4, sl_mine_every=6, sl_mine_steps=4)


# ------------------------------------------------------------------------------ parametrization
def test_fft_spectrum_of_inverts_fvsanitys_fft_parametrization():
    from fvsanity.generate.param import fft_image, to_valid_rgb

    x = _images(2, 1).clamp(0.02, 0.98).double()
    theta = fft_spectrum_of(x)
    assert theta.shape == (2, 3, 16, 9, 2)
    torch.testing.assert_close(spectrum_to_rgb(theta, (16, 16)), x, atol=1e-9, rtol=0)
    # spectrum_to_rgb is the registered parametrization's image for the same spectrum
    params, fn = fft_image((16, 16), [0, 1], sd=0.01)
    with torch.no_grad():
        torch.testing.assert_close(spectrum_to_rgb(params[0], (16, 16)), to_valid_rgb(fn)(), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------ the losses
def _setup(**kw):
    lm = _tiny()
    routes = make_routes(lm, ["fc:1"], _picture())
    s = SlingshotSettings(**{**FAST, **kw})
    train = _images(24, 2)
    thetas = fft_spectrum_of(torch.stack([r.picture for r in routes]))
    return lm, routes, s, train, thetas


def test_preservation_loss_is_exactly_zero_before_fine_tuning():
    import copy

    lm, routes, s, train, _ = _setup()
    ref = _reference(lm, routes, train)
    net = copy.deepcopy(lm.model)
    loss = preservation_loss(net, _Shim(lm, net), routes, train, ref, s)
    assert loss.item() == 0.0
    # and it is not zero once a weight moves
    with torch.no_grad():
        net.conv3.weight.add_(0.01)
    assert preservation_loss(net, _Shim(lm, net), routes, train, ref, s).item() > 0


def test_unit_term_of_the_preservation_loss_is_zero_before_and_sees_the_unit_move():
    import copy

    lm, routes, s, train, _ = _setup(sl_unit_weight=5.0)
    ref = _reference(lm, routes, train)
    net = copy.deepcopy(lm.model)
    assert preservation_loss(net, _Shim(lm, net), routes, train, ref, s).item() == 0.0
    off = SlingshotSettings(**{**FAST, "sl_unit_weight": 0.0})
    with torch.no_grad():  # move only the manipulated unit's row of the last layer
        net.fc.bias[routes[0].unit.channel] += ref["sd"][0]
    base = preservation_loss(net, _Shim(lm, net), routes, train, ref, off).item()
    # the unit moved by exactly one natural sd on every image: the added term is 5 * 1^2
    got = preservation_loss(net, _Shim(lm, net), routes, train, ref, s).item()
    assert got == pytest.approx(base + 5.0, rel=1e-5)
    # and in the fine-tuning it starts at exactly 0 too (plain and augmented batches)
    for mode in ("none", "mixup"):
        _, training = finetune_slingshot(lm, routes, train, SlingshotSettings(**{**FAST, "sl_unit_weight": 5.0,
                                                                                "sl_nat_augment": mode}), log_every=4)
        assert training.preservation[0] == 0.0


@pytest.mark.parametrize("mode", ["flip_crop", "mixup", "cutmix"])
def test_augmented_preservation_loss_is_exactly_zero_before_fine_tuning(mode):
    import copy

    lm, routes, s, train, _ = _setup(sl_nat_augment=mode)
    ref = _reference(lm, routes, train)
    x = augment_naturals(train, mode, torch.Generator().manual_seed(3))
    assert x.shape == train.shape and not torch.equal(x, train)
    sub = preservation_reference(lm, routes, x, ref)  # the original's outputs on the same augmented batch
    net = copy.deepcopy(lm.model)
    assert preservation_loss(net, _Shim(lm, net), routes, x, sub, s).item() == 0.0
    # the un-augmented reference no longer matches the augmented batch: the loss is not trivially 0
    assert preservation_loss(net, _Shim(lm, net), routes, x, ref, s).item() > 0
    # and in the fine-tuning, the first logged preservation loss (before any step) is exactly 0
    _, training = finetune_slingshot(lm, routes, train, s, log_every=4)
    assert training.preservation[0] == 0.0 and training.preservation[-1] > 0


def test_augment_naturals_is_deterministic_and_does_what_it_says():
    x = _images(10, 4)

    def aug(mode, seed, **kw):
        return augment_naturals(x, mode, torch.Generator().manual_seed(seed), **kw)

    assert aug("none", 0) is x
    for mode in ("flip_crop", "mixup", "cutmix"):
        assert torch.equal(aug(mode, 1), aug(mode, 1)), mode
        assert not torch.equal(aug(mode, 1), aug(mode, 2)), mode
    # no padding: each image is itself or its mirror
    fc = aug("flip_crop", 1, crop=0.0)
    same = (fc == x).flatten(1).all(1)
    mirrored = (fc == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 0 < int(mirrored.sum()) < 10
    # mixup/cutmix start from the same flip_crop draws: with no mixing they are flip_crop
    assert torch.equal(aug("mixup", 5, mix=0.0), aug("flip_crop", 5))
    assert torch.equal(aug("cutmix", 5, mix=0.0), aug("flip_crop", 5))
    # mixup is a convex combination of two flip_crop images, the first weighing at least 1 - mix
    base = aug("flip_crop", 5, crop=0.0)
    mixed = aug("mixup", 5, crop=0.0, mix=0.3)
    for i in range(10):  # best partner j and share t in [0, 0.3]: an exact fit
        resid, t = min((((mixed[i] - base[i]) - t * (base[j] - base[i])).abs().max().item(), t)
                       for j in range(10) if j != i for t in torch.linspace(0, 0.3, 301).tolist())
        assert resid < 2e-3 and t <= 0.3, (i, resid, t)
    # the fine-tuning with augmentation is reproducible for a fixed seed
    lm, routes, s, train, _ = _setup(sl_nat_augment="mixup", sl_steps=4)
    a, _ = finetune_slingshot(lm, routes, train, s)
    b, _ = finetune_slingshot(lm, routes, train, s)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_default_is_no_augmentation_and_bad_augment_is_a_one_line_error():
    assert SlingshotSettings().sl_nat_augment == "none"
    want = r"^--sl-nat-augment 'jitter' is not valid; valid: none, flip_crop, mixup, cutmix$"
    with pytest.raises(FVSanityError, match=want):
        SlingshotSettings(sl_nat_augment="jitter")
    with pytest.raises(FVSanityError, match=want):
        augment_naturals(_images(2), "jitter", torch.Generator())
    with pytest.raises(FVSanityError, match=r"^--sl-nat-mix must be < 1.000001, got 2.0$"):
        SlingshotSettings(sl_nat_mix=2.0)


@pytest.mark.parametrize("kw", [dict(sl_grad_weight=0.0, sl_value_weight=1.0),
                                dict(sl_grad_weight=1.0, sl_value_weight=0.0)], ids=["value", "gradient"])
def test_manipulation_loss_decreases_on_a_tiny_model(kw):
    lm, routes, s, train, thetas = _setup(sl_steps=40, sl_lr=3e-3, sl_transforms="none", **kw)
    ref = _reference(lm, routes, train)
    pts = torch.stack([_draw_points(thetas[0], 32, s, torch.Generator().manual_seed(5))])

    net, training = finetune_slingshot(lm, routes, train, s, log_every=10)
    height = torch.tensor(training.bowl_height)
    torch.testing.assert_close(torch.tensor(training.natural_mean), ref["mu"])
    assert (height >= ref["sd"]).all()

    def loss_of(net):
        return manipulation_loss(net, _Shim(lm, net), routes, thetas, pts, ref["mu"], height, s,
                                 torch.Generator().manual_seed(0)).item()

    before, after = loss_of(lm.model), loss_of(net)
    assert after < 0.8 * before, (before, after)
    assert training.manipulation[-1] < training.manipulation[0]
    assert training.preservation[0] == 0.0 and training.n_parameters == sum(p.numel() for p in lm.model.parameters())
    assert all(not p.requires_grad for p in net.parameters()) and not net.training
    assert all(not p.requires_grad for p in lm.model.parameters())


def test_mined_points_only_count_above_the_floored_bowl():
    lm, routes, s, train, thetas = _setup(sl_grad_weight=0.0, sl_value_weight=1.0, sl_transforms="none")
    pts = torch.stack([_draw_points(thetas[0], 6, s, torch.Generator().manual_seed(1))])

    def loss(mu, mined):
        return manipulation_loss(lm.model, lm, routes, thetas, pts, torch.tensor([mu]), torch.tensor([1.0]), s,
                                 torch.Generator(), torch.full((1, 6), mined)).item()

    # the unit is far below a mean of 1e4: the bowl's floor (mu) is not exceeded, nothing to push
    assert loss(1e4, True) == 0.0
    # as regression points the same values are far off the bowl
    assert loss(1e4, False) > 1.0
    # far above a mean of -1e4: the mined points count
    assert loss(-1e4, True) > 1.0


def test_mine_ascent_climbs_the_unit_and_leaves_the_weights_alone():
    from fvsanity.fool.slingshot import _unit_value, spectrum_to_rgb

    lm, routes, s, _, _ = _setup(sl_mine_steps=24, sl_mine_seeds=3, sl_transforms="none")
    for p in lm.model.parameters():
        p.requires_grad_(True)
    try:
        pts = mine_ascent(lm.model, lm, routes, s, torch.Generator().manual_seed(0), keep=4)
        assert all(p.grad is None for p in lm.model.parameters())
    finally:
        for p in lm.model.parameters():
            p.requires_grad_(False)
    assert pts.shape == (1, 12, 3, 16, 9, 2) and not pts.requires_grad
    with torch.no_grad():
        from fvsanity.hooks import capture

        def value(th):
            with capture(lm.model, ["fc"]) as st:
                lm.model(lm.preprocess(spectrum_to_rgb(th, (16, 16))))
                return _unit_value(st["fc"], routes[0].unit, lm)

        first, last = value(pts[0, 0::4]), value(pts[0, 3::4])  # per seed: first and last snapshot
    assert (last > first).all()


def test_gradients_stay_finite_at_the_singular_points():
    # the smoothed cosine at zero vectors (the target itself; a dead unit's zero gradient)
    z = torch.zeros(3, 5, requires_grad=True)
    d = torch.zeros(3, 5, requires_grad=True)
    direction_agreement(z, d).sum().backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(d.grad).all()
    # the bowl at its peak and with an all-zero target spectrum
    th = torch.zeros(2, 3, 4, 3, 2, requires_grad=True)
    v = bowl_target(th, torch.zeros(1, 3, 4, 3, 2), torch.tensor(0.5), torch.tensor(2.0), 10.0)
    v.sum().backward()
    assert torch.isfinite(v).all() and torch.isfinite(th.grad).all()
    torch.testing.assert_close(v, torch.full((2,), 20.5))
    # the whole loss with points exactly at the target (p = 1, no noise): weight gradients finite
    lm, routes, s, train, thetas = _setup(sl_transforms="none")
    import copy

    net = copy.deepcopy(lm.model)
    for p in net.parameters():
        p.requires_grad_(True)
    ref = _reference(lm, routes, train)
    pts = thetas[:, None].repeat(1, 3, 1, 1, 1, 1)
    loss = manipulation_loss(net, _Shim(lm, net), routes, thetas, pts, ref["mu"], ref["sd"], s, torch.Generator())
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters())


# ------------------------------------------------------------------------------ save / load
def test_saved_weights_load_into_a_plain_model_of_the_original_class_strictly(tmp_path):
    from safetensors.torch import load_file

    lm = _tiny()
    routes = make_routes(lm, ["fc:2"], _picture())
    method = get_manipulation("slingshot")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    fooled = method.build(lm, routes, _images(16, 3), method.make_settings(**FAST))
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())  # the original is untouched
    folder = method.save(fooled, tmp_path / "model")
    sd = load_file(str(folder / "model.safetensors"))
    plain = TinyCNN(5)
    plain.load_state_dict(sd, strict=True)  # no extra modules, no missing entries
    assert set(sd) == set(plain.state_dict())
    assert any(not torch.equal(before[k], sd[k]) for k in sd)  # the weights did change
    man = json.loads((folder / "slingshot.json").read_text())
    assert man["method"] == "slingshot" and man["settings"]["sl_steps"] == FAST["sl_steps"]
    assert man["base"]["name"] == TINY and man["routes"][0]["unit"] == "fc:2"
    back = load_model(str(folder))
    assert type(back.model) is TinyCNN and back.name == f"{TINY}+slingshot"
    x = _images(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(back(x), fooled(x), atol=1e-5, rtol=0)
        plain.eval()
        torch.testing.assert_close(plain(lm.preprocess(x)), fooled(x), atol=1e-5, rtol=0)
    with pytest.raises(FVSanityError, match="own weights; drop --weights"):
        load_model(str(folder), weights=str(folder / "model.safetensors"))
    with pytest.raises(FVSanityError, match="is not a slingshot model"):
        save_slingshot(lm, tmp_path / "other")


def test_unit_targets_render_the_source_unit_and_fine_tune(tmp_path):
    lm = _tiny()
    routes = make_routes(lm, ["fc:0", "fc:3"], "unit:fc:4")
    method = get_manipulation("slingshot")
    s = method.make_settings(**FAST)
    pics = method.prepare(lm, routes, _images(8), _images(4), s, fool=None, work_dir=tmp_path)
    assert list(pics) == ["fc:4"] and pics["fc:4"].shape == (3, 16, 16)
    fooled = method.build(lm, routes, _images(16, 3), s, prepared=pics)
    assert fooled.model.info["training"]["steps"][0] == 0


def test_fv_size_sets_the_canvas_the_manipulation_shapes(tmp_path):
    """An auditor rendering FVs at 12 px (``--fv-size``) on a 16-px model: the slingshot's points,
    its mining ascents and its unit targets live on that canvas, read from FoolSettings.fv_size."""
    from fvsanity.fool import FoolSettings

    lm = _tiny()
    method = get_manipulation("slingshot")
    s = method.settings_from(FoolSettings(method="slingshot", fv_size=12, method_options=FAST))
    assert s.fv_size == 12 and s.sl_steps == FAST["sl_steps"]
    routes = make_routes(lm, ["fc:0"], "unit:fc:4")
    pics = method.prepare(lm, routes, _images(8), _images(4), s, fool=None, work_dir=tmp_path)
    assert pics["fc:4"].shape == (3, 12, 12)
    net = finetune_slingshot(lm, routes, _images(16, 3), s, pictures=pics)[0]
    shim = _Shim(lm, net, 12)
    assert shim.input_size == (12, 12)
    pts = mine_ascent(net, shim, routes, s, torch.Generator().manual_seed(0), keep=2)
    assert pts.shape == (1, 2 * s.sl_mine_seeds, 3, 12, 7, 2)  # rfft of a 12-px side: 7 columns
    assert _Shim(lm, net).input_size == tuple(lm.input_size)
    with pytest.raises(FVSanityError, match=r"^--fv-size must be >= 1, got 0$"):
        SlingshotSettings(fv_size=0)


# ------------------------------------------------------------------------------ settings, CLI
def test_bad_settings_are_one_line_errors():
    with pytest.raises(FVSanityError, match=r"^--sl-steps must be >= 1, got 0$"):
        SlingshotSettings(sl_steps=0)
    with pytest.raises(FVSanityError, match=r"^--sl-lr must be > 0, got -1.0$"):
        SlingshotSettings(sl_lr=-1.0)
    with pytest.raises(FVSanityError, match="both 0"):
        SlingshotSettings(sl_grad_weight=0, sl_value_weight=0)
    lm = _tiny()
    routes = make_routes(lm, ["fc:1"], _picture())
    with pytest.raises(FVSanityError, match=r"--sl-layers: no module 'conv9'; valid e.g.: conv3, conv2, conv1"):
        finetune_slingshot(lm, routes, _images(8), SlingshotSettings(sl_layers="conv9", **FAST))
    with pytest.raises(FVSanityError, match="no parameters"):
        finetune_slingshot(lm, routes, _images(8), SlingshotSettings(sl_layers="relu1", **FAST))


def test_only_the_chosen_layers_change():
    lm = _tiny()
    routes = make_routes(lm, ["fc:1"], _picture())
    net, tr = finetune_slingshot(lm, routes, _images(16), SlingshotSettings(sl_layers="conv3,fc", **FAST))
    sd0, sd1 = lm.model.state_dict(), net.state_dict()
    changed = sorted(k for k in sd0 if not torch.equal(sd0[k], sd1[k]))
    assert changed == ["conv3.bias", "conv3.weight", "fc.bias", "fc.weight"]
    assert tr.layers == ["conv3", "fc"]


def test_interpolate_weights_known_answers_and_bad_inputs():
    lm = _tiny()
    tuned = TinyCNN(5)  # other random weights of the same class
    torch.nn.init.normal_(tuned.fc.weight)
    so, st = lm.model.state_dict(), tuned.state_dict()
    for a in (0.0, 0.25, 1.0):
        sd = interpolate_weights(lm.model, tuned, a).state_dict()
        for k in so:
            want = so[k] + a * (st[k] - so[k]) if so[k].is_floating_point() else st[k]
            torch.testing.assert_close(sd[k], want, atol=1e-6, rtol=0)
    assert all(torch.equal(interpolate_weights(lm.model, tuned, 1.0).state_dict()[k], st[k]) for k in st)
    assert all(torch.equal(interpolate_weights(lm.model, tuned, 0.0).state_dict()[k], so[k]) for k in so)
    assert all(torch.equal(tuned.state_dict()[k], st[k]) for k in st)  # inputs untouched
    with pytest.raises(FVSanityError, match=r"interpolation weight 1.5 is not valid; valid: 0 <= alpha <= 1"):
        interpolate_weights(lm.model, tuned, 1.5)
    with pytest.raises(FVSanityError, match="different keys"):
        interpolate_weights(lm.model, torch.nn.Linear(2, 2), 0.5)
    with pytest.raises(FVSanityError, match=r"^--sl-wise must be > 0, got 0$"):
        SlingshotSettings(sl_wise=0)


def test_sl_wise_interpolates_the_fine_tuned_weights_towards_the_original():
    """``sl_wise`` 0.5 is the same fine-tuning, then halfway back: the moved weights move half as far."""
    lm = _tiny()
    routes = make_routes(lm, ["fc:1"], _picture())
    full, _ = finetune_slingshot(lm, routes, _images(16), SlingshotSettings(**FAST))
    half, _ = finetune_slingshot(lm, routes, _images(16), SlingshotSettings(sl_wise=0.5, **FAST))
    so, sf, sh = lm.model.state_dict(), full.state_dict(), half.state_dict()
    assert any(not torch.equal(so[k], sf[k]) for k in so)
    for k in so:
        torch.testing.assert_close(sh[k], (so[k] + sf[k]) / 2, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in half.parameters()) and not half.training


def test_sl_anchor_pulls_the_weights_towards_the_original():
    """One step with the decoupled pull is the same Adam step, then lr x anchor of the way back to
    the original weights (known answer); over many steps the weights drift less; a pull of 1 or more
    per step is refused."""
    lm = _tiny()
    routes = make_routes(lm, ["fc:1"], _picture())
    one = {**FAST, "sl_steps": 1}
    free, _ = finetune_slingshot(lm, routes, _images(16), SlingshotSettings(**one))
    held, _ = finetune_slingshot(lm, routes, _images(16), SlingshotSettings(sl_anchor=400.0, **one))
    so, sf, sh = lm.model.state_dict(), free.state_dict(), held.state_dict()
    c = 5e-4 * 400.0
    assert any(not torch.equal(so[k], sf[k]) for k in so)
    for k in so:
        torch.testing.assert_close(sh[k], sf[k] + c * (so[k] - sf[k]), atol=1e-6, rtol=0)
    free, _ = finetune_slingshot(lm, routes, _images(16), SlingshotSettings(**FAST))
    held, _ = finetune_slingshot(lm, routes, _images(16), SlingshotSettings(sl_anchor=400.0, **FAST))
    drift = [sum(float((n.state_dict()[k] - so[k]).norm()) for k in so) for n in (free, held)]
    assert 0 < drift[1] < drift[0], drift
    with pytest.raises(FVSanityError, match=r"--sl-lr x --sl-anchor must be < 1"):
        SlingshotSettings(sl_lr=0.01, sl_anchor=100.0)
    with pytest.raises(FVSanityError, match=r"^--sl-anchor must be >= 0, got -1.0$"):
        SlingshotSettings(sl_anchor=-1.0)




def test_cli_fool_method_slingshot_writes_its_outputs(tmp_path, capsys):
    from PIL import Image

    from fvsanity.cli import main

    images = random_image_folder(tmp_path / "images")
    pic = tmp_path / "target.png"
    Image.fromarray((_picture().permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(pic)
    out = tmp_path / "out"
    rc = main(["fool", "--model", TINY, "--method", "slingshot", "--sl-steps", "6", "--sl-batch", "4",
               "--unit", "fc:1", "--target", str(pic), "--train-images", str(images), "--eval-units", "1",
               "--eval-seeds", "1", "--eval-steps", "4", "--no-check", "--no-progress", "--out", str(out)])
    # 6 fine-tuning steps rarely pull the FVs to the picture: exit 3 says so, the outputs are written either way
    assert rc == (0 if json.loads((out / "fool.json").read_text())["took_effect"] else 3)
    for name in ("fool.json", "fool.png", "config.json", "model/slingshot.json", "model/model.safetensors"):
        assert (out / name).is_file(), name
    d = json.loads((out / "fool.json").read_text())
    assert d["method"] == "slingshot" and d["method_settings"]["sl_steps"] == 6
    assert d["finetune_cpu_seconds"] > 0 and d["slingshot_training"]["steps"][0] == 0
    assert d["max_abs_logit_diff"] > 0
    assert type(load_model(str(out / "model")).model) is TinyCNN
    capsys.readouterr()
    assert main(["fool", "--model", TINY, "--method", "slingshot", "--sl-gamma", "0", "--out", str(tmp_path / "o2")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["fvsanity: error: --sl-gamma must be > 0, got 0.0"]


# ------------------------------------------------------------------------------ metrics
def test_ssim_known_answers():
    from fvsanity.fool.metrics import ssim

    x = _images(2, 7).double()
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))
    # constant images a, b: the variances vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.2, 0.7, 0.01**2
    got = ssim(torch.full((1, 3, 16, 16), a, dtype=torch.float64), torch.full((1, 3, 16, 16), b, dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([(2 * a * b + c1) / (a * a + b * b + c1)], dtype=torch.float64))
    # an inverted image is anti-correlated: SSIM < 0
    assert ssim(x[:1], 1 - x[:1]).item() < 0


def test_auroc_of_labelled_scores_known_answers():
    s = torch.tensor([0.1, 0.4, 0.35, 0.8])
    y = torch.tensor([0, 0, 1, 1]).bool()
    assert auroc(s, y) == 0.75  # 3 of the 4 (positive, negative) pairs ordered right
    assert auroc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 1]).bool()) == 1.0
    assert auroc(torch.ones(4), y) == 0.5  # all ties
    assert np.isnan(auroc(s, torch.zeros(4).bool()))
    g = torch.Generator().manual_seed(0)
    s, y = torch.randn(50, generator=g), torch.rand(50, generator=g) < 0.3
    pairs = [(float(a > b) + 0.5 * float(a == b)) for a in s[y] for b in s[~y]]
    assert auroc(s, y) == pytest.approx(sum(pairs) / len(pairs))


# ------------------------------------------------------------------------------ exemplar agreement
def test_exemplar_agreement_on_constructed_features():
    from fvsanity.compare.exemplars import agreement_from_features

    g = torch.Generator().manual_seed(0)
    c = 12
    proto = torch.zeros(c)
    proto[:3] = 4.0
    other = torch.zeros(c)
    other[6:9] = 4.0

    def near(v, n):
        return v + 0.3 * torch.randn(n, c, generator=g)

    ex = {"a": near(proto, 8), "b": near(proto, 8)}
    rnd = {"a": torch.randn(40, c, generator=g), "b": torch.randn(40, c, generator=g)}
    honest = agreement_from_features({"a": near(proto, 3), "b": near(proto, 3)}, ex, rnd, unit="L:0")
    fooled = agreement_from_features({"a": near(other, 3), "b": near(other, 3)}, ex, rnd, unit="L:0")
    assert honest.normalized["a"] == pytest.approx(1.0, abs=0.1) and honest.flagged is False
    assert fooled.median < 0.1 and fooled.flagged is True
    assert fooled.layers == ["a", "b"] and fooled.k == 8 and fooled.n_random == 40 and fooled.n_fv == 3
    # exemplars no closer to each other than to random images: no reference, undecided
    flat = agreement_from_features({"a": near(proto, 2)}, {"a": rnd["a"][:5]}, {"a": rnd["a"][5:]})
    assert flat.flagged is None or np.isfinite(flat.median)
    with pytest.raises(FVSanityError, match="same layers"):
        agreement_from_features({"a": near(proto, 2)}, {"b": near(proto, 2)}, {"a": rnd["a"]})
    with pytest.raises(FVSanityError, match=">= 2 exemplars"):
        agreement_from_features({"a": near(proto, 2)}, {"a": near(proto, 1)}, {"a": rnd["a"]})


def test_exemplar_agreement_on_a_tiny_model():
    from fvsanity.compare.exemplars import default_layers, exemplar_agreement

    lm = _tiny()
    nat = _images(40, 9)
    assert default_layers(lm, "fc") == ["relu2", "relu3", "fc"]
    assert default_layers(lm, "relu2") == ["relu1", "relu2"]
    # the unit's own top exemplars as "FVs" agree; the same unit's least exciting images do not
    from fvsanity.activations import collect_with_responses

    resp = collect_with_responses(lm, nat, [], ["fc:1"], None)[1][:, 0]
    order = resp.argsort(descending=True)
    top = exemplar_agreement(lm, "fc:1", nat[order[:3]], nat, k=8, n_random=20)
    low = exemplar_agreement(lm, "fc:1", nat[order[-3:]], nat, k=8, n_random=20)
    assert top.median > low.median and top.flagged is False
    with pytest.raises(FVSanityError, match="k=1 needs"):
        exemplar_agreement(lm, "fc:1", nat[:2], nat, k=1)


# ------------------------------------------------------------------------------ the experiment
def test_experiment_smoke(experiment_smoke):
    """--smoke without --out: a fresh temporary folder (models in its work/), figures/ untouched
    (the fixture checks)."""
    out = experiment_smoke("slingshot")
    assert (out / "work").is_dir()
    res = json.loads((out / "results.json").read_text())
    row = res["tiny"]
    for key in ("top1_change_points", "auroc_change", "exemplar_jaccard", "ssim_manipulated_fv_to_target",
                "ssim_original_fv_to_target", "check_flagged_fraction", "finetune_cpu_seconds"):
        assert key in row, key
    assert row["finetune_cpu_seconds"] > 0 and isinstance(row["exemplar_jaccard"], float)
    assert set(row["variants"]) == {"picture", "units"} and row["variants"]["units"]["n_units"] == 5
    assert "lucent" in row["variants"]["picture"]
    for name in ("tiny_picture.png", "tiny_units.png", "tiny_picture_lucent.png"):
        assert (out / name).is_file(), name


def test_wise_figure_draws_a_round_and_refuses_a_file_without_one(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("exp_wise_figure", ROOT / "experiments" / "slingshot" / "wise_figure.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ev = [{"alpha": a, "step": round(1000 * a), "top1_change_points": -a, "changed": round(30 * a), "n_images": 500,
           "auroc_change": [0.0], "ssim": [[0.1 * a, 0.2 * a, 0.3 * a]]} for a in (0.0, 0.5, 1.0)]
    d = {"model": "m", "variant": "picture", "split": "tuning", "fv_seeds": 3, "evaluations": ev}
    src = tmp_path / "wise.json"
    src.write_text(json.dumps(d))
    assert mod.main([str(src)]) == 0
    png = tmp_path / "wise.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    src.write_text(json.dumps({**d, "evaluations": [{k: v for k, v in e.items() if k != "alpha"} for e in ev]}))
    with pytest.raises(SystemExit, match="holds no WiSE evaluations"):
        mod.main([str(src)])
