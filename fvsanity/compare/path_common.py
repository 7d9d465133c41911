"""The path check's small shared pieces: ratios safe at zero, per-unit seeds, chunked pairwise
similarity matrices, metric lookup, intervals and JSON-safe floats (see
:mod:`fvsanity.compare.path`)."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch

from .stats import holm, percentile_interval

__all__ = ["safe_ratio", "unit_seed", "pairwise", "MAX_RESAMPLES"]


def safe_ratio(num: torch.Tensor | float, den: torch.Tensor | float, eps: float = 1e-6) -> torch.Tensor:
    """num / den where |den| > eps, else NaN (never inf; double-where so no NaN leaks into grads)."""
    num = torch.as_tensor(num, dtype=torch.float64)
    den = torch.as_tensor(den, dtype=torch.float64)
    ok = den.abs() > eps
    safe_den = torch.where(ok, den, torch.ones_like(den))
    return torch.where(ok, num / safe_den, torch.full_like(num / safe_den, float("nan")))


#: the most bootstrap resamples or permutations a check or audit takes
MAX_RESAMPLES = 1_000_000


def _metric_choices(design: str) -> list[str]:
    from .similarity import list_metrics

    return list_metrics(design=design)


def _metric(name: str):
    """(callable over the last dim / over paired rows, kind) for a registered metric name."""
    from .similarity import metric_info

    info = metric_info(name)
    return info.fn, info.kind


def _holm(p: Sequence[float]) -> list[float]:
    """Holm over a list of p-values; NaN (untested layers) stay NaN and are not counted."""
    return [float(v) for v in holm(torch.tensor(list(p), dtype=torch.float64))]


def unit_seed(seed: int, unit) -> int:
    """The seed of one unit's random choices: from the base ``seed`` and the unit's name.

    ``(seed * 1_000_003 + crc32(str(unit))) mod (2^31 - 1)``: independent of the unit's
    position in any list, of the other units and of sharding.
    """
    return (int(seed) * 1_000_003 + zlib.crc32(str(unit).encode())) % (2**31 - 1)


def pairwise(metric, a: torch.Tensor, b: torch.Tensor, chunk_elems: int = 4_000_000) -> torch.Tensor:
    """All-pairs similarity: a [n, C], b [m, C] -> [n, m] (float64), ``metric`` over the last dim.

    ``metric`` is a registered vector-metric name or a callable ``f(x [..., C], y [..., C]) -> [...]``.
    Vector metrics broadcast over leading dims, so per-row work (ranks) is done once per row;
    computed in row chunks of at most ``chunk_elems`` elements.
    """
    fn = _metric(metric)[0] if isinstance(metric, str) else metric
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    n, m = a.shape[0], b.shape[0]
    if n == 0 or m == 0:
        return torch.empty(n, m, dtype=torch.float64)
    step = max(1, chunk_elems // max(1, m * a.shape[1]))
    rows = []
    for s in range(0, n, step):
        rows.append(fn(a[s : s + step, None, :], b[None, :, :]).to(torch.float64))
    return torch.cat(rows)


def _interval(x: torch.Tensor, confidence: float) -> tuple[float, float]:
    lo, hi = percentile_interval(x, confidence)
    return float(lo), float(hi)


def _f(x) -> float:
    return float(x)


def _jf(x) -> float | None:
    """JSON-safe float: NaN / inf -> None (so equal results compare equal as dicts)."""
    return float(x) if math.isfinite(x) else None
