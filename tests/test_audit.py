"""``fvsanity audit`` end to end on tiny models: outputs, batching, resume, refusal, --fv, demo."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch

from fvsanity import auditing as A
from fvsanity.cli import main
from fvsanity.generate import FVResult, render, settings_hash
from fvsanity.io import load_tensors
from fvsanity.models import toy

UNITS = ["fc:0", "fc:1", "relu3:2", "relu2:5"]
CFG = dict(steps=8, seeds=2, top_k=3, n_other=10, n_boot=40, n_perm=40, fv_batch_units=2, paired_metrics=("cka",))


@pytest.fixture
def images(tmp_path):
    return toy.write_procedural_folder(tmp_path / "imgs", per_class=4)


@pytest.fixture
def tiny():
    """The tiny test model with the toy model's 10 classes: the procedural folders' names are its
    classes (folder names are matched to the model's class names)."""
    from fvsanity.testing import tiny_model

    lm = tiny_model(num_classes=10)
    lm.class_names = list(toy.CLASSES)
    return lm


def _snapshot(out):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted((out / "units").rglob("*")) if p.is_file()}


class CountingRender:
    def __init__(self, fail: bool = False):
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, lm, units, **kw):
        self.calls.append([str(u) for u in units])
        if self.fail:
            raise AssertionError("render called although every unit was finished")
        return render(lm, units, **kw)


def test_audit_end_to_end_then_resume(tiny, images, tmp_path):
    out = tmp_path / "out"
    rec = CountingRender()
    res = A.run_audit(tiny, UNITS, images, out, A.AuditSettings.of(**CFG), progress=False, render_fn=rec)
    # FVs generated in batches of 2 units, every unit computed once
    assert rec.calls == [["fc:0", "fc:1"], ["relu3:2", "relu2:5"]]
    assert res.computed == ("fc_c0", "fc_c1", "relu3_c2", "relu2_c5")
    for f in ("report.html", "audit.json", "table.md", "table.tex", "run.json", "natural_pass.safetensors"):
        assert (out / f).is_file(), f
    audit = json.loads((out / "audit.json").read_text())
    assert [u["unit"] for u in audit["units"]] == UNITS
    assert audit["fv_settings_hash"] == settings_hash(audit["fv_settings"])
    assert audit["fv_settings"]["steps"] == 8 and audit["seeds"]["fv_seeds"] == [0, 1]
    # the installed distribution's version; its release part is the one torch reports (a local
    # suffix such as +cu130 may be in torch.__version__ only)
    torch_version = audit["provenance"]["versions"]["torch"]
    assert torch_version == importlib.metadata.version("torch")
    assert torch_version.split("+")[0] == torch.__version__.split("+")[0]
    assert audit["images"]["n_images"] == 40
    assert audit["summary"]["n_units"] == 4
    # the paired design across the 4 units, on the layers every path shares
    assert [r["name"] for r in audit["paired"]["cka"]] == ["relu1", "relu2"]
    # the population test across units covers every layer of any path, each with its unit count
    # (a unit counts at a layer where its references separate from unrelated images: elsewhere it
    # has no normalized similarity, null; random images here)
    across = {r["name"]: r["n_units"] for r in audit["across_units"]}
    paths = {n: [x for u in audit["units"] for x in u["path"]["layers"] if x["name"] == n] for n in across}
    assert {n: len(v) for n, v in paths.items()} == {"relu1": 4, "relu2": 4, "relu3": 3, "fc": 2}
    assert across == {n: sum(x["separated"] for x in v) for n, v in paths.items()}
    assert all((x["normalized"] is None) == (not x["separated"]) for v in paths.values() for x in v)
    assert (out / "path_similarity.png").is_file() and audit["figures"]["path_similarity"] == "path_similarity.png"
    for u in audit["units"]:
        d = out / "units" / u["id"]
        assert (d / "unit.json").is_file() and (d / "profile.png").is_file()
        assert len(u["fv"]["images"]) == 2 and all((out / p).is_file() for p in u["fv"]["images"])
        assert len(u["exemplars"]["images"]) == 3
        assert [x["name"] for x in u["path"]["layers"]] == tiny.path_to(u["layer"])
        assert u["exemplars"]["values"] == sorted(u["exemplars"]["values"], reverse=True)
        # the FV objective in the record is the one of the saved images
        t = load_tensors(d / "tensors.safetensors")
        assert t["fv_images"].shape == (2, 3, 16, 16)
        assert torch.allclose(t["fv_final"], torch.tensor(u["fv"]["final_objective"]))
    md = (out / "table.md").read_text()
    assert all(f"| {u} |" in md for u in UNITS)
    # the descriptive permutation p's floor is still available
    assert A.min_holm_p(2, 10, 4, 40) == pytest.approx(4 / 66)
    # 2 FV seeds: the verdict's smallest attainable p is 1/4 > 0.05, said so in its wording
    assert audit["notes"] == ["with 2 FV seed(s) per unit every layer is inconclusive: needs >= 5 FV seeds "
                              "(smallest attainable p 0.25 > alpha 0.05); raise --seeds"]
    assert all(x["outcome"] == "inconclusive" and (x["needed"] is None or x["needed"] >= 5)
               for u in audit["units"] for x in u["path"]["layers"])
    # per-layer counts of the three outcomes, in the summary and in both tables
    assert audit["summary"]["layers"]["relu1"] == {"natural-like": 0, "diverges": 0, "inconclusive": 4}
    assert audit["summary"]["layers"]["fc"] == {"natural-like": 0, "diverges": 0, "inconclusive": 2}
    assert "| relu1 | 4 | 0 | 0 | 4 |" in md and "| fc | 2 | 0 | 0 | 2 |" in md
    tex = (out / "table.tex").read_text()
    assert "relu1 & 4 & 0 & 0 & 4 &" in tex

    # a rerun recomputes nothing and touches no unit file
    before = _snapshot(out)
    res2 = A.run_audit(tiny, UNITS, images, out, A.AuditSettings.of(**CFG), progress=False, render_fn=CountingRender(fail=True))
    assert res2.computed == ()
    assert _snapshot(out) == before
    calls = json.loads((out / "calls.json").read_text())
    assert [c["units_computed"] for c in calls] == [4, 0]
    assert res2.audit["timing"]["calls"] == calls
    assert [u["unit"] for u in res2.audit["units"]] == UNITS

    # a lost unit is recomputed alone; batching did not change its FVs (elements independent)
    old = json.loads((out / "units" / "relu3_c2" / "unit.json").read_text())
    import shutil

    shutil.rmtree(out / "units" / "relu3_c2")
    rec3 = CountingRender()
    res3 = A.run_audit(tiny, UNITS, images, out, A.AuditSettings.of(**CFG), progress=False, render_fn=rec3)
    assert rec3.calls == [["relu3:2"]] and res3.computed == ("relu3_c2",)
    new = json.loads((out / "units" / "relu3_c2" / "unit.json").read_text())
    assert new["fv"]["final_objective"] == pytest.approx(old["fv"]["final_objective"], rel=1e-3, abs=1e-4)
    assert new["verdict"] == old["verdict"]


def test_refuses_to_mix_settings(tiny, images, tmp_path):
    out = tmp_path / "out"
    A.run_audit(tiny, UNITS[:1], images, out, A.AuditSettings.of(**CFG), progress=False)
    with pytest.raises(A.MixedRunError, match=r"other FV settings .*differ: steps"):
        A.run_audit(tiny, UNITS[:1], images, out, A.AuditSettings.of(**{**CFG, "steps": 9}), progress=False)
    with pytest.raises(A.MixedRunError, match="differ: top_k"):
        A.run_audit(tiny, UNITS[:1], images, out, A.AuditSettings.of(**{**CFG, "top_k": 4}), progress=False)
    # more units with the same settings: allowed, the finished one is reused
    res = A.run_audit(tiny, UNITS[:2], images, out, A.AuditSettings.of(**CFG), progress=False)
    assert res.computed == ("fc_c1",)


def test_reuses_saved_fvs(tiny, images, tmp_path):
    fv = render(tiny, UNITS[:2], seeds=2, steps=5, progress=False)
    fv.save(tmp_path / "fv")
    cfg = A.AuditSettings.of(**{**CFG, "fv_source": str(tmp_path / "fv")})
    res = A.run_audit(tiny, UNITS[:2], images, tmp_path / "out", cfg, progress=False,
                      render_fn=CountingRender(fail=True))
    assert res.audit["fv_settings"]["steps"] == 5
    assert res.audit["fv_settings_hash"] == settings_hash(res.audit["fv_settings"])
    t = load_tensors(tmp_path / "out" / "units" / "fc_c1" / "tensors.safetensors")
    assert torch.equal(t["fv_images"], FVResult.load(tmp_path / "fv").images[1])


def test_min_holm_p_known_answers():
    assert A.min_holm_p(1, 200, 12, 1000) == pytest.approx(12 / 201)
    assert A.min_holm_p(2, 200, 11, 1000) == pytest.approx(11 / 20301)
    assert A.min_holm_p(3, 1000, 10, 999) == pytest.approx(10 / 1000)  # Monte Carlo regime
    assert A.min_holm_p(1, 1, 5, 10) == 1.0


def test_select_units(tiny):
    us = A.select_units(tiny, layer="relu3", sample=4, seed=1)
    assert len(us) == 4 and len({u.channel for u in us}) == 4 and all(u.layer == "relu3" for u in us)
    assert [str(u) for u in us] == [str(u) for u in A.select_units(tiny, layer="relu3", sample=4, seed=1)]
    assert len(A.select_units(tiny, layer="relu3")) == 16
    from fvsanity.errors import FVSanityError

    with pytest.raises(FVSanityError, match=r"--sample 17 out of range .*1\.\.16"):
        A.select_units(tiny, layer="relu3", sample=17)
    with pytest.raises(FVSanityError, match="either --units or --layer"):
        A.select_units(tiny, ["fc:0"], layer="relu3")


def test_cli_audit_with_layer_sample(images, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["audit", "--model", "toy-procedural", "--random-weights", "--layer", "block4", "--sample", "2",
               "--images", str(images), "--steps", "4", "--seeds", "1", "--top-k", "3", "--n-other", "8",
               "--n-boot", "20", "--n-perm", "20", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == f"report: {out / 'report.html'}"
    audit = json.loads((out / "audit.json").read_text())
    assert len(audit["units"]) == 2 and all(u["layer"] == "block4" for u in audit["units"])
    assert (out / "config.json").is_file()


def test_demo_offline_fallback(tmp_path, monkeypatch, capsys, no_packaged_data):
    """The README's main command with no real data and no network: toy model, procedural images."""
    from fvsanity import defaults

    (tmp_path / "data").mkdir()
    monkeypatch.setenv("FVSANITY_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("FVSANITY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FVSANITY_OFFLINE", "1")
    monkeypatch.setattr(toy, "DEFAULT_STEPS", 30)
    monkeypatch.setattr(toy, "DEFAULT_BATCH", 32)
    monkeypatch.setattr(defaults, "PROCEDURAL_PER_CLASS", 4)
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--steps", "4", "--seeds", "1", "--class-units", "2", "--block-units", "1",
               "--no-progress"])
    assert rc == 0
    cap = capsys.readouterr()
    assert "toy-procedural" in cap.err and "notice" in cap.err
    assert cap.out.strip().splitlines()[-1] == f"report: {out / 'report.html'}"
    audit = json.loads((out / "audit.json").read_text())
    assert audit["model"]["name"] == "toy-procedural"
    assert [u["unit"] for u in audit["units"]] == ["fc:0", "fc:9", "block4:" + audit["units"][2]["unit"].split(":")[1]]
    assert audit["units"][0]["class_name"] == toy.CLASSES[0]


def test_cli_fv_without_units_audits_every_saved_unit(images, tmp_path, capsys):
    from fvsanity.models import load_model

    lm = load_model("toy-procedural", pretrained=False)
    render(lm, ["fc:2", "block3:7"], seeds=1, steps=3, progress=False).save(tmp_path / "fv")
    out = tmp_path / "out"
    rc = main(["audit", "--model", "toy-procedural", "--random-weights", "--fv", str(tmp_path / "fv"),
               "--images", str(images), "--top-k", "3", "--n-other", "8", "--n-boot", "10", "--n-perm", "10",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    audit = json.loads((out / "audit.json").read_text())
    assert [u["unit"] for u in audit["units"]] == ["fc:2", "block3:7"]
    assert audit["fv_settings"]["steps"] == 3 and audit["fv_settings"]["source"] == str(tmp_path / "fv")


def test_circuits_integrated(tiny, images, tmp_path):
    """--circuits: the circuit overlap per unit, its figures, and a failing unit recorded."""
    from fvsanity.errors import FVSanityError

    cfg = A.AuditSettings.of(**{**CFG, "circuits": True, "circuit_images": 4, "circuit_steps": 2, "circuit_splits": 3})
    res = A.run_audit(tiny, ["fc:0", "relu3:2"], images, tmp_path / "out", cfg, progress=False)
    for u in res.audit["units"]:
        c = u["circuit"]
        assert c["summary"]["n_layers"] == len(c["layers"]) > 0 and c["n_other"] == 4
        assert c["n_natural"] == min(4, u["path"]["n_natural"])  # class images + top-3, or top-3 only
        assert set(c["natural_indices"]).isdisjoint(c["other_indices"])
        assert (tmp_path / "out" / u["figures"]["circuit"]).is_file()
        assert (tmp_path / "out" / u["figures"]["circuit_profile"]).is_file()
    assert "Circuit overlap" in (tmp_path / "out" / "table.md").read_text().splitlines()[0]

    def broken(*a, **k):
        raise FVSanityError("every edge score is zero")

    res = A.run_audit(tiny, ["fc:1"], images, tmp_path / "out2", cfg, progress=False, circuit_fn=broken)
    assert res.audit["units"][0]["circuit"] == {"error": "every edge score is zero"}
