"""Manipulation methods as plug-ins: a method registered from this test file runs
through ``fvsanity fool --method``; the run's steps, ``eval_units=``, settings from dataclasses,
and manipulated models loading through the model registry's loader hook."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from fvsanity.errors import FVSanityError
from fvsanity.fool import (
    CircuitSettings,
    FoolingCircuit,
    FoolSettings,
    ManipulatedModel,
    Manipulation,
    MethodSettings,
    SilentUnits,
    get_manipulation,
    list_manipulations,
    make_routes,
    pick_eval_routes,
    register_edit,
    register_manipulation,
    run_fool,
    save_manipulated,
    setting,
    unregister_manipulation,
    wrap_loaded,
)
from fvsanity.models import list_models, load_model, register_loader, register_model
from fvsanity.testing import random_image_folder, tiny_model

ROOT = Path(__file__).resolve().parents[1]
TINY = "fool-plugin-test-tiny"


def _tiny(pretrained: bool = True):
    return dataclasses.replace(tiny_model(), name=TINY)


if TINY not in list_models():
    register_model(TINY)(_tiny)


# ------------------------------------------------------------------------------ the toy method
@register_edit("test_scale")
class ScaleEdit(nn.Module):
    """Wraps a layer; multiplies its ``channels`` by ``factor`` (``[N,C]`` or ``[N,C,H,W]``)."""

    def __init__(self, orig: nn.Module, channels, factor: float = 1.0):
        super().__init__()
        self.orig = orig
        self.register_buffer("channels", torch.as_tensor(channels, dtype=torch.long))
        self.register_buffer("factor", torch.tensor(float(factor)))

    def spec(self) -> dict:
        return {"channels": self.channels.tolist()}

    @classmethod
    def from_spec(cls, orig, spec):
        return cls(orig, spec["channels"])

    def forward(self, x):
        y = self.orig(x)
        return y.index_copy(1, self.channels, y.index_select(1, self.channels) * self.factor.to(y.dtype))


@dataclass(frozen=True)
class ScaleSettings(MethodSettings):
    factor: float = setting(2.0, "multiply each routed unit by this", gt=0)


class ScaleUnits(Manipulation):
    """A toy method: every routed unit's channel is multiplied by ``factor``."""

    name = "toy"
    help = "test plug-in: scales the routed units"
    Settings = ScaleSettings

    def build(self, lm, routes, train_images, settings, *, prepared=None):
        w = ManipulatedModel(lm.model, lm.preprocess)
        by_layer: dict[str, list[int]] = {}
        for r in routes:
            by_layer.setdefault(r.unit.layer, []).append(r.unit.channel)
        for layer, channels in by_layer.items():
            w.replace(layer, ScaleEdit(w.module_at(layer), channels, settings.factor))
        return wrap_loaded(lm, w.to(lm.device), self.name)

    def natural_diagnostics(self, fooled, eval_images, train_images, settings) -> dict:
        return {"toy_n_natural": len(eval_images) + len(train_images)}

    def summary(self, details, prepared, settings) -> dict:
        return {"toy_factor": settings.factor}


@pytest.fixture
def toy_method():
    register_manipulation(ScaleUnits)
    try:
        yield ScaleUnits
    finally:
        unregister_manipulation("toy")




# ------------------------------------------------------------------------------ through the CLI
def test_cli_runs_a_manipulation_registered_from_the_test_file(toy_method, tmp_path, capsys):
    from fvsanity.cli import main

    images = random_image_folder(tmp_path / "images")
    out = tmp_path / "out"
    rc = main(["fool", "--model", TINY, "--method", "toy", "--factor", "3", "--shift", "1", "--unit", "all",
               "--train-images", str(images), "--eval-units", "2", "--eval-seeds", "1", "--eval-steps", "4",
               "--no-check", "--no-progress", "--out", str(out)])
    # scaling a class unit does not make its FV show the next class: exit 3, the outputs written all the same
    assert rc == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did not take effect" in err[0], err
    for name in ("fool.json", "fool.png", "config.json", "model/manipulated.json", "model/model.safetensors"):
        assert (out / name).is_file(), name
    d = json.loads((out / "fool.json").read_text())
    assert d["method"] == "toy" and d["manipulated_model"] == f"{TINY}+toy"
    assert d["method_settings"] == {"factor": 3.0} and d["settings"]["method_options"] == {"factor": 3.0}
    assert d["toy_factor"] == 3.0 and d["toy_n_natural"] == 20  # the method's own summary and diagnostics
    assert d["n_routes"] == 5 and len(d["fv_similarity"]["ssim_manipulated_per_fv"]) == 2
    assert json.loads((out / "model" / "manipulated.json").read_text())["method"] == "toy"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"] == "toy" and cfg["factor"] == 3.0
    # the saved folder is a model spec (the loader hook fvsanity.fool registers): every class unit x3
    back = load_model(str(out / "model"))
    lm = _tiny()
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(x), lm(x) * 3)
    assert d["max_abs_logit_diff"] > 0
    # the flag's check comes from the settings dataclass: one line, exit 2
    capsys.readouterr()
    assert main(["fool", "--model", TINY, "--method", "toy", "--factor", "0", "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fvsanity: error: --factor must be > 0, got 0.0"]


def test_method_choices_come_from_the_registry(toy_method, capsys):
    from fvsanity.cli import main

    assert list_manipulations() == ["circuit", "silent", "slingshot", "toy"]
    assert main(["fool", "--method", "nope"]) == 2
    assert "invalid choice: 'nope' (choose from 'circuit', 'silent', 'slingshot', 'toy')" in capsys.readouterr().err
    unregister_manipulation("toy")
    assert main(["fool", "--method", "toy"]) == 2
    assert "invalid choice: 'toy' (choose from 'circuit', 'silent', 'slingshot')" in capsys.readouterr().err
    register_manipulation(ScaleUnits)  # for the fixture's teardown


def test_method_flags_come_from_each_settings_dataclass(toy_method):
    from fvsanity.cli import build_parser

    fool = build_parser()._subparsers._group_actions[0].choices["fool"]
    groups = {g.title: sorted(a.dest for a in g._group_actions) for g in fool._action_groups}
    assert groups["--method toy"] == ["factor"]
    assert groups["--method silent"] == sorted(f.name for f in dataclasses.fields(SilentUnits.Settings))
    assert groups["--method circuit"] == sorted(f.name for f in dataclasses.fields(CircuitSettings))
    # existing flags keep their names and defaults (margin_sd 0.25 since the circuit takes effect by
    # default: see FoolSettings), and the flags' defaults are the settings dataclasses'
    args = fool.parse_args(["--method", "circuit"])
    assert (args.det_units, args.det_steps, args.det_checkpoints, args.k, args.margin, args.margin_sd) == (
        48, 256, "4,16,32,64,128", 1000.0, 1.0, 0.25)
    assert (args.det_routed_seeds, args.det_routed_units, args.det_refine_rounds) == (8, 64, 0)
    assert {f.name: getattr(args, f.name) for f in dataclasses.fields(CircuitSettings) if f.default is not None
            and not isinstance(f.default, tuple)} == {f.name: getattr(FoolSettings(), f.name)
                                                      for f in dataclasses.fields(CircuitSettings)
                                                      if f.default is not None and not isinstance(f.default, tuple)}
    assert (args.lam, args.strength, args.silent_mode, args.silent_margin_range, args.silent_offset,
            args.silent_width) == (3.0, 100.0, "trigger", 4.0, 10.0, 10.0)


def test_a_plugin_whose_flag_clashes_is_refused_in_one_line(tmp_path, capsys):
    from fvsanity.cli import main

    @dataclass(frozen=True)
    class Clash(MethodSettings):
        strength: float = setting(1.0, "not silent's strength")

    class ClashMethod(Manipulation):
        name = "clash"
        Settings = Clash

    register_manipulation(ClashMethod)
    try:
        assert main(["fool", "--out", str(tmp_path)]) == 2
        assert "manipulation 'clash': setting 'strength' clashes with method 'silent'" in capsys.readouterr().err
    finally:
        unregister_manipulation("clash")


# ------------------------------------------------------------------------------ the registry
def test_registry_refuses_duplicates_and_unknown_names():
    with pytest.raises(FVSanityError, match="'circuit' is already registered"):
        register_manipulation(FoolingCircuit)
    with pytest.raises(FVSanityError, match=r"unknown manipulation 'magic' \(choices: circuit, silent, slingshot\)"):
        get_manipulation("magic")
    with pytest.raises(FVSanityError, match="has no name"):
        register_manipulation(type("Nameless", (Manipulation,), {}))
    with pytest.raises(FVSanityError, match="unknown manipulation 'magic'"):
        run_fool(tiny_model(), [], torch.rand(2, 3, 16, 16), _natural(4), FoolSettings(method="magic"), "unused")


def test_method_settings_read_flat_fields_and_method_options(toy_method):
    assert FoolingCircuit.settings_from(FoolSettings(k=5.0, det_checkpoints=[2, 4], det_steps=8)) == CircuitSettings(
        k=5.0, det_checkpoints=(2, 4), det_steps=8)
    assert SilentUnits.settings_from(FoolSettings(silent_mode="filter")).silent_mode == "filter"
    assert ScaleUnits.settings_from(FoolSettings(method="toy", method_options={"factor": 4.0})).factor == 4.0
    with pytest.raises(FVSanityError, match=r"method 'toy' has no setting 'scale'; valid: factor"):
        ScaleUnits.settings_from(FoolSettings(method_options={"scale": 4.0}))
    with pytest.raises(FVSanityError, match=r"--det-steps must be >= 1, got 0"):
        CircuitSettings(det_steps=0)
    with pytest.raises(FVSanityError, match=r"--det-checkpoints '4,16' out of range; valid: 1\.\.8"):
        CircuitSettings(det_steps=8, det_checkpoints=(4, 16))
    with pytest.raises(FVSanityError, match=r"--silent-mode 'loud' is not valid; valid: filter, trigger"):
        SilentUnits.Settings(silent_mode="loud")

    @dataclass(frozen=True)
    class Plain:  # a plain dataclass (not MethodSettings): checked when the method makes it
        n: int = setting(1, "how many", min=1)

    class PlainMethod(Manipulation):
        name = "plain"
        Settings = Plain

    with pytest.raises(FVSanityError, match=r"--n must be >= 1, got 0"):
        PlainMethod.settings_from(FoolSettings(method_options={"n": 0}))


# ------------------------------------------------------------------------------ steps
def _natural(n: int, seed: int = 0):
    from fvsanity.data import from_tensor

    g = torch.Generator().manual_seed(seed)
    return from_tensor(torch.rand(n, 3, 16, 16, generator=g), torch.arange(n) % 5)


def test_pick_eval_routes_takes_the_callers_units_in_order():
    lm = tiny_model()
    routes = make_routes(lm, "all", shift=1)
    assert [str(r.unit) for r in pick_eval_routes(routes, 2, 0, units=["fc:3", "fc:0"])] == ["fc:3", "fc:0"]
    seeded = pick_eval_routes(routes, 2, 0)
    assert len(seeded) == 2 and seeded == pick_eval_routes(routes, 2, 0) and pick_eval_routes(routes, 9, 0) == routes
    with pytest.raises(FVSanityError, match=r"eval unit 'relu1:0' is not a manipulated unit; routed: fc:0, fc:1"):
        pick_eval_routes(routes, 2, 0, units=["relu1:0"])
    with pytest.raises(FVSanityError, match="repeats a unit"):
        pick_eval_routes(routes, 2, 0, units=["fc:1", "fc:1"])
    with pytest.raises(FVSanityError, match="eval_units is empty"):
        pick_eval_routes(routes, 2, 0, units=[])


def test_run_fool_evaluates_the_given_units_with_a_plugin_method(toy_method, tmp_path):
    lm = tiny_model()
    routes = make_routes(lm, "all", shift=1)
    s = FoolSettings(method="toy", method_options={"factor": 0.5}, eval_units=1, eval_seeds=1, eval_steps=3,
                     timing_repeats=2, check=False, lpips=False, progress=False)
    res = run_fool(lm, routes, torch.rand(8, 3, 16, 16), _natural(10), s, tmp_path / "out", eval_units=["fc:4", "fc:2"])
    assert res.figure_fvs["units"] == ["fc:4", "fc:2"]  # not the seeded pick of eval_units=1
    assert res.summary["method"] == "toy" and res.summary["toy_factor"] == 0.5
    assert res.details["method_settings"] == {"factor": 0.5} and "check" not in res.details
    assert json.loads((tmp_path / "out" / "fool.json").read_text())["toy_factor"] == 0.5


# ------------------------------------------------------------------------------ loader hook
def test_manipulated_folders_load_through_the_model_registry(tmp_path):
    from fvsanity.fool import build_silent_units

    lm = _tiny()
    fooled = ScaleUnits().build(lm, make_routes(lm, ["fc:1"], shift=1), None, ScaleSettings(factor=2.0))
    folder = save_manipulated(fooled, tmp_path / "model")
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_model(str(folder))(x), fooled(x))
    with pytest.raises(FVSanityError, match="with its own weights; drop --weights"):
        load_model(str(folder), weights=str(folder / "model.safetensors"))
    with pytest.raises(FVSanityError, match="model loader 'manipulated' is already registered"):
        register_loader("manipulated", lambda spec: False, lambda spec, **kw: None)
    # a fresh interpreter that imports only fvsanity.models: fvsanity (its parent) registers the hook
    silent = build_silent_units(lm, make_routes(lm, ["fc:1"], shift=1), torch.rand(8, 3, 16, 16), mode="filter")
    folder = save_manipulated(silent, tmp_path / "silent")
    code = (f"import sys, dataclasses, fvsanity.testing as T; from fvsanity.models import load_model, register_model; "
            f"register_model({TINY!r})(lambda pretrained=True: dataclasses.replace(T.tiny_model(), name={TINY!r})); "
            "lm = load_model(sys.argv[1]); print(lm.name, type(lm.model).__name__)")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [f"{TINY}+silent", "ManipulatedModel"]
