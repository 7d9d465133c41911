"""Statistics in one place: ranks, bootstrap intervals, permutation p-values, Holm correction.

Every pipeline (the path check :mod:`fvsanity.compare.path`, the circuit comparison
:mod:`fvsanity.compare.circuits`, the paired design across units and ``fvsanity audit``) takes
its statistics from here; there is one implementation of each:

* :func:`rankdata`: average ranks for ties (as ``scipy.stats.rankdata(method="average")``).
* :func:`auroc`: ROC AUC as the Mann-Whitney U statistic over ``n * m`` (ties count 1/2).
* bootstrap: :func:`bootstrap_indices` / :func:`bootstrap_counts` draw resamples (indices, or
  their multiplicities for statistics that are linear in per-item weights), and
  :func:`percentile_interval` turns resampled statistics into a percentile interval at the
  caller's ``confidence`` (numpy's "linear" quantile, non-finite resamples dropped);
  :func:`bootstrap_ci` combines them for means or any statistic of resampled indices.
* permutation p: :func:`permutation_pvalue` is the one counting rule: Monte Carlo
  ``p = (1 + k) / (1 + n)`` over ``n`` random relabellings of which ``k`` are at least as extreme
  as the observed statistic (never 0, valid), exact ``p = k / n`` when all ``n`` relabellings
  (the observed one included) are enumerated. :func:`permutation_test` is the two-sample test of
  a difference of means; it enumerates every relabelling when there are few (at most
  ``max(n_perm, exact_limit)``), else draws ``n_perm``.
* :func:`holm`: Holm-Bonferroni adjusted p-values.

All randomness comes from an explicit ``torch.Generator`` (CPU by default; draws happen on the
generator's device and move to the data), so a seed gives the same result on any device.
Resamples are vectorized in chunks; there is no Python loop per resample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import FVSanityError

__all__ = [
    "ALTERNATIVES",
    "EXACT_LIMIT",
    "BootstrapCI",
    "MetricError",
    "PermutationResult",
    "auroc",
    "bootstrap_ci",
    "bootstrap_counts",
    "bootstrap_indices",
    "holm",
    "n_relabellings",
    "percentile_interval",
    "permutation_pvalue",
    "permutation_test",
    "rankdata",
]

ALTERNATIVES = ("two-sided", "greater", "less")
#: two-sample permutation tests enumerate every relabelling when there are at most this many
EXACT_LIMIT = 200_000
_CHUNK_ELEMS = 1 << 22  # elements per resample chunk (bounded memory)


class MetricError(FVSanityError, ValueError):
    """Bad input to a metric or a statistic (shape, size, option); the message is one line."""


def _tolist(t: Tensor):
    t = t.detach().cpu()
    return t.item() if t.dim() == 0 else t.tolist()


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _fresh(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    return generator


def _as_float(x) -> Tensor:
    x = torch.as_tensor(x)
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


# ------------------------------------------------------------------------------------ ranks
def rankdata(x: Tensor | Sequence[float]) -> Tensor:
    """Average ranks (1-based, ties get the mean of their ranks) over the last dim.

    Same as ``scipy.stats.rankdata(x, method="average", axis=-1)`` for finite input.
    x [..., d] -> [..., d] in x's float dtype, no gradient (ranks are piecewise constant).
    """
    x = _as_float(x).detach()
    if x.dim() == 0:
        raise MetricError("rankdata: input must have at least one dim")
    d = x.shape[-1]
    if d == 0:
        return x.clone()
    sorted_x, order = torch.sort(x, dim=-1, stable=True)
    new_group = torch.ones_like(sorted_x, dtype=torch.bool)
    new_group[..., 1:] = sorted_x[..., 1:] != sorted_x[..., :-1]
    gid = torch.cumsum(new_group.long(), dim=-1) - 1  # group index of each sorted position
    counts = torch.zeros_like(gid).scatter_add_(-1, gid, torch.ones_like(gid))
    start = torch.cumsum(counts, dim=-1) - counts  # 0-based first position of each group
    avg = start.to(x.dtype) + (counts.to(x.dtype) + 1) / 2  # 1-based mean rank of each group
    rank_sorted = torch.gather(avg, -1, gid)
    return torch.empty_like(rank_sorted).scatter_(-1, order, rank_sorted)


def auroc(negatives: Tensor | Sequence[float], positives: Tensor | Sequence[float]) -> float:
    """ROC AUC: P(positive score > negative score), ties counted 1/2 (Mann-Whitney U / (n m)).

    The one AUROC in fvsanity. Computed in float64 from the average ranks (:func:`rankdata`) of
    the pooled scores: ``U = sum(ranks of positives) - m (m + 1) / 2``.

    Args:
        negatives: [n] scores of the negative class (any shape, flattened).
        positives: [m] scores of the positive class (larger = more positive).

    Returns:
        AUC in [0, 1]: 1 when every positive scores above every negative, 0 when below, 0.5 for
        all ties; NaN when either class is empty or a score is NaN (NaN in, NaN out, as the
        similarity metrics; :func:`fvsanity.compare.detect.roc_auc` refuses such input instead).
    """
    neg = _as_float(negatives).detach().flatten().double().cpu()
    pos = _as_float(positives).detach().flatten().double().cpu()
    n, m = neg.numel(), pos.numel()
    if n == 0 or m == 0 or bool(torch.isnan(neg).any()) or bool(torch.isnan(pos).any()):
        return float("nan")
    ranks = rankdata(torch.cat([neg, pos]))
    u = ranks[n:].sum() - m * (m + 1) / 2.0
    return float(u / (n * m))


# -------------------------------------------------------------------------------- bootstrap
def _check_boot(n: int, n_boot: int, who: str) -> None:
    if not (isinstance(n, int) and n >= 1):
        raise MetricError(f"{who}: need >= 1 item to resample, got {n!r}")
    if not (isinstance(n_boot, int) and n_boot >= 1):
        raise MetricError(f"{who}: n_boot must be a positive int, got {n_boot!r}")


def _resample_chunks(n: int, n_boot: int, generator: torch.Generator, per_resample: int = 1):
    """Yield CPU LongTensors [b, n] of bootstrap indices, n_boot rows in all.

    Indices are DRAWN in chunks that depend only on (n, n_boot), so the resamples for a seed do
    not depend on the data's leading dims; they are YIELDED in sub-chunks of about
    _CHUNK_ELEMS / per_resample rows to bound the memory of evaluating them.
    """
    gdev = _gen_device(generator)
    draw = max(1, min(n_boot, _CHUNK_ELEMS // n))
    sub = max(1, _CHUNK_ELEMS // max(1, per_resample))
    for s in range(0, n_boot, draw):
        idx = torch.randint(0, n, (min(draw, n_boot - s), n), generator=generator, device=gdev)
        yield from idx.cpu().split(sub, 0)


def bootstrap_indices(n: int, n_boot: int, generator: torch.Generator | None = None) -> Tensor:
    """Resample indices: LongTensor [n_boot, n], each row n draws with replacement from 0..n-1.

    The same (n, n_boot, generator state) gives the same rows as :func:`bootstrap_ci` and
    :func:`bootstrap_counts` use, so a statistic can be recomputed elsewhere (e.g. scipy) on
    identical resamples.
    """
    _check_boot(n, n_boot, "bootstrap_indices")
    return torch.cat(list(_resample_chunks(n, n_boot, _fresh(generator))), 0)


def bootstrap_counts(n: int, n_boot: int, generator: torch.Generator | None = None) -> Tensor:
    """Multiplicities of bootstrap resamples: float64 [n_boot, n], row b counts how often each
    item is drawn in resample b (rows sum to n). Row b is the histogram of row b of
    :func:`bootstrap_indices` for the same generator state.

    For a statistic that is a weighted mean over items (or over pairs of items from independently
    resampled groups: ``c_f @ S @ c_r / (sum c_f * sum c_r)``), the counts evaluate every
    resample at once without materialising resampled data.
    """
    _check_boot(n, n_boot, "bootstrap_counts")
    rows = []
    for idx in _resample_chunks(n, n_boot, _fresh(generator)):
        c = torch.zeros(idx.shape[0], n, dtype=torch.float64)
        rows.append(c.scatter_add_(1, idx, torch.ones_like(c)))
    return torch.cat(rows, 0)


def percentile_interval(boot: Tensor, confidence: float = 0.95) -> tuple[Tensor, Tensor]:
    """Percentile bootstrap interval from resampled statistics.

    Args:
        boot: [..., B] the statistic on B resamples (leading dims: independent intervals).
        confidence: coverage in (0, 1); the bounds are the ``(1 - confidence) / 2`` and
            ``(1 + confidence) / 2`` quantiles (numpy's default "linear" interpolation, as
            ``scipy.stats.bootstrap(method="percentile")``).

    Returns:
        (low, high) [...], float64. Non-finite resamples (e.g. a ratio with a vanishing
        denominator) are dropped; fewer than 2 finite resamples give NaN bounds.
    """
    if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
        raise MetricError(f"confidence must be in (0, 1), got {confidence!r}")
    b = torch.as_tensor(boot).detach().to(torch.float64)
    if b.dim() == 0:
        b = b[None]
    b = torch.where(torch.isfinite(b), b, torch.full_like(b, float("nan")))
    q = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64, device=b.device)
    if b.shape[-1] == 0:
        nan = torch.full(b.shape[:-1], float("nan"), dtype=torch.float64, device=b.device)
        return nan, nan.clone()
    lo, hi = torch.nanquantile(b, q, dim=-1)  # [2, ...]
    few = torch.isfinite(b).sum(-1) < 2
    lo = torch.where(few, torch.full_like(lo, float("nan")), lo)
    hi = torch.where(few, torch.full_like(hi, float("nan")), hi)
    return lo, hi


@dataclass(frozen=True)
class BootstrapCI:
    """Percentile bootstrap confidence interval.

    Attributes:
        estimate: statistic on the original items [...].
        low, high: CI bounds [...] (quantiles alpha/2 and 1 - alpha/2 of the resamples).
        alpha: 1 - coverage.
        n_boot: number of resamples.
        n_items: items resampled (with replacement) in each resample.
    """

    estimate: Tensor
    low: Tensor
    high: Tensor
    alpha: float
    n_boot: int
    n_items: int
    method: str = "percentile"

    def to_json(self) -> dict:
        return {
            "estimate": _tolist(self.estimate),
            "low": _tolist(self.low),
            "high": _tolist(self.high),
            "alpha": self.alpha,
            "n_boot": self.n_boot,
            "n_items": self.n_items,
            "method": self.method,
        }


def bootstrap_ci(
    values: Tensor | Sequence[float] | Callable[[Tensor], Tensor],
    n_boot: int = 2000,
    alpha: float = 0.05,
    generator: torch.Generator | None = None,
    *,
    n_items: int | None = None,
) -> BootstrapCI:
    """Percentile bootstrap CI over items.

    Args:
        values: either per-item scores [..., n] (statistic = mean over the last dim; leading
            dims, e.g. layers, are resampled with the SAME item indices), or a callable
            ``fn(idx: LongTensor[B, n_items]) -> Tensor[B, ...]`` computing the statistic of
            each resample of item indices (then ``n_items`` is required).
        n_boot: number of resamples.
        alpha: 1 - coverage (0.05 gives a 95% interval).
        generator: torch.Generator for the resample indices (None: a fresh unseeded one);
            the indices are those of :func:`bootstrap_indices` for the same generator state.
    Returns:
        :class:`BootstrapCI` with estimate/low/high of shape [...] (bounds from
        :func:`percentile_interval`).
    """
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise MetricError(f"bootstrap_ci: alpha must be in (0, 1), got {alpha!r}")
    if not (isinstance(n_boot, int) and n_boot >= 1):
        raise MetricError(f"bootstrap_ci: n_boot must be a positive int, got {n_boot!r}")
    generator = _fresh(generator)

    if callable(values):
        if not (isinstance(n_items, int) and n_items >= 1):
            raise MetricError("bootstrap_ci: pass n_items (>= 1) with a statistic function")
        n = n_items
        estimate = values(torch.arange(n)[None])[0]
        per = max(1, int(estimate.numel()) * n)
        stats = [values(idx) for idx in _resample_chunks(n, n_boot, generator, per)]
        boot = torch.cat(stats, 0).movedim(0, -1)  # [..., B]
    else:
        v = _as_float(values)
        if v.dim() == 0 or v.shape[-1] == 0:
            raise MetricError(f"bootstrap_ci: need per-item values [..., n>0], got {tuple(v.shape)}")
        v = v.detach()
        n = v.shape[-1]
        estimate = v.mean(-1)
        stats = [
            v[..., idx.to(v.device)].mean(-1)  # [..., b]
            for idx in _resample_chunks(n, n_boot, generator, max(1, v.numel()))
        ]
        boot = torch.cat(stats, -1)
    low, high = percentile_interval(boot, 1 - alpha)
    dtype = estimate.dtype if estimate.is_floating_point() else torch.float64
    return BootstrapCI(
        estimate.detach(), low.to(dtype), high.to(dtype), float(alpha), int(n_boot), int(n)
    )


# ------------------------------------------------------------------------------ permutation
def _check_alternative(alternative: str) -> None:
    if alternative not in ALTERNATIVES:
        raise MetricError(f"unknown alternative {alternative!r}; valid: {', '.join(ALTERNATIVES)}")


def _extreme(null: Tensor, observed: Tensor, alternative: str, atol: Tensor | float = 0.0) -> Tensor:
    """Bool [..., P]: null statistics at least as extreme as ``observed`` [...].

    Ties within rounding (1e-9 of the largest magnitude involved, plus ``atol`` [...]) count as
    extreme.
    """
    o = observed[..., None]
    atol = torch.as_tensor(atol, dtype=null.dtype, device=null.device)
    tol = 1e-9 * torch.maximum(o.abs(), null.abs().amax(-1, keepdim=True)) + atol[..., None]
    if alternative == "greater":
        return null >= o - tol
    if alternative == "less":
        return null <= o + tol
    return null.abs() >= o.abs() - tol


def permutation_pvalue(
    observed: Tensor | float,
    null: Tensor | Sequence[float],
    alternative: str = "greater",
    *,
    exact: bool = False,
    atol: Tensor | float = 0.0,
) -> Tensor:
    """The permutation p-value of ``observed`` against its permutation distribution.

    Args:
        observed: the statistic on the real labelling [...].
        null: [..., P] the statistic on P relabellings. Monte Carlo (``exact=False``): P random
            relabellings, p = (1 + k) / (1 + P) (valid, never 0; Phipson & Smyth 2010). Exact
            (``exact=True``): ALL P relabellings, the observed one among them, p = k / P.
            Non-finite null values are dropped (they count neither way); none left: NaN.
        alternative: "greater" (large statistics are extreme), "less", or "two-sided"
            (|T*| >= |T|).
        atol: [...] extra absolute tolerance for ties (rounding of the statistic's inputs).

    Returns:
        float64 p-values [...], k = #{null at least as extreme as observed} (ties count).
    """
    _check_alternative(alternative)
    obs = torch.as_tensor(observed, dtype=torch.float64).detach()
    nul = torch.as_tensor(null, dtype=torch.float64).detach().to(obs.device)
    if nul.dim() == 0:
        raise MetricError("permutation_pvalue: null must be [..., P]")
    ok = torch.isfinite(nul)
    hits = (_extreme(torch.where(ok, nul, torch.zeros_like(nul)), obs, alternative, atol) & ok).sum(-1)
    n = ok.sum(-1).to(torch.float64)
    hits = hits.to(torch.float64)
    p = hits / n if exact else (1 + hits) / (1 + n)
    p = torch.where(n > 0, p, torch.full_like(p, float("nan")))
    return torch.where(torch.isfinite(obs), p, torch.full_like(p, float("nan")))


@dataclass(frozen=True)
class PermutationResult:
    """Permutation test of a difference of means.

    Attributes:
        statistic: mean(a) - mean(b) [...].
        pvalue: [...]; with random relabellings (1 + #{T* at least as extreme}) / (1 + n_perm)
            (valid, never 0); with ``exact`` the fraction of all splits at least as extreme.
        n_perm: relabellings drawn (or the number of distinct splits if exact).
        alternative: "two-sided" | "greater" (mean(a) > mean(b)) | "less".
        exact: all distinct splits were enumerated.
    """

    statistic: Tensor
    pvalue: Tensor
    n_perm: int
    alternative: str
    exact: bool

    def to_json(self) -> dict:
        return {
            "statistic": _tolist(self.statistic),
            "pvalue": _tolist(self.pvalue),
            "n_perm": self.n_perm,
            "alternative": self.alternative,
            "exact": self.exact,
        }


def n_relabellings(n: int, m: int) -> int:
    """Distinct splits of n + m items into groups of n and m: C(n + m, n)."""
    return math.comb(n + m, n)


def permutation_test(
    a: Tensor | Sequence[float],
    b: Tensor | Sequence[float],
    n_perm: int = 10000,
    generator: torch.Generator | None = None,
    alternative: str = "two-sided",
    *,
    exact_limit: int = EXACT_LIMIT,
) -> PermutationResult:
    """Two-sample permutation test for mean(a) - mean(b) over per-item scores.

    a [..., n], b [..., m] (leading dims broadcast, e.g. one test per layer; every leading
    index uses the same relabellings). If the number of distinct splits C(n + m, n) is at most
    ``max(n_perm, exact_limit)`` the test is exact (every split enumerated, no randomness, p =
    k / C); else ``n_perm`` random splits, p = (1 + k) / (1 + n_perm) (:func:`permutation_pvalue`).
    Computed in float64; ties with the observed statistic (within rounding) count as extreme.
    ``two-sided`` counts |T*| >= |T| (scipy instead doubles the smaller one-sided p-value;
    the two agree when the permutation distribution is symmetric, e.g. n == m).
    """
    _check_alternative(alternative)
    if not (isinstance(n_perm, int) and n_perm >= 0):
        raise MetricError(f"permutation_test: n_perm must be an int >= 0, got {n_perm!r}")
    a = torch.as_tensor(a).detach().to(torch.float64)
    b = torch.as_tensor(b).detach().to(torch.float64)
    if a.dim() == 0 or b.dim() == 0 or a.shape[-1] < 1 or b.shape[-1] < 1:
        raise MetricError(
            f"permutation_test: need a [..., n>=1] and b [..., m>=1], got {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )
    n, m = a.shape[-1], b.shape[-1]
    lead = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    z = torch.cat([a.expand(*lead, n), b.expand(*lead, m)], -1)  # [..., N]
    N = n + m
    observed = (a.mean(-1) - b.mean(-1)).expand(lead).clone()
    rows = max(1, math.prod(lead))
    atol = 1e-10 * z.abs().amax(-1)  # rounding of the permuted means, far below any real gap

    n_splits = n_relabellings(n, m)
    if n_splits <= max(n_perm, exact_limit):
        # T = sum_a (1/n + 1/m) - total/m is a function of the sum over group a, so enumerating
        # the subsets of the smaller group gives every T
        k = min(n, m)
        total = z.sum(-1, keepdim=True)
        combos = torch.combinations(torch.arange(N, device=z.device), r=k).reshape(-1, k)
        step = max(1, _CHUNK_ELEMS // (rows * k))
        ts = []
        for part in combos.split(step, 0):
            s = z[..., part].sum(-1)  # [..., c]
            sum_a = s if k == n else total - s
            ts.append(sum_a * (1 / n + 1 / m) - total / m)
        p = permutation_pvalue(observed, torch.cat(ts, -1), alternative, exact=True, atol=atol)
        return PermutationResult(observed, p.cpu(), int(n_splits), alternative, True)

    if n_perm < 1:
        raise MetricError(
            f"permutation_test: {n_splits} relabellings are too many to enumerate; n_perm must be >= 1"
        )
    generator = _fresh(generator)
    gdev = _gen_device(generator)
    chunk = max(1, min(n_perm, _CHUNK_ELEMS // N))  # draws independent of leading dims
    sub = max(1, _CHUNK_ELEMS // rows)  # bounds the [..., P] statistics
    ts = []
    for s in range(0, n_perm, chunk):
        perm = torch.rand(min(chunk, n_perm - s), N, generator=generator, device=gdev).argsort(-1)
        sel = (perm < n).to(z.device)  # the first n permuted positions go to group a
        for part in sel.split(sub, 0):
            w = part.to(z.dtype) * (1 / n + 1 / m) - 1 / m  # mean(a*) - mean(b*) as a dot product
            ts.append(z @ w.T)
    p = permutation_pvalue(observed, torch.cat(ts, -1), alternative, atol=atol)
    return PermutationResult(observed, p.cpu(), int(n_perm), alternative, False)


# ------------------------------------------------------------------------------------- Holm
def holm(pvalues: Tensor | Sequence[float]) -> Tensor:
    """Holm-Bonferroni adjusted p-values over the last dim (one family per leading index).

    p [..., k] in [0, 1] -> adjusted [..., k] in the input order:
    ``adj_(i) = max_{j <= i} min(1, (k - j + 1) p_(j))`` over the sorted p_(1) <= ... <= p_(k).
    Reject at level alpha where ``adj <= alpha``. NaN p-values (untestable layers) stay NaN and
    do not count in the family (k = the number of finite p-values of the row).
    """
    if not isinstance(pvalues, Tensor):
        pvalues = torch.as_tensor(pvalues, dtype=torch.float64)
    p = pvalues
    if not p.is_floating_point():
        p = p.to(torch.float64)
    p = p.detach()
    if p.dim() == 0:
        p = p[None]
    nan = torch.isnan(p)
    if (p[~nan] < 0).any() or (p[~nan] > 1).any():
        raise MetricError("holm: p-values must be in [0, 1] (or NaN for untested)")
    k = p.shape[-1]
    if k == 0:
        return p.clone()
    filled = torch.where(nan, torch.full_like(p, math.inf), p)  # NaNs sort last
    sp, order = torch.sort(filled, dim=-1, stable=True)
    kf = (~nan).sum(-1, keepdim=True).to(p.dtype)
    mult = (kf - torch.arange(k, dtype=p.dtype, device=p.device)).clamp_min(1)
    adj = torch.cummax(torch.where(torch.isinf(sp), torch.zeros_like(sp), sp * mult), dim=-1).values
    adj = adj.clamp_max(1)
    out = torch.empty_like(adj).scatter_(-1, order, adj)
    return torch.where(nan, p, out)
