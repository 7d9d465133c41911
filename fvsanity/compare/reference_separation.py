"""One layer's scores (:func:`seed_scores`: each FV seed's, reference's and other image's mean
similarity to the references) and whether the references separate from unrelated images at all
(:func:`separation`); see :mod:`fvsanity.compare.verdict`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .signflip import json_float, z_upper
from .verdict_settings import (
    MAX_NEEDED,
    MIN_SEPARATION_REFERENCES,
    REASON_SEP_EFFECT,
    REASON_SEP_FEW,
    REASON_SEP_NONE,
    REASON_SEP_PRECISION,
    REASON_SEP_PRECISION_OTHER,
    VerdictError,
    VerdictSettings,
)

__all__ = ["seed_scores", "Separation", "separation"]


def _vec(t, name: str, diag: bool = False) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float64).detach().cpu()
    if t.dim() == 1:
        return t
    if t.dim() == 2:
        if diag:
            m = t.shape[0]
            if t.shape[1] != m:
                raise VerdictError(f"{name} must be [m] or [m, m], got {tuple(t.shape)}")
            if m < 2:
                return torch.empty(0, dtype=torch.float64)
            off = t * (1 - torch.eye(m, dtype=torch.float64))
            return off.sum(1) / (m - 1)
        return t.mean(1) if t.shape[1] else torch.full((t.shape[0],), float("nan"), dtype=torch.float64)
    raise VerdictError(f"{name} must be a 1-D or 2-D tensor, got shape {tuple(t.shape)}")


def seed_scores(fv_ref, ref_ref, other_ref) -> dict:
    """Per-replicate scores of one layer (shapes: module docstring).

    Returns:
        dict: ``f`` [S] per-seed similarity to R, ``n`` [m] leave-one-out reference scores,
        ``o`` [n] other-image scores, ``fv_vs_natural`` / ``natural_vs_natural`` /
        ``natural_vs_other`` (their means), ``theta`` [S] per-seed normalized similarity (NaN
        where N - O is not positive), ``p_separation`` (one-sided Welch t p of N > O: descriptive
        only; the gate is :func:`separation`, which asks for a meaningful, precise gap).
    """
    f = _vec(fv_ref, "fv_ref")
    n = _vec(ref_ref, "ref_ref", diag=True)
    o = _vec(other_ref, "other_ref")
    for t, name in ((f, "fv_ref"), (n, "ref_ref"), (o, "other_ref")):
        if not torch.isfinite(t).all():
            raise VerdictError(f"{name} has non-finite similarities")
    nat = float(n.mean()) if n.numel() else math.nan
    oth = float(o.mean()) if o.numel() else math.nan
    gap = nat - oth
    theta = (f - oth) / gap if (math.isfinite(gap) and gap > 0) else torch.full_like(f, math.nan)
    return {
        "f": f, "n": n, "o": o, "theta": theta,
        "fv_vs_natural": float(f.mean()) if f.numel() else math.nan,
        "natural_vs_natural": nat, "natural_vs_other": oth,
        "p_separation": _welch_greater(n, o),
    }


def _welch_greater(a: torch.Tensor, b: torch.Tensor) -> float:
    """One-sided Welch t p of mean(a) > mean(b); 1.0 when it cannot be computed (fewer than 2 per
    side), 0.0 when neither has spread and a's mean is larger."""
    if a.numel() < 2 or b.numel() < 2:
        return 1.0
    va, vb = float(a.var()) / a.numel(), float(b.var()) / b.numel()
    diff = float(a.mean() - b.mean())
    se = math.sqrt(va + vb)
    if se == 0:
        return 0.0 if diff > 0 else 1.0
    from scipy import stats

    df = (va + vb) ** 2 / ((va**2 / (a.numel() - 1) if va else 0) + (vb**2 / (b.numel() - 1) if vb else 0))
    return float(stats.t.sf(diff / se, df))


@dataclass(frozen=True)
class Separation:
    """Whether a layer's natural references separate from unrelated images (:func:`separation`).

    Attributes:
        separated: both criteria met; the normalized similarity may be used at this layer.
        reason: why not ("" when separated), in the module's wording (starts with
            :data:`REASON_NOT_SEPARATED`).
        gap: N - O (natural_vs_natural - natural_vs_other); NaN without data.
        se: its standard error (``method``); NaN where it cannot be computed.
        lower: the gap's one-sided (1 - alpha) lower confidence bound, gap - z se.
        effect: the standardized gap d = gap / s, s = sqrt((var(n_j) + var(o_k)) / 2) (inf when
            neither group has spread and the gap is positive).
        precision: the gap's relative uncertainty z se / gap (inf where gap <= 0).
        min_effect, precision_limit: the criteria (:class:`VerdictSettings`).
        m, n: references and other images.
        method: ``"jackknife"`` (similarity matrices: delete-one over references and over other
            images) or ``"independent"`` (score vectors: var(n_j) / m + var(o_k) / n).
        references_needed: references that would bring the relative uncertainty to the limit
            at the observed spread (None: not a question of references, or more other images
            are needed).
    """

    separated: bool
    reason: str
    gap: float
    se: float
    lower: float
    effect: float
    precision: float
    min_effect: float
    precision_limit: float
    m: int
    n: int
    method: str
    references_needed: int | None = None

    def to_json(self) -> dict:
        return {
            "separated": self.separated, "reason": self.reason, "gap": json_float(self.gap), "se": json_float(self.se),
            "lower": json_float(self.lower), "effect": json_float(self.effect), "precision": json_float(self.precision),
            "min_effect": self.min_effect, "precision_limit": self.precision_limit, "m": self.m, "n": self.n,
            "method": self.method, "references_needed": self.references_needed,
        }


def _gap_jackknife(rr: torch.Tensor, orr: torch.Tensor) -> tuple[float, float]:
    """Jackknife variance parts of N - O from the matrices ref_ref [m, m] (diagonal ignored) and
    other_ref [n, m]: (from deleting each reference, from deleting each other image).

    N is a U-statistic over reference pairs and O a mean over (other, reference) pairs, so both
    move with the sample of references: var(n_j) / m + var(o_k) / n ignores that (measured on a
    random ResNet-18, 1.5-2.7x too small a standard error). Deleting one reference j changes N to
    (sum - row_j - col_j) / ((m - 1)(m - 2)) and O to (sum - col_j of other_ref) / (n (m - 1));
    deleting one other image changes O only. Needs m >= 3, n >= 2 (closed forms, O(m^2 + nm))."""
    m, n = rr.shape[0], orr.shape[0]
    a = rr * (1 - torch.eye(m, dtype=rr.dtype))
    sa, sb = a.sum(), orr.sum()
    d_ref = (sa - a.sum(1) - a.sum(0)) / ((m - 1) * (m - 2)) - (sb - orr.sum(0)) / (n * (m - 1))
    o_oth = (sb - orr.sum(1)) / ((n - 1) * m)
    v_ref = (m - 1) / m * float(((d_ref - d_ref.mean()) ** 2).sum())
    v_oth = (n - 1) / n * float(((o_oth - o_oth.mean()) ** 2).sum())
    return v_ref, v_oth


def separation(ref_ref, other_ref, settings: VerdictSettings | None = None) -> Separation:
    """The gate before a layer's normalized similarity is used: do the unit's natural references
    separate from unrelated images, by a meaningful and precisely known gap?

    With n_j the references' leave-one-out scores (mean N) and o_k the other images' scores
    (mean O), the gap is D = N - O, the denominator of theta = (F - O) / D. Separated iff

    1. the gap is meaningful: D > 0 and the standardized gap d = D / s >= ``min_separation``
       (default :data:`MIN_SEPARATION` = 0.5), s = sqrt((var(n_j) + var(o_k)) / 2). An effect
       size, not a significance test: it does not shrink with the number of images, so a tiny
       gap between heavily overlapping populations never passes, however many images there are;
    2. the gap is precisely known: z_{1-alpha} se(D) / D <= ``precision_limit`` (default 1 -
       natural_like_margin = 0.2), i.e. its one-sided (1 - alpha) lower bound is at least 80% of
       the estimate. This is the test with its own power: it implies D > 0 at level alpha
       (D / se >= z / 0.2 = 8.2 instead of a bare test's 1.64), it bounds the denominator's share of
       theta's uncertainty (theta x 0.2 at 1 - alpha; theta = 1 cannot be carried across the
       natural-like margin by the natural side alone), and a design that cannot meet it says so
       with the references that would (``references_needed``).

    se(D): the jackknife over references and over other images for similarity matrices (it
    accounts for N being a U-statistic and for O depending on the same references; see
    :func:`_gap_jackknife`), else var(n_j) / m + var(o_k) / n for independent score vectors.

    Args:
        ref_ref: [m, m] reference x reference similarities (diagonal ignored) or [m] scores n_j.
        other_ref: [n, m] other x reference similarities, or [n] scores o_k.
        settings: :class:`VerdictSettings` (alpha, min_separation, precision_limit).

    Known answers: references at 1 and others at 0 without spread separate (d = inf, se 0); a
    gap of 0.01 at spread 0.1 never does (d 0.1), with 10^5 images neither; no references: not
    separated (the reason says how many are needed).
    """
    st = settings or VerdictSettings()
    lim, dmin = st.precision_limit, st.min_separation
    rr = torch.as_tensor(ref_ref, dtype=torch.float64).detach().cpu()
    orr = torch.as_tensor(other_ref, dtype=torch.float64).detach().cpu()
    matrix = rr.dim() == 2
    nj, ok = _vec(rr, "ref_ref", diag=True), _vec(orr, "other_ref")
    m = rr.shape[0] if matrix else nj.numel()
    n = ok.numel()
    need_m = MIN_SEPARATION_REFERENCES if matrix else 2
    nan = math.nan

    def out(sep, reason, gap=nan, se=nan, effect=nan, prec=math.inf, needed=None):
        lower = gap - z_upper(st.alpha) * se if math.isfinite(gap) and math.isfinite(se) else nan
        return Separation(sep, reason, gap, se, lower, effect, prec, dmin, lim, m, n,
                          "jackknife" if matrix else "independent", needed)

    if matrix and orr.dim() == 2 and orr.shape[1] != m:
        raise VerdictError(f"other_ref must be [n, m={m}], got {tuple(orr.shape)}")
    if m < need_m or n < 2:
        return out(False, REASON_SEP_FEW.format(m=m, n=n, need_m=need_m))
    if not (torch.isfinite(nj).all() and torch.isfinite(ok).all()):
        raise VerdictError("separation: non-finite similarities")
    nat, oth = float(nj.mean()), float(ok.mean())
    gap = nat - oth
    var_n, var_o = float(nj.var()), float(ok.var())
    s = math.sqrt((var_n + var_o) / 2)
    if matrix and orr.dim() == 2:
        v_ref, v_oth = _gap_jackknife(rr, orr)
    else:
        v_ref, v_oth = var_n / m, var_o / n
    se = math.sqrt(max(v_ref + v_oth, 0.0))
    if not gap > 0:
        return out(False, REASON_SEP_NONE.format(nat=nat, oth=oth), gap, se, (gap / s) if s > 0 else 0.0)
    effect = gap / s if s > 0 else math.inf
    z = z_upper(st.alpha)
    prec = z * se / gap
    if effect < dmin:
        return out(False, REASON_SEP_EFFECT.format(d=effect, dmin=dmin), gap, se, effect, prec)
    if prec > lim:
        room = (lim * gap / z) ** 2 - v_oth  # variance the references may still contribute
        if room <= 0 or v_ref <= 0:
            return out(False, REASON_SEP_PRECISION_OTHER.format(gap=gap, se=se, prec=prec, limit=lim),
                       gap, se, effect, prec)
        need = max(m + 1, math.ceil(m * v_ref / room - 1e-9))
        reason = REASON_SEP_PRECISION.format(gap=gap, se=se, prec=prec, limit=lim,
                                             need=need if need <= MAX_NEEDED else f"more than {MAX_NEEDED}")
        return out(False, reason, gap, se, effect, prec, need if need <= MAX_NEEDED else None)
    return out(True, "", gap, se, effect, prec)
