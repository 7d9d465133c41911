"""Comparator side: a one-way pipeline and plug-in seams.

Units are resolved once and handed down; the natural-image pass is computed once per (model
fingerprint, images, layers), cached without the unit list and handed down; settings objects
replace long argument lists; metrics and report outputs are registries that the CLI iterates
(a toy metric and a toy writer are registered here, from the test file, and run through
``fvsanity check`` / ``fvsanity audit``).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import fvsanity.activations as act
import fvsanity.units as U
from fvsanity import auditing as A
from fvsanity.cache import natural_pass_key
from fvsanity.cli import main
from fvsanity.compare.attribution import AttributionSettings, edge_attribution
from fvsanity.compare.path import PathCheckSettings, path_check
from fvsanity.compare.pipeline import NaturalPass, NaturalPassMismatch, natural_pass, resolve_units
from fvsanity.compare.similarity import register_metric, unregister_metric
from fvsanity.data import from_tensor
from fvsanity.models import toy
from fvsanity.report.path_figure import path_profiles
from fvsanity.report.writers import register_writer, unregister_writer, writer_names
from fvsanity.testing import tiny_model

FAST = ["--steps", "2", "--seeds", "1", "--top-k", "3", "--n-other", "8", "--n-boot", "10", "--n-perm", "10",
        "--no-progress"]
TOY = ["--model", "toy-procedural", "--random-weights"]
SETTINGS = dict(top_k=3, n_other=10, n_boot=20, n_perm=20)


@pytest.fixture
def tiny():
    return tiny_model(seed=0, size=16)


def _world(n=40, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return from_tensor(torch.rand(n, 3, 16, 16, generator=g), torch.arange(n) % classes, [f"c{i}" for i in range(classes)])


class _Count:
    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, *a, **k):
        self.n += 1
        return self.fn(*a, **k)


# ------------------------------------------------------------------------------ units, once
def test_resolve_units_parses_strings_and_passes_units_through(tiny, monkeypatch):
    counter = _Count(U.parse_unit)
    monkeypatch.setattr(U, "parse_unit", counter)
    units = resolve_units(["fc:0", "relu2:3@1,2"], tiny)
    assert [str(u) for u in units] == ["fc:0", "relu2:3@1,2"] and counter.n == 2
    assert resolve_units(units, tiny) == units and counter.n == 2  # Units: no second validation


def test_path_check_and_audit_parse_each_unit_once(tiny, tmp_path, monkeypatch):
    natural = _world()
    fv = torch.rand(2, 2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    units = resolve_units(["fc:0", "fc:1"], tiny)
    counter = _Count(U.parse_unit)
    monkeypatch.setattr(U, "parse_unit", counter)
    path_check(tiny, units, fv, natural, paired_metrics=(), **SETTINGS)
    assert counter.n == 0  # resolved Units are handed down, never re-parsed

    def render_fn(lm, us, **kw):
        return SimpleNamespace(images=fv[: len(us)], final=torch.zeros(len(us), 2))

    A.run_audit(tiny, ["fc:0", "fc:1"], natural, tmp_path / "a", A.AuditSettings.of(seeds=2, paired_metrics=(), **SETTINGS),
                progress=False, render_fn=render_fn)
    assert counter.n == 2  # once each, at the entry (was: again in every unit's path check)


# ------------------------------------------------------------------------------ the natural pass
def test_natural_pass_key_has_no_unit_list(tiny):
    natural = _world()
    k0 = natural_pass_key(tiny, natural, ["relu1", "relu2"], ["fc:0"])
    k1 = natural_pass_key(tiny, natural, ["relu1", "relu2"], ["fc:1", "relu1:2"])
    assert "units" not in k0 and k0 == k1
    assert natural_pass_key(tiny, natural, ["relu1"]) != k0  # other layers: another pass


def test_shards_with_other_units_share_one_natural_pass(tiny, tmp_path, monkeypatch):
    natural = _world()
    layers = ["relu1", "relu2", "relu3", "fc"]
    counter = _Count(act.collect_with_responses)
    monkeypatch.setattr(act, "collect_with_responses", counter)
    a = natural_pass(tiny, natural, layers, resolve_units(["fc:0", "relu2:1"], tiny), batch_size=8, cache_dir=tmp_path)
    assert counter.n == 1 and not a.reused
    # another shard, other units (channels of pooled layers): the activations are read back and the
    # responses come from them, no forward pass at all
    b = natural_pass(tiny, natural, layers, resolve_units(["fc:3", "relu3:5"], tiny), batch_size=8, cache_dir=tmp_path)
    assert counter.n == 1 and b.reused
    fresh_acts, fresh_resp = counter.fn(tiny, natural, layers, resolve_units(["fc:3", "relu3:5"], tiny), "mean", 8)
    assert torch.equal(b.responses, fresh_resp)
    assert all(torch.equal(b.acts[k], fresh_acts[k]) for k in layers)
    # a neuron unit is not in the pooled activations: its responses get their own small entry
    c = natural_pass(tiny, natural, layers, resolve_units(["relu2:1@2,3", "fc:0"], tiny), batch_size=8,
                     cache_dir=tmp_path)
    assert counter.n == 2  # one responses-only pass
    _, want = counter.fn(tiny, natural, [], resolve_units(["relu2:1@2,3"], tiny), "mean", 8)
    assert torch.equal(c.responses[:, 0], want[:, 0]) and torch.equal(c.responses[:, 1], a.responses[:, 0])
    natural_pass(tiny, natural, layers, resolve_units(["relu2:1@2,3"], tiny), batch_size=8, cache_dir=tmp_path)
    assert counter.n == 2  # ... which is reused too


def test_natural_pass_object_carries_identity_and_unpacks(tiny):
    natural = _world()
    p = natural_pass(tiny, natural, ["relu1", "fc"], resolve_units(["fc:2"], tiny), batch_size=16)
    acts, resp = p
    assert isinstance(p, NaturalPass) and acts is p.acts and resp.shape == (40, 1)
    assert p.fingerprint == tiny.fingerprint() and p.images["n"] == 40 and torch.equal(p.labels, natural.labels)
    assert torch.equal(p.response("fc:2"), acts["fc"][:, 2])
    with pytest.raises(NaturalPassMismatch, match="'fc:1'.*valid: fc:2"):
        p.response("fc:1")
    with pytest.raises(NaturalPassMismatch, match="no layer 'relu2'"):
        p.require(["relu1", "relu2"])


def test_audit_runs_the_model_once_over_natural_images_and_once_per_unit_over_fvs(tiny, tmp_path, monkeypatch):
    natural = _world()
    fv = torch.rand(3, 2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    seen = []
    real = act.collect_with_responses

    def counted(lm, images, *a, **k):
        seen.append(len(images))
        return real(lm, images, *a, **k)

    monkeypatch.setattr(act, "collect_with_responses", counted)

    def render_fn(lm, us, **kw):
        return SimpleNamespace(images=fv[: len(us)], final=torch.zeros(len(us), 2))

    A.run_audit(tiny, ["fc:0", "fc:1", "relu3:2"], natural, tmp_path / "a",
                A.AuditSettings.of(seeds=2, paired_metrics=(), **SETTINGS), progress=False, render_fn=render_fn)
    # one pass over the 40 natural images for all units; the 2 FVs of each unit once (was twice)
    assert seen == [40, 2, 2, 2]


def test_path_check_takes_a_handed_down_natural_pass(tiny, monkeypatch):
    natural = _world()
    fv = torch.rand(2, 2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    units = resolve_units(["fc:1", "fc:0"], tiny)
    layers = tiny.path_to("fc")
    p = natural_pass(tiny, natural, layers, list(reversed(units)), batch_size=16)  # other column order
    want = path_check(tiny, units, fv, natural, paired_metrics=(), **SETTINGS).to_json()
    calls = _Count(act.collect_with_responses)
    monkeypatch.setattr(act, "collect_with_responses", calls)
    got = path_check(tiny, units, fv, natural, paired_metrics=(), natural_pass=p, **SETTINGS).to_json()
    assert calls.n == 2  # the FVs only, one pass per unit (a unit's numbers never depend on its neighbours)
    assert got["units"] == want["units"]
    with pytest.raises(NaturalPassMismatch, match="no layer"):
        path_check(tiny, units, fv, natural, paired_metrics=(), natural_pass=natural_pass(tiny, natural, ["relu1"], units),
                   **SETTINGS)


# ------------------------------------------------------------------------------ settings objects
def test_path_check_settings_object_equals_the_old_keywords(tiny):
    natural = _world()
    fv = torch.rand(2, 2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    st = PathCheckSettings(metric="pearson", paired_metrics=(), seed=7, **SETTINGS)
    a = path_check(tiny, ["fc:0", "fc:1"], fv, natural, st).to_json()
    b = path_check(tiny, ["fc:0", "fc:1"], fv, natural, metric="pearson", paired_metrics=(), seed=7, **SETTINGS).to_json()
    for d in (a, b):
        d.pop("provenance"), d.pop("versions")
    assert a == b and a["settings"]["metric"] == "pearson" and a["settings"]["seed"] == 7
    with pytest.raises(TypeError, match="unknown path-check setting 'n_perms'.*valid: .*n_perm"):
        path_check(tiny, ["fc:0"], fv[:1], natural, n_perms=5)
    assert A.AuditSettings.of(top_k=4, seed=3).path_settings() == PathCheckSettings(top_k=4, seed=3, paired_metrics=())


def test_edge_attribution_settings_object_equals_the_keywords(tiny):
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    a = edge_attribution(tiny, "fc:1", x, method="eap-ig", steps=2, reference="zeros", batch_size=2)
    b = edge_attribution(tiny, "fc:1", x, settings=AttributionSettings(method="eap-ig", steps=2, reference="zeros",
                                                                       batch_size=2))
    assert [lay.name for lay in a.layers] == [lay.name for lay in b.layers] and a.steps == b.steps == 2
    assert all(torch.equal(p.scores, q.scores) for p, q in zip(a.layers, b.layers))


# ------------------------------------------------------------------------------ the figure's numbers
def test_path_profiles_are_numbers_without_matplotlib():
    lay = lambda name, f, n, o, outcome: {  # noqa: E731
        "name": name, "fv_vs_natural": f, "natural_vs_natural": n, "natural_vs_other": o, "normalized": (f - o) / (n - o),
        "ci_low": 0.0, "ci_high": 1.0, "outcome": outcome}
    doc = {"model": "m", "settings": {"metric": "spearman"}, "units": [
        {"unit": "fc:0", "verdict": {"label": "x", "outcome": "inconclusive", "n_layers": 2},
         "layers": [lay("a", 0.2, 0.6, 0.1, "diverges"), lay("b", 0.5, 0.6, 0.1, "inconclusive")]},
        {"unit": "fc:1", "verdict": {"label": "y", "outcome": "natural-like", "n_layers": 2},
         "layers": [lay("a", 0.4, 0.6, 0.2, "natural-like"), lay("b", 0.7, 0.8, 0.2, "natural-like")]}]}
    panels = path_profiles(doc, mode="panels")
    assert panels.mode == "panels" and len(panels.panels) == 2
    # a cross marks the layer whose outcome is "diverges" (no longer "not above baseline")
    assert panels.panels[0].curves[0][3] == [0.2, 0.5] and panels.panels[0].crosses == ((0, 0.2),)
    assert panels.panels[1].crosses == ()
    mean = path_profiles(doc, mode="mean")
    (pn,) = mean.panels
    assert pn.names == ("a", "b") and pn.curves[0][3] == pytest.approx([0.3, 0.6])
    assert pn.norm[0] == pytest.approx([0.5, 5 / 6])  # median of (0.25, 0.5) and (0.8, 5/6): upper middle
    assert pn.crosses == () and pn.stars == () and "across units" not in pn.title  # none: no legend
    doc["across_units"] = [{"name": "a", "outcome": "diverges"}, {"name": "b", "outcome": "natural-like"}]
    (pn,) = path_profiles(doc, mode="mean").panels
    assert pn.crosses == ((0, pytest.approx(0.3)),) and pn.stars == ((1, pytest.approx(0.6)),)
    assert "* across units: natural-like" in pn.title and "x across units: diverges" in pn.title


# ------------------------------------------------------------------------------ registries through the CLI
def test_a_toy_metric_registered_here_runs_through_fvsanity_check(tmp_path, capsys):
    @register_metric("toy_quarter", "vector", differentiable=False)
    def toy_quarter(x, y):
        """A known-answer vector metric: 0.25 for every pair (x [..., d], y [..., d] -> [...])."""
        return torch.full(torch.broadcast_shapes(x.shape[:-1], y.shape[:-1]), 0.25, dtype=torch.float64)

    try:
        imgs = toy.write_procedural_folder(tmp_path / "imgs", per_class=3)
        out = tmp_path / "check"
        rc = main(["check", *TOY, "--unit", "fc:1", "--images", str(imgs), "--out", str(out), "--metric", "toy_quarter",
                   *FAST])
        assert rc == 0
        doc = json.loads((out / "check.json").read_text())
        assert doc["settings"]["metric"] == "toy_quarter"
        layers = doc["units"][0]["layers"]
        assert [r["name"] for r in layers] == doc["settings"]["layers"] and len(layers) >= 2
        for r in layers:
            assert (r["fv_vs_natural"], r["natural_vs_natural"], r["natural_vs_other"]) == (0.25, 0.25, 0.25)
    finally:
        unregister_metric("toy_quarter")
    capsys.readouterr()
    assert main(["check", *TOY, "--unit", "fc:1", "--metric", "toy_quarter", "--out", str(tmp_path / "x")]) == 2


def test_a_toy_report_writer_registered_here_runs_through_check_and_audit(tmp_path):
    @register_writer("toy_summary", documents=("audit", "check"))
    def toy_summary(doc, out, document):
        p = out / f"{document}_summary.txt"
        p.write_text(f"{document}: " + ", ".join(u["unit"] for u in doc["units"]) + "\n")
        return p

    try:
        assert writer_names("audit") == ["json", "markdown", "latex", "html", "toy_summary"]
        assert writer_names("check") == ["json", "toy_summary"]
        imgs = toy.write_procedural_folder(tmp_path / "imgs", per_class=3)
        assert main(["check", *TOY, "--unit", "fc:1", "--images", str(imgs), "--out", str(tmp_path / "c"), *FAST]) == 0
        assert (tmp_path / "c" / "check_summary.txt").read_text() == "check: fc:1\n"
        assert (tmp_path / "c" / "check.json").is_file()
        assert main(["audit", *TOY, "--units", "fc:1,fc:2", "--images", str(imgs), "--out", str(tmp_path / "a"),
                     *FAST]) == 0
        assert (tmp_path / "a" / "audit_summary.txt").read_text() == "audit: fc:1, fc:2\n"
        for f in ("audit.json", "table.md", "table.tex", "report.html"):
            assert (tmp_path / "a" / f).is_file()
    finally:
        unregister_writer("toy_summary")
    assert "toy_summary" not in writer_names()


def test_paired_metric_choices_come_from_the_registry():
    @register_metric("toy_paired", "representation")
    def toy_paired(X, Y):
        """A toy paired metric (X [n, p], Y [n, q] -> scalar)."""
        return (X.mean() - Y.mean()).abs()

    try:
        from fvsanity.cli import build_parser

        p = build_parser()
        args = p.parse_args(["audit", "--units", "fc:0", "--paired-metrics", "cka", "toy_paired"])
        assert args.paired_metrics == ["cka", "toy_paired"]
    finally:
        unregister_metric("toy_paired")
    from fvsanity.cli import UsageError

    with pytest.raises(UsageError, match="invalid choice: 'toy_paired'"):
        build_parser().parse_args(["audit", "--units", "fc:0", "--paired-metrics", "toy_paired"])


# ------------------------------------------------------------------------------ names
def test_public_names_for_cross_module_helpers_and_one_name_per_concept():
    from fvsanity.activations import _iter_batches, iter_batches
    from fvsanity.compare import circuits, path
    from fvsanity.compare.similarity import spearman

    assert _iter_batches is iter_batches and path._order_layers is path.order_layers
    assert circuits.spearman is circuits.edge_rank_correlation  # deprecated alias of the edge statistic
    assert circuits.edge_rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 5.0, 9.0])).item() == pytest.approx(1.0)
    assert "spearman" not in circuits.__all__ and "edge_rank_correlation" in circuits.__all__
