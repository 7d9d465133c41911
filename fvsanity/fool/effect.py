"""Did the manipulation take effect? Per evaluated unit: did its manipulated FVs reach the target?

One criterion per kind of target (constants below; every number is measured on the ORIGINAL
model, which is what an auditor who compares FVs with their targets would see):

* **class unit target** (the route's source is a unit of the output layer): the original model
  classifies the manipulated FVs as the source's class in at least :data:`SEED_SHARE` of the
  seeds, and more often than it classifies the unit's original FVs so;
* **hidden unit target** (a source channel of another layer): the source unit's response to the
  manipulated FV, on the scale from its response to the unit's original FV (0) to its response
  to its own FV of the same seed (1), has a median over seeds of at least :data:`RESPONSE_SHARE`;
* **picture target**: the manipulated FVs' mean SSIM to the picture exceeds the original FVs'
  mean SSIM to it by at least :data:`PICTURE_SSIM_MARGIN` (SSIM of unrelated images to a picture is
  about 0.0-0.1 here; a manipulated FV that shows the picture reaches 0.25 and more).

``effective_fraction`` is the share of evaluated units that meet their criterion; the run
``took_effect`` when it is at least :data:`TOOK_EFFECT_FRACTION` (``fvsanity fool`` exits 3
otherwise, naming the setting to raise).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = [
    "EffectReport",
    "PICTURE_SSIM_MARGIN",
    "RESPONSE_SHARE",
    "SEED_SHARE",
    "TOOK_EFFECT_FRACTION",
    "UnitEffect",
    "measure_effect",
]

#: class targets: least share of seeds whose manipulated FV the original model calls the target class
SEED_SHARE = 0.5
#: hidden-unit targets: least median normalized response of the source unit (0 = original FV, 1 = its own FV)
RESPONSE_SHARE = 0.5
#: picture targets: least gain in mean SSIM to the picture over the original FVs'
PICTURE_SSIM_MARGIN = 0.1
#: the run took effect when at least this share of the evaluated units did
TOOK_EFFECT_FRACTION = 0.5

CRITERION = (f"class-unit target: the original model calls >= {SEED_SHARE:g} of the manipulated FVs (seeds) the "
             f"target class, and more of them than of the original FVs; hidden-unit target: the target unit's median "
             f"normalized response to the manipulated FVs (0 = to the original FV, 1 = to its own FV of the same seed) "
             f">= {RESPONSE_SHARE:g}; picture target: mean SSIM(manipulated FV, picture) >= mean SSIM(original FV, "
             f"picture) + {PICTURE_SSIM_MARGIN:g}. The run took effect when >= {TOOK_EFFECT_FRACTION:g} of the "
             f"evaluated units did.")


@dataclass(frozen=True)
class UnitEffect:
    """One evaluated unit: ``kind`` ``class`` | ``unit`` | ``picture``; ``manipulated`` /
    ``original``: the criterion's score for the manipulated / the original model's FVs (class: share
    of seeds called the target class; unit: median normalized response, 0 for the original by
    construction; picture: mean SSIM to the picture)."""

    unit: str
    target: str
    kind: str
    manipulated: float
    original: float
    effective: bool

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EffectReport:
    """How many evaluated units reached their target (:data:`CRITERION`)."""

    effective_fraction: float
    n_units: int
    n_effective: int
    took_effect: bool
    units: tuple[UnitEffect, ...]
    criterion: str = CRITERION

    def to_json(self) -> dict:
        return {"effective_fraction": self.effective_fraction, "n_units": self.n_units,
                "n_effective": self.n_effective, "took_effect": self.took_effect,
                "criterion": self.criterion, "units": [u.to_json() for u in self.units]}


@torch.no_grad()
def _responses(lm, unit, images: torch.Tensor) -> torch.Tensor:
    """[N] the pooled response of ``unit`` of ``lm`` to ``images`` [N,3,H,W]."""
    from ..activations import collect_with_responses

    _, resp = collect_with_responses(lm, images, [unit.layer], units=[unit], batch_size=len(images),
                                     trim_memory=False)
    return resp[:, 0].double()


@torch.no_grad()
def measure_effect(lm, routes, manipulated: torch.Tensor, original: torch.Tensor, targets: torch.Tensor,
                   ssim_manipulated: torch.Tensor, ssim_original: torch.Tensor) -> EffectReport:
    """The criterion of the module doc for each evaluated route.

    Args:
        lm: the ORIGINAL model (it judges what the FVs show).
        routes: the evaluated routes, ``U`` of them.
        manipulated, original: ``[U,S,3,H,W]`` FVs of the routed units on the manipulated / the
            original model (RGB in [0,1]).
        targets: ``[U,S,3,H,W]``: the source unit's FV on the original model (same seeds), or the
            picture at the FV size.
        ssim_manipulated, ssim_original: ``[U*S]`` SSIM of those FVs to ``targets`` (unit-major).
    """
    U, S = manipulated.shape[:2]
    sm = torch.as_tensor(ssim_manipulated, dtype=torch.float64).view(U, S)
    so = torch.as_tensor(ssim_original, dtype=torch.float64).view(U, S)
    out = []
    for i, r in enumerate(routes):
        if r.source is None:
            kind, target = "picture", r.picture_name or "picture"
            m, o = float(sm[i].mean()), float(so[i].mean())
            eff = m >= o + PICTURE_SSIM_MARGIN
        elif r.source.layer == lm.output_layer:
            kind, target = "class", str(r.source)
            dev = lm.device
            pm = lm(manipulated[i].to(dev)).argmax(1).cpu()
            po = lm(original[i].to(dev)).argmax(1).cpu()
            m, o = float((pm == r.source.channel).double().mean()), float((po == r.source.channel).double().mean())
            eff = m >= SEED_SHARE and m > o
        else:
            kind, target = "unit", str(r.source)
            a_m, a_o, a_t = (_responses(lm, r.source, x[i]) for x in (manipulated, original, targets))
            den = a_t - a_o
            ok = den > 0  # the source's own FV drives it more than the unit's original FV does
            norm = torch.where(ok, (a_m - a_o) / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(den))
            m, o = float(norm.median()), 0.0
            eff = bool(ok.any()) and m >= RESPONSE_SHARE
        out.append(UnitEffect(str(r.unit), target, kind, m, o, bool(eff)))
    n_eff = sum(u.effective for u in out)
    frac = n_eff / len(out) if out else float("nan")
    return EffectReport(frac, len(out), n_eff, bool(out) and frac >= TOOK_EFFECT_FRACTION, tuple(out))
