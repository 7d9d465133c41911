"""Weights are loaded strictly or refused.

Every weights file here is made by the test (no committed binaries): missing / unexpected /
other-shaped keys, NaN and inf, a pickle that runs code, a truncated safetensors file, files that
are not state dicts. Each is a one-line error (exit 2 from the CLI, nothing already written
lost), except with the explicit ``--allow-partial-weights``, which loads what fits and records
what stays random in every output.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fvsanity import models as M
from fvsanity.cli import main
from fvsanity.errors import FVSanityError, MissingWeightsError
from fvsanity.models import load_model, load_state_dict_file

REPO = Path(__file__).resolve().parents[1]
PACKAGED_R20 = REPO / "fvsanity" / "assets" / "weights" / "cifar10_resnet20-12fca82f.th"


def _r20_state(seed: int = 3) -> dict[str, torch.Tensor]:
    return dict(load_model("cifar10-resnet20", pretrained=False, seed=seed).model.state_dict())


def _run_error(capsys, argv) -> str:
    """Run the CLI, expect exit 2 and exactly one stderr line; return it."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fvsanity: error: "), err
    return err[0]


@pytest.fixture
def previous(tmp_path):
    """An output folder holding earlier results that a refused run must leave untouched."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.json").write_text('{"keep": true}')
    return out


def _snapshot(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ strict loading
def test_visualize_squeezenet_missing_classifier_is_refused(tmp_path, previous, capsys):
    """The issue's reproduction: a SqueezeNet state dict without ``classifier.1.weight``."""
    import torchvision

    sd = torchvision.models.squeezenet1_0().state_dict()
    del sd["classifier.1.weight"]
    torch.save(sd, tmp_path / "sq.pt")
    snap = _snapshot(previous)
    line = _run_error(capsys, ["visualize", "--model", "squeezenet1_0", "--weights", str(tmp_path / "sq.pt"),
                               "--unit", "classifier.1:3", "--steps", "1", "--out", str(previous), "--no-progress"])
    assert "do not fit squeezenet1_0" in line and "1 missing (classifier.1.weight)" in line
    assert "--allow-partial-weights" in line and str(tmp_path / "sq.pt") in line
    assert _snapshot(previous) == snap


def test_missing_unexpected_and_shape_errors_name_keys_and_counts(tmp_path):
    sd = _r20_state()
    missing = ["layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.bn1.bias", "layer1.0.bn1.running_mean"]
    for k in missing:
        del sd[k]
    sd["head.extra.weight"] = torch.zeros(3)
    sd["linear.weight"] = torch.zeros(5, 64)
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(MissingWeightsError) as ei:
        load_model("cifar10-resnet20", weights=tmp_path / "w.pt")
    msg = str(ei.value)
    assert "\n" not in msg
    assert "4 missing (layer1.0.conv1.weight, layer1.0.bn1.weight, layer1.0.bn1.bias (+1 more))" in msg
    assert "1 unexpected (head.extra.weight)" in msg
    assert "1 with another shape (linear.weight: file [5, 64] vs model [10, 64])" in msg


@pytest.mark.parametrize("spec", ["squeezenet1_1", "timm:resnet10t"])
def test_torchvision_and_timm_weights_files_are_strict(spec, tmp_path):
    """Both used ``strict=False`` before: a file without the last layer loaded silently."""
    lm = load_model(spec, pretrained=False)
    sd = dict(lm.model.state_dict())
    last = [k for k in sd if k.startswith(lm.output_layer + ".")]
    assert last
    for k in last:
        del sd[k]
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(MissingWeightsError, match=rf"{len(last)} missing \({last[0]}"):
        load_model(spec, weights=tmp_path / "w.pt")


def test_exact_file_loads_bit_identically(tmp_path):
    sd = _r20_state(seed=5)
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "best_prec1": 1.0}, tmp_path / "w.th")
    lm = load_model("cifar10-resnet20", weights=tmp_path / "w.th")
    assert lm.random_parameters == [] and lm.weights_source == str(tmp_path / "w.th")
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_real_resnet20_file_loads_strictly():
    """The real checkpoint lacks BatchNorm's ``num_batches_tracked`` (it predates it): that is
    the one entry strict loading does not ask for (torch fills it; eval outputs never use it)."""
    sd = load_state_dict_file(PACKAGED_R20)
    assert not any(k.endswith("num_batches_tracked") for k in sd)
    lm = load_model("cifar10-resnet20", weights=PACKAGED_R20)
    assert lm.random_parameters == []
    for k, v in sd.items():
        assert torch.equal(lm.model.state_dict()[k], v), k


# ------------------------------------------------------------------------------ partial opt-in
def test_allow_partial_records_random_entries(tmp_path, capsys):
    sd = _r20_state(seed=7)
    del sd["linear.weight"]
    sd["linear.bias"] = torch.zeros(4)  # other shape: stays random too
    sd["unused.weight"] = torch.ones(2)
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(MissingWeightsError):
        load_model("cifar10-resnet20", weights=tmp_path / "w.pt")
    capsys.readouterr()
    lm = load_model("cifar10-resnet20", weights=tmp_path / "w.pt", allow_partial=True, seed=1)
    err = capsys.readouterr().err
    assert "stay random: linear.weight, linear.bias" in err and "ignored 1 key(s) the model lacks: unused.weight" in err
    assert lm.random_parameters == ["linear.weight", "linear.bias"]
    n = len(lm.model.state_dict())
    assert lm.weights_source == f"{tmp_path / 'w.pt'} (partial: 2 of {n} state-dict entries left random)"
    assert lm.provenance() == {"name": "cifar10-resnet20", "weights": lm.weights_source,
                               "random_parameters": ["linear.weight", "linear.bias"]}
    state = lm.model.state_dict()
    assert torch.equal(state["layer3.2.conv2.weight"], sd["layer3.2.conv2.weight"])
    # what stays random is the model's seeded initialisation, not the file's values
    assert state["linear.bias"].shape == (10,)
    again = load_model("cifar10-resnet20", weights=tmp_path / "w.pt", allow_partial=True, seed=1)
    assert torch.equal(again.model.linear.weight, lm.model.linear.weight)
    fresh = load_model("cifar10-resnet20", pretrained=False, seed=1)
    assert torch.equal(fresh.model.linear.weight, lm.model.linear.weight)


def test_allow_partial_needs_a_file_and_some_fit(tmp_path):
    with pytest.raises(FVSanityError, match="applies to a --weights FILE only"):
        load_model("cifar10-resnet20", pretrained=False, allow_partial=True)
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "w.pt")
    with pytest.raises(MissingWeightsError, match=r"no tensor in .*w\.pt fits cifar10-resnet20: file keys foo\.weight"):
        load_model("cifar10-resnet20", weights=tmp_path / "w.pt", allow_partial=True)


def test_partial_weights_recorded_in_every_output(data_root, tmp_path, capsys):
    """visualize (config.json), check (check.json + config.json), audit (audit.json + config.json)."""
    sd = dict(load_state_dict_file(data_root / "weights" / "cifar10_resnet20-12fca82f.th"))
    del sd["linear.bias"]
    torch.save(sd, tmp_path / "partial.pt")
    common = ["--model", "cifar10-resnet20", "--weights", str(tmp_path / "partial.pt"), "--allow-partial-weights",
              "--no-progress"]
    images = str(data_root / "cifar10-test")
    expect = {"name": "cifar10-resnet20", "random_parameters": ["linear.bias"]}

    assert main(["visualize", *common, "--unit", "linear:1", "--steps", "1", "--out", str(tmp_path / "v")]) == 0
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    assert {k: cfg["model_provenance"][k] for k in expect} == expect
    assert "partial: 1 of" in cfg["model_provenance"]["weights"]
    assert "stay random: linear.bias" in capsys.readouterr().err

    assert main(["check", *common, "--unit", "linear:1", "--images", images, "--max-per-class", "4", "--steps", "2",
                 "--seeds", "1", "--top-k", "3", "--n-other", "10", "--n-boot", "10", "--n-perm", "10",
                 "--out", str(tmp_path / "c")]) == 0
    doc = json.loads((tmp_path / "c" / "check.json").read_text())
    assert {k: doc["model_provenance"][k] for k in expect} == expect
    assert json.loads((tmp_path / "c" / "config.json").read_text())["model_provenance"] == doc["model_provenance"]

    assert main(["audit", *common, "--units", "linear:1", "--images", images, "--max-per-class", "4", "--steps", "2",
                 "--seeds", "1", "--top-k", "3", "--n-other", "10", "--n-boot", "10", "--n-perm", "10",
                 "--out", str(tmp_path / "a")]) == 0
    audit = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert "(partial: 1 of" in audit["model"]["weights"] and "left random" in audit["model"]["weights"]
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert {k: cfg["model_provenance"][k] for k in expect} == expect


def test_fool_config_records_partial_weights(data_root, tmp_path, monkeypatch, capsys):
    """fool writes config.json before its long run; the run itself is replaced by a stub here."""
    import fvsanity.fool.pipeline as pipeline

    sd = dict(load_state_dict_file(data_root / "weights" / "cifar10_resnet20-12fca82f.th"))
    del sd["linear.bias"]
    torch.save(sd, tmp_path / "partial.pt")

    class Stop(FVSanityError):
        pass

    def stub(lm, *a, **k):
        assert lm.random_parameters == ["linear.bias"]
        raise Stop("stub: stopped before the fooling run")

    monkeypatch.setattr(pipeline, "run_fool", stub)
    assert main(["fool", "--model", "cifar10-resnet20", "--weights", str(tmp_path / "partial.pt"),
                 "--allow-partial-weights", "--train-images", str(data_root / "cifar10-test"), "--limit", "20",
                 "--unit", "linear:1", "--shift", "1", "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "fvsanity: error: stub: stopped before the fooling run"
    assert "stay random: linear.bias" in err[0]
    cfg = json.loads((tmp_path / "f" / "config.json").read_text())
    assert cfg["model_provenance"]["random_parameters"] == ["linear.bias"]


# ------------------------------------------------------------------------------ bad-input corpus
def _nan(p: Path) -> None:
    sd = _r20_state()
    sd["layer2.0.conv1.weight"][1, 2, 0, 0] = float("nan")
    torch.save(sd, p)


def _inf(p: Path) -> None:
    sd = _r20_state()
    sd["linear.bias"][3] = float("-inf")
    torch.save(sd, p)


def _shape(p: Path) -> None:
    sd = _r20_state()
    sd["conv1.weight"] = torch.zeros(16, 3, 5, 5)
    torch.save(sd, p)


def _truncated_safetensors(p: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in _r20_state().items()}, str(p))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _list(p: Path) -> None:
    torch.save([torch.zeros(2), torch.ones(3)], p)


def _no_tensors(p: Path) -> None:
    torch.save({"epoch": 3, "arch": "resnet20"}, p)


def _text(p: Path) -> None:
    p.write_text("this is not a weights file\n")


def _empty(p: Path) -> None:
    p.write_bytes(b"")


CORPUS = {
    "nan.pt": (_nan, "1 non-finite value(s) (NaN/inf) in 'layer2.0.conv1.weight' [32, 16, 3, 3]"),
    "inf.pt": (_inf, "1 non-finite value(s) (NaN/inf) in 'linear.bias' [10]"),
    "shape.pt": (_shape, "1 with another shape (conv1.weight: file [16, 3, 5, 5] vs model [16, 3, 3, 3])"),
    "cut.safetensors": (_truncated_safetensors, "cannot read weights file"),
    "list.th": (_list, "holds a list, not a state dict"),
    "meta.th": (_no_tensors, "holds no tensors, not a state dict"),
    "text.th": (_text, "cannot read weights file"),
    "empty.pt": (_empty, "cannot read weights file"),
}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_bad_weights_corpus_one_line_error(name, tmp_path, previous, capsys):
    make, expected = CORPUS[name]
    f = tmp_path / name
    make(f)
    snap = _snapshot(previous)
    line = _run_error(capsys, ["visualize", "--model", "cifar10-resnet20", "--weights", str(f), "--unit", "linear:1",
                               "--steps", "1", "--out", str(previous), "--no-progress"])
    assert expected in line and str(f) in line
    assert _snapshot(previous) == snap
    # --allow-partial-weights never admits NaN/inf or unreadable files
    if name != "shape.pt":
        with pytest.raises(MissingWeightsError):
            load_model("cifar10-resnet20", weights=f, allow_partial=True)


def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path, previous, capsys):
    """torch.save of an object whose __reduce__ calls os.system: weights_only=True refuses it."""
    marker = tmp_path / "the_payload_ran"
    script = (
        "import os, sys, torch\n"
        "class Payload:\n"
        "    def __reduce__(self):\n"
        f"        return (os.system, ({f'touch {marker}'!r},))\n"
        "torch.save({'conv1.weight': torch.zeros(16, 3, 3, 3), 'x': Payload()}, sys.argv[1])\n"
    )
    evil = tmp_path / "evil.pt"
    subprocess.run([sys.executable, "-c", script, str(evil)], check=True)
    assert evil.is_file() and not marker.exists()
    snap = _snapshot(previous)
    line = _run_error(capsys, ["visualize", "--model", "cifar10-resnet20", "--weights", str(evil), "--unit", "linear:1",
                               "--steps", "1", "--out", str(previous), "--no-progress"])
    assert "holds Python objects, not only tensors" in line and "GLOBAL" in line and "system" in line
    assert not marker.exists()  # the payload did not run
    assert _snapshot(previous) == snap
    with pytest.raises(MissingWeightsError):
        load_state_dict_file(evil)
    assert not marker.exists()


# ------------------------------------------------------------------------------ checksums and downloads
def test_every_known_download_has_a_full_sha256():
    fname, sha = M._CIFAR_FILES[20]
    assert len(sha) == 64 and hashlib.sha256(PACKAGED_R20.read_bytes()).hexdigest() == sha
    assert fname == PACKAGED_R20.name
    # ResNet-56's full hash is not known here: it is never downloaded (see the next test)
    assert len(M._CIFAR_FILES[56][1]) < 64


def _file_url(p: Path) -> str:
    return p.resolve().as_uri()


def test_download_is_checked_against_the_full_sha256(tmp_path):
    src = tmp_path / "src.th"
    src.write_bytes(PACKAGED_R20.read_bytes())
    sha = M._CIFAR_FILES[20][1]
    dest = tmp_path / "cache" / "weights" / "r20.th"
    assert M._download(_file_url(src), dest, sha) == dest and dest.read_bytes() == src.read_bytes()
    bad = tmp_path / "bad.th"
    bad.write_bytes(src.read_bytes()[:-1] + b"\0")
    dest2 = tmp_path / "cache" / "weights" / "bad.th"
    with pytest.raises(MissingWeightsError, match="checksum mismatch"):
        M._download(_file_url(bad), dest2, sha)
    assert list(dest2.parent.glob("bad.th*")) == []  # nothing unverified kept
    with pytest.raises(MissingWeightsError, match="no full sha256"):
        M._download(_file_url(src), tmp_path / "x.th", sha[:8])


def _isolated(monkeypatch, tmp_path, offline: bool) -> None:
    from fvsanity import _paths

    (tmp_path / "data").mkdir(exist_ok=True)
    monkeypatch.setenv("FVSANITY_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("FVSANITY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FVSANITY_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(_paths, "PACKAGED_DIR", tmp_path / "no-packaged")


def test_online_download_of_resnet20_is_verified(tmp_path, monkeypatch):
    """With no local copy, the ResNet-20 is downloaded (a file:// stand-in here) and verified."""
    _isolated(monkeypatch, tmp_path, offline=False)
    src = tmp_path / "mirror" / "resnet20-12fca82f.th"
    src.parent.mkdir()
    src.write_bytes(PACKAGED_R20.read_bytes())
    monkeypatch.setattr(M, "_CIFAR_URL", src.parent.resolve().as_uri() + "/")
    lm = load_model("cifar10-resnet20")
    cached = tmp_path / "cache" / "weights" / "cifar10_resnet20-12fca82f.th"
    assert lm.weights_source == str(cached) and cached.read_bytes() == src.read_bytes()
    # tampered bytes at the URL: refused, nothing cached
    cached.unlink()
    src.write_bytes(PACKAGED_R20.read_bytes()[:1000])
    with pytest.raises(MissingWeightsError, match="checksum mismatch"):
        load_model("cifar10-resnet20")
    assert not cached.exists() and list(cached.parent.iterdir()) == []


def test_no_download_without_a_full_sha256(tmp_path, monkeypatch):
    """ResNet-56 and lucent's inception5h: online, yet nothing is fetched; the error says what to do."""
    import urllib.request

    _isolated(monkeypatch, tmp_path, offline=False)

    def no_network(*a, **k):
        raise AssertionError("tried to download unverifiable bytes")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    for spec, url in (("cifar10-resnet56", "resnet56-4bfd9763.th"), ("inceptionv1", "inception5h.pth")):
        with pytest.raises(MissingWeightsError) as ei:
            load_model(spec)
        msg = str(ei.value)
        assert "\n" not in msg and "no full sha256" in msg and url in msg and "--weights FILE" in msg


def test_local_copy_with_wrong_bytes_is_refused(tmp_path, monkeypatch):
    _isolated(monkeypatch, tmp_path, offline=True)
    (tmp_path / "data" / "weights").mkdir()
    f = tmp_path / "data" / "weights" / "cifar10_resnet20-12fca82f.th"
    sd = load_state_dict_file(PACKAGED_R20)
    torch.save({"state_dict": {k: v.clone() for k, v in sd.items()}}, f)  # same tensors, other bytes
    with pytest.raises(MissingWeightsError, match=r"checksum mismatch for .*cifar10_resnet20-12fca82f\.th: sha256 "):
        load_model("cifar10-resnet20")


def test_torchvision_pretrained_uses_check_hash_and_strict(monkeypatch):
    """torchvision's own builder: ``check_hash=True`` on download and a strict load."""
    import torchvision.models._api as api

    monkeypatch.setenv("FVSANITY_OFFLINE", "0")  # an online machine; the fake below stands in for the network
    calls = []
    good = dict(load_model("squeezenet1_1", pretrained=False, seed=4).model.state_dict())

    def fake(url, *a, **k):
        calls.append((url, k))
        return dict(good)

    monkeypatch.setattr(api, "load_state_dict_from_url", fake)
    lm = load_model("squeezenet1_1")
    assert calls and calls[0][1].get("check_hash") is True
    assert len(lm.class_names) == 1000 and torch.equal(lm.model.classifier[1].weight, good["classifier.1.weight"])

    def fake_missing(url, *a, **k):
        sd = dict(good)
        del sd["classifier.1.bias"]
        return sd

    monkeypatch.setattr(api, "load_state_dict_from_url", fake_missing)
    with pytest.raises(MissingWeightsError) as ei:
        load_model("squeezenet1_1")
    assert "\n" not in str(ei.value) and "classifier.1.bias" in str(ei.value)


def test_no_bare_torch_load_in_the_package():
    """Every torch.load in fvsanity passes weights_only=True."""
    offenders = []
    for f in (REPO / "fvsanity").rglob("*.py"):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{f.relative_to(REPO)}:{i}")
    assert offenders == []
