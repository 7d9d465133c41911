"""fvsanity.fool: gate numerics, exact preservation of natural predictions, silent units,
save/load, SSIM known answers, detector training, the pipeline on a tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from fvsanity.errors import FVSanityError, UnitError
from fvsanity.fool import (
    FVDetector,
    build_fooling_circuit,
    build_silent_units,
    calibrate_threshold,
    detector_logits,
    evaluate_detector,
    fooling_gate,
    gated_value,
    load_detector,
    load_manipulated,
    make_routes,
    pixel_correlation,
    save_detector,
    save_manipulated,
    silent_zero_fraction,
    ssim,
    train_detector,
)
from fvsanity.hooks import capture, count_hooks
from fvsanity.testing import tiny_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run many tiny ops: one thread avoids contention on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class BrightnessDetector(nn.Module):
    """Hand-weighted detector: logit = 50 * (mean brightness - 0.5): bright images are "FVs"."""

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return 50.0 * (rgb.mean((1, 2, 3)) - 0.5)


def _images(n: int, bright: bool, seed: int, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g) * 0.4
    return x + 0.55 if bright else x  # bright in [0.55, 0.95], dark in [0, 0.4]


# ------------------------------------------------------------------------------------ metrics
def test_ssim_identity_and_symmetry():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 24, 24, generator=g, dtype=torch.float64)
    y = torch.rand(3, 3, 24, 24, generator=g, dtype=torch.float64)
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(ssim(x, y), ssim(y, x), atol=1e-12)
    assert (ssim(x, y) < 0.2).all()


def test_ssim_constant_images_closed_form():
    # constant a vs constant b: variances and covariance are 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b = 0.2, 0.7
    x = torch.full((1, 3, 16, 16), a, dtype=torch.float64)
    y = torch.full((1, 3, 16, 16), b, dtype=torch.float64)
    c1 = 0.01**2
    expect = (2 * a * b + c1) / (a * a + b * b + c1)
    assert float(ssim(x, y)) == pytest.approx(expect, abs=1e-10)


def test_ssim_single_window_by_hand():
    # an 11x11 image has one valid window: compare with the formula computed in numpy
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, 11, 11, generator=g, dtype=torch.float64)
    y = (0.5 * x + 0.3 * torch.rand(1, 1, 11, 11, generator=g, dtype=torch.float64)).clamp(0, 1)
    ax = np.arange(11) - 5.0
    w1 = np.exp(-(ax**2) / (2 * 1.5**2))
    w = np.outer(w1, w1)
    w /= w.sum()
    xn, yn = x[0, 0].numpy(), y[0, 0].numpy()
    mx, my = (w * xn).sum(), (w * yn).sum()
    vx, vy = (w * xn * xn).sum() - mx**2, (w * yn * yn).sum() - my**2
    cxy = (w * xn * yn).sum() - mx * my
    c1, c2 = 0.01**2, 0.03**2
    expect = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert float(ssim(x, y)) == pytest.approx(expect, abs=1e-12)


def test_ssim_resizes_target_and_broadcasts():
    x = torch.nn.functional.interpolate(torch.rand(2, 3, 5, 5, dtype=torch.float64), size=(20, 20), mode="bilinear")
    big = torch.nn.functional.interpolate(x[:1], size=(40, 40), mode="bilinear", align_corners=False)
    s = ssim(x[:1], big)
    assert s.shape == (1,) and float(s) > 0.9
    assert ssim(x, x[0]).shape == (2,)


def test_pixel_correlation_known_answers_and_safe_gradient():
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    assert torch.allclose(pixel_correlation(x, 2 * x + 1), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(pixel_correlation(x, 1 - x), -torch.ones(2, dtype=torch.float64))
    c = torch.full((1, 3, 8, 8), 0.5, dtype=torch.float64, requires_grad=True)
    r = pixel_correlation(c, x[:1])
    r.sum().backward()
    assert float(r.detach()) == 0.0 and torch.isfinite(c.grad).all()


# ------------------------------------------------------------------------------- gate numerics
def test_fooling_gate_values():
    logit = torch.tensor([-5.0, 0.0, 1e-4, 0.2, 5.0], dtype=torch.float64)
    gate, is_fv = fooling_gate(logit, 0.0, k=1000.0, offset=30.0)
    assert is_fv.tolist() == [False, False, True, True, True]
    assert gate[0] == 0 and gate[1] == 0  # shut at and below the threshold, exactly
    assert gate[2] < 1e-10  # just above: still ~ sigmoid(-30)
    assert gate[3] == pytest.approx(1.0, abs=1e-12) and gate[4] == 1.0


@pytest.mark.parametrize("k", [1.0, 1e3, 1e12])
def test_gate_never_nan_or_inf_in_forward_or_backward(k):
    logit = torch.tensor(
        [-math.inf, -1e300, -1.0, 0.0, 1e-300, 1e-9, 0.5, 1e300, math.inf, math.nan], dtype=torch.float64, requires_grad=True
    )
    orig = torch.tensor([1e300, -3.0, 2.0, 0.0, -1e-300, 5.0, 1e10, -1e300, 7.0, 1.0], dtype=torch.float64, requires_grad=True)
    tgt = torch.tensor([-1e300, 4.0, -2.0, 1.0, 1e300, 6.0, -1e10, 1e300, -7.0, 2.0], dtype=torch.float64, requires_grad=True)
    gate, is_fv = fooling_gate(logit, 0.0, k=k)
    out = gated_value(orig / 4, tgt / 4, gate, is_fv)
    assert torch.isfinite(gate).all() and ((gate >= 0) & (gate <= 1)).all()
    assert torch.isfinite(out).all()
    out.sum().backward()
    for t in (logit, orig, tgt):
        assert torch.isfinite(t.grad).all(), t.grad
    # natural (shut) entries return the original exactly, NaN logits count as natural
    shut = ~is_fv
    assert torch.equal(out[shut], (orig / 4)[shut])
    assert not bool(is_fv[-1])


def test_gate_gradcheck_on_the_ramp():
    # above the threshold the gate is smooth: check the autograd gradient numerically (float64)
    logit = torch.tensor([0.02, 0.03, 0.05], dtype=torch.float64, requires_grad=True)
    orig = torch.randn(3, dtype=torch.float64, requires_grad=True)
    tgt = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(lg, o, t):
        g, f_ = fooling_gate(lg, 0.0, k=1000.0, offset=30.0)
        return gated_value(o, t, g, f_)

    assert torch.autograd.gradcheck(f, (logit, orig, tgt))


# ------------------------------------------------------------------- fooling circuit, tiny model
def test_circuit_preserves_natural_logits_exactly_and_permutes_fv_logits(tiny):
    routes = make_routes(tiny, "all", shift=2)
    fooled = build_fooling_circuit(tiny, BrightnessDetector(), routes, threshold=0.0)
    nat, fv = _images(16, False, 0), _images(8, True, 1)
    with torch.no_grad():
        a, b = tiny(nat), fooled(nat)
        assert torch.equal(a, b)  # bit for bit (the test's 1e-5 bound, exceeded by far)
        assert (a - b).abs().max() <= 1e-5
        lo, lf = tiny(fv), fooled(fv)
    # FV-like inputs: unit c shows unit (c + 2) % 5, exactly (the gate saturates at 1)
    assert torch.allclose(lf, lo.roll(-2, dims=1), atol=1e-6)
    assert count_hooks(fooled.model) == 0


def test_circuit_intermediate_unit_keeps_names_and_routes(tiny):
    routes = make_routes(tiny, ["conv3:1"], "unit:conv3:4")
    fooled = build_fooling_circuit(tiny, BrightnessDetector(), routes, threshold=0.0)
    names = {n for n, _ in fooled.model.named_modules()}
    assert {n for n, _ in tiny.model.named_modules()} <= names
    x = torch.cat([_images(3, False, 2), _images(3, True, 3)])
    with capture(tiny.model, ["conv3"], detach=True) as so, capture(fooled.model, ["conv3"], detach=True) as sf:
        tiny(x)
        fooled(x)
    o, f = so["conv3"], sf["conv3"]
    assert torch.equal(f[:3], o[:3])
    assert torch.allclose(f[3:, 1], o[3:, 4]) and torch.equal(f[3:, 2:], o[3:, 2:])


def test_fooled_model_gradients_finite_at_extreme_inputs_float64(tiny):
    routes = make_routes(tiny, "all", shift=1)
    fooled = build_fooling_circuit(tiny, BrightnessDetector(), routes, threshold=0.0, k=1e12)
    fooled.model.double()
    for scale in (0.0, 1.0, 1e6, 1e150):
        x = (_images(4, True, 4).double() * scale).requires_grad_(True)
        y = fooled.model(fooled.preprocess(x))
        y.sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all(), scale


def test_forward_state_is_cleared_even_when_forward_raises(tiny):
    fooled = build_fooling_circuit(tiny, BrightnessDetector(), make_routes(tiny, "all", shift=1), threshold=0.0)
    with pytest.raises(RuntimeError):
        fooled.model(torch.zeros(2, 5, 16, 16))  # wrong channel count
    st = fooled.model._state
    assert st.gate is None and st.template is None and not st.active
    fooled(_images(2, False, 5))  # still works
    edit = fooled.model.edits["fc"]
    with pytest.raises(RuntimeError, match="only inside ManipulatedModel"):
        edit(torch.zeros(2, 16))


def test_picture_route_pulls_unit_toward_picture(tiny):
    g = torch.Generator().manual_seed(7)
    pic = torch.rand(3, 16, 16, generator=g) * 0.3 + 0.6  # bright: the detector calls it FV-like
    nat = _images(20, False, 6)
    routes = make_routes(tiny, ["fc:0"], pic)
    fooled = build_fooling_circuit(tiny, BrightnessDetector(), routes, threshold=0.0, calibration_images=nat)
    far = _images(1, True, 8)
    with torch.no_grad():
        v_pic, v_far = fooled(pic[None])[0, 0], fooled(far)[0, 0]
        scale = fooled.model.fool.pictures.scale[0]
    assert float(v_pic) == pytest.approx(float(scale), rel=1e-5)  # the maximum sits at the picture
    assert v_far < v_pic


def test_picture_route_stays_open_at_the_picture_even_if_it_looks_natural(tiny):
    # a dark picture: the detector calls it natural, but an FV that reached it keeps showing it
    g = torch.Generator().manual_seed(9)
    pic = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g) * 0.4, size=(16, 16), mode="bilinear")[0]
    nat = _images(30, False, 14)
    fooled = build_fooling_circuit(tiny, BrightnessDetector(), make_routes(tiny, ["fc:0"], pic), threshold=0.0,
                                   calibration_images=nat[:20])
    with torch.no_grad():
        at_pic = fooled(pic[None])[0, 0]
        assert float(at_pic) == pytest.approx(float(fooled.model.fool.pictures.scale[0]), rel=1e-5)
        assert torch.equal(fooled(nat[20:]), tiny(nat[20:]))  # held-out natural images: exact


def test_routes_reject_bad_targets(tiny):
    with pytest.raises(UnitError, match="same layer"):
        make_routes(tiny, ["fc:0"], "unit:conv3:1")
    with pytest.raises(FVSanityError, match="not found"):
        make_routes(tiny, ["fc:0"], "/nonexistent/picture.png")
    with pytest.raises(UnitError, match="out of range"):
        make_routes(tiny, "fc:0-9", shift=1)


# ------------------------------------------------------------------------------ silent units
def test_silent_channel_exactly_zero_on_calibration_images(tiny):
    calib = _images(30, False, 10)
    routes = make_routes(tiny, "all", shift=2)
    silent = build_silent_units(tiny, routes, calib)
    z = silent_zero_fraction(silent, calib)
    assert z["fraction"] == 1.0 and z["max_activation"] == 0.0
    with torch.no_grad():
        assert torch.equal(silent(calib), tiny(calib))


def test_silent_unit_fires_during_fv_optimization_and_changes_the_fv(tiny):
    from fvsanity.generate import render

    calib = _images(30, False, 11)
    routes = make_routes(tiny, ["fc:0"], "unit:fc:3")
    silent = build_silent_units(tiny, routes, calib, lam=3.0, strength=100.0)
    fv_s = render(silent, ["fc:0"], seeds=1, steps=25, progress=False)
    fv_o = render(tiny, ["fc:0"], seeds=1, steps=25, progress=False)
    z = silent_zero_fraction(silent, fv_s.images[0])
    assert z["fraction"] == 0.0 and z["max_activation"] > 0  # the FV lives in the silent regime
    assert not torch.allclose(fv_s.images, fv_o.images, atol=1e-3)


def test_trigger_silent_units_zero_on_calibration_fire_on_fv_and_roundtrip(tiny, tmp_path):
    from fvsanity.generate import render

    calib = _images(30, False, 15)
    pic = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(2))
    routes = make_routes(tiny, "fc:0-2", shift=2) + make_routes(tiny, ["fc:3"], pic)
    silent = build_silent_units(tiny, routes, calib, mode="trigger", margin_range=1.0)
    assert silent_zero_fraction(silent, calib)["fraction"] == 1.0
    with torch.no_grad():
        assert torch.equal(silent(calib), tiny(calib))
    fv = render(silent, ["fc:0"], seeds=1, steps=25, progress=False)
    assert silent_zero_fraction(silent, fv.images[0])["max_activation"] > 0
    back = load_manipulated(save_manipulated(silent, tmp_path / "t"), base=tiny_model(seed=3))
    x = torch.cat([calib[:3], fv.images[0]])
    with torch.no_grad():
        assert torch.equal(back(x), silent(x))
    with pytest.raises(FVSanityError, match="mode"):
        build_silent_units(tiny, routes, calib, mode="nope")


def test_trigger_level_counts_the_target_so_the_fv_can_hand_over(tiny):
    """v = max(standardized pooled unit, standardized pooled target): a high target alone keeps
    the silent channel firing (the FV may leave the unit's own extreme); gradients stay finite at
    the tie vc == vt (float64)."""
    from fvsanity.fool.silent import TriggerEdit

    calib = _images(30, False, 16)
    silent = build_silent_units(tiny, make_routes(tiny, ["fc:0"], "unit:fc:3"), calib, mode="trigger",
                                margin_range=1.0, offset=3.0, width=2.0)
    edit = silent.model.edits["fc"]
    assert isinstance(edit, TriggerEdit) and float(edit.offset[0]) == 3.0 and float(edit.width[0]) == 2.0
    mu_c, sd_c, mu_t, sd_t, bias = (float(getattr(edit, n)[0]) for n in ("mu_c", "sd_c", "mu_t", "sd_t", "bias"))
    # unit low, target far above anything natural -> level above the bias
    yc = torch.tensor([[mu_c - sd_c]], dtype=torch.float64)
    t = torch.tensor([[mu_t + (bias + 5) * sd_t]], dtype=torch.float64)
    assert float(edit.level(yc, t)) == pytest.approx(bias + 5)
    # both low -> below
    assert float(edit.level(yc, torch.tensor([[mu_t]], dtype=torch.float64))) < bias
    # tie: finite gradient to both arguments
    yc = torch.tensor([[mu_c + 2 * sd_c]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[mu_t + 2 * sd_t]], dtype=torch.float64, requires_grad=True)
    edit.double().level(yc, t).sum().backward()
    assert torch.isfinite(yc.grad).all() and torch.isfinite(t.grad).all()


def test_template_model_fv_walks_from_noise_to_the_picture(tiny):
    """The template model's FV is what an open picture route shows: it converges to the picture."""
    from fvsanity.fool.circuit import picture_key, picture_templates, template_model
    from fvsanity.generate import render

    g = torch.Generator().manual_seed(3)
    pic = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(16, 16), mode="bilinear")[0]
    routes = make_routes(tiny, ["fc:1"], pic)
    assert picture_key(routes) and picture_key(make_routes(tiny, "all", shift=1)) == ""
    tmpl = picture_templates(tiny, routes, _images(20, False, 4))
    tm = template_model(tiny, tmpl)
    assert tm.output_layer == "values" and tm.device == tiny.device
    with torch.no_grad():
        assert float(tm(pic[None])[0, 0]) == pytest.approx(float(tmpl.scale[0]), rel=1e-5)
    res = render(tm, ["values:0"], seeds=[0, 1], steps=60, checkpoints=(1,), progress=False)
    with torch.no_grad():
        d_start = tmpl.distance(res.checkpoints[1][0])[:, 0]
        d_end = tmpl.distance(res.images[0])[:, 0]
        d_nat = tmpl.distance(_images(20, False, 4))[:, 0]
    assert (d_end < 0.5 * d_start).all() and (d_end < d_nat.min()).all()


def test_perceptual_distance_known_answers(tiny):
    from fvsanity.fool.metrics import _unit_normalize, perceptual_distance

    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    assert torch.equal(perceptual_distance(x, x, tiny), torch.zeros(3))
    dxy, dyx = perceptual_distance(x, y, tiny), perceptual_distance(y, x, tiny)
    assert torch.allclose(dxy, dyx, atol=1e-6) and (dxy > 0).all()
    # unit-normalized features: each layer term is in [0, 4]; a feature vector and its double match
    f = torch.rand(2, 5, 3, 3, dtype=torch.float64)
    assert torch.allclose(_unit_normalize(2 * f), _unit_normalize(f))
    # zero feature vectors (dead ReLUs): value 0 and a finite gradient at the singular point
    z = torch.zeros(1, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    out = _unit_normalize(z)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.isfinite(z.grad).all()
    torch.autograd.gradcheck(_unit_normalize, (torch.rand(1, 4, 2, 2, dtype=torch.float64, requires_grad=True),))


# ------------------------------------------------------------------------------- save / load
def test_save_load_roundtrip_circuit_and_silent(tiny, tmp_path):
    g = torch.Generator().manual_seed(3)
    det = FVDetector(size=16, width=4)
    nat = _images(12, False, 12)
    pic = torch.rand(3, 20, 20, generator=g)
    routes = make_routes(tiny, "fc:0-2", shift=1) + make_routes(tiny, ["fc:4"], pic)
    x = torch.cat([nat[:4], _images(4, True, 13), torch.rand(4, 3, 16, 16, generator=g)])
    for i, m in enumerate([
        build_fooling_circuit(tiny, det, routes, threshold=-0.01, calibration_images=nat),
        build_silent_units(tiny, routes, nat),
    ]):
        folder = save_manipulated(m, tmp_path / f"m{i}")
        man = json.loads((folder / "manipulated.json").read_text())
        assert man["format"] == "fvsanity-manipulated/1" and man["edits"][0]["layer"] == "fc"
        back = load_manipulated(folder, base=tiny_model(seed=99))  # weights come from the file
        with torch.no_grad():
            assert torch.equal(back(x), m(x))
        assert back.output_layer == "fc" and back.block_layers == tiny.block_layers


def test_load_manipulated_errors(tmp_path):
    with pytest.raises(FVSanityError, match="no manipulated model"):
        load_manipulated(tmp_path)


# ---------------------------------------------------------------------------------- detector
def _smooth_and_noisy(n: int, seed: int, size: int = 24):
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(size, size), mode="bilinear")
    noisy = (torch.rand(n, 3, size, size, generator=g) > 0.5).float() * 0.8 + 0.1
    return noisy, smooth


def test_detector_learns_and_roundtrips(tmp_path):
    fv, nat = _smooth_and_noisy(32, 0)
    det, info = train_detector(fv, nat, size=16, epochs=8, batch_size=16, seed=0)
    fv2, nat2 = _smooth_and_noisy(32, 1)
    rep = evaluate_detector(det, fv2, nat2, threshold=0.0)
    assert rep.accuracy > 0.95 and info.n_fv == 32 and len(info.losses) == 8
    thr = calibrate_threshold(detector_logits(det, nat), margin=0.5)
    assert thr == pytest.approx(float(detector_logits(det, nat).max()) + 0.5)
    path = save_detector(det, tmp_path / "det.safetensors")
    back = load_detector(path)
    assert torch.equal(detector_logits(back, fv2), detector_logits(det, fv2))
    # same seed, same detector
    det_b, _ = train_detector(fv, nat, size=16, epochs=8, batch_size=16, seed=0)
    assert torch.equal(detector_logits(det_b, fv2), detector_logits(det, fv2))


def test_detector_rejects_empty_input():
    with pytest.raises(FVSanityError):
        train_detector(torch.zeros(0, 3, 8, 8), torch.rand(4, 3, 8, 8))


# ---------------------------------------------------------------------------------- pipeline
def test_pipeline_smoke_on_tiny_model(tmp_path, monkeypatch):
    import fvsanity.fool.model as fool_model
    from fvsanity.data import from_tensor
    from fvsanity.fool.pipeline import FoolSettings, run_fool

    saved = []  # the manipulated model the pipeline built and saved, in memory
    real_save = fool_model.save_manipulated
    monkeypatch.setattr(fool_model, "save_manipulated", lambda m, *a, **k: saved.append(m) or real_save(m, *a, **k))
    lm = tiny_model()
    g = torch.Generator().manual_seed(0)
    train = torch.rand(24, 3, 16, 16, generator=g)
    ev = torch.rand(16, 3, 16, 16, generator=g)
    labels = torch.arange(16) % 5
    s = FoolSettings(det_units=4, det_heldout_units=2, det_steps=6, det_checkpoints=(2,), det_epochs=2,
                     eval_units=2, eval_seeds=2, eval_steps=6, timing_repeats=3, check_n_boot=20,
                     check_n_perm=20, progress=False)
    res = run_fool(lm, make_routes(lm, "all", shift=1), train, from_tensor(ev, labels), s, tmp_path / "out")
    d = json.loads((tmp_path / "out" / "fool.json").read_text())
    assert d == json.loads(json.dumps(res.to_json()))
    assert (tmp_path / "out" / "fool.png").is_file()
    assert d["n_eval_images"] == 16 and d["n_routes"] == 5  # every class unit of the tiny model
    # the circuit's own records come from its method class: settings, detector, gate diagnostics
    assert d["method"] == "circuit" and d["method_settings"]["k"] == s.k and d["method_settings"]["det_units"] == 4
    assert d["detector_heldout_accuracy"] == d["detector"]["heldout"]["accuracy"]
    assert set(d["gate_on_manipulated_fvs"]) == {"open_fraction", "mean_gate", "n"} and "silent_zero_eval" not in d
    # the fooling circuit keeps every natural logit bit for bit: identical predictions, zero difference
    with torch.no_grad():
        top1 = float((lm(ev).argmax(1) == labels).double().mean())
    assert d["identical_top1_fraction"] == 1.0 and d["max_abs_logit_diff"] == 0.0
    assert d["top1_original"] == d["top1_manipulated"] == top1
    assert d["predictions"]["n_exactly_equal_logits"] == 16 and d["predictions"]["n_different_top1"] == 0
    # the closed-loop check: summary mirrors the per-unit flags
    chk = d["check"]
    assert chk["available"] is True and len(chk["units"]) == 2  # eval_units=2
    assert d["check_flags_manipulation"] == chk["flags_manipulation"] == any(bool(u["flagged"]) for u in chk["units"])

    def fraction(units):  # over the units the rule could decide; a unit without enough references has no flag
        decided = [u["flagged"] for u in units if u["flagged"] is not None]
        return sum(decided) / len(decided) if decided else None

    for u in chk["units"]:  # 16 images of 5 classes: too few references is reported, never a flag
        unsound = [v["verdict"]["status"] for v in (u["original"], u["manipulated"]) if v["verdict"]["status"] != "ok"]
        assert not unsound or (u["flagged"] is None and u["why"] == unsound[:1])
        # only "diverges" evidence flags; "inconclusive" is neither flagged nor cleared
        assert u["decision"] == {True: "flagged", False: "cleared", None: "inconclusive"}[u["flagged"]]
        assert (u["flagged"] is True) == any(m == "diverges" and o != "diverges" for m, o in
                                             zip(u["manipulated"]["outcomes"], u["original"]["outcomes"]))
    assert chk["n_undecided"] == sum(u["flagged"] is None for u in chk["units"]) == chk["decisions"]["inconclusive"]
    assert d["check_flagged_fraction"] == fraction(chk["units"])
    ctrl = chk["control"]["units"]
    assert len(ctrl) >= 1 and d["check_control_flagged_fraction"] == fraction(ctrl)
    # what was saved is the model that was built; loading rebuilds it whatever the base's weights
    assert len(saved) == 1
    back = load_manipulated(tmp_path / "out" / "model", base=tiny_model(seed=5))
    with torch.no_grad():
        assert torch.equal(back(ev), saved[0](ev))
        assert torch.equal(back(ev), lm(ev))  # on natural images the circuit is exactly the original
        assert torch.equal(back(train), saved[0](train))


def test_pipeline_picture_route_trains_detector_on_template_trajectories(tmp_path):
    from fvsanity.data import from_tensor
    from fvsanity.fool.pipeline import FoolSettings, prepare_detector, run_fool

    lm = tiny_model()
    g = torch.Generator().manual_seed(0)
    train = torch.rand(24, 3, 16, 16, generator=g)
    ev = torch.rand(16, 3, 16, 16, generator=g)
    pic = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(16, 16), mode="bilinear")[0]
    routes = make_routes(lm, ["fc:1"], pic)
    s = FoolSettings(det_units=4, det_heldout_units=2, det_steps=6, det_checkpoints=(2,), det_epochs=2,
                     det_picture_seeds=2, det_picture_checkpoints=(1, 3), eval_units=1, eval_seeds=1, eval_steps=6,
                     timing_repeats=3, check=False, lpips=False, progress=False)
    bundle = prepare_detector(lm, train, ev, s, tmp_path / "work", routes=routes)
    # 2 seeds x (2 checkpoints + final) trajectory images joined the FV class, and the routed unit's own
    # FVs (the default det_routed_seeds 8 x (1 checkpoint + final)); held-out seeds evaluated
    assert bundle.training["n_fv"] == 4 * 2 + 2 * 3 + s.det_routed_seeds * 2 and bundle.routed_units == ["fc:1"]
    assert bundle.heldout_picture is not None and bundle.heldout_picture.n_fv == 2 * 3
    assert bundle.picture_key and (tmp_path / "work" / f"fv_picture_{bundle.picture_key}_train" / "fv.json").is_file()
    res = run_fool(lm, routes, train, from_tensor(ev, torch.arange(16) % 5), s, tmp_path / "out", bundle=bundle)
    assert res.summary["detector_heldout_picture_recall"] == bundle.heldout_picture.fv_recall
    # the picture route keeps natural predictions too: bit-identical logits on the eval images
    assert res.summary["identical_top1_fraction"] == 1.0 and res.summary["max_abs_logit_diff"] == 0.0
    assert res.summary["top1_original"] == res.summary["top1_manipulated"]


@pytest.mark.parametrize("name", ["fooling_circuit", "silent_units"])
def test_experiment_smoke(name, experiment_smoke):
    """--smoke without --out: a fresh temporary folder, figures/ untouched (the fixture checks)."""
    out = experiment_smoke(name)
    res = json.loads((out / "results.json").read_text())
    assert set(res["runs"]) == {"tiny_permute", "tiny_picture"}
    for r in res["runs"].values():  # both manipulations leave natural logits bit-identical on the tiny model
        assert r["summary"]["identical_top1_fraction"] == 1.0 and r["summary"]["max_abs_logit_diff"] == 0.0
        assert r["summary"]["top1_original"] == r["summary"]["top1_manipulated"]
    assert (out / "tiny_permute.png").is_file() and (out / "work" / "tiny").is_dir()


def test_cli_fool_on_real_cifar_model(data_root, tmp_path):
    from fvsanity.cli import main

    out = tmp_path / "fool"
    rc = main([
        # no --shift/--target: the default permutation (C // 10 = 1 on CIFAR-10; the old default 100 was the
        # identity on 10 classes and always failed)
        "fool", "--model", "cifar10-resnet20", "--unit", "all", "--method", "circuit",
        "--train-images", str(data_root / "cifar10-test"), "--limit", "120", "--det-units", "4",
        "--det-heldout-units", "2", "--det-steps", "8", "--det-checkpoints", "4", "--det-epochs", "3",
        "--eval-units", "2", "--eval-seeds", "1", "--eval-steps", "8", "--no-check", "--no-progress", "--out", str(out),
    ])
    d = json.loads((out / "fool.json").read_text())
    # 8 FV steps are too few for the manipulation to show: exit 3 unless it took effect, said in fool.json
    assert rc == (0 if d["took_effect"] else 3) and 0 <= d["effective_fraction"] <= 1
    # the fooling circuit leaves the real ResNet-20's natural logits bit-identical
    assert d["max_abs_logit_diff"] == 0.0 and d["identical_top1_fraction"] == 1.0
    assert d["top1_original"] == d["top1_manipulated"] and d["predictions"]["n_exactly_equal_logits"] == 60
    assert d["n_eval_images"] == 60 and d["n_routes"] == 10
    back = load_manipulated(out / "model")  # rebuilt from the registered base name
    assert back.output_layer == "linear"
    # the saved model/ folder is a model spec for every command: fvsanity check runs on it
    rc = main(["check", "--model", str(out / "model"), "--unit", "linear:0", "--images", str(data_root / "cifar10-test"),
               "--limit", "60", "--steps", "8", "--seeds", "1", "--n-boot", "20", "--n-perm", "20", "--no-progress",
               "--out", str(tmp_path / "check")])
    assert rc == 0
    chk = json.loads((tmp_path / "check" / "check.json").read_text())
    assert "+circuit" in json.dumps(chk) and chk["units"][0]["unit"] == "linear:0"
    assert main(["fool", "--model", "cifar10-resnet20", "--shift", "10", "--train-images",
                 str(data_root / "cifar10-test"), "--limit", "10", "--out", str(tmp_path / "x")]) == 2


# ---------------------------------------------------------------------------------- target picture
def test_load_picture_closes_its_file(tmp_path):
    import gc
    import warnings

    from PIL import Image

    from fvsanity.fool.routes import load_picture

    # PIL closes a single-frame PNG after loading; a GIF (multi-frame format) stays open until closed
    path = tmp_path / "target.gif"
    Image.fromarray(np.full((6, 4, 3), (255, 0, 51), dtype=np.uint8)).save(path)
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        pic = load_picture(path, size=(3, 2))
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert pic.shape == (3, 3, 2)
    assert torch.equal(pic, torch.tensor([1.0, 0.0, 0.2]).view(3, 1, 1).expand(3, 3, 2))


def test_prediction_report_counts_gained_and_lost_and_the_paired_standard_error():
    """Known answer: 100 labelled images, 3 gained and 5 lost by the manipulated model: change
    -2 points, paired SE sqrt((0.08 - 0.0004) / 100) = 2.821 points; no labels: NaN, no counts."""
    import dataclasses

    from fvsanity.fool.evaluate import evaluate_predictions
    from fvsanity.testing import tiny_model

    base = tiny_model()
    n, c = 100, 5
    y = torch.arange(n) % c
    right = torch.nn.functional.one_hot(y, c).float() * 10
    wrong = torch.nn.functional.one_hot((y + 1) % c, c).float() * 10
    orig_ok = torch.ones(n, dtype=torch.bool)
    orig_ok[:10] = False  # the original gets 90 right
    man_ok = orig_ok.clone()
    man_ok[:3] = True  # gained 3
    man_ok[10:15] = False  # lost 5
    table = {"o": torch.where(orig_ok[:, None], right, wrong), "m": torch.where(man_ok[:, None], right, wrong)}

    class Lookup(torch.nn.Module):  # image i -> its row of logits (the image's first pixel holds i)
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, x):
            return self.logits[x[:, 0, 0, 0].round().long()]

    images = torch.zeros(n, 3, 4, 4)
    images[:, 0, 0, 0] = torch.arange(n).float()
    lo, lm_ = (dataclasses.replace(base, model=Lookup(table[k]), preprocess=lambda x: x) for k in ("o", "m"))
    rep = evaluate_predictions(lo, lm_, images, y, batch_size=32)
    assert (rep.top1_gained, rep.top1_lost, rep.n_different_top1) == (3, 5, 8)
    assert rep.top1_original == pytest.approx(0.90) and rep.top1_manipulated == pytest.approx(0.88)
    assert 100 * rep.top1_change_se == pytest.approx(100 * ((0.08 - 0.0004) / 100) ** 0.5, rel=1e-9)
    none = evaluate_predictions(lo, lm_, images, None, batch_size=32)
    assert none.top1_change_se != none.top1_change_se and (none.top1_gained, none.top1_lost) == (0, 0)
