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

from .evidence import (  # noqa: F401
    LayerEvidence,
    _bisect,
    _evidence,
    _Threshold,
    layer_evidence,
    replicate_evidence,
)
from .reference_separation import (  # noqa: F401
    Separation,
    _gap_jackknife,
    _vec,
    _welch_greater,
    seed_scores,
    separation,
)
from .signflip import SignFlip, _is_exact, _power_needed, attainable_p, replicates_needed, sign_flip  # noqa: F401
from .signflip import json_float as _j  # noqa: F401
from .signflip import z_upper as _z  # noqa: F401
from .stats import holm
from .verdict_settings import (  # noqa: F401 - the settings and wording, re-exported from here
    ALPHA,
    DIVERGE_MARGIN,
    DIVERGES,
    INCONCLUSIVE,
    MAX_NEEDED,
    MIN_SEPARATION,
    MIN_SEPARATION_REFERENCES,
    N_PERM,
    NATURAL_LIKE,
    NATURAL_LIKE_MARGIN,
    NATURAL_SHARE,
    OUTCOMES,
    OWN_LAYER_SENTENCE,
    PATH_DIVERGES_SENTENCE,
    PATH_FROM_SENTENCE,
    PATH_NONE_SENTENCE,
    POWER,
    REASON_BETWEEN,
    REASON_FLOOR,
    REASON_FLOOR_NEVER,
    REASON_LATER_LAYER,
    REASON_NO_DATA,
    REASON_NOT_SEPARATED,
    REASON_NOT_SIGNIFICANT,
    REASON_NOT_SIGNIFICANT_MANY,
    REASON_SEP_EFFECT,
    REASON_SEP_FEW,
    REASON_SEP_NONE,
    REASON_SEP_PRECISION,
    REASON_SEP_PRECISION_OTHER,
    SEEDS,
    SEPARATION_PRECISION,
    SIGNFLIP_EXACT_LIMIT,
    UNIT_SENTENCE,
    UNITS,
    VerdictError,
    VerdictSettings,
)

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

# The verdict, one job per module: verdict_settings (defaults, wording, VerdictSettings), signflip
# (the sign-flip test, attainable p, replicates needed), reference_separation (a layer's scores and
# whether its references separate), evidence (a layer's evidence against both margins), and here
# the decisions: layers along a path, a unit, across units, the activation range.

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
