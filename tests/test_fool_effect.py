"""Did the manipulation take effect? ``effective_fraction`` in fool.json, ``fvsanity fool`` exiting 3
with one stderr line when it did not, the criterion's known answers, the routed units' own FV
trajectories in the circuit's detector, and one default for the evaluation seeds."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fvsanity.fool import (
    FoolSettings,
    ManipulatedModel,
    Manipulation,
    make_routes,
    register_manipulation,
    unregister_manipulation,
    wrap_loaded,
)
from fvsanity.fool.effect import PICTURE_SSIM_MARGIN, measure_effect
from fvsanity.models import list_models, register_model
from fvsanity.testing import random_image_folder, tiny_model

TINY = "fool-effect-test-tiny"

if TINY not in list_models():
    register_model(TINY)(lambda pretrained=True: dataclasses.replace(tiny_model(), name=TINY))


class Unchanged(Manipulation):
    """Builds the original model back (no edit): its FVs cannot reach any other target."""

    name = "unchanged-test"
    help = "test plug-in: changes nothing"

    def build(self, lm, routes, train_images, settings, *, prepared=None):
        return wrap_loaded(lm, ManipulatedModel(lm.model, lm.preprocess), self.name)

    def ineffective_hint(self, details, prepared, settings) -> str:
        return "raise --nothing (this method changes nothing)"


@pytest.fixture
def unchanged():
    register_manipulation(Unchanged)
    try:
        yield Unchanged
    finally:
        unregister_manipulation(Unchanged.name)




def test_cli_exits_3_with_one_stderr_line_when_the_manipulation_did_not_take_effect(unchanged, tmp_path, capsys):
    from fvsanity.cli import main

    images = random_image_folder(tmp_path / "images")
    out = tmp_path / "out"
    rc = main(["fool", "--model", TINY, "--method", Unchanged.name, "--unit", "fc:0,fc:1", "--shift", "1",
               "--train-images", str(images), "--eval-seeds", "2", "--eval-steps", "4", "--no-check",
               "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3
    assert len(err) == 1 and "did not take effect" in err[0] and "raise --nothing" in err[0], err
    d = json.loads((out / "fool.json").read_text())  # written all the same, and says so
    assert d["effective_fraction"] == 0.0 and d["took_effect"] is False
    assert d["not_effective_hint"] == "raise --nothing (this method changes nothing)"
    assert d["effect"]["n_units"] == 2 and [u["kind"] for u in d["effect"]["units"]] == ["class", "class"]
    # the same model both ways: the manipulated FVs are the original FVs, so the target-class shares agree
    assert d["fv_top1_is_target_class_manipulated"] == d["fv_top1_is_target_class_original"]
    assert (out / "model").is_dir()


def test_eval_seeds_has_one_default_declared_in_the_dataclass():
    from fvsanity.cli import build_parser
    from fvsanity.compare.verdict import replicates_needed

    fool = build_parser()._subparsers._group_actions[0].choices["fool"]
    defaults = {a.dest: a.default for a in fool._actions}
    s = FoolSettings()
    assert (defaults["eval_seeds"], defaults["eval_units"], defaults["eval_steps"]) == (
        s.eval_seeds, s.eval_units, s.eval_steps)
    # enough seeds for the closed loop's "diverges" claim over a path of up to 12 layers (Holm)
    assert s.eval_seeds >= replicates_needed(n_layers=12)
    # the circuit's routed-unit settings: one default, FoolSettings and the method's settings alike
    from fvsanity.fool import CircuitSettings

    c = CircuitSettings()
    assert (c.det_routed_seeds, c.det_routed_units) == (s.det_routed_seeds, s.det_routed_units)
    assert defaults["det_routed_seeds"] == s.det_routed_seeds


class ColorNet(torch.nn.Module):
    """Hand-weighted classifier: logits = (mean R, mean G, mean B, 0, 0), so red images are class 0."""

    def forward(self, x):
        return torch.cat([x.mean((2, 3)), torch.zeros(len(x), 2)], 1)


def test_effect_criterion_known_answers():
    """Class targets: FVs the original model calls the target class; pictures: the SSIM margin."""
    base = tiny_model()
    lm = dataclasses.replace(base, model=ColorNet(), preprocess=lambda x: x)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g) * 0.1
    red, green = x.clone(), x.clone()
    red[:, 0] += 0.5
    green[:, 1] += 0.5
    routes = make_routes(base, ["fc:1"], shift=4)  # unit fc:1 shows class 0 (red)
    assert str(routes[0].source) == "fc:0"
    zero = torch.zeros(2)
    rep = measure_effect(lm, routes, red[None], green[None], red[None], zero, zero)
    assert rep.effective_fraction == 1.0 and rep.took_effect and rep.units[0].manipulated == 1.0
    assert rep.units[0].original == 0.0 and rep.units[0].kind == "class"
    mixed = torch.stack([red[0], green[1]])[None]  # half the seeds reach it: SEED_SHARE 0.5 is enough
    assert measure_effect(lm, routes, mixed, green[None], red[None], zero, zero).effective_fraction == 1.0
    rep = measure_effect(lm, routes, green[None], green[None], red[None], zero, zero)
    assert rep.effective_fraction == 0.0 and not rep.took_effect
    # a picture route: effective iff the mean SSIM gain reaches the margin
    pic = torch.rand(3, 16, 16, generator=g)
    proutes = make_routes(base, ["fc:0"], pic)
    fv = x[None]
    for gain, want in ((PICTURE_SSIM_MARGIN + 0.01, True), (PICTURE_SSIM_MARGIN - 0.01, False)):
        rep = measure_effect(lm, proutes, fv, fv, fv, torch.tensor([0.1 + gain, 0.1 + gain]), torch.tensor([0.1, 0.1]))
        assert rep.units[0].kind == "picture" and rep.units[0].effective is want


def test_detector_learns_the_routed_units_own_trajectories_with_other_seeds(tmp_path):
    from fvsanity.fool.pipeline import ROUTED_SEED0, prepare_detector

    lm = tiny_model()
    g = torch.Generator().manual_seed(0)
    train = torch.rand(24, 3, 16, 16, generator=g)
    ev = torch.rand(16, 3, 16, 16, generator=g)
    routes = make_routes(lm, ["fc:1"], shift=2)  # fc:1 shows fc:3: both units' trajectories are learned
    s = FoolSettings(det_units=4, det_heldout_units=2, det_steps=6, det_checkpoints=(2,), det_epochs=2,
                     det_routed_seeds=2, det_refine_rounds=1, progress=False)
    b = prepare_detector(lm, train, ev, s, tmp_path / "work", routes=routes)
    assert b.routed_units == ["fc:1", "fc:3"] and b.routed_seeds == [ROUTED_SEED0, ROUTED_SEED0 + 1]
    assert not set(b.routed_units) & set(b.heldout_units)  # never held out: its recall would be inflated
    assert set(b.routed_units) <= set(b.train_units)
    # 4 other units x 1 seed + 2 routed units x 2 seeds, each final + 1 checkpoint; then the refinement
    # round: the manipulated unit fc:1's trajectories on the circuit (2 seeds x 2 images)
    assert b.training["n_fv"] == (4 * 1 + 2 * 2) * 2 + 2 * 2 and b.refine_rounds == 1
    assert (tmp_path / "work" / "fv_detector_refine1" / "fv.json").is_file()
    # the seeds are none of the evaluation's (2000+) or the control's (3000+)
    assert all(sd < 1000 for sd in b.routed_seeds)
    off = prepare_detector(lm, train, ev, dataclasses.replace(s, det_routed_seeds=0), tmp_path / "work0", routes=routes)
    assert off.routed_units == [] and off.training["n_fv"] == 4 * 2 and off.refine_rounds == 0


def test_the_hint_names_the_setting_that_failed():
    from fvsanity.fool import CircuitSettings, FoolingCircuit, SilentUnits
    from fvsanity.fool.methods import SilentSettings

    silent = SilentUnits()
    assert "lower --silent-margin-range (now 4;" in silent.ineffective_hint(
        {"silent_fired_on_manipulated_fvs": 0.0}, None, SilentSettings())
    assert silent.ineffective_hint({"silent_fired_on_manipulated_fvs": 1.0}, None, SilentSettings()).startswith(
        "raise --strength")
    circuit = FoolingCircuit()
    details = {"effect": {"units": [{"unit": "linear:3"}]}, "gate_on_manipulated_fvs": {"open_fraction": 0.25}}
    assert circuit.ineffective_hint(details, None, CircuitSettings(det_routed_seeds=0)).startswith(
        "raise --det-routed-seeds (now 0")
    assert circuit.ineffective_hint(details, None, CircuitSettings()).startswith("raise --det-routed-units")
    learned = type("Bundle", (), {"train_units": ["linear:3", "linear:5"]})()
    assert circuit.ineffective_hint(details, learned, CircuitSettings()) == "raise --det-routed-seeds (now 8)"
