"""The path check's statistics: one unit's curve along its path (:func:`layer_stats`,
:func:`compare_path`), the paired representation similarity (:func:`paired_similarity`) and the
verdict with units as replicates (:func:`across_units`); see :mod:`fvsanity.compare.path`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import permutations

import torch

from ..errors import FVSanityError
from .path_common import _f, _holm, _interval, pairwise, safe_ratio
from .path_results import AcrossUnitsLayer, LayerResult, PairedLayer, UnitPath, Verdict
from .path_settings import PathCheckSettings
from .stability import leave_one_seed_out
from .stats import bootstrap_counts, permutation_pvalue, permutation_test
from .verdict import (
    LayerOutcome,
    VerdictError,
    VerdictSettings,
    across_units_verdict,
    layer_evidence,
    unit_verdict,
    withhold,
)

__all__ = ["layer_stats", "compare_path", "paired_similarity", "across_units"]


def layer_stats(
    s_fr: torch.Tensor,
    s_rr: torch.Tensor,
    s_or: torch.Tensor,
    *,
    n_boot: int = 1000,
    n_perm: int = 1000,
    confidence: float = 0.95,
    generator: torch.Generator | None = None,
) -> dict:
    """The three curves, normalized score, bootstrap intervals and permutation p at one layer.

    Args:
        s_fr: [S, m] similarity of each FV to each natural reference.
        s_rr: [m, m] similarity among the natural references (diagonal ignored).
        s_or: [n, m] similarity of each other image to each natural reference.
        n_boot: bootstrap resamples (F, R, O resampled independently).
        n_perm: label permutations of F vs O.
        confidence: level of the percentile intervals.

    Returns:
        dict with fv_vs_natural, natural_vs_natural, natural_vs_other, normalized, ci_low,
        ci_high (of normalized), *_ci intervals of the three curves, p_raw.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    s_fr, s_rr, s_or = (t.to(torch.float64) for t in (s_fr, s_rr, s_or))
    S, m = s_fr.shape
    n = s_or.shape[0]
    rr0 = s_rr * (1 - torch.eye(m, dtype=torch.float64))
    fv = s_fr.mean() if S and m else torch.tensor(float("nan"), dtype=torch.float64)
    nat = rr0.sum() / (m * (m - 1)) if m >= 2 else torch.tensor(float("nan"), dtype=torch.float64)
    oth = s_or.mean() if n and m else torch.tensor(float("nan"), dtype=torch.float64)
    norm = safe_ratio(fv - oth, nat - oth)

    nan2 = (float("nan"), float("nan"))
    out = {
        "fv_vs_natural": _f(fv),
        "natural_vs_natural": _f(nat),
        "natural_vs_other": _f(oth),
        "normalized": _f(norm),
        "ci_low": float("nan"),
        "ci_high": float("nan"),
        "fv_vs_natural_ci": nan2,
        "natural_vs_natural_ci": nan2,
        "natural_vs_other_ci": nan2,
        "p_raw": float("nan"),
        "p_exact": False,
    }
    if n_boot > 0 and S and m:
        cf, cr = bootstrap_counts(S, n_boot, gen), bootstrap_counts(m, n_boot, gen)
        fv_b = torch.einsum("bs,sm,bm->b", cf, s_fr, cr) / (cf.sum(1) * cr.sum(1))
        den_rr = cr.sum(1) ** 2 - (cr**2).sum(1)
        nat_b = safe_ratio(torch.einsum("bi,ij,bj->b", cr, rr0, cr), den_rr, eps=0.5)
        out["fv_vs_natural_ci"] = _interval(fv_b, confidence)
        out["natural_vs_natural_ci"] = _interval(nat_b, confidence)
        if n:
            co = bootstrap_counts(n, n_boot, gen)
            oth_b = torch.einsum("bn,nm,bm->b", co, s_or, cr) / (co.sum(1) * cr.sum(1))
            out["natural_vs_other_ci"] = _interval(oth_b, confidence)
            out["ci_low"], out["ci_high"] = _interval(safe_ratio(fv_b - oth_b, nat_b - oth_b), confidence)
    if n_perm > 0 and S and n and m:
        # items F and O, score = mean similarity to R; one-sided: FVs closer to R than others
        res = permutation_test(s_fr.mean(1), s_or.mean(1), n_perm, gen, alternative="greater")
        out["p_raw"], out["p_exact"] = float(res.pvalue), bool(res.exact)
    return out


def _outcome_fields(o: LayerOutcome) -> dict:
    """A layer outcome's fields of :class:`LayerResult` (the spread over the FV seeds and the
    references' separation included)."""
    reps = [v for v in o.evidence.replicates if math.isfinite(v)]
    sd = float(torch.tensor(reps, dtype=torch.float64).std()) if len(reps) >= 2 else float("nan")
    sep = o.evidence.separation
    return {
        "outcome": o.outcome, "reason": o.reason, "p_natural_like": o.p_natural_like_adj,
        "p_diverges": o.p_diverges_adj, "floor_natural_like": o.floor_natural_like,
        "floor_diverges": o.floor_diverges, "needed": o.needed, "seed_sd": sd,
        "seed_min": min(reps) if reps else float("nan"), "seed_max": max(reps) if reps else float("nan"),
        "separated": bool(o.evidence.separated), "separation": sep.to_json() if sep is not None else None,
    }


def _withheld(stats: dict, o: LayerOutcome, status: str) -> dict:
    """:func:`layer_stats`' numbers as shown: the normalized similarity and its interval are NaN
    (null in JSON, "n/a" in tables) where it has no scale, i.e. the layer's references do not
    separate from unrelated images (:func:`fvsanity.compare.verdict.separation`), or the unit has
    too few references of its own (``status`` not ``"ok"``). The three curves stay."""
    raw = {"normalized_raw": stats["normalized"]}
    if status == "ok" and o.evidence.separated:
        return {**stats, **raw}
    nan = float("nan")
    return {**stats, **raw, "normalized": nan, "ci_low": nan, "ci_high": nan}


def compare_path(
    fv: dict[str, torch.Tensor],
    natural: dict[str, torch.Tensor],
    other: dict[str, torch.Tensor],
    layers: Sequence[str] | None = None,
    *,
    status: str = "ok",
    verdict_settings: VerdictSettings | None = None,
    settings: PathCheckSettings | None = None,
    **options,
) -> tuple[tuple[LayerResult, ...], Verdict]:
    """One unit's profile and verdict from pooled activations (no model needed).

    Args:
        fv: {layer: Tensor [S, C]} the unit's FVs (S seeds: the verdict's replicates).
        natural: {layer: Tensor [m, C]} its natural references (m >= 2 for the upper reference).
        other: {layer: Tensor [n, C]} other natural images.
        layers: order of the layers, the unit's own layer last (default: ``fv``'s keys).
        settings: the :class:`~fvsanity.compare.path.PathCheckSettings` whose ``metric``
            (vector-metric name, ``fvsanity.compare.similarity``, or callable), ``n_boot``,
            ``n_perm``, ``alpha``, ``confidence`` and ``seed`` (seeds the bootstrap and
            permutations, ``torch.Generator``) are used; ``options`` replace its fields by name
            (``metric="cosine", n_perm=200``).
        status: ``"ok"`` or why the references are insufficient (then every layer is
            "inconclusive" with this reason).
        verdict_settings: :class:`~fvsanity.compare.verdict.VerdictSettings` (default: the
            defaults at level ``alpha``).

    Returns:
        (per-layer results: curves, intervals, descriptive Holm-adjusted permutation p, and the
        layer's outcome; the unit's :class:`Verdict`).
    """
    st = PathCheckSettings.from_kwargs(settings, **options)
    metric, n_boot, n_perm, alpha, confidence, seed = st.metric, st.n_boot, st.n_perm, st.alpha, st.confidence, st.seed
    layers = list(fv) if layers is None else list(layers)
    vst = verdict_settings or VerdictSettings(alpha=alpha)
    gen = torch.Generator().manual_seed(int(seed))
    vgen = torch.Generator().manual_seed(int(seed) + 1)
    raw, evidence, scores = [], [], []
    for name in layers:
        f, r, o = fv[name].flatten(1), natural[name].flatten(1), other[name].flatten(1)
        s_fr, s_rr, s_or = pairwise(metric, f, r), pairwise(metric, r, r), pairwise(metric, o, r)
        scores.append((s_fr, s_rr, s_or))
        raw.append(layer_stats(s_fr, s_rr, s_or, n_boot=n_boot, n_perm=n_perm, confidence=confidence, generator=gen))
        try:
            evidence.append(layer_evidence(name, s_fr, s_rr, s_or, n_layers=len(layers), settings=vst, generator=vgen))
        except VerdictError:  # too few FVs / references / other images for any evidence
            from .verdict import no_evidence

            evidence.append(no_evidence(name))
    uv = unit_verdict(evidence, settings=vst)
    stability = None
    if status != "ok":
        uv = withhold(uv, status)
    else:
        stability = leave_one_seed_out(layers, scores, uv, vst, seed=int(seed))
    p_adj = _holm([d["p_raw"] for d in raw])
    results = tuple(
        LayerResult(name=name, p_value=q, above_baseline=bool(q <= alpha), **_withheld(d, o, status),
                    **_outcome_fields(o))
        for name, d, q, o in zip(layers, raw, p_adj, uv.layers)
    )
    return results, Verdict.from_unit(uv, status, stability)


def paired_similarity(
    fv_means: dict[str, torch.Tensor],
    natural_means: dict[str, torch.Tensor],
    split_halves: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None,
    layers: Sequence[str] | None = None,
    *,
    metric: str = "cka",
    n_perm: int = 1000,
    seed: int = 0,
) -> tuple[PairedLayer, ...]:
    """Paired design across units, per layer.

    Args:
        fv_means: {layer: Tensor [U, C]} row u = unit u's mean FV activation.
        natural_means: {layer: Tensor [U, C]} row u = mean activation of unit u's natural refs.
        split_halves: ({layer: [U, C]}, {layer: [U, C]}) means of two disjoint halves of each
            unit's natural references (the natural-vs-natural reference), or None.
        metric: representation-metric name (``cka``, ``rsa``, ...).
        n_perm: permutations of B's rows (chance pairing of units) for the null and p; when
            U! <= n_perm every pairing is enumerated (exact p), else n_perm random ones
            (:func:`~fvsanity.compare.stats.permutation_pvalue`).

    Returns:
        one :class:`PairedLayer` per layer. Needs U >= 4 (debiased CKA's minimum).

    Raises:
        DesignError: ``metric`` does not support the paired design (e.g. ``mmd``, a set metric:
            permuting rows does not change it, so p would be 1 whatever the data).
    """
    from .similarity import check_design

    fn = check_design(metric, "paired").fn
    layers = list(fv_means) if layers is None else list(layers)
    gen = torch.Generator().manual_seed(int(seed))
    out = []
    for name in layers:
        a = fv_means[name].flatten(1).to(torch.float64)
        b = natural_means[name].flatten(1).to(torch.float64)
        u = a.shape[0]
        if u < 4:
            raise FVSanityError(f"paired {metric} across units needs >= 4 units, got {u}")
        value = float(fn(a, b))
        exact = math.factorial(u) <= n_perm  # few relabellings: every pairing of the units
        if exact:
            perms = [torch.tensor(q) for q in permutations(range(u))]
        else:
            perms = [torch.randperm(u, generator=gen) for _ in range(n_perm)]
        nulls = torch.tensor([float(fn(a, b[q])) for q in perms], dtype=torch.float64)
        p = float(permutation_pvalue(value, nulls, "greater", exact=exact))
        nulls = nulls[torch.isfinite(nulls)]
        half = float("nan")
        if split_halves is not None:
            h1, h2 = split_halves[0][name].flatten(1), split_halves[1][name].flatten(1)
            ok = torch.isfinite(h1).all(1) & torch.isfinite(h2).all(1)
            if int(ok.sum()) >= 4:
                half = float(fn(h1[ok].to(torch.float64), h2[ok].to(torch.float64)))
        out.append(
            PairedLayer(
                name=name, metric=metric, n_units=u, value=value,
                null_mean=float(nulls.mean()) if nulls.numel() else float("nan"),
                null_high=float(torch.quantile(nulls, 0.95)) if nulls.numel() else float("nan"),
                p_value=p, natural_split_half=half,
            )
        )
    return tuple(out)


def across_units(
    units: Sequence[UnitPath], alpha: float = 0.05, *, settings: VerdictSettings | None = None
) -> tuple[AcrossUnitsLayer, ...]:
    """Per layer (in path order, layers of any unit), the verdict with units as replicates.

    :func:`fvsanity.compare.verdict.across_units_verdict` on each unit's normalized similarity
    per layer (NaN: the unit lacks the layer or its references do not separate; left out there).
    Units whose verdict status is not ``"ok"`` (too few references) are left out. See
    :class:`AcrossUnitsLayer`.
    """
    units = [u for u in units if getattr(getattr(u, "verdict", None), "status", "ok") == "ok"]
    order: list[str] = []
    for u in units:
        order += [r.name for r in u.layers if r.name not in order]
    if not units or not order:
        return ()
    nan = float("nan")
    est = torch.full((len(units), len(order)), nan, dtype=torch.float64)
    diffs: dict[str, list[float]] = {n: [] for n in order}
    for i, u in enumerate(units):
        for r in u.layers:
            est[i, order.index(r.name)] = r.normalized if math.isfinite(r.normalized) else nan
            d = r.fv_vs_natural - r.natural_vs_other
            if math.isfinite(d):
                diffs[r.name].append(d)
    outs = across_units_verdict(order, est, settings=settings or VerdictSettings(alpha=alpha),
                                generator=torch.Generator().manual_seed(0))
    rows = []
    for j, (name, o) in enumerate(zip(order, outs)):
        col = est[:, j][torch.isfinite(est[:, j])]
        med = float(col.sort().values[col.numel() // 2]) if col.numel() else nan
        d = diffs[name]
        e = o.evidence
        rows.append(AcrossUnitsLayer(
            name=name, n_units=int(col.numel()), mean_difference=sum(d) / len(d) if d else nan,
            median_normalized=med, outcome=o.outcome, reason=o.reason, estimate=e.estimate, ci_low=e.ci_low,
            ci_high=e.ci_high, p_natural_like=o.p_natural_like_adj, p_diverges=o.p_diverges_adj, needed=o.needed))
    return tuple(rows)
