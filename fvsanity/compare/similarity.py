"""Similarity metrics between activations: vector (unpaired) and representation (paired) metrics.

Vector metrics compare activation vectors over the LAST dim and broadcast over leading dims:
``spearman``, ``pearson``, ``cosine`` (and the differentiable surrogate ``soft_spearman``).
``x [..., d]`` and ``y [..., d]`` give ``[...]`` (the broadcast of the leading dims).

Representation metrics compare two representations of the SAME stimuli (paired rows):
``cka`` (linear CKA, debiased by default), ``rsa`` (RDMs over rows, compared on the upper
triangle); ``mmd2_unbiased`` compares two unpaired SETS with the same feature width.
``X [..., n, p]`` and ``Y [..., n, q]`` give ``[...]``.

Numerics (DESIGN.md 4.4): every metric is written in a safe form. A constant (or all-zero)
vector has no defined correlation/cosine; it is DEFINED to be 0 here, and its gradient is 0 (not
NaN, not 1e8 as with clamped denominators): denominators go through a double ``torch.where``
(substitute 1 at the singular point, then select 0). Vectors are shifted by their first element
before centering, so an exactly constant vector centres to exact zeros; a vector whose spread
is at the rounding level of its magnitude (coefficient of variation <= 4 eps) is treated as
constant too. NaN inputs propagate to NaN outputs.

All functions are device- and dtype-agnostic (float32/float64; integer inputs become float32)
and return tensors on the input device. ``@register_metric`` names feed the CLI's choices:
each metric declares the designs it is valid in (:data:`DESIGNS`: ``unpaired`` per-unit vector
metrics, ``paired`` representation metrics across units, ``set`` for MMD, which no pipeline
offers), and :func:`check_design` refuses any other combination with a one-line error.
Ranks come from :func:`fvsanity.compare.stats.rankdata` (the one implementation).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import FVSanityError
from ..registry import Registry
from .stats import MetricError, rankdata

__all__ = [
    "DESIGNS",
    "DesignError",
    "METRIC_KINDS",
    "MetricError",
    "MetricInfo",
    "UnknownMetricError",
    "check_design",
    "cka",
    "cka_biased",
    "compute_rdm",
    "cosine",
    "get_metric",
    "jaccard",
    "list_metrics",
    "metric_info",
    "mmd2_unbiased",
    "pearson",
    "rankdata",
    "register_metric",
    "unregister_metric",
    "rsa",
    "soft_spearman",
    "spearman",
]

METRIC_KINDS = ("vector", "representation")
_CONST_RTOL = 4.0  # spread <= 4 eps * magnitude counts as constant (rounding noise, not signal)


class UnknownMetricError(FVSanityError, KeyError):
    """``get_metric`` of a name that is not registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


# --------------------------------------------------------------------------------------------
# registry


#: the comparison designs a metric can serve (DESIGN.md 4.2):
#: ``unpaired``  per unit, one FV's pooled activation vector against one natural image's
#:               (vector metrics: the path check's curves);
#: ``paired``    across >= 4 units, row u of A (unit u's FVs) paired with row u of B (its natural
#:               references); the null permutes B's rows, so the metric must depend on the pairing
#:               (CKA, RSA);
#: ``set``       two unpaired SETS of vectors (MMD): invariant to any reordering of rows, so a
#:               row permutation gives no null (p = 1 whatever the data); no pipeline uses it yet.
DESIGNS = ("unpaired", "paired", "set")
_DEFAULT_DESIGNS = {"vector": ("unpaired",), "representation": ("paired",)}


class DesignError(MetricError):
    """A metric asked for in a design it does not support; the message lists the valid ones."""


@dataclass(frozen=True)
class MetricInfo:
    """A registered metric.

    Attributes:
        name: registry name (CLI choice).
        kind: ``"vector"`` (x [..., d], y [..., d] -> [...]) or ``"representation"``
            (X [n, p], Y [n, q] -> scalar).
        fn: the callable.
        designs: the designs of :data:`DESIGNS` the metric is valid in (CLI choices per design
            come from here).
        differentiable: usable under autograd (False for rank-based metrics).
    """

    name: str
    kind: str
    fn: Callable[..., Tensor]
    designs: frozenset = frozenset()
    differentiable: bool = True

    @property
    def paired(self) -> bool:
        """Rows of X and Y are the same stimuli (CKA, RSA); False for set and vector metrics."""
        return "paired" in self.designs

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "designs": sorted(self.designs),
            "paired": self.paired,
            "differentiable": self.differentiable,
            "doc": (self.fn.__doc__ or "").strip().splitlines()[0] if self.fn.__doc__ else "",
        }


#: the similarity metrics (the package's one registry convention, :class:`fvsanity.registry.Registry`)
_METRICS: Registry = Registry("metric")
METRICS = _METRICS


def register_metric(name: str, kind: str, *, designs=None, differentiable: bool = True):
    """Decorator registering ``fn`` under ``name`` with ``kind`` in :data:`METRIC_KINDS`.

    ``designs``: iterable of :data:`DESIGNS` (default: ``unpaired`` for vector metrics,
    ``paired`` for representation metrics).
    """
    if kind not in METRIC_KINDS:
        raise MetricError(f"unknown metric kind {kind!r}; valid: {', '.join(METRIC_KINDS)}")
    designs = frozenset(_DEFAULT_DESIGNS[kind] if designs is None else designs)
    bad = sorted(designs - set(DESIGNS))
    if bad:
        raise MetricError(f"unknown design {bad[0]!r}; valid: {', '.join(DESIGNS)}")

    def deco(fn):
        old = _METRICS[name] if name in _METRICS else None
        if old is not None and (old.fn.__module__, old.fn.__qualname__) != (
            fn.__module__,
            fn.__qualname__,
        ):
            raise MetricError(
                f"metric name {name!r} is already registered to "
                f"{old.fn.__module__}.{old.fn.__qualname__}; choose another name"
            )
        if old is not None:
            _METRICS.unregister(name)  # the same function again (a module reload): replace it
        _METRICS.register(name, MetricInfo(name, kind, fn, designs=designs, differentiable=differentiable))
        return fn

    return deco


def unregister_metric(name: str) -> MetricInfo:
    """Remove the metric ``name`` (tests and plug-ins that clean up); returns what it held."""
    info = metric_info(name)
    _METRICS.unregister(name)
    return info


def list_metrics(kind: str | None = None, design: str | None = None) -> list[str]:
    """Sorted registered metric names, optionally only those of ``kind`` / valid in ``design``."""
    if kind is not None and kind not in METRIC_KINDS:
        raise MetricError(f"unknown metric kind {kind!r}; valid: {', '.join(METRIC_KINDS)}")
    if design is not None and design not in DESIGNS:
        raise MetricError(f"unknown design {design!r}; valid: {', '.join(DESIGNS)}")
    return sorted(
        n for n, m in _METRICS.items()
        if (kind is None or m.kind == kind) and (design is None or design in m.designs)
    )


def metric_info(name: str) -> MetricInfo:
    """The :class:`MetricInfo` of a registered metric (raises :class:`UnknownMetricError`)."""
    try:
        return _METRICS[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list(_METRICS), n=3, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise UnknownMetricError(
            f"unknown metric {name!r}{hint}; valid: {', '.join(list_metrics())}"
        ) from None


_WHY = {
    "unpaired": "the per-unit path check compares single activation vectors",
    "paired": "the paired design across units permutes rows to get its null",
}


def check_design(name: str, design: str) -> MetricInfo:
    """:class:`MetricInfo` of ``name`` if it supports ``design``, else a one-line :class:`DesignError`.

    E.g. ``mmd`` (a set metric) in the ``paired`` design: permuting rows does not change a set
    metric, so its permutation p would be 1 whatever the data.
    """
    info = metric_info(name)
    if design not in info.designs:
        what = ", ".join(sorted(info.designs)) or "no design"
        why = _WHY.get(design, design)
        extra = " (a set metric: reordering rows does not change it)" if "set" in info.designs else ""
        raise DesignError(
            f"metric {name!r} supports {what}{extra}, not the {design} design ({why}); "
            f"valid: {', '.join(list_metrics(design=design))}"
        )
    return info


def get_metric(name: str) -> Callable[..., Tensor]:
    """The callable registered under ``name`` (raises :class:`UnknownMetricError`)."""
    return metric_info(name).fn


# --------------------------------------------------------------------------------------------
# safe building blocks


def _as_float(*ts: Tensor) -> tuple[Tensor, ...]:
    out = []
    for t in ts:
        t = torch.as_tensor(t)
        if not t.is_floating_point():
            t = t.to(torch.get_default_dtype())
        out.append(t)
    dtype = out[0].dtype
    for t in out[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t.to(dtype) for t in out)


def _eps(t: Tensor) -> float:
    return torch.finfo(t.dtype).eps


def _center(x: Tensor, dim: int) -> Tensor:
    """``x - mean(x, dim)``, shifted by the first element first so constants centre to exact 0."""
    first = x.narrow(dim, 0, 1)
    xs = x - first
    return xs - xs.mean(dim=dim, keepdim=True)


def _is_const(xc: Tensor, x: Tensor, dims) -> Tensor:
    """True where the centred ``xc`` is rounding noise relative to ``x`` (or exactly zero).

    NaN compares False, so NaN inputs are never "constant" and propagate.
    """
    xc, x = xc.detach(), x.detach()
    ss = (xc * xc).sum(dim=dims)
    ref = (x * x).sum(dim=dims)  # overflowing (inf) input is never "constant": it gives NaN
    return (ss <= (_CONST_RTOL * _eps(x)) ** 2 * ref) & torch.isfinite(ref)


def _safe_ratio(num: Tensor, a2: Tensor, b2: Tensor, singular: Tensor) -> Tensor:
    """``num / sqrt(a2 * b2)`` with value 0 and gradient 0 where ``singular`` (double where).

    ``singular`` must include every place where ``a2`` or ``b2`` is 0.
    """
    one = torch.ones((), dtype=num.dtype, device=num.device)
    a2s = torch.where(singular, one, a2)
    b2s = torch.where(singular, one, b2)
    return torch.where(singular, torch.zeros_like(num), num / a2s.sqrt() / b2s.sqrt())


def _check_vectors(x: Tensor, y: Tensor, name: str) -> tuple[Tensor, Tensor]:
    x, y = _as_float(x, y)
    if x.dim() == 0 or y.dim() == 0:
        raise MetricError(f"{name}: inputs must have at least one dim, got shapes "
                          f"{tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[-1] != y.shape[-1]:
        raise MetricError(
            f"{name}: last dims differ: x {tuple(x.shape)} vs y {tuple(y.shape)}; "
            "vectors must have the same length"
        )
    if x.shape[-1] == 0:
        raise MetricError(f"{name}: empty vectors (last dim 0)")
    try:
        torch.broadcast_shapes(x.shape[:-1], y.shape[:-1])
    except RuntimeError:
        raise MetricError(
            f"{name}: leading dims do not broadcast: x {tuple(x.shape)} vs y {tuple(y.shape)}"
        ) from None
    return x, y


def _pearson(x: Tensor, y: Tensor) -> Tensor:
    xc, yc = _center(x, -1), _center(y, -1)
    singular = _is_const(xc, x, -1) | _is_const(yc, y, -1)
    num = (xc * yc).sum(-1)
    return _safe_ratio(num, (xc * xc).sum(-1), (yc * yc).sum(-1), singular)


def jaccard(a: Tensor, b: Tensor) -> Tensor:
    """Jaccard index ``|A & B| / |A | B|`` of two sets given as boolean masks over the last dim.

    The one set-overlap implementation (top-k exemplar and top-k edge overlaps use it).
    a [..., d], b [..., d] (bool, or anything nonzero = member) -> [...] float64, in [0, 1]:
    1 for identical sets, 0 for disjoint ones. Two EMPTY sets are defined to overlap fully
    (1.0): nothing was selected by either, so they agree.
    """
    a, b = torch.as_tensor(a).bool(), torch.as_tensor(b).bool()
    if a.dim() == 0 or b.dim() == 0:
        raise MetricError(f"jaccard: masks must have at least one dim, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[-1] != b.shape[-1]:
        raise MetricError(f"jaccard: masks differ in the last dim: {a.shape[-1]} vs {b.shape[-1]}")
    inter = (a & b).sum(-1, dtype=torch.float64)
    union = (a | b).sum(-1, dtype=torch.float64)
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))


# --------------------------------------------------------------------------------------------
# vector metrics


@register_metric("pearson", "vector")
def pearson(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation over the last dim. x [..., d], y [..., d] -> [...], in [-1, 1].

    A constant or all-zero vector gives 0 with gradient 0 (safe; float64 gradcheck passes
    elsewhere).
    """
    x, y = _check_vectors(x, y, "pearson")
    return _pearson(x, y)


@register_metric("cosine", "vector")
def cosine(x: Tensor, y: Tensor) -> Tensor:
    """Cosine similarity over the last dim. x [..., d], y [..., d] -> [...], in [-1, 1].

    An all-zero vector gives 0 with gradient 0. Unlike ``F.cosine_similarity`` (clamped
    denominator: gradients of 1e8 at 0) the norms go through a double ``torch.where``.
    """
    x, y = _check_vectors(x, y, "cosine")
    x2, y2 = (x * x).sum(-1), (y * y).sum(-1)
    singular = (x2 <= 0) | (y2 <= 0)
    return _safe_ratio((x * y).sum(-1), x2, y2, singular)


@register_metric("spearman", "vector", differentiable=False)
def spearman(x: Tensor, y: Tensor) -> Tensor:
    """Spearman rank correlation over the last dim (average ranks for ties, as scipy).

    x [..., d], y [..., d] -> [...], in [-1, 1]; a constant vector gives 0; NaN in a vector
    gives NaN. Ranks are piecewise constant in the inputs, so the true gradient is zero almost
    everywhere and undefined at ties: the result carries NO gradient (``requires_grad`` False).
    Use :func:`soft_spearman` as a differentiable surrogate.
    """
    x, y = _check_vectors(x, y, "spearman")
    r = _pearson(rankdata(x), rankdata(y))
    bad = torch.isnan(x).any(-1) | torch.isnan(y).any(-1)
    return torch.where(bad, torch.full_like(r, float("nan")), r)


def soft_spearman(x: Tensor, y: Tensor, temperature: float = 0.1) -> Tensor:
    """Differentiable surrogate of :func:`spearman`: Pearson of soft ranks.

    Soft rank ``r_i = 1/2 + sum_j sigmoid((x_i - x_j) / temperature)`` (the j = i term is 1/2),
    which tends to the average rank as ``temperature -> 0`` (ties get exactly the average
    rank at any temperature). ``temperature`` is in the units of the activations.
    x [..., d], y [..., d] -> [...]. Memory O(d^2) per vector. Smooth everywhere; a constant
    vector gives 0 with gradient 0.
    """
    x, y = _check_vectors(x, y, "soft_spearman")
    if not temperature > 0:
        raise MetricError(f"soft_spearman: temperature must be > 0, got {temperature!r}")

    def soft_rank(v: Tensor) -> Tensor:
        return 0.5 + torch.sigmoid((v[..., :, None] - v[..., None, :]) / temperature).sum(-1)

    return _pearson(soft_rank(x), soft_rank(y))


# --------------------------------------------------------------------------------------------
# representation metrics


def _check_reps(X: Tensor, Y: Tensor, name: str, min_n: int, same_width: bool = False):
    X, Y = _as_float(X, Y)
    if X.dim() < 2 or Y.dim() < 2:
        raise MetricError(
            f"{name}: expected X [..., n, p] and Y [..., n, q], got shapes "
            f"{tuple(X.shape)} and {tuple(Y.shape)}"
        )
    if not same_width and X.shape[-2] != Y.shape[-2]:
        raise MetricError(
            f"{name}: X and Y must have the same number of rows (paired stimuli), got "
            f"{X.shape[-2]} and {Y.shape[-2]}"
        )
    if same_width and X.shape[-1] != Y.shape[-1]:
        raise MetricError(
            f"{name}: X and Y must have the same feature width, got {X.shape[-1]} and "
            f"{Y.shape[-1]}"
        )
    for t, tag in ((X, "X"), (Y, "Y")):
        if t.shape[-2] < min_n:
            raise MetricError(f"{name}: needs at least {min_n} rows, {tag} has {t.shape[-2]}")
    return X, Y


def _u_center(K: Tensor) -> Tensor:
    """U-centring of a Gram matrix [..., n, n] (Szekely & Rizzo 2014; n >= 4).

    <U(K), U(L)> / (n (n - 3)) is the unbiased HSIC estimator of Song et al. (2012).
    """
    n = K.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=K.device)
    K = K.masked_fill(eye, 0)
    row = K.sum(-1) / (n - 2)
    total = K.sum((-2, -1)) / ((n - 1) * (n - 2))
    U = K - row[..., :, None] - row[..., None, :] + total[..., None, None]
    return U.masked_fill(eye, 0)


def _center_rep(X: Tensor) -> tuple[Tensor, Tensor]:
    """Column-centred X [..., n, p] and a [...] mask of zero-variance (constant-row) X."""
    Xc = _center(X, -2)
    return Xc, _is_const(Xc, X, (-2, -1))


@register_metric("cka", "representation")
def cka(X: Tensor, Y: Tensor, debiased: bool = True) -> Tensor:
    """Linear CKA between two representations of the same n stimuli.

    X [..., n, p], Y [..., n, q] (rows paired) -> [...]. Features are centred first, so the
    result is invariant to translation, isotropic scaling and orthogonal transforms of X or Y.

    ``debiased=True`` (default) uses the unbiased HSIC estimator (Song et al. 2012; as in
    Nguyen, Raghu & Kornblith 2021): CKA = <U(K), U(L)> / (|U(K)| |U(L)|) with U the
    U-centring of the linear Gram matrices K = X X^T, L = Y Y^T. It centres on 0 for
    independent representations (the biased one reads ~0.96 at n = 20, width 512) and can be
    negative; needs n >= 4. ``debiased=False``: biased HSIC with H K H (needs n >= 2).
    A zero-variance representation (all rows equal) gives 0 with gradient 0.
    Cost O(n^2 (p + q)) time, O(n^2) memory.
    """
    X, Y = _check_reps(X, Y, "cka", 4 if debiased else 2)
    Xc, x_const = _center_rep(X)
    Yc, y_const = _center_rep(Y)
    K = Xc @ Xc.transpose(-1, -2)
    L = Yc @ Yc.transpose(-1, -2)
    if debiased:
        K, L = _u_center(K), _u_center(L)
    k2, l2 = (K * K).sum((-2, -1)), (L * L).sum((-2, -1))
    singular = x_const | y_const | (k2 <= 0) | (l2 <= 0)
    return _safe_ratio((K * L).sum((-2, -1)), k2, l2, singular)


@register_metric("cka_biased", "representation")
def cka_biased(X: Tensor, Y: Tensor) -> Tensor:
    """Linear CKA with the biased HSIC estimator: ``cka(X, Y, debiased=False)``."""
    return cka(X, Y, debiased=False)


RDM_METHODS = ("correlation", "euclidean", "sqeuclidean")
RSA_COMPARE = ("spearman", "pearson")


def _sq_dists(X: Tensor) -> Tensor:
    """Squared Euclidean distances between rows, X [..., n, p] -> [..., n, n], diagonal 0.

    Uses the Gram expansion (O(n^2) memory under autograd) on column-centred X to limit
    cancellation; entries at the rounding level of the row norms (<= 4 sqrt(p) eps) are set to
    exactly 0 so identical rows are at distance 0.
    """
    Xc = _center(X, -2)
    G = Xc @ Xc.transpose(-1, -2)
    sq = torch.diagonal(G, dim1=-2, dim2=-1)
    scale = (sq[..., :, None] + sq[..., None, :]).detach()
    D2 = sq[..., :, None] + sq[..., None, :] - 2 * G
    tol = _CONST_RTOL * math.sqrt(X.shape[-1]) * _eps(X)
    tiny = D2.detach() <= tol * scale
    n = X.shape[-2]
    tiny = tiny | torch.eye(n, dtype=torch.bool, device=X.device)
    return torch.where(tiny, torch.zeros_like(D2), D2)


def compute_rdm(X: Tensor, method: str = "correlation") -> Tensor:
    """Representational dissimilarity matrix over the rows of X [..., n, p] -> [..., n, n].

    ``correlation``: 1 - Pearson r between rows (a constant row has r = 0 with every row, so
    distance 1); ``euclidean``: |x_i - x_j| (as scipy ``pdist``); ``sqeuclidean``: its square.
    Safe under autograd: zero distances have gradient 0, constant rows too.
    """
    if method not in RDM_METHODS:
        raise MetricError(f"unknown rdm method {method!r}; valid: {', '.join(RDM_METHODS)}")
    (X,) = _as_float(X)
    if X.dim() < 2:
        raise MetricError(f"rdm: expected X [..., n, p], got shape {tuple(X.shape)}")
    if method == "correlation":
        Xc = _center(X, -1)
        x2 = (Xc * Xc).sum(-1)
        singular = _is_const(Xc, X, -1)
        one = torch.ones((), dtype=X.dtype, device=X.device)
        inv = torch.where(singular, torch.zeros_like(x2), 1 / torch.where(singular, one, x2).sqrt())
        Z = Xc * inv[..., None]
        D = 1 - Z @ Z.transpose(-1, -2)
        eye = torch.eye(X.shape[-2], dtype=torch.bool, device=X.device)
        return D.masked_fill(eye, 0)
    D2 = _sq_dists(X)
    if method == "sqeuclidean":
        return D2
    pos = D2 > 0
    return torch.where(pos, torch.where(pos, D2, torch.ones_like(D2)).sqrt(), torch.zeros_like(D2))


@register_metric("rsa", "representation", differentiable=False)
def rsa(X: Tensor, Y: Tensor, rdm: str = "correlation", compare: str = "spearman") -> Tensor:
    """Representational similarity analysis between two representations of the same n stimuli.

    X [..., n, p], Y [..., n, q] -> [...]: the RDMs over rows (``rdm`` in
    ``correlation | euclidean | sqeuclidean``) are compared on their upper triangles (i < j)
    with ``compare`` in ``spearman | pearson``. Needs n >= 3. Differentiable only with
    ``compare="pearson"`` (Spearman ranks carry no gradient).
    """
    if compare not in RSA_COMPARE:
        raise MetricError(f"unknown rsa compare {compare!r}; valid: {', '.join(RSA_COMPARE)}")
    if rdm not in RDM_METHODS:
        raise MetricError(f"unknown rdm method {rdm!r}; valid: {', '.join(RDM_METHODS)}")
    X, Y = _check_reps(X, Y, "rsa", 3)
    n = X.shape[-2]
    iu = torch.triu_indices(n, n, offset=1, device=X.device)
    dx = compute_rdm(X, rdm)[..., iu[0], iu[1]]
    dy = compute_rdm(Y, rdm)[..., iu[0], iu[1]]
    return spearman(dx, dy) if compare == "spearman" else _pearson(dx, dy)


MMD_KERNELS = ("rbf", "linear")


@register_metric("mmd", "representation", designs=("set",))
def mmd2_unbiased(
    X: Tensor, Y: Tensor, kernel: str = "rbf", bandwidth: str | float = "median"
) -> Tensor:
    """Unbiased estimate of the squared MMD between two sets of vectors (Gretton et al. 2012).

    X [n, p], Y [m, p] (unpaired; n, m >= 2) -> scalar. Can be slightly negative (unbiased).
    ``kernel="rbf"``: k(a, b) = exp(-|a - b|^2 / (2 sigma^2)) with ``bandwidth`` = sigma (in
    activation units) or ``"median"``: sigma = median pairwise distance of the pooled sample
    (computed without gradient; falls back to the mean distance, then 1, if it is 0).
    ``kernel="linear"``: k(a, b) = a . b (bandwidth unused).
    """
    if kernel not in MMD_KERNELS:
        raise MetricError(f"unknown mmd kernel {kernel!r}; valid: {', '.join(MMD_KERNELS)}")
    X, Y = _check_reps(X, Y, "mmd2_unbiased", 2, same_width=True)
    if X.dim() != 2 or Y.dim() != 2:
        raise MetricError(
            f"mmd2_unbiased: expected 2-D X [n, p] and Y [m, p], got {tuple(X.shape)} and "
            f"{tuple(Y.shape)}"
        )
    n, m = X.shape[0], Y.shape[0]
    Z = torch.cat([X, Y], dim=0)
    if kernel == "linear":
        Zc = _center(Z, 0)  # MMD is translation invariant; centring limits cancellation
        Kz = Zc @ Zc.T
    else:
        D2 = _sq_dists(Z)
        if isinstance(bandwidth, str):
            if bandwidth != "median":
                raise MetricError(
                    f"unknown mmd bandwidth {bandwidth!r}; valid: 'median' or a positive number"
                )
            iu = torch.triu_indices(n + m, n + m, offset=1, device=Z.device)
            d2 = D2.detach()[iu[0], iu[1]]
            s2 = d2.median()
            if not s2 > 0:
                s2 = d2.mean() if d2.mean() > 0 else torch.ones((), dtype=Z.dtype, device=Z.device)
        else:
            if not (isinstance(bandwidth, (int, float)) and bandwidth > 0):
                raise MetricError(
                    f"mmd bandwidth must be 'median' or a positive number, got {bandwidth!r}"
                )
            s2 = torch.tensor(float(bandwidth) ** 2, dtype=Z.dtype, device=Z.device)
        Kz = torch.exp(-D2 / (2 * s2))
    kxx, kyy, kxy = Kz[:n, :n], Kz[n:, n:], Kz[:n, n:]
    exx = (kxx.sum() - torch.diagonal(kxx).sum()) / (n * (n - 1))
    eyy = (kyy.sum() - torch.diagonal(kyy).sum()) / (m * (m - 1))
    return exx + eyy - 2 * kxy.mean()
