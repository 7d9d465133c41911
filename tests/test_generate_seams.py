"""The generator's plug-in seams: the registry convention, parametrizations (fft, pixel, MACO),
objectives (lucent's algebra), optimizers, RenderSettings; toy entries registered from this file
and run through the CLI."""

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from fvsanity import cli
from fvsanity.errors import FVSanityError
from fvsanity.generate import (
    OBJECTIVES,
    OPTIMIZERS,
    PARAMS,
    FVResult,
    RenderSettings,
    render,
    score_images,
)
from fvsanity.generate.objectives import channel
from fvsanity.generate.param import _COLOR, maco_image, magnitude_spectrum
from fvsanity.registry import Registry, RegistryError
from fvsanity.units import parse_unit


# -- the registry convention -------------------------------------------------------------------
def test_registry_register_get_names_contains():
    reg = Registry("widget")
    assert reg.names() == () and "a" not in reg and len(reg) == 0

    @reg.register("alpha")
    def alpha():
        return 1

    beta = reg.register("beta", lambda: 2)
    assert alpha() == 1 and reg.get("alpha") is alpha and reg.get("beta") is beta
    assert reg.names() == ("alpha", "beta")  # registration order
    assert "alpha" in reg and "gamma" not in reg and 3 not in reg
    assert list(reg) == ["alpha", "beta"] and len(reg) == 2


def test_registry_refuses_duplicates_and_names_unknowns():
    reg = Registry("widget")
    reg.register("alpha", object())
    reg.register("beta", object())
    with pytest.raises(RegistryError) as e:
        reg.register("alpha", object())
    msg = str(e.value)
    assert "\n" not in msg and "'alpha' is already registered" in msg and "alpha, beta" in msg
    assert isinstance(e.value, FVSanityError)

    with pytest.raises(RegistryError) as e:
        reg.get("alpah")
    msg = str(e.value)
    assert msg == "unknown widget 'alpah'; did you mean 'alpha'? (choices: alpha, beta)"
    with pytest.raises(RegistryError) as e:
        reg.get("zzz")
    assert str(e.value) == "unknown widget 'zzz' (choices: alpha, beta)"
    with pytest.raises(RegistryError, match="non-empty string"):
        reg.register("", object())


def test_registry_unregister_and_registered_context_undo_themselves():
    reg = Registry("widget")
    o = object()
    reg.register("alpha", o)
    assert reg.unregister("alpha") is o and "alpha" not in reg
    with pytest.raises(RegistryError, match="unknown widget 'alpha'"):
        reg.unregister("alpha")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with reg.registered("toy", o) as got:
            assert got is o and reg.get("toy") is o
            raise Boom
    assert "toy" not in reg


# -- helpers ---------------------------------------------------------------------------------------
R20 = ["--model", "cifar10-resnet20", "--random-weights", "--no-progress"]


def _raw(images: torch.Tensor) -> torch.Tensor:
    """Invert to_valid_rgb (sigmoid, colour decorrelation): RGB [..., 3, H, W] -> parametrization space."""
    x = torch.logit(images.double())
    return torch.einsum("...chw,dc->...dhw", x, torch.linalg.inv(_COLOR.double()))


def _choices(command: str, flag: str) -> list:
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    return next(a for a in sub._actions if flag in a.option_strings).choices


# -- settings ----------------------------------------------------------------------------------
def test_render_settings_object_equals_keywords_and_refuses_unknown(tiny):
    s = RenderSettings(steps=6, lr=0.1, progress=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.steps = 3
    a = render(tiny, ["conv3:1", "fc:2"], [4], s)
    b = render(tiny, ["conv3:1", "fc:2"], seeds=[4], steps=6, lr=0.1, progress=False)
    c = render(tiny, ["conv3:1", "fc:2"], [4], RenderSettings(steps=99, progress=False), steps=6, lr=0.1)  # overrides win
    assert torch.equal(a.images, b.images) and torch.equal(a.images, c.images)
    assert a.settings_hash == b.settings_hash == c.settings_hash
    with pytest.raises(FVSanityError) as e:
        render(tiny, ["conv3:1"], steps=2, progress=False, stepz=3)
    assert "unknown render setting 'stepz'" in str(e.value) and "steps" in str(e.value)
    with pytest.raises(FVSanityError, match="settings must be a RenderSettings .* got int"):
        render(tiny, ["conv3:1"], [0], 5)  # the old positional `steps`


def test_default_settings_dict_and_hash_unchanged(tiny):
    """Caches and --fv reuse key on settings_hash: a default float32 render must record what it always did
    (float32 explicitly: on a CPU with native bf16 the default is bf16, which records a dtype, tests/test_amp.py)."""
    r = render(tiny, ["conv3:1", "fc:2", "conv3:7@2,1"], seeds=[3, 5], steps=15, progress=False, diversity=0.1,
               amp=False)
    assert list(r.settings) == ["model", "model_fingerprint", "weights_source", "steps", "size", "lr", "param",
                                "decorrelate", "transforms", "diversity", "device", "amp", "batch_size", "seconds"]
    # the hash covers the FV compute width (batch_size) since batches have one fixed shape: FVs of
    # the older neighbour-dependent batching hash differently, so no cache serves them as these
    assert r.settings_hash == "21c80c7a2060"
    p = render(tiny, ["conv3:1", "fc:2"], seeds=[3], steps=10, progress=False, param="pixel", checkpoints=(5,),
               amp=False)
    assert p.settings_hash == "34e49e913d67"
    # a non-default optimizer, options or objective enter the settings (and the hash)
    o = render(tiny, ["conv3:1"], seeds=[3], steps=2, progress=False, optimizer="sgd", optimizer_options={"momentum": 0.5})
    assert o.settings["optimizer"] == "sgd" and o.settings["optimizer_options"] == {"momentum": 0.5}
    d = render(tiny, ["conv3:1"], seeds=[3], steps=2, progress=False)
    assert "optimizer" not in d.settings and o.settings_hash != d.settings_hash


# -- parametrizations --------------------------------------------------------------------------
def test_param_registry_feeds_render_and_cli_choices(tiny):
    assert PARAMS.names()[:3] == ("fft", "pixel", "maco")
    assert _choices("visualize", "--param") == list(PARAMS.names())
    with pytest.raises(FVSanityError, match="unknown parametrization 'ftt'; did you mean 'fft'"):
        render(tiny, ["conv3:1"], steps=1, progress=False, param="ftt")
    with pytest.raises(FVSanityError, match="parametrization 'fft' has no option 'decay'; options: sd, decay_power"):
        render(tiny, ["conv3:1"], steps=1, progress=False, param_options={"decay": 2.0})
    # an option changes the FV and is recorded
    a = render(tiny, ["conv3:1"], seeds=[0], steps=4, progress=False)
    b = render(tiny, ["conv3:1"], seeds=[0], steps=4, progress=False, param_options={"decay_power": 1.5})
    assert not torch.equal(a.images, b.images) and b.settings["param_options"] == {"decay_power": 1.5}


def test_maco_optimizes_phase_only_magnitude_stays_fixed():
    params, fn, mag = maco_image((12, 10), [3, 5])
    (phase,) = params
    assert phase.shape == (2, 3, 12, 6) and mag.shape == (3, 12, 6)
    before = phase.detach().clone()
    target = torch.randn(2, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(params, lr=0.1)
    for _ in range(20):
        opt.zero_grad()
        loss = -(fn() * target).sum()
        loss.backward()
        assert torch.isfinite(phase.grad).all()
        opt.step()
    assert (phase.detach() - before).abs().max() > 0.1  # the phase moved
    spec = torch.fft.rfftn(fn().detach(), dim=(-2, -1), norm="ortho")
    # every bin but the zero and Nyquist columns (whose imaginary part irfft drops) keeps its magnitude
    assert torch.allclose(spec.abs()[..., 1:-1], mag.expand(2, -1, -1, -1)[..., 1:-1], atol=1e-5)
    # the default magnitude: fft's 1/f shape at the requested contrast (pixel std ~ contrast)
    assert 0.8 < fn().detach().std().item() < 1.1
    # an element's init depends only on its seed
    assert torch.equal(maco_image((12, 10), [5])[0][0][0], before[1])


def test_maco_render_keeps_the_spectrum_and_is_batch_exact(tiny):
    r = render(tiny, ["conv3:1", "fc:2"], seeds=[0, 1], steps=10, progress=False, param="maco")
    alone = render(tiny, ["fc:2"], seeds=[0, 1], steps=10, progress=False, param="maco")
    assert torch.allclose(r.images[1], alone.images[0], atol=1e-5)
    assert (r.traces[..., -1] > r.traces[..., 0]).all()  # optimizing the phase alone raises the objective
    _, _, mag = maco_image((16, 16), [0])
    spec = torch.fft.rfftn(_raw(r.images), dim=(-2, -1), norm="ortho").abs()
    assert torch.allclose(spec[..., 1:-1], mag.double().expand_as(spec)[..., 1:-1], rtol=1e-3, atol=1e-3)


def test_maco_natural_magnitude_tensor_or_file(tiny, tmp_path):
    nat = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1
    mag = magnitude_spectrum(nat)
    assert mag.shape == (3, 16, 9)
    torch.save(mag, tmp_path / "spec.pt")
    a = render(tiny, ["conv3:1"], seeds=[2], steps=5, progress=False, param="maco", param_options={"magnitude": mag})
    b = render(tiny, ["conv3:1"], seeds=[2], steps=5, progress=False, param="maco",
               param_options={"magnitude": str(tmp_path / "spec.pt")})
    assert torch.equal(a.images, b.images)
    assert a.settings["param_options"]["magnitude"]["shape"] == [3, 16, 9]
    spec = torch.fft.rfftn(_raw(a.images[0, 0]), dim=(-2, -1), norm="ortho").abs()
    assert torch.allclose(spec[..., 1:-1], mag.double()[..., 1:-1], rtol=1e-3, atol=1e-3)
    with pytest.raises(FVSanityError, match=r"maco magnitude must be \[3, H, W//2\+1\]"):
        render(tiny, ["conv3:1"], steps=1, progress=False, param="maco", param_options={"magnitude": torch.ones(2, 4, 4)})
    with pytest.raises(FVSanityError, match="not found"):
        render(tiny, ["conv3:1"], steps=1, progress=False, param="maco", param_options={"magnitude": "nope.pt"})


# -- objectives --------------------------------------------------------------------------------
def test_objective_algebra_through_render(tiny):
    obj = channel("conv3", 1) - 0.5 * channel("conv3", 2)
    r = render(tiny, objective=obj, seeds=[0, 1], steps=8, progress=False)
    assert r.images.shape == (1, 2, 3, 16, 16) and r.objectives == [obj.name]
    c1, _ = score_images(tiny, r.images, [parse_unit("conv3:1", tiny)])
    c2, _ = score_images(tiny, r.images, [parse_unit("conv3:2", tiny)])
    assert torch.allclose(r.final, c1 - 0.5 * c2, atol=1e-5)
    assert r.settings["objective"] == [obj.name]
    # one objective per row; rows are independent (batch == separate runs)
    other = channel("fc", 3)
    two = render(tiny, objective=[obj, other], seeds=[0, 1], steps=8, progress=False)
    assert torch.allclose(two.images[0], r.images[0], atol=1e-5)
    alone = render(tiny, objective=other, seeds=[0, 1], steps=8, progress=False)
    assert torch.allclose(two.images[1], alone.images[0], atol=1e-5)
    # a plain channel objective is the unit path, and units label objective rows one to one
    u = render(tiny, ["conv3:1"], seeds=[0], steps=8, progress=False)
    o = render(tiny, ["conv3:1"], objective=[channel("conv3", 1)], seeds=[0], steps=8, progress=False)
    assert torch.allclose(u.images, o.images, atol=1e-5) and str(o.units[0]) == "conv3:1"


def test_objective_errors_and_save_load(tiny, tmp_path):
    with pytest.raises(FVSanityError, match="unknown layer 'conv_3'; closest valid layers: conv3"):
        render(tiny, objective=channel("conv_3", 1), steps=1, progress=False)
    with pytest.raises(FVSanityError, match="2 units label 1 objectives"):
        render(tiny, ["conv3:1", "fc:1"], objective=channel("conv3", 1), steps=1, progress=False)
    with pytest.raises(FVSanityError, match="unknown objective 'chanel'; did you mean 'channel'"):
        render(tiny, ["conv3:1"], objective="chanel", steps=1, progress=False)
    with pytest.raises(FVSanityError, match="objective must be an Objective"):
        render(tiny, ["conv3:1"], objective=3, steps=1, progress=False)
    r = render(tiny, objective=channel("conv3", 1) + channel("fc", 0), seeds=[0], steps=2, progress=False)
    r.save(tmp_path / "o")
    assert (tmp_path / "o" / "objective0_seed0.png").is_file()
    back = FVResult.load(tmp_path / "o")
    assert back.objectives == r.objectives and torch.equal(back.images, r.images)


def test_objective_registry_names_each_unit(tiny):
    assert {"unit", "channel", "neuron", "direction"} <= set(OBJECTIVES.names())
    assert _choices("visualize", "--objective") == list(OBJECTIVES.names())
    d = render(tiny, ["conv3:1@2,1"], seeds=[0], steps=6, progress=False)
    n = render(tiny, ["conv3:1@2,1"], seeds=[0], steps=6, progress=False, objective="neuron")
    c = render(tiny, ["conv3:1@2,1"], seeds=[0], steps=6, progress=False, objective="channel")
    assert torch.allclose(d.images, n.images, atol=1e-5) and not torch.allclose(d.images, c.images, atol=1e-3)
    assert n.settings["objective"] == "neuron"


# -- optimizers --------------------------------------------------------------------------------
def test_optimizer_registry(tiny):
    assert OPTIMIZERS.names()[0] == "adam" and {"sgd", "adamw", "nadam"} <= set(OPTIMIZERS.names())
    assert _choices("visualize", "--optimizer") == list(OPTIMIZERS.names())
    d = render(tiny, ["conv3:1"], seeds=[0], steps=5, progress=False)
    a = render(tiny, ["conv3:1"], seeds=[0], steps=5, progress=False, optimizer="adam")
    s = render(tiny, ["conv3:1"], seeds=[0], steps=5, progress=False, optimizer="sgd", lr=1.0)
    assert torch.equal(d.images, a.images) and not torch.allclose(d.images, s.images, atol=1e-4)
    with pytest.raises(FVSanityError, match="unknown optimizer 'sdg'; did you mean 'sgd'"):
        render(tiny, ["conv3:1"], steps=1, progress=False, optimizer="sdg")
    with pytest.raises(FVSanityError, match="optimizer 'sgd' has no option 'mom'; options: momentum, nesterov"):
        render(tiny, ["conv3:1"], steps=1, progress=False, optimizer="sgd", optimizer_options={"mom": 0.1})


# -- toy entries registered here, run through the CLI ------------------------------------------
def test_cli_toy_parametrization_constant(tmp_path):
    def constant(size, seeds, device, *, decorrelate=True, level=0.0):
        """One grey level per element (a [B,1,1,1] logit), the same for every pixel and colour."""
        v = torch.stack([torch.full((1, 1, 1), float(level) + 0.01 * s) for s in seeds]).to(device).requires_grad_(True)
        return [v], lambda: torch.sigmoid(v).expand(len(seeds), 3, *size)

    with PARAMS.registered("constant", constant):
        assert "constant" in _choices("visualize", "--param")
        out = tmp_path / "c"
        rc = cli.main(["visualize", *R20, "--unit", "linear:1,linear:2", "--seeds", "2", "--steps", "4",
                       "--param", "constant", "--param-opt", "level=-1", "--out", str(out)])
        assert rc == 0
    assert "constant" not in PARAMS
    r = FVResult.load(out)
    flat = r.images.flatten(2)
    assert torch.allclose(flat, flat[..., :1].expand_as(flat))  # every image is one flat grey
    assert r.images.std(dim=(0, 1)).max() < 0.5 and not torch.allclose(r.images[0], r.images[1])  # per unit
    assert r.settings["param"] == "constant" and r.settings["param_options"] == {"level": -1}
    # the level moved from its start (sigmoid(-1 + 0.01 s)) under the optimizer
    start = torch.sigmoid(torch.tensor(-1.0))
    assert (r.images[..., 0, 0, 0] - start).abs().max() > 1e-3
    assert cli.main(["visualize", *R20, "--unit", "linear:1", "--steps", "1", "--param", "constant",
                     "--out", str(tmp_path / "x")]) == 2  # unregistered again: an invalid choice


def test_cli_toy_objective_double_channel(tmp_path):
    def double_channel(unit, ref_hw=None):
        return 2 * channel(unit.layer, unit.channel)

    with OBJECTIVES.registered("double-channel", double_channel):
        out = tmp_path / "d"
        # float32 (--no-amp): bf16 rounding of the two runs' slightly different images breaks the 1e-3 tolerance
        assert cli.main(["visualize", *R20, "--unit", "layer3.2:1,linear:2", "--steps", "3", "--seeds", "1", "--no-amp",
                         "--objective", "double-channel", "--out", str(out)]) == 0
        plain = tmp_path / "p"
        assert cli.main(["visualize", *R20, "--unit", "layer3.2:1,linear:2", "--steps", "3", "--seeds", "1", "--no-amp",
                         "--out", str(plain)]) == 0
    d, p = FVResult.load(out), FVResult.load(plain)
    assert d.settings["objective"] == "double-channel"
    # doubling the objective doubles what each FV scores and its trace; Adam is scale-invariant, so the images barely move
    assert torch.allclose(d.traces, 2 * p.traces, rtol=1e-3, atol=1e-4)
    assert torch.allclose(d.final, 2 * p.final, rtol=1e-3, atol=1e-4)


def test_cli_toy_optimizer_sgd_like(tmp_path):
    calls = []

    def sgd_like(params, lr, damp=1.0):
        calls.append((lr, damp, [tuple(p.shape) for p in params]))
        return torch.optim.SGD(params, lr=lr * damp)

    with OPTIMIZERS.registered("sgd-like", sgd_like):
        out = tmp_path / "s"
        assert cli.main(["visualize", *R20, "--unit", "linear:1", "--seeds", "2", "--steps", "3", "--lr", "0.5",
                         "--optimizer", "sgd-like", "--optimizer-opt", "damp=0.0", "--out", str(out)]) == 0
    assert calls == [(0.5, 0.0, [(8, 3, 32, 17, 2)])]  # one batch of the fixed width 8 (2 FVs + 6 padding)
    r = FVResult.load(out)
    assert r.settings["optimizer"] == "sgd-like" and r.settings["optimizer_options"] == {"damp": 0.0}
    # lr * 0 = no update: the FVs are the fft parametrization's initial images for seeds 0 and 1
    _, init = PARAMS.get("fft")((32, 32), [0, 1], None)
    assert torch.allclose(r.images[0], init().detach(), atol=1e-6)
    # a malformed option is a one-line error
    assert cli.main(["visualize", *R20, "--unit", "linear:1", "--steps", "1", "--optimizer-opt", "damp",
                     "--out", str(tmp_path / "x")]) == 2


# -- the MACO must-show experiment -------------------------------------------------------------
def test_maco_experiment_smoke(experiment_smoke, capsys):
    """--smoke without --out: a fresh temporary folder, figures/maco untouched (the fixture checks)."""
    out = experiment_smoke("maco")
    head = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    res = json.loads((out / "results.json").read_text())
    assert (out / "fft_vs_maco.png").is_file()
    names = ["fft", "maco", "maco (CIFAR-10 spectrum)"]
    assert head["smoke"] is True and set(names) <= set(head)
    assert [u["unit"] for u in res["units"]] == ["conv3:1", "conv3:2", "fc:0", "fc:1"]
    for u in res["units"]:
        assert set(u["objective"]) == set(names) and all(len(v) == 1 for v in u["objective"].values())
        assert set(u["objective_at_steps"]["maco"]) == {"2", "4"}
    # the same units, seeds and steps under each parametrization; only param (and its options) differ
    s = res["settings"]
    assert s["fft"]["param"] == "fft" and s["maco"]["param"] == "maco" and "param_options" not in s["maco"]
    assert s["maco (CIFAR-10 spectrum)"]["param_options"]["magnitude"]["shape"] == [3, 16, 9]
    assert {k: v for k, v in s["fft"].items() if k not in ("param", "seconds")} == \
        {k: v for k, v in s["maco"].items() if k not in ("param", "seconds")}
    # the natural spectrum makes MACO's FVs as rich in high frequencies as the images it came from
    assert abs(res["summary"]["maco (CIFAR-10 spectrum)"]["hf_share_mean"] - res["hf_share_natural_images"]) < 0.05


def test_hf_share_known_answers():
    path = Path(__file__).resolve().parents[1] / "experiments" / "maco" / "run.py"
    spec = importlib.util.spec_from_file_location("exp_maco_hf", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    low = (0.5 + 0.3 * torch.cos(2 * math.pi * xx / 16)).expand(1, 3, 16, 16)  # 1/16 cycles/px
    high = (0.5 + 0.3 * torch.cos(2 * math.pi * 6 * xx / 16)).expand(1, 3, 16, 16)  # 6/16 cycles/px
    flat = torch.full((1, 3, 16, 16), 0.5)
    got = mod.hf_share(torch.cat([low, high, flat]), 0.25)
    assert torch.allclose(got, torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)


def test_cli_seam_flags_roundtrip_through_saved_config(tmp_path):
    out = tmp_path / "a"
    assert cli.main(["visualize", *R20, "--unit", "linear:1", "--steps", "2", "--param", "maco",
                     "--param-opt", "contrast=1.5", "--optimizer", "sgd", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["param"] == "maco" and cfg["param_opt"] == ["contrast=1.5"] and cfg["optimizer_opt"] == []
    again = tmp_path / "b"
    assert cli.main(["visualize", "--config", str(out / "config.json"), "--out", str(again)]) == 0
    a, b = FVResult.load(out), FVResult.load(again)
    assert torch.equal(a.images, b.images) and a.settings_hash == b.settings_hash
    assert b.settings["param_options"] == {"contrast": 1.5} and b.settings["optimizer"] == "sgd"
    # a default run's saved config (no seam flags given) is a valid --config too
    d = tmp_path / "d"
    assert cli.main(["visualize", *R20, "--unit", "linear:1", "--steps", "1", "--out", str(d)]) == 0
    assert cli.main(["visualize", "--config", str(d / "config.json"), "--out", str(tmp_path / "e")]) == 0


def test_cli_bad_seam_options_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "never"
    assert cli.main(["visualize", *R20, "--unit", "linear:1", "--param", "maco", "--param-opt", "contrat=1.5",
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fvsanity: error: parametrization 'maco' has no option 'contrat'; options: magnitude, decay_power, contrast"]
    assert cli.main(["visualize", *R20, "--unit", "linear:1", "--optimizer", "sgd", "--optimizer-opt", "mom=0.1",
                     "--out", str(out)]) == 2
    assert "optimizer 'sgd' has no option 'mom'; options: momentum, nesterov" in capsys.readouterr().err
    assert not out.exists()
