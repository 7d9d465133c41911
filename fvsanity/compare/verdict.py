"""The verdict as evidence: three outcomes per layer, each claim with its own test and power.

Why: a layer used to read "diverges" whenever FV-vs-natural similarity was not
significantly above the unrelated-image baseline, so absence of evidence (one FV seed, Holm over
12 layers: the smallest attainable p is above alpha) was reported as divergence. Here every
outcome is a claim with its own evidence, and a design that cannot reach significance says so.

Quantities (one layer; every similarity a mean of single-image-vs-single-image similarities,
e.g. Spearman rho of pooled activation vectors, as :mod:`fvsanity.compare.path`):

* ``f_i``  FV seed i's mean similarity to the unit's natural references R (i = 1..S; the FV
  seeds are the unit of replication: one pooled activation vector per seed is ONE observation);
* ``n_j``  reference j's mean similarity to the other references (leave-one-out, j = 1..m):
  the score a natural image of the unit gets; its mean N is ``natural_vs_natural``;
* ``o_k``  other (unrelated) image k's mean similarity to R (k = 1..n); mean O =
  ``natural_vs_other``;
* the normalized similarity of seed i, ``theta_i = (f_i - O) / (N - O)``: 0 = like unrelated
  images, 1 = like the unit's own natural images; the layer's effect size is their mean
  ``theta = (F - O) / (N - O)`` (path.py's ``normalized``).

The test (one rule for seeds within a unit and for units across units): Fisher's one-sample
sign-flip randomization test of the replicates' mean against the margin delta, on the
replicates' scale (seeds: f_i against O + delta (N - O); units: theta_u against delta), exact
over all 2^S sign patterns for S <= 16, else ``n_perm`` random patterns, p = (1 + k) / (1 +
n_perm). It assumes only that a replicate's deviation from the mean is symmetric. Smallest
attainable p: 2^-S (the observed sign pattern always counts as extreme): 1 seed -> 0.5, 4 ->
0.0625, 5 -> 0.031; the one-sided exact Wilcoxon signed-rank test has the same floor. Across
units (no plug-in) the test is exact and its confidence bounds are Hartigan's subset means (the
one-sided lower bound at level alpha is the (j+1)-th smallest mean over the non-empty subsets),
so "the interval lies above the margin" and "p <= alpha" are one statement.

Within a unit, N and O are estimated from m + n images: their variance (var(n_j) / m +
var(o_k) / n at the margin's weights) is added to the seeds' sign-flip variance (the observed
contrast is shrunk by sqrt(V / (V + var)) before it is compared with the sign-flip
distribution; the floor stays 2^-S); the confidence bounds are where the p crosses alpha
(bisection). Measured on simulated units whose true normalized similarity sits exactly on a
margin, the rate of the claim is 4-5% at alpha = 0.05 (tests/test_verdict.py). The alternative
``VerdictSettings(natural_share=s)`` spends s alpha on a confidence bound of the natural side and
runs the exact test at (1 - s) alpha: valid by the union bound whatever the distributions, but
conservative (about 1% at the margin).

The gate (:func:`separation`, issue: a random ResNet-18 read "natural-like from conv1 on" with
N - O = 0.017 at its own layer): theta divides by N - O, so before theta is used at a layer the
references must separate from unrelated images by a gap that is (1) meaningful, a standardized
gap d = (N - O) / s >= :data:`MIN_SEPARATION` (0.5; s the root mean variance of the per-image
scores n_j, o_k), an effect size that does not shrink with more images, unlike the one-sided
Welch t it replaces (which any gap passes with enough images); and (2) precisely known, z_{1-alpha}
se(N - O) / (N - O) <= 1 - NATURAL_LIKE_MARGIN (0.2), se from the jackknife over references and
other images (N and O both move with the sample of references; var(n_j) / m + var(o_k) / n was
1.5-2.7x too small on the random ResNet-18). (2) is the gate's own power: it implies N > O at
level alpha, bounds the denominator's share of theta's uncertainty (at theta = 1 the natural
side alone cannot reach the natural-like margin), and says how many references would meet it.
A layer that fails has no scale for theta: no estimate (NaN, null in JSON), no claim,
"inconclusive" with the reason (:data:`REASON_NOT_SEPARATED` and the numbers). Both limits are
settings (``VerdictSettings.min_separation``, ``separation_precision``).

Claims (margins are settings, :class:`VerdictSettings`; defaults below):

* **natural-like** at a layer: H0 theta <= :data:`NATURAL_LIKE_MARGIN` rejected (a
  non-inferiority test against natural-to-natural similarity: the interval's lower bound above
  the margin).
* **diverges** at a layer: H0 theta >= :data:`DIVERGE_MARGIN` rejected (the upper bound below
  the margin: the FVs are significantly closer to unrelated images than to their own natural
  images; in particular this covers "at or below the unrelated baseline", theta <= 0).
* **inconclusive** otherwise, with the reason: the design cannot reach alpha (the smallest
  attainable p, and the FV seeds / units that would), the references do not separate, the
  estimate lies between the margins, or the test is not significant (and about how many seeds
  would decide at the observed spread).

Several layers (the unit's path, in path order, its own layer last):

* natural-like claims use intersection-union / fixed-sequence logic: the claim "natural-like
  from layer l on" is the conjunction of the per-layer claims at l, l+1, ..., last; an
  intersection-union test rejects it when every one of them rejects at level alpha (Berger
  1982), so no Holm penalty is paid. Equivalently the layers are tested in a fixed sequence from
  the unit's own layer backward, each at alpha, stopping at the first that is not natural-like
  (FWER <= alpha over the natural-like labels; Maurer et al. 1995); the adjusted p of layer l is
  the largest raw p of layers l..last. This matches the scientific question (from which layer on
  do the FVs look natural?) and is why a layer that passes alone but lies before a layer that
  does not is "inconclusive" (:data:`REASON_LATER_LAYER`).
* diverges claims are a disjunction ("diverges at some layers", any subset): Holm over the
  layers, FWER <= alpha over the diverges labels.

Each kind of claim has its error rate controlled at alpha across the layers; a layer cannot be
both (for alpha < 0.5 and DIVERGE_MARGIN <= NATURAL_LIKE_MARGIN the two rejections exclude each
other).

Across units (units as replicates, per layer): the same test on the units' per-layer estimates
theta_u, the same outcomes and multiplicity rules; e.g. 6 units and Holm over 5 layers can never
reach p < 5 * 2^-6 = 0.078, so the outcome is "inconclusive: needs >= 7 units", never
"not above".

Activation range (:func:`activation_range`): FV response / largest natural response, with the
safe division stated there.

Input shapes (per layer, plain tensors or arrays, any float dtype; computed in float64):
``fv_ref`` [S] (per-seed means f_i) or [S, m] (FV x reference similarities);
``ref_ref`` [m] (leave-one-out means n_j) or [m, m] (reference x reference, diagonal ignored);
``other_ref`` [n] (o_k) or [n, m] (other x reference).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import FVSanityError
from .stats import holm

__all__ = [
    "ALPHA",
    "NATURAL_LIKE_MARGIN",
    "DIVERGE_MARGIN",
    "POWER",
    "N_PERM",
    "NATURAL_SHARE",
    "SIGNFLIP_EXACT_LIMIT",
    "NATURAL_LIKE",
    "DIVERGES",
    "INCONCLUSIVE",
    "OUTCOMES",
    "SEEDS",
    "UNITS",
    "MIN_SEPARATION",
    "SEPARATION_PRECISION",
    "REASON_NOT_SEPARATED",
    "Separation",
    "separation",
    "ActivationRange",
    "LayerEvidence",
    "LayerOutcome",
    "SignFlip",
    "UnitVerdict",
    "VerdictError",
    "VerdictSettings",
    "activation_range",
    "across_units_verdict",
    "attainable_p",
    "decide_layers",
    "layer_evidence",
    "replicate_evidence",
    "replicates_needed",
    "seed_scores",
    "sign_flip",
    "unit_sentence",
    "unit_verdict",
    "no_evidence",
    "withhold",
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


# ---------------------------------------------------------------------- attainable p, power
def _is_exact(n: int, n_perm: int, exact_limit: int) -> bool:
    return n <= 62 and 2**n <= max(n_perm, exact_limit)


def attainable_p(
    n: int,
    *,
    n_layers: int = 1,
    correction: str = "holm",
    share: float = 0.0,
    n_perm: int = N_PERM,
    exact_limit: int = SIGNFLIP_EXACT_LIMIT,
) -> float:
    """The smallest p a claim can reach with ``n`` replicates (FV seeds, or units).

    One-sided sign-flip test: exact (2^n <= max(n_perm, exact_limit)) 2^-n, the observed sign
    pattern alone as extreme (also the one-sided exact Wilcoxon signed-rank floor); Monte Carlo
    max(2^-n, 1 / (1 + n_perm)). ``correction``: ``"holm"`` over ``n_layers`` (the diverges
    claims: the smallest Holm-adjusted p is n_layers times the smallest raw p), or
    ``"fixed-sequence"`` / ``"none"`` (the natural-like claims: each layer at alpha). ``share``:
    the share of alpha spent on the natural side (per unit: ``VerdictSettings.natural_share``;
    across units 0): the p compared with alpha is p / (1 - share). n = 0: 1.

    Examples: n=1 -> 0.5; n=4 -> 0.0625; n=6, Holm over 5 layers -> 5/64 = 0.078125; n=4,
    share 0.2 -> 0.078125.
    """
    if correction not in ("holm", "fixed-sequence", "none"):
        raise VerdictError(f"unknown correction {correction!r}; valid: holm, fixed-sequence, none")
    if not (isinstance(n, int) and n >= 0) or not (isinstance(n_layers, int) and n_layers >= 1):
        raise VerdictError(f"need n >= 0 and n_layers >= 1, got n={n!r}, n_layers={n_layers!r}")
    if n == 0:
        return 1.0
    raw = 2.0**-n if _is_exact(n, n_perm, exact_limit) else max(2.0**-n, 1.0 / (1 + n_perm))
    if not (0 <= share < 1):
        raise VerdictError(f"share must be in [0, 1), got {share!r}")
    return min(1.0, raw * (n_layers if correction == "holm" else 1) / (1 - share))


def replicates_needed(
    alpha: float = ALPHA,
    *,
    n_layers: int = 1,
    correction: str = "holm",
    share: float = 0.0,
    n_perm: int = N_PERM,
    exact_limit: int = SIGNFLIP_EXACT_LIMIT,
) -> int | None:
    """The fewest replicates whose :func:`attainable_p` is <= ``alpha`` (None: none can, e.g. too
    few random sign patterns). Exact case: ceil(log2(n_layers / alpha)) for Holm, ceil(log2(1 /
    alpha)) otherwise: alpha 0.05 -> 5; Holm over 5 layers -> 7; over 12 layers -> 8 (share 0.2:
    5, 7, 9)."""
    for n in range(1, 63):
        p = attainable_p(n, n_layers=n_layers, correction=correction, share=share, n_perm=n_perm, exact_limit=exact_limit)
        if p <= alpha:
            return n
    return None


def _power_needed(sd: float, gap: float, alpha: float, power: float) -> int | None:
    """n with (z_{1-alpha} + z_power) * sd / sqrt(n) <= gap (normal approximation); None if the
    spread is unknown."""
    from statistics import NormalDist

    if not (math.isfinite(sd) and math.isfinite(gap)) or gap <= 0:
        return None
    z = NormalDist().inv_cdf(1 - alpha) + NormalDist().inv_cdf(power)
    if sd <= 0:
        return 1
    return max(1, math.ceil((z * sd / gap) ** 2 - 1e-9))


# ---------------------------------------------------------------------------- sign flips
@dataclass(frozen=True)
class SignFlip:
    """The sign-flip randomization distribution of the mean of replicates x [n].

    A sign pattern flips the replicates of a subset K. For a margin d, the pattern is at least as
    extreme as the observed one for "mean > d" iff sum_K (x_k - d) <= 0, for "mean < d" iff
    sum_K (x_k - d) >= 0 (ties within rounding count as extreme).

    Attributes:
        x: float64 [n] the replicates.
        sums: float64 [P] sum of x over the flipped subset of each pattern; sizes: [P] its size.
        exact: all 2^n patterns (p = k / 2^n), else P random ones (p = (1 + k) / (1 + P)).
    """

    x: torch.Tensor
    sums: torch.Tensor
    sizes: torch.Tensor
    exact: bool

    @property
    def n(self) -> int:
        return int(self.x.numel())

    def _den_add(self) -> tuple[float, float]:
        p = float(self.sums.numel())
        return (p, 0.0) if self.exact else (p + 1, 1.0)

    def _tol(self) -> torch.Tensor:
        if "_tol_cache" not in self.__dict__:  # per-pattern rounding tolerance, computed once
            tol = 1e-9 * max(1.0, float(self.x.abs().max()) if self.n else 1.0) * self.sizes.clamp_min(1)
            object.__setattr__(self, "_tol_cache", tol)
        return self.__dict__["_tol_cache"]

    def _p_many(self, d, var, greater: bool) -> torch.Tensor:
        """p at margins d [D] with extra variances var [D] (float64 [D]).

        The observed contrast sum(x - d) is shrunk by lambda = sqrt(V / (V + var)), V = sum((x -
        d)^2) / n^2 the sign-flip variance of the mean, so that ``var`` (the natural side's) is
        added to the seeds' own (lambda = 1 for var = 0: the exact test). A pattern flipping K is
        as extreme for "greater" iff 2 sum_K (x - d) <= (1 - lambda) sum(x - d); the observed
        pattern (K empty) always counts, so p >= the floor."""
        d = torch.as_tensor(d, dtype=torch.float64).reshape(-1)
        var = torch.as_tensor(var, dtype=torch.float64).reshape(-1).expand_as(d)
        den, add = self._den_add()
        dd = self.x[None, :] - d[:, None]  # [D, n]
        v = (dd**2).sum(1) / self.n**2
        tot = v + var
        lam = torch.where((var > 0) & (tot > 0), (v / torch.where(tot > 0, tot, torch.ones_like(tot))).sqrt(),
                          torch.ones_like(v))
        slack = ((1 - lam) * dd.sum(1))[:, None]  # [D, 1]
        contrast = 2 * (self.sums[None, :] - d[:, None] * self.sizes[None, :])  # [D, P]
        tol = 2 * self._tol()[None, :]
        ext = (contrast <= slack + tol) if greater else (contrast >= slack - tol)
        ext = ext | (self.sizes == 0)[None, :]
        return (add + ext.sum(1).to(torch.float64)) / den

    def p_greater(self, d: float, var: float = 0.0) -> float:
        """One-sided p of H0 mean <= d (against mean > d); ``var``: extra variance of d (0: the
        exact sign-flip test; see :meth:`_p_many`)."""
        return float(self._p_many([d], [var], True)[0])

    def p_less(self, d: float, var: float = 0.0) -> float:
        """One-sided p of H0 mean >= d (against mean < d); ``var`` as in :meth:`p_greater`."""
        return float(self._p_many([d], [var], False)[0])

    def _bound(self, alpha: float, lower: bool) -> float:
        den, add = self._den_add()
        nonempty = self.sizes > 0
        means = self.sums[nonempty] / self.sizes[nonempty]
        k_empty = float((~nonempty).sum())
        j = math.floor(alpha * den - add - k_empty + 1e-9)  # patterns allowed beyond the empty ones
        if j < 0:
            return -math.inf if lower else math.inf
        if j >= means.numel():
            return math.inf if lower else -math.inf
        s = torch.sort(means, descending=not lower).values
        return float(s[j])

    def lower(self, alpha: float) -> float:
        """One-sided lower confidence bound at level alpha: p_greater(d) <= alpha iff d < lower
        (Hartigan's subset means; -inf when no p can reach alpha)."""
        return self._bound(alpha, True)

    def upper(self, alpha: float) -> float:
        """One-sided upper confidence bound: p_less(d) <= alpha iff d > upper."""
        return self._bound(alpha, False)


def sign_flip(
    x,
    *,
    n_perm: int = N_PERM,
    exact_limit: int = SIGNFLIP_EXACT_LIMIT,
    generator: torch.Generator | None = None,
) -> SignFlip:
    """The sign-flip distribution of replicates x [n] (n >= 1): every pattern when 2^n <=
    max(n_perm, exact_limit), else ``n_perm`` random ones drawn with ``generator`` (CPU;
    default seeded 0)."""
    x = torch.as_tensor(x, dtype=torch.float64).detach().cpu().flatten()
    n = x.numel()
    if n < 1 or not torch.isfinite(x).all():
        raise VerdictError(f"sign_flip: need >= 1 finite replicate, got {x.tolist()}")
    exact = _is_exact(n, n_perm, exact_limit)
    if exact:
        flips = ((torch.arange(2**n)[:, None] >> torch.arange(n)) & 1).to(torch.float64)  # [2^n, n]
    else:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        flips = (torch.rand(n_perm, n, generator=gen, dtype=torch.float64) < 0.5).to(torch.float64)
    return SignFlip(x, flips @ x, flips.sum(1), exact)


# ----------------------------------------------------------------------------- per layer
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
            "separated": self.separated, "reason": self.reason, "gap": _j(self.gap), "se": _j(self.se),
            "lower": _j(self.lower), "effect": _j(self.effect), "precision": _j(self.precision),
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
        lower = gap - _z(st.alpha) * se if math.isfinite(gap) and math.isfinite(se) else nan
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
    z = _z(st.alpha)
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


def _z(p: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(1 - p) if p > 0 else 0.0


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
            "name": self.name, "replicate": self.replicate, "n": self.n, "estimate": _j(self.estimate),
            "ci_low": _j(self.ci_low), "ci_high": _j(self.ci_high),
            "p_natural_like": _j(self.p_natural_like), "p_diverges": _j(self.p_diverges),
            "p_floor": self.p_floor, "natural_share": self.natural_share, "exact": self.exact,
            "spread": {"sd": _j(self.spread_sd), "min": _j(self.spread_min), "max": _j(self.spread_max)},
            "separated": self.separated, "fv_vs_natural": _j(self.fv_vs_natural),
            "natural_vs_natural": _j(self.natural_vs_natural), "natural_vs_other": _j(self.natural_vs_other),
            "replicates": [_j(v) for v in self.replicates],
            "separation": self.separation.to_json() if self.separation is not None else None,
        }


def _j(v: float):
    """JSON-safe float: NaN and +-inf -> None."""
    return float(v) if math.isfinite(v) else None


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
        z_nat, z_div = _z(share * st.alpha), _z(share * st.alpha / max(1, n_layers))
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


# ---------------------------------------------------------------------- several layers
@dataclass(frozen=True)
class LayerOutcome:
    """The outcome of one layer after the multiplicity rules.

    Attributes:
        evidence: the layer's :class:`LayerEvidence`.
        outcome: one of :data:`OUTCOMES`.
        reason: why "inconclusive" ("" otherwise), in the module's wording.
        p_natural_like_adj: fixed-sequence adjusted p (largest raw p of this and every later
            layer, / (1 - natural share)); natural-like iff <= alpha.
        p_diverges_adj: Holm-adjusted p over the layers (/ (1 - natural share)); diverges iff
            <= alpha.
        floor_natural_like, floor_diverges: the smallest adjusted p each claim can reach here.
        needed: replicates that would decide (None: not a question of replicates, or decided).
    """

    evidence: LayerEvidence
    outcome: str
    reason: str
    p_natural_like_adj: float
    p_diverges_adj: float
    floor_natural_like: float
    floor_diverges: float
    needed: int | None = None

    @property
    def name(self) -> str:
        return self.evidence.name

    @property
    def estimate(self) -> float:
        return self.evidence.estimate

    def to_json(self) -> dict:
        return {
            "name": self.name, "outcome": self.outcome, "reason": self.reason,
            "p_natural_like_adj": self.p_natural_like_adj, "p_diverges_adj": self.p_diverges_adj,
            "floor_natural_like": self.floor_natural_like, "floor_diverges": self.floor_diverges,
            "needed": self.needed, "evidence": self.evidence.to_json(),
        }


def decide_layers(evidence: Sequence[LayerEvidence], settings: VerdictSettings | None = None) -> tuple[LayerOutcome, ...]:
    """Outcomes for the layers of one path, in path order (the last is the unit's own layer).

    natural-like: fixed sequence from the last layer backward (adjusted p = running max of the
    raw p from the end); diverges: Holm over the layers with data. Both divided by (1 - the
    evidence's natural share) and compared with alpha. See the module docstring.
    """
    st = settings or VerdictSettings()
    a = st.alpha
    L = len(evidence)
    if L == 0:
        return ()
    p_nat = [e.p_natural_like if e.n else 1.0 for e in evidence]
    run = 0.0
    nat_adj = [1.0] * L
    for i in range(L - 1, -1, -1):
        run = max(run, p_nat[i])
        nat_adj[i] = min(1.0, run / (1 - evidence[i].natural_share))
    p_div = torch.tensor([e.p_diverges if e.n else math.nan for e in evidence], dtype=torch.float64)
    holm_div = holm(p_div).tolist()
    div_adj = [min(1.0, q / (1 - e.natural_share)) if math.isfinite(q) else 1.0 for q, e in zip(holm_div, evidence)]
    n_tested = max(1, int(torch.isfinite(p_div).sum()))

    out = []
    for i, e in enumerate(evidence):
        kw = dict(share=e.natural_share, n_perm=st.n_signflips, exact_limit=st.exact_limit)
        f_nat = attainable_p(e.n, correction="fixed-sequence", **kw)
        f_div = attainable_p(e.n, n_layers=n_tested, correction="holm", **kw)
        outcome, reason, needed = INCONCLUSIVE, "", None
        if nat_adj[i] <= a:
            outcome = NATURAL_LIKE
        elif div_adj[i] <= a:
            outcome = DIVERGES
        elif e.n == 0 and not e.separated:
            reason = e.separation.reason if e.separation is not None and e.separation.reason else REASON_NOT_SEPARATED
        elif e.n == 0:
            reason = REASON_NO_DATA.format(what=e.replicate)
        elif p_nat[i] / (1 - e.natural_share) <= a:
            reason = REASON_LATER_LAYER.format(p=p_nat[i] / (1 - e.natural_share))
        else:
            reason, needed = _why(e, st, n_tested, f_nat, f_div, nat_adj[i], div_adj[i])
        out.append(LayerOutcome(e, outcome, reason, nat_adj[i], div_adj[i], f_nat, f_div, needed))
    return tuple(out)


def _why(
    e: LayerEvidence, st: VerdictSettings, n_layers: int, f_nat: float, f_div: float, p_nat: float, p_div: float
) -> tuple[str, int | None]:
    """Reason and needed replicates for an undecided layer with data (p_nat, p_div adjusted)."""
    a = st.alpha
    kw = dict(share=e.natural_share, n_perm=st.n_signflips, exact_limit=st.exact_limit)
    if e.estimate >= st.natural_like_margin:
        claim = "natural"
    elif e.estimate <= st.diverge_margin:
        claim = "diverges"
    else:
        claim = "between"
    # the design: can the claim the estimate points to (between the margins: either) reach alpha?
    floor = f_nat if claim == "natural" else f_div
    layers = 1 if claim == "natural" else n_layers
    corr = "fixed-sequence" if claim == "natural" else "holm"
    floor_need = replicates_needed(a, n_layers=layers, correction=corr, **kw)
    if floor > a:
        if floor_need is None:
            return REASON_FLOOR_NEVER.format(alpha=a, n_perm=st.n_signflips), None
        return REASON_FLOOR.format(need=floor_need, what=e.replicate, floor=floor, alpha=a), floor_need
    if claim == "between":
        return REASON_BETWEEN.format(est=e.estimate, lo=st.diverge_margin, hi=st.natural_like_margin), None
    if claim == "natural":
        p, gap = p_nat, e.estimate - st.natural_like_margin
    else:
        p, gap = p_div, st.diverge_margin - e.estimate
    pow_need = _power_needed(e.spread_sd, gap, (1 - e.natural_share) * a / layers, st.power)
    need = max(floor_need or 1, pow_need if pow_need is not None else e.n + 1, e.n + 1)
    if need > MAX_NEEDED:
        return REASON_NOT_SIGNIFICANT_MANY.format(p=p, need=MAX_NEEDED, what=e.replicate), None
    return REASON_NOT_SIGNIFICANT.format(p=p, need=need, what=e.replicate), need


# ---------------------------------------------------------------------------- per unit
@dataclass(frozen=True)
class UnitVerdict:
    """A unit's verdict summarizing its layers (path order; the last is its own layer).

    Attributes:
        layers: the per-layer outcomes.
        natural_like_from: the first layer from which the FVs are natural-like at it and every
            later layer (None: not even at its own layer).
        own: the outcome at its own layer.
        n_natural_like, n_diverges, n_inconclusive: counts over the layers.
        sentence: the one-sentence summary (:func:`unit_sentence`).
        settings: the settings used.
    """

    layers: tuple[LayerOutcome, ...]
    natural_like_from: str | None
    own: LayerOutcome | None
    n_natural_like: int
    n_diverges: int
    n_inconclusive: int
    sentence: str
    settings: VerdictSettings = field(default_factory=VerdictSettings)

    @property
    def outcome(self) -> str:
        """The outcome at the unit's own layer (:data:`INCONCLUSIVE` with no layers)."""
        return self.own.outcome if self.own is not None else INCONCLUSIVE

    def to_json(self) -> dict:
        return {
            "outcome": self.outcome, "sentence": self.sentence, "natural_like_from": self.natural_like_from,
            "own_layer": self.own.name if self.own is not None else None,
            "counts": {NATURAL_LIKE: self.n_natural_like, DIVERGES: self.n_diverges, INCONCLUSIVE: self.n_inconclusive},
            "layers": [o.to_json() for o in self.layers], "settings": self.settings.to_json(),
        }


def unit_sentence(layers: Sequence[LayerOutcome]) -> str:
    """The one sentence for a unit, in the module's wording, e.g.
    ``"inconclusive at its own layer (needs >= 5 FV seeds ...); natural-like at no layer"`` or
    ``"natural-like at its own layer; natural-like from layer3 on (2 of 4 layers)"``."""
    if not layers:
        return UNIT_SENTENCE.format(
            own=OWN_LAYER_SENTENCE[INCONCLUSIVE].format(reason=REASON_NO_DATA.format(what="layers")),
            path=PATH_NONE_SENTENCE,
        )
    own = layers[-1]
    own_s = OWN_LAYER_SENTENCE[own.outcome].format(reason=own.reason)
    first, k = _natural_from(layers)
    path_s = PATH_FROM_SENTENCE.format(layer=first, k=k, n=len(layers)) if first else PATH_NONE_SENTENCE
    d = sum(o.outcome == DIVERGES for o in layers)
    if d:
        path_s += ", " + PATH_DIVERGES_SENTENCE.format(k=d, n=len(layers))
    return UNIT_SENTENCE.format(own=own_s, path=path_s)


def _natural_from(layers: Sequence[LayerOutcome]) -> tuple[str | None, int]:
    k = 0
    for o in reversed(layers):
        if o.outcome != NATURAL_LIKE:
            break
        k += 1
    return (layers[len(layers) - k].name if k else None), k


def unit_verdict(
    layers: Mapping[str, tuple] | Sequence[LayerEvidence],
    *,
    settings: VerdictSettings | None = None,
    generator: torch.Generator | None = None,
) -> UnitVerdict:
    """A unit's verdict.

    Args:
        layers: in path order (the unit's own layer last), either {layer name: (fv_ref, ref_ref,
            other_ref)} (shapes: module docstring) or precomputed :class:`LayerEvidence`.
        settings: :class:`VerdictSettings` (default: the module constants).
        generator: for random sign patterns (only with more than 16 seeds).
    """
    st = settings or VerdictSettings()
    if isinstance(layers, Mapping):
        ev = [
            layer_evidence(name, *t, n_layers=len(layers), settings=st, generator=generator)
            for name, t in layers.items()
        ]
    else:
        ev = list(layers)
    outs = decide_layers(ev, st)
    first, _ = _natural_from(outs)
    count = {o: sum(x.outcome == o for x in outs) for o in OUTCOMES}
    return UnitVerdict(
        layers=outs, natural_like_from=first, own=outs[-1] if outs else None,
        n_natural_like=count[NATURAL_LIKE], n_diverges=count[DIVERGES], n_inconclusive=count[INCONCLUSIVE],
        sentence=unit_sentence(outs), settings=st,
    )


# ------------------------------------------------------------------------- across units
def across_units_verdict(
    names: Sequence[str],
    estimates,
    *,
    settings: VerdictSettings | None = None,
    generator: torch.Generator | None = None,
) -> tuple[LayerOutcome, ...]:
    """Per layer, units as replicates: the same test, outcomes and multiplicity rules.

    Args:
        names: L layer names in path order.
        estimates: [U, L] each unit's normalized similarity at each layer (e.g.
            ``UnitVerdict.layers[i].estimate``, or path.py's ``normalized``); NaN where a unit
            lacks the layer or its references do not separate (left out of that layer).

    Returns:
        one :class:`LayerOutcome` per layer, replicate :data:`UNITS` ("needs >= 7 units").
    """
    st = settings or VerdictSettings()
    est = torch.as_tensor(estimates, dtype=torch.float64).detach().cpu()
    if est.dim() != 2 or est.shape[1] != len(names):
        raise VerdictError(f"estimates must be [U, L={len(names)}], got {tuple(est.shape)}")
    ev = [
        replicate_evidence(name, est[:, i], replicate=UNITS, settings=st, generator=generator)
        for i, name in enumerate(names)
    ]
    return decide_layers(ev, st)


# ---------------------------------------------------------------------- activation range
#: a largest natural response at or below this counts as silent (no scale for the ratio)
SILENT_EPS = 1e-6


@dataclass(frozen=True)
class ActivationRange:
    """FV response relative to the unit's largest natural response.

    Attributes:
        ratio: [S] float64, FV response of each seed / largest natural response. When the
            largest natural response is <= :data:`SILENT_EPS` (the unit is silent or negative on
            every natural image: no scale), ``ratio`` is NaN-free by definition: the responses
            are divided by SILENT_EPS and ``natural_silent`` is True; read the ratio then as
            "how far above a silent unit", not as a multiple of a natural response.
        ratio_median, ratio_max: over the seeds (median: the mean of the two middle values for
            an even count).
        natural_max: the largest natural response.
        natural_silent: see ``ratio``.
    """

    ratio: torch.Tensor
    ratio_median: float
    ratio_max: float
    natural_max: float
    natural_silent: bool

    def to_json(self) -> dict:
        return {
            "ratio": [float(v) for v in self.ratio], "ratio_median": self.ratio_median,
            "ratio_max": self.ratio_max, "natural_max": self.natural_max, "natural_silent": self.natural_silent,
        }


def activation_range(fv_responses, natural_responses) -> ActivationRange:
    """FV response / largest natural response (SqueezeNet class-unit FVs reach ~45x).

    Args:
        fv_responses: [S] the unit's response to each FV seed (or a scalar).
        natural_responses: [N] its response to every natural image (N >= 1).

    Returns:
        :class:`ActivationRange`; never inf or NaN for finite input: the denominator is
        max(largest natural response, SILENT_EPS).
    """
    fv = torch.as_tensor(fv_responses, dtype=torch.float64).detach().cpu().flatten()
    nat = torch.as_tensor(natural_responses, dtype=torch.float64).detach().cpu().flatten()
    if fv.numel() == 0 or nat.numel() == 0:
        raise VerdictError(f"activation_range needs >= 1 FV and >= 1 natural response, got {fv.numel()} and {nat.numel()}")
    if not (torch.isfinite(fv).all() and torch.isfinite(nat).all()):
        raise VerdictError("activation_range: responses must be finite")
    top = float(nat.max())
    silent = top <= SILENT_EPS
    ratio = fv / max(top, SILENT_EPS)
    return ActivationRange(ratio, float(torch.quantile(ratio, 0.5)), float(ratio.max()), top, silent)


# ------------------------------------------------------------------- withheld verdicts
def no_evidence(name: str, replicate: str = SEEDS) -> LayerEvidence:
    """A layer with no usable replicates (e.g. fewer than 2 references): n = 0, NaN estimate."""
    nan = math.nan
    return LayerEvidence(name, replicate, 0, nan, -math.inf, math.inf, 1.0, 1.0, 1.0, 0.0, True, nan, nan, nan)


def withhold(verdict: UnitVerdict, reason: str) -> UnitVerdict:
    """The same unit's verdict with every layer "inconclusive" for ``reason`` (e.g.
    ``"insufficient references: ..."``): the numbers are kept, no claim is made."""
    import dataclasses

    outs = tuple(dataclasses.replace(o, outcome=INCONCLUSIVE, reason=reason, needed=None) for o in verdict.layers)
    return dataclasses.replace(
        verdict, layers=outs, natural_like_from=None, own=outs[-1] if outs else None,
        n_natural_like=0, n_diverges=0, n_inconclusive=len(outs),
        sentence=UNIT_SENTENCE.format(own=OWN_LAYER_SENTENCE[INCONCLUSIVE].format(reason=reason), path=PATH_NONE_SENTENCE),
    )
