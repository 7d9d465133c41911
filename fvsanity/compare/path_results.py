"""The path check's frozen results: :class:`LayerResult`, :class:`Verdict`, :class:`UnitPath`,
:class:`PairedLayer`, :class:`AcrossUnitsLayer` and :class:`PathCheck` (see
:mod:`fvsanity.compare.path`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .path_common import _jf
from .stability import SeedStability
from .verdict import (
    DIVERGES,
    INCONCLUSIVE,
    NATURAL_LIKE,
    ActivationRange,
    UnitVerdict,
)

__all__ = ["LayerResult", "Verdict", "UnitPath", "PairedLayer", "AcrossUnitsLayer", "PathCheck"]


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
