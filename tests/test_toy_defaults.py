"""The embedded default: toy model on procedural images, and the model/image fallback chain.

The full default budget (``fvsanity.models.toy.DEFAULT_STEPS`` x ``DEFAULT_BATCH``) trains in
about a minute on one CPU core; here the budget is cut to a few seconds.
"""

from __future__ import annotations

import io

import pytest
import torch

from fvsanity import defaults
from fvsanity.models import toy


@pytest.fixture
def empty_env(tmp_path, monkeypatch, no_packaged_data):
    """Empty FVSANITY_DATA and cache, no packaged copy, offline, and a tiny toy training budget."""
    (tmp_path / "data").mkdir()
    monkeypatch.setenv("FVSANITY_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("FVSANITY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FVSANITY_OFFLINE", "1")
    monkeypatch.setattr(toy, "DEFAULT_STEPS", 40)
    monkeypatch.setattr(toy, "DEFAULT_BATCH", 32)
    monkeypatch.setattr(defaults, "PROCEDURAL_PER_CLASS", 3)
    return tmp_path


def test_procedural_images_seeded_and_labelled():
    # class folders are read in sorted order: that must be the model's label order
    assert toy.CLASSES == sorted(toy.CLASSES) and len(toy.CLASSES) == 10
    a, la = toy.procedural_images(40, 3)
    b, lb = toy.procedural_images(40, torch.Generator().manual_seed(3))
    assert a.shape == (40, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert a.min() >= 0 and a.max() <= 1
    labels = torch.arange(10).repeat(2)
    c, lc = toy.procedural_images(20, 0, labels=labels)
    assert torch.equal(lc, labels)
    # classes differ visibly: per-class mean images are not all the same
    assert (c[0] - c[4]).abs().mean() > 0.05
    d, _ = toy.procedural_images(40, 4)
    assert not torch.equal(a, d)


def test_toy_training_reaches_well_above_chance():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    net, stats = toy.train_toy(steps=100, batch=64, seed=0, heldout=400)
    assert torch.get_num_threads() == threads  # trains on one thread, restores the setting
    # chance is 0.10 on ten balanced classes; held-out images come from a disjoint seed
    assert stats.heldout_accuracy >= 0.6, stats
    assert stats.heldout_accuracy == pytest.approx(toy.evaluate_toy(net, 400, seed=12345))
    assert torch.isfinite(torch.tensor(stats.final_loss))
    out = net(toy.TOY_PREPROCESS(torch.rand(2, 3, 32, 32)))
    assert out.shape == (2, 10)


def test_fallback_chain_picks_toy_and_procedural_images(empty_env, monkeypatch):
    buf = io.StringIO()
    lm = defaults.default_model(stream=buf)
    assert lm.name == "toy-procedural"
    assert lm.class_names == toy.CLASSES and lm.output_layer == "fc"
    notice = buf.getvalue()
    assert "notice" in notice and "cifar10-resnet20" in notice and "toy-procedural" in notice
    cached = empty_env / "cache" / "weights" / "toy_procedural.safetensors"
    assert cached.is_file() and lm.weights_source == str(cached)
    assert not list(cached.parent.glob(".*.tmp"))  # atomic write left nothing behind

    # second call: loads the cache, never retrains
    def boom(*a, **k):
        raise AssertionError("retrained although the cache exists")

    monkeypatch.setattr(toy, "train_toy", boom)
    lm2 = defaults.default_model(stream=io.StringIO())
    for (k, v), (k2, v2) in zip(lm.model.state_dict().items(), lm2.model.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)

    buf = io.StringIO()
    folder = defaults.default_images(stream=buf)
    assert folder == empty_env / "cache" / defaults.PROCEDURAL_DIR
    assert "notice" in buf.getvalue() and "FVSANITY_OFFLINE=1" in buf.getvalue()
    assert sorted(p.name for p in folder.iterdir()) == sorted(toy.CLASSES)
    assert all(len(list((folder / c).glob("*.png"))) == 3 for c in toy.CLASSES)
    # the toy model gets its own images without a notice; a rerun reuses the folder
    buf = io.StringIO()
    assert defaults.default_images(lm, stream=buf) == folder and buf.getvalue() == ""


def test_stale_toy_cache_is_retrained(empty_env, monkeypatch):
    defaults.default_model(stream=io.StringIO())
    monkeypatch.setattr(toy, "GENERATOR_VERSION", "999")
    calls = []
    real = toy.train_toy

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(toy, "train_toy", counting)
    defaults.default_model(stream=io.StringIO())
    assert calls == [1]


def test_online_download_failure_falls_back(empty_env, monkeypatch):
    monkeypatch.setenv("FVSANITY_OFFLINE", "0")

    def no_network(*a, **k):
        raise OSError("no route to host")

    monkeypatch.setattr(defaults, "export_cifar10_test", no_network)
    buf = io.StringIO()
    folder = defaults.default_images(stream=buf)
    assert folder.name == defaults.PROCEDURAL_DIR
    assert "download failed (OSError)" in buf.getvalue()


def test_export_cifar10_test_writes_class_folders(tmp_path, monkeypatch):
    """The online branch, with torchvision's dataset replaced by an in-memory fake."""
    import torchvision
    from PIL import Image

    class FakeCIFAR:
        classes = ["airplane", "automobile", "bird"]

        def __init__(self, root, train, download):
            assert train is False and download is True
            self.labels = [i % 3 for i in range(30)]

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return Image.new("RGB", (32, 32), (10 * i, 0, 0)), self.labels[i]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR)
    out = defaults.export_cifar10_test(tmp_path / "cifar10-test", tmp_path / "dl", per_class=4)
    assert sorted(p.name for p in out.iterdir()) == FakeCIFAR.classes
    assert all(len(list((out / c).glob("*.jpg"))) == 4 for c in FakeCIFAR.classes)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_default_chain_finds_real_data(data_root):
    buf = io.StringIO()
    lm = defaults.default_model(stream=buf)
    assert lm.name == "cifar10-resnet20" and buf.getvalue() == ""
    assert defaults.default_images(lm, stream=buf) == data_root / "cifar10-test"
    assert buf.getvalue() == ""
