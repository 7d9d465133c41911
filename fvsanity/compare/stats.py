"""Statistics for the path check: bootstrap CIs, permutation tests, Holm correction.

All randomness comes from an explicit ``torch.Generator`` (CPU by default; resample indices are
drawn on the generator's device and moved to the data), so a seed gives the same result on any
device. Resamples are vectorized in chunks; there is no Python loop per resample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations

import torch
from torch import Tensor

from .similarity import MetricError

__all__ = ["BootstrapCI", "PermutationResult", "bootstrap_ci", "holm", "permutation_test"]

ALTERNATIVES = ("two-sided", "greater", "less")
_CHUNK_ELEMS = 1 << 22  # elements per resample chunk (bounded memory)


def _tolist(t: Tensor):
    t = t.detach().cpu()
    return t.item() if t.dim() == 0 else t.tolist()


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _quantile_sorted(s: Tensor, q: float) -> Tensor:
    """Quantile ``q`` of sorted ``s`` [..., B] along the last dim (numpy's "linear" method)."""
    B = s.shape[-1]
    pos = q * (B - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, B - 1)
    w = pos - lo
    return s[..., lo] * (1 - w) + s[..., hi] * w


def _resample_chunks(n: int, n_boot: int, generator: torch.Generator, per_resample: int):
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
        idx = idx.cpu()
        yield from idx.split(sub, 0)


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
        generator: torch.Generator for the resample indices (None: a fresh unseeded one).
    Returns:
        :class:`BootstrapCI` with estimate/low/high of shape [...].
    """
    if not (0 < alpha < 1):
        raise MetricError(f"bootstrap_ci: alpha must be in (0, 1), got {alpha!r}")
    if not (isinstance(n_boot, int) and n_boot >= 1):
        raise MetricError(f"bootstrap_ci: n_boot must be a positive int, got {n_boot!r}")
    if generator is None:
        generator = torch.Generator()
        generator.seed()

    if callable(values):
        if not (isinstance(n_items, int) and n_items >= 1):
            raise MetricError("bootstrap_ci: pass n_items (>= 1) with a statistic function")
        n = n_items
        estimate = values(torch.arange(n)[None])[0]
        per = max(1, int(estimate.numel()) * n)
        stats = [values(idx) for idx in _resample_chunks(n, n_boot, generator, per)]
        boot = torch.cat(stats, 0).movedim(0, -1)  # [..., B]
    else:
        v = torch.as_tensor(values)
        if not v.is_floating_point():
            v = v.to(torch.get_default_dtype())
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
    s = torch.sort(boot.detach(), dim=-1).values
    low = _quantile_sorted(s, alpha / 2)
    high = _quantile_sorted(s, 1 - alpha / 2)
    return BootstrapCI(estimate.detach(), low, high, float(alpha), int(n_boot), int(n))


@dataclass(frozen=True)
class PermutationResult:
    """Permutation test of a difference of means.

    Attributes:
        statistic: mean(a) - mean(b) [...].
        pvalue: [...]; with random permutations (1 + #{T* at least as extreme}) / (1 + n_perm)
            (valid, never 0); with ``exact`` the fraction of all splits at least as extreme.
        n_perm: permutations drawn (or the number of distinct splits if exact).
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


def permutation_test(
    a: Tensor | Sequence[float],
    b: Tensor | Sequence[float],
    n_perm: int = 10000,
    generator: torch.Generator | None = None,
    alternative: str = "two-sided",
) -> PermutationResult:
    """Two-sample permutation test for mean(a) - mean(b) over per-item scores.

    a [..., n], b [..., m] (leading dims broadcast, e.g. one test per layer; every leading
    index uses the same permutations). If the number of distinct splits C(n + m, n) is at
    most ``n_perm`` the test is exact (all splits enumerated, no randomness). Computed in
    float64; ties with the observed statistic (within rounding) count as extreme.
    ``two-sided`` counts |T*| >= |T| (scipy instead doubles the smaller one-sided p-value;
    the two agree when the permutation distribution is symmetric, e.g. n == m).
    """
    if alternative not in ALTERNATIVES:
        raise MetricError(
            f"unknown alternative {alternative!r}; valid: {', '.join(ALTERNATIVES)}"
        )
    if not (isinstance(n_perm, int) and n_perm >= 1):
        raise MetricError(f"permutation_test: n_perm must be a positive int, got {n_perm!r}")
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
    observed = a.mean(-1) - b.mean(-1)
    observed = observed.expand(lead)

    def stat(sel_a: Tensor) -> Tensor:
        """sel_a: bool [P, N], n True per row -> statistics [..., P]."""
        w = sel_a.to(z.dtype) * (1 / n + 1 / m) - 1 / m  # mean(a*) - mean(b*) as a dot product
        return z @ w.T

    tol = 1e-10 * z.abs().amax(-1)  # rounding of the permuted means, far below any real gap

    def extreme(t: Tensor) -> Tensor:
        o, e = observed[..., None], tol[..., None]
        if alternative == "greater":
            return t >= o - e
        if alternative == "less":
            return t <= o + e
        return t.abs() >= o.abs() - e

    sub = max(1, _CHUNK_ELEMS // max(1, math.prod(lead)))  # bounds the [..., P] statistics

    def count_extreme(sel: Tensor) -> Tensor:
        sel = sel.to(z.device)
        return sum(extreme(stat(part)).sum(-1).to(torch.float64) for part in sel.split(sub, 0))

    n_splits = math.comb(N, n)
    if n_splits <= n_perm:
        combos = list(combinations(range(N), n))
        sel = torch.zeros(len(combos), N, dtype=torch.bool)
        rows = torch.arange(len(combos))[:, None].expand(-1, n)
        sel[rows, torch.tensor(combos)] = True
        count = count_extreme(sel)
        return PermutationResult(
            observed.clone(), (count / n_splits).cpu(), int(n_splits), alternative, True
        )

    if generator is None:
        generator = torch.Generator()
        generator.seed()
    gdev = _gen_device(generator)
    chunk = max(1, min(n_perm, _CHUNK_ELEMS // N))  # draws independent of leading dims
    count = torch.zeros(lead, dtype=torch.float64, device=z.device)
    for s in range(0, n_perm, chunk):
        p = min(chunk, n_perm - s)
        perm = torch.rand(p, N, generator=generator, device=gdev).argsort(-1)
        count += count_extreme(perm < n)  # the first n permuted positions go to group a
    pvalue = (1 + count) / (1 + n_perm)
    return PermutationResult(observed.clone(), pvalue.cpu(), int(n_perm), alternative, False)


def holm(pvalues: Tensor | Sequence[float]) -> Tensor:
    """Holm-Bonferroni adjusted p-values over the last dim (one family per leading index).

    p [..., k] in [0, 1] -> adjusted [..., k] in the input order:
    ``adj_(i) = max_{j <= i} min(1, (k - j + 1) p_(j))`` over the sorted p_(1) <= ... <= p_(k).
    Reject at level alpha where ``adj <= alpha``.
    """
    if not isinstance(pvalues, Tensor):
        pvalues = torch.as_tensor(pvalues, dtype=torch.float64)
    p = pvalues
    if not p.is_floating_point():
        p = p.to(torch.float64)
    p = p.detach()
    if p.dim() == 0:
        p = p[None]
    if torch.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise MetricError("holm: p-values must be in [0, 1] (no NaN)")
    k = p.shape[-1]
    if k == 0:
        return p.clone()
    sp, order = torch.sort(p, dim=-1, stable=True)
    mult = torch.arange(k, 0, -1, dtype=p.dtype, device=p.device)
    adj = torch.cummax(sp * mult, dim=-1).values.clamp_max(1)
    return torch.empty_like(adj).scatter_(-1, order, adj)
