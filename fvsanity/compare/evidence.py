"""One layer's evidence (:class:`LayerEvidence`): the sign-flip test of the replicates (FV seeds
within a unit, units across units) against both margins, with confidence bounds; see
:mod:`fvsanity.compare.verdict`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .reference_separation import Separation, seed_scores, separation
from .signflip import attainable_p, json_float, sign_flip, z_upper
from .verdict_settings import SEEDS, UNITS, VerdictSettings

__all__ = ["LayerEvidence", "replicate_evidence", "layer_evidence"]


@dataclass(frozen=True)
class _Threshold:
    """The replicate-scale value of the normalized similarity delta: base + delta * gap, and its
    conservative version base + delta * gap +- z * sqrt(delta^2 var_n + (1 - delta)^2 var_o)
    (the natural side's upper / lower confidence bound; var 0 across units)."""

    base: float = 0.0
    gap: float = 1.0
    var_n: float = 0.0
    var_o: float = 0.0

    def var(self, delta: float) -> float:
        """Variance of the natural side's estimate of base + delta * gap."""
        return delta * delta * self.var_n + (1 - delta) ** 2 * self.var_o

    def __call__(self, delta: float, z: float = 0.0) -> float:
        return self.base + delta * self.gap + z * math.sqrt(self.var(delta))

    def invert(self, q: float, z: float, lower: bool) -> float:
        """lower: the right end of {delta: c(delta, +z) < q} (-inf if empty); else the left end of
        {delta: c(delta, -z) > q} (+inf if empty). c(., +z) is convex, c(., -z) concave."""
        h = (lambda d: self(d, z) - q) if lower else (lambda d: q - self(d, -z))  # convex
        if z == 0 or (self.var_n == 0 and self.var_o == 0):
            root = (q - self.base) / self.gap
            return root
        lo, hi = -1e4, 1e4
        a, b = lo, hi
        for _ in range(90):  # ternary search for the minimum of the convex h
            m1, m2 = a + (b - a) / 3, b - (b - a) / 3
            if h(m1) <= h(m2):
                b = m2
            else:
                a = m1
        mid = (a + b) / 2
        if h(mid) >= 0:
            return -math.inf if lower else math.inf
        a, b = (mid, hi) if lower else (lo, mid)
        if (h(b) < 0) if lower else (h(a) < 0):
            return math.inf if lower else -math.inf
        for _ in range(64):
            c = (a + b) / 2
            inside = h(c) < 0
            if lower:
                a, b = (c, b) if inside else (a, c)
            else:
                a, b = (a, c) if inside else (c, b)
        return (a + b) / 2


@dataclass(frozen=True)
class LayerEvidence:
    """The raw evidence of one layer (before the multiplicity rules of :func:`decide_layers`).

    Attributes:
        name: layer name.
        replicate: :data:`SEEDS` or :data:`UNITS` (what ``n`` counts).
        n: replicates (0: none usable, e.g. references not separated).
        estimate: normalized similarity (F - O) / (N - O), across units the mean over units
            (NaN if none).
        ci_low, ci_high: one-sided confidence bounds at level alpha each (a 1 - 2 alpha interval;
            -inf / +inf where the design cannot bound it); "natural-like" at this layer alone iff
            ci_low > natural_like_margin (up to the bisection's rounding).
        p_natural_like: raw sign-flip p of H0 normalized <= natural_like_margin.
        p_diverges: raw sign-flip p of H0 normalized >= diverge_margin.
        p_floor: the smallest raw p attainable with ``n`` replicates.
        natural_share: the share of alpha spent on the natural side's uncertainty (0 across
            units); claims compare p / (1 - natural_share) with alpha.
        exact: every sign pattern enumerated.
        spread_sd, spread_min, spread_max: of the replicates' normalized similarities.
        separated: the natural references separate from unrelated images
            (:func:`separation`; always True across units). Where not, n = 0 and the estimate is
            NaN: the normalized similarity has no scale there.
        fv_vs_natural, natural_vs_natural, natural_vs_other: the layer's means (NaN across units).
        replicates: the per-replicate normalized similarities [n].
        separation: the :class:`Separation` behind ``separated`` (None across units).
    """

    name: str
    replicate: str
    n: int
    estimate: float
    ci_low: float
    ci_high: float
    p_natural_like: float
    p_diverges: float
    p_floor: float
    natural_share: float
    exact: bool
    spread_sd: float
    spread_min: float
    spread_max: float
    separated: bool = True
    fv_vs_natural: float = math.nan
    natural_vs_natural: float = math.nan
    natural_vs_other: float = math.nan
    replicates: tuple[float, ...] = ()
    separation: Separation | None = None

    def to_json(self) -> dict:
        return {
            "name": self.name, "replicate": self.replicate, "n": self.n, "estimate": json_float(self.estimate),
            "ci_low": json_float(self.ci_low), "ci_high": json_float(self.ci_high),
            "p_natural_like": json_float(self.p_natural_like), "p_diverges": json_float(self.p_diverges),
            "p_floor": self.p_floor, "natural_share": self.natural_share, "exact": self.exact,
            "spread": {"sd": json_float(self.spread_sd), "min": json_float(self.spread_min), "max": json_float(self.spread_max)},
            "separated": self.separated, "fv_vs_natural": json_float(self.fv_vs_natural),
            "natural_vs_natural": json_float(self.natural_vs_natural), "natural_vs_other": json_float(self.natural_vs_other),
            "replicates": [json_float(v) for v in self.replicates],
            "separation": self.separation.to_json() if self.separation is not None else None,
        }



def _evidence(name, x, thr: _Threshold, share: float, n_layers: int, replicate, st, generator, **extra):
    """Sign-flip evidence of replicates x [n] against the thresholds thr (see LayerEvidence)."""
    n = int(x.numel())
    floor = attainable_p(n, correction="none", n_perm=st.n_signflips, exact_limit=st.exact_limit)
    theta = (x - thr.base) / thr.gap if n else x
    if n == 0:
        nan = math.nan
        return LayerEvidence(name, replicate, 0, extra.pop("estimate", nan), nan, nan, 1.0, 1.0, floor, share,
                             True, nan, nan, nan, **extra)
    sf = sign_flip(x, n_perm=st.n_signflips, exact_limit=st.exact_limit, generator=generator)
    estimate = extra.pop("estimate", float(theta.mean()))
    if share > 0 or thr.var_n == 0 and thr.var_o == 0:  # exact sign flips against a (bounded) threshold
        a_f = (1 - share) * st.alpha
        z_nat, z_div = z_upper(share * st.alpha), z_upper(share * st.alpha / max(1, n_layers))
        q_lo, q_hi = sf.lower(a_f), sf.upper(a_f)
        ci_low = thr.invert(q_lo, z_nat, True) if math.isfinite(q_lo) else q_lo
        ci_high = thr.invert(q_hi, z_nat, False) if math.isfinite(q_hi) else q_hi
        p_nat = sf.p_greater(thr(st.natural_like_margin, z_nat))
        p_div = sf.p_less(thr(st.diverge_margin, -z_div))
    else:  # "inflate": the natural side's variance added to the sign-flip distribution's
        def p_at(delta: torch.Tensor, greater: bool) -> torch.Tensor:
            c = thr.base + delta * thr.gap
            var = delta**2 * thr.var_n + (1 - delta) ** 2 * thr.var_o
            return sf._p_many(c, var, greater)

        ci_low = _bisect(lambda t: p_at(t, True), st.alpha, estimate, lower=True)
        ci_high = _bisect(lambda t: p_at(t, False), st.alpha, estimate, lower=False)
        p_nat = float(p_at(torch.tensor([st.natural_like_margin], dtype=torch.float64), True)[0])
        p_div = float(p_at(torch.tensor([st.diverge_margin], dtype=torch.float64), False)[0])
    return LayerEvidence(
        name=name, replicate=replicate, n=n, estimate=estimate, ci_low=ci_low, ci_high=ci_high,
        p_natural_like=p_nat,
        p_diverges=p_div,
        p_floor=floor, natural_share=share, exact=sf.exact,
        spread_sd=float(theta.std()) if n >= 2 else math.nan,
        spread_min=float(theta.min()), spread_max=float(theta.max()),
        replicates=tuple(float(t) for t in theta), **extra,
    )


def _bisect(p_fn, alpha: float, start: float, lower: bool, span: float = 1e3) -> float:
    """The confidence bound where the one-sided p crosses alpha: lower: sup{d < start: p(d) <=
    alpha}, upper: inf{d > start: p(d) <= alpha}; -inf / +inf when no d reaches alpha.

    ``p_fn``: margins [D] -> p [D]. Grid refinement (65 points, 6 rounds: span / 64^6 < 1e-7)."""
    far = start - span if lower else start + span
    p_far, p_start = p_fn(torch.tensor([far, start], dtype=torch.float64)).tolist()
    if p_far > alpha:
        return -math.inf if lower else math.inf
    if p_start <= alpha:
        return start
    a, b = (far, start) if lower else (start, far)
    for _ in range(6):
        grid = torch.linspace(a, b, 65, dtype=torch.float64)
        ok = (p_fn(grid) <= alpha).nonzero().flatten()
        if lower:  # p rises with d: the last grid point still rejected
            i = int(ok.max())
            a, b = float(grid[i]), float(grid[min(i + 1, 64)])
        else:  # p falls with d: the first grid point rejected
            i = int(ok.min())
            a, b = float(grid[max(i - 1, 0)]), float(grid[i])
    return a if lower else b


def replicate_evidence(
    name: str,
    values,
    *,
    replicate: str = UNITS,
    settings: VerdictSettings | None = None,
    generator: torch.Generator | None = None,
) -> LayerEvidence:
    """Evidence from replicates that are themselves normalized similarities ``values`` [n] (NaN
    dropped), e.g. units' estimates at one layer: the sign-flip p of both claims against the
    margins, the confidence bounds, the floor and the spread; no natural side (share 0)."""
    st = settings or VerdictSettings()
    v = torch.as_tensor(values, dtype=torch.float64).detach().cpu().flatten()
    v = v[torch.isfinite(v)]
    return _evidence(name, v, _Threshold(), 0.0, 1, replicate, st, generator)


def layer_evidence(
    name: str,
    fv_ref,
    ref_ref,
    other_ref,
    *,
    n_layers: int = 1,
    settings: VerdictSettings | None = None,
    generator: torch.Generator | None = None,
    separated: Separation | None = None,
) -> LayerEvidence:
    """One layer of one unit, FV seeds as replicates (shapes: module docstring).

    The seeds' scores f_i are compared with the value the margin delta has on their scale,
    O + delta (N - O), whose estimate's variance delta^2 var(n_j) / m + (1 - delta)^2 var(o_k) /
    n is added to the sign-flip distribution (module docstring). With ``settings.natural_share``
    s > 0 instead: the threshold at the natural side's (1 - s alpha) confidence bound (for the
    diverges claims s alpha / ``n_layers``, the Holm family) and the exact test at (1 - s) alpha.

    The references must separate from the unrelated images (:func:`separation`: a standardized
    gap of at least ``settings.min_separation``, known to within ``settings.precision_limit``);
    else the layer has no normalized scale: ``separated=False``, n = 0, the estimate NaN
    (inconclusive, with the separation's reason).

    Args:
        name: the layer's name.
        fv_ref: [S] or [S, m]; ref_ref: [m] or [m, m]; other_ref: [n] or [n, m].
        n_layers: layers on the unit's path (the diverges claims' Holm family).
        separated: the layer's :func:`separation` if already computed for these ``ref_ref`` and
            ``other_ref`` (it does not depend on the FVs; leave-one-seed-out reuses it).
    """
    st = settings or VerdictSettings()
    sc = seed_scores(fv_ref, ref_ref, other_ref)
    nat, oth = sc["natural_vs_natural"], sc["natural_vs_other"]
    sep = separated if separated is not None else separation(ref_ref, other_ref, st)
    extra = {k: sc[k] for k in ("fv_vs_natural", "natural_vs_natural", "natural_vs_other")}
    extra["separated"] = sep.separated
    extra["separation"] = sep
    if not sep.separated:  # no scale: no normalized number, no claim
        return _evidence(name, torch.empty(0, dtype=torch.float64), _Threshold(), st.natural_share, n_layers,
                         SEEDS, st, generator, estimate=math.nan, **extra)
    m, k = sc["n"].numel(), sc["o"].numel()
    thr = _Threshold(oth, nat - oth, float(sc["n"].var()) / m, float(sc["o"].var()) / k)
    return _evidence(name, sc["f"], thr, st.natural_share, n_layers, SEEDS, st, generator, **extra)
