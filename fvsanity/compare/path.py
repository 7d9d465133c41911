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
  the unit's own natural images; NaN (null in JSON, "n/a" in tables) where it has no scale: the
  references do not separate from unrelated images at that layer by a meaningful, precisely
  known gap (:func:`fvsanity.compare.verdict.separation`), or the unit has too few references
  of its own (``status``).

All three are means of single-image-vs-single-image similarities, so they share one scale.
Uncertainty: a bootstrap over images (F, R and O resampled with replacement; self-pairs of R
excluded by original index) gives percentile intervals. Test: a one-sided permutation test
of "FVs are no more similar to R than other images are": items F and O, score of an item = its
mean similarity to R, statistic = mean score of F - mean score of O, labels permuted (exactly,
over all relabellings, when there are at most ``max(n_perm, stats.EXACT_LIMIT = 200 000)``,
e.g. up to 2 FVs among ~600 items; else Monte Carlo, p = (1 + k) / (1 + n_perm)). The permutation p
(Holm across the layers of a unit) is descriptive only: it is not the verdict.

Verdict (:mod:`fvsanity.compare.verdict`): per layer one of three outcomes,
"natural-like", "diverges" or "inconclusive" (with its reason: the smallest attainable p and the
FV seeds needed, references that do not separate, an estimate between the margins, or a test
that is not significant), each claim with its own sign-flip test over the FV seeds (the unit of
replication) against a margin of the normalized similarity; the unit's verdict summarizes its
layers (the outcome at its own layer, the first layer from which its FVs are natural-like).
Across units, per layer, the same test with units as replicates
(:func:`fvsanity.compare.verdict.across_units_verdict`, via :func:`across_units`).

The paired design across units (DESIGN.md 4.2): with >= 4 units, per layer, rows = units,
A = each unit's mean FV activation, B = the mean activation of the same unit's natural
references (rows in the order of the unit names); a metric of the ``paired`` design (debiased
CKA, RSA; not MMD, a set metric that row permutations leave unchanged) compares A and B, a
permutation of B's rows gives the null (chance pairing; every pairing when U! <= n_perm), and
split halves of the natural references (A' = one half,
B' = the other) give the natural-vs-natural reference.

Reference selection (:func:`select_references`, the one function ``fvsanity check`` and
``fvsanity audit`` both use): R = the images of the unit's class (class units of the model's
output layer, labelled images, ``use_class_images``) plus its top-k exemplars; O = up to
``n_other`` images outside R (and, for a class unit, outside its class), drawn at random.
Seeds: every random choice of a unit (its O, bootstrap, permutations, split halves) is seeded by
:func:`unit_seed` from the base seed and the unit's NAME, never its position in the unit list,
so a unit gets the same numbers alone, in any order, and in ``check`` or ``audit``.

Too few references (the rule; :data:`MIN_REFERENCES`, :data:`MIN_OTHER`): a unit's curves
are reported, its normalized similarity is not (NaN / null: it has no scale of the unit's own),
and every layer's outcome is "inconclusive" with the reason ``status`` (which says
why (``"insufficient references: ..."``; else ``"ok"``) when
  * it is a class unit checked with its class images and the natural images hold fewer than 2
    images of its class (its references would be top-k exemplars of other classes),
  * it has fewer than 2 natural references (natural_vs_natural is undefined), or
  * fewer than 2 other images remain (no usable lower reference / permutation pool)).
Such units are left out of the across-units population test.

Statistics (ranks, bootstrap counts and percentile intervals, permutation p, Holm) come from
:mod:`fvsanity.compare.stats`.

The natural images run through the model once for all units (one streamed, batched pass).
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import permutations

import torch

from ..errors import FVSanityError
from ..settings import setting
from .stability import SeedStability, leave_one_seed_out
from .stats import bootstrap_counts, holm, percentile_interval, permutation_pvalue, permutation_test
from .verdict import (
    DIVERGES,
    INCONCLUSIVE,
    NATURAL_LIKE,
    ActivationRange,
    LayerOutcome,
    UnitVerdict,
    VerdictError,
    VerdictSettings,
    across_units_verdict,
    activation_range,
    layer_evidence,
    unit_verdict,
    withhold,
)

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
    "paired_similarity",
    "path_check",
    "PathCheckSettings",
    "unit_layers",
    "fv_activations",
    "unit_path",
    "paired_across_units",
    "order_layers",
    "safe_ratio",
    "References",
    "select_references",
    "unit_seed",
    "split_halves",
    "validate_metrics",
    "MIN_REFERENCES",
    "MIN_OTHER",
]

#: fewest natural references (and, for a class unit, images of its class) a verdict needs
MIN_REFERENCES = 2
#: fewest other natural images (lower reference, permutation pool) a verdict needs
MIN_OTHER = 2


# ----------------------------------------------------------------------------- small helpers
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


# ------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class LayerResult:
    """One layer of one unit's path profile (similarities in the metric's units, e.g. Spearman rho).

    ``ci_low``/``ci_high``: bootstrap interval of ``normalized``; ``p_value``: Holm-adjusted
    permutation p of FV-vs-natural > natural-vs-other, ``p_raw`` before adjustment,
    ``above_baseline`` = p_value <= alpha: descriptive only, NOT the verdict.

    The verdict at this layer (:mod:`fvsanity.compare.verdict`): ``outcome`` one of
    ``verdict.OUTCOMES``; ``reason`` why "inconclusive" ("" otherwise); ``p_natural_like``,
    ``p_diverges`` the claims' adjusted p; ``floor_natural_like``, ``floor_diverges`` the smallest
    adjusted p each claim can reach with these FV seeds; ``needed`` FV seeds that would decide (None: decided, or not a question
    of seeds); ``seed_sd``, ``seed_min``, ``seed_max`` the spread of the per-seed normalized
    similarities (NaN with < 2 seeds).

    ``normalized``, ``ci_low``, ``ci_high`` are NaN (null in JSON) where the normalized
    similarity has no scale: the references do not separate from unrelated images at this layer
    (``separated`` False; ``separation`` the gate's numbers and reason,
    :func:`fvsanity.compare.verdict.separation`) or the unit has too few references of its own.
    ``normalized_raw`` is the ratio as computed, also there: no claim and no scale where it is
    withheld, kept only as an input for detectors (:mod:`fvsanity.compare.detect`'s path
    signals), never shown in tables.
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
    outcome: str = INCONCLUSIVE
    reason: str = ""
    p_natural_like: float = float("nan")
    p_diverges: float = float("nan")
    floor_natural_like: float = float("nan")
    floor_diverges: float = float("nan")
    needed: int | None = None
    seed_sd: float = float("nan")
    seed_min: float = float("nan")
    seed_max: float = float("nan")
    separated: bool = True
    separation: dict | None = None
    normalized_raw: float = float("nan")

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "outcome": self.outcome,
            "reason": self.reason,
            "p_natural_like": _jf(self.p_natural_like),
            "p_diverges": _jf(self.p_diverges),
            "floor_natural_like": _jf(self.floor_natural_like),
            "floor_diverges": _jf(self.floor_diverges),
            "needed": self.needed,
            "seed_spread": {"sd": _jf(self.seed_sd), "min": _jf(self.seed_min), "max": _jf(self.seed_max)},
            "separated": self.separated,
            "separation": self.separation,
            "fv_vs_natural": self.fv_vs_natural,
            "natural_vs_natural": self.natural_vs_natural,
            "natural_vs_other": self.natural_vs_other,
            "normalized": _jf(self.normalized),
            "normalized_raw": _jf(self.normalized_raw),
            "ci_low": _jf(self.ci_low),
            "ci_high": _jf(self.ci_high),
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
    """A unit's verdict (:mod:`fvsanity.compare.verdict`): the outcome at its own layer and counts.

    Attributes:
        outcome: the outcome at the unit's own layer (one of ``verdict.OUTCOMES``).
        label: the one-sentence summary (``verdict.unit_sentence``), e.g. "natural-like at its
            own layer; natural-like from layer3 on (2 of 4 layers)".
        n_layers, n_natural_like, n_diverges, n_inconclusive: counts over the unit's path.
        natural_like_from: first layer from which the FVs are natural-like (None: none).
        alpha: the level of each kind of claim.
        status: ``"ok"``, or ``"insufficient references: <why>"`` (module docstring); then every
            layer is "inconclusive" with that reason.
        unit: the full :class:`~fvsanity.compare.verdict.UnitVerdict` (per-layer evidence).
        stability: leave-one-seed-out agreement
            (:class:`~fvsanity.compare.stability.SeedStability`; None where not computed).
    """

    outcome: str
    label: str
    n_layers: int
    n_natural_like: int
    n_diverges: int
    n_inconclusive: int
    natural_like_from: str | None
    alpha: float
    status: str = "ok"
    unit: UnitVerdict | None = None
    stability: SeedStability | None = None

    @property
    def sufficient(self) -> bool:
        return self.status == "ok"

    @classmethod
    def from_unit(cls, uv: UnitVerdict, status: str = "ok", stability: SeedStability | None = None) -> Verdict:
        return cls(uv.outcome, uv.sentence, len(uv.layers), uv.n_natural_like, uv.n_diverges, uv.n_inconclusive,
                   uv.natural_like_from, uv.settings.alpha, status, uv, stability)

    def to_json(self) -> dict:
        return {
            "outcome": self.outcome,
            "label": self.label,
            "status": self.status,
            "n_layers": self.n_layers,
            "counts": {NATURAL_LIKE: self.n_natural_like, DIVERGES: self.n_diverges,
                       INCONCLUSIVE: self.n_inconclusive},
            "natural_like_from": self.natural_like_from,
            "own_layer_reason": self.unit.own.reason if self.unit is not None and self.unit.own is not None else "",
            "alpha": self.alpha,
            **({} if self.stability is None else {"seed_stability": self.stability.to_json()}),
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
    activation: ActivationRange | None = None

    @property
    def status(self) -> str:
        """``"ok"`` or ``"insufficient references: ..."`` (the verdict's status)."""
        return self.verdict.status

    def to_json(self) -> dict:
        return {
            "unit": self.unit,
            "status": self.status,
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
            "unit_verdict": self.verdict.unit.to_json() if self.verdict.unit is not None else None,
            "activation_range": self.activation.to_json() if self.activation is not None else None,
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
    """The verdict at one layer with the checked units as replicates (each unit one observation).

    ``outcome``/``reason``: :func:`fvsanity.compare.verdict.across_units_verdict` on the units'
    normalized similarities (the same test, outcomes and wording as within a unit; e.g. 6 units
    and Holm over 5 layers: "inconclusive: needs >= 7 units"). ``estimate``: the mean normalized
    similarity over the units, ``ci_low``/``ci_high`` its one-sided bounds; ``median_normalized``
    and ``mean_difference`` (fv_vs_natural - natural_vs_other) are descriptive.
    """

    name: str
    n_units: int
    mean_difference: float
    median_normalized: float
    outcome: str
    reason: str
    estimate: float
    ci_low: float
    ci_high: float
    p_natural_like: float
    p_diverges: float
    needed: int | None = None

    def to_json(self) -> dict:
        def j(v):
            return float(v) if math.isfinite(v) else None

        return {
            "name": self.name,
            "n_units": self.n_units,
            "outcome": self.outcome,
            "reason": self.reason,
            "estimate": j(self.estimate),
            "ci_low": j(self.ci_low),
            "ci_high": j(self.ci_high),
            "p_natural_like": j(self.p_natural_like),
            "p_diverges": j(self.p_diverges),
            "needed": self.needed,
            "mean_difference": j(self.mean_difference),
            "median_normalized": j(self.median_normalized),
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
        from .verdict import OUTCOMES

        labels = {o: sum(u.verdict.outcome == o for u in self.units) for o in OUTCOMES}
        layer_counts = {o: sum(r.outcome == o for u in self.units for r in u.layers) for o in OUTCOMES}
        out = {
            "model": self.model,
            "units": [u.to_json() for u in self.units],
            "summary": {
                "n_units": len(self.units),
                "verdicts": labels,
                "n_insufficient": sum(not u.verdict.sufficient for u in self.units),
                "unit_layers": layer_counts,
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
    metric="spearman",
    n_boot: int = 1000,
    n_perm: int = 1000,
    alpha: float = 0.05,
    confidence: float = 0.95,
    seed: int = 0,
    status: str = "ok",
    verdict_settings: VerdictSettings | None = None,
) -> tuple[tuple[LayerResult, ...], Verdict]:
    """One unit's profile and verdict from pooled activations (no model needed).

    Args:
        fv: {layer: Tensor [S, C]} the unit's FVs (S seeds: the verdict's replicates).
        natural: {layer: Tensor [m, C]} its natural references (m >= 2 for the upper reference).
        other: {layer: Tensor [n, C]} other natural images.
        layers: order of the layers, the unit's own layer last (default: ``fv``'s keys).
        metric: vector-metric name (``fvsanity.compare.similarity``) or callable.
        seed: seeds the bootstrap and permutations (``torch.Generator``).
        status: ``"ok"`` or why the references are insufficient (then every layer is
            "inconclusive" with this reason).
        verdict_settings: :class:`~fvsanity.compare.verdict.VerdictSettings` (default: the
            defaults at level ``alpha``).

    Returns:
        (per-layer results: curves, intervals, descriptive Holm-adjusted permutation p, and the
        layer's outcome; the unit's :class:`Verdict`).
    """
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


# ------------------------------------------------------------------------------ the check
def order_layers(lm, names: Sequence[str]) -> list[str]:
    """``names`` without repeats, in the model's module order (``named_modules``)."""
    order = {n: i for i, (n, _) in enumerate(lm.model.named_modules())}
    return sorted(dict.fromkeys(names), key=lambda n: order.get(n, len(order)))


_order_layers = order_layers  # deprecated private name


def _fv_tensor(fv_images) -> torch.Tensor:
    images = getattr(fv_images, "images", fv_images)
    if not isinstance(images, torch.Tensor):
        raise FVSanityError(f"FVs must be a Tensor [U, S, 3, H, W] or an FVResult, got {type(fv_images).__name__}")
    if images.ndim == 4:
        images = images[:, None]
    if images.ndim != 5 or images.shape[2] != 3:
        raise FVSanityError(f"FV images must have shape [U, S, 3, H, W], got {tuple(images.shape)}")
    return images


@dataclass(frozen=True)
class References:
    """A unit's natural references R and other images O (indices into the natural images).

    Attributes:
        natural: sorted int64 [m] R = class images + top-k exemplars.
        other: sorted int64 [n] O, at most ``n_other`` images outside R (and the unit's class).
        class_indices: int64 [c] the images of the unit's class in R (empty if not a class unit).
        top_k_indices, top_k_values: the unit's top exemplars (highest first) and responses.
        class_index: the unit's class for a class unit with labelled images, else None.
        class_name: its name, when known.
        status: ``"ok"`` or ``"insufficient references: <why>"`` (rule: module docstring).
    """

    natural: torch.Tensor
    other: torch.Tensor
    class_indices: torch.Tensor
    top_k_indices: torch.Tensor
    top_k_values: torch.Tensor
    class_index: int | None
    class_name: str | None
    status: str = "ok"


def select_references(
    lm,
    unit,
    natural,
    responses: torch.Tensor,
    *,
    top_k: int = 10,
    n_other: int = 200,
    use_class_images: bool = True,
    seed: int = 0,
) -> References:
    """The one reference selection of ``check`` and ``audit`` (see the module docstring).

    Args:
        lm: the LoadedModel; unit: a parsed Unit.
        natural: :class:`~fvsanity.data.NaturalImages` (its labels pick a class unit's images).
        responses: [N] the unit's response to every natural image (for the top-k).
        top_k: exemplars added to R (0: class images only); n_other: size of O.
        use_class_images: put the images of a class unit's class in R.
        seed: the BASE seed; O is drawn with :func:`unit_seed` (seed, unit name).

    Returns:
        :class:`References`, with ``status`` saying whether they suffice for a verdict.
    """
    from ..activations import top_k_exemplars

    n_nat = len(natural)
    labels = natural.labels
    has_labels = bool((labels >= 0).any())
    is_class = unit.layer == lm.output_layer and unit.kind == "channel" and has_labels
    empty = torch.empty(0, dtype=torch.long)
    cls_idx = natural.indices_of_class(unit.channel) if (is_class and use_class_images) else empty
    if top_k > 0:
        top_i, top_v = top_k_exemplars(lm, unit, natural, min(int(top_k), n_nat), responses=responses)
    else:
        top_i, top_v = empty, torch.empty(0)
    ref = torch.unique(torch.cat([cls_idx, top_i]))  # sorted
    pool = torch.ones(n_nat, dtype=torch.bool)
    pool[ref] = False
    if is_class:
        pool &= (labels >= 0) & (labels != unit.channel)
    pool_idx = torch.nonzero(pool).flatten()
    if pool_idx.numel() > n_other:
        gen = torch.Generator().manual_seed(unit_seed(seed, unit))
        pool_idx = pool_idx[torch.randperm(pool_idx.numel(), generator=gen)[:n_other]].sort().values
    cname = None
    for names in (natural.class_names, lm.class_names) if is_class else ():
        if names and unit.channel < len(names) and names[unit.channel]:
            cname = names[unit.channel]
            break

    why = []
    if is_class and use_class_images and cls_idx.numel() < MIN_REFERENCES:
        what = f"class {unit.channel}" + (f" ({cname})" if cname else "")
        rest = f"top-{int(top_k)} exemplars only" if top_k > 0 else "no references"
        why.append(f"{cls_idx.numel()} image(s) of {what} in the natural images; {rest}")
    elif ref.numel() < MIN_REFERENCES:
        why.append(f"{ref.numel()} natural reference image(s), need >= {MIN_REFERENCES}")
    if pool_idx.numel() < MIN_OTHER:
        why.append(f"{pool_idx.numel()} other natural image(s), need >= {MIN_OTHER}")
    status = "insufficient references: " + "; ".join(why) if why else "ok"
    return References(ref, pool_idx, cls_idx, top_i, top_v, unit.channel if is_class else None, cname, status)


def validate_metrics(metric: str, paired_metrics: Sequence[str] = ()) -> None:
    """Refuse, with one line, a per-unit ``metric`` outside the unpaired design or a paired
    metric outside the paired design (e.g. ``mmd``). Cheap: call it before any model work."""
    from .similarity import check_design

    check_design(metric, "unpaired")
    for pm in paired_metrics:
        check_design(pm, "paired")


@dataclass(frozen=True)
class PathCheckSettings:
    """Every setting of the path-similarity check that changes its numbers.

    Attributes:
        metric: vector metric for the per-unit curves (``spearman``, ``pearson``, ``cosine``:
            the metrics of the ``unpaired`` design).
        layers: layers to compare (None: ``lm.path_to(unit.layer)`` per unit).
        top_k: exemplars per unit added to its natural references (0: class images only).
        n_other: other natural images per unit (the lower reference and the permutation pool).
        use_class_images: add the images of the unit's class (class units, labelled data).
        n_boot, n_perm, alpha, confidence: bootstrap size, permutations, test level, interval level.
        paired_metrics: representation metrics for the paired design across units (U >= 4;
            metrics of the ``paired`` design).
        seed: base seed; each unit's random choices use :func:`unit_seed` (seed, unit name).
        batch_size: images per forward pass (no effect on the numbers).
    """

    metric: str = setting("spearman", choices=lambda: _metric_choices("unpaired") + _metric_choices("paired"),
                          help="a per-unit (unpaired) metric for the curves (paper: spearman), or a paired-design "
                               "metric compared across >= 4 units, with spearman per unit")
    layers: tuple[str, ...] | None = setting(None, parse="names", default_text="the unit's block path",
                                             help="comma-separated layers to compare")
    top_k: int = setting(10, bounds=(0, None), help="top-k natural exemplars per unit")
    n_other: int = setting(200, bounds=(1, None), help="other natural images per unit")
    use_class_images: bool = setting(True, flag="--no-class-images", help="natural refs = top-k exemplars only")
    n_boot: int = setting(1000, bounds=(0, MAX_RESAMPLES), help="bootstrap resamples (0: no intervals)")
    n_perm: int = setting(1000, bounds=(1, MAX_RESAMPLES), help="image permutations")
    alpha: float = setting(0.05, help="level of each kind of claim (natural-like, diverges) across the layers, in (0, 0.5)")
    confidence: float = 0.95
    paired_metrics: tuple[str, ...] = setting(("cka", "rsa"), choices=lambda: _metric_choices("paired"),
                                              help="paired-design metrics compared across >= 4 units")
    seed: int = setting(0, from_flag="seed")
    batch_size: int = setting(64, bounds=(1, None), help="images per forward pass")

    def __post_init__(self):
        from ..errors import SettingError

        if not (isinstance(self.alpha, (int, float)) and 0 < self.alpha < 0.5):  # the verdict's claims need it
            raise SettingError("alpha", f"must be in (0, 0.5), got {self.alpha!r}")
        object.__setattr__(self, "paired_metrics", tuple(self.paired_metrics))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers) or None)

    @classmethod
    def from_kwargs(cls, settings: PathCheckSettings | None = None, **kw) -> PathCheckSettings:
        """``settings`` (default: the defaults) with the given fields replaced; an unknown name is
        a TypeError naming the valid ones (the old keyword calls of :func:`path_check`)."""
        import dataclasses

        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(kw) - names)
        if bad:
            raise TypeError(f"unknown path-check setting {bad[0]!r}; valid: {', '.join(sorted(names))}")
        return dataclasses.replace(settings or cls(), **kw)

    def to_json(self) -> dict:
        from dataclasses import asdict

        d = asdict(self)
        d["paired_metrics"] = list(self.paired_metrics)
        d["layers"] = list(self.layers) if self.layers else None
        return d


def unit_layers(lm, units, settings: PathCheckSettings) -> tuple[list[list[str]], list[str]]:
    """(each unit's comparison path, their union in forward order)."""
    paths = [list(settings.layers) if settings.layers else lm.path_to(u.layer) for u in units]
    return paths, order_layers(lm, [name for p in paths for name in p])


def fv_activations(lm, fv: torch.Tensor, layers: Sequence[str], batch_size: int = 64, device=None) -> dict[str, torch.Tensor]:
    """Pooled activations of FVs ``fv`` [U, S, 3, H, W] -> {layer: [U, S, C]}.

    One unit at a time (its S FVs in padded batches of ``batch_size``), so a unit's numbers are
    the same whether it is checked alone or beside other units."""
    from ..activations import collect

    per_unit = [collect(lm, fv[u], list(layers), "mean", batch_size, device) for u in range(fv.shape[0])]
    return {k: torch.stack([a[k] for a in per_unit]) for k in per_unit[0]}


def unit_path(
    lm,
    unit,
    fv_acts: dict[str, torch.Tensor],
    nat_acts: dict[str, torch.Tensor],
    responses: torch.Tensor,
    natural,
    layers: Sequence[str],
    settings: PathCheckSettings,
) -> UnitPath:
    """One unit's check: reference selection, per-layer statistics, verdict.

    Args:
        unit: a resolved Unit. fv_acts: {layer: [S, C]} its FVs. nat_acts: {layer: [N, C]} every
        natural image (the natural pass). responses: [N] the unit's responses. layers: its path.
    """
    st = settings
    sel = select_references(lm, unit, natural, responses, top_k=st.top_k, n_other=st.n_other,
                            use_class_images=st.use_class_images, seed=st.seed)
    ref, pool_idx = sel.natural, sel.other
    if sel.status != "ok":
        warnings.warn(f"unit {unit}: {sel.status}; its verdict reads {INCONCLUSIVE!r} at every layer", stacklevel=3)
    res, verdict = compare_path(
        {name: fv_acts[name] for name in layers},
        {name: nat_acts[name][ref] for name in layers},
        {name: nat_acts[name][pool_idx] for name in layers},
        layers, metric=st.metric, n_boot=st.n_boot, n_perm=st.n_perm, alpha=st.alpha,
        confidence=st.confidence, seed=unit_seed(st.seed, unit), status=sel.status,
    )
    S = next(iter(fv_acts.values())).shape[0] if fv_acts else 0
    act = None
    if S and responses.numel():
        from .pipeline import response_from_pooled

        fv_resp = response_from_pooled(fv_acts, unit)  # None: not readable from pooled activations
        if fv_resp is not None:
            act = activation_range(fv_resp, responses)
    return UnitPath(
        unit=str(unit), class_index=sel.class_index, class_name=sel.class_name, n_fv=S,
        natural_indices=tuple(ref.tolist()), n_class_images=int(sel.class_indices.numel()),
        top_k_indices=tuple(sel.top_k_indices.tolist()),
        top_k_values=tuple(float(v) for v in sel.top_k_values),
        n_other=int(pool_idx.numel()), layers=res, verdict=verdict,
        natural_paths=tuple(natural.paths[j] for j in ref.tolist()) if natural.paths else (),
        activation=act,
    )


def paired_across_units(
    units, unit_results: Sequence[UnitPath], fv_acts: dict[str, torch.Tensor], nat_acts: dict[str, torch.Tensor],
    common: Sequence[str], settings: PathCheckSettings,
) -> dict[str, tuple[PairedLayer, ...]]:
    """The paired design across >= 4 units at their ``common`` layers (rows in unit-name order).

    fv_acts: {layer: [U, S, C]}; nat_acts: {layer: [N, C]}. Empty if fewer than 4 units."""
    paired: dict[str, tuple[PairedLayer, ...]] = {}
    if len(units) < 4 or not common:
        return paired
    refs = [torch.tensor(up.natural_indices, dtype=torch.long) for up in unit_results]
    order = sorted(range(len(units)), key=lambda k: str(units[k]))
    fv_means = {name: fv_acts[name][order].mean(1) for name in common}
    nat_means = {name: torch.stack([nat_acts[name][refs[k]].mean(0) for k in order]) for name in common}
    halves = _split_halves(nat_acts, [refs[k] for k in order], common, settings.seed, [units[k] for k in order])
    for pm in settings.paired_metrics:
        paired[pm] = paired_similarity(fv_means, nat_means, halves, common, metric=pm, n_perm=settings.n_perm,
                                       seed=settings.seed)
    return paired


def path_check(
    lm,
    units,
    fv_images,
    natural,
    settings: PathCheckSettings | None = None,
    *,
    device=None,
    progress: bool = False,
    natural_pass=None,
    fv_acts: dict[str, torch.Tensor] | None = None,
    **kwargs,
) -> PathCheck:
    """Run the path-similarity sanity check for several units at once.

    Args:
        lm: a LoadedModel.
        units: Unit objects or spec strings (``"classifier.1:7"``), U of them (strings are
            resolved here, once; Units are used as they are).
        fv_images: Tensor [U, S, 3, H, W] RGB in [0, 1] (S seeds per unit) or an FVResult.
        natural: :class:`~fvsanity.data.NaturalImages` (labels used for class units).
        settings: :class:`PathCheckSettings`; the old keyword arguments (``metric=``, ``top_k=``,
            ``layers=``, ``seed=``, ...) still work and replace its fields.
        device, progress: where to run the forward passes; progress bars.
        natural_pass: a :class:`~fvsanity.compare.pipeline.NaturalPass` made for ``natural`` with
            these units (or the older tuple ({layer: [N, C]}, responses [N, U])); computed here
            if None.
        fv_acts: precomputed {layer: [U, S, C]} pooled FV activations (skips the FV pass).

    Returns:
        :class:`PathCheck`.

    Raises:
        DesignError: a metric outside its design (checked before any forward pass).
    """
    from ..io import provenance
    from .pipeline import NaturalPass, resolve_units
    from .pipeline import natural_pass as make_pass

    st = PathCheckSettings.from_kwargs(settings, **kwargs)
    validate_metrics(st.metric, st.paired_metrics)
    units = resolve_units(units, lm)
    if not units:
        raise FVSanityError("no units to check; pass at least one --unit LAYER:CHANNEL")
    fv = _fv_tensor(fv_images)
    if fv.shape[0] != len(units):
        raise FVSanityError(f"got FVs for {fv.shape[0]} units but {len(units)} units to check")
    paths, union = unit_layers(lm, units, st)
    n_nat = len(natural)
    if n_nat < 2:
        raise FVSanityError(f"need >= 2 natural images, got {n_nat}")

    if natural_pass is None:
        natural_pass = make_pass(lm, natural, union, units, batch_size=st.batch_size, device=device, progress=progress)
    if isinstance(natural_pass, NaturalPass):
        natural_pass.require(union, n_nat)
        if natural_pass.units and [str(u) for u in natural_pass.units] != [str(u) for u in units]:
            natural_pass = natural_pass.for_units(units)
    nat_acts, resp = natural_pass
    U, S = fv.shape[:2]
    if fv_acts is None:
        fv_acts = fv_activations(lm, fv, union, st.batch_size, device)

    unit_results = []
    for i, u in enumerate(units):  # a loop, not a comprehension: warnings point at path_check's caller
        unit_results.append(
            unit_path(lm, u, {name: fv_acts[name][i] for name in paths[i]}, nat_acts, resp[:, i], natural, paths[i], st))
    common = [name for name in union if all(name in p for p in paths)]
    paired = paired_across_units(units, unit_results, fv_acts, nat_acts, common, st)

    settings_json = {
        "metric": st.metric, "layers": union, "top_k": int(st.top_k), "n_other": int(st.n_other),
        "use_class_images": st.use_class_images, "n_boot": st.n_boot, "n_perm": st.n_perm, "alpha": st.alpha,
        "confidence": st.confidence, "paired_metrics": list(paired), "seed": int(st.seed),
        "fv_seeds": list(getattr(fv_images, "seeds", range(S))), "pool": "mean",
        "fv_settings": getattr(fv_images, "settings", None),
    }
    return PathCheck(
        model=lm.name, units=tuple(unit_results), paired=paired, settings=settings_json,
        across_units=across_units(unit_results, st.alpha) if len(unit_results) >= 2 else (),
        data=natural.to_json(), provenance=provenance(),
    )


def split_halves(ref: torch.Tensor, seed: int, unit) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random disjoint halves of one unit's references ``ref`` [m] (sizes m // 2, m - m // 2),
    drawn with ``unit_seed(seed, unit) + 12345``: the same in ``check`` and ``audit``."""
    gen = torch.Generator().manual_seed(unit_seed(seed, unit) + 12345)
    perm = ref[torch.randperm(ref.numel(), generator=gen)]
    return perm[: perm.numel() // 2], perm[perm.numel() // 2 :]


def _split_halves(nat_acts, refs, layers, seed, units):
    """Means of two random disjoint halves of each unit's natural references ({layer: [U, C]} x 2)."""
    h1 = {name: [] for name in layers}
    h2 = {name: [] for name in layers}
    for ref, u in zip(refs, units):
        a, b = split_halves(ref, seed, u)
        for name in layers:
            c = nat_acts[name].shape[1]
            nan = torch.full((c,), float("nan"))
            h1[name].append(nat_acts[name][a].mean(0) if a.numel() else nan)
            h2[name].append(nat_acts[name][b].mean(0) if b.numel() else nan)
    return {n: torch.stack(v) for n, v in h1.items()}, {n: torch.stack(v) for n, v in h2.items()}
