"""Known answers, properties and safe gradients of fvsanity.compare similarity metrics and stats."""

import itertools
import math

import numpy as np
import pytest
import scipy.spatial.distance as ssd
import scipy.stats as ss
import torch

from fvsanity.compare import (
    BootstrapCI,
    MetricError,
    UnknownMetricError,
    bootstrap_ci,
    cka,
    cka_biased,
    compute_rdm,
    cosine,
    get_metric,
    holm,
    list_metrics,
    metric_info,
    mmd2_unbiased,
    pearson,
    permutation_test,
    rankdata,
    register_metric,
    rsa,
    soft_spearman,
    spearman,
)
from fvsanity.errors import FVSanityError

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


def grad_of(fn, *inputs):
    """Gradients of fn(*inputs).sum() w.r.t. every input (float tensors, fresh leaves)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    gs = torch.autograd.grad(out.sum(), leaves)
    return out.detach(), gs


def assert_safe_grads(fn, *inputs, bound=1e6):
    out, gs = grad_of(fn, *inputs)
    assert torch.isfinite(out).all(), out
    for g in gs:
        assert torch.isfinite(g).all(), g
        assert g.abs().max() < bound, g.abs().max()
    return out, gs


# ----------------------------------------------------------------------------------------------
# vector metrics: known answers


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_pearson_cosine_match_numpy(dtype):
    x, y = randn(5, 17, seed=1, dtype=dtype), randn(5, 17, seed=2, dtype=dtype)
    x[0] += 10.0  # an offset: pearson must not care, cosine must
    p, c = pearson(x, y), cosine(x, y)
    assert p.dtype == dtype and p.shape == (5,)
    xn, yn = x.double().numpy(), y.double().numpy()
    ref_p = [np.corrcoef(a, b)[0, 1] for a, b in zip(xn, yn, strict=True)]
    ref_c = [a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(xn, yn, strict=True)]
    tol = 1e-12 if dtype == F64 else 1e-5
    np.testing.assert_allclose(p.double().numpy(), ref_p, atol=tol)
    np.testing.assert_allclose(c.double().numpy(), ref_c, atol=tol)
    assert pearson(x, 3 * x - 1).sub(1).abs().max() < 10 * tol
    assert cosine(x, -2 * x).add(1).abs().max() < 10 * tol


def test_vector_metrics_broadcast_leading_dims():
    x, y = randn(3, 1, 8, seed=3), randn(4, 8, seed=4)
    for fn in (pearson, cosine, spearman):
        out = fn(x, y)
        assert out.shape == (3, 4)
        assert torch.allclose(out[2, 1], fn(x[2, 0], y[1]))


def test_spearman_monotone_reversed_and_ties_match_scipy():
    x = randn(4, 30, seed=5)
    assert torch.allclose(spearman(x, torch.exp(3 * x) + 1), torch.ones(4, dtype=F64))
    assert torch.allclose(spearman(x, x.flip(-1).flip(-1) ** 3), torch.ones(4, dtype=F64))
    assert torch.allclose(spearman(x, -x), -torch.ones(4, dtype=F64))
    rev = torch.arange(10.0)
    assert spearman(rev, rev.flip(0)).item() == pytest.approx(-1.0)
    # heavy ties, as from ReLU: many zeros and small integers
    g = gen(6)
    xi = torch.relu(torch.randint(-3, 4, (20, 25), generator=g)).double()
    yi = torch.relu(torch.randint(-3, 4, (20, 25), generator=g)).double()
    ours = spearman(xi, yi)
    ref = [ss.spearmanr(a, b).statistic for a, b in zip(xi.numpy(), yi.numpy(), strict=True)]
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-12)
    np.testing.assert_array_equal(rankdata(xi).numpy(), ss.rankdata(xi.numpy(), axis=-1))
    # float32 too
    np.testing.assert_allclose(spearman(xi.float(), yi.float()).numpy(), ref, atol=1e-5)


def test_spearman_carries_no_gradient_and_soft_spearman_approximates_it():
    x, y = randn(3, 12, seed=7).requires_grad_(), randn(3, 12, seed=8)
    assert not spearman(x, y).requires_grad
    soft = soft_spearman(x, y, temperature=1e-6)
    assert soft.requires_grad
    assert torch.allclose(soft.detach(), spearman(x, y), atol=1e-6)
    xt = torch.tensor([0.0, 0.0, 1.0, 2.0, 2.0, 2.0], dtype=F64)  # ties get the average rank
    yt = torch.tensor([3.0, 1.0, 2.0, 5.0, 4.0, 0.0], dtype=F64)
    assert soft_spearman(xt, yt, temperature=1e-4).item() == pytest.approx(
        ss.spearmanr(xt, yt).statistic, abs=1e-9
    )


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_singular_vectors_are_zero_and_nan_propagates(dtype):
    d = 9
    const = torch.full((d,), 0.1, dtype=dtype)  # 0.1 is inexact: mean-rounding must not matter
    zero = torch.zeros(d, dtype=dtype)
    y = randn(d, seed=9, dtype=dtype)
    for fn in (pearson, spearman, soft_spearman):
        assert fn(const, y).item() == 0.0 and fn(y, const).item() == 0.0
        assert fn(const, const).item() == 0.0 and fn(zero, y).item() == 0.0
    assert cosine(zero, y).item() == 0.0 and cosine(zero, zero).item() == 0.0
    assert cosine(const, const).item() == pytest.approx(1.0, abs=1e-6)
    # constant up to rounding noise (1 ulp) counts as constant
    noisy = const.clone()
    noisy[3] = torch.nextafter(noisy[3], torch.tensor(1.0, dtype=dtype))
    assert pearson(noisy, y).item() == 0.0
    nan = y.clone()
    nan[2] = float("nan")
    for fn in (pearson, spearman, cosine):
        assert torch.isnan(fn(nan, y)).item()


def test_vector_metric_bad_input_errors_are_one_line():
    with pytest.raises(FVSanityError, match="last dims differ") as e:
        pearson(torch.zeros(3, 4), torch.zeros(3, 5))
    assert "\n" not in str(e.value)
    with pytest.raises(MetricError, match="broadcast"):
        cosine(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(MetricError, match="temperature"):
        soft_spearman(torch.zeros(4), torch.zeros(4), temperature=0.0)


# ----------------------------------------------------------------------------------------------
# CKA


def _song_unbiased_hsic(K, L):
    """Naive unbiased HSIC (Song et al. 2012, eq. 5) on numpy Gram matrices."""
    n = K.shape[0]
    Kt, Lt = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
    one = np.ones(n)
    return (
        np.trace(Kt @ Lt)
        + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * one @ Kt @ Lt @ one
    ) / (n * (n - 3))


def _naive_cka(X, Y, debiased):
    X = X - X.mean(0)  # CKA on centred features, as Kornblith et al.'s reference code
    Y = Y - Y.mean(0)
    K, L = X @ X.T, Y @ Y.T
    if debiased:
        h = _song_unbiased_hsic
    else:
        n = K.shape[0]
        H = np.eye(n) - 1 / n

        def h(A, B):
            return np.trace(A @ H @ B @ H) / (n - 1) ** 2

    return h(K, L) / np.sqrt(h(K, K) * h(L, L))


@pytest.mark.parametrize("debiased", [True, False])
def test_cka_matches_naive_numpy_and_known_answers(debiased):
    X, Y = randn(12, 7, seed=10), randn(12, 5, seed=11)
    Y = Y + 0.8 * X[:, :5]  # some shared structure
    ref = _naive_cka(X.numpy(), Y.numpy(), debiased)
    assert cka(X, Y, debiased=debiased).item() == pytest.approx(ref, abs=1e-12)
    assert cka(Y, X, debiased=debiased).item() == pytest.approx(ref, abs=1e-12)
    assert cka(X, X, debiased=debiased).item() == pytest.approx(1.0, abs=1e-12)
    if not debiased:
        assert cka_biased(X, Y).item() == pytest.approx(ref, abs=1e-12)
    # float32 agrees
    assert cka(X.float(), Y.float(), debiased=debiased).item() == pytest.approx(ref, abs=1e-5)


@pytest.mark.parametrize("debiased", [True, False])
def test_cka_invariances(debiased):
    X, Y = randn(15, 6, seed=12), randn(15, 4, seed=13)
    Y = Y + X[:, :4] ** 2
    base = cka(X, Y, debiased=debiased)
    Q = torch.linalg.qr(randn(6, 6, seed=14))[0]
    shift = randn(6, seed=15) * 100
    for Xt in (X @ Q, 7.5 * X, X + shift, 0.01 * (X @ Q) - shift):
        assert torch.allclose(cka(Xt, Y, debiased=debiased), base, atol=1e-10)
    # not invariant to a general (anisotropic) linear map
    A = torch.diag(torch.tensor([10.0, 1, 1, 1, 1, 0.1], dtype=F64))
    assert (cka(X @ A, Y, debiased=debiased) - base).abs() > 1e-3


def test_cka_independent_features_debiased_centres_on_zero_biased_reads_high():
    # 10 seeds at once through the leading batch dim: X [10, 20, 512]
    X, Y = randn(10, 20, 512, seed=16, dtype=torch.float32), randn(10, 20, 512, seed=17,
                                                                   dtype=torch.float32)
    deb, bia = cka(X, Y), cka(X, Y, debiased=False)
    assert deb.shape == (10,)
    assert abs(deb.mean().item()) < 0.05
    assert deb.abs().max() < 0.35  # spread ~0.075 per DESIGN.md
    assert 0.93 < bia.mean().item() < 0.99  # ~0.96 per DESIGN.md
    assert torch.allclose(deb[3], cka(X[3], Y[3]))


def test_cka_zero_variance_and_small_n():
    Y = randn(6, 3, seed=18)
    Xc = torch.ones(6, 4, dtype=F64) * torch.tensor([0.1, 2.0, -3.0, 0.0], dtype=F64)
    for debiased in (True, False):
        assert cka(Xc, Y, debiased=debiased).item() == 0.0
        assert cka(torch.zeros(6, 2, dtype=F64), Y, debiased=debiased).item() == 0.0
    with pytest.raises(MetricError, match="at least 4 rows"):
        cka(randn(3, 5), randn(3, 5))
    assert torch.isfinite(cka(randn(3, 5), randn(3, 2, seed=1), debiased=False))
    with pytest.raises(MetricError, match="same number of rows"):
        cka(randn(6, 5), randn(7, 5))


# ----------------------------------------------------------------------------------------------
# RSA and MMD


@pytest.mark.parametrize("method", ["correlation", "euclidean", "sqeuclidean"])
@pytest.mark.parametrize("compare", ["spearman", "pearson"])
def test_rsa_matches_naive_scipy(method, compare):
    X, Y = randn(9, 6, seed=19), randn(9, 11, seed=20)
    Y[:, :6] += X
    dx, dy = ssd.pdist(X.numpy(), method), ssd.pdist(Y.numpy(), method)
    np.testing.assert_allclose(
        ssd.squareform(dx), compute_rdm(X, method).numpy(), atol=1e-10
    )
    cmp = ss.spearmanr if compare == "spearman" else ss.pearsonr
    ref = cmp(dx, dy).statistic
    assert rsa(X, Y, rdm=method, compare=compare).item() == pytest.approx(ref, abs=1e-10)
    assert rsa(X, X, rdm=method, compare=compare).item() == pytest.approx(1.0, abs=1e-10)
    assert rsa(X.float(), Y.float(), rdm=method, compare=compare).item() == pytest.approx(
        ref, abs=1e-4
    )


def test_rsa_errors():
    X = randn(5, 3)
    with pytest.raises(MetricError, match="unknown rdm method 'cityblock'"):
        rsa(X, X, rdm="cityblock")
    with pytest.raises(MetricError, match="compare 'kendall'; valid: spearman, pearson"):
        rsa(X, X, compare="kendall")
    with pytest.raises(MetricError, match="at least 3 rows"):
        rsa(X[:2], X[:2])


def _naive_mmd2(X, Y, k):
    n, m = len(X), len(Y)
    sxx = sum(k(X[i], X[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    syy = sum(k(Y[i], Y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    sxy = sum(k(X[i], Y[j]) for i in range(n) for j in range(m)) / (n * m)
    return sxx + syy - 2 * sxy


def test_mmd_matches_naive_and_detects_shift():
    X, Y = randn(7, 3, seed=21), randn(5, 3, seed=22) + 0.5
    Xn, Yn = X.numpy(), Y.numpy()
    sigma = 1.3
    rbf = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * sigma**2))  # noqa: E731
    assert mmd2_unbiased(X, Y, bandwidth=sigma).item() == pytest.approx(
        _naive_mmd2(Xn, Yn, rbf), abs=1e-12
    )
    assert mmd2_unbiased(X, Y, kernel="linear").item() == pytest.approx(
        _naive_mmd2(Xn, Yn, np.dot), abs=1e-12
    )
    med = np.median(ssd.pdist(np.concatenate([Xn, Yn])))
    rbf_med = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * med**2))  # noqa: E731
    # torch.median takes the lower middle value; 66 pairs is even, so compare within that
    lo_hi = np.sort(ssd.pdist(np.concatenate([Xn, Yn])))[32:34]
    vals = [_naive_mmd2(Xn, Yn, lambda a, b, s=s: np.exp(-np.sum((a - b) ** 2) / (2 * s**2)))
            for s in lo_hi]
    ours = mmd2_unbiased(X, Y).item()
    assert min(vals) - 1e-12 <= ours <= max(vals) + 1e-12
    assert ours == pytest.approx(_naive_mmd2(Xn, Yn, rbf_med), abs=0.02)
    # same distribution ~ 0, shifted clearly positive
    A, B = randn(200, 8, seed=23), randn(200, 8, seed=24)
    same = mmd2_unbiased(A, B).item()
    shifted = mmd2_unbiased(A, B + 1.0).item()
    assert abs(same) < 0.01
    assert shifted > 0.1 > 10 * abs(same)


def test_mmd_errors():
    with pytest.raises(MetricError, match="same feature width"):
        mmd2_unbiased(randn(4, 3), randn(4, 2))
    with pytest.raises(MetricError, match="unknown mmd kernel 'poly'"):
        mmd2_unbiased(randn(4, 3), randn(4, 3), kernel="poly")
    with pytest.raises(MetricError, match="bandwidth"):
        mmd2_unbiased(randn(4, 3), randn(4, 3), bandwidth=-1.0)


# ----------------------------------------------------------------------------------------------
# gradients: float64 gradcheck at generic inputs, finite and small at singular points


def test_gradcheck_generic_inputs():
    x, y = randn(2, 6, seed=25), randn(2, 6, seed=26)
    X, Y = randn(6, 3, seed=27), randn(6, 4, seed=28)
    checks = [
        (pearson, (x, y)),
        (cosine, (x, y)),
        (lambda a, b: soft_spearman(a, b, temperature=0.5), (x, y)),
        (lambda A, B: cka(A, B, debiased=True), (X, Y)),
        (lambda A, B: cka(A, B, debiased=False), (X, Y)),
        (lambda A, B: rsa(A, B, rdm="correlation", compare="pearson"), (X, Y)),
        (lambda A, B: rsa(A, B, rdm="euclidean", compare="pearson"), (X, Y)),
        (lambda A, B: mmd2_unbiased(A, B[:, :3], bandwidth=1.5), (X, Y)),
        (lambda A, B: mmd2_unbiased(A, B[:, :3], kernel="linear"), (X, Y)),
    ]
    for fn, inputs in checks:
        leaves = tuple(t.clone().requires_grad_(True) for t in inputs)
        assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_finite_gradients_at_singular_points(dtype):
    d = 8
    y = randn(d, seed=29, dtype=dtype)
    const = torch.full((d,), 0.7, dtype=dtype)
    zero = torch.zeros(d, dtype=dtype)
    relu_ties = torch.relu(randn(d, seed=30, dtype=dtype))
    relu_ties[:3] = 0
    for fn in (pearson, cosine, soft_spearman):
        for a in (const, zero, relu_ties):
            for args in ((a, y), (y, a), (a, a)):
                out, gs = assert_safe_grads(fn, *args)
                if fn is not cosine and a is not relu_ties:
                    assert out.item() == 0.0
    # cosine/pearson gradients at the singular vector are exactly 0 (not 1e8 as with a clamp)
    _, (gz, _) = grad_of(cosine, zero, y)
    _, (gc, _) = grad_of(pearson, const, y)
    assert gz.abs().max() == 0 and gc.abs().max() == 0

    n = 7
    Y = randn(n, 5, seed=31, dtype=dtype)
    X_const = torch.ones(n, 4, dtype=dtype) * torch.tensor([0.3, -1.0, 2.0, 0.0], dtype=dtype)
    X_zero = torch.zeros(n, 4, dtype=dtype)
    X_dup = randn(n, 4, seed=32, dtype=dtype)
    X_dup[1] = X_dup[0]  # duplicated rows: zero Euclidean distance
    X_dup[:, 2] = 1.5  # a zero-variance feature
    X_dup[3] = X_dup[2]
    X_dup[3, 0] = torch.nextafter(X_dup[2, 0], torch.tensor(9.0, dtype=dtype))  # 1 ulp apart
    rep_fns = [
        lambda A, B: cka(A, B, debiased=True),
        lambda A, B: cka(A, B, debiased=False),
        lambda A, B: rsa(A, B, rdm="correlation", compare="pearson"),
        lambda A, B: rsa(A, B, rdm="euclidean", compare="pearson"),
        lambda A, B: rsa(A, B, rdm="sqeuclidean", compare="pearson"),
        lambda A, B: mmd2_unbiased(A[:, :4], B[:, :4]),
        lambda A, B: mmd2_unbiased(A[:, :4], B[:, :4], kernel="linear"),
    ]
    for fn in rep_fns:
        for A in (X_const, X_zero, X_dup):
            for args in ((A, Y), (Y, A), (A, A.clone())):
                assert_safe_grads(fn, *args)
    assert cka(X_const, Y).item() == 0.0 and cka(X_zero, X_zero).item() == 0.0


# ----------------------------------------------------------------------------------------------
# registry


def test_registry_names_kinds_and_errors():
    assert list_metrics() == ["cka", "cka_biased", "cosine", "mmd", "pearson", "rsa", "spearman"]
    assert list_metrics("vector") == ["cosine", "pearson", "spearman"]
    assert list_metrics("representation") == ["cka", "cka_biased", "mmd", "rsa"]
    assert get_metric("cka") is cka and get_metric("mmd") is mmd2_unbiased
    assert not metric_info("spearman").differentiable and not metric_info("mmd").paired
    assert metric_info("cka").to_json()["kind"] == "representation"
    with pytest.raises(UnknownMetricError) as e:
        get_metric("ckaa")
    msg = str(e.value)
    assert "\n" not in msg and "'ckaa'" in msg and "valid: cka, cka_biased, cosine" in msg
    assert isinstance(e.value, FVSanityError)
    with pytest.raises(MetricError, match="kind 'matrix'; valid: vector, representation"):
        register_metric("x", "matrix")
    with pytest.raises(MetricError, match="already registered"):

        @register_metric("cka", "representation")
        def other(X, Y):
            return X.sum()

    assert get_metric("cka") is cka
    for name in list_metrics("vector"):
        assert get_metric(name)(randn(3, 5), randn(3, 5, seed=1)).shape == (3,)
    for name in list_metrics("representation"):
        assert get_metric(name)(randn(6, 5), randn(6, 5, seed=1)).shape == ()


# ----------------------------------------------------------------------------------------------
# statistics


def test_bootstrap_ci_coverage_and_determinism():
    # 200 independent datasets of 40 N(1, 2^2) items, one batched call: known true mean 1
    data = 1.0 + 2.0 * randn(200, 40, seed=33)
    ci = bootstrap_ci(data, n_boot=1000, alpha=0.1, generator=gen(1))
    assert isinstance(ci, BootstrapCI) and ci.low.shape == (200,)
    assert torch.allclose(ci.estimate, data.mean(-1))
    assert (ci.low <= ci.estimate).all() and (ci.estimate <= ci.high).all()
    coverage = ((ci.low <= 1.0) & (1.0 <= ci.high)).double().mean().item()
    assert 0.8 <= coverage <= 0.97  # nominal 0.90 (percentile CI undercovers slightly)
    # width ~ 2 * 1.645 * sigma / sqrt(n)
    assert (ci.high - ci.low).mean().item() == pytest.approx(2 * 1.645 * 2 / math.sqrt(40), rel=0.15)
    again = bootstrap_ci(data, n_boot=1000, alpha=0.1, generator=gen(1))
    assert torch.equal(again.low, ci.low) and torch.equal(again.high, ci.high)
    other = bootstrap_ci(data, n_boot=1000, alpha=0.1, generator=gen(2))
    assert not torch.equal(other.low, ci.low)
    # the statistic-function form gives the same resamples for the same seed
    v = data[0]
    fn_ci = bootstrap_ci(lambda idx: v[idx].mean(-1), n_boot=500, generator=gen(3), n_items=40)
    t_ci = bootstrap_ci(v, n_boot=500, generator=gen(3))
    assert torch.allclose(fn_ci.low, t_ci.low) and torch.allclose(fn_ci.high, t_ci.high)
    assert set(ci.to_json()) >= {"estimate", "low", "high", "alpha", "n_boot"}
    with pytest.raises(MetricError, match="n_items"):
        bootstrap_ci(lambda idx: idx.float().mean(-1), n_boot=10)


def test_permutation_test_shifted_identical_and_exact():
    a, b = randn(30, seed=34) + 2.0, randn(30, seed=35)
    res = permutation_test(a, b, n_perm=2000, generator=gen(4))
    assert not res.exact and res.n_perm == 2000
    assert res.pvalue.item() == pytest.approx(1 / 2001)  # nothing as extreme: the minimum
    assert res.statistic.item() == pytest.approx((a.mean() - b.mean()).item())
    assert permutation_test(a, b, 2000, gen(4), alternative="less").pvalue.item() > 0.99
    # identical distributions, 300 tests batched over a leading dim: p roughly uniform
    A, B = randn(300, 12, seed=36), randn(300, 12, seed=37)
    p = permutation_test(A, B, n_perm=999, generator=gen(5)).pvalue
    assert p.shape == (300,)
    assert 0.4 < p.mean().item() < 0.6
    assert 0.01 < (p <= 0.05).double().mean().item() < 0.10
    assert 0.15 < (p <= 0.25).double().mean().item() < 0.35
    # exact enumeration for small sets: compare with scipy's exact test
    x = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    y = torch.tensor([4.0, 5.0, 6.0, 7.5], dtype=F64)
    for alt in ("greater", "less"):
        ours = permutation_test(x, y, n_perm=10000, alternative=alt)
        assert ours.exact and ours.n_perm == math.comb(7, 3)
        ref = ss.permutation_test(
            (x.numpy(), y.numpy()), lambda u, v: u.mean() - v.mean(),
            permutation_type="independent", alternative=alt, n_resamples=np.inf,
        ).pvalue
        assert ours.pvalue.item() == pytest.approx(ref, abs=1e-12)
    # two-sided counts |T*| >= |T|; naive enumeration
    z = torch.cat([x, y])
    t_obs = (x.mean() - y.mean()).abs()
    hits = [
        ((z[list(c)].mean() - z[[i for i in range(7) if i not in c]].mean()).abs() >= t_obs - 1e-12)
        for c in itertools.combinations(range(7), 3)
    ]
    two = permutation_test(x, y, n_perm=10000)
    assert two.pvalue.item() == pytest.approx(sum(bool(h) for h in hits) / 35, abs=1e-12)
    assert permutation_test(x, y, alternative="less").pvalue.item() == pytest.approx(1 / 35)
    with pytest.raises(MetricError, match="alternative 'bigger'"):
        permutation_test(x, y, alternative="bigger")


def test_stats_deterministic_for_a_seed_and_independent_of_batching():
    a, b = randn(20, seed=38) + 0.5, randn(25, seed=39)
    r1 = permutation_test(a, b, 3000, gen(7))
    r2 = permutation_test(a, b, 3000, gen(7))
    assert torch.equal(r1.pvalue, r2.pvalue)
    # a row of a batched call sees the same permutations / resamples as the row alone
    A = torch.stack([a, a + 1.0, a - 0.3])
    rb = permutation_test(A, b, 3000, gen(7))
    assert torch.equal(rb.pvalue[0], r1.pvalue)
    cb = bootstrap_ci(A, n_boot=700, generator=gen(8))
    c1 = bootstrap_ci(A[1], n_boot=700, generator=gen(8))
    assert torch.allclose(cb.low[1], c1.low) and torch.allclose(cb.high[1], c1.high)
    assert 0.0 < r1.pvalue.item() < 1.0 and r1.to_json()["alternative"] == "two-sided"


def test_holm_hand_computed():
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.06
    p = torch.tensor([0.01, 0.04, 0.03, 0.005], dtype=F64)
    assert torch.allclose(holm(p), torch.tensor([0.03, 0.06, 0.06, 0.02], dtype=F64))
    assert torch.allclose(holm([0.5, 0.6]), torch.tensor([1.0, 1.0], dtype=F64))
    batched = holm(torch.stack([p, p.flip(0)]))
    assert torch.allclose(batched[1], holm(p).flip(0))
    with pytest.raises(MetricError, match=r"\[0, 1\]"):
        holm([0.1, 1.5])
