"""Exemplar agreement: does a unit's FV look, to the model, like the unit's own top natural images?

An honest FV of a unit and the natural images that excite the unit most (its top-k exemplars)
should share features not only at the unit's layer but at the layers before it. A manipulated
model can make the FV show anything (a gradient slingshot pulls it to a chosen picture) while the
unit's natural exemplars stay what they were; then the FV's features at earlier layers are no
closer to the exemplars' than those of random natural images.

Per layer (pooled activations, centred by the mean over the natural images)::

    fe = mean cos(FV, exemplar)          fr = mean cos(FV, random natural)
    ee = mean cos(exemplar, exemplar')   er = mean cos(exemplar, random natural)
    normalized = (fe - fr) / (ee - er)

``normalized`` is about 1 when the FVs resemble the exemplars as much as the exemplars resemble
each other, about 0 when they resemble them no more than random images do, negative when less.
The signal is flagged when the median over the layers falls below ``threshold``.

    from fvsanity.compare.exemplars import exemplar_agreement
    res = exemplar_agreement(lm, "layer3.2:5", fv.images[0], natural_images, k=16)
    res.normalized  # {layer: value}; res.flagged
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from ..errors import FVSanityError

__all__ = ["ExemplarAgreement", "agreement_from_features", "default_layers", "exemplar_agreement"]


@dataclass(frozen=True)
class ExemplarAgreement:
    """The exemplar-agreement signal of one unit.

    Attributes:
        unit: ``"layer:channel"``; layers: compared layers, earliest first (the unit's last).
        normalized: per layer ``(fe - fr) / (ee - er)`` (NaN where the exemplars are no closer to
            each other than to random images: no reference).
        fv_to_exemplars, fv_to_random, exemplars_to_exemplars, exemplars_to_random: the four mean
            cosines per layer.
        median: median of the finite ``normalized`` values (NaN if none).
        threshold: flag below this; flagged: ``median < threshold`` (None when undecidable).
        k, n_random, n_fv: exemplars, random naturals and FVs compared.
    """

    unit: str
    layers: list[str]
    normalized: dict[str, float]
    fv_to_exemplars: dict[str, float]
    fv_to_random: dict[str, float]
    exemplars_to_exemplars: dict[str, float]
    exemplars_to_random: dict[str, float]
    median: float
    threshold: float
    flagged: bool | None
    k: int
    n_random: int
    n_fv: int

    def to_json(self) -> dict:
        return asdict(self)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[A, B]`` cosine similarities of rows (zero rows give 0, not NaN)."""
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return a @ b.T


def agreement_from_features(fv: dict[str, torch.Tensor], exemplars: dict[str, torch.Tensor],
                            random: dict[str, torch.Tensor], center: dict[str, torch.Tensor] | None = None,
                            *, unit: str = "", threshold: float = 0.25, min_gap: float = 1e-6) -> ExemplarAgreement:
    """The signal from pooled features (float64 inside).

    Args:
        fv, exemplars, random: per layer ``[S,C]``, ``[k,C]`` (k >= 2), ``[M,C]`` features of the
            FVs, the unit's top exemplars and random natural images; layers in the given order.
        center: per layer ``[C]`` subtracted first (the natural mean); default: the mean of the
            exemplars and random images together.
        threshold: flagged when the median normalized agreement is below it.
        min_gap: ``ee - er`` at or below this leaves the layer NaN (no reference).

    Raises:
        FVSanityError: layers differ between the inputs, fewer than 2 exemplars, no FV or no
            random image.
    """
    layers = list(fv)
    if list(exemplars) != layers or list(random) != layers or not layers:
        raise FVSanityError(f"fv, exemplars and random must have the same layers; got {list(fv)}, {list(exemplars)}, "
                            f"{list(random)}")
    out = {"n": {}, "fe": {}, "fr": {}, "ee": {}, "er": {}}
    k = n_r = n_f = 0
    for layer in layers:
        f, e, r = (t[layer].detach().double().flatten(1).cpu() for t in (fv, exemplars, random))
        k, n_r, n_f = len(e), len(r), len(f)
        if k < 2 or n_r < 1 or n_f < 1:
            raise FVSanityError(f"exemplar agreement needs >= 2 exemplars, >= 1 random image and >= 1 FV; "
                                f"got {k}, {n_r}, {n_f}")
        c = center[layer].detach().double().cpu() if center is not None else torch.cat([e, r]).mean(0)
        f, e, r = f - c, e - c, r - c
        fe, fr, er = _cos(f, e).mean(), _cos(f, r).mean(), _cos(e, r).mean()
        ee_m = _cos(e, e)
        ee = (ee_m.sum() - ee_m.diagonal().sum()) / (k * (k - 1))
        gap = float(ee - er)
        out["n"][layer] = float((fe - fr) / gap) if gap > min_gap else float("nan")
        out["fe"][layer], out["fr"][layer], out["ee"][layer], out["er"][layer] = float(fe), float(fr), float(ee), float(er)
    finite = [v for v in out["n"].values() if math.isfinite(v)]
    med = float(torch.tensor(finite).median()) if finite else float("nan")
    # torch's median of an even count is the lower middle; use the mean of the two middles
    if finite and len(finite) % 2 == 0:
        s = sorted(finite)
        med = (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2
    return ExemplarAgreement(unit, layers, out["n"], out["fe"], out["fr"], out["ee"], out["er"], med, threshold,
                             (med < threshold) if finite else None, k, n_r, n_f)


def default_layers(lm, layer: str, n_earlier: int = 2) -> list[str]:
    """The unit's ``layer`` and up to ``n_earlier`` block layers before it (earliest first)."""
    blocks = list(lm.block_layers)
    if layer in blocks:
        before = blocks[: blocks.index(layer)]
    else:
        names = [n for n, _ in lm.model.named_modules()]
        pos = names.index(layer) if layer in names else len(names)
        before = [b for b in blocks if b in names and names.index(b) < pos]
    return before[max(0, len(before) - n_earlier):] + [layer]


def exemplar_agreement(lm, unit, fv_images: torch.Tensor, natural, *, k: int = 16, layers: Sequence[str] | None = None,
                       n_random: int = 64, seed: int = 0, threshold: float = 0.25,
                       batch_size: int = 64) -> ExemplarAgreement:
    """The exemplar-agreement signal of ``unit`` for its FVs ``fv_images`` ``[S,3,H,W]`` (RGB
    [0,1]) against its top-``k`` exemplars among ``natural`` (``[N,3,H,W]`` or NaturalImages)
    and ``n_random`` other natural images drawn with ``seed``, at ``layers`` (default
    :func:`default_layers`: the unit's layer and two block layers before it).

    Raises:
        FVSanityError: ``k`` < 2 or too few natural images for ``k`` exemplars and 1 random one.
    """
    from ..activations import collect, collect_with_responses
    from ..units import parse_unit

    u = parse_unit(unit, lm) if isinstance(unit, str) else unit
    layers = list(layers) if layers is not None else default_layers(lm, u.layer)
    images = natural.images if hasattr(natural, "images") else natural
    n = len(images)
    if k < 2 or n < k + 1:
        raise FVSanityError(f"exemplar agreement: k={k} needs 2 <= k < number of natural images ({n})")
    feats, resp = collect_with_responses(lm, images, layers, [u], "mean", batch_size)
    order = torch.sort(resp[:, 0], descending=True, stable=True).indices
    top, rest = order[:k], order[k:]
    g = torch.Generator().manual_seed(int(seed))
    rnd = rest[torch.randperm(len(rest), generator=g)[: min(n_random, len(rest))]]
    fv_feats = collect(lm, fv_images, layers, "mean", batch_size)
    center = {la: feats[la].double().mean(0) for la in layers}
    return agreement_from_features({la: fv_feats[la] for la in layers}, {la: feats[la][top] for la in layers},
                                   {la: feats[la][rnd] for la in layers}, center, unit=str(u), threshold=threshold)
