"""Detecting manipulated feature visualizations: per-unit signals, a calibrated score, ROC numbers.

Everything here uses only what an *auditor* has: the model as a function
(forward passes, hookable layers), the unit's FVs rendered on that model, and natural images.
Never the original weights, the list of added modules or the manipulation's settings: a healthy
unit is measured on the original model, a manipulated one on the manipulated model, by the same
code, and nothing here can tell which model it was given.

Signals per unit (:data:`SIGNALS`; each a float, NaN where undefined; ``direction`` +1 means
larger = more suspicious, -1 smaller = more suspicious):

* ``path_own``, ``path_min``, ``path_mean``: the path check's normalized similarity
  (:mod:`fvsanity.compare.path`: 0 = like unrelated images, 1 = like the unit's own natural
  images) at the unit's own layer, and its minimum / mean over the unit's path (NaN layers
  skipped). Direction -1.
* ``p_natural_like_own``: the verdict's adjusted p of "natural-like" at the unit's own layer
  (:mod:`fvsanity.compare.verdict`): large = no evidence that the FVs look natural. Direction +1.
* ``log_activation_range``: log of the median over FV seeds of FV response / largest natural
  response (:func:`fvsanity.compare.verdict.activation_range`). Direction +1.
* ``exemplar_own``, ``exemplar_mean``: top-k exemplar agreement (Gradient Slingshots' check, as a
  number): at a layer, P(sim(FV, e) > sim(FV, o)) over the unit's top-k natural exemplars e
  (chosen by the unit's response) and the other natural images o, ties counted 1/2, averaged
  over FV seeds; 0.5 = the FV is no closer to the unit's exemplars than to any image. At the
  unit's own layer, and the mean over its path (its layer and the earlier ones). Direction -1.
* ``rank_own``: does the unit's FV drive the unit harder than the other channels of its layer,
  each measured in its own natural range? Per FV seed, every channel's pooled response z-scored
  by its mean / SD over the natural images (:func:`channel_rank`), then the share of the other
  channels whose z exceeds the unit's (ties 1/2); the median over seeds. ~0 for an FV optimized
  for the unit; a unit whose FV shows another unit's preferred stimulus (a route) lets that
  channel overtake it. Direction +1.

Not per-unit signals here, and why (see the README section "Detecting manipulated FVs"):
CKA / RSA are statistics of a *set* of units (the paired design across units), so they give no
number per unit; the fooling circuit's own FV detector lives inside the manipulated model and is
not available to an auditor who is not told which module it is (an auditor could train their own
FV-vs-natural classifier, but every FV, healthy or not, is an FV: it would not separate them);
circuit overlap (attribution graphs per unit and FV seed) costs more backward passes than the CPU
budget of the benchmark allowed.

Two-sided signals (:func:`atypicality`): a healthy unit's signals live in a band, and a
manipulation can push a signal out of it either way (a silent unit's FV response can be 1000x
its natural range, or ~0 when the FV was pulled elsewhere). ``|x - c| / s`` with c the median and
s the scaled MAD of the HEALTHY TUNING units (log1p'd, so one extreme unit cannot dominate) is
large on either side; ``two_sided=True`` fits use it next to the raw signal.

Combined score (:class:`CombinedScore`): a logistic regression on the standardized signals (and,
two-sided, their atypicalities; NaN imputed with the tuning mean, i.e. 0 after
standardization), classes weighted equally, a small L2 penalty, fit on the TUNING units only
(healthy vs manipulated by any method). Its threshold for a 5% false-positive rate is chosen on
the tuning units' healthy scores (:func:`threshold_at_fpr`) and then only measured on
evaluation units. That threshold's true FPR scatters around 5% (:func:`threshold_fpr_interval`);
``threshold_at_fpr(..., confidence=0.9)`` picks a higher order statistic (:func:`confident_rank`)
whose FPR is <= 5% with probability 0.9, which needs >= 45 healthy tuning units
(:func:`min_units_for_confidence`).

ROC utilities: :func:`roc_auc` (Mann-Whitney, ties count 1/2), :func:`auc_ci` (stratified
bootstrap over units), :func:`roc_curve`, :func:`threshold_at_fpr`, :func:`rate_above`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import FVSanityError
from .stats import auroc

__all__ = [
    "PATH_SIGNALS",
    "SIGNALS",
    "Calibration",
    "CombinedScore",
    "DetectionError",
    "UnitSignals",
    "atypicality",
    "auc_ci",
    "channel_rank",
    "confident_rank",
    "detection_signals",
    "exemplar_agreement",
    "fit_combined",
    "fv_identity",
    "healthy_band",
    "load_calibration",
    "min_units_for_confidence",
    "orient",
    "rate_above",
    "roc_auc",
    "roc_curve",
    "signal_matrix",
    "signals_from_json",
    "signals_from_path",
    "threshold_at_fpr",
    "threshold_fpr_interval",
]


class DetectionError(FVSanityError, ValueError):
    """Bad input to a detection utility (empty score sets, NaN scores, a mismatched score)."""


#: signal name -> (direction, what it is); direction +1: larger = more suspicious, -1: smaller
SIGNALS: dict[str, tuple[int, str]] = {
    "path_own": (-1, "normalized path similarity at the unit's own layer"),
    "path_min": (-1, "minimum normalized path similarity over the unit's path"),
    "path_mean": (-1, "mean normalized path similarity over the unit's path"),
    "p_natural_like_own": (1, "verdict's adjusted p of 'natural-like' at the unit's own layer"),
    "log_activation_range": (1, "log(median FV response / largest natural response)"),
    "exemplar_own": (-1, "top-k exemplar agreement at the unit's own layer (0.5 = chance)"),
    "exemplar_mean": (-1, "top-k exemplar agreement, mean over the unit's path"),
    "rank_own": (1, "share of its layer's other channels the unit's FV drives harder (natural z-scores)"),
}


# ----------------------------------------------------------------------------- ROC utilities
def _scores(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    if a.size == 0:
        raise DetectionError(f"{name} scores are empty; need >= 1")
    if not np.isfinite(a).all():
        raise DetectionError(f"{name} scores contain NaN or inf ({int((~np.isfinite(a)).sum())} of {a.size})")
    return a


def roc_auc(negatives, positives) -> float:
    """ROC AUC = P(score of a positive > score of a negative), ties counted 1/2 (Mann-Whitney U / (n m)):
    :func:`fvsanity.compare.stats.auroc` after checking the scores (DetectionError if empty or
    not finite).

    Args:
        negatives: [n] scores of healthy units; positives: [m] scores of manipulated units
            (larger = more suspicious).

    Returns:
        AUC in [0, 1]: 1 perfectly separated, 0.5 for identical distributions or all ties.
    """
    return auroc(_scores(negatives, "negative"), _scores(positives, "positive"))


def auc_ci(negatives, positives, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`roc_auc`, resampling units within each class.

    Args:
        n_boot: bootstrap samples (>= 1); confidence: interval level in (0, 1); seed: numpy seed.
    """
    neg, pos = _scores(negatives, "negative"), _scores(positives, "positive")
    if not 0.0 < confidence < 1.0:
        raise DetectionError(f"confidence must be in (0, 1), got {confidence}")
    if int(n_boot) < 1:
        raise DetectionError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(int(seed))
    vals = np.empty(int(n_boot))
    for b in range(int(n_boot)):
        vals[b] = roc_auc(neg[rng.integers(0, neg.size, neg.size)], pos[rng.integers(0, pos.size, pos.size)])
    a = (1.0 - confidence) / 2.0
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1.0 - a))


def roc_curve(negatives, positives) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, flag = score >= threshold, from (0, 0) to (1, 1)."""
    neg, pos = _scores(negatives, "negative"), _scores(positives, "positive")
    ts = np.unique(np.concatenate([neg, pos]))[::-1]
    fpr = [0.0] + [float((neg >= t).mean()) for t in ts]
    tpr = [0.0] + [float((pos >= t).mean()) for t in ts]
    return np.asarray(fpr), np.asarray(tpr)


def threshold_at_fpr(negatives, fpr: float = 0.05, confidence: float | None = None) -> float:
    """The smallest threshold t with (share of ``negatives`` > t) <= ``fpr`` (flag = score > t).

    It is the ceil((1 - fpr) n)-th smallest negative score (the largest one if that is n): at
    most floor(fpr n) negatives lie above it. Choose it on tuning units, then measure
    :func:`rate_above` on evaluation units. Its true FPR on new units scatters around ``fpr``
    (:func:`threshold_fpr_interval`; above it about half the time).

    With ``confidence`` (e.g. 0.9): the k-th smallest negative score for the smallest k
    (:func:`confident_rank`) whose true FPR is <= ``fpr`` with that probability over draws of the
    n tuning units (continuous scores): a threshold whose FPR claim holds, at some cost in TPR.

    Raises:
        DetectionError: ``fpr`` outside [0, 1); with ``confidence``, too few negatives for it (the
            line names how many it needs).
    """
    neg = np.sort(_scores(negatives, "negative"))
    if not 0.0 <= fpr < 1.0:
        raise DetectionError(f"fpr must be in [0, 1), got {fpr}")
    if confidence is not None:
        k = confident_rank(neg.size, fpr, confidence)
        if k is None:
            raise DetectionError(f"{neg.size} healthy tuning scores cannot give a threshold whose FPR is <= {fpr:g} "
                                 f"with confidence {confidence:g}; need >= {min_units_for_confidence(fpr, confidence)}")
        return float(neg[k - 1])
    k = max(1, math.ceil((1.0 - fpr) * neg.size - 1e-9))
    return float(neg[k - 1])


def confident_rank(n: int, fpr: float = 0.05, confidence: float = 0.9) -> int | None:
    """The smallest k in 1..n such that the k-th smallest of n healthy scores, as a threshold, has a
    true FPR <= ``fpr`` with probability >= ``confidence`` (its true FPR is Beta(n + 1 - k, k)
    distributed, i.e. P(FPR <= fpr) = P(Binomial(n, fpr) >= n + 1 - k)); None when even the
    largest score (k = n) does not reach it (n < :func:`min_units_for_confidence`)."""
    from scipy.stats import beta

    if n < 1 or not 0.0 < fpr < 1.0 or not 0.0 < confidence < 1.0:
        raise DetectionError(f"need n >= 1, fpr in (0, 1), confidence in (0, 1); got {n}, {fpr}, {confidence}")
    ks = np.arange(1, n + 1)
    ok = beta.cdf(fpr, n + 1 - ks, ks) >= confidence - 1e-12
    return int(ks[ok][0]) if ok.any() else None


def min_units_for_confidence(fpr: float = 0.05, confidence: float = 0.9) -> int:
    """How many healthy tuning units a :func:`confident_rank` threshold needs at least: the largest
    of n scores has a true FPR <= ``fpr`` with probability 1 - (1 - fpr)^n (45 for 5% and 0.9)."""
    if not 0.0 < fpr < 1.0 or not 0.0 < confidence < 1.0:
        raise DetectionError(f"fpr and confidence must be in (0, 1), got {fpr} and {confidence}")
    n = math.ceil(math.log1p(-confidence) / math.log1p(-fpr) - 1e-9)
    while 1.0 - (1.0 - fpr) ** n < confidence - 1e-12:  # float guard
        n += 1
    return int(n)


def threshold_fpr_interval(n: int, fpr: float = 0.05, confidence: float = 0.9, n_eval: int | None = None,
                           observed: float | None = None) -> dict:
    """What FPR a :func:`threshold_at_fpr` threshold chosen on ``n`` healthy tuning scores has on
    new healthy units of the same distribution (continuous scores).

    The threshold is the k-th smallest of n scores, k = ceil((1 - fpr) n), so its true FPR,
    1 - F(X_(k)), is Beta(n + 1 - k, k) distributed over tuning draws: e.g. n = 26 gives mean
    7.4% and a 90% interval of about [1.4%, 17%]. An evaluation FPR inside the interval is what
    so few tuning units give; one above it says the healthy scores shifted between the roles.

    With ``n_eval`` the share of ``n_eval`` new healthy units above the threshold is predicted
    too (beta-binomial: the threshold's draw and the evaluation units' draw), and with
    ``observed`` (that share as measured) the chance of measuring at least as much.

    Returns:
        {"n_tuning", "k", "mean", "interval": [lo, hi], "confidence"} and, with ``n_eval``,
        "n_eval", "predictive_interval" [lo, hi] (shares), with ``observed`` "observed",
        "p_at_least_observed".
    """
    from scipy.stats import beta, betabinom

    if n < 1:
        raise DetectionError(f"need >= 1 healthy tuning score, got {n}")
    if not 0.0 <= fpr < 1.0 or not 0.0 < confidence < 1.0:
        raise DetectionError(f"fpr must be in [0, 1) and confidence in (0, 1), got {fpr} and {confidence}")
    k = max(1, math.ceil((1.0 - fpr) * n - 1e-9))
    a, b = n + 1 - k, k
    lo, hi = beta.ppf([(1 - confidence) / 2, (1 + confidence) / 2], a, b)
    out = {"n_tuning": int(n), "k": int(k), "mean": a / (a + b), "interval": [float(lo), float(hi)],
           "confidence": confidence}
    if n_eval:
        d = betabinom(int(n_eval), a, b)
        out["n_eval"] = int(n_eval)
        out["predictive_interval"] = [float(d.ppf((1 - confidence) / 2)) / n_eval, float(d.ppf((1 + confidence) / 2)) / n_eval]
        if observed is not None:
            count = round(float(observed) * n_eval)
            out["observed"] = float(observed)
            out["p_at_least_observed"] = float(d.sf(count - 1))
    return out


def rate_above(scores, threshold: float) -> float:
    """Share of ``scores`` strictly above ``threshold`` (flagged)."""
    s = _scores(scores, "")
    return float((s > threshold).mean())


# ----------------------------------------------------------------------------- signals
@dataclass(frozen=True)
class UnitSignals:
    """One unit's detection signals (``values``: name in :data:`SIGNALS` -> float, NaN if undefined),
    and its verdict (``outcome`` at its own layer, ``diverges_any``: "diverges" at some layer)."""

    unit: str
    values: dict[str, float]
    outcome: str
    diverges_any: bool

    def to_json(self) -> dict:
        return {"unit": self.unit, "outcome": self.outcome, "diverges_any": self.diverges_any,
                "signals": {k: (None if not math.isfinite(v) else v) for k, v in self.values.items()}}


def exemplar_agreement(fv: torch.Tensor, natural: torch.Tensor, exemplars: Sequence[int], metric: str = "spearman") -> float:
    """Top-k exemplar agreement at one layer: P(sim(f, e) > sim(f, o)), ties 1/2, mean over FVs f.

    Args:
        fv: [S, C] pooled FV activations (S seeds); natural: [N, C] pooled natural activations.
        exemplars: indices into ``natural`` of the unit's top-k exemplars (the rest are ``o``).
        metric: a vector metric of :mod:`fvsanity.compare.similarity`.

    Returns:
        In [0, 1]; 0.5 = the FVs are no closer to the exemplars than to other natural images;
        NaN when there are no exemplars or no other images.
    """
    from .path import pairwise
    from .similarity import get_metric

    idx = torch.as_tensor(list(exemplars), dtype=torch.long)
    n = natural.shape[0]
    mask = torch.ones(n, dtype=torch.bool)
    mask[idx] = False
    if idx.numel() == 0 or int(mask.sum()) == 0:
        return float("nan")
    sim = pairwise(get_metric(metric), fv.float(), natural.float()).double()  # [S, N]
    vals = []
    for row in sim:
        vals.append(roc_auc(row[mask].numpy(), row[idx].numpy()))
    return float(np.mean(vals))


def channel_rank(fv: torch.Tensor, natural: torch.Tensor, channel: int) -> float:
    """The ``rank_own`` signal: how many channels an FV drives harder than its own unit.

    Args:
        fv: [S, C] pooled responses of the unit's layer to its S FV seeds.
        natural: [N, C] the same layer's pooled responses to N >= 2 natural images.
        channel: the unit's channel.
    Returns:
        median over seeds of the share of the other C - 1 channels whose natural z-score
        ``(a - mean) / sd`` exceeds the unit's (ties 1/2); 0 = the unit leads. A channel constant
        on the natural images gets sd floored at 1e-6 (1 + |mean|), so any response above its
        constant counts as far out of range. NaN for C < 2 or N < 2.
    """
    fv = torch.as_tensor(fv, dtype=torch.float64).detach().cpu()
    nat = torch.as_tensor(natural, dtype=torch.float64).detach().cpu()
    if fv.ndim != 2 or nat.ndim != 2 or fv.shape[1] != nat.shape[1]:
        raise DetectionError(f"channel_rank needs [S, C] FV and [N, C] natural responses, got {list(fv.shape)} and "
                             f"{list(nat.shape)}")
    n_c = fv.shape[1]
    if not 0 <= channel < n_c:
        raise DetectionError(f"channel {channel} out of range for a layer of {n_c} channels")
    if n_c < 2 or nat.shape[0] < 2 or fv.shape[0] < 1:
        return float("nan")
    mu, sd = nat.mean(0), nat.std(0)
    sd = torch.maximum(sd, 1e-6 * (1.0 + mu.abs()))
    z = (fv - mu) / sd  # [S, C]
    own = z[:, channel : channel + 1]
    others = torch.cat([z[:, :channel], z[:, channel + 1 :]], 1)
    share = ((others > own).double() + 0.5 * (others == own).double()).mean(1)  # [S]
    return float(share.median())


def _channel_of(unit) -> int | None:
    """The channel of a Unit or of a unit spec ``"layer:c"`` / ``"layer:c@y,x"`` (None: no channel)."""
    if isinstance(unit, str):
        m = re.fullmatch(r".+:(\d+)(@\d+,\d+)?", unit.strip())
        return int(m.group(1)) if m else None
    ch = getattr(unit, "channel", None)
    return None if ch is None else int(ch)


def _nanmean(v: Sequence[float]) -> float:
    a = np.asarray([x for x in v if x is not None and math.isfinite(x)], dtype=np.float64)
    return float(a.mean()) if a.size else float("nan")


def _nanmin(v: Sequence[float]) -> float:
    a = np.asarray([x for x in v if x is not None and math.isfinite(x)], dtype=np.float64)
    return float(a.min()) if a.size else float("nan")


def signals_from_path(up, fv_acts: Mapping[str, torch.Tensor] | None = None, nat_acts: Mapping[str, torch.Tensor] | None = None,
                      metric: str = "spearman") -> UnitSignals:
    """A unit's signals from its :class:`~fvsanity.compare.path.UnitPath` and, for exemplar
    agreement, its pooled activations (``fv_acts`` {layer: [S, C]}, ``nat_acts`` {layer: [N, C]};
    without them the exemplar signals are NaN)."""
    from .verdict import DIVERGES

    # the ratio as computed (``normalized_raw``), also where the check withholds it for want of a
    # scale: a detector's input, calibrated on its tuning split, not a claim
    norms = [getattr(r, "normalized_raw", r.normalized) for r in up.layers]
    own = up.layers[-1] if up.layers else None
    vals = {
        "path_own": float(norms[-1]) if own is not None else float("nan"),
        "path_min": _nanmin(norms),
        "path_mean": _nanmean(norms),
        "p_natural_like_own": float(own.p_natural_like) if own is not None else float("nan"),
        "log_activation_range": float("nan"),
        "exemplar_own": float("nan"),
        "exemplar_mean": float("nan"),
        "rank_own": float("nan"),
    }
    if up.activation is not None:
        r = float(up.activation.ratio_median)
        vals["log_activation_range"] = math.log(max(r, 1e-6))
    if fv_acts is not None and nat_acts is not None and up.top_k_indices:
        per = [exemplar_agreement(fv_acts[r.name], nat_acts[r.name], up.top_k_indices, metric) for r in up.layers]
        vals["exemplar_own"] = per[-1]
        vals["exemplar_mean"] = _nanmean(per)
    own_layer = up.layers[-1].name if up.layers else None
    channel = _channel_of(up.unit)
    if fv_acts is not None and nat_acts is not None and own_layer in fv_acts and channel is not None:
        vals["rank_own"] = channel_rank(fv_acts[own_layer], nat_acts[own_layer], int(channel))
    diverges_any = any(r.outcome == DIVERGES for r in up.layers)
    return UnitSignals(up.unit, vals, up.verdict.outcome, diverges_any)


def detection_signals(lm, units, fv_images, natural, settings=None, *, progress: bool = False, device=None,
                      cache_dir=None):
    """The path check of ``units`` on ``lm`` (one natural pass, one FV pass) and every unit's signals.

    Args:
        lm: the model as the auditor has it (original or manipulated: nothing here knows which).
        units: U units (Units or specs); fv_images: [U, S, 3, H, W] or an FVResult rendered on ``lm``.
        natural: :class:`~fvsanity.data.NaturalImages`.
        settings: :class:`~fvsanity.compare.path.PathCheckSettings` (its metric also scores the
            exemplar agreement).
        cache_dir: reuse the natural pass from this folder (:func:`~fvsanity.compare.pipeline.natural_pass`).

    Returns:
        (PathCheck, [UnitSignals] in the order of ``units``).
    """
    from .path import PathCheckSettings, _fv_tensor, fv_activations, path_check, unit_layers
    from .pipeline import natural_pass, resolve_units

    st = settings or PathCheckSettings()
    units = resolve_units(units, lm)
    paths, union = unit_layers(lm, units, st)
    fv = _fv_tensor(fv_images)
    npass = natural_pass(lm, natural, union, units, batch_size=st.batch_size, device=device, progress=progress,
                         cache_dir=cache_dir)
    fv_acts = fv_activations(lm, fv, union, st.batch_size, device)
    check = path_check(lm, units, fv_images, natural, st, natural_pass=npass, fv_acts=fv_acts, device=device)
    nat_acts = npass.acts if hasattr(npass, "acts") else tuple(npass)[0]
    out = []
    for i, up in enumerate(check.units):
        out.append(signals_from_path(up, {n: fv_acts[n][i] for n in paths[i]}, nat_acts, st.metric))
    return check, out


# ----------------------------------------------------------------------------- combined score
def signal_matrix(signals: Sequence[UnitSignals], names: Sequence[str] = tuple(SIGNALS)) -> np.ndarray:
    """[U, K] float64 of the named signals (NaN where undefined)."""
    return np.asarray([[float(s.values.get(n, float("nan"))) for n in names] for s in signals], dtype=np.float64).reshape(
        len(signals), len(names))


def orient(values: np.ndarray, name: str) -> np.ndarray:
    """A signal as a suspicion score (larger = more suspicious), by its :data:`SIGNALS` direction."""
    return SIGNALS[name][0] * np.asarray(values, dtype=np.float64)


def atypicality(x: np.ndarray, center, spread) -> np.ndarray:
    """Two-sided distance of signals from the healthy band: log1p(|x - center| / spread), per column.

    Args:
        x: [U, K] signals (NaN stays NaN); center, spread: [K] (the healthy tuning units' median
            and scaled MAD, :func:`healthy_band`).
    Returns:
        [U, K] float64 >= 0 (0 at the center); finite wherever ``x`` is.
    """
    x = np.asarray(x, dtype=np.float64)
    return np.log1p(np.abs(x - np.asarray(center, dtype=np.float64)) / np.asarray(spread, dtype=np.float64))


def _with_atypicality(x: np.ndarray, center, spread) -> np.ndarray:
    """[U, 2K]: the signals, then their :func:`atypicality` (a two-sided fit's features)."""
    return np.concatenate([x, atypicality(x, center, spread)], axis=1)


def healthy_band(healthy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([K] median, [K] spread) of healthy signal columns: spread = 1.4826 MAD (the SD of a normal),
    floored at 1e-3 (1 + |median|) so a constant column gives finite atypicalities; an all-NaN
    column gets center 0, spread 1."""
    h = np.asarray(healthy, dtype=np.float64)
    center, spread = np.zeros(h.shape[1]), np.ones(h.shape[1])
    for k in range(h.shape[1]):
        col = h[:, k][np.isfinite(h[:, k])]
        if col.size:
            center[k] = np.median(col)
            spread[k] = max(1.4826 * np.median(np.abs(col - center[k])), 1e-3 * (1.0 + abs(center[k])))
    return center, spread


@dataclass(frozen=True)
class CombinedScore:
    """A logistic regression on standardized signals (see the module doc), fit on tuning units.

    Attributes:
        names: the signals used, in order; mean, scale: [K] standardization (from tuning);
        coef: [K] weights, intercept: bias (score = intercept + coef . z; larger = more suspicious);
        l2: the penalty it was fit with; threshold_5fpr: score threshold at <= 5% FPR on the healthy
        tuning units (flag = score > threshold); n_tuning: {"healthy": n, "manipulated": m}.
        center, spread: [K] healthy band (:func:`healthy_band`) of a two-sided fit, whose features
        are the K signals then their K atypicalities (mean, scale, coef: [2K]); empty: one-sided.
    """

    names: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    l2: float
    threshold_5fpr: float = float("nan")
    n_tuning: dict = field(default_factory=dict)
    center: tuple[float, ...] = ()
    spread: tuple[float, ...] = ()

    def features(self, x: np.ndarray) -> np.ndarray:
        """The fit's features of an [U, K] signal matrix: the signals, then (two-sided) their atypicalities."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.names):
            raise DetectionError(f"signal matrix must be [U, {len(self.names)}] ({', '.join(self.names)}), got {x.shape}")
        return _with_atypicality(x, self.center, self.spread) if self.center else x

    def score(self, x: np.ndarray) -> np.ndarray:
        """[U] scores of an [U, K] signal matrix (columns in ``names`` order; NaN -> tuning mean)."""
        x = self.features(x)
        z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        z = np.where(np.isfinite(z), z, 0.0)
        return self.intercept + z @ np.asarray(self.coef)

    def score_units(self, signals: Sequence[UnitSignals]) -> np.ndarray:
        return self.score(signal_matrix(signals, self.names))

    def to_json(self) -> dict:
        return {"kind": "logistic regression on standardized signals", "names": list(self.names),
                "mean": list(self.mean), "scale": list(self.scale), "coef": list(self.coef),
                "intercept": self.intercept, "l2": self.l2, "threshold_5fpr": self.threshold_5fpr,
                "n_tuning": dict(self.n_tuning),
                **({"two_sided": {"center": list(self.center), "spread": list(self.spread)}} if self.center else {})}

    @classmethod
    def from_json(cls, d: Mapping) -> CombinedScore:
        two = d.get("two_sided") or {}
        return cls(tuple(d["names"]), tuple(d["mean"]), tuple(d["scale"]), tuple(d["coef"]), float(d["intercept"]),
                   float(d["l2"]), float(d.get("threshold_5fpr", float("nan"))), dict(d.get("n_tuning", {})),
                   tuple(two.get("center", ())), tuple(two.get("spread", ())))


def fit_combined(healthy: np.ndarray, manipulated: np.ndarray, names: Sequence[str], l2: float = 1.0,
                 fpr: float = 0.05, two_sided: bool = False) -> CombinedScore:
    """Fit :class:`CombinedScore` on tuning signal matrices ``healthy`` [n, K] and ``manipulated`` [m, K].

    Columns that are NaN everywhere, or constant, get weight 0. Classes are weighted equally;
    the loss is the mean weighted log-loss + ``l2`` / (2 (n + m)) |coef|^2, minimized by L-BFGS
    (deterministic). The threshold is :func:`threshold_at_fpr` of the healthy tuning scores.
    ``two_sided``: also fit on each signal's :func:`atypicality` from the healthy tuning band.
    """
    h, m = np.asarray(healthy, dtype=np.float64), np.asarray(manipulated, dtype=np.float64)
    if h.ndim != 2 or m.ndim != 2 or h.shape[1] != len(names) or m.shape[1] != len(names):
        raise DetectionError(f"signal matrices must be [n, {len(names)}], got {h.shape} and {m.shape}")
    if len(h) < 1 or len(m) < 1:
        raise DetectionError(f"need >= 1 healthy and >= 1 manipulated tuning unit, got {len(h)} and {len(m)}")
    center, spread = healthy_band(h) if two_sided else ((), ())
    if two_sided:
        h, m = (_with_atypicality(a, center, spread) for a in (h, m))
    x = np.concatenate([h, m])
    mean = np.array([np.nanmean(c) if np.isfinite(c).any() else 0.0 for c in x.T])
    sd = np.array([np.nanstd(c) if np.isfinite(c).sum() > 1 else 0.0 for c in x.T])
    usable = sd > 1e-12
    scale = np.where(usable, sd, 1.0)
    z = (x - mean) / scale
    z = np.where(np.isfinite(z), z, 0.0) * usable
    y = np.concatenate([np.zeros(len(h)), np.ones(len(m))])
    w = np.where(y == 1, 0.5 / len(m), 0.5 / len(h))
    zt, yt, wt = (torch.tensor(a, dtype=torch.float64) for a in (z, y, w))
    coef = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([coef, b], lr=1.0, max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logit = zt @ coef + b
        loss = (wt * torch.nn.functional.binary_cross_entropy_with_logits(logit, yt, reduction="none")).sum()
        loss = loss + float(l2) / (2.0 * len(y)) * (coef ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    c = coef.detach().numpy() * usable
    band = (tuple(float(v) for v in center), tuple(float(v) for v in spread))
    cs = CombinedScore(tuple(names), tuple(float(v) for v in mean), tuple(float(v) for v in scale),
                       tuple(float(v) for v in c), float(b.detach()), float(l2), center=band[0], spread=band[1])
    thr = threshold_at_fpr(cs.score(np.asarray(healthy, dtype=np.float64)), fpr)
    return CombinedScore(cs.names, cs.mean, cs.scale, cs.coef, cs.intercept, cs.l2, thr,
                         {"healthy": int(len(h)), "manipulated": int(len(m))}, *band)


# ----------------------------------------------------------------------------- calibrated score in check / audit
#: the signals a saved check.json / audit.json unit holds (no activations: no exemplar agreement)
PATH_SIGNALS = ("path_own", "path_min", "path_mean", "p_natural_like_own", "log_activation_range")


def signals_from_json(unit: Mapping) -> dict[str, float]:
    """The :data:`PATH_SIGNALS` of one unit of a check.json / audit.json (``UnitPath.to_json``),
    exactly as :func:`signals_from_path` computes them (exemplar signals NaN)."""
    layers = unit.get("layers") or []
    norms = [r.get("normalized_raw", r.get("normalized")) for r in layers]  # as signals_from_path
    own = layers[-1] if layers else {}
    ar = unit.get("activation_range") or None
    vals = {n: float("nan") for n in SIGNALS}
    vals.update({
        "path_own": float(norms[-1]) if layers and norms[-1] is not None else float("nan"),
        "path_min": _nanmin(norms), "path_mean": _nanmean(norms),
        "p_natural_like_own": float(own["p_natural_like"]) if own.get("p_natural_like") is not None else float("nan"),
    })
    if ar:
        vals["log_activation_range"] = math.log(max(float(ar["ratio_median"]), 1e-6))
    return vals


@dataclass(frozen=True)
class Calibration:
    """The calibrated scores measured for one model: by ``fvsanity calibrate`` (calibration.json)
    or by ``experiments/detection`` (results.json).

    Attributes:
        model: the model name it was measured on; source: the file's path.
        fingerprint, fv: the model fingerprint and FV settings (:func:`fv_identity`) it was
            measured with (calibration.json; None for a results.json).
        other_weights: loaded for a manipulated copy of the calibrated model (a ``fvsanity fool``
            model whose recorded base fingerprint is the calibrated one, same architecture): the
            rates are those measured on the calibrated model.
        scores: {"combined": CombinedScore (every signal), "combined_path": CombinedScore
            (:data:`PATH_SIGNALS` only)}; operating: per score, what was measured on evaluation
            units at its 5%-FPR threshold: {"healthy_fpr": float, "tpr": {method: float}}, and,
            where the tuning units sufficed for one, at its confident threshold (FPR <= 5% with
            probability ``confidence``): "confident": {"threshold", "confidence", "healthy_fpr",
            "tpr": {method: float}}.
    """

    model: str
    source: str
    scores: dict
    operating: dict
    fingerprint: str | None = None
    fv: dict | None = None
    other_weights: bool = False

    def rate(self, values: Mapping[str, float]) -> dict:
        """One unit's calibrated score from its signals (``values``: name -> float; the full
        score when its exemplar signals are finite, else the path-only score).

        Returns:
            {"score_name", "score", "threshold", "flagged", "healthy_fpr", "tpr", "measured_on",
            "text"}: ``text`` e.g. "calibrated score 2.31 > 0.85: flagged at the 5%-FPR threshold
            measured on cifar10-resnet20 (healthy FPR 3.3%, TPR circuit:unit 97%, ...)".
        """
        full = all(math.isfinite(values.get(n, float("nan"))) for n in ("exemplar_own", "exemplar_mean"))
        name = "combined" if full and "combined" in self.scores else "combined_path"
        cs: CombinedScore = self.scores[name]
        x = np.asarray([[values.get(n, float("nan")) for n in cs.names]], dtype=np.float64)
        s = float(cs.score(x)[0])
        flagged = s > cs.threshold_5fpr
        op = self.operating.get(name, {})
        tpr = op.get("tpr", {})
        fpr_txt = f"healthy FPR {100 * op['healthy_fpr']:.1f}%" if op.get("healthy_fpr") is not None else "healthy FPR n/a"
        tpr_txt = ", ".join(f"{m} {100 * v:.0f}%" for m, v in tpr.items())
        text = (f"calibrated score ({name}) {s:.2f} {'>' if flagged else '<='} {cs.threshold_5fpr:.2f}: "
                f"{'flagged' if flagged else 'not flagged'} at the 5%-FPR threshold measured on {self.model} "
                f"({fpr_txt}" + (f"; TPR {tpr_txt}" if tpr_txt else "") + " on its evaluation units)")
        out = {"score_name": name, "score": s, "threshold": cs.threshold_5fpr, "flagged": bool(flagged),
               "healthy_fpr": op.get("healthy_fpr"), "tpr": dict(tpr), "measured_on": self.model,
               "source": self.source}
        c = op.get("confident")
        if c:
            fc = s > c["threshold"]
            out["confident"] = {**c, "flagged": bool(fc)}
            text += (f"; {'flagged' if fc else 'not flagged'} at the {100 * c['confidence']:.0f}%-confident threshold "
                     f"{c['threshold']:.2f} (healthy FPR {100 * c['healthy_fpr']:.1f}%; TPR "
                     + ", ".join(f"{m} {100 * v:.0f}%" for m, v in c["tpr"].items()) + ")")
        out["text"] = text
        return out


def fv_identity(lm, render, seeds: int | None) -> dict:
    """The FV settings a calibration holds for ``lm``: what a check/audit with ``render`` (a
    :class:`~fvsanity.generate.RenderSettings`) and ``seeds`` FVs per unit renders with (None:
    automatic, not yet resolved: left out, so not compared).

    Returns:
        {"steps", "size": [H, W] px (resolved), "param", "lr", "transforms", "diversity",
        "optimizer", "dtype" (the compute dtype it resolves to on the model's device), "seeds"
        (unless None)}.
    """
    from ..generate.render import dtype_settings

    size = render.size
    hw = list(lm.input_size) if size is None else ([int(size)] * 2 if isinstance(size, int) else [int(x) for x in size])
    name = lambda v: v if isinstance(v, str) else getattr(v, "__name__", repr(v))  # noqa: E731
    return {"steps": int(render.steps), "size": hw, "param": name(render.param), "lr": float(render.lr),
            "transforms": name(render.transforms), "diversity": float(render.diversity),
            "optimizer": name(render.optimizer),
            "dtype": dtype_settings(render.amp, render.device or lm.device).get("dtype", "float32"),
            **({} if seeds is None else {"seeds": int(seeds)})}


def load_calibration(path, model, fv: Mapping | None = None) -> Calibration:
    """The calibrated scores of ``model`` from a calibration.json (``fvsanity calibrate``) or a
    detection results.json (``experiments/detection``).

    Args:
        model: a :class:`~fvsanity.models.LoadedModel` (a calibration.json must hold its
            fingerprint) or a model name (names are compared only).
        fv: the FV settings the check/audit is about to use (:func:`fv_identity`); a
            calibration.json measured with other ones is refused. None: not compared.

    Raises:
        DetectionError: one line: the file is missing or not a calibration, or it was measured on
            another model (name or fingerprint) or with other FV settings (naming them).
    """
    import json
    from pathlib import Path

    name = model if isinstance(model, str) else model.name
    p = Path(path)
    if not p.is_file():
        raise DetectionError(f"--calibration file not found: {str(p)!r} (give the calibration.json of "
                             f"`fvsanity calibrate` or figures/detection/results.json)")
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise DetectionError(f"--calibration {str(p)!r} is not JSON: {type(e).__name__}") from e
    if isinstance(doc, dict) and str(doc.get("format", "")).startswith("fvsanity-calibration/"):
        return _from_calibration(p, doc, model, name, fv)
    models = [k for k, v in doc.items() if isinstance(v, dict) and "combined_score" in v] if isinstance(doc, dict) else []
    if not models:
        raise DetectionError(f"--calibration {str(p)!r} is not a calibration.json or a detection results.json "
                             f"(no model with a combined_score)")
    if name not in models:
        raise DetectionError(f"--calibration {str(p)!r} was measured on {', '.join(models)}, not on {name!r}; "
                             f"its threshold does not transfer (run `fvsanity calibrate --model {name}`)")
    return _calibration_of(p, doc[name], name)


def _from_calibration(p, doc: Mapping, model, name: str, fv: Mapping | None) -> Calibration:
    """A calibration.json, refused for another model fingerprint or other FV settings."""
    m = doc.get("model") or {}
    fp = m.get("fingerprint")
    other_weights = False
    if not isinstance(model, str):
        from ..fingerprint import architecture_signature

        here = model.fingerprint()
        base = (getattr(getattr(model, "model", None), "info", None) or {}).get("base") or {}
        # a model `fvsanity fool` built from the calibrated one (the robustness demo): the same
        # architecture, and the calibrated fingerprint recorded as its base
        manipulated_copy = (fp is not None and base.get("fingerprint") == fp
                            and m.get("architecture") in (None, architecture_signature(model)))
        if fp != here and not manipulated_copy:
            raise DetectionError(f"--calibration {str(p)!r} was measured on model {m.get('name')!r} with fingerprint "
                                 f"{str(fp)[:12]}, not on this {name!r} (fingerprint {here[:12]}); its thresholds do "
                                 f"not transfer (run `fvsanity calibrate` on this model)")
        other_weights = fp != here
    elif m.get("name") != name:
        raise DetectionError(f"--calibration {str(p)!r} was measured on {m.get('name')}, not on {name!r}; "
                             f"its threshold does not transfer (run `fvsanity calibrate --model {name}`)")
    have = doc.get("fv") or {}
    if fv is not None:
        diff = [k for k in fv if k in have and json.dumps(have[k]) != json.dumps(fv[k])]
        if diff:
            was = ", ".join(f"{k} {have[k]}" for k in diff)
            now = ", ".join(f"{k} {fv[k]}" for k in diff)
            raise DetectionError(f"--calibration {str(p)!r} was measured with FV settings {was}, not {now} as this run "
                                 f"uses; pass those settings or re-run `fvsanity calibrate` with these")
    return dataclasses.replace(_calibration_of(p, doc, str(m.get("name", name))), fingerprint=fp, fv=dict(have),
                               other_weights=other_weights)


def _calibration_of(p, r: Mapping, model: str) -> Calibration:
    """The scores and operating points of one results entry (results.json) or calibration.json."""
    scores, operating = {}, {}
    for name, key, fpr_key in (("combined", "combined_score", "combined_eval_healthy_fpr"),
                               ("combined_path", "combined_path_score", "combined_path_eval_healthy_fpr")):
        if key not in r:
            continue
        scores[name] = CombinedScore.from_json(r[key])
        operating[name] = {"healthy_fpr": r.get(fpr_key),
                           "tpr": {m: v["signals"][name]["tpr_at_5fpr"] for m, v in r.get("methods", {}).items()
                                   if name in v.get("signals", {})}}
        conf = r.get(f"{name}_confident") or {}
        if conf.get("attainable"):  # older results.json files have none
            operating[name]["confident"] = {
                "threshold": conf["threshold"], "confidence": conf["confidence"], "healthy_fpr": conf["fpr_at_threshold"],
                "tpr": {m: v["signals"][name]["confident"]["tpr"] for m, v in r.get("methods", {}).items()
                        if (v.get("signals", {}).get(name) or {}).get("confident", {}).get("attainable")}}
    if "combined_path" not in scores:
        raise DetectionError(f"--calibration {str(p)!r} has no path-only score for {model!r}; re-run the calibration")
    return Calibration(model, str(p), scores, operating)
