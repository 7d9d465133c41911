"""The manipulation-detection benchmark: ROC utilities with known answers, the
signals, the combined score, and the experiment's smoke run (every registered method joins)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fvsanity.compare.detect import (
    SIGNALS,
    CombinedScore,
    DetectionError,
    atypicality,
    auc_ci,
    channel_rank,
    confident_rank,
    detection_signals,
    exemplar_agreement,
    fit_combined,
    healthy_band,
    min_units_for_confidence,
    rate_above,
    roc_auc,
    roc_curve,
    threshold_at_fpr,
    threshold_fpr_interval,
)

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- ROC known answers
def test_auc_of_perfectly_separated_scores_is_one_and_reversed_is_zero():
    assert roc_auc([0.1, 0.2, 0.3], [0.5, 0.9]) == 1.0
    assert roc_auc([0.5, 0.9], [0.1, 0.2, 0.3]) == 0.0


def test_auc_of_identical_distributions_is_about_one_half():
    rng = np.random.default_rng(0)
    a = roc_auc(rng.normal(size=4000), rng.normal(size=4000))
    assert abs(a - 0.5) < 0.02


def test_ties_count_one_half():
    assert roc_auc([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.5
    # one positive tied with the only negative, one above it: (1/2 + 1) / 2
    assert roc_auc([0.0], [0.0, 1.0]) == 0.75


def test_auc_ci_brackets_the_auc_and_is_a_point_when_separated():
    rng = np.random.default_rng(1)
    neg, pos = rng.normal(size=60), rng.normal(1.0, size=60)
    lo, hi = auc_ci(neg, pos, n_boot=500, seed=0)
    a = roc_auc(neg, pos)
    assert lo < a < hi
    assert 0.05 < hi - lo < 0.3
    assert auc_ci([0, 1, 2], [5, 6], n_boot=100) == (1.0, 1.0)


def test_roc_curve_runs_from_origin_to_one_one():
    fpr, tpr = roc_curve([0.0, 1.0], [2.0, 0.5])
    assert fpr[0] == 0.0 and tpr[0] == 0.0
    assert fpr[-1] == 1.0 and tpr[-1] == 1.0
    assert list(tpr[:2]) == [0.0, 0.5]


def test_threshold_at_5pct_fpr_flags_at_most_5pct_of_its_negatives():
    neg = np.arange(100.0)
    t = threshold_at_fpr(neg, 0.05)
    assert t == 94.0
    assert rate_above(neg, t) == 0.05
    assert threshold_at_fpr(np.arange(10.0), 0.05) == 9.0  # 10 negatives: no room for a false positive
    assert rate_above(np.arange(10.0), 9.0) == 0.0


def test_threshold_chosen_on_tuning_nulls_has_its_nominal_fpr_on_fresh_nulls():
    rng = np.random.default_rng(2)
    rates = []
    for _ in range(400):
        t = threshold_at_fpr(rng.normal(size=200), 0.05)
        rates.append(rate_above(rng.normal(size=200), t))
    m, se = float(np.mean(rates)), float(np.std(rates) / math.sqrt(len(rates)))
    # the order statistic's exceedance is (n - k + 1) / (n + 1) = 11/201 = 0.0547 on average
    assert abs(m - 11 / 201) < 3 * se + 1e-3
    assert 0.04 < m < 0.07


def test_bad_scores_are_one_line_errors():
    with pytest.raises(DetectionError, match="empty"):
        roc_auc([], [1.0])
    with pytest.raises(DetectionError, match="NaN"):
        roc_auc([float("nan")], [1.0])
    with pytest.raises(DetectionError, match="fpr"):
        threshold_at_fpr([1.0, 2.0], 1.5)


# ----------------------------------------------------------------------------- signals
def test_exemplar_agreement_is_one_for_fvs_like_the_exemplars_and_about_half_for_unrelated():
    g = torch.Generator().manual_seed(0)
    nat = torch.randn(200, 32, generator=g)
    ex = list(range(10))
    proto = nat[ex].mean(0)
    nat[ex] = proto + 0.1 * torch.randn(10, 32, generator=g)
    fv = proto[None].repeat(3, 1) + 0.1 * torch.randn(3, 32, generator=g)
    assert exemplar_agreement(fv, nat, ex) == 1.0
    rnd = torch.randn(50, 32, generator=g)
    vals = [exemplar_agreement(rnd[i:i + 1], nat, ex) for i in range(50)]
    assert abs(float(np.mean(vals)) - 0.5) < 0.1
    assert math.isnan(exemplar_agreement(fv, nat, []))


def test_combined_score_learns_the_informative_signal_and_ignores_an_empty_one():
    rng = np.random.default_rng(3)
    names = ["path_own", "log_activation_range", "exemplar_own"]
    h = np.stack([rng.normal(1.0, 0.2, 80), rng.normal(size=80), np.full(80, np.nan)], 1)
    m = np.stack([rng.normal(0.2, 0.2, 80), rng.normal(size=80), np.full(80, np.nan)], 1)
    cs = fit_combined(h, m, names)
    assert cs.coef[0] < 0 and cs.coef[2] == 0.0
    assert abs(cs.coef[1]) < abs(cs.coef[0]) / 3
    assert roc_auc(cs.score(h), cs.score(m)) > 0.98
    assert rate_above(cs.score(h), cs.threshold_5fpr) <= 0.05
    back = CombinedScore.from_json(json.loads(json.dumps(cs.to_json())))
    np.testing.assert_allclose(back.score(m), cs.score(m))
    with pytest.raises(DetectionError, match=r"\[U, 3\]"):
        cs.score(h[:, :2])


def test_atypicality_is_zero_at_the_healthy_median_symmetric_and_finite_on_a_constant_column():
    h = np.array([[0.0, 5.0], [1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [4.0, 5.0]])
    center, spread = healthy_band(h)
    assert center.tolist() == [2.0, 5.0]
    assert spread[0] == pytest.approx(1.4826) and 0 < spread[1] < 1  # MAD 0: floored, not 0
    a = atypicality(np.array([[2.0, 5.0], [0.0, 5.0], [4.0, 5.0], [2.0, 50.0]]), center, spread)
    assert a[0].tolist() == [0.0, 0.0]
    assert a[1, 0] == a[2, 0] > 0  # as far below as above
    assert np.isfinite(a).all() and a[3, 1] > 5
    assert np.isnan(atypicality(np.array([[np.nan, 5.0]]), center, spread)[0, 0])
    c2, s2 = healthy_band(np.full((3, 1), np.nan))  # no finite value: a neutral band
    assert c2.tolist() == [0.0] and s2.tolist() == [1.0]


def test_channel_rank_is_zero_when_the_fv_drives_its_own_unit_hardest_and_counts_the_channels_that_overtake_it():
    g = torch.Generator().manual_seed(0)
    nat = torch.randn(100, 5, generator=g) * torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0]) + 10.0
    z = torch.zeros(3, 5)
    z[:, 1] = 6.0  # seed-wise natural z-scores: unit 1 six SDs out, the others at their mean
    fv = z * nat.std(0) + nat.mean(0)
    assert channel_rank(fv, nat, 1) == 0.0
    z[:, 3] = 8.0  # a route: channel 3 overtakes the unit on every seed
    assert channel_rank(z * nat.std(0) + nat.mean(0), nat, 1) == pytest.approx(1 / 4)
    tied, nat_t = z * nat.std(0) + nat.mean(0), nat.clone()
    nat_t[:, 4], tied[:, 4] = nat[:, 1], tied[:, 1]  # channel 4 a copy of the unit: a tie counts one half
    assert channel_rank(tied, nat_t, 1) == pytest.approx(1.5 / 4)
    # the scale of a channel does not matter, only where the FV puts it in its natural range
    scale = torch.tensor([1.0, 100.0, 0.01, 7.0, 1.0])
    assert channel_rank(fv * scale, nat * scale, 1) == 0.0
    # a channel constant on natural images (a silent unit's) that fires on the FV overtakes it
    nat[:, 0] = 0.0
    fv2 = fv.clone()
    fv2[:, 0] = 1e-3
    assert channel_rank(fv2, nat, 1) == pytest.approx(1 / 4)
    assert math.isnan(channel_rank(fv[:, :1], nat[:, :1], 0))
    with pytest.raises(DetectionError, match="out of range"):
        channel_rank(fv, nat, 5)
    with pytest.raises(DetectionError, match=r"\[S, C\]"):
        channel_rank(fv[:, :4], nat, 1)


def test_two_sided_combined_score_catches_manipulations_on_both_sides_of_the_healthy_band():
    # manipulated units leave the healthy band of one signal either way: one-sided it is at
    # chance, two-sided it separates; the JSON round trip keeps the band
    rng = np.random.default_rng(5)
    names = ["log_activation_range", "path_own"]
    h = np.stack([rng.normal(0.0, 0.3, 100), rng.normal(size=100)], 1)
    side = np.where(rng.random(100) < 0.5, -1.0, 1.0)
    m = np.stack([side * rng.uniform(2.0, 4.0, 100), rng.normal(size=100)], 1)
    one, two = fit_combined(h, m, names), fit_combined(h, m, names, two_sided=True)
    assert abs(roc_auc(one.score(h), one.score(m)) - 0.5) < 0.15
    assert roc_auc(two.score(h), two.score(m)) > 0.99
    assert rate_above(two.score(h), two.threshold_5fpr) <= 0.05
    assert len(two.coef) == 2 * len(names) and two.coef[2] > 0  # weight on the atypicality of signal 0
    back = CombinedScore.from_json(json.loads(json.dumps(two.to_json())))
    np.testing.assert_allclose(back.score(m), two.score(m))
    old = {k: v for k, v in one.to_json().items() if k != "two_sided"}  # a results.json from before
    np.testing.assert_allclose(CombinedScore.from_json(old).score(m), one.score(m))


def test_detection_signals_on_a_tiny_model_gives_every_signal_per_unit():
    from fvsanity.data import from_tensor
    from fvsanity.generate import render
    from fvsanity.testing import tiny_model

    lm = tiny_model()
    g = torch.Generator().manual_seed(0)
    nat = from_tensor(torch.rand(40, 3, 16, 16, generator=g), torch.arange(40) % 5)
    units = ["fc:0", "relu2:1"]
    fv = render(lm, units, seeds=[0, 1], steps=4, progress=False)
    check, sig = detection_signals(lm, units, fv, nat, _settings())
    assert [s.unit for s in sig] == units
    for s in sig:
        assert set(s.values) == set(SIGNALS)
        for k in ("path_own", "path_mean", "log_activation_range", "exemplar_own", "exemplar_mean", "rank_own"):
            assert math.isfinite(s.values[k]), (s.unit, k)
        assert 0.0 <= s.values["exemplar_own"] <= 1.0
        assert 0.0 <= s.values["rank_own"] <= 1.0
        assert s.outcome in ("natural-like", "diverges", "inconclusive")
    # the detector's input is the ratio as computed, also where the check withholds it (no scale)
    assert sig[0].values["path_own"] == check.units[0].layers[-1].normalized_raw


def _settings():
    from fvsanity.compare.path import PathCheckSettings

    return PathCheckSettings(top_k=3, n_other=20, n_boot=20, n_perm=20, paired_metrics=())


# ----------------------------------------------------------------------------- the experiment
def test_detection_smoke_run_covers_every_registered_method_and_writes_the_results_schema(tmp_path, experiment_smoke):
    """The experiment's --smoke run (no --out: a fresh temporary folder, figures/detection untouched;
    the fixture checks); a toy method registered here joins automatically."""
    from fvsanity.fool import (
        MANIPULATIONS,
        ManipulatedModel,
        Manipulation,
        list_manipulations,
        wrap_loaded,
    )

    class Identity(Manipulation):
        name = "toy-identity"
        help = "changes nothing"

        def build(self, lm, routes, train_images, settings, *, prepared=None):
            return wrap_loaded(lm, ManipulatedModel(lm.model, lm.preprocess), self.name)

    sys.path.insert(0, str(ROOT / "experiments" / "detection"))
    try:
        import run as detection_run
    finally:
        sys.path.pop(0)
    cfg = json.loads((ROOT / "experiments" / "detection" / "config.json").read_text())
    smoke = cfg["smoke"]
    small = tmp_path / "config.json"
    small.write_text(json.dumps({"models": {}, "smoke": smoke}))
    with MANIPULATIONS.registered("toy-identity", Identity):
        methods = list_manipulations()
        out = experiment_smoke("detection", "--config", str(small), module=detection_run)
    res = json.loads((out / "results.json").read_text())["tiny"]
    assert res["n_healthy"] == len(res["units"]["evaluation"]) >= 2
    assert not set(res["units"]["tuning"]) & set(res["units"]["evaluation"])
    assert 0.0 <= res["healthy_fpr"] <= 1.0
    want = {f"{m}:{v['name']}" for m in methods for v in smoke["variants"]}
    assert set(res["methods"]) == want
    assert "toy-identity:unit" in want and "circuit:unit" in want and "silent:picture" in want
    for m in res["methods"].values():
        assert m["n"] == res["n_healthy"]
        assert 0.0 <= m["auc_ci"][0] <= m["auc"] <= m["auc_ci"][1] <= 1.0
        assert 0.0 <= m["tpr_at_5fpr"] <= 1.0
        assert m["best_signal"] in (set(SIGNALS) | {f"|{n}|" for n in SIGNALS}
                                    | {"combined", "combined_one_sided", "combined_path", "combined_method"})
    # the identity "manipulation" changes nothing: its FVs are the healthy ones (same seeds), so
    # no score can tell them apart
    assert res["methods"]["toy-identity:unit"]["signals"]["combined"]["auc"] == 0.5
    assert res["methods"]["toy-identity:unit"]["effective_fraction"] == 0.0  # and the benchmark says so
    assert (out / "roc_tiny.png").is_file() and (out / "work" / "tiny").is_dir()


# ----------------------------------------------------------------------------- item 4: check / audit
FAST = ["--steps", "3", "--seeds", "2", "--top-k", "3", "--n-other", "8", "--n-boot", "10", "--n-perm", "10",
        "--no-progress"]
TOY = ["--model", "toy-procedural", "--random-weights"]


def _fake_results(path: Path, model: str) -> Path:
    """A detection results.json for ``model`` with scores fit on synthetic signals."""
    from fvsanity.compare.detect import PATH_SIGNALS

    rng = np.random.default_rng(0)
    names = list(SIGNALS)
    h = rng.normal(size=(40, len(names)))
    m = rng.normal(size=(40, len(names))) - 1.0
    full = fit_combined(h, m, names)
    cols = [names.index(n) for n in PATH_SIGNALS]
    path_only = fit_combined(h[:, cols], m[:, cols], PATH_SIGNALS)
    meth = {"circuit:unit": {"n": 30, "auc": 0.9, "auc_ci": [0.8, 1.0], "tpr_at_5fpr": 0.8, "best_signal": "combined",
                             "signals": {"combined": {"tpr_at_5fpr": 0.8}, "combined_path": {"tpr_at_5fpr": 0.7}}}}
    doc = {model: {"healthy_fpr": 0.0, "n_healthy": 30, "methods": meth, "combined_score": full.to_json(),
                   "combined_path_score": path_only.to_json(), "combined_eval_healthy_fpr": 0.033,
                   "combined_path_eval_healthy_fpr": 0.067}}
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def toy_images(tmp_path_factory):
    from fvsanity.models import toy

    return toy.write_procedural_folder(tmp_path_factory.mktemp("imgs") / "imgs", per_class=3)


def test_check_and_audit_report_the_calibrated_score_and_its_operating_point(tmp_path, toy_images, capsys):
    from fvsanity.cli import main

    res = _fake_results(tmp_path / "results.json", "toy-procedural")
    out = tmp_path / "check"
    assert main(["check", *TOY, "--unit", "fc:1", "--images", str(toy_images), "--out", str(out), *FAST,
                 "--calibration", str(res)]) == 0
    printed = capsys.readouterr().out
    unit = json.loads((out / "check.json").read_text())["units"][0]
    cal = unit["calibrated"]
    assert cal["score_name"] == "combined"  # check has the exemplar signals
    assert math.isfinite(cal["score"]) and cal["flagged"] == (cal["score"] > cal["threshold"])
    assert "5%-FPR threshold measured on toy-procedural" in cal["text"]
    assert "healthy FPR 3.3%" in cal["text"] and cal["text"] in printed
    aud = tmp_path / "audit"
    assert main(["audit", *TOY, "--units", "fc:1", "--images", str(toy_images), "--out", str(aud), *FAST,
                 "--calibration", str(res)]) == 0
    rows = json.loads((aud / "calibrated.json").read_text())["units"]
    assert [r["unit"] for r in rows] == ["fc:1"]
    assert rows[0]["score_name"] == "combined_path"  # audit.json holds the path signals only
    assert "healthy FPR 6.7%" in rows[0]["text"]
    assert rows[0]["text"] in capsys.readouterr().out


def test_calibration_reports_the_confident_threshold_where_the_results_have_one(tmp_path):
    from fvsanity.compare.detect import PATH_SIGNALS, load_calibration

    res = _fake_results(tmp_path / "results.json", "m")
    names = list(SIGNALS)
    values = dict(zip(names, np.zeros(len(names))))
    old = load_calibration(res, "m").rate(values)
    assert "confident" not in old and "confident" not in old["text"]  # a results.json from before
    doc = json.loads(res.read_text())
    score = old["score"]
    doc["m"]["combined_confident"] = {"confidence": 0.9, "n_tuning": 100, "attainable": True,
                                      "threshold": score + 1.0, "fpr_at_threshold": 0.03}
    doc["m"]["combined_path_confident"] = {"confidence": 0.9, "n_tuning": 100, "attainable": False, "n_needed": 45}
    doc["m"]["methods"]["circuit:unit"]["signals"]["combined"]["confident"] = {"attainable": True, "tpr": 0.6}
    res.write_text(json.dumps(doc))
    cal = load_calibration(res, "m")
    r = cal.rate(values)
    assert r["confident"]["flagged"] is False and r["confident"]["threshold"] == score + 1.0
    assert r["text"].endswith(f"not flagged at the 90%-confident threshold {score + 1.0:.2f} "
                              f"(healthy FPR 3.0%; TPR circuit:unit 60%)")
    doc["m"]["combined_confident"]["threshold"] = score - 1.0
    res.write_text(json.dumps(doc))
    assert load_calibration(res, "m").rate(values)["confident"]["flagged"] is True
    path = load_calibration(res, "m").rate({n: values[n] for n in PATH_SIGNALS})  # no exemplars: path-only
    assert path["score_name"] == "combined_path" and "confident" not in path  # not attainable there


def test_a_calibration_measured_on_another_model_is_refused_in_one_line(tmp_path, toy_images, capsys):
    from fvsanity.cli import main

    res = _fake_results(tmp_path / "results.json", "cifar10-resnet20")
    for cmd, unit_flag in (("check", "--unit"), ("audit", "--units")):
        out = tmp_path / cmd
        capsys.readouterr()
        rc = main([cmd, *TOY, unit_flag, "fc:1", "--images", str(toy_images), "--out", str(out), *FAST,
                   "--calibration", str(res)])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert rc == 2 and len(err) == 1, err
        assert "measured on cifar10-resnet20, not on 'toy-procedural'" in err[0]
        assert not (out / "check.json").exists() and not (out / "audit.json").exists()
    with pytest.raises(DetectionError, match="not found"):
        from fvsanity.compare.detect import load_calibration

        load_calibration(tmp_path / "missing.json", "x")


# ----------------------------------------------------------------------------- caches never serve stale FVs
def _detection_run():
    sys.path.insert(0, str(ROOT / "experiments" / "detection"))
    try:
        import run as detection_run
    finally:
        sys.path.pop(0)
    return detection_run


def test_a_manipulation_rebuilt_with_other_settings_re_renders_its_fvs_and_keeps_the_other_conditions(tmp_path):
    """The benchmark's FV caches are keyed on the manipulated model's fingerprint: the same
    settings reuse the FVs, a changed setting (other weights) re-renders them; `--method` re-measures
    one method and keeps the conditions measured earlier under the same design."""
    from dataclasses import dataclass

    from fvsanity.fool import (
        MANIPULATIONS,
        ManipulatedModel,
        Manipulation,
        MethodSettings,
        setting,
        wrap_loaded,
    )

    @dataclass(frozen=True)
    class ScaleSettings(MethodSettings):
        toy_scale: float = setting(1.0, "factor on the output layer's weights")

    class Scale(Manipulation):
        name = "toy-scale"
        help = "scales the output layer's weights"
        Settings = ScaleSettings

        def build(self, lm, routes, train_images, settings, *, prepared=None):
            import copy

            net = copy.deepcopy(lm.model)
            with torch.no_grad():
                for p in net.get_submodule(lm.output_layer).parameters():
                    p.mul_(settings.toy_scale)
            return wrap_loaded(lm, ManipulatedModel(net, lm.preprocess), self.name)

    class Identity(Manipulation):
        name = "toy-same"
        help = "changes nothing"

        def build(self, lm, routes, train_images, settings, *, prepared=None):
            return wrap_loaded(lm, ManipulatedModel(lm.model, lm.preprocess), self.name)

    run = _detection_run()
    smoke = json.loads((ROOT / "experiments" / "detection" / "config.json").read_text())["smoke"]
    smoke = {**smoke, "variants": smoke["variants"][:1], "n_boot": 10}
    out, work = tmp_path / "out", tmp_path / "work"

    def go(scale: float, methods: list[str]) -> dict:
        cfg = tmp_path / "config.json"
        cfg.write_text(json.dumps({"models": {}, "smoke": {**smoke, "method_settings": {"toy-scale": {"toy_scale": scale}}}}))
        argv = ["--smoke", "--config", str(cfg), "--out", str(out), "--work", str(work), "--threads", "1"]
        for m in methods:
            argv += ["--method", m]
        assert run.main(argv) == 0
        return json.loads((out / "signals_tiny.json").read_text())["meta"]

    with MANIPULATIONS.registered("toy-scale", Scale), MANIPULATIONS.registered("toy-same", Identity):
        first = go(0.5, ["toy-scale", "toy-same"])
        assert first["fv_reused"] == {"healthy": {"tuning": False, "evaluation": False},
                                      "toy-scale:unit": {"tuning": False, "evaluation": False},
                                      "toy-same:unit": {"tuning": False, "evaluation": False}}
        again = go(0.5, ["toy-scale"])  # same settings: same fingerprint, FVs reused
        assert again["fv_reused"]["toy-scale:unit"] == {"tuning": True, "evaluation": True}
        assert again["fingerprints"]["toy-scale:unit"] == first["fingerprints"]["toy-scale:unit"]
        changed = go(0.25, ["toy-scale"])  # other weights: re-rendered, never served from the cache
        assert changed["fv_reused"]["toy-scale:unit"] == {"tuning": False, "evaluation": False}
        assert changed["fingerprints"]["toy-scale:unit"] != first["fingerprints"]["toy-scale:unit"]
        assert changed["fv_reused"]["healthy"] == {"tuning": True, "evaluation": True}
        # the condition not re-measured is kept from the earlier run of the same design
        assert changed["fingerprints"]["toy-same:unit"] == first["fingerprints"]["toy-same:unit"]
        res = json.loads((out / "results.json").read_text())["tiny"]
        assert set(res["methods"]) == {"toy-scale:unit", "toy-same:unit"}
        # another design (other FV steps): the earlier conditions are dropped, not mixed in
        smoke = {**smoke, "steps": smoke["steps"] + 1}
        other = go(0.25, ["toy-scale"])
        assert set(other["fingerprints"]) == {"healthy", "toy-scale:unit"}
        assert other["fv_reused"]["toy-scale:unit"] == {"tuning": False, "evaluation": False}


def test_the_benchmark_draws_n_class_units_when_class_is_a_number():
    from fvsanity.testing import tiny_model

    run = _detection_run()
    lm = tiny_model()
    n_cls = lm.layer_info(lm.output_layer).layout.channels
    every = run.candidate_units(lm, {"class": True, "seed": 0})
    assert every == [f"{lm.output_layer}:{c}" for c in range(n_cls)]
    some = run.candidate_units(lm, {"class": 3, "seed": 0})
    assert len(set(some)) == 3 and set(some) <= set(every)
    assert some == run.candidate_units(lm, {"class": 3, "seed": 0})  # seeded
    assert run.candidate_units(lm, {"class": False, "hidden": {}, "seed": 0}) == []


def test_the_benchmark_never_draws_an_excluded_class_unit():
    """``exclude`` (units an earlier run measured) is honoured and the draw still has n units."""
    from fvsanity.testing import tiny_model

    run = _detection_run()
    lm = tiny_model()
    first = run.candidate_units(lm, {"class": 2, "seed": 0})
    again = run.candidate_units(lm, {"class": 2, "seed": 0, "exclude": first})
    assert len(set(again)) == 2 and not set(again) & set(first)


def test_benchmark_scoring_leaves_out_a_signal_missing_for_a_whole_condition():
    """Conditions kept from a run before a signal existed hold NaN for it: the NaN imputation
    would score the condition, not the signal, so the signal is left out of every score."""
    sys.path.insert(0, str(ROOT / "experiments" / "detection"))
    try:
        import run as detection_run
    finally:
        sys.path.pop(0)
    rng = np.random.default_rng(0)
    k = len(SIGNALS)
    rank = list(SIGNALS).index("rank_own")

    def block(shift, n=20, missing=False):
        x = rng.normal(size=(n, k)) + shift
        if missing:
            x[:, rank] = np.nan
        return x

    signals = {r: {"healthy": block(0.0), "a": block(0.0), "b": block(0.0, missing=True)}
               for r in ("tuning", "evaluation")}
    for r in signals:  # rank_own alone would separate condition a perfectly
        signals[r]["healthy"][:, rank] = rng.uniform(0, 0.1, 20)
        signals[r]["a"][:, rank] = rng.uniform(0.5, 1.0, 20)
    verdicts = {"evaluation": {c: {"outcome": ["inconclusive"] * 20, "diverges_any": [False] * 20} for c in ("a", "b")}}
    res = detection_run.score(signals, verdicts, 0.05, 20, 0)
    assert "rank_own" not in res["combined"]["names"] and "rank_own" not in res["methods"]["a"]["signals"]
    assert res["methods"]["a"]["auc"] < 0.8  # nothing else separates it
    assert abs(res["methods"]["b"]["signals"]["combined"]["auc"] - 0.5) < 0.25


def test_threshold_fpr_interval_matches_simulated_thresholds_from_few_tuning_units():
    """Known answer by simulation: thresholds chosen at 5% FPR on 26 normal healthy scores have
    true FPRs with the Beta(2, 25) mean and 90% interval, and the evaluation count on 30 new
    units follows the predictive (beta-binomial) distribution."""
    from scipy.stats import norm

    rng = np.random.default_rng(0)
    t = threshold_fpr_interval(26, 0.05, 0.9, n_eval=30, observed=3 / 30)
    assert t["k"] == 25 and t["mean"] == pytest.approx(2 / 27)
    thr = np.array([threshold_at_fpr(rng.normal(size=26), 0.05) for _ in range(4000)])
    true_fpr = norm.sf(thr)
    assert abs(true_fpr.mean() - t["mean"]) < 0.004
    inside = np.mean((true_fpr >= t["interval"][0]) & (true_fpr <= t["interval"][1]))
    assert abs(inside - 0.9) < 0.02
    counts = rng.binomial(30, true_fpr)
    assert abs(np.mean(counts >= 3) - t["p_at_least_observed"]) < 0.03
    lo, hi = t["predictive_interval"]
    assert np.mean((counts / 30 >= lo) & (counts / 30 <= hi)) >= 0.9
    with pytest.raises(DetectionError, match="healthy tuning score"):
        threshold_fpr_interval(0)


def test_confident_threshold_holds_its_fpr_with_the_stated_probability():
    """Known answers (P(true FPR <= 5%) = P(Binomial(n, 0.05) >= n + 1 - k)): from 100 healthy
    scores the 90%-confident threshold is the 2nd largest (k = 99: 0.963; k = 98: 0.882); 45
    units are the fewest that can give one (1 - 0.95^45 = 0.901, 1 - 0.95^44 = 0.895), fewer are a
    one-line error naming 45. By simulation its true FPR is <= 5% in at least 90% of tuning draws,
    where the plain 5% threshold's is in about half."""
    from scipy.stats import norm

    assert confident_rank(100, 0.05, 0.9) == 99
    assert min_units_for_confidence(0.05, 0.9) == 45
    assert confident_rank(45, 0.05, 0.9) == 45 and confident_rank(44, 0.05, 0.9) is None
    x = np.arange(100.0)
    assert threshold_at_fpr(x, 0.05, confidence=0.9) == 98.0  # the 2nd largest
    assert threshold_at_fpr(x, 0.05) == 94.0
    with pytest.raises(DetectionError, match=r"^26 healthy tuning scores cannot give .* need >= 45$"):
        threshold_at_fpr(np.arange(26.0), 0.05, confidence=0.9)
    rng = np.random.default_rng(1)
    sims = rng.normal(size=(3000, 100))
    conf = norm.sf([threshold_at_fpr(r, 0.05, confidence=0.9) for r in sims])
    plain = norm.sf([threshold_at_fpr(r, 0.05) for r in sims])
    assert np.mean(conf <= 0.05) >= 0.9 - 0.015 and np.mean(conf <= 0.05) == pytest.approx(0.963, abs=0.015)
    assert 0.3 < np.mean(plain <= 0.05) < 0.7
