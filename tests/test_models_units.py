import pytest
import torch

from fvsanity import UnitError, UnknownModelError, load_model, parse_unit, parse_units
from fvsanity.errors import MissingWeightsError
from fvsanity.hooks import capture, count_hooks


def test_unknown_model_names_choices():
    with pytest.raises(UnknownModelError, match="unknown model 'resnet5O'.*closest"):
        load_model("resnet5O")


def test_unit_parsing_and_errors(tiny):
    assert parse_unit("conv2:3", tiny).channel == 3
    n = parse_unit("relu3:1@2,1", tiny)
    assert (n.kind, n.y, n.x) == ("neuron", 2, 1)
    assert [str(u) for u in parse_units("relu1:0,relu2:1@1,1,fc:4", tiny)] == ["relu1:0", "relu2:1@1,1", "fc:4"]
    with pytest.raises(UnitError, match=r"unknown layer 'conv9'.*closest valid layers: conv\d"):
        parse_unit("conv9:0", tiny)
    with pytest.raises(UnitError, match=r"channel 16 out of range for 'conv3': valid 0..15"):
        parse_unit("conv3:16", tiny)
    with pytest.raises(UnitError, match=r"position @9,0 out of range"):
        parse_unit("conv3:1@9,0", tiny)
    with pytest.raises(UnitError, match="bad unit"):
        parse_unit("conv3", tiny)


def test_lucent_underscore_names():
    lm = load_model("cifar10-resnet20", pretrained=False)
    assert parse_unit("layer2_1:4", lm).layer == "layer2.1"
    assert parse_unit("layer2_1_conv1:4", lm).layer == "layer2.1.conv1"


def test_hooks_removed_even_when_forward_raises(tiny):
    before = count_hooks(tiny.model)
    with pytest.raises(RuntimeError):
        with capture(tiny.model, ["relu1", "relu2"]):
            tiny.model(torch.zeros(1, 5, 16, 16))  # wrong channel count raises inside the block
    assert count_hooks(tiny.model) == before == 0


def test_missing_weights_offline_message(tmp_path, monkeypatch):
    monkeypatch.setenv("FVSANITY_DATA", str(tmp_path))
    monkeypatch.setenv("FVSANITY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FVSANITY_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="looked in .*--weights FILE"):
        load_model("imagenet-squeezenet")


def test_local_weights_roundtrip_safetensors(tmp_path):
    from safetensors.torch import save_file

    lm = load_model("cifar10-resnet20", pretrained=False)
    save_file({k: v.contiguous() for k, v in lm.model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    lm2 = load_model("cifar10-resnet20", weights=tmp_path / "w.safetensors")
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(lm(x), lm2(x))


def test_real_resnet20_accuracy_on_some_images(data_root):
    from PIL import Image

    lm = load_model("cifar10-resnet20")
    xs, ys = [], []
    for ci, cls in enumerate(sorted(p.name for p in (data_root / "cifar10-test").iterdir())):
        for f in sorted((data_root / "cifar10-test" / cls).iterdir())[:10]:
            xs.append(lm.preprocess.load_pil(Image.open(f)))
            ys.append(ci)
    with torch.no_grad():
        pred = lm(torch.stack(xs)).argmax(1)
    acc = (pred == torch.tensor(ys)).float().mean().item()
    assert acc > 0.6, acc  # README: ~81% on these JPEGs


def test_real_squeezenet_loads_and_classifies(imagenet_root):
    from PIL import Image

    lm = load_model("imagenet-squeezenet")
    files = sorted((imagenet_root / "imagenet-samples").iterdir())[:40]
    wnids = sorted(f.name.split("_")[0] for f in (imagenet_root / "imagenet-samples").iterdir())
    xs = torch.stack([lm.preprocess.load_pil(Image.open(f)) for f in files])
    ys = torch.tensor([wnids.index(f.name.split("_")[0]) for f in files])
    with torch.no_grad():
        acc = (lm(xs).argmax(1) == ys).float().mean().item()
    assert acc > 0.35, acc  # README: 60% on all 1000


def test_random_weights_are_seeded_without_touching_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = load_model("cifar10-resnet20", pretrained=False, seed=1)
    after = torch.rand(1)
    b = load_model("cifar10-resnet20", pretrained=False, seed=1)
    c = load_model("cifar10-resnet20", pretrained=False, seed=2)
    assert torch.equal(before, after)
    assert torch.equal(a.model.conv1.weight, b.model.conv1.weight)
    assert not torch.equal(a.model.conv1.weight, c.model.conv1.weight)


def test_parse_unit_on_float64_model():
    lm = load_model("cifar10-resnet20", pretrained=False)
    lm.model.double()
    assert parse_unit("layer3.2:1", lm).channel == 1


def test_atomic_files_are_readable(tmp_path):
    import os

    from fvsanity.io import atomic_write_json

    p = atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert os.stat(p).st_mode & 0o044  # group/other may read, as with a plain open()
