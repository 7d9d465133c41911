"""The verdict's defaults, its one wording of the outcomes and reasons, and
:class:`VerdictSettings` (see :mod:`fvsanity.compare.verdict` for the science)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import FVSanityError

__all__ = [
    "ALPHA",
    "NATURAL_LIKE_MARGIN",
    "DIVERGE_MARGIN",
    "NATURAL_SHARE",
    "MIN_SEPARATION",
    "SEPARATION_PRECISION",
    "MIN_SEPARATION_REFERENCES",
    "POWER",
    "N_PERM",
    "SIGNFLIP_EXACT_LIMIT",
    "MAX_NEEDED",
    "NATURAL_LIKE",
    "DIVERGES",
    "INCONCLUSIVE",
    "OUTCOMES",
    "SEEDS",
    "UNITS",
    "REASON_NO_DATA",
    "REASON_NOT_SEPARATED",
    "REASON_SEP_FEW",
    "REASON_SEP_NONE",
    "REASON_SEP_EFFECT",
    "REASON_SEP_PRECISION",
    "REASON_SEP_PRECISION_OTHER",
    "REASON_FLOOR",
    "REASON_FLOOR_NEVER",
    "REASON_NOT_SIGNIFICANT",
    "REASON_NOT_SIGNIFICANT_MANY",
    "REASON_BETWEEN",
    "REASON_LATER_LAYER",
    "OWN_LAYER_SENTENCE",
    "PATH_FROM_SENTENCE",
    "PATH_NONE_SENTENCE",
    "PATH_DIVERGES_SENTENCE",
    "UNIT_SENTENCE",
    "VerdictError",
    "VerdictSettings",
]

# ------------------------------------------------------------------------------ settings
#: test level of every claim (per kind of claim, across the layers of a path)
ALPHA = 0.05
#: natural-like when the normalized similarity's lower bound is above this. 0.8 = the FVs keep
#: at least 80% of the gap between unrelated-image and natural-to-natural similarity: the
#: conventional 80% equivalence bound (e.g. the 0.80 bioequivalence limit), strict enough that
#: an FV halfway between unrelated and natural images is never called natural-like.
NATURAL_LIKE_MARGIN = 0.8
#: diverges when the normalized similarity's upper bound is below this. 0.5 = the midpoint of
#: the two reference populations (unrelated images at 0, the unit's own natural images at 1):
#: below it the FVs are significantly closer to unrelated images than to the unit's own
#: natural images, the paper's divergence claim on a scale-free boundary. Between 0.5 and 0.8 the
#: FVs are partly natural: neither claim is made however many seeds (REASON_BETWEEN).
DIVERGE_MARGIN = 0.5
#: how the natural side's uncertainty (N and O are estimated from m + n images) enters a unit's
#: tests. 0 (default, "inflate"): its variance, var(n_j) / m and var(o_k) / n, is added to the
#: sign-flip distribution of the seeds' mean (the observed contrast is shrunk by
#: sqrt(V / (V + var)), V the sign-flip variance): close to nominal, the floor stays 2^-S.
#: A share s in (0, 1) ("bound"): the natural-side threshold is taken at its (1 - s alpha)
#: confidence bound and the exact sign-flip test runs at (1 - s) alpha; valid by the union bound
#: whatever the distributions, but conservative (measured: about 1% instead of 5% at the margin,
#: half the power on healthy units with 8 seeds).
NATURAL_SHARE = 0.0
#: the references' separation from unrelated images (:func:`separation`), a gate before the
#: normalized similarity is used at a layer. Its smallest standardized gap d = (N - O) / s, s the
#: root mean of the two groups' variances of per-image scores (n_j, o_k): 0.5, Cohen's "medium"
#: effect. Below it the unit's natural images and unrelated images overlap so much (under
#: normality a reference outscores an unrelated image in fewer than 64% of pairs) that one
#: natural image of the unit itself spreads by more than 2 (1 / d) on the normalized scale: the
#: 0-1 scale is finer than the natural images' own variation and its margins mean nothing.
MIN_SEPARATION = 0.5
#: the gap's largest relative uncertainty, z_{1-alpha} se(N - O) / (N - O) (``None``: 1 -
#: natural_like_margin, i.e. 0.2). The denominator's (1 - alpha) uncertainty alone moves a
#: normalized similarity theta by theta times this; at theta = 1 (a perfectly natural FV) by at
#: most the distance to the natural-like margin, so a natural-like claim stays attainable and a
#: claim is never made on a scale known only to within a factor.
SEPARATION_PRECISION = None
#: fewest references the gap's uncertainty can be measured with (the jackknife leaves one out)
MIN_SEPARATION_REFERENCES = 3
#: power for the "about N seeds would decide" estimate
POWER = 0.8
#: random sign patterns when there are too many to enumerate
N_PERM = 10_000
#: enumerate every sign pattern when 2^n is at most this (n <= 16)
SIGNFLIP_EXACT_LIMIT = 1 << 16
#: "needs >= N" estimates are capped here (above it: "more than N")
MAX_NEEDED = 10_000

# ------------------------------------------------------------------------------ wording
# The one wording of the outcomes: check, audit, the fooling closed loop, tables and report use
# these constants (and unit_sentence), never their own strings.
NATURAL_LIKE = "natural-like"
DIVERGES = "diverges"
INCONCLUSIVE = "inconclusive"
OUTCOMES = (NATURAL_LIKE, DIVERGES, INCONCLUSIVE)
#: replicate names in reasons ("needs >= 5 FV seeds", "needs >= 7 units")
SEEDS = "FV seeds"
UNITS = "units"

REASON_NO_DATA = "no {what}"
REASON_NOT_SEPARATED = "references do not separate from unrelated images"
REASON_SEP_FEW = (REASON_NOT_SEPARATED + " ({m} references, {n} other images: too few to measure the gap; "
                  "needs >= {need_m} and >= 2)")
REASON_SEP_NONE = REASON_NOT_SEPARATED + " (natural vs natural {nat:.3g} <= natural vs other {oth:.3g})"
REASON_SEP_EFFECT = REASON_NOT_SEPARATED + " (standardized gap {d:.2f} < {dmin:g})"
REASON_SEP_PRECISION = (REASON_NOT_SEPARATED + " precisely enough (gap {gap:.3g}, standard error {se:.2g}: relative "
                        "uncertainty {prec:.2f} > {limit:g}; about {need} references would do)")
REASON_SEP_PRECISION_OTHER = (REASON_NOT_SEPARATED + " precisely enough (gap {gap:.3g}, standard error {se:.2g}: "
                              "relative uncertainty {prec:.2f} > {limit:g}; needs more other images)")

REASON_FLOOR = "needs >= {need} {what} (smallest attainable p {floor:.3g} > alpha {alpha:g})"
REASON_FLOOR_NEVER = "cannot reach alpha {alpha:g} with {n_perm} random sign patterns"
REASON_NOT_SIGNIFICANT = "not significant (p {p:.3g}); about {need} {what} would decide"
REASON_NOT_SIGNIFICANT_MANY = "not significant (p {p:.3g}); more than {need} {what} would be needed"
REASON_BETWEEN = "normalized similarity {est:.2f} between the margins {lo:g} and {hi:g}"
REASON_LATER_LAYER = "natural-like alone (p {p:.3g}) but not every later layer is"

OWN_LAYER_SENTENCE = {
    NATURAL_LIKE: "natural-like at its own layer",
    DIVERGES: "diverges at its own layer",
    INCONCLUSIVE: "inconclusive at its own layer ({reason})",
}
PATH_FROM_SENTENCE = "natural-like from {layer} on ({k} of {n} layers)"
PATH_NONE_SENTENCE = "natural-like at no layer"
PATH_DIVERGES_SENTENCE = "diverges at {k} of {n} layers"
UNIT_SENTENCE = "{own}; {path}"


class VerdictError(FVSanityError, ValueError):
    """Bad input to the verdict (shape, setting); the message is one line."""


@dataclass(frozen=True)
class VerdictSettings:
    """The verdict's settings (defaults: the module constants, see their comments).

    Attributes:
        alpha: level of each kind of claim, in (0, 0.5).
        natural_like_margin: lower margin of the normalized similarity for "natural-like".
        diverge_margin: upper margin for "diverges" (<= natural_like_margin).
        natural_share: share of alpha spent on the natural side's uncertainty, in [0, 1).
        power: power assumed in the "about N would decide" estimate, in (0, 1).
        n_signflips: random sign patterns when 2^n > ``exact_limit`` (not the path check's
            ``n_perm`` permutations of images).
        exact_limit: enumerate every sign pattern up to this many.
        min_separation: smallest standardized gap (N - O) / s of the references over unrelated
            images (:func:`separation`), >= 0.
        separation_precision: largest relative uncertainty z_{1-alpha} se(N - O) / (N - O) of
            the gap, in (0, 1]; None: 1 - natural_like_margin (see :attr:`precision_limit`).
    """

    alpha: float = ALPHA
    natural_like_margin: float = NATURAL_LIKE_MARGIN
    diverge_margin: float = DIVERGE_MARGIN
    natural_share: float = NATURAL_SHARE
    power: float = POWER
    n_signflips: int = N_PERM
    exact_limit: int = SIGNFLIP_EXACT_LIMIT
    min_separation: float = MIN_SEPARATION
    separation_precision: float | None = SEPARATION_PRECISION

    @property
    def precision_limit(self) -> float:
        """The gap's largest relative uncertainty: ``separation_precision``, or 1 -
        natural_like_margin when that is None."""
        sp = self.separation_precision
        return sp if sp is not None else round(1 - self.natural_like_margin, 12)

    def __post_init__(self):
        if not (isinstance(self.alpha, (int, float)) and 0 < self.alpha < 0.5):
            raise VerdictError(f"alpha must be in (0, 0.5), got {self.alpha!r}")
        for name in ("natural_like_margin", "diverge_margin"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise VerdictError(f"{name} must be a finite number, got {v!r}")
        if self.diverge_margin > self.natural_like_margin:
            raise VerdictError(
                f"diverge_margin {self.diverge_margin!r} must be <= natural_like_margin {self.natural_like_margin!r}"
            )
        if not (isinstance(self.natural_share, (int, float)) and 0 <= self.natural_share < 1):
            raise VerdictError(f"natural_share must be in [0, 1), got {self.natural_share!r}")
        if not (isinstance(self.power, (int, float)) and 0 < self.power < 1):
            raise VerdictError(f"power must be in (0, 1), got {self.power!r}")
        if not (isinstance(self.n_signflips, int) and self.n_signflips >= 1):
            raise VerdictError(f"n_signflips must be an int >= 1, got {self.n_signflips!r}")
        if not (isinstance(self.exact_limit, int) and self.exact_limit >= 1):
            raise VerdictError(f"exact_limit must be an int >= 1, got {self.exact_limit!r}")
        if not (isinstance(self.min_separation, (int, float)) and math.isfinite(self.min_separation)
                and self.min_separation >= 0):
            raise VerdictError(f"min_separation must be a finite number >= 0, got {self.min_separation!r}")
        sp = self.separation_precision
        if sp is not None and not (isinstance(sp, (int, float)) and 0 < sp <= 1):
            raise VerdictError(f"separation_precision must be in (0, 1] or None, got {sp!r}")
        if sp is None and not 0 < self.precision_limit <= 1:
            raise VerdictError(
                f"natural_like_margin {self.natural_like_margin!r} leaves no separation precision (1 - margin "
                "must be in (0, 1]); set separation_precision"
            )

    def to_json(self) -> dict:
        return {
            "alpha": self.alpha,
            "natural_like_margin": self.natural_like_margin,
            "diverge_margin": self.diverge_margin,
            "natural_share": self.natural_share,
            "power": self.power,
            "n_signflips": self.n_signflips,
            "exact_limit": self.exact_limit,
            "min_separation": self.min_separation,
            "separation_precision": self.precision_limit,
        }
