"""Path similarity: do a unit's FVs travel through the network like its natural images?

The sanity check of Geirhos et al. (2023, Fig. 5), layer by layer along the unit's path
(default ``lm.path_to(unit.layer)``). Every image is represented at layer l by its spatially
mean-pooled activation vector [C_l]; ``sim`` is a vector metric (default Spearman, the paper's).
For a unit with FVs F (its seeds), natural references R (the images of its class if it is a
class unit and labels exist, plus its top-k exemplars) and other natural images O (other
classes, or random other images):

* ``fv_vs_natural``      mean of sim(f, r) over f in F, r in R
* ``natural_vs_natural`` mean of sim(r, r') over r != r' in R (leave-one-out: never an image
  with itself; the upper reference)
* ``natural_vs_other``   mean of sim(o, r) over o in O, r in R (the lower reference)
* ``normalized``         (fv - other) / (natural - other): 0 = like unrelated images, 1 = like
  the unit's own natural images; NaN (null in JSON) where natural ~ other.

All three are means of single-image-vs-single-image similarities, so they share one scale.
Uncertainty: a bootstrap over images (F, R and O resampled with replacement; self-pairs of R
excluded by original index) gives percentile intervals. Test: a one-sided permutation test
of "FVs are no more similar to R than other images are": items F and O, score of an item = its
mean similarity to R, statistic = mean score of F - mean score of O, labels permuted (exactly,
over all relabellings, when there are few, e.g. up to 2 FVs among ~600 items). Holm
correction across the layers of a unit. Verdict: the fraction of layers whose FV-vs-natural
similarity is NOT above the other-image baseline at level ``alpha`` (Holm-adjusted). With
several units, a population test per layer (Wilcoxon signed-rank across units of
fv_vs_natural - natural_vs_other, Holm across layers) complements the per-unit verdicts.

The paired design across units (DESIGN.md 4.2): with >= 4 units, per layer, rows = units,
A = each unit's mean FV activation, B = the mean activation of the same unit's natural
references; a representation metric (debiased CKA, RSA) compares A and B, a permutation of B's
rows gives the null (chance pairing), and split halves of the natural references (A' = one half,
B' = the other) give the natural-vs-natural reference.

The natural images run through the model once for all units (one streamed, batched pass).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import FVSanityError

__all__ = [
    "LayerResult",
    "Verdict",
    "UnitPath",
    "PairedLayer",
    "PathCheck",
    "AcrossUnitsLayer",
    "across_units",
    "pairwise",
    "layer_stats",
    "compare_path",
    "make_verdict",
    "paired_similarity",
    "path_check",
    "safe_ratio",
]

DIVERGE_LABEL = "diverges from natural images for {k} of {n} layers"
TRAVEL_LABEL = "travels like natural images"


# ----------------------------------------------------------------------------- small helpers
def safe_ratio(num: torch.Tensor | float, den: torch.Tensor | float, eps: float = 1e-6) -> torch.Tensor:
    """num / den where |den| > eps, else NaN (never inf; double-where so no NaN leaks into grads)."""
    num = torch.as_tensor(num, dtype=torch.float64)
    den = torch.as_tensor(den, dtype=torch.float64)
    ok = den.abs() > eps
    safe_den = torch.where(ok, den, torch.ones_like(den))
    return torch.where(ok, num / safe_den, torch.full_like(num / safe_den, float("nan")))


def _metric(name: str):
    """(callable over the last dim / over paired rows, kind) for a registered metric name."""
    from .similarity import metric_info

    info = metric_info(name)
    return info.fn, info.kind


def _holm(p: Sequence[float]) -> list[float]:
    from .stats import holm

    return [float(v) for v in holm(torch.tensor(list(p), dtype=torch.float64))]


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


def _counts(gen: torch.Generator, n_boot: int, n: int) -> torch.Tensor:
    """[n_boot, n] multiplicities of a bootstrap resample of n items (float64)."""
    idx = torch.randint(0, n, (n_boot, n), generator=gen)
    c = torch.zeros(n_boot, n, dtype=torch.float64)
    return c.scatter_add_(1, idx, torch.ones_like(c))


def _interval(x: torch.Tensor, confidence: float) -> tuple[float, float]:
    x = x[torch.isfinite(x)]
    if x.numel() < 2:
        return float("nan"), float("nan")
    q = torch.tensor([(1 - confidence) / 2, 1 - (1 - confidence) / 2], dtype=x.dtype)
    lo, hi = torch.quantile(x, q).tolist()
    return lo, hi


def _f(x) -> float:
    return float(x)


# ------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class LayerResult:
    """One layer of one unit's path profile (similarities in the metric's units, e.g. Spearman rho).

    ``ci_low``/``ci_high``: bootstrap interval of ``normalized``; ``p_value``: Holm-adjusted
    permutation p of FV-vs-natural > natural-vs-other; ``p_raw`` before adjustment.
    """

    name: str
    fv_vs_natural: float
    natural_vs_natural: float
    natural_vs_other: float
    normalized: float
    ci_low: float
    ci_high: float
    p_value: float
    p_raw: float
    above_baseline: bool
    p_exact: bool
    fv_vs_natural_ci: tuple[float, float]
    natural_vs_natural_ci: tuple[float, float]
    natural_vs_other_ci: tuple[float, float]

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "fv_vs_natural": self.fv_vs_natural,
            "natural_vs_natural": self.natural_vs_natural,
            "natural_vs_other": self.natural_vs_other,
            "normalized": self.normalized,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "p_value": self.p_value,
            "p_raw": self.p_raw,
            "above_baseline": self.above_baseline,
            "p_exact": self.p_exact,
            "fv_vs_natural_ci": list(self.fv_vs_natural_ci),
            "natural_vs_natural_ci": list(self.natural_vs_natural_ci),
            "natural_vs_other_ci": list(self.natural_vs_other_ci),
        }


@dataclass(frozen=True)
class Verdict:
    """Per-unit verdict: on how many layers the FVs are not closer to R than other images are."""

    n_layers: int
    n_not_above: int
    fraction_not_above: float
    alpha: float
    label: str
    layers_not_above: tuple[str, ...]

    def to_json(self) -> dict:
        return {
            "label": self.label,
            "n_layers": self.n_layers,
            "n_not_above": self.n_not_above,
            "fraction_not_above": self.fraction_not_above,
            "alpha": self.alpha,
            "layers_not_above": list(self.layers_not_above),
        }


@dataclass(frozen=True)
class UnitPath:
    """The path profile and verdict of one unit."""

    unit: str
    class_index: int | None
    class_name: str | None
    n_fv: int
    natural_indices: tuple[int, ...]
    n_class_images: int
    top_k_indices: tuple[int, ...]
    top_k_values: tuple[float, ...]
    n_other: int
    layers: tuple[LayerResult, ...]
    verdict: Verdict
    natural_paths: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {
            "unit": self.unit,
            "class_index": self.class_index,
            "class_name": self.class_name,
            "n_fv": self.n_fv,
            "n_natural": len(self.natural_indices),
            "n_class_images": self.n_class_images,
            "natural_indices": list(self.natural_indices),
            "natural_paths": list(self.natural_paths[:50]),
            "top_k_indices": list(self.top_k_indices),
            "top_k_values": list(self.top_k_values),
            "n_other": self.n_other,
            "layers": [r.to_json() for r in self.layers],
            "verdict": self.verdict.to_json(),
        }


@dataclass(frozen=True)
class PairedLayer:
    """Paired design across units at one layer: metric(A = FV means, B = natural means)."""

    name: str
    metric: str
    n_units: int
    value: float
    null_mean: float
    null_high: float
    p_value: float
    natural_split_half: float

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "metric": self.metric,
            "n_units": self.n_units,
            "value": self.value,
            "null_mean": self.null_mean,
            "null_high": self.null_high,
            "p_value": self.p_value,
            "natural_split_half": self.natural_split_half,
        }


@dataclass(frozen=True)
class AcrossUnitsLayer:
    """Population test at one layer over the checked units (each unit one observation).

    ``p_value``: one-sided Wilcoxon signed-rank test (exact for <= 50 units without ties) that
    the per-unit differences fv_vs_natural - natural_vs_other are centred above 0; ``p_holm``:
    Holm-adjusted across layers. Complements the per-unit verdicts, whose power is limited by the
    number of FVs per unit.
    """

    name: str
    n_units: int
    mean_difference: float
    median_normalized: float
    n_units_above: int
    p_value: float
    p_holm: float
    above_baseline: bool

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "n_units": self.n_units,
            "mean_difference": self.mean_difference,
            "median_normalized": self.median_normalized,
            "n_units_above": self.n_units_above,
            "p_value": self.p_value,
            "p_holm": self.p_holm,
            "above_baseline": self.above_baseline,
        }


@dataclass(frozen=True)
class PathCheck:
    """Everything ``fvsanity check`` writes to check.json."""

    model: str
    units: tuple[UnitPath, ...]
    paired: dict[str, tuple[PairedLayer, ...]]
    settings: dict
    data: dict
    provenance: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    across_units: tuple[AcrossUnitsLayer, ...] = ()

    def to_json(self) -> dict:
        labels: dict[str, int] = {}
        for u in self.units:
            key = TRAVEL_LABEL if u.verdict.n_not_above == 0 else "diverges"
            labels[key] = labels.get(key, 0) + 1
        out = {
            "model": self.model,
            "units": [u.to_json() for u in self.units],
            "summary": {
                "n_units": len(self.units),
                "verdicts": labels,
                "mean_fraction_not_above": (
                    sum(u.verdict.fraction_not_above for u in self.units) / len(self.units) if self.units else None
                ),
            },
            "across_units": [a.to_json() for a in self.across_units],
            "paired": {k: [p.to_json() for p in v] for k, v in self.paired.items()},
            "settings": self.settings,
            "seeds": {"seed": self.settings.get("seed"), "fv_seeds": self.settings.get("fv_seeds")},
            "data": self.data,
            "versions": self.provenance.get("versions", {}),
            "provenance": self.provenance,
        }
        out.update(self.extra)
        return out


# ------------------------------------------------------------------------------ statistics
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
        cf, cr = _counts(gen, n_boot, S), _counts(gen, n_boot, m)
        fv_b = torch.einsum("bs,sm,bm->b", cf, s_fr, cr) / (cf.sum(1) * cr.sum(1))
        den_rr = cr.sum(1) ** 2 - (cr**2).sum(1)
        nat_b = safe_ratio(torch.einsum("bi,ij,bj->b", cr, rr0, cr), den_rr, eps=0.5)
        out["fv_vs_natural_ci"] = _interval(fv_b, confidence)
        out["natural_vs_natural_ci"] = _interval(nat_b, confidence)
        if n:
            co = _counts(gen, n_boot, n)
            oth_b = torch.einsum("bn,nm,bm->b", co, s_or, cr) / (co.sum(1) * cr.sum(1))
            out["natural_vs_other_ci"] = _interval(oth_b, confidence)
            out["ci_low"], out["ci_high"] = _interval(safe_ratio(fv_b - oth_b, nat_b - oth_b), confidence)
    if n_perm > 0 and S and n and m:
        out["p_raw"], out["p_exact"] = _perm_p(s_fr.mean(1), s_or.mean(1), n_perm, gen)
    return out


def _perm_p(a_f: torch.Tensor, a_o: torch.Tensor, n_perm: int, gen: torch.Generator, exact_limit: int = 200_000) -> tuple[float, bool]:
    """One-sided permutation p of mean(a_f) - mean(a_o) > 0 over relabellings of F and O.

    The statistic is monotone in the sum over the items labelled F (the total is fixed), so p is
    the fraction of S-subsets of the S + n items whose sum reaches the observed one. Exact
    (every subset, the observed one included) when there are <= ``exact_limit`` subsets, else
    Monte Carlo with ``n_perm`` random subsets: (1 + hits) / (1 + n_perm).

    Returns (p, exact).
    """
    S, n = a_f.numel(), a_o.numel()
    a = torch.cat([a_f, a_o]).to(torch.float64)
    obs = a[:S].sum()
    tol = 1e-9 * (1 + a.abs().sum())
    if math.comb(S + n, S) <= exact_limit:
        sums = a[torch.combinations(torch.arange(S + n), r=S)].sum(1) if S > 1 else a
        return float((sums >= obs - tol).double().mean()), True
    hits = done = 0
    chunk = max(1, 2_000_000 // (S + n))
    while done < n_perm:
        b = min(chunk, n_perm - done)
        pick = torch.rand(b, S + n, generator=gen).argsort(1)[:, :S]
        hits += int((a[pick].sum(1) >= obs - tol).sum())
        done += b
    return (1 + hits) / (1 + n_perm), False


def make_verdict(names: Sequence[str], p_adjusted: Sequence[float], alpha: float) -> Verdict:
    """Layers whose adjusted p is not <= ``alpha`` (NaN counts as not above) -> :class:`Verdict`."""
    not_above = tuple(n for n, p in zip(names, p_adjusted) if not (p <= alpha))
    k, n = len(not_above), len(names)
    label = TRAVEL_LABEL if k == 0 else DIVERGE_LABEL.format(k=k, n=n)
    return Verdict(n, k, k / n if n else float("nan"), alpha, label, not_above)


def compare_path(
    fv: dict[str, torch.Tensor],
    natural: dict[str, torch.Tensor],
    other: dict[str, torch.Tensor],
    layers: Sequence[str] | None = None,
    *,
    metric="spearman",
    n_boot: int = 1000,
    n_perm: int = 1000,
    alpha: float = 0.05,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[tuple[LayerResult, ...], Verdict]:
    """One unit's profile from pooled activations (no model needed).

    Args:
        fv: {layer: Tensor [S, C]} the unit's FVs.
        natural: {layer: Tensor [m, C]} its natural references (m >= 2 for the upper reference).
        other: {layer: Tensor [n, C]} other natural images.
        layers: order of the layers (default: ``fv``'s keys).
        metric: vector-metric name (``fvsanity.compare.similarity``) or callable.
        seed: seeds the bootstrap and permutations (``torch.Generator``).

    Returns:
        (per-layer results with Holm-adjusted p, the verdict).
    """
    layers = list(fv) if layers is None else list(layers)
    gen = torch.Generator().manual_seed(int(seed))
    raw = []
    for name in layers:
        f, r, o = fv[name].flatten(1), natural[name].flatten(1), other[name].flatten(1)
        raw.append(
            layer_stats(
                pairwise(metric, f, r), pairwise(metric, r, r), pairwise(metric, o, r),
                n_boot=n_boot, n_perm=n_perm, confidence=confidence, generator=gen,
            )
        )
    p_raw = [d["p_raw"] for d in raw]
    finite = [i for i, p in enumerate(p_raw) if math.isfinite(p)]
    p_adj = [float("nan")] * len(p_raw)
    if finite:
        for i, q in zip(finite, _holm([p_raw[i] for i in finite])):
            p_adj[i] = q
    results = tuple(
        LayerResult(name=name, p_value=q, above_baseline=bool(q <= alpha), **d)
        for name, d, q in zip(layers, raw, p_adj)
    )
    return results, make_verdict(layers, p_adj, alpha)


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
        n_perm: permutations of B's rows (chance pairing of units) for the null and p.

    Returns:
        one :class:`PairedLayer` per layer. Needs U >= 4 (debiased CKA's minimum).
    """
    fn, kind = _metric(metric)
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
        nulls = torch.tensor([float(fn(a, b[torch.randperm(u, generator=gen)])) for _ in range(n_perm)], dtype=torch.float64)
        nulls = nulls[torch.isfinite(nulls)]
        p = (1 + int((nulls >= value - 1e-12).sum())) / (1 + nulls.numel()) if nulls.numel() else float("nan")
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


def across_units(units: Sequence[UnitPath], alpha: float = 0.05) -> tuple[AcrossUnitsLayer, ...]:
    """Per layer (in path order, layers of every unit), a Wilcoxon signed-rank test across units.

    Needs >= 2 units with a finite difference at a layer (else p is NaN). See
    :class:`AcrossUnitsLayer`.
    """
    from scipy import stats

    order: list[str] = []
    for u in units:
        order += [r.name for r in u.layers if r.name not in order]
    rows = []
    for name in order:
        recs = [r for u in units for r in u.layers if r.name == name]
        diffs = [r.fv_vs_natural - r.natural_vs_other for r in recs]
        diffs = [d for d in diffs if math.isfinite(d)]
        norm = sorted(r.normalized for r in recs if math.isfinite(r.normalized))
        p = float("nan")
        if len(diffs) >= 2 and any(d != 0 for d in diffs):
            p = float(stats.wilcoxon(diffs, alternative="greater").pvalue)
        elif len(diffs) >= 2:
            p = 1.0
        rows.append((name, len(diffs), sum(diffs) / len(diffs) if diffs else float("nan"),
                     norm[len(norm) // 2] if norm else float("nan"), sum(r.above_baseline for r in recs), p))
    finite = [i for i, row in enumerate(rows) if math.isfinite(row[5])]
    adj = [float("nan")] * len(rows)
    if finite:
        for i, q in zip(finite, _holm([rows[i][5] for i in finite])):
            adj[i] = q
    return tuple(
        AcrossUnitsLayer(name=n, n_units=k, mean_difference=m, median_normalized=med, n_units_above=a,
                         p_value=p, p_holm=q, above_baseline=bool(q <= alpha))
        for (n, k, m, med, a, p), q in zip(rows, adj)
    )


# ------------------------------------------------------------------------------ the check
def _order_layers(lm, names: Sequence[str]) -> list[str]:
    order = {n: i for i, (n, _) in enumerate(lm.model.named_modules())}
    return sorted(dict.fromkeys(names), key=lambda n: order.get(n, len(order)))


def _fv_tensor(fv_images) -> torch.Tensor:
    images = getattr(fv_images, "images", fv_images)
    if not isinstance(images, torch.Tensor):
        raise FVSanityError(f"FVs must be a Tensor [U, S, 3, H, W] or an FVResult, got {type(fv_images).__name__}")
    if images.ndim == 4:
        images = images[:, None]
    if images.ndim != 5 or images.shape[2] != 3:
        raise FVSanityError(f"FV images must have shape [U, S, 3, H, W], got {tuple(images.shape)}")
    return images


def path_check(
    lm,
    units,
    fv_images,
    natural,
    *,
    metric: str = "spearman",
    layers: Sequence[str] | None = None,
    top_k: int = 10,
    n_other: int = 200,
    use_class_images: bool = True,
    n_boot: int = 1000,
    n_perm: int = 1000,
    alpha: float = 0.05,
    confidence: float = 0.95,
    paired_metrics: Sequence[str] = ("cka", "rsa"),
    seed: int = 0,
    batch_size: int = 64,
    device=None,
    progress: bool = False,
    natural_pass: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None,
) -> PathCheck:
    """Run the path-similarity sanity check for several units at once.

    Args:
        lm: a LoadedModel.
        units: Unit objects or spec strings (``"classifier.1:7"``), U of them.
        fv_images: Tensor [U, S, 3, H, W] RGB in [0, 1] (S seeds per unit) or an FVResult.
        natural: :class:`~fvsanity.data.NaturalImages` (labels used for class units).
        metric: vector metric for the per-unit curves (``spearman``, ``pearson``, ``cosine``).
        layers: layers to compare (default: ``lm.path_to(unit.layer)`` per unit).
        top_k: exemplars per unit added to its natural references (0: class images only).
        n_other: other natural images per unit (the lower reference and the permutation pool).
        use_class_images: add the images of the unit's class (class units, labelled data).
        n_boot, n_perm, alpha, confidence: bootstrap size, permutations, test level, interval level.
        paired_metrics: representation metrics for the paired design across units (U >= 4).
        seed: seeds the choice of other images, bootstrap and permutations.
        natural_pass: precomputed ({layer: [N, C]}, responses [N, U]) for ``natural``.

    Returns:
        :class:`PathCheck`.
    """
    from ..activations import collect, collect_with_responses, top_k_exemplars
    from ..io import provenance
    from ..units import parse_unit

    units = [parse_unit(u, lm) for u in units]
    if not units:
        raise FVSanityError("no units to check; pass at least one --unit LAYER:CHANNEL")
    fv = _fv_tensor(fv_images)
    if fv.shape[0] != len(units):
        raise FVSanityError(f"got FVs for {fv.shape[0]} units but {len(units)} units to check")
    fn, kind = _metric(metric)
    if kind != "vector":
        raise FVSanityError(f"metric {metric!r} is a {kind} metric; the per-unit path check needs a vector metric")
    paths = [list(layers) if layers else lm.path_to(u.layer) for u in units]
    union = _order_layers(lm, [name for p in paths for name in p])
    n_nat = len(natural)
    if n_nat < 2:
        raise FVSanityError(f"need >= 2 natural images, got {n_nat}")

    if natural_pass is None:
        nat_acts, resp = collect_with_responses(lm, natural, union, units, "mean", batch_size, device, progress)
    else:
        nat_acts, resp = natural_pass
    U, S = fv.shape[:2]
    fv_flat = collect(lm, fv.flatten(0, 1), union, "mean", batch_size, device)
    fv_acts = {k: v.view(U, S, -1) for k, v in fv_flat.items()}

    labels = natural.labels
    has_labels = bool((labels >= 0).any())
    unit_results = []
    refs: list[torch.Tensor] = []
    for i, u in enumerate(units):
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + i)
        is_class = u.layer == lm.output_layer and u.kind == "channel" and has_labels
        cls_idx = natural.indices_of_class(u.channel) if (is_class and use_class_images) else torch.empty(0, dtype=torch.long)
        if top_k > 0:
            top_i, top_v = top_k_exemplars(lm, u, natural, min(int(top_k), n_nat), responses=resp[:, i])
        else:
            top_i, top_v = torch.empty(0, dtype=torch.long), torch.empty(0)
        ref = torch.unique(torch.cat([cls_idx, top_i]))  # sorted
        in_ref = torch.zeros(n_nat, dtype=torch.bool)
        in_ref[ref] = True
        pool = ~in_ref
        if is_class:
            pool &= (labels >= 0) & (labels != u.channel)
        pool_idx = torch.nonzero(pool).flatten()
        if pool_idx.numel() > n_other:
            pool_idx = pool_idx[torch.randperm(pool_idx.numel(), generator=gen)[:n_other]].sort().values
        if ref.numel() < 2:
            warnings.warn(f"unit {u}: only {ref.numel()} natural reference image(s); natural_vs_natural is undefined (raise --top-k)", stacklevel=2)
        if pool_idx.numel() == 0:
            warnings.warn(f"unit {u}: no other natural images; natural_vs_other and p are undefined", stacklevel=2)
        refs.append(ref)
        res, verdict = compare_path(
            {name: fv_acts[name][i] for name in paths[i]},
            {name: nat_acts[name][ref] for name in paths[i]},
            {name: nat_acts[name][pool_idx] for name in paths[i]},
            paths[i], metric=metric, n_boot=n_boot, n_perm=n_perm, alpha=alpha,
            confidence=confidence, seed=int(seed) * 1_000_003 + i,
        )
        cname = None
        if is_class and u.channel < len(natural.class_names or lm.class_names):
            cname = (natural.class_names or lm.class_names)[u.channel] or None
        unit_results.append(
            UnitPath(
                unit=str(u), class_index=u.channel if is_class else None, class_name=cname, n_fv=S,
                natural_indices=tuple(ref.tolist()), n_class_images=int(cls_idx.numel()),
                top_k_indices=tuple(top_i.tolist()), top_k_values=tuple(float(v) for v in top_v),
                n_other=int(pool_idx.numel()), layers=res, verdict=verdict,
                natural_paths=tuple(natural.paths[j] for j in ref.tolist()) if natural.paths else (),
            )
        )

    paired: dict[str, tuple[PairedLayer, ...]] = {}
    common = [name for name in union if all(name in p for p in paths)]
    if len(units) >= 4 and common:
        fv_means = {name: fv_acts[name].mean(1) for name in common}
        nat_means = {name: torch.stack([nat_acts[name][r].mean(0) for r in refs]) for name in common}
        halves = _split_halves(nat_acts, refs, common, seed)
        for pm in paired_metrics:
            paired[pm] = paired_similarity(fv_means, nat_means, halves, common, metric=pm, n_perm=n_perm, seed=seed)

    settings = {
        "metric": metric, "layers": union, "top_k": int(top_k), "n_other": int(n_other),
        "use_class_images": use_class_images, "n_boot": n_boot, "n_perm": n_perm, "alpha": alpha,
        "confidence": confidence, "paired_metrics": list(paired), "seed": int(seed),
        "fv_seeds": list(getattr(fv_images, "seeds", range(S))), "pool": "mean",
        "fv_settings": getattr(fv_images, "settings", None),
    }
    return PathCheck(
        model=lm.name, units=tuple(unit_results), paired=paired, settings=settings,
        across_units=across_units(unit_results, alpha) if len(unit_results) >= 2 else (),
        data=natural.to_json(), provenance=provenance(),
    )


def _split_halves(nat_acts, refs, layers, seed):
    """Means of two random disjoint halves of each unit's natural references ({layer: [U, C]} x 2)."""
    gen = torch.Generator().manual_seed(int(seed) + 12345)
    h1 = {name: [] for name in layers}
    h2 = {name: [] for name in layers}
    for ref in refs:
        perm = ref[torch.randperm(ref.numel(), generator=gen)]
        a, b = perm[: perm.numel() // 2], perm[perm.numel() // 2 :]
        for name in layers:
            c = nat_acts[name].shape[1]
            nan = torch.full((c,), float("nan"))
            h1[name].append(nat_acts[name][a].mean(0) if a.numel() else nan)
            h2[name].append(nat_acts[name][b].mean(0) if b.numel() else nan)
    return {n: torch.stack(v) for n, v in h1.items()}, {n: torch.stack(v) for n, v in h2.items()}
