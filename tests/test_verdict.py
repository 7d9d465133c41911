"""fvsanity.compare.verdict: three outcomes per layer with their own evidence, on constructed data.

Known answers for the attainable p and the replicates needed, the sign-flip test against brute
force, a known natural-like, divergent and underpowered unit, the error rate on simulated null
units (healthy units, and units exactly on a margin) within its binomial interval, the
across-units small-n case and the activation range. No model, float64, seeded, fast.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics

import pytest
import scipy.stats as ss
import torch

from fvsanity.compare import verdict as V
from fvsanity.errors import FVSanityError

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[p, C] x [q, C] -> [p, q] cosine similarities."""
    a = a / a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True)
    return a @ b.T


def feature_layer(g, *, S=8, m=30, n=100, C=64, fv="natural", noise=1.0):
    """One layer built from pooled activation vectors [*, C]: the unit's class prototype plus
    noise for its references, other prototypes for the other images, and FVs that are either
    drawn like the references ("natural") or like unrelated images ("other").

    Returns the three similarity matrices (fv_ref [S, m], ref_ref [m, m], other_ref [n, m])."""
    proto = torch.randn(C, generator=g, dtype=F64)
    others = torch.randn(10, C, generator=g, dtype=F64)
    refs = proto + noise * torch.randn(m, C, generator=g, dtype=F64)
    oth = others[torch.randint(0, 10, (n,), generator=g)] + noise * torch.randn(n, C, generator=g, dtype=F64)
    if fv == "natural":
        fvs = proto + noise * torch.randn(S, C, generator=g, dtype=F64)
    else:
        fvs = torch.randn(S, C, generator=g, dtype=F64) + noise * torch.randn(S, C, generator=g, dtype=F64)
    return cosine(fvs, refs), cosine(refs, refs), cosine(oth, refs)


def feature_layers(g, B, *, S=8, m=20, n=60, C=32, noise=1.0):
    """B healthy layers at once (as :func:`feature_layer` with fv="natural", batched: a few large
    tensor ops instead of many small ones). Returns [B, S, m], [B, m, m], [B, n, m]."""
    proto = torch.randn(B, 1, C, generator=g, dtype=F64)
    others = torch.randn(B, 10, C, generator=g, dtype=F64)
    refs = proto + noise * torch.randn(B, m, C, generator=g, dtype=F64)
    pick = torch.randint(0, 10, (B, n), generator=g)
    oth = torch.gather(others, 1, pick[..., None].expand(B, n, C)) + noise * torch.randn(B, n, C, generator=g, dtype=F64)
    fvs = proto + noise * torch.randn(B, S, C, generator=g, dtype=F64)
    unit = [t / t.norm(dim=-1, keepdim=True) for t in (fvs, refs, oth)]
    r = unit[1].transpose(1, 2)
    return unit[0] @ r, unit[1] @ r, unit[2] @ r


def score_layer(g, theta, *, S=8, m=40, n=200, sd=0.05, nat=0.7, oth=0.5):
    """One layer at the score level: reference scores n_j ~ N(nat, sd), other scores
    o_k ~ N(oth, sd), FV scores at true normalized similarity ``theta``."""
    nn = nat + sd * torch.randn(m, generator=g, dtype=F64)
    oo = oth + sd * torch.randn(n, generator=g, dtype=F64)
    ff = oth + theta * (nat - oth) + sd * torch.randn(S, generator=g, dtype=F64)
    return ff, nn, oo


def exact_layer(theta):
    """A layer whose per-seed normalized similarities are exactly ``theta`` (N = 1, O = 0 with no
    spread on the natural side)."""
    return torch.tensor(theta, dtype=F64), torch.ones(20, dtype=F64), torch.zeros(50, dtype=F64)


# ------------------------------------------------------------------- attainable p (known answers)
def test_attainable_p_known_answers():
    assert V.attainable_p(0) == 1.0
    assert V.attainable_p(1) == 0.5
    assert V.attainable_p(4) == 0.0625
    assert V.attainable_p(5, correction="fixed-sequence") == 0.03125
    # the case: one-sided, 6 units, Holm over 5 layers
    assert V.attainable_p(6, n_layers=5) == pytest.approx(0.078125, abs=0)
    assert V.attainable_p(8, n_layers=12) == pytest.approx(12 / 256)
    # natural-like claims pay no Holm penalty (fixed sequence / intersection-union)
    assert V.attainable_p(6, n_layers=5, correction="fixed-sequence") == 1 / 64
    # Monte Carlo sign patterns: 1 / (1 + n_perm)
    assert V.attainable_p(20, n_perm=999, exact_limit=1000, correction="none") == pytest.approx(1e-3)
    assert V.attainable_p(4, share=0.2, correction="none") == pytest.approx(0.078125)
    # the exact one-sided Wilcoxon signed-rank test has the same floor
    w = ss.wilcoxon([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], alternative="greater", method="exact")
    assert w.pvalue == pytest.approx(V.attainable_p(6, correction="none"))


def test_replicates_needed_known_answers():
    assert V.replicates_needed(0.05, correction="fixed-sequence") == 5
    assert V.replicates_needed(0.05, n_layers=1) == 5
    assert V.replicates_needed(0.05, n_layers=5) == 7  # ceil(log2(5 / 0.05)) = ceil(6.64)
    assert V.replicates_needed(0.05, n_layers=12) == 8  # ceil(log2(240)) = ceil(7.91)
    assert V.replicates_needed(0.05, n_layers=12, share=0.2) == 9  # ceil(log2(300)) = ceil(8.23)
    assert V.replicates_needed(0.01, n_layers=1) == 7  # 2^-7 = 0.0078
    # too few random sign patterns: no number of replicates reaches alpha
    assert V.replicates_needed(0.05, n_layers=100, n_perm=999, exact_limit=1000) is None
    for L in (1, 2, 5, 12, 24):
        need = V.replicates_needed(0.05, n_layers=L)
        assert need == math.ceil(math.log2(L / 0.05))
        assert V.attainable_p(need, n_layers=L) <= 0.05 < V.attainable_p(need - 1, n_layers=L)


# ------------------------------------------------------------------------------ sign flips
def test_sign_flip_p_matches_brute_force_and_bounds_invert_it():
    x = torch.randn(7, generator=gen(0), dtype=F64) + 0.4
    sf = V.sign_flip(x)
    assert sf.exact and sf.sums.numel() == 2**7
    for d in (-0.5, 0.0, 0.3, 0.9):
        obs = float((x - d).sum())
        flips = [float(sum(e * (v - d) for e, v in zip(eps, x.tolist())))
                 for eps in itertools.product((1, -1), repeat=7)]
        assert sf.p_greater(d) == pytest.approx(sum(t >= obs - 1e-12 for t in flips) / 2**7, abs=0)
        assert sf.p_less(d) == pytest.approx(sum(t <= obs + 1e-12 for t in flips) / 2**7, abs=0)
    lo, hi = sf.lower(0.05), sf.upper(0.05)
    assert lo < float(x.mean()) < hi
    assert sf.p_greater(lo - 1e-6) <= 0.05 < sf.p_greater(lo + 1e-6)  # ties within rounding count
    assert sf.p_less(hi + 1e-6) <= 0.05 < sf.p_less(hi - 1e-6)
    # Monte Carlo patterns: p = (1 + k) / (1 + n_perm), close to the exact p
    mc = V.sign_flip(x, n_perm=100, exact_limit=10, generator=gen(1))
    assert not mc.exact and mc.sums.numel() == 100
    assert mc.p_greater(0.0) == pytest.approx(sf.p_greater(0.0), abs=0.1)
    assert mc.p_greater(0.0) * 101 == pytest.approx(round(mc.p_greater(0.0) * 101))
    # an extra natural-side variance only makes the test more careful, never below the floor
    assert sf.p_greater(0.0, var=0.05) >= sf.p_greater(0.0)
    assert V.sign_flip(torch.full((5,), 3.0, dtype=F64)).p_greater(0.0, var=100.0) >= 2**-5


def test_exact_layer_known_answer_hartigan_bound():
    ev = V.layer_evidence("l", *exact_layer([0.9, 1.1, 0.85, 1.0, 0.95]))
    assert ev.separated and ev.n == 5 and ev.estimate == pytest.approx(0.96)
    # 5 seeds: j = floor(0.05 * 32) - 1 = 0, so the lower bound is the smallest seed
    assert ev.ci_low == pytest.approx(0.85) and ev.ci_high == pytest.approx(1.1)
    assert ev.p_natural_like == 1 / 32 and ev.p_floor == 1 / 32
    assert ev.spread_min == pytest.approx(0.85) and ev.spread_max == pytest.approx(1.1)
    assert ev.spread_sd == pytest.approx(statistics.stdev([0.9, 1.1, 0.85, 1.0, 0.95]))
    out = V.decide_layers([ev])
    assert out[0].outcome == V.NATURAL_LIKE and out[0].p_natural_like_adj == 1 / 32


def test_vector_and_matrix_inputs_agree():
    fr, rr, orr = feature_layer(gen(2), S=6, m=12, n=40)
    a = V.layer_evidence("l", fr, rr, orr)
    m = rr.shape[0]
    loo = (rr.sum(1) - rr.diagonal()) / (m - 1)
    b = V.layer_evidence("l", fr.mean(1), loo, orr.mean(1))
    assert a.estimate == pytest.approx(b.estimate, abs=1e-12)
    assert (a.p_natural_like, a.p_diverges) == (b.p_natural_like, b.p_diverges)
    assert a.natural_vs_natural == pytest.approx(float(rr[~torch.eye(m, dtype=torch.bool)].mean()), abs=1e-12)


# --------------------------------------------------------------------------- known cases
def test_known_natural_like_unit():
    g = gen(3)
    uv = V.unit_verdict({name: feature_layer(g, fv="natural") for name in ("conv1", "conv2", "fc")})
    assert [o.outcome for o in uv.layers] == [V.NATURAL_LIKE] * 3
    assert uv.natural_like_from == "conv1" and uv.outcome == V.NATURAL_LIKE
    for o in uv.layers:
        assert o.evidence.ci_low > V.NATURAL_LIKE_MARGIN and o.evidence.n == 8
        assert 0.8 < o.estimate < 1.2
    assert uv.sentence == "natural-like at its own layer; natural-like from conv1 on (3 of 3 layers)"
    json.dumps(uv.to_json(), allow_nan=False)


def test_known_divergent_unit():
    g = gen(4)
    uv = V.unit_verdict({name: feature_layer(g, fv="other") for name in ("conv1", "conv2", "fc")})
    assert [o.outcome for o in uv.layers] == [V.DIVERGES] * 3
    for o in uv.layers:
        assert o.evidence.ci_high < V.DIVERGE_MARGIN and o.p_diverges_adj <= 0.05
        assert abs(o.estimate) < 0.3
    assert uv.natural_like_from is None
    assert uv.sentence == "diverges at its own layer; natural-like at no layer, diverges at 3 of 3 layers"


def test_underpowered_unit_is_inconclusive_with_the_floor_and_the_seeds_needed():
    # 4 healthy seeds: the smallest attainable p is 2^-4 = 0.0625 > 0.05, whatever the FVs
    g = gen(5)
    uv = V.unit_verdict({"fc": feature_layer(g, S=4, fv="natural")})
    o = uv.own
    assert o.outcome == V.INCONCLUSIVE and o.estimate > 0.8
    assert o.floor_natural_like == 0.0625 and o.needed == 5
    assert o.reason == "needs >= 5 FV seeds (smallest attainable p 0.0625 > alpha 0.05)"
    assert uv.sentence == (
        "inconclusive at its own layer (needs >= 5 FV seeds (smallest attainable p 0.0625 > alpha 0.05)); "
        "natural-like at no layer"
    )
    # one seed (today's default): p can never go below 0.5
    one = V.unit_verdict({"fc": feature_layer(g, S=1, fv="natural")}).own
    assert one.outcome == V.INCONCLUSIVE and one.floor_natural_like == 0.5 and one.needed == 5
    # 6 divergent seeds over 12 layers: Holm floor 12 / 64 = 0.1875, needs ceil(log2(240)) = 8 seeds
    layers = {f"l{i}": feature_layer(g, S=6, fv="other") for i in range(12)}
    uv = V.unit_verdict(layers)
    for o in uv.layers:
        assert o.outcome == V.INCONCLUSIVE and o.floor_diverges == pytest.approx(0.1875) and o.needed == 8
        assert o.reason == "needs >= 8 FV seeds (smallest attainable p 0.188 > alpha 0.05)"
    # the same 6 seeds of HEALTHY FVs over 12 layers: natural-like claims pay no Holm penalty
    uv = V.unit_verdict({f"l{i}": feature_layer(g, S=6, fv="natural") for i in range(12)})
    assert uv.natural_like_from == "l0" and uv.n_natural_like == 12


def test_not_significant_reports_seeds_needed_at_the_observed_spread():
    theta = [0.5, 1.3, 0.6, 1.2, 0.7, 1.1, 0.9, 0.9]  # mean 0.9, wide spread
    o = V.unit_verdict({"fc": exact_layer(theta)}).own
    assert o.outcome == V.INCONCLUSIVE and o.evidence.p_natural_like > 0.05
    z = statistics.NormalDist().inv_cdf(0.95) + statistics.NormalDist().inv_cdf(0.8)
    want = math.ceil((z * statistics.stdev(theta) / (0.9 - 0.8)) ** 2)
    assert o.needed == want and want > 8
    assert o.reason == f"not significant (p {o.p_natural_like_adj:.3g}); about {want} FV seeds would decide"


def test_between_margins_and_unseparated_references():
    o = V.unit_verdict({"fc": exact_layer([0.62, 0.66, 0.64, 0.65, 0.63, 0.67, 0.64, 0.65])}).own
    assert o.outcome == V.INCONCLUSIVE and o.needed is None
    assert o.reason == "normalized similarity 0.65 between the margins 0.5 and 0.8"
    # references no more similar to each other than to unrelated images: no scale, no claim
    g = gen(6)
    same = 0.5 + 0.05 * torch.randn(30, generator=g, dtype=F64)
    o = V.unit_verdict({"fc": (torch.full((8,), 0.9, dtype=F64), same, same + 0.01)}).own
    assert o.outcome == V.INCONCLUSIVE and not o.evidence.separated and o.reason.startswith(V.REASON_NOT_SEPARATED)
    assert o.reason == o.evidence.separation.reason and math.isnan(o.estimate) and o.evidence.n == 0


def test_natural_like_runs_back_from_the_units_layer():
    layers = {
        "early": exact_layer([0.1, 0.2, 0.15, 0.05, 0.1, 0.2, 0.15, 0.1]),
        "mid": exact_layer([1.0, 0.95, 1.05, 1.1, 0.9, 1.0, 1.0, 0.97]),
        "late": exact_layer([0.62, 0.66, 0.64, 0.65, 0.63, 0.67, 0.64, 0.65]),
        "own": exact_layer([1.0, 0.95, 1.05, 1.1, 0.9, 1.0, 1.0, 0.97]),
    }
    uv = V.unit_verdict(layers)
    assert [o.outcome for o in uv.layers] == [V.DIVERGES, V.INCONCLUSIVE, V.INCONCLUSIVE, V.NATURAL_LIKE]
    assert uv.layers[1].reason == "natural-like alone (p 0.00391) but not every later layer is"
    assert uv.natural_like_from == "own"
    assert uv.sentence == "natural-like at its own layer; natural-like from own on (1 of 4 layers), diverges at 1 of 4 layers"
    assert (uv.n_natural_like, uv.n_diverges, uv.n_inconclusive) == (1, 1, 2)


# ------------------------------------------------------------------------ null error rates
def _upper(n, rate=0.05, q=0.995) -> int:
    return int(ss.binom.ppf(q, n, rate))


def test_null_false_positive_rate_on_simulated_healthy_units():
    """400 healthy units (FVs drawn from the class's natural distribution, 8 seeds, 2 layers):
    how often any layer reads "diverges" (the verdict's false positive), and how often the
    unit's own layer reads "natural-like" (the verdict's power on healthy units)."""
    g = gen(7)
    flagged = natural = 0
    layers = [feature_layers(g, 400) for _ in range(2)]
    for u in range(400):
        uv = V.unit_verdict({f"l{i}": tuple(t[u] for t in layers[i]) for i in range(2)})
        flagged += uv.n_diverges > 0
        natural += uv.outcome == V.NATURAL_LIKE
    assert flagged <= _upper(400)  # within the binomial interval of 5%, or below it
    assert flagged == 0  # conservative here: healthy units sit far from the 0.5 margin
    assert natural >= 360  # and they are called natural-like


@pytest.mark.parametrize("claim", [V.DIVERGES, V.NATURAL_LIKE])
def test_error_rate_at_the_margin_is_nominal(claim):
    """Units whose true normalized similarity is exactly on the claim's margin (the least
    favourable null), natural side drawn too: the claim's rate is within the binomial interval
    of alpha = 0.05 (or below it)."""
    g = gen(8 if claim == V.DIVERGES else 9)
    theta = V.DIVERGE_MARGIN if claim == V.DIVERGES else V.NATURAL_LIKE_MARGIN
    n_units, hits = 400, 0
    for _ in range(n_units):
        hits += V.unit_verdict({"own": score_layer(g, theta)}).outcome == claim
    lo, hi = ss.binom.ppf(0.005, n_units, 0.05), ss.binom.ppf(0.995, n_units, 0.05)
    assert hits <= hi
    assert hits >= lo  # not needlessly conservative either (measured 4-5%)


# ---------------------------------------------------------------------------- across units
def test_across_units_small_n_is_inconclusive_with_units_needed():
    g = gen(10)
    names = [f"l{i}" for i in range(5)]
    low = 0.1 + 0.05 * torch.randn(6, 5, generator=g, dtype=F64)  # 6 units, clearly divergent
    out = V.across_units_verdict(names, low)
    for o in out:
        assert o.outcome == V.INCONCLUSIVE and o.evidence.replicate == V.UNITS
        assert o.floor_diverges == 0.078125 and o.needed == 7
        assert o.reason == "needs >= 7 units (smallest attainable p 0.0781 > alpha 0.05)"
    # one more unit decides it
    low7 = torch.cat([low, 0.1 + 0.05 * torch.randn(1, 5, generator=g, dtype=F64)])
    assert [o.outcome for o in V.across_units_verdict(names, low7)] == [V.DIVERGES] * 5
    # 6 natural-like units: the fixed sequence needs no Holm, 2^-6 = 0.016 <= 0.05
    high = 1.0 + 0.05 * torch.randn(6, 5, generator=g, dtype=F64)
    assert [o.outcome for o in V.across_units_verdict(names, high)] == [V.NATURAL_LIKE] * 5
    # units missing a layer (NaN) are left out of it
    high[:2, 0] = float("nan")
    first = V.across_units_verdict(names, high)[0]
    assert first.evidence.n == 4 and first.outcome == V.INCONCLUSIVE and first.needed == 5


def test_across_units_from_unit_verdicts():
    g = gen(11)
    names = ("a", "b")
    verdicts = [V.unit_verdict({n: feature_layer(g, fv="natural") for n in names}) for _ in range(8)]
    est = torch.tensor([[o.estimate for o in uv.layers] for uv in verdicts], dtype=F64)
    out = V.across_units_verdict(names, est)
    assert [o.outcome for o in out] == [V.NATURAL_LIKE, V.NATURAL_LIKE]
    assert out[0].evidence.ci_low > 0.8 and out[0].evidence.n == 8


# ------------------------------------------------------------------------- activation range
def test_activation_range():
    r = V.activation_range(torch.tensor([45.0, 30.0]), torch.tensor([0.5, 1.0, -2.0]))
    assert r.ratio.tolist() == [45.0, 30.0] and r.ratio_median == 37.5 and r.ratio_max == 45.0
    assert r.natural_max == 1.0 and not r.natural_silent
    # a unit silent (or negative) on every natural image: finite ratio, flagged
    for nat in (torch.zeros(4), torch.tensor([-1.0, -3.0])):
        s = V.activation_range(torch.tensor([2.0, 0.0]), nat)
        assert s.natural_silent and torch.isfinite(s.ratio).all()
        assert s.ratio.tolist() == [2.0 / V.SILENT_EPS, 0.0]
    json.dumps(s.to_json(), allow_nan=False)
    with pytest.raises(FVSanityError, match="needs >= 1 FV"):
        V.activation_range(torch.tensor([]), torch.ones(3))
    with pytest.raises(FVSanityError, match="finite"):
        V.activation_range(torch.tensor([float("nan")]), torch.ones(3))


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kw, word",
    [
        ({"alpha": 0.7}, "0.7"),
        ({"alpha": 0}, "alpha"),
        ({"diverge_margin": 0.9, "natural_like_margin": 0.8}, "0.9"),
        ({"power": 1.5}, "1.5"),
        ({"natural_share": 1.0}, "natural_share"),
        ({"n_signflips": 0}, "n_signflips"),
    ],
)
def test_bad_settings_are_one_line_errors(kw, word):
    with pytest.raises(V.VerdictError) as e:
        V.VerdictSettings(**kw)
    assert isinstance(e.value, FVSanityError) and word in str(e.value) and "\n" not in str(e.value)


def test_bad_shapes_are_one_line_errors():
    with pytest.raises(V.VerdictError, match="ref_ref"):
        V.layer_evidence("l", torch.ones(3), torch.ones(3, 4), torch.ones(5))
    with pytest.raises(V.VerdictError, match="non-finite"):
        V.layer_evidence("l", torch.tensor([float("nan")]), torch.ones(3), torch.ones(5))
    with pytest.raises(V.VerdictError, match="U, L=2"):
        V.across_units_verdict(["a", "b"], torch.ones(3, 3))
    with pytest.raises(V.VerdictError, match="correction"):
        V.attainable_p(3, correction="bonferroni")


def test_wording_is_one_set_of_constants():
    assert V.OUTCOMES == ("natural-like", "diverges", "inconclusive")
    assert set(V.OWN_LAYER_SENTENCE) == set(V.OUTCOMES)
    assert V.unit_sentence(()) == "inconclusive at its own layer (no layers); natural-like at no layer"


# ------------------------------------------------------------------- the path check's numbers
def test_same_numbers_as_path_layer_stats_and_the_old_verdicts_flaw():
    """The estimate is path.py's ``normalized`` on the same matrices; on a healthy unit with one
    FV seed, 200 other images and 12 layers (the issue's case: smallest Holm p 12/201 > 0.05)
    the old verdict read "diverges" (absence of evidence), this one, now path.py's, "inconclusive"."""
    from fvsanity.compare.path import compare_path, layer_stats, pairwise

    g = gen(13)
    C, names = 16, tuple(f"l{i}" for i in range(12))
    proto = {n: torch.randn(C, generator=g, dtype=F64) for n in names}
    acts = {
        kind: {n: proto[n] * (kind != "other") + torch.randn(k, C, generator=g, dtype=F64) for n in names}
        for kind, k in (("fv", 1), ("natural", 20), ("other", 200))
    }
    old_layers, old = compare_path(acts["fv"], acts["natural"], acts["other"], metric="cosine", n_boot=50, n_perm=200)
    # the old rule (no layer's permutation p above the baseline after Holm: "diverges for 12 of 12
    # layers") is gone; the descriptive p still cannot reach alpha, the verdict says why instead
    assert not any(r.above_baseline for r in old_layers)
    assert old.outcome == V.INCONCLUSIVE and old.n_inconclusive == 12 and old.n_diverges == 0
    mats = {
        n: (pairwise("cosine", acts["fv"][n], acts["natural"][n]), pairwise("cosine", acts["natural"][n], acts["natural"][n]),
            pairwise("cosine", acts["other"][n], acts["natural"][n]))
        for n in names
    }
    uv = V.unit_verdict(mats)
    for o, r in zip(uv.layers, old_layers):
        if not o.evidence.separated:  # the gate: a gap known only to within 20% (20 references)
            assert math.isnan(o.estimate) and math.isnan(r.normalized) and not r.separated
            assert o.outcome == V.INCONCLUSIVE and o.reason.startswith(V.REASON_NOT_SEPARATED + " precisely enough")
            continue
        assert o.estimate == pytest.approx(r.normalized, abs=1e-12)
        assert o.estimate == pytest.approx(layer_stats(*mats[o.name], n_boot=0, n_perm=0)["normalized"], abs=1e-12)
        # 1 seed: natural-like needs 5 (2^-5 <= 0.05), diverges over 12 layers 8 (12 / 2^8 <= 0.05)
        assert o.outcome == V.INCONCLUSIVE and o.needed == (5 if o.estimate >= 0.8 else 8)
        assert o.reason == f"needs >= {o.needed} FV seeds (smallest attainable p {0.5 if o.needed == 5 else 1:.3g} > alpha 0.05)"
    shown = [o.estimate for o in uv.layers if o.evidence.separated]
    assert len(shown) >= 10 and sum(shown) / len(shown) > 0.8
    assert uv.sentence.startswith("inconclusive at its own layer (needs >= ")
    assert old.label == uv.sentence and [r.outcome for r in old_layers] == [o.outcome for o in uv.layers]


def test_union_bound_setting_is_more_careful_and_reports_its_floor():
    """natural_share > 0: the natural side's confidence bound takes that share of alpha, the exact
    sign-flip test the rest (valid whatever the distributions; floor 2^-S / (1 - share))."""
    st = V.VerdictSettings(natural_share=0.2)
    g = gen(14)
    uv = V.unit_verdict({n: feature_layer(g, fv="natural") for n in ("a", "b")}, settings=st)
    assert [o.outcome for o in uv.layers] == [V.NATURAL_LIKE] * 2
    for o in uv.layers:
        assert V.NATURAL_LIKE_MARGIN < o.evidence.ci_low < o.estimate < o.evidence.ci_high
        assert o.evidence.natural_share == 0.2
    default = V.unit_verdict({n: feature_layer(gen(14), fv="natural") for n in ("a", "b")})
    for o, d in zip(uv.layers, default.layers):
        assert o.evidence.ci_low <= d.evidence.ci_low and o.p_natural_like_adj >= d.p_natural_like_adj
    four = V.unit_verdict({"a": feature_layer(g, S=4, fv="natural")}, settings=st).own
    assert four.floor_natural_like == pytest.approx(0.078125) and four.needed == 5


# ------------------------------------------------------- the separation gate (known answers)
def _welch_gate(t) -> bool:
    """The gate as it was: a one-sided Welch t of the reference scores over the other images' at
    alpha 0.05 (still reported, as ``seed_scores``' descriptive ``p_separation``)."""
    sc = V.seed_scores(*t)
    return sc["p_separation"] <= 0.05 and sc["natural_vs_natural"] > sc["natural_vs_other"]


def test_separation_known_answers():
    # separates clearly: references at 1, others at 0, no spread (infinite effect, exact gap)
    s = V.separation(torch.ones(20, dtype=F64), torch.zeros(50, dtype=F64))
    assert s.separated and s.reason == "" and s.gap == 1 and s.se == 0 and s.effect == math.inf and s.precision == 0
    assert s.method == "independent" and (s.m, s.n) == (20, 50)
    # separates clearly from matrices (class prototype + noise): jackknife standard error
    _, rr, orr = feature_layer(gen(20), m=30, n=100)
    s = V.separation(rr, orr)
    assert s.separated and s.method == "jackknife" and s.effect > 2 and s.precision < 0.2
    assert s.lower == pytest.approx(s.gap - statistics.NormalDist().inv_cdf(0.95) * s.se)
    # a tiny but highly significant gap with many images: an effect of 0.1 SD is no scale
    g = gen(21)
    n = 0.51 + 0.1 * torch.randn(100_000, generator=g, dtype=F64)
    o = 0.50 + 0.1 * torch.randn(100_000, generator=g, dtype=F64)
    assert V.seed_scores(torch.zeros(1, dtype=F64), n, o)["p_separation"] < 1e-50  # the old gate passed
    s = V.separation(n, o)
    assert not s.separated and s.precision < 0.2 and s.effect == pytest.approx(0.1, abs=0.01)
    assert s.reason == f"{V.REASON_NOT_SEPARATED} (standardized gap {s.effect:.2f} < 0.5)"
    # no references, one reference, two references of a matrix (the jackknife needs 3): no gap
    for rr_, orr_, m in ((torch.empty(0, dtype=F64), o[:10], 0), (torch.ones(1, dtype=F64), o[:10], 1),
                         (torch.ones(2, 2, dtype=F64), torch.zeros(10, 2, dtype=F64), 2)):
        s = V.separation(rr_, orr_)
        assert not s.separated and s.m == m and s.reason.startswith(V.REASON_NOT_SEPARATED + f" ({m} references")
    # references less similar among themselves than to others
    s = V.separation(torch.full((5,), 0.3, dtype=F64), torch.full((9,), 0.4, dtype=F64))
    assert not s.separated and s.reason == V.REASON_NOT_SEPARATED + " (natural vs natural 0.3 <= natural vs other 0.4)"
    json.dumps(s.to_json(), allow_nan=False)


def test_separation_imprecise_gap_says_how_many_references_would_do():
    """A large effect measured on 6 references: significant, but the gap's lower bound is far
    below its estimate; the reason says about how many references would bring it within 20%."""
    g = gen(22)
    n, o = 0.7 + 0.1 * torch.randn(6, generator=g, dtype=F64), 0.5 + 0.1 * torch.randn(200, generator=g, dtype=F64)
    s = V.separation(n, o)
    assert not s.separated and s.effect > 0.5 and s.lower > 0 and s.precision > 0.2
    assert s.references_needed is not None and s.references_needed > 6
    assert s.reason.startswith(V.REASON_NOT_SEPARATED + " precisely enough (gap ")
    assert s.reason.endswith(f"about {s.references_needed} references would do)")
    # about that many references of the same populations do meet it (the estimate is sound)
    big = 0.7 + 0.1 * torch.randn(2 * s.references_needed, generator=g, dtype=F64)
    assert V.separation(big, o).separated
    # the limits are settings: no effect floor and a loose precision accept it
    assert V.separation(n, o, V.VerdictSettings(min_separation=0, separation_precision=1)).separated
    assert V.VerdictSettings(natural_like_margin=0.9).precision_limit == pytest.approx(0.1)


def test_jackknife_standard_error_of_the_gap_is_calibrated():
    """N is a U-statistic over reference pairs and O depends on the same references: on repeated
    draws the jackknife standard error matches the gap's real spread; the independent-scores
    formula var(n_j)/m + var(o_k)/n is about half of it (what the old gate and threshold used)."""
    g = gen(23)
    C, m, n = 32, 10, 100
    proto, others = torch.randn(C, generator=g, dtype=F64), torch.randn(10, C, generator=g, dtype=F64)
    gaps, jack, naive = [], [], []
    for _ in range(100):
        refs = proto + 1.5 * torch.randn(m, C, generator=g, dtype=F64)
        oth = others[torch.randint(0, 10, (n,), generator=g)] + 1.5 * torch.randn(n, C, generator=g, dtype=F64)
        rr, orr = cosine(refs, refs), cosine(oth, refs)
        s = V.separation(rr, orr)
        sc = V.seed_scores(torch.zeros(1, m, dtype=F64), rr, orr)
        gaps.append(s.gap)
        jack.append(s.se)
        naive.append(math.sqrt(float(sc["n"].var()) / m + float(sc["o"].var()) / n))
    true = statistics.stdev(gaps)
    assert 0.85 < statistics.mean(jack) / true < 1.35
    assert statistics.mean(naive) / true < 0.7


def test_significant_but_imprecise_references_no_longer_read_natural_like():
    """The fault run's case in miniature: every image shares one large activation profile (all
    similarities ~0.97), the unit's 10 references share a small extra direction, its FVs even more
    of it. N - O ~ 0.015 is significant (the old Welch gate passed, theta ~ 1.5: natural-like),
    but known only to within ~30-60%: no scale, no claim, no normalized number."""
    for seed in range(3):
        g = gen(30 + seed)
        C = 64
        profile, u = 6 * torch.randn(C, generator=g, dtype=F64), torch.randn(C, generator=g, dtype=F64)
        refs = profile + u * (1 + 0.5 * torch.randn(10, 1, generator=g, dtype=F64)) + torch.randn(10, C, generator=g, dtype=F64)
        oth = profile + 1.2 * torch.randn(200, C, generator=g, dtype=F64)
        fvs = profile + 1.2 * u + 0.6 * torch.randn(5, C, generator=g, dtype=F64)
        t = (cosine(fvs, refs), cosine(refs, refs), cosine(oth, refs))
        assert _welch_gate(t)
        o = V.unit_verdict({"own": t}).own
        sep = o.evidence.separation
        assert 0 < sep.gap < 0.03 and sep.effect > 1 and sep.lower > 0  # a real, significant gap...
        assert sep.precision > 0.2 and not sep.separated  # ...known too roughly to scale theta by
        assert o.outcome == V.INCONCLUSIVE and o.reason == sep.reason and math.isnan(o.estimate)
        assert "references would do" in o.reason
        # and through path.py: no normalized number in the table or the JSON
        from fvsanity.compare.path import compare_path

        res, verdict = compare_path({"own": fvs}, {"own": refs}, {"own": oth}, metric="cosine", n_boot=20, n_perm=20)
        assert verdict.n_natural_like == 0 and res[0].to_json()["normalized"] is None
        assert res[0].to_json()["separation"]["reason"] == sep.reason
