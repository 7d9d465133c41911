"""One content-addressed cache: model fingerprints, FV / natural-pass / detector reuse, --fv refusal.

Every reused result must have been made for the same weights (model fingerprint) and settings;
anything else is recomputed (caches) or refused with one line (``--fv``).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fvsanity import auditing as A
from fvsanity import cache as C
from fvsanity.cli import main
from fvsanity.errors import FVSanityError
from fvsanity.generate import FVResult, render
from fvsanity.models import load_model
from fvsanity.testing import tiny_model

CIFAR = ["airplane", "automobile", "bird"]


def _cli(*args) -> int:
    return main([str(a) for a in args])


def _cifar_folder(tmp_path, per: int = 4):
    """CIFAR-10 class folders (named as the model names its classes) of random 32-px PNGs."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    root = tmp_path / "imgs"
    for c in CIFAR:
        (root / c).mkdir(parents=True)
        for i in range(per):
            arr = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def _weights_file(path, seed: int):
    """A cifar10-resnet20 state dict with random weights drawn from ``seed``."""
    lm = load_model("cifar10-resnet20", pretrained=False, seed=seed)
    torch.save(lm.model.state_dict(), path)
    return path


class Counter:
    """Wraps a function and counts its calls."""

    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, *a, **kw):
        self.n += 1
        return self.fn(*a, **kw)


@pytest.fixture
def render_counter(monkeypatch):
    import fvsanity.generate as G

    c = Counter(G.render)
    monkeypatch.setattr(G, "render", c)
    return c


# ------------------------------------------------------------------------------ fingerprint
def test_fingerprint_stable_across_loads_and_changes_with_one_element():
    a = load_model("cifar10-resnet20", pretrained=False, seed=1)
    b = load_model("cifar10-resnet20", pretrained=False, seed=1)
    fp = a.fingerprint()
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert b.fingerprint() == fp
    assert load_model("cifar10-resnet20", pretrained=False, seed=2).fingerprint() != fp
    with torch.no_grad():
        b.model.conv1.weight[0, 0, 0, 0] += 1e-6  # one element of one parameter
    assert b.fingerprint() != fp
    with torch.no_grad():
        b.model.conv1.weight[0, 0, 0, 0] -= 1e-6
        b.model.bn1.running_mean[3] += 1.0  # one element of one buffer
    assert b.fingerprint() != fp
    with torch.no_grad():
        b.model.bn1.running_mean[3] -= 1.0
    assert b.fingerprint() == fp  # back to the same bytes: the same fingerprint
    # the preprocessing is part of the model's function
    other_pre = dataclasses.replace(a, preprocess=dataclasses.replace(a.preprocess, mean=(0.5, 0.5, 0.5)))
    assert other_pre.fingerprint() != fp
    # the dtype is part of the bytes hashed
    assert C.model_fingerprint(a.model.double(), a.preprocess) != fp


def test_manipulated_model_fingerprint_includes_its_weights():
    from fvsanity.fool.model import ManipulatedModel

    lm = tiny_model()
    m = ManipulatedModel(lm.model, lm.preprocess)
    fp = m.fingerprint()
    assert fp == ManipulatedModel(lm.model, lm.preprocess).fingerprint()
    with torch.no_grad():
        m.conv2.weight[1, 2, 0, 0] += 0.5  # a base-network weight of the manipulated copy
    assert m.fingerprint() != fp
    # a manipulated model built on other base weights differs too
    assert ManipulatedModel(tiny_model(seed=1).model, lm.preprocess).fingerprint() != fp


# ------------------------------------------------------------------------------ FV cache
def test_fv_cache_rerenders_for_other_weights_and_size(tmp_path, render_counter):
    from fvsanity.fool.pipeline import _render_cached

    a, b = tiny_model(seed=1), tiny_model(seed=2)
    assert a.name == b.name  # same name, other weights
    folder = tmp_path / "fv"
    ra = _render_cached(a, ["fc:0"], [0], 3, None, (), folder, False)
    assert render_counter.n == 1
    assert _render_cached(a, ["fc:0"], [0], 3, None, (), folder, False).settings == ra.settings
    assert render_counter.n == 1  # same weights and settings: reused
    rb = _render_cached(b, ["fc:0"], [0], 3, None, (), folder, False)
    assert render_counter.n == 2  # other weights: re-rendered
    assert rb.settings["model_fingerprint"] == b.fingerprint() != ra.settings["model_fingerprint"]
    assert FVResult.load(folder).settings["model_fingerprint"] == b.fingerprint()
    rs = _render_cached(b, ["fc:0"], [0], 3, 12, (), folder, False)
    assert render_counter.n == 3 and rs.images.shape[-2:] == (12, 12)  # another size: re-rendered


def test_render_records_fingerprint_in_settings_and_hash():
    a, b = tiny_model(seed=1), tiny_model(seed=2)
    ra = render(a, "fc:0", seeds=1, steps=2, progress=False)
    rb = render(b, "fc:0", seeds=1, steps=2, progress=False)
    assert ra.settings["model_fingerprint"] == a.fingerprint()
    assert ra.settings["weights_source"] == "random"
    strip = lambda s: {k: v for k, v in s.items() if k != "seconds"}  # noqa: E731
    ha, hb = (C.key_digest(strip(r.settings)) for r in (ra, rb))
    assert ha != hb
    from fvsanity.generate import settings_hash

    sa = strip(ra.settings)
    assert settings_hash(sa) != settings_hash({**sa, "model_fingerprint": b.fingerprint()})
    # provenance only: the weights' path does not change the hash
    assert settings_hash(sa) == settings_hash({**sa, "weights_source": "/elsewhere/same.pt"})


def test_check_rerenders_for_other_weights(tmp_path, capsys):
    imgs = _cifar_folder(tmp_path)
    w1, w2 = _weights_file(tmp_path / "w1.pt", 1), _weights_file(tmp_path / "w2.pt", 2)
    out = tmp_path / "out"
    base = ["check", "--model", "cifar10-resnet20", "--unit", "linear:1", "--images", imgs, "--steps", "2",
            "--seeds", "1", "--top-k", "2", "--n-boot", "20", "--n-perm", "20", "--no-progress", "--out", out]
    assert _cli(*base, "--weights", w1) == 0
    fp1 = json.loads((out / "fvs" / "fv.json").read_text())["settings"].get("model_fingerprint")
    capsys.readouterr()
    assert _cli(*base, "--weights", w2) == 0
    assert "reusing FVs" not in capsys.readouterr().out
    fp2 = json.loads((out / "fvs" / "fv.json").read_text())["settings"].get("model_fingerprint")
    assert fp2 == load_model("cifar10-resnet20", weights=w2).fingerprint() != fp1
    assert _cli(*base, "--weights", w2) == 0
    assert "reusing FVs" in capsys.readouterr().out  # same weights again: reused


def test_check_rerenders_for_random_vs_real_weights(data_root, tmp_path, capsys):
    imgs = _cifar_folder(tmp_path)
    out = tmp_path / "out"
    base = ["check", "--model", "cifar10-resnet20", "--unit", "linear:1", "--images", imgs, "--steps", "2",
            "--seeds", "1", "--top-k", "2", "--n-boot", "20", "--n-perm", "20", "--no-progress", "--out", out]
    assert _cli(*base, "--random-weights") == 0
    capsys.readouterr()
    assert _cli(*base) == 0
    assert "reusing FVs" not in capsys.readouterr().out
    real = load_model("cifar10-resnet20")
    assert json.loads((out / "fvs" / "fv.json").read_text())["settings"]["model_fingerprint"] == real.fingerprint()


# ------------------------------------------------------------------------------ --fv refusal
def _fv_for(lm, folder, units=("linear:1",)):
    res = render(lm, list(units), seeds=1, steps=2, progress=False)
    res.save(folder)
    return res


def test_check_fv_from_other_weights_exits_2_with_one_line(tmp_path, capsys):
    imgs = _cifar_folder(tmp_path)
    w1, w2 = _weights_file(tmp_path / "w1.pt", 1), _weights_file(tmp_path / "w2.pt", 2)
    lm1 = load_model("cifar10-resnet20", weights=w1)
    _fv_for(lm1, tmp_path / "vis")
    rc = _cli("check", "--model", "cifar10-resnet20", "--weights", w2, "--fv", tmp_path / "vis", "--unit", "linear:1",
              "--images", imgs, "--top-k", "2", "--n-boot", "20", "--n-perm", "20", "--no-progress",
              "--out", tmp_path / "o")
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fvsanity: error: --fv ")
    fp1, fp2 = lm1.fingerprint()[:12], load_model("cifar10-resnet20", weights=w2).fingerprint()[:12]
    assert f"made for model fingerprint {fp1}" in err and f"this model is {fp2}" in err
    assert str(w1) in err and str(w2) in err and "--weights" in err
    assert not (tmp_path / "o" / "check.json").exists()


def test_check_fv_without_fingerprint_is_refused(tmp_path, capsys):
    imgs = _cifar_folder(tmp_path)
    lm = load_model("cifar10-resnet20", pretrained=False)
    _fv_for(lm, tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "fv.json").read_text())
    meta["settings"].pop("model_fingerprint", None)  # as written before fingerprints existed
    (tmp_path / "old" / "fv.json").write_text(json.dumps(meta))
    rc = _cli("check", "--model", "cifar10-resnet20", "--random-weights", "--fv", tmp_path / "old", "--unit",
              "linear:1", "--images", imgs, "--top-k", "2", "--n-boot", "20", "--n-perm", "20", "--no-progress",
              "--out", tmp_path / "o")
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "predates model fingerprints" in err


def test_audit_fv_from_other_weights_exits_2_with_one_line(tmp_path, capsys):
    imgs = _cifar_folder(tmp_path)
    w1, w2 = _weights_file(tmp_path / "w1.pt", 1), _weights_file(tmp_path / "w2.pt", 2)
    lm1 = load_model("cifar10-resnet20", weights=w1)
    _fv_for(lm1, tmp_path / "vis")
    rc = _cli("audit", "--model", "cifar10-resnet20", "--weights", w2, "--fv", tmp_path / "vis", "--images", imgs,
              "--top-k", "2", "--n-boot", "20", "--n-perm", "20", "--no-progress", "--out", tmp_path / "o")
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"made for model fingerprint {lm1.fingerprint()[:12]}" in err
    assert not (tmp_path / "o" / "audit.json").exists()
    # the library call refuses the same way
    lm2 = load_model("cifar10-resnet20", weights=w2)
    with pytest.raises(C.FVMismatchError, match="re-render the FVs or pass the matching --model/--weights"):
        A.run_audit(lm2, ["linear:1"], imgs, tmp_path / "o2", A.AuditSettings.of(fv_source=str(tmp_path / "vis")),
                    progress=False)


# ------------------------------------------------------------------------------ natural pass
def _toy_tiny(seed: int):
    """A tiny model whose 10 classes are named like the procedural toy image folders."""
    from fvsanity.models import toy

    return dataclasses.replace(tiny_model(seed=seed, num_classes=10), class_names=list(toy.CLASSES))


def test_natural_pass_not_reused_across_weights(tmp_path, monkeypatch):
    import fvsanity.activations as act
    from fvsanity.data import load_images
    from fvsanity.models import toy
    from fvsanity.units import parse_units

    folder = toy.write_procedural_folder(tmp_path / "imgs", per_class=2)
    a, b = _toy_tiny(1), _toy_tiny(2)
    assert a.name == b.name
    natural = load_images(folder, a)
    layers = ["relu1", "relu2"]
    original = act.collect_with_responses
    counter = Counter(original)
    monkeypatch.setattr(act, "collect_with_responses", counter)
    cfg = A.AuditSettings.of(batch_size=8)
    out = tmp_path / "out"
    out.mkdir()

    def nat_pass(lm):
        return A._natural_pass(lm, natural, layers, parse_units(["fc:0"], lm), cfg, out, "cpu", False)

    acts_a, resp_a = nat_pass(a)
    acts_b, resp_b = nat_pass(b)
    assert counter.n == 2  # other weights: recomputed, not read back from a's file
    fresh_acts, fresh_resp = original(b, natural, layers, parse_units(["fc:0"], b), "mean", 8, "cpu", False)
    assert torch.equal(resp_b, fresh_resp) and not torch.equal(resp_a, resp_b)
    assert all(torch.equal(acts_b[k], fresh_acts[k]) for k in layers)
    # the same weights again: reused from disk, the same numbers
    acts_b2, resp_b2 = nat_pass(b)
    assert counter.n == 2 and torch.equal(resp_b2, resp_b)
    # an image file rewritten in place (other size, newer mtime): recomputed
    from PIL import Image

    Image.new("RGB", (20, 20), (255, 0, 0)).save(natural.paths[0])
    nat_pass(b)
    assert counter.n == 3


def test_audit_out_with_other_weights_is_refused_not_resumed(tmp_path):
    from fvsanity.models import toy

    imgs = toy.write_procedural_folder(tmp_path / "imgs", per_class=2)
    cfg = A.AuditSettings.of(steps=2, seeds=1, top_k=2, n_other=4, n_boot=10, n_perm=10, paired_metrics=())
    A.run_audit(_toy_tiny(1), ["fc:0"], imgs, tmp_path / "out", cfg, progress=False)
    with pytest.raises(A.MixedRunError, match="model_fingerprint"):
        A.run_audit(_toy_tiny(2), ["fc:0"], imgs, tmp_path / "out", cfg, progress=False)


# ------------------------------------------------------------------------------ detector
def test_detector_cache_retrains_for_other_weights(tmp_path, monkeypatch, render_counter):
    import fvsanity.fool.pipeline as P

    trains = Counter(P.train_detector)
    monkeypatch.setattr(P, "train_detector", trains)
    g = torch.Generator().manual_seed(0)
    train = torch.rand(16, 3, 16, 16, generator=g)
    ev = torch.rand(8, 3, 16, 16, generator=g)
    s = P.FoolSettings(det_units=2, det_heldout_units=2, det_steps=3, det_checkpoints=(1,), det_epochs=1,
                       progress=False)
    work = tmp_path / "work"
    P.prepare_detector(tiny_model(seed=1), train, ev, s, work)
    assert trains.n == 1 and render_counter.n == 2
    P.prepare_detector(tiny_model(seed=1), train, ev, s, work)
    assert trains.n == 1 and render_counter.n == 2  # same weights: FVs and detector reused
    P.prepare_detector(tiny_model(seed=2), train, ev, s, work)
    assert trains.n == 2 and render_counter.n == 4  # other weights: FVs re-rendered, detector retrained
    P.prepare_detector(tiny_model(seed=2), train[:12], ev, s, work)
    assert trains.n == 3 and render_counter.n == 4  # other natural training images: retrained only


# ------------------------------------------------------------------------------ the cache itself
def test_cache_entry_rechecks_key_and_payload(tmp_path):
    p = tmp_path / "x.pt"
    calls = []

    def compute(v):
        def f():
            calls.append(v)
            torch.save({"v": torch.tensor(v)}, p)
            return v
        return f

    def load():
        return int(torch.load(p, weights_only=True)["v"])

    e1 = C.CacheEntry.file(p, {"a": 1})
    assert C.cached(e1, compute(1), load) == (1, False)
    assert C.cached(C.CacheEntry.file(p, {"a": 1}), compute(9), load) == (1, True)
    assert (tmp_path / "x.pt.key.json").is_file()
    # another key: recomputed, never reused; the reason names the differing setting
    e2 = C.CacheEntry.file(p, {"a": 2})
    assert e2.why_stale() == "made for other settings (differ: a)"
    assert C.cached(e2, compute(2), load) == (2, False)
    assert C.CacheEntry.file(p, {"a": 1}).why_stale() is not None
    # payload replaced behind the cache's back: recomputed
    torch.save({"v": torch.tensor(7)}, p)
    assert e2.why_stale() == "x.pt changed since it was cached"
    assert C.cached(e2, compute(3), load) == (3, False)
    # a crash after invalidation (key file gone) leaves nothing reusable
    e2.invalidate()
    assert e2.why_stale() == "no cache key"
    assert calls == [1, 2, 3]


def test_fv_key_covers_every_setting():
    lm = tiny_model()
    base = C.fv_key(lm, ["fc:0"], [0], steps=4)
    assert base["model_fingerprint"] == lm.fingerprint() and base["size"] == [16, 16]
    variants = [dict(steps=5), dict(size=12), dict(lr=0.1), dict(param="pixel"), dict(decorrelate=False),
                dict(transforms="none"), dict(diversity=0.5), dict(checkpoints=(2,))]
    digests = {C.key_digest(C.fv_key(lm, ["fc:0"], [0], **{"steps": 4, **v})) for v in variants}
    assert len(digests) == len(variants) and C.key_digest(base) not in digests
    assert C.key_digest(C.fv_key(lm, ["fc:1"], [0], steps=4)) != C.key_digest(base)
    assert C.key_digest(C.fv_key(lm, ["fc:0"], [1], steps=4)) != C.key_digest(base)
    assert C.key_digest(C.fv_key(lm, ["fc:0"], [0], steps=4, size=16)) == C.key_digest(base)  # the default size


def test_check_fv_model_accepts_matching_and_names_the_difference(tmp_path):
    a = tiny_model(seed=1)
    res = render(a, "fc:0", seeds=1, steps=2, progress=False)
    C.check_fv_model(res, tiny_model(seed=1), "x")  # the same weights loaded again: accepted
    with pytest.raises(C.FVMismatchError, match=r"other weights or preprocessing") as e:
        C.check_fv_model(res, tiny_model(seed=2), "x")
    assert isinstance(e.value, FVSanityError) and "\n" not in str(e.value)
    other = dataclasses.replace(tiny_model(seed=1), name="tiny-b")
    other.model.fc.bias.data[0] += 1
    with pytest.raises(C.FVMismatchError, match=r"model 'tiny', this is 'tiny-b'"):
        C.check_fv_model(res, other, "x")


@pytest.mark.gpu
def test_fingerprint_does_not_depend_on_the_device():
    a = load_model("cifar10-resnet20", pretrained=False, seed=1)
    fp = a.fingerprint()
    assert a.to("cuda").fingerprint() == fp
    res = render(a, "linear:0", seeds=1, steps=2, progress=False)
    C.check_fv_model(res, load_model("cifar10-resnet20", pretrained=False, seed=1), "x")  # CPU copy accepts it
