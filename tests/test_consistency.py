"""Same unit, same numbers (check vs audit, any unit order); metric designs refused before any
work; too few natural references reported as such instead of a verdict."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch

from fvsanity import auditing as A
from fvsanity.compare.path import (
    paired_similarity,
    path_check,
    select_references,
)
from fvsanity.compare.similarity import DesignError, list_metrics
from fvsanity.compare.verdict import INCONCLUSIVE
from fvsanity.data import from_tensor
from fvsanity.units import parse_units

UNITS = ["fc:0", "fc:1", "relu2:3", "fc:3", "relu3:1"]
SETTINGS = dict(top_k=3, n_other=10, n_boot=60, n_perm=60)


def _world(n=40, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.rand(n, 3, 16, 16, generator=g)
    return from_tensor(imgs, torch.arange(n) % classes, [f"c{i}" for i in range(classes)])


def _fvs(units, seed=5):
    """The same FV tensors [S, 3, H, W] per unit name, whatever the order units are asked in."""
    return {u: torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed + i)) for i, u in enumerate(units)}


def _dump(x) -> str:
    return json.dumps(x, sort_keys=True)  # NaN -> "NaN": equal NaNs compare equal


def _per_unit(units_json) -> dict[str, str]:
    return {
        u["unit"]: _dump({k: u[k] for k in ("layers", "verdict", "natural_indices", "n_other", "top_k_indices", "status")})
        for u in units_json
    }


def test_check_and_audit_give_identical_unit_numbers_in_any_order(tiny, tmp_path):
    natural = _world()
    fvs = _fvs(UNITS)
    order = list(UNITS)
    random.Random(1).shuffle(order)
    assert order != UNITS

    # `fvsanity check` (path_check over all units at once), in two orders
    a = path_check(tiny, UNITS, torch.stack([fvs[u] for u in UNITS]), natural, seed=7, **SETTINGS).to_json()
    b = path_check(tiny, order, torch.stack([fvs[u] for u in order]), natural, seed=7, **SETTINGS).to_json()
    assert _per_unit(a["units"]) == _per_unit(b["units"])
    assert _dump(a["paired"]) == _dump(b["paired"])  # the paired design is order-free too
    # one unit alone: the same numbers as among the others
    alone = path_check(tiny, ["relu2:3"], fvs["relu2:3"][None], natural, seed=7, **SETTINGS).to_json()
    assert _per_unit(alone["units"])["relu2:3"] == _per_unit(a["units"])["relu2:3"]

    # `fvsanity audit` (one unit at a time, FVs from a render stand-in that returns the same tensors)
    def render_fn(lm, units, **kw):
        return SimpleNamespace(images=torch.stack([fvs[str(u)] for u in units]), final=torch.zeros(len(units), 2))

    cfg = A.AuditSettings.of(seed=7, seeds=2, fv_batch_units=2, paired_metrics=("cka", "rsa"), **SETTINGS)
    res = A.run_audit(tiny, order[::-1], natural, tmp_path / "audit", cfg, progress=False, render_fn=render_fn)
    records = res.audit["units"]
    assert _per_unit([r["path"] for r in records]) == _per_unit(a["units"])
    # and the paired design across units (from the per-unit means audit stores)
    for metric in ("cka", "rsa"):
        for x, y in zip(res.audit["paired"][metric], a["paired"][metric], strict=True):
            assert x["name"] == y["name"] and x["value"] == pytest.approx(y["value"], abs=1e-6)
            assert x["p_value"] == pytest.approx(y["p_value"], abs=1e-12)


# ------------------------------------------------------------------------------------ designs
def test_registry_declares_designs_and_cli_choices_follow_it():
    assert list_metrics(design="unpaired") == ["cosine", "pearson", "spearman"]
    assert list_metrics(design="paired") == ["cka", "cka_biased", "rsa"]
    assert list_metrics(design="set") == ["mmd"]  # offered by no command: no pipeline has a set design
    from fvsanity.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    choices = {name: next(a.choices for a in sub[name]._actions if a.dest == "metric") for name in ("check", "audit")}
    # one declaration (PathCheckSettings.metric): a paired-design metric means the paired design in both
    assert choices["check"] == choices["audit"] == ["cosine", "pearson", "spearman", "cka", "cka_biased", "rsa"]


def test_mmd_in_the_paired_design_is_refused_not_p_one():
    # before: permuting the rows of a set metric changes nothing, so p = 1.0 whatever the data
    g = torch.Generator().manual_seed(0)
    a = {"l": torch.randn(8, 6, generator=g, dtype=torch.float64)}
    with pytest.raises(DesignError) as e:
        paired_similarity(a, {"l": a["l"] + 5.0}, None, metric="mmd", n_perm=50)
    msg = str(e.value)
    assert "\n" not in msg and "'mmd'" in msg and "paired" in msg and "valid: cka, cka_biased, rsa" in msg
    with pytest.raises(DesignError, match="'cka'.*unpaired"):
        path_check(None, ["fc:0"], torch.zeros(1, 1, 3, 4, 4), None, metric="cka")  # refused before anything


def _cli(*args):
    from fvsanity.cli import main

    try:
        return main([str(a) for a in args])
    except SystemExit as e:  # argparse refusing a choice
        return e.code


def _count_forwards(monkeypatch):
    """Count every model load and natural-image pass the CLI would start."""
    import fvsanity.activations
    import fvsanity.models

    calls = []
    for mod, name in ((fvsanity.models, "load_model"), (fvsanity.activations, "collect_with_responses")):
        orig = getattr(mod, name)

        def counted(*a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(*a, **k)

        monkeypatch.setattr(mod, name, counted)
    return calls


@pytest.mark.parametrize("command,metric", [("check", "mmd"), ("audit", "mmd")])
def test_cli_refuses_invalid_metric_before_any_work(tmp_path, capsys, monkeypatch, command, metric):
    calls = _count_forwards(monkeypatch)
    unit_flag = "--unit" if command == "check" else "--units"
    rc = _cli(command, "--model", "toy-procedural", unit_flag, "fc:0", "--metric", metric, "--out", tmp_path / "o",
              "--steps", "1", "--no-progress")
    assert rc == 2 and calls == []
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error" in err and f"'{metric}'" in err


def test_run_audit_refuses_a_paired_metric_before_the_natural_pass(tiny, tmp_path, monkeypatch):
    calls = _count_forwards(monkeypatch)
    with pytest.raises(DesignError, match="'mmd'"):
        A.run_audit(tiny, ["fc:0"], _world(), tmp_path / "a", A.AuditSettings.of(metric="mmd", steps=1), progress=False)
    with pytest.raises(DesignError, match="'mmd'"):
        A.run_audit(tiny, ["fc:0"], _world(), tmp_path / "b", A.AuditSettings.of(paired_metrics=("mmd",)), progress=False)
    assert calls == []


# ------------------------------------------------------------------------- too few references
def test_class_unit_without_class_images_is_insufficient(tiny, tmp_path):
    g = torch.Generator().manual_seed(0)
    natural = from_tensor(torch.rand(30, 3, 16, 16, generator=g), 1 + torch.arange(30) % 4, [f"c{i}" for i in range(5)])
    fv = torch.rand(2, 2, 3, 16, 16, generator=g)
    with pytest.warns(UserWarning, match="insufficient references"):
        res = path_check(tiny, ["fc:0", "fc:1"], fv, natural, **SETTINGS)
    no_class, ok = res.units
    assert no_class.status == "insufficient references: 0 image(s) of class 0 (c0) in the natural images; top-3 exemplars only"
    # no claim either way; every layer "inconclusive" with the status as its reason
    assert no_class.verdict.outcome == INCONCLUSIVE and no_class.n_class_images == 0
    assert no_class.verdict.label == f"inconclusive at its own layer ({no_class.status}); natural-like at no layer"
    assert all(r.outcome == INCONCLUSIVE and r.reason == no_class.status for r in no_class.layers)
    # the sufficient unit (random images, 2 FV seeds) is inconclusive too, for its own reasons
    assert ok.status == "ok" and ok.n_class_images == 8 and ok.verdict.outcome == INCONCLUSIVE
    assert not any(r.reason.startswith("insufficient references") for r in ok.layers)
    d = res.to_json()
    assert d["units"][0]["status"].startswith("insufficient references")
    assert d["units"][0]["verdict"]["label"].startswith("inconclusive at its own layer (insufficient references")
    assert d["units"][1]["status"] == "ok" and d["units"][0]["verdict"]["status"] == d["units"][0]["status"]
    assert d["summary"]["n_insufficient"] == 1 and d["summary"]["verdicts"][INCONCLUSIVE] == 2
    # the insufficient unit is left out (and has no normalized similarity at all); the other counts
    # where its references separate from unrelated images (elsewhere its normalized is null too)
    sep = {r.name: r.separated for r in ok.layers}
    assert all(r["n_units"] == int(sep[r["name"]]) for r in d["across_units"])
    assert all(r["normalized"] is None for r in d["units"][0]["layers"])
    assert all((r["normalized"] is None) == (not r["separated"]) for r in d["units"][1]["layers"])

    # audit: the unit record, the summary, the tables and the report say so
    def render_fn(lm, units, **kw):
        return SimpleNamespace(images=fv[: len(units)], final=torch.zeros(len(units), 2))

    cfg = A.AuditSettings.of(seeds=2, paired_metrics=(), **SETTINGS)
    with pytest.warns(UserWarning, match="insufficient references"):
        out = A.run_audit(tiny, ["fc:0", "fc:1"], natural, tmp_path / "a", cfg, progress=False, render_fn=render_fn)
    rec = out.audit["units"][0]
    assert rec["status"].startswith("insufficient references: 0 image(s) of class 0")
    assert rec["verdict"]["outcome"] == INCONCLUSIVE and rec["verdict"]["label"].startswith("inconclusive at its own layer (insufficient")
    assert out.audit["summary"]["n_insufficient"] == 1 and out.audit["summary"]["units"][INCONCLUSIVE] == 2
    assert "| inconclusive (insufficient references: 0 image(s) of class 0" in out.table_md.read_text()
    html = out.report.read_text()
    assert "Insufficient references:" in html and "0 image(s) of class 0" in html


def test_reference_rule_few_refs_and_few_others(tiny):
    natural = _world(n=6, classes=3)
    resp = torch.arange(6, dtype=torch.float32)
    unit = parse_units(["relu2:3"], tiny)[0]  # not a class unit: top-k exemplars are its references
    one = select_references(tiny, unit, natural, resp, top_k=1, n_other=10)
    assert one.status == "insufficient references: 1 natural reference image(s), need >= 2"
    crowded = select_references(tiny, unit, natural, resp, top_k=5, n_other=10)
    assert crowded.natural.tolist() == [1, 2, 3, 4, 5] and crowded.other.tolist() == [0]
    assert crowded.status == "insufficient references: 1 other natural image(s), need >= 2"
    fine = select_references(tiny, unit, natural, resp, top_k=3, n_other=10)
    assert fine.status == "ok" and fine.natural.tolist() == [3, 4, 5] and fine.other.tolist() == [0, 1, 2]


def test_cli_check_prints_insufficient(tmp_path, capsys):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    root = tmp_path / "imgs"
    for name in ("airplane", "automobile", "bird"):  # CIFAR-10 classes 0-2 only: no dog (5)
        (root / name).mkdir(parents=True)
        for i in range(5):
            arr = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / name / f"{i}.png")
    fv = tmp_path / "fv.pt"
    torch.save({"images": torch.rand(2, 2, 3, 32, 32, generator=g)}, fv)
    out = tmp_path / "o"
    with pytest.warns(UserWarning, match="insufficient references"):
        rc = _cli("check", "--model", "cifar10-resnet20", "--random-weights", "--unit", "linear:5,linear:1", "--fv",
                  fv, "--images", root, "--top-k", "3", "--n-boot", "20", "--n-perm", "20", "--no-progress",
                  "--out", out)
    assert rc == 0
    printed = capsys.readouterr().out.splitlines()
    dog = next(line for line in printed if line.startswith("linear:5"))
    assert dog.startswith("linear:5: inconclusive at its own layer (insufficient references") and "class 5 (dog)" in dog
    d = json.loads((out / "check.json").read_text())
    assert d["units"][0]["status"].startswith("insufficient references: 0 image(s) of class 5 (dog)")
    assert d["units"][1]["status"] == "ok" and d["units"][1]["n_class_images"] == 5


def test_check_and_audit_give_identical_circuit_statistics(tiny, tmp_path):
    """`check --circuits` and `audit --circuits` pick the same references and seeds, so the same
    unit gets the same circuit numbers from both (and from the library's check())."""
    from fvsanity.checking import CheckSettings, check

    units = ["fc:1", "relu2:3"]
    natural = _world()
    fvs = _fvs(units)
    circ = dict(circuits=True, circuit_images=4, circuit_steps=2, circuit_splits=3)
    settings = CheckSettings.of(seed=7, seeds=2, paired_metrics=(), **SETTINGS, **circ)
    report = check(tiny, units, natural, fvs=torch.stack([fvs[u] for u in units]), settings=settings, progress=False)

    def render_fn(lm, units, **kw):
        return SimpleNamespace(images=torch.stack([fvs[str(u)] for u in units]), final=torch.zeros(len(units), 2))

    cfg = A.AuditSettings.of(seed=7, seeds=2, fv_batch_units=1, paired_metrics=(), **SETTINGS, **circ)
    res = A.run_audit(tiny, units[::-1], natural, tmp_path / "audit", cfg, progress=False, render_fn=render_fn)
    audited = {r["unit"]: r["circuit"] for r in res.audit["units"]}
    for u in units:
        assert "error" not in audited[u]
        assert _dump(audited[u]) == _dump(report.doc["circuits"][u])
        assert len(audited[u]["natural_indices"]) >= 2 and len(audited[u]["other_indices"]) == 4
    assert _per_unit(report.doc["units"]) == _per_unit([r["path"] for r in res.audit["units"]])
