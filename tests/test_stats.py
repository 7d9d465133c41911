"""fvsanity.compare.stats: the one implementation of ranks, bootstrap, permutation p and Holm,
cross-checked against scipy.stats on the same data, and used by path, circuits and the paired design."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats as ss
import torch

from fvsanity.compare import circuits, path, similarity
from fvsanity.compare.stats import (
    bootstrap_ci,
    bootstrap_counts,
    bootstrap_indices,
    holm,
    percentile_interval,
    permutation_pvalue,
    permutation_test,
    rankdata,
)

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ ranks
def test_rankdata_matches_scipy_average_ties():
    x = torch.randint(0, 5, (20, 30), generator=gen(0))  # many ties, integer input
    np.testing.assert_array_equal(rankdata(x).numpy(), ss.rankdata(x.numpy(), method="average", axis=-1))
    y = torch.randn(3, 4, 50, generator=gen(1), dtype=F64).round(decimals=1)
    np.testing.assert_allclose(rankdata(y).numpy(), ss.rankdata(y.numpy(), axis=-1), rtol=0, atol=0)
    # the one implementation: similarity ranks with it, circuits correlates with similarity's
    assert similarity.rankdata is rankdata
    ties = np.array([3.0, 1.0, 3.0, 0.0, 0.0, 2.0])
    other = np.array([1.0, 1.0, 2.0, 5.0, 0.0, 2.0])
    want = ss.spearmanr(ties, other)[0]
    assert circuits.edge_rank_correlation(ties, other) == pytest.approx(want, abs=1e-12)


# -------------------------------------------------------------------------------- bootstrap
def test_bootstrap_identical_resamples_give_scipys_percentile_interval():
    x = torch.randn(25, generator=gen(2), dtype=F64).exp()  # skewed data
    idx = bootstrap_indices(25, 3000, gen(3))
    assert idx.shape == (3000, 25) and idx.min() >= 0 and idx.max() <= 24
    ci = bootstrap_ci(x, n_boot=3000, alpha=0.1, generator=gen(3))
    # scipy's percentile method on the same resampled means: np.percentile, linear interpolation
    want = np.percentile(x.numpy()[idx.numpy()].mean(1), [5, 95])
    assert float(ci.low) == pytest.approx(want[0], abs=1e-12) and float(ci.high) == pytest.approx(want[1], abs=1e-12)
    # the multiplicity form is the histogram of the same indices
    counts = bootstrap_counts(25, 3000, gen(3))
    hist = torch.zeros(3000, 25, dtype=F64).scatter_add_(1, idx, torch.ones(3000, 25, dtype=F64))
    assert torch.equal(counts, hist) and (counts.sum(1) == 25).all()


def test_bootstrap_interval_agrees_with_scipy_bootstrap_statistically():
    x = torch.randn(30, generator=gen(4), dtype=F64) * 2 + 1
    for level in (0.9, 0.95):
        ours = bootstrap_ci(x, n_boot=20000, alpha=1 - level, generator=gen(5))
        ref = ss.bootstrap((x.numpy(),), np.mean, confidence_level=level, n_resamples=20000,
                           method="percentile", random_state=0).confidence_interval
        # both are Monte Carlo quantiles of the same bootstrap distribution: a few 1e-3 apart
        assert float(ours.low) == pytest.approx(ref.low, abs=0.03)
        assert float(ours.high) == pytest.approx(ref.high, abs=0.03)


def test_percentile_interval_level_nonfinite_and_batched():
    b = torch.arange(101, dtype=F64)  # quantiles of 0..100 are the percentages themselves
    lo, hi = percentile_interval(b, 0.9)
    assert float(lo) == pytest.approx(5.0) and float(hi) == pytest.approx(95.0)
    lo, hi = percentile_interval(torch.cat([b, torch.tensor([math.nan, math.inf])]), 0.5)
    assert float(lo) == pytest.approx(25.0) and float(hi) == pytest.approx(75.0)  # non-finite dropped
    lo, hi = percentile_interval(torch.tensor([[1.0, math.nan, math.nan], [1.0, 2.0, 3.0]]), 0.5)
    assert math.isnan(lo[0]) and math.isnan(hi[0]) and float(lo[1]) == 1.5 and float(hi[1]) == 2.5
    with pytest.raises(similarity.MetricError, match="confidence"):
        percentile_interval(b, 95)


# ------------------------------------------------------------------------------ permutation
@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_permutation_exact_equals_scipy(alternative):
    x = torch.tensor([0.3, 1.9, 2.2, 0.8, 3.1], dtype=F64)
    y = torch.tensor([0.1, 0.4, 1.0, -0.2, 0.9], dtype=F64)  # n == m: scipy's two-sided is the same test
    ours = permutation_test(x, y, n_perm=100, alternative=alternative)
    ref = ss.permutation_test((x.numpy(), y.numpy()), lambda u, v, axis: u.mean(axis) - v.mean(axis),
                              permutation_type="independent", alternative=alternative, n_resamples=np.inf,
                              vectorized=True)
    assert ours.exact and ours.n_perm == math.comb(10, 5)
    assert float(ours.pvalue) == pytest.approx(ref.pvalue, abs=1e-12)


def test_permutation_monte_carlo_within_sampling_error_of_scipy_exact():
    x = torch.randn(6, generator=gen(6), dtype=F64) + 0.7
    y = torch.randn(14, generator=gen(7), dtype=F64)
    ref = ss.permutation_test((x.numpy(), y.numpy()), lambda u, v, axis: u.mean(axis) - v.mean(axis),
                              permutation_type="independent", alternative="greater", n_resamples=np.inf,
                              vectorized=True).pvalue
    exact = permutation_test(x, y, alternative="greater")  # C(20, 6) = 38760 relabellings: enumerated
    assert exact.exact and float(exact.pvalue) == pytest.approx(ref, abs=1e-12)
    mc = permutation_test(x, y, n_perm=20000, generator=gen(8), alternative="greater", exact_limit=0)
    assert not mc.exact and mc.n_perm == 20000
    se = math.sqrt(ref * (1 - ref) / 20000)
    assert abs(float(mc.pvalue) - ref) < 4 * se + 1 / 20001


def test_permutation_pvalue_counting_rule():
    null = torch.tensor([0.1, 0.5, 0.9, 0.5], dtype=F64)
    # Monte Carlo: (1 + k) / (1 + n), ties count
    assert float(permutation_pvalue(0.5, null)) == pytest.approx(4 / 5)
    assert float(permutation_pvalue(2.0, null)) == pytest.approx(1 / 5)  # never 0
    assert float(permutation_pvalue(0.5, null, "less")) == pytest.approx(4 / 5)
    # exact: every relabelling, the observed among them: k / n
    assert float(permutation_pvalue(0.9, null, exact=True)) == pytest.approx(1 / 4)
    # non-finite null values are dropped; none left or a NaN observation: NaN
    assert float(permutation_pvalue(0.5, torch.tensor([0.1, math.nan, 0.7]))) == pytest.approx(2 / 3)
    assert math.isnan(float(permutation_pvalue(0.5, torch.tensor([math.nan]))))
    assert math.isnan(float(permutation_pvalue(math.nan, null)))
    batched = permutation_pvalue(torch.tensor([0.0, 1.0]), null.expand(2, 4))
    assert batched.tolist() == pytest.approx([1.0, 1 / 5])


# ------------------------------------------------------------------------------------- Holm
def test_holm_ignores_untested_nan():
    p = torch.tensor([0.01, math.nan, 0.04, 0.03], dtype=F64)
    adj = holm(p)
    # family of 3: 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 -> running max 0.06
    assert math.isnan(adj[1]) and adj[[0, 2, 3]].tolist() == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(holm([math.nan])[0])


# ------------------------------------------------------------------------- used by pipelines
def test_circuit_intervals_use_the_callers_confidence():
    from fvsanity.compare.attribution import EdgeAttribution, LayerEdges
    from fvsanity.units import Unit

    g = gen(9)

    def attr(base, n):
        scores = base + 0.8 * torch.randn(n, 10, 20, generator=g)
        lay = LayerEdges(name="conv", kind="conv", rows=tuple(range(10)), in_channels=20, scores=scores,
                         mask=torch.ones(10, 20, dtype=torch.bool), node_in=torch.zeros(n, 20),
                         node_out=torch.zeros(n, 10))
        return EdgeAttribution(Unit("x", 0), "eap", "mean", 1, (lay,), torch.zeros(n), torch.zeros(n))

    base = torch.randn(10, 20, generator=g)
    fv, nat, oth = attr(base, 4), attr(base, 16), attr(torch.randn(10, 20, generator=g), 16)
    wide = circuits.compare_circuits(fv, nat, oth, n_boot=200, n_perm=50, generator=1, confidence=0.95).layers[0]
    narrow = circuits.compare_circuits(fv, nat, oth, n_boot=200, n_perm=50, generator=1, confidence=0.5).layers[0]
    assert narrow.calibrated == wide.calibrated  # same splits; only the interval level differs
    assert wide.ci_low < narrow.ci_low < narrow.ci_high < wide.ci_high
    assert wide.fv_ci_low < narrow.fv_ci_low < narrow.fv_ci_high < wide.fv_ci_high


def test_paired_design_exact_when_few_pairings():
    import itertools

    a = torch.randn(5, 12, generator=gen(10), dtype=F64)
    b = a + 0.5 * torch.randn(5, 12, generator=gen(12), dtype=F64)
    r = path.paired_similarity({"l": a}, {"l": b}, None, metric="cka", n_perm=1000)[0]
    # 5 units, 120 <= n_perm pairings: all enumerated (naive re-count), no randomness
    value = float(similarity.cka(a, b))
    null = [float(similarity.cka(a, b[list(q)])) for q in itertools.permutations(range(5))]
    assert r.value == pytest.approx(value)
    assert r.p_value == pytest.approx(sum(v >= value - 1e-12 for v in null) / 120)
    assert r.p_value == path.paired_similarity({"l": a}, {"l": b}, None, metric="cka", n_perm=1000, seed=9)[0].p_value
    big = {"l": a.repeat(2, 1) + 0.01 * torch.randn(10, 12, generator=gen(11), dtype=F64)}
    r = path.paired_similarity(big, {"l": a.repeat(2, 1)}, None, metric="cka", n_perm=200)[0]
    assert 1 / 201 <= r.p_value < 0.05  # 10! > 200: Monte Carlo, (1 + k) / (1 + 200)
