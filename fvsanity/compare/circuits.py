"""Circuit comparison: do FVs reach a unit through the same edges as its natural images?

Given per-image edge scores (:class:`~fvsanity.compare.attribution.EdgeAttribution`) of three
image groups for one unit, FVs, the unit's natural images and other-class natural images, each
layer (module) is compared on its structurally present edges by

``jaccard_top{0p1,1,5}pct``
    Jaccard index (IoU) of the top-k edge sets by |mean score|, k = 0.1%, 1%, 5% of the edges
    (at least 1; exactly-zero scores never enter a top set; two empty sets count as identical;
    ties at the k-th place are broken arbitrarily).
``weighted_jaccard``
    ``sum min(p, q) / sum max(p, q)`` of the normalised |mean score| distributions p, q.
``spearman``
    rank correlation of the signed mean scores (average ranks for ties; 0 if either is constant).
``shared_mass``
    fraction of the FV group's total |score| that falls on the natural group's top-1% edges
    (for identical circuits this is the natural circuit's own top-1% mass, not 1).

The Jaccards and Spearman are 1 for identical circuits; the Jaccards, weighted Jaccard and
shared mass are 0 for circuits on disjoint edges; Spearman is -1 for reversed ranks.

Design (unpaired, size-matched): the natural images are split at random into a group A of size
g and a held-out half B; g = min(#FV, #natural // 2, #other). Every statistic compares a group of
g images against B: FV (subsampled to g) vs B gives ``s``; A vs B gives the same-class null
``same``; g other-class images vs B the unrelated null ``other``. Values are averaged over
``n_splits`` random splits. ``calibrated = (s - other) / (same - other)`` is 0 when FVs travel
like unrelated images and 1 when they travel like the unit's own images. ``ci_low``/``ci_high``
are percentile bootstrap intervals of ``calibrated`` at the caller's ``confidence`` (images
resampled within FV, A, B, other; :func:`fvsanity.compare.stats.percentile_interval`).
``p_value`` is a one-sided permutation test of H0 "FVs are exchangeable with other-class images"
(statistic: s - other for the primary statistic, FV and other labels permuted, on the same
``perm_splits`` fixed splits for the observed and every permuted labelling; p = (1 + k) /
(1 + n_perm), :func:`fvsanity.compare.stats.permutation_pvalue`), Holm-corrected across layers
(``p_holm``). A small p means the FV circuit is closer to the natural circuit than unrelated
images' circuits are. Rank correlations are :func:`fvsanity.compare.similarity.spearman` and
top-k overlaps :func:`fvsanity.compare.similarity.jaccard` (the one implementation of each).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .attribution import AttributionError, AttributionSettings, EdgeAttribution, edge_attribution
from .similarity import jaccard
from .similarity import spearman as _vector_spearman
from .stats import holm, percentile_interval, permutation_pvalue

__all__ = [
    "FRACTIONS",
    "STATISTICS",
    "LayerOverlap",
    "CircuitOverlap",
    "CircuitStatsSettings",
    "top_k_jaccard",
    "weighted_jaccard",
    "edge_rank_correlation",
    "shared_mass",
    "circuit_stats",
    "compare_circuits",
    "circuit_overlap",
]

FRACTIONS = (0.001, 0.01, 0.05)
_FRAC_NAMES = {0.001: "jaccard_top0p1pct", 0.01: "jaccard_top1pct", 0.05: "jaccard_top5pct"}
STATISTICS = ("jaccard_top0p1pct", "jaccard_top1pct", "jaccard_top5pct", "weighted_jaccard", "spearman", "shared_mass")


# ------------------------------------------------------------------------------ statistics
def _k(n_edges: int, frac: float) -> int:
    return max(1, int(math.ceil(frac * n_edges)))


def _top_masks(a: np.ndarray, k: int) -> np.ndarray:
    """[K, E] bool: the top-k edges of every row by |value| (zeros excluded)."""
    mag = np.abs(a)
    mask = np.zeros(a.shape, dtype=bool)
    if k >= a.shape[1]:
        mask[:] = True
    else:
        top = np.argpartition(-mag, k - 1, axis=1)[:, :k]
        np.put_along_axis(mask, top, True, axis=1)
    return mask & (mag > 0)


def _jaccard_many(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """IoU of the top-k sets of every row of a [K, E] with b's [E] (:func:`~.similarity.jaccard`)."""
    ma, mb = _top_masks(a, k), _top_masks(b[None], k)
    return jaccard(torch.from_numpy(ma), torch.from_numpy(mb)).numpy()


def _weighted_jaccard_many(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    pa, pb = np.abs(a), np.abs(b)[None]
    sa, sb = pa.sum(1, keepdims=True), pb.sum(1, keepdims=True)
    p = np.where(sa > 0, pa / np.where(sa > 0, sa, 1.0), 0.0)
    q = np.where(sb > 0, pb / np.where(sb > 0, sb, 1.0), 0.0)
    num, den = np.minimum(p, q).sum(1), np.maximum(p, q).sum(1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)


def _spearman_many(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman of every row of a [K, E] with b [E] (:func:`~.similarity.spearman`, average
    ranks; 0 for a constant row)."""
    ta = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
    tb = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float64))
    return _vector_spearman(ta, tb).numpy()


def _shared_mass_many(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    mb = _top_masks(b[None], k)[0]
    pa = np.abs(a)
    tot = pa.sum(1)
    return np.where(tot > 0, pa[:, mb].sum(1) / np.where(tot > 0, tot, 1.0), 0.0)


def _stat_many(name: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Statistic ``name`` of every row of a [K, E] against b [E] -> [K]."""
    e = b.shape[0]
    if name == "spearman":
        return _spearman_many(a, b)
    if name == "weighted_jaccard":
        return _weighted_jaccard_many(a, b)
    if name == "shared_mass":
        return _shared_mass_many(a, b, _k(e, 0.01))
    for frac, fname in _FRAC_NAMES.items():
        if name == fname:
            return _jaccard_many(a, b, _k(e, frac))
    raise AttributionError(f"unknown circuit statistic {name!r}; valid: {', '.join(STATISTICS)}")


def _vec(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def top_k_jaccard(a, b, k: int) -> float:
    """IoU of the top-k |value| index sets of a and b (flattened; zeros never selected)."""
    return float(_jaccard_many(_vec(a)[None], _vec(b), k)[0])


def weighted_jaccard(a, b) -> float:
    """``sum min(p, q) / sum max(p, q)`` of the normalised |a|, |b| (1 if both are all zero)."""
    return float(_weighted_jaccard_many(_vec(a)[None], _vec(b))[0])


def edge_rank_correlation(a, b) -> float:
    """Spearman rank correlation of two edge-score vectors, flattened (average ranks): a float;
    0.0 when either is constant, NaN when either holds NaN. The circuit statistic
    ``"spearman"``: the vector metric :func:`fvsanity.compare.similarity.spearman` of the two
    flattened vectors, returned as a float."""
    return float(_spearman_many(_vec(a)[None], _vec(b))[0])


spearman = edge_rank_correlation  # deprecated name: one name per concept


def shared_mass(fv, natural, frac: float = 0.01) -> float:
    """Fraction of sum |fv| on the top-``frac`` edges of ``natural`` (0 if fv is all zero)."""
    b = _vec(natural)
    return float(_shared_mass_many(_vec(fv)[None], b, _k(b.shape[0], frac))[0])


def circuit_stats(a, b, mask=None) -> dict[str, float]:
    """Every statistic of :data:`STATISTICS` for two score tensors of the same shape.

    ``mask`` (bool, same shape) keeps the structurally present edges only. ``shared_mass`` is the
    mass of ``a`` on ``b``'s top 1%.
    """
    a, b = _vec(a), _vec(b)
    if a.shape != b.shape:
        raise AttributionError(f"score tensors differ in size: {a.shape[0]} vs {b.shape[0]} edges")
    if mask is not None:
        m = _vec(mask).astype(bool)
        a, b = a[m], b[m]
    return {s: float(_stat_many(s, a[None], b)[0]) for s in STATISTICS}


# ------------------------------------------------------------------------------ results
def _f(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class LayerOverlap:
    """FV-vs-natural circuit overlap of one layer (module) with its nulls.

    ``fv_vs_natural``, ``null_same``, ``null_other``: {statistic: value}, split-averaged (see the
    module docstring); ``primary`` names the statistic behind ``calibrated``, the CI and p.
    """

    name: str
    kind: str
    n_edges: int
    group_size: int
    primary: str
    fv_vs_natural: dict
    null_same: dict
    null_other: dict
    calibrated: float
    ci_low: float
    ci_high: float
    fv_ci_low: float
    fv_ci_high: float
    p_value: float
    p_holm: float = float("nan")

    def to_json(self) -> dict:
        d = {"name": self.name, "kind": self.kind, "n_edges": self.n_edges, "group_size": self.group_size}
        d.update({k: _f(v) for k, v in self.fv_vs_natural.items()})
        d.update(
            primary=self.primary,
            null_same=_f(self.null_same[self.primary]),
            null_other=_f(self.null_other[self.primary]),
            calibrated=_f(self.calibrated),
            ci_low=_f(self.ci_low),
            ci_high=_f(self.ci_high),
            fv_ci=[_f(self.fv_ci_low), _f(self.fv_ci_high)],
            p_value=_f(self.p_value),
            p_holm=_f(self.p_holm),
            nulls={
                "same": {k: _f(v) for k, v in self.null_same.items()},
                "other": {k: _f(v) for k, v in self.null_other.items()},
            },
        )
        return d

    @classmethod
    def from_json(cls, d: dict) -> LayerOverlap:
        """Inverse of :meth:`to_json` (null -> NaN)."""

        def num(x):
            return float("nan") if x is None else float(x)

        return cls(
            name=d["name"], kind=d["kind"], n_edges=int(d["n_edges"]), group_size=int(d["group_size"]),
            primary=d["primary"],
            fv_vs_natural={k: num(d[k]) for k in STATISTICS},
            null_same={k: num(v) for k, v in d["nulls"]["same"].items()},
            null_other={k: num(v) for k, v in d["nulls"]["other"].items()},
            calibrated=num(d["calibrated"]), ci_low=num(d["ci_low"]), ci_high=num(d["ci_high"]),
            fv_ci_low=num(d["fv_ci"][0]), fv_ci_high=num(d["fv_ci"][1]),
            p_value=num(d["p_value"]), p_holm=num(d["p_holm"]),
        )


@dataclass(frozen=True)
class CircuitOverlap:
    """Per-layer FV-vs-natural circuit overlap for one unit.

    ``fv``, ``natural``, ``other``: the underlying :class:`EdgeAttribution` (for figures).
    """

    unit: str
    method: str
    reference: str
    steps: int
    primary: str
    n_fv: int
    n_natural: int
    n_other: int
    layers: tuple[LayerOverlap, ...]
    settings: dict
    alpha: float = 0.05
    fv: EdgeAttribution | None = field(default=None, compare=False, repr=False)
    natural: EdgeAttribution | None = field(default=None, compare=False, repr=False)
    other: EdgeAttribution | None = field(default=None, compare=False, repr=False)

    def summary(self) -> dict:
        """Layer counts: significantly above the unrelated null (Holm), and the mean calibrated score."""
        cal = [la.calibrated for la in self.layers if math.isfinite(la.calibrated)]
        sig = [la.name for la in self.layers if math.isfinite(la.p_holm) and la.p_holm < self.alpha]
        n = len(self.layers)
        return {
            "n_layers": n,
            "n_layers_above_other": len(sig),
            "fraction_not_above_other": (n - len(sig)) / n if n else None,
            "mean_calibrated": _f(np.mean(cal)) if cal else None,
            "median_calibrated": _f(np.median(cal)) if cal else None,
            "layers_above_other": sig,
        }

    def to_json(self) -> dict:
        return {
            "unit": self.unit,
            "method": self.method,
            "reference": self.reference,
            "steps": self.steps,
            "primary": self.primary,
            "alpha": self.alpha,
            "n_fv": self.n_fv,
            "n_natural": self.n_natural,
            "n_other": self.n_other,
            "metric": {
                name: _f(ea.metric_clean.mean()) if ea is not None else None
                for name, ea in (("fv", self.fv), ("natural", self.natural), ("other", self.other))
            },
            "summary": self.summary(),
            "layers": [la.to_json() for la in self.layers],
            "settings": self.settings,
        }

    @classmethod
    def from_json(cls, d: dict) -> CircuitOverlap:
        """Inverse of :meth:`to_json`, without the attributions (``fv``/``natural``/``other`` None)."""
        return cls(
            unit=d["unit"], method=d["method"], reference=d["reference"], steps=int(d["steps"]),
            primary=d["primary"], n_fv=int(d["n_fv"]), n_natural=int(d["n_natural"]),
            n_other=int(d["n_other"]), layers=tuple(LayerOverlap.from_json(la) for la in d["layers"]),
            settings=dict(d.get("settings", {})), alpha=float(d.get("alpha", 0.05)),
        )


# ------------------------------------------------------------------------------ comparison
@dataclass(frozen=True)
class CircuitStatsSettings:
    """The statistics of :func:`compare_circuits` / :func:`circuit_overlap`.

    Attributes:
        primary: statistic behind calibrated / CI / p ("spearman"; see :data:`STATISTICS`).
        n_splits: random splits of the natural images into halves A and B, averaged.
        n_boot: bootstrap replicates. n_perm: permutations of FV and other labels.
        perm_splits: the splits each permutation statistic averages over. With L layers, Holm
            can only reach ``alpha`` if ``L / (n_perm + 1) < alpha``.
        alpha: level of the per-layer claims (Holm across layers).
        confidence: level of the percentile bootstrap intervals (``ci_low``/``ci_high``, ``fv_ci``).
    """

    primary: str = "spearman"
    n_splits: int = 20
    n_boot: int = 200
    n_perm: int = 1000
    perm_splits: int = 1
    alpha: float = 0.05
    confidence: float = 0.95

    @classmethod
    def from_kwargs(cls, stats: CircuitStatsSettings | None = None, **kw) -> CircuitStatsSettings:
        """``stats`` (default: the defaults) with the given fields replaced; an unknown name is a
        TypeError naming the valid ones (the keyword calls of :func:`compare_circuits`)."""
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(kw) - names)
        if bad:
            raise TypeError(f"unknown circuit statistics setting {bad[0]!r}; valid: {', '.join(sorted(names))}")
        return dataclasses.replace(stats or cls(), **kw)


def _rng(generator: torch.Generator | int | None) -> np.random.Generator:
    if isinstance(generator, int):
        return np.random.default_rng(generator)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))


def _subsample(rng: np.random.Generator, x: np.ndarray, size: int) -> np.ndarray:
    """``size`` rows (or entries) of x drawn without replacement (all of x if it is not larger)."""
    return x[rng.choice(x.shape[0], size, replace=False)] if x.shape[0] > size else x


def _calibrated(s: float, same: float, other: float) -> float:
    """(s - other) / (same - other): 0 = like other images, 1 = like the unit's own; NaN when
    the two nulls coincide."""
    den = same - other
    return (s - other) / den if abs(den) > 1e-12 else float("nan")


def _split_means(fv, nat, oth, splits, g: int, rng: np.random.Generator) -> dict[str, dict[str, float]]:
    """Every statistic of FV, same-class half A and other images against half B, averaged over
    the splits: ``{"fv" | "same" | "other": {statistic: mean}}``."""
    vals = {k: {s: [] for s in STATISTICS} for k in ("fv", "same", "other")}
    for a_idx, b_idx in splits:
        b = nat[b_idx].mean(0)
        rows = np.stack([_subsample(rng, fv, g).mean(0), nat[a_idx].mean(0), _subsample(rng, oth, g).mean(0)])
        for s in STATISTICS:
            r = _stat_many(s, rows, b)
            for i, key in enumerate(("fv", "same", "other")):
                vals[key][s].append(r[i])
    return {k: {s: float(np.mean(v)) for s, v in d.items()} for k, d in vals.items()}


def _bootstrap(fv, nat, oth, g: int, rng: np.random.Generator, st: CircuitStatsSettings):
    """Percentile intervals of the calibrated and the raw primary statistic: images resampled
    within FV, A, B and other (after the split, so A and B stay disjoint)."""
    s_n, n_n, m_n = fv.shape[0], nat.shape[0], oth.shape[0]
    boot_cal, boot_s = [], []
    for _ in range(st.n_boot):
        perm = rng.permutation(n_n)
        a_idx, b_idx = perm[:g], perm[g:]
        b = nat[rng.choice(b_idx, b_idx.size)].mean(0)
        rows = np.stack(
            [
                fv[rng.choice(s_n, g)].mean(0),
                nat[rng.choice(a_idx, g)].mean(0),
                oth[rng.choice(m_n, g)].mean(0),
            ]
        )
        r = _stat_many(st.primary, rows, b)
        boot_s.append(r[0])
        boot_cal.append(_calibrated(r[0], r[1], r[2]))
    ci = percentile_interval(torch.tensor(boot_cal, dtype=torch.float64), st.confidence)
    fv_ci = percentile_interval(torch.tensor(boot_s, dtype=torch.float64), st.confidence)
    return ci, fv_ci


def _permutation_p(fv, nat, oth, splits, g: int, rng: np.random.Generator, st: CircuitStatsSettings) -> float:
    """Permutation p of s - other (FV and other labels exchangeable under H0), on the first
    ``perm_splits`` fixed splits; the observed statistic is computed the same way (label set 0)."""
    s_n, m_n = fv.shape[0], oth.shape[0]
    pool = np.concatenate([fv, oth])
    labels = [np.arange(s_n + m_n)] + [rng.permutation(s_n + m_n) for _ in range(st.n_perm)]
    used = splits[: max(1, min(st.perm_splits, len(splits)))]
    diffs = np.zeros((len(labels), len(used)))
    for j, (_, b_idx) in enumerate(used):
        b = nat[b_idx].mean(0)
        rows = []
        for lab in labels:
            f_idx, o_idx = lab[:s_n], lab[s_n:]
            rows.append(pool[_subsample(rng, f_idx, g)].mean(0))
            rows.append(pool[_subsample(rng, o_idx, g)].mean(0))
        r = _stat_many(st.primary, np.stack(rows), b)
        diffs[:, j] = r[0::2] - r[1::2]
    t = torch.from_numpy(diffs.mean(1))
    return float(permutation_pvalue(t[0], t[1:], "greater"))


def _layer_overlap(
    name: str,
    kind: str,
    fv: np.ndarray,
    nat: np.ndarray,
    oth: np.ndarray,
    rng: np.random.Generator,
    st: CircuitStatsSettings,
) -> LayerOverlap:
    """fv [S, E], nat [N, E], oth [M, E] per-image scores of the present edges."""
    s_n, n_n, m_n = fv.shape[0], nat.shape[0], oth.shape[0]
    g = min(s_n, n_n // 2, m_n)
    splits = []
    for _ in range(st.n_splits):
        perm = rng.permutation(n_n)
        splits.append((perm[:g], perm[g:]))
    mean = _split_means(fv, nat, oth, splits, g, rng)
    primary = st.primary
    cal = _calibrated(mean["fv"][primary], mean["same"][primary], mean["other"][primary])
    ci, fv_ci = _bootstrap(fv, nat, oth, g, rng, st)
    p = _permutation_p(fv, nat, oth, splits, g, rng, st)
    return LayerOverlap(
        name=name,
        kind=kind,
        n_edges=int(fv.shape[1]),
        group_size=g,
        primary=primary,
        fv_vs_natural=mean["fv"],
        null_same=mean["same"],
        null_other=mean["other"],
        calibrated=cal,
        ci_low=float(ci[0]),
        ci_high=float(ci[1]),
        fv_ci_low=float(fv_ci[0]),
        fv_ci_high=float(fv_ci[1]),
        p_value=p,
    )


def compare_circuits(
    fv: EdgeAttribution,
    natural: EdgeAttribution,
    other: EdgeAttribution,
    *,
    stats: CircuitStatsSettings | None = None,
    generator: torch.Generator | int | None = None,
    settings: dict | None = None,
    **options,
) -> CircuitOverlap:
    """Per-layer overlap of three precomputed attributions of the same unit and layers.

    Args:
        fv, natural, other: :class:`~fvsanity.compare.attribution.EdgeAttribution` of the FVs,
            the unit's natural images and unrelated images (same unit and layers).
        stats: :class:`CircuitStatsSettings` (default: its defaults); ``options`` (its field
            names: ``primary``, ``n_splits``, ``n_boot``, ``n_perm``, ``perm_splits``, ``alpha``,
            ``confidence``) replace its fields.
        generator: torch.Generator or int seed for splits, bootstrap and permutations.
        settings: extra entries recorded in the result's ``settings``.

    Needs >= 1 FV image, >= 2 natural images and >= 1 other image (g >= 1).
    """
    st = CircuitStatsSettings.from_kwargs(stats, **options)
    if st.primary not in STATISTICS:
        raise AttributionError(f"unknown primary statistic {st.primary!r}; valid: {', '.join(STATISTICS)}")
    if fv.names != natural.names or fv.names != other.names:
        raise AttributionError("FV, natural and other attributions cover different layers")
    n_nat = natural.metric_clean.shape[0]
    if n_nat < 2:
        raise AttributionError(f"need at least 2 natural images for the split-half null, got {n_nat}")
    rng = _rng(generator)
    out = []
    for lf, ln, lo in zip(fv.layers, natural.layers, other.layers, strict=True):
        mask = ln.mask.reshape(-1)

        def flat(lay, mask=mask):
            return lay.scores.reshape(lay.scores.shape[0], -1)[:, mask].double().numpy()

        out.append(_layer_overlap(lf.name, lf.kind, flat(lf), flat(ln), flat(lo), rng, st))
    adj = holm([la.p_value for la in out]).tolist()
    layers = tuple(
        LayerOverlap(**{**la.__dict__, "p_holm": p}) for la, p in zip(out, adj, strict=True)
    )
    return CircuitOverlap(
        unit=str(fv.unit),
        method=fv.method,
        reference=fv.reference,
        steps=fv.steps,
        primary=st.primary,
        n_fv=int(fv.metric_clean.shape[0]),
        n_natural=int(n_nat),
        n_other=int(other.metric_clean.shape[0]),
        layers=layers,
        settings={
            "n_splits": st.n_splits, "n_boot": st.n_boot, "n_perm": st.n_perm, "perm_splits": st.perm_splits,
            "confidence": st.confidence, **(settings or {})
        },
        alpha=st.alpha,
        fv=fv,
        natural=natural,
        other=other,
    )


#: the fields of AttributionSettings that circuit_overlap passes on (the rest are statistics)
_ATTRIBUTION_FIELDS = {f.name for f in dataclasses.fields(AttributionSettings)}


def circuit_overlap(
    lm,
    unit,
    fv_images: torch.Tensor,
    natural_images: torch.Tensor,
    other_images: torch.Tensor,
    *,
    attribution: AttributionSettings | None = None,
    stats: CircuitStatsSettings | None = None,
    generator: torch.Generator | int | None = None,
    seed: int | None = None,
    **options,
) -> CircuitOverlap:
    """FV-vs-natural circuit overlap of ``unit`` per layer, with same-class and other-class nulls.

    Args:
        lm: LoadedModel; unit: spec or Unit.
        fv_images: [S, 3, H, W] FVs of the unit (RGB [0, 1]); natural_images: [N, 3, H, W] the
            unit's natural images (N >= 2); other_images: [M, 3, H, W] unrelated natural images.
        attribution: :class:`~fvsanity.compare.attribution.AttributionSettings` of the three
            attributions (``layers``, ``method``, ``steps``, ``reference``, ``batch_size``, ...;
            the reference is shared by the three groups unless it is "blur").
        stats: :class:`CircuitStatsSettings` (``primary``, ``n_splits``, ``n_boot``, ``n_perm``,
            ``perm_splits``, ``alpha``, ``confidence``).
        generator: torch.Generator or int seed for splits, bootstrap and permutations
            (``seed`` is an alias used when ``generator`` is None; default seed 0).
        options: fields of either settings class by name (``steps=4, n_perm=50``), replacing
            those of ``attribution`` / ``stats``; an unknown name is a TypeError.
    Returns:
        :class:`CircuitOverlap`; ``.to_json()["layers"]`` holds per layer name, jaccard_top1pct,
        spearman, shared_mass, null_same, null_other, calibrated, ci_low, ci_high, p_value, p_holm.
    """
    if generator is None and seed is not None:
        generator = int(seed)
    att = AttributionSettings.from_kwargs(attribution, **{k: v for k, v in options.items() if k in _ATTRIBUTION_FIELDS})
    st = CircuitStatsSettings.from_kwargs(stats, **{k: v for k, v in options.items() if k not in _ATTRIBUTION_FIELDS})
    fv = edge_attribution(lm, unit, fv_images, settings=att)
    nat = edge_attribution(lm, unit, natural_images, settings=att)
    oth = edge_attribution(lm, unit, other_images, settings=att)
    return compare_circuits(fv, nat, oth, stats=st, generator=generator)
