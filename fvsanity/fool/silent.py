"""Silent units (Geirhos et al. 2023): a parallel channel that is exactly zero on natural images
but dominates the unit's FV.

For a routed channel c of a layer with output y, the silent channel is

    s = ReLU(z - b),   z = (y_c - mu_c)/sd_c + lam * (t - mu_t)/sd_t,

where t is the target pathway (channel ``source`` of the same layer, per position, or a
picture-template value per image), mu/sd are natural-image statistics and the bias b is set at
or above the largest z over a calibration split (plus a small margin), so s = 0 exactly on every
calibration image. The unit becomes ``y_c + strength * sd_c * s``. FV optimization first drives
y_c far beyond its natural range (FVs always do), z crosses b, and from there the silent channel's
gradient (weight ``strength``, mostly along the target, weight ``lam``) takes over: the FV shows
the target. As in the paper's construction (filter ``w + lam*dw``, weight factor 100, bias below
the natural maximum) the unit's own direction is part of z so that the optimizer reaches the
silent regime at all. The silent channel is hookable at ``<layer>.silent`` (``[N,R,...]``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import FVSanityError
from ..hooks import capture
from ..models import LoadedModel
from .circuit import _bshape, _group, _picture_templates
from .model import ManipulatedModel, register_edit, wrap_loaded
from .routes import Route

__all__ = ["SilentEdit", "build_silent_units", "silent_zero_fraction"]


@register_edit("silent")
class SilentEdit(nn.Module):
    """Wraps layer ``orig``; adds ``strength * sd_c * ReLU(z - bias)`` to each routed channel."""

    def __init__(self, orig: nn.Module, channels, sources, pictures, lam: float = 3.0, strength: float = 100.0):
        super().__init__()
        self.orig = orig
        self.silent = nn.ReLU()
        ch = torch.as_tensor(channels, dtype=torch.long)
        r = len(ch)
        self.register_buffer("channels", ch)
        self.register_buffer("sources", torch.as_tensor(sources, dtype=torch.long))
        self.register_buffer("pictures", torch.as_tensor(pictures, dtype=torch.long))
        if not (r == len(self.sources) == len(self.pictures)) or len(set(ch.tolist())) != r:
            raise FVSanityError("each routed channel appears once, with one source or picture")
        if bool(((self.sources < 0) == (self.pictures < 0)).any()):
            raise FVSanityError("every route needs exactly one of a source channel and a picture")
        self.has_pictures = bool((self.pictures >= 0).any())
        for name in ("mu_c", "mu_t", "bias"):
            self.register_buffer(name, torch.zeros(r))
        for name in ("sd_c", "sd_t"):
            self.register_buffer(name, torch.ones(r))
        self.register_buffer("lam", torch.full((r,), float(lam)))
        self.register_buffer("strength", torch.full((r,), float(strength)))

    def spec(self) -> dict:
        return {
            "channels": self.channels.tolist(), "sources": self.sources.tolist(), "pictures": self.pictures.tolist(),
            "lam": self.lam.tolist(), "strength": self.strength.tolist(), "bias": self.bias.tolist(),
        }

    @classmethod
    def from_spec(cls, orig: nn.Module, spec: dict) -> SilentEdit:
        return cls(orig, spec["channels"], spec["sources"], spec["pictures"])

    def _v(self, name: str, y: torch.Tensor) -> torch.Tensor:
        return getattr(self, name).to(y.dtype).view(1, -1, *_bshape(y))

    def pre_activation(self, y: torch.Tensor, template: torch.Tensor | None) -> torch.Tensor:
        """``[N,R,...]`` z - bias for the layer output ``y`` (the silent channel before ReLU)."""
        yc = y.index_select(1, self.channels)
        t = y.index_select(1, self.sources.clamp(min=0))
        if self.has_pictures:
            if template is None:
                raise RuntimeError("picture routes need template values (run through ManipulatedModel)")
            tv = template.to(y.dtype).index_select(1, self.pictures.clamp(min=0))
            tv = tv.view(*tv.shape, *_bshape(y)).expand_as(t)
            t = torch.where((self.pictures >= 0).view(1, -1, *_bshape(y)), tv, t)
        z = (yc - self._v("mu_c", y)) / self._v("sd_c", y) + self._v("lam", y) * (t - self._v("mu_t", y)) / self._v("sd_t", y)
        return z - self._v("bias", y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.orig(x)
        st = getattr(self, "_state", None)
        s = self.silent(self.pre_activation(y, st.template if st is not None else None))
        new = y.index_select(1, self.channels) + self._v("strength", y) * self._v("sd_c", y) * s
        return y.index_copy(1, self.channels, new)


@torch.no_grad()
def _stream(w: ManipulatedModel, pre, layer: str, images: torch.Tensor, fn, batch: int = 50) -> None:
    """Run the (manipulated) model on ``images``; call ``fn(y, template)`` with the layer's raw
    output (``<layer>.orig``) and this batch's template values."""
    dev = next(w.parameters()).device
    with capture(w, [f"{layer}.orig"], detach=True) as store:
        for i in range(0, len(images), batch):
            x = pre(images[i : i + batch].to(dev))
            # the same ops as ManipulatedModel.forward, so z matches bit for bit
            tmpl = w.fool.pictures(w.fool.unpreprocess(x)) if w.fool.pictures is not None else None
            w(x)
            fn(store[f"{layer}.orig"], tmpl)


def build_silent_units(
    lm: LoadedModel,
    routes: list[Route],
    calibration_images: torch.Tensor,
    *,
    lam: float = 3.0,
    strength: float = 100.0,
    margin: float = 1e-3,
    template_size: int | None = None,
) -> LoadedModel:
    """A copy of ``lm`` whose routed units carry silent channels calibrated on natural images.

    Args:
        routes: from :func:`~fvsanity.fool.make_routes`.
        calibration_images: ``[N,3,H,W]`` natural images in [0,1]; statistics and the bias come
            from these only (evaluate on others).
        lam: weight of the target in z (the paper's lambda = 3); strength: weight of the silent
            channel in the unit, in units of the channel's natural sd (the paper's factor 100).
        margin: the bias sits this far (in z units) above the calibration maximum.
    """
    if calibration_images is None or len(calibration_images) < 2:
        raise FVSanityError("silent units need at least 2 calibration natural images")
    by_layer, pics, names, index = _group(routes)
    w = ManipulatedModel(lm.model, lm.preprocess)
    if pics:
        w.set_pictures(_picture_templates(lm, pics, by_layer, index, calibration_images, template_size))
    for layer, rs in by_layer.items():
        edit = SilentEdit(
            w.module_at(layer),
            [r.unit.channel for r in rs],
            [r.source.channel if r.source is not None else -1 for r in rs],
            [index[id(r.picture)] if r.picture is not None else -1 for r in rs],
            lam=lam,
            strength=strength,
        )
        edit.bias.fill_(float("inf"))  # silent while calibrating
        w.replace(layer, edit)
        # pass 1: natural mean/sd of the unit and of its target (over images and positions)
        acc = {"n": 0.0}

        def moments(y, tmpl, e=edit, acc=acc):
            yc = y.index_select(1, e.channels).double()
            t = y.index_select(1, e.sources.clamp(min=0)).double()
            if e.has_pictures:
                tv = tmpl.double().index_select(1, e.pictures.clamp(min=0))
                tv = tv.view(*tv.shape, *_bshape(y)).expand_as(t)
                t = torch.where((e.pictures >= 0).view(1, -1, *_bshape(y)), tv, t)
            dims = [0] + list(range(2, y.ndim))
            n = yc.numel() / yc.shape[1]
            for key, v in (("c", yc), ("t", t)):
                acc[key + "1"] = acc.get(key + "1", 0) + v.sum(dims)
                acc[key + "2"] = acc.get(key + "2", 0) + (v * v).sum(dims)
            acc["n"] += n

        _stream(w, lm.preprocess, layer, calibration_images, moments)
        for key in ("c", "t"):
            mean = acc[key + "1"] / acc["n"]
            var = (acc[key + "2"] / acc["n"] - mean * mean).clamp(min=0)
            sd = torch.sqrt(var)
            sd = torch.where(sd > 1e-6 * (1 + mean.abs()), sd, torch.ones_like(sd))  # constant feature
            getattr(edit, f"mu_{key}").copy_(mean.float())
            getattr(edit, f"sd_{key}").copy_(sd.float())
        # pass 2: bias = max over calibration images and positions of z, plus margin
        edit.bias.zero_()
        zmax = {"v": None}

        def maxz(y, tmpl, e=edit, zmax=zmax):
            z = e.pre_activation(y, tmpl)
            m = z.transpose(0, 1).flatten(1).amax(1)
            zmax["v"] = m if zmax["v"] is None else torch.maximum(zmax["v"], m)

        _stream(w, lm.preprocess, layer, calibration_images, maxz)
        edit.bias.copy_(zmax["v"].float() + margin)
    w.info.update(
        method="silent", routes=len(routes), pictures=names, layers=sorted(by_layer), lam=lam,
        strength=strength, margin=margin, n_calibration=len(calibration_images),
    )
    return wrap_loaded(lm, w.to(lm.device), "silent")


@torch.no_grad()
def silent_zero_fraction(lm: LoadedModel, images: torch.Tensor, batch: int = 50) -> dict:
    """Fraction of ``images`` on which every silent channel is exactly zero everywhere.

    Returns ``{"fraction": float, "n": int, "max_activation": float}`` (max over images of the
    silent channels' largest value; 0.0 when all stayed silent).
    """
    w = lm.model
    if not isinstance(w, ManipulatedModel):
        raise FVSanityError(f"{lm.name} is not a manipulated model")
    names = [f"{layer}.silent" for layer, e in w.edits.items() if isinstance(e, SilentEdit)]
    if not names:
        raise FVSanityError(f"{lm.name} has no silent units")
    zero = []
    mx = 0.0
    dev = lm.device
    with capture(w, names, detach=True) as store:
        for i in range(0, len(images), batch):
            lm(images[i : i + batch].to(dev))
            per_img = torch.stack([store[n].flatten(1).amax(1) for n in names], 1).amax(1)
            zero.append(per_img == 0)
            mx = max(mx, float(per_img.max()))
    z = torch.cat(zero)
    return {"fraction": float(z.float().mean()), "n": len(z), "max_activation": mx}
