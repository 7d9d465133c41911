"""Bring your own model: ``fvsanity.models.wrap`` and factory specs (``file.py:build``, ``pkg.mod:build``)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from fvsanity.cli import main
from fvsanity.errors import FVSanityError, MissingWeightsError, SettingError, UnitError
from fvsanity.generate import render
from fvsanity.hooks import count_hooks
from fvsanity.layouts import Layout
from fvsanity.models import LoadedModel, load_model, wrap
from fvsanity.models.custom import is_factory_spec

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)

#: A small CNN in a file of its own, as a user writes it; ``{ret}`` is what ``build`` returns.
FACTORY = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, n=10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(12, n)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.features(x)), 1))

def build():
    return {ret}
'''


def _net(seed: int = 0, n: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, n),
    )


def _write(tmp_path, ret: str = "(Net(), dict(input_size=32, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3)))",
           name: str = "mynet.py") -> str:
    path = tmp_path / name
    path.write_text(FACTORY.format(ret=ret))
    return str(path)


# ------------------------------------------------------------------------------ wrap
def test_wrap_infers_output_layer_blocks_and_layouts():
    lm = wrap(_net(), input_size=32, mean=MEAN, std=STD, class_names=[f"c{i}" for i in range(10)], name="mine")
    assert isinstance(lm, LoadedModel) and lm.name == "mine" and lm.input_size == (32, 32)
    assert lm.output_layer == "7"
    assert lm.block_layers == ["0", "1", "2", "3", "4", "5", "7"]  # Flatten left out; output layer ends it
    assert lm.layer_info("4").layout == Layout("conv", channels=12, grid=(16, 16))
    assert lm.layer_info("7").layout == Layout("vector", channels=10)
    assert lm.config.mean == MEAN and lm.config.std == STD and lm.config.input_size == (32, 32)
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())


def test_wrap_expands_containers_one_level_and_skips_a_softmax_after_the_logits():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3)
            self.stages = nn.ModuleList([nn.Conv2d(4, 4, 3), nn.Conv2d(4, 6, 3)])
            self.fc = nn.Linear(6, 3)
            self.soft = nn.Softmax(dim=1)

        def forward(self, x):
            x = self.stem(x)
            for s in self.stages:
                x = s(x)
            return self.soft(self.fc(x.mean((2, 3))))

    lm = wrap(Net(), input_size=16, mean=MEAN, std=STD)
    assert lm.output_layer == "fc" and lm.block_layers == ["stem", "stages.0", "stages.1", "fc"]
    assert lm.name == "wrapped:Net"


def test_wrapped_forward_is_the_module_on_normalized_input():
    net = _net(3).double()
    lm = wrap(net, input_size=32, mean=MEAN, std=STD)
    rgb = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mean = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(lm(rgb), net((rgb - mean) / std), rtol=0, atol=1e-12)


def test_wrap_overrides_win_and_are_checked():
    lm = wrap(_net(), input_size=32, mean=MEAN, std=STD, blocks=["1", "4"], output_layer="7")
    assert lm.block_layers == ["1", "4"] and lm.output_layer == "7"
    with pytest.raises(UnitError, match=r"unknown layer 'nope'.*closest"):
        wrap(_net(), input_size=32, blocks=["1", "nope"])
    with pytest.raises(UnitError, match=r"unknown layer 'fcc'"):
        wrap(_net(), input_size=32, output_layer="fcc")


def test_layout_override_is_used_and_enters_the_fingerprint():
    plain = wrap(_net(), input_size=32, mean=MEAN, std=STD)
    given = wrap(_net(), input_size=32, mean=MEAN, std=STD, layouts={"6": "vector"})
    assert given.layer_info("6").layout.kind == "vector" and given.layer_info("4").layout.kind == "conv"
    assert plain.fingerprint() != given.fingerprint()
    with pytest.raises(SettingError, match=r"layouts\['4'\] 'vector' does not fit its output shape \[12, 16, 16\]"):
        wrap(_net(), input_size=32, layouts={"4": "vector"})


def test_fingerprint_depends_on_the_weights_and_the_normalisation():
    a = wrap(_net(0), input_size=32, mean=MEAN, std=STD)
    assert a.fingerprint() == wrap(_net(0), input_size=32, mean=MEAN, std=STD).fingerprint()
    b = _net(0)
    with torch.no_grad():
        b[3].weight[0, 0, 0, 0] += 1e-3
    assert wrap(b, input_size=32, mean=MEAN, std=STD).fingerprint() != a.fingerprint()
    assert wrap(_net(0), input_size=32).fingerprint() != a.fingerprint()


def test_render_a_hidden_channel_and_a_class_unit():
    lm = wrap(_net(), input_size=32, mean=MEAN, std=STD, class_names=[f"c{i}" for i in range(10)])
    res = render(lm, ["4:3", f"{lm.output_layer}:7"], seeds=[0, 1], steps=3, progress=False)
    assert res.images.shape == (2, 2, 3, 32, 32)
    assert bool(torch.isfinite(res.final).all()) and bool(torch.isfinite(res.traces).all())
    assert count_hooks(lm.model) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(module=[nn.Linear(2, 2)]), r"^wrap: module must be a torch.nn.Module, got list"),
        (dict(input_size=0), r"^input_size must be an int S or \(H, W\) of ints in 1..8192 px, got 0$"),
        (dict(input_size=(32, 32, 3)), r"^input_size must be .*, got \(32, 32, 3\)$"),
        (dict(input_size="32"), r"^input_size must be .*, got '32'$"),
        (dict(mean=(0.5,)), r"^mean must have 3 values \(one per RGB channel\), got 1: \(0.5,\)$"),
        (dict(std=(0.2, 0.2, 0.0)), r"^std must be 3 finite numbers > 0, got 0.0 in \(0.2, 0.2, 0.0\)$"),
        (dict(std=(0.2, float("nan"), 0.2)), r"^std must be 3 finite numbers > 0, got nan"),
        (dict(mean=0.5), r"^mean must be 3 numbers .*got 0.5$"),
        (dict(class_names=["a", "b"]), r"^class_names has 2 names but output layer '7' \[1, 10\] has 10 classes$"),
        (dict(class_names="abc"), r"^class_names must be a list of 10 strings, got 'abc'$"),
        (dict(name=""), r"^name must be a non-empty string, got ''$"),
        (dict(interpolation="cubic"), r"^interpolation must be one of bilinear, bicubic, nearest, got 'cubic'$"),
        (dict(resize=16), r"^resize must be None or an int >= the input side 32 px, got 16$"),
        (dict(input_size=1), r"^wrap: Sequential failed on a \[1, 3, 1, 1\] input \(RuntimeError: .*check input_size$"),
        (dict(blocks="4"), r"^blocks must be a non-empty list of layer names, got '4'$"),
    ],
)
def test_bad_wrap_inputs_are_one_line_errors_naming_the_value(kwargs, match):
    kwargs = {"module": _net(), "input_size": 32, **kwargs}
    with pytest.raises(FVSanityError, match=match) as e:
        wrap(**kwargs)
    assert "\n" not in str(e.value)


def test_no_hook_survives_a_probe_forward_that_raises():
    net = _net()
    with pytest.raises(FVSanityError, match="failed on a"):
        wrap(net, input_size=1)
    assert count_hooks(net) == 0


def test_a_model_whose_output_is_not_logits_is_refused_in_one_line():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x), x

    with pytest.raises(FVSanityError, match=r"^wrap: Two\(x\) returned a tuple; fvsanity needs a tensor of logits"):
        wrap(Two(), input_size=16)
    with pytest.raises(FVSanityError, match=r"output has shape \[1, 4, 14, 14\], not \[N, n_classes\]; pass output_layer"):
        wrap(nn.Conv2d(3, 4, 3), input_size=16)
    with pytest.raises(FVSanityError, match=r"no module outputs \[N, 4\] like the model's output"):
        wrap(_Mean(), input_size=16)
    lm = wrap(_Mean(), input_size=16, output_layer="conv")  # a conv head: the class units are its channels
    assert lm.output_layer == "conv" and lm.block_layers == ["conv"]


class _Mean(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


# ------------------------------------------------------------------------------ factory specs
def test_factory_spec_recognition():
    assert is_factory_spec("path/to/file.py:build") and is_factory_spec("my_pkg.models:build")
    for spec in ("timm:convnext_tiny", "resnet18", "cifar10-resnet20", "a.py:", ":build", "my-pkg:build", "x.py:1b"):
        assert not is_factory_spec(spec), spec


@pytest.mark.parametrize(
    "ret",
    [
        "(Net(), dict(input_size=32, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3)))",
        "__import__('fvsanity.models').models.wrap(Net(), input_size=32, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))",
    ],
    ids=["module-and-options", "loaded-model"],
)
def test_load_model_file_factory_is_seeded_and_loads_weights_strictly(tmp_path, ret):
    from safetensors.torch import save_file

    path = _write(tmp_path, ret)
    spec = f"{path}:build"
    a, b = load_model(spec, seed=1), load_model(spec, seed=1)
    assert a.fingerprint() == b.fingerprint() != load_model(spec, seed=2).fingerprint()
    assert a.input_size == (32, 32) and a.output_layer == "head" and a.config.mean == MEAN
    assert a.block_layers == ["features.0", "features.1", "features.2", "features.3", "features.4", "pool", "head"]
    assert "as the factory built them" in a.weights_source

    src = load_model(spec, seed=5)
    sd = {k: v.clone() for k, v in src.model.state_dict().items()}
    wfile = tmp_path / "w.safetensors"
    save_file(sd, str(wfile))
    lm = load_model(spec, weights=str(wfile), seed=1)
    assert lm.fingerprint() == src.fingerprint() and lm.weights_source == str(wfile)
    pt = tmp_path / "w.pt"
    torch.save(sd, pt)
    assert load_model(spec, weights=str(pt)).fingerprint() == src.fingerprint()

    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in sd.items() if not k.startswith("head.")}, partial)
    with pytest.raises(MissingWeightsError, match=r"do not fit .*2 missing \(head.weight, head.bias\).*--allow-partial-weights") as e:
        load_model(spec, weights=str(partial))
    assert "\n" not in str(e.value)
    lm = load_model(spec, weights=str(partial), allow_partial=True)
    assert lm.random_parameters == ["head.weight", "head.bias"] and "partial" in lm.weights_source


def test_a_bare_module_takes_wraps_defaults_and_pretrained_is_passed(tmp_path):
    path = tmp_path / "bare.py"
    path.write_text(FACTORY.format(ret="Net()") + "\n\ndef build2(pretrained=True):\n    return Net(3 if pretrained else 4)\n")
    lm = load_model(f"{path}:build")
    assert lm.input_size == (224, 224) and lm.config.mean == (0.485, 0.456, 0.406) and lm.name == f"{path}:build"
    assert lm.layer_info("head").layout.channels == 10
    assert load_model(f"{path}:build2").layer_info("head").layout.channels == 3
    rnd = load_model(f"{path}:build2", pretrained=False)
    assert rnd.layer_info("head").layout.channels == 4 and rnd.weights_source == "random"


def test_dotted_module_factory_spec(tmp_path, monkeypatch):
    pkg = tmp_path / "my_fv_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    _write(pkg, name="models.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        lm = load_model("my_fv_pkg.models:build")
        assert lm.name == "my_fv_pkg.models:build" and lm.output_layer == "head"
    finally:
        for m in [m for m in sys.modules if m.startswith("my_fv_pkg")]:
            del sys.modules[m]


def test_a_file_factory_imports_the_modules_beside_it(tmp_path):
    (tmp_path / "layers_beside.py").write_text("from torch import nn\nWIDTH = 5\n")
    path = tmp_path / "uses.py"
    path.write_text(FACTORY.format(ret="Net(layers_beside.WIDTH)") .replace("import torch\n", "import torch\nimport layers_beside\n", 1))
    try:
        assert load_model(f"{path}:build").layer_info("head").layout.channels == 5
        assert str(tmp_path) not in sys.path
    finally:
        sys.modules.pop("layers_beside", None)


@pytest.mark.parametrize(
    ("spec", "body", "match"),
    [
        ("missing.py:build", None, r"file 'missing.py' not found"),
        ("FILE:buidl", "ok", r"has no 'buidl'; closest: build; callables defined there: Net, build$"),
        ("FILE:VALUE", "value", r"'VALUE' is a int, not a factory"),
        ("FILE:build", "syntax", r"importing .* failed: SyntaxError: .*"),
        ("FILE:build", "raises", r"importing .* failed: ZeroDivisionError: division by zero \(at .*bad.py:\d+\)$"),
        ("FILE:build", "returns", r"the factory returned a str; expected an nn.Module, \(module, options dict\) or a LoadedModel"),
        ("FILE:build", "tuple", r"the factory returned a tuple of Net, int; expected"),
        ("FILE:build", "options", r"the factory's options hold 'imput_size' \(did you mean 'input_size'\?\); valid: input_size"),
        ("FILE:build", "factory_raises", r"the factory raised RuntimeError: no weights here \(at .*bad.py:\d+\)$"),
        ("no_such_pkg_fv.models:build", None, r"no module named 'no_such_pkg_fv' \(install it or put its folder on PYTHONPATH"),
    ],
)
def test_bad_factory_specs_are_one_line_errors(tmp_path, spec, body, match):
    bodies = {
        "ok": FACTORY.format(ret="Net()"),
        "value": FACTORY.format(ret="Net()") + "\nVALUE = 3\n",
        "syntax": "def build(:\n",
        "raises": "x = 1 / 0\n",
        "returns": FACTORY.format(ret="'resnet18'"),
        "tuple": FACTORY.format(ret="(Net(), 3)"),
        "options": FACTORY.format(ret="(Net(), dict(imput_size=32))"),
        "factory_raises": FACTORY.format(ret="Net()").replace("    return Net()", "    raise RuntimeError('no weights here')"),
    }
    if body is not None:
        (tmp_path / "bad.py").write_text(bodies[body])
        spec = spec.replace("FILE", str(tmp_path / "bad.py"))
    with pytest.raises(FVSanityError, match=match) as e:
        load_model(spec)
    assert "\n" not in str(e.value) and repr(spec) in str(e.value)


# ------------------------------------------------------------------------------ CLI
def test_cli_layers_and_visualize_with_a_file_factory_and_weights(tmp_path, capsys):
    path = _write(tmp_path)
    spec = f"{path}:build"
    sd = load_model(spec, seed=3).model.state_dict()
    wfile = tmp_path / "w.pt"
    torch.save(sd, wfile)

    assert main(["layers", spec, "--weights", str(wfile), "--blocks"]) == 0
    out = capsys.readouterr().out
    assert f"[model {spec}, input (32, 32)]" in out and "features.3" in out and "head" in out

    vis = tmp_path / "vis"
    assert main(["visualize", "--model", spec, "--weights", str(wfile), "--unit", "features.3:2", "--unit", "head:4",
                 "--steps", "2", "--no-progress", "--out", str(vis)]) == 0
    fv = json.loads((vis / "fv.json").read_text())
    assert fv["image_shape"][-2:] == [32, 32] and [u["layout"] for u in fv["units"]] == ["conv", "vector"]
    assert fv["settings"]["model_fingerprint"] == load_model(spec, weights=str(wfile)).fingerprint()

    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in sd.items() if k != "head.bias"}, partial)
    capsys.readouterr()
    assert main(["layers", spec, "--weights", str(partial)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fvsanity: error: weights in") and "head.bias" in err and "\n" not in err

    assert main(["layers", f"{tmp_path}/nope.py:build"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fvsanity: error: model spec") and "nope.py" in err and "\n" not in err


def test_fvsanity_models_exports_wrap():
    import fvsanity.models as models

    assert "wrap" in models.__all__ and models.wrap is wrap and "Returns:" in (wrap.__doc__ or "")
