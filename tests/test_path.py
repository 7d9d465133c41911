"""Path-similarity check: known answers for the statistics, the tiny-model run, figure and CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fvsanity.compare.path import (
    compare_path,
    layer_stats,
    paired_similarity,
    pairwise,
    path_check,
    safe_ratio,
)
from fvsanity.compare.stats import permutation_test
from fvsanity.compare.verdict import DIVERGES, INCONCLUSIVE, NATURAL_LIKE
from fvsanity.data import from_tensor
from fvsanity.hooks import count_hooks
from fvsanity.units import parse_units

LAYER_KEYS = {"name", "fv_vs_natural", "natural_vs_natural", "natural_vs_other", "normalized", "ci_low", "ci_high", "p_value"}


# ----------------------------------------------------------------------------- statistics
def test_safe_ratio_never_inf():
    r = safe_ratio(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([2.0, 0.0, 0.0]))
    assert r[0] == 0.5 and math.isnan(r[1]) and math.isnan(r[2])
    num = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    safe_ratio(num, torch.tensor([0.0, 4.0])).nan_to_num(0).sum().backward()
    assert torch.isfinite(num.grad).all() and num.grad.tolist() == [0.0, 0.25]


def _mats(fv, nat, oth, S=3, m=5, n=7, diag=1.0):
    s_rr = torch.full((m, m), nat, dtype=torch.float64)
    s_rr.fill_diagonal_(diag)
    return torch.full((S, m), fv, dtype=torch.float64), s_rr, torch.full((n, m), oth, dtype=torch.float64)


@pytest.mark.parametrize("fv,expected", [(0.8, 1.0), (0.2, 0.0), (0.5, 0.5), (1.4, 2.0)])
def test_layer_stats_known_answers(fv, expected):
    d = layer_stats(*_mats(fv, 0.8, 0.2), n_boot=50, n_perm=50)
    assert d["fv_vs_natural"] == pytest.approx(fv)
    assert d["natural_vs_natural"] == pytest.approx(0.8)
    assert d["natural_vs_other"] == pytest.approx(0.2)
    assert d["normalized"] == pytest.approx(expected)
    # constant matrices: every bootstrap resample gives the same numbers
    assert d["ci_low"] == pytest.approx(expected) and d["ci_high"] == pytest.approx(expected)


def test_natural_vs_natural_never_pairs_an_image_with_itself():
    # a huge diagonal (self-similarity) must not leak into the point estimate or any resample
    d = layer_stats(*_mats(0.5, 0.3, 0.1, m=4, diag=100.0), n_boot=500, n_perm=10)
    assert d["natural_vs_natural"] == pytest.approx(0.3)
    assert d["natural_vs_natural_ci"][0] == pytest.approx(0.3) and d["natural_vs_natural_ci"][1] == pytest.approx(0.3)


def test_degenerate_references_are_nan_not_inf():
    d = layer_stats(*_mats(0.5, 0.2, 0.2), n_boot=20, n_perm=20)  # natural == other: gap 0
    assert math.isnan(d["normalized"])
    d = layer_stats(*_mats(0.5, 0.2, 0.1, m=1), n_boot=20, n_perm=20)  # one natural image
    assert math.isnan(d["natural_vs_natural"]) and math.isnan(d["normalized"])
    assert d["fv_vs_natural"] == pytest.approx(0.5)


def _perm_p(a_f, a_o, n_perm, gen, exact_limit=200_000):
    """The path check's per-layer test: one-sided, FV scores vs other-image scores (stats.py)."""
    r = permutation_test(a_f, a_o, n_perm, gen, alternative="greater", exact_limit=exact_limit)
    return float(r.pvalue), r.exact


def test_permutation_p_exact_known_answers():
    gen = torch.Generator().manual_seed(0)
    a_o = torch.arange(9, dtype=torch.float64)  # 0..8
    # one FV: p = (#items >= it) / (n + 1)
    assert _perm_p(torch.tensor([8.5]), a_o, 100, gen) == (pytest.approx(1 / 10), True)
    # ties count as reaching: 4.0 (the FV), 4, 5, 6, 7, 8
    assert _perm_p(torch.tensor([4.0]), a_o, 100, gen) == (pytest.approx(6 / 10), True)
    # two FVs above everything: only the observed pair reaches its sum -> 1 / C(11, 2)
    p, exact = _perm_p(torch.tensor([9.0, 10.0]), a_o, 100, gen)
    assert exact and p == pytest.approx(1 / 55)
    # Monte Carlo (fewer draws than the C(252, 2) = 31626 relabellings) agrees with the exact value
    big = torch.linspace(0, 8, 250, dtype=torch.float64)
    p_mc, exact = _perm_p(torch.tensor([6.0, 7.5]), big, 20000, gen, exact_limit=1)
    p_ex, exact_ex = _perm_p(torch.tensor([6.0, 7.5]), big, 0, gen)
    assert not exact and exact_ex and p_mc == pytest.approx(p_ex, abs=4 * (p_ex / 20000) ** 0.5)


def test_layer_stats_uses_the_shared_permutation_test():
    # layer_stats' p is stats.permutation_test on (mean sim of each FV to R, of each other image to R)
    g = torch.Generator().manual_seed(3)
    s_fr, s_rr, s_or = torch.rand(2, 5, generator=g), torch.rand(5, 5, generator=g), torch.rand(9, 5, generator=g)
    d = layer_stats(s_fr, s_rr, s_or, n_boot=0, n_perm=10)
    want = permutation_test(s_fr.mean(1), s_or.mean(1), 10, alternative="greater")
    assert d["p_exact"] and want.exact and d["p_raw"] == pytest.approx(float(want.pvalue), abs=1e-15)


def test_verdict_withheld_for_insufficient_references():
    """Too few references: the curves are kept, the normalized similarity is not (no scale of the
    unit's own: NaN / null), every layer is "inconclusive" with the status as its reason
    (never "diverges" for lack of evidence)."""
    w = _class_world()
    why = "insufficient references: 1 natural reference image(s), need >= 2"
    res, v = compare_path(w["same"], w["natural"], w["other"], n_boot=0, n_perm=100, status=why)
    assert [r.outcome for r in res] == [INCONCLUSIVE, INCONCLUSIVE] and all(r.reason == why for r in res)
    assert v.outcome == INCONCLUSIVE and v.status == why and (v.n_inconclusive, v.n_natural_like, v.n_diverges) == (2, 0, 0)
    assert v.label == f"inconclusive at its own layer ({why}); natural-like at no layer"
    assert all(math.isnan(r.normalized) and math.isnan(r.ci_low) and math.isnan(r.ci_high) for r in res)
    assert all(r.to_json()["normalized"] is None for r in res)
    assert all(math.isfinite(r.natural_vs_natural) and math.isfinite(r.fv_vs_natural) for r in res)  # curves kept


def _class_world(seed=0, C=40, layers=("l1", "l2")):
    """Per layer: two class prototypes; images = prototype + noise (each layer independent)."""
    g = torch.Generator().manual_seed(seed)

    def draw(protos, k, n):
        return protos[k] + 0.6 * torch.randn(n, C, generator=g)

    out = {"same": {}, "natural": {}, "other": {}}
    for name in layers:
        protos = torch.randn(2, C, generator=g)
        out["natural"][name] = draw(protos, 0, 12)
        out["other"][name] = draw(protos, 1, 40)
        out["same"][name] = draw(protos, 0, 10)  # fresh draws from the unit's class
        out.setdefault("oth_fv", {})[name] = draw(protos, 1, 10)  # fresh draws from another class
    return out


@pytest.mark.parametrize("metric", ["spearman", "pearson", "cosine"])
def test_fv_like_natural_scores_one_and_fv_like_other_scores_zero(metric):
    w = _class_world()
    res, verdict = compare_path(w["same"], w["natural"], w["other"], metric=metric, n_boot=300, n_perm=2000)
    for r in res:
        assert r.normalized == pytest.approx(1.0, abs=0.15)
        assert r.ci_low < 1.0 < r.ci_high
        assert r.above_baseline and r.p_value <= 0.05
    # 10 FV seeds: natural-like at both layers (the descriptive permutation p agrees)
    assert [r.outcome for r in res] == [NATURAL_LIKE, NATURAL_LIKE] and verdict.outcome == NATURAL_LIKE
    assert verdict.label == "natural-like at its own layer; natural-like from l1 on (2 of 2 layers)"
    assert all(r.seed_sd > 0 and r.seed_min <= r.normalized <= r.seed_max for r in res)
    res, verdict = compare_path(w["oth_fv"], w["natural"], w["other"], metric=metric, n_boot=300, n_perm=2000)
    for r in res:
        assert abs(r.normalized) < 0.15
        assert r.ci_low < 0.0 < r.ci_high  # the interval covers 0 (fixed seeds: deterministic)
        assert not r.above_baseline
    assert [r.outcome for r in res] == [DIVERGES, DIVERGES] and verdict.n_diverges == 2
    assert verdict.label == "diverges at its own layer; natural-like at no layer, diverges at 2 of 2 layers"


def test_across_units_verdict_known_answer():
    from fvsanity.compare.path import UnitPath, across_units

    def unit(fv_key, seed):
        w = _class_world(seed)
        res, v = compare_path(w[fv_key], w["natural"], w["other"], n_boot=0, n_perm=200, seed=seed)
        return UnitPath(f"u{seed}", None, None, 10, (), 0, (), (), 40, res, v)

    good = [unit("same", s) for s in range(6)]
    rows = across_units(good)
    assert [r.name for r in rows] == ["l1", "l2"]
    for r in rows:
        # every unit's estimate above the 0.8 margin: exact sign-flip p = 1 / 2^6 (fixed sequence)
        assert r.n_units == 6 and r.outcome == NATURAL_LIKE and r.p_natural_like == pytest.approx(1 / 64)
        assert r.mean_difference > 0 and r.median_normalized == pytest.approx(1.0, abs=0.2)
    bad = across_units([unit("oth_fv", s) for s in range(6)])
    # every estimate below the 0.5 margin: p = 1 / 2^6, Holm over 2 layers -> 2 / 64
    assert [r.outcome for r in bad] == [DIVERGES, DIVERGES] and all(r.p_diverges == pytest.approx(2 / 64) for r in bad)
    # 3 units cannot reach alpha (floor 1/8): inconclusive with the units needed, never "diverges"
    few = across_units([unit("oth_fv", s) for s in range(3)])
    assert all(r.outcome == INCONCLUSIVE and "needs >= 6 units" in r.reason for r in few)


def test_compare_path_is_seeded():
    w = _class_world(1)
    a = compare_path(w["same"], w["natural"], w["other"], n_boot=100, n_perm=100, seed=3)[0]
    b = compare_path(w["same"], w["natural"], w["other"], n_boot=100, n_perm=100, seed=3)[0]
    assert [r.to_json() for r in a] == [r.to_json() for r in b]


def test_pairwise_matches_loop():
    from fvsanity.compare.similarity import spearman

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 30, generator=g), torch.randn(7, 30, generator=g)
    a[1] = 0.0  # a constant row is defined as 0, never NaN
    got = pairwise("spearman", a, b, chunk_elems=100)
    want = torch.tensor([[float(spearman(x, y)) for y in b] for x in a], dtype=torch.float64)
    torch.testing.assert_close(got, want)
    assert (got[1] == 0).all()


def test_paired_design_known_answers():
    g = torch.Generator().manual_seed(0)
    a = {"l": torch.randn(12, 30, generator=g, dtype=torch.float64)}
    same = paired_similarity(a, a, (a, a), metric="cka", n_perm=200)[0]
    assert same.value == pytest.approx(1.0) and same.natural_split_half == pytest.approx(1.0)
    assert same.p_value < 0.01 and same.null_mean < 0.3
    b = {"l": torch.randn(12, 30, generator=g, dtype=torch.float64)}
    indep = paired_similarity(a, b, None, metric="cka", n_perm=200)[0]
    assert abs(indep.value) < 0.3 and indep.p_value > 0.01 and math.isnan(indep.natural_split_half)
    rsa = paired_similarity(a, {"l": 3 * a["l"] + 1}, None, metric="rsa", n_perm=50)[0]
    assert rsa.value == pytest.approx(1.0)
    with pytest.raises(Exception, match=">= 4 units"):
        paired_similarity({"l": a["l"][:3]}, {"l": a["l"][:3]}, metric="cka")


# ----------------------------------------------------------------------------- on a model
def _tiny_setup(tiny, n=40, classes=5):
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(n, 3, 16, 16, generator=g)
    labels = torch.arange(n) % classes
    return from_tensor(imgs, labels, [f"c{i}" for i in range(classes)]), imgs


def test_path_check_tiny_model_well_formed(tiny):
    nat, imgs = _tiny_setup(tiny)
    units = ["fc:0", "fc:1", "fc:2", "relu2:3"]
    fv = torch.rand(4, 2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    units = parse_units(units, tiny)  # (layer-shape inference runs one forward; cached on the model)
    calls = []
    h = tiny.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        res = path_check(tiny, units, fv, nat, top_k=3, n_other=10, n_boot=50, n_perm=50, batch_size=16)
    finally:
        h.remove()
    # one streamed pass of the 40 natural images (3 batches) + one per unit for its 2 FVs (a unit's
    # numbers never depend on the units beside it)
    assert len(calls) == 3 + 4
    assert count_hooks(tiny.model) == 0
    d = json.loads(json.dumps(res.to_json(), default=str))
    assert [u["unit"] for u in d["units"]] == [str(u) for u in units]
    for u in d["units"]:
        assert LAYER_KEYS <= set(u["layers"][0])
        assert {"outcome", "label", "n_layers", "counts", "natural_like_from"} <= set(u["verdict"])
        assert u["verdict"]["outcome"] in (NATURAL_LIKE, DIVERGES, INCONCLUSIVE)
        assert {r["outcome"] for r in u["layers"]} <= {NATURAL_LIKE, DIVERGES, INCONCLUSIVE}
        assert sum(u["verdict"]["counts"].values()) == len(u["layers"])
        assert u["unit_verdict"]["sentence"] == u["verdict"]["label"]
    fc0 = d["units"][0]
    assert [r["name"] for r in fc0["layers"]] == ["relu1", "relu2", "relu3", "fc"]
    assert fc0["class_index"] == 0 and fc0["n_class_images"] == 8
    assert set(range(0, 40, 5)) <= set(fc0["natural_indices"])  # class images are references
    assert fc0["n_other"] == 10
    relu2 = d["units"][3]
    assert relu2["class_index"] is None and [r["name"] for r in relu2["layers"]] == ["relu1", "relu2"]
    assert len(relu2["natural_indices"]) == 3
    # paired design over the layers all 4 units share
    assert [r["name"] for r in d["paired"]["cka"]] == ["relu1", "relu2"]
    assert {"settings", "seeds", "versions", "data", "provenance"} <= set(d)
    assert [a["name"] for a in d["across_units"]] == ["relu1", "relu2", "relu3", "fc"]
    # units as replicates: each unit whose references separate from unrelated images at that layer
    # (random images here: mostly none; the others have no normalized similarity there, null)
    for a in d["across_units"]:
        rows = [r for u in d["units"] for r in u["layers"] if r["name"] == a["name"]]
        assert len(rows) == (4 if a["name"] in ("relu1", "relu2") else 3)
        assert a["n_units"] == sum(r["separated"] for r in rows)
        assert all((r["normalized"] is None) == (not r["separated"]) for r in rows)
    assert d["settings"]["metric"] == "spearman" and "torch" in d["versions"]


def test_path_check_fv_equal_to_class_images_travels(tiny):
    """FVs that ARE (held-out) natural images of the unit's class travel like natural images;
    images of another class do not."""
    g = torch.Generator().manual_seed(0)
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9], [0.9, 0.9, 0.1]]).view(4, 3, 1, 1)
    # 80 images per class, 200 others: the references' gap is precise enough at every layer (the
    # separation gate; with 15 per class and 40 others it was not at fc, 10 logits)
    labels = torch.arange(4 * 87) % 4
    imgs = (colours[labels] + 0.2 * torch.rand(len(labels), 3, 16, 16, generator=g)).clamp(0, 1)
    nat = from_tensor(imgs[:320], labels[:320])
    held_out, held_labels = imgs[320:], labels[320:]
    u = path_check(tiny, ["fc:0"], held_out[held_labels == 0][:5][None], nat, top_k=0, n_other=200,
                   n_boot=200, n_perm=500).units[0]
    assert [r.name for r in u.layers] == ["relu1", "relu2", "relu3", "fc"]
    for r in u.layers:
        assert r.normalized == pytest.approx(1.0, abs=0.05)
        assert r.ci_low <= 1.0 + 1e-9 and r.ci_high >= 1.0 - 1e-9
    # 5 FV seeds: natural-like at every layer (exact sign-flip floor 1/32 < 0.05, fixed sequence)
    assert [r.outcome for r in u.layers] == [NATURAL_LIKE] * 4
    assert u.verdict.label == "natural-like at its own layer; natural-like from relu1 on (4 of 4 layers)"
    # 3 seeds cannot reach alpha: inconclusive, with the seeds needed (it used to read "diverges")
    u = path_check(tiny, ["fc:0"], held_out[held_labels == 0][:3][None], nat, top_k=0, n_other=200,
                   n_boot=200, n_perm=500).units[0]
    assert all(r.outcome == INCONCLUSIVE and r.needed == 5 for r in u.layers)
    assert u.layers[-1].reason == "needs >= 5 FV seeds (smallest attainable p 0.125 > alpha 0.05)"
    # images of another class, 5 seeds: far from natural-like, but "diverges" over 4 layers (Holm)
    # needs 7 seeds: inconclusive with that reason, never natural-like
    u = path_check(tiny, ["fc:0"], held_out[held_labels == 2][:5][None], nat, top_k=0, n_other=200,
                   n_boot=200, n_perm=500).units[0]
    assert all(r.outcome == INCONCLUSIVE and "needs >= 7 FV seeds" in r.reason for r in u.layers)
    assert u.verdict.n_natural_like == 0 and u.verdict.natural_like_from is None
    assert all(r.normalized < 0.7 for r in u.layers)


def test_figure_panels_and_mean(tiny, tmp_path):
    from fvsanity.report.path_figure import mean_profile, plot_path_similarity

    nat, _ = _tiny_setup(tiny)
    fv = torch.rand(3, 2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    res = path_check(tiny, ["fc:0", "fc:1", "fc:2"], fv, nat, top_k=3, n_other=10, n_boot=30, n_perm=30)
    for mode in ("panels", "mean"):
        p = plot_path_similarity(res, tmp_path / f"{mode}.png", mode=mode)
        assert p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG"
    prof = mean_profile(res, "fv_vs_natural")
    want = sum(u.layers[0].fv_vs_natural for u in res.units) / 3
    assert prof["relu1"][0] == pytest.approx(want) and prof["relu1"][2] == 3


# ----------------------------------------------------------------------------- CLI
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer")


def _folder(tmp_path, classes=3, per=8, size=32):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    root = tmp_path / "imgs"
    for c in range(classes):
        name = CIFAR_CLASSES[c]  # class folders are matched to the model's class names
        (root / name).mkdir(parents=True)
        for i in range(per):
            arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


def _cli(*args):
    from fvsanity.cli import main

    return main([str(a) for a in args])


FAST = ["--n-boot", "50", "--n-perm", "50", "--no-progress", "--random-weights"]


def test_cli_end_to_end_generates_and_reuses(tmp_path, capsys):
    imgs = _folder(tmp_path)
    out = tmp_path / "out"
    rc = _cli("check", "--model", "cifar10-resnet20", "--unit", "linear:1", "--unit", "layer3.2:5",
              "--images", imgs, "--steps", "3", "--seeds", "2", "--top-k", "4", "--out", out, *FAST)
    assert rc == 0
    d = json.loads((out / "check.json").read_text())
    assert [u["unit"] for u in d["units"]] == ["linear:1", "layer3.2:5"]
    assert LAYER_KEYS <= set(d["units"][0]["layers"][-1]) and d["units"][0]["layers"][-1]["name"] == "linear"
    assert d["units"][0]["n_fv"] == 2 and d["settings"]["fv_settings"]["steps"] == 3
    assert (out / "path_similarity.png").stat().st_size > 5000
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["unit"] == ["linear:1", "layer3.2:5"] and cfg["steps"] == 3
    printed = capsys.readouterr().out
    assert "check.json" in printed and "linear:1" in printed
    # second run reuses the saved FVs; --fv with the saved folder gives the same result
    assert _cli("check", "--model", "cifar10-resnet20", "--unit", "linear:1", "--unit", "layer3.2:5",
                "--images", imgs, "--steps", "3", "--seeds", "2", "--top-k", "4", "--out", out, *FAST) == 0
    assert "reusing FVs" in capsys.readouterr().out
    out2 = tmp_path / "out2"
    assert _cli("check", "--model", "cifar10-resnet20", "--fv", out / "fvs", "--unit", "linear:1",
                "--images", imgs, "--top-k", "4", "--out", out2, *FAST) == 0
    d2 = json.loads((out2 / "check.json").read_text())
    assert d2["units"][0]["layers"] == d["units"][0]["layers"]


def test_cli_fv_tensor_file_and_metric_cka(tmp_path):
    imgs = _folder(tmp_path, classes=4)
    fv = tmp_path / "fv.pt"
    torch.save({"images": torch.rand(4, 2, 3, 32, 32)}, fv)
    out = tmp_path / "o"
    rc = _cli("check", "--model", "cifar10-resnet20", "--unit", "linear:0,linear:1,linear:2,linear:3",
              "--fv", fv, "--images", imgs, "--metric", "cka", "--top-k", "3", "--out", out, *FAST)
    assert rc == 0
    d = json.loads((out / "check.json").read_text())
    assert d["settings"]["metric"] == "spearman" and list(d["paired"]) == ["cka"]
    assert len(d["paired"]["cka"]) == 11 and d["settings"]["requested_metric"] == "cka"


def test_cli_circuits_flag_adds_circuit_overlap(tmp_path):
    imgs = _folder(tmp_path, classes=3, per=4)
    fv = tmp_path / "fv.pt"
    torch.save({"images": torch.rand(1, 2, 3, 32, 32)}, fv)
    out = tmp_path / "c"
    assert _cli("check", "--model", "cifar10-resnet20", "--unit", "linear:1", "--fv", fv, "--images", imgs,
                "--top-k", "2", "--circuits", "--out", out, *FAST) == 0
    d = json.loads((out / "check.json").read_text())
    c = d["circuits"]["linear:1"]
    refs = d["units"][0]["natural_indices"]  # the 4 class images + the top-2 exemplars
    assert c["n_fv"] == 2 and c["n_natural"] == len(refs) >= 4
    # other: up to --circuit-images (16) images outside the references and the unit's class
    assert c["n_other"] == len(c["other_indices"]) == 12 - len(refs) and set(c["other_indices"]).isdisjoint(refs)
    assert {"name", "spearman", "null_same", "null_other", "p_value"} <= set(c["layers"][0])
    out2 = tmp_path / "c2"  # default: no circuits (check stays fast)
    assert _cli("check", "--model", "cifar10-resnet20", "--unit", "linear:1", "--fv", fv, "--images", imgs,
                "--top-k", "2", "--out", out2, *FAST) == 0
    assert "circuits" not in json.loads((out2 / "check.json").read_text())


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--unit", "linear:99"], "out of range"),
        (["--unit", "nolayer:1"], "unknown layer"),
        (["--unit", "linear:1", "--images", "MISSING"], "not found"),
        (["--unit", "linear:1", "--metric", "cka"], "needs >= 4 --unit"),
        (["--unit", "linear:1", "--fv", "MISSING"], "--fv"),
        (["--unit", "linear:1", "--unit", "linear:2", "--fv", "FV1"], "2 --unit given"),
        (["--unit", "linear:1", "--top-k", "-1"], "--top-k must be >= 0"),
        ([], "pass at least one --unit"),
    ],
)
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, extra, match):
    imgs = _folder(tmp_path, per=3)
    fv1 = tmp_path / "fv1.pt"
    torch.save({"images": torch.rand(1, 2, 3, 32, 32)}, fv1)
    args = ["check", "--model", "cifar10-resnet20", "--out", tmp_path / "o", "--steps", "1", *FAST]
    extra = [str(fv1) if a == "FV1" else str(tmp_path / "missing") if a == "MISSING" else a for a in extra]
    if "--images" not in extra:
        extra += ["--images", str(imgs)]
    assert _cli(*args, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fvsanity: error:") and "\n" not in err and match in err


def test_cli_real_resnet20(data_root, tmp_path):
    out = tmp_path / "real"
    rc = _cli("check", "--model", "cifar10-resnet20", "--unit", "linear:3", "--images", data_root / "cifar10-test",
              "--max-per-class", "20", "--steps", "8", "--seeds", "2", "--out", out,
              "--n-boot", "100", "--n-perm", "200", "--no-progress")
    assert rc == 0
    d = json.loads((out / "check.json").read_text())
    u = d["units"][0]
    assert u["class_name"] == "cat" and u["n_class_images"] == 20
    # other images: the other classes' 180 minus any of them among the top-10 exemplars
    assert u["n_other"] == 180 - (u["n_natural"] - 20) and set(u["top_k_indices"]) <= set(u["natural_indices"])
    last = u["layers"][-1]
    # at the logits, images of the class resemble each other more than images of other classes
    assert last["natural_vs_natural"] > last["natural_vs_other"]


def test_experiment_smoke(experiment_smoke, capsys):
    """--smoke without --out: a fresh temporary folder, figures/ untouched (the fixture checks)."""
    out = experiment_smoke("path_similarity")
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    res = json.loads((out / "results.json").read_text())
    assert last["smoke"] is True and res["setups"]["tiny"]["n_units"] == 5
    tiny = res["setups"]["tiny"]
    assert set(tiny["mean_curves"]) == {"fv_vs_natural", "natural_vs_natural", "natural_vs_other", "normalized"}
    assert list(tiny["by_checkpoint_step"]) == ["4"] and tiny["traces"]["steps"] == 8
    for name in ("path_similarity_tiny.png", "path_similarity_tiny_units.png", "objective_traces_tiny.png", "check_tiny.json"):
        assert (out / name).is_file()
