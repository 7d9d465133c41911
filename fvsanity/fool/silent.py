"""Silent units (Geirhos et al. 2023, the "orthogonal filters" construction): a parallel filter
that is exactly zero on natural images but dominates the unit's FV.

For a routed channel c of a convolution or linear layer with weights W (input x), the silent
filter is

    w' = strength * normalize(W_c + lam * dW),    s = ReLU(w' * x + b'),    unit c -> y_c + s,

where dW is the target direction made orthogonal to W_c and scaled to its norm: the weights of
another channel of the same layer (unit target), or the layer-input features of a picture minus
their natural mean (picture target). The bias b' sits at or below minus the largest response of
w' over a calibration split of natural images (plus a margin), so s = 0 exactly on every
calibration image. Along an FV trajectory of the original unit, W_c * x grows far beyond its
natural range while the orthogonal part stays near its natural level, so the optimizer enters the
silent regime; from there the silent filter's gradient (weight ``strength``, mostly along dW
for ``lam`` = 3) takes over and the FV shows the target. The silent channel is hookable at
``<layer>.silent`` (``[N,R,...]``) and its pre-activation at ``<layer>.pre``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FVSanityError
from ..hooks import capture, hooked
from ..layouts import pool, require
from ..models import LoadedModel
from .circuit import EDIT_LAYOUTS, _group
from .model import ManipulatedModel, register_edit, wrap_loaded
from .routes import Route

__all__ = ["SilentEdit", "TriggerEdit", "build_silent_units", "silent_zero_fraction"]


def _geometry(orig: nn.Module) -> dict:
    if isinstance(orig, nn.Conv2d):
        if orig.groups != 1:
            raise FVSanityError(f"silent units need an ungrouped convolution; this one has groups={orig.groups}")
        return {"kind": "conv", "stride": list(orig.stride), "padding": list(orig.padding) if not isinstance(orig.padding, str) else orig.padding,
                "dilation": list(orig.dilation)}
    if isinstance(orig, nn.Linear):
        return {"kind": "linear"}
    raise FVSanityError(
        f"silent units edit a Conv2d or Linear layer (they add a filter on its input); got {type(orig).__name__}"
    )


@register_edit("silent")
class SilentEdit(nn.Module):
    """Wraps a Conv2d/Linear ``orig``; adds ``ReLU(weight * x + bias)`` to each routed channel.

    ``weight`` is ``[R, C_in, kh, kw]`` (conv) or ``[R, C_in]`` (linear), ``bias`` ``[R]``.
    """

    def __init__(self, orig: nn.Module, channels, weight_shape=None):
        super().__init__()
        self.orig = orig
        self.geom = _geometry(orig)
        self.pre = nn.Identity()
        self.silent = nn.ReLU()
        ch = torch.as_tensor(channels, dtype=torch.long)
        if len(set(ch.tolist())) != len(ch):
            raise FVSanityError("each routed channel appears once")
        self.register_buffer("channels", ch)
        shape = weight_shape or (len(ch), *orig.weight.shape[1:])
        self.register_buffer("weight", torch.zeros(*shape))
        self.register_buffer("bias", torch.zeros(len(ch)))

    def spec(self) -> dict:
        return {"channels": self.channels.tolist(), "weight_shape": list(self.weight.shape), "geometry": self.geom}

    @classmethod
    def from_spec(cls, orig: nn.Module, spec: dict) -> SilentEdit:
        return cls(orig, spec["channels"], tuple(spec["weight_shape"]))

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.to(x.dtype), self.bias.to(x.dtype)
        if self.geom["kind"] == "conv":
            pad = self.geom["padding"]
            return F.conv2d(x, w, b, stride=self.geom["stride"], padding=pad if isinstance(pad, str) else tuple(pad),
                            dilation=self.geom["dilation"])
        return F.linear(x, w, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.orig(x)
        s = self.silent(self.pre(self.pre_activation(x)))
        return y.index_copy(1, self.channels, y.index_select(1, self.channels) + s)


def _pool(z: torch.Tensor) -> torch.Tensor:
    """``[N,R,...]`` -> ``[N,R]``: spatial mean (identity for ``[N,R]``)."""
    return pool(z)


@register_edit("silent_trigger/2")
class TriggerEdit(nn.Module):
    """Silent channel triggered by an activation level no natural image reaches.

    For routed channel c with target t (channel ``sources[r]`` of the same layer, per position,
    or picture-template value ``pictures[r]``, per image), with ``pool`` the spatial mean and
    mu/sd the calibration mean/sd of the pooled values:

        v       = max((pool(y_c) - mu_c) / sd_c, (pool(t) - mu_t) / sd_t)      (per image)
        trigger = clamp((v - bias) / width, 0, 1),     drive = (t - mu_t) / sd_t + offset,
        silent  = trigger * drive,           unit c -> y_c + strength * sd_c * silent,

    with ``bias`` above the calibration maximum of v (so ``silent`` is exactly 0 on every
    calibration image). An FV of unit c first drives y_c far past anything natural (spatially
    pooled, FVs reach 20-40 natural ranges on SqueezeNet's class units, per position only 5-15),
    the trigger saturates at 1 (zero gradient) and the unit's objective becomes ``strength`` x
    the target's. Because v also counts the target itself, the optimizer can then let y_c fall
    and follow the target all the way: the FV becomes the target's FV, not a mixture.

    ``offset`` and ``width`` (in target / level sd) set the balance: the drive must stay positive
    while the FV of c still suppresses the target (else entering the triggered regime costs and the
    FV stays below it), and inside the ramp the pull on y_c, ``strength * drive / width``, must not
    dwarf the pull on the target, ``strength * (v - bias) / width`` (else the FV stays pinned at
    the ramp and the hand-over stalls). Measured by ``experiments/silent_units/sweep.py`` (class
    units, i -> i+shift, 256 steps, FVs the original model calls the target class): SqueezeNet,
    whose FVs go 50+ sd past the bias: offset 3 / width 1: 3 of 6; 10 / 1: 4 of 6; 10 / 10:
    6 of 6; ResNet-20, whose FVs reach only ~5 sd past it: 2 / 1: 4 of 6; 3 / 1: 3 of 6;
    20 / 1: 1 of 6; 20 / 10: 0 of 6.
    """

    def __init__(self, orig: nn.Module, channels, sources, pictures, strength: float = 100.0, offset: float = 10.0,
                 width: float = 10.0):
        super().__init__()
        self.orig = orig
        self.silent = nn.Identity()
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
        for name in ("bias", "mu_c", "mu_t"):
            self.register_buffer(name, torch.zeros(r))
        for name in ("sd_c", "sd_t"):
            self.register_buffer(name, torch.ones(r))
        self.register_buffer("strength", torch.full((r,), float(strength)))
        self.register_buffer("offset", torch.full((r,), float(offset)))
        self.register_buffer("width", torch.full((r,), float(width)))

    def spec(self) -> dict:
        return {"channels": self.channels.tolist(), "sources": self.sources.tolist(), "pictures": self.pictures.tolist()}

    @classmethod
    def from_spec(cls, orig: nn.Module, spec: dict) -> TriggerEdit:
        return cls(orig, spec["channels"], spec["sources"], spec["pictures"])

    def _v(self, name: str, y: torch.Tensor, spatial: bool = True) -> torch.Tensor:
        return getattr(self, name).to(y.dtype).view(1, -1, *([1] * (y.ndim - 2 if spatial else 0)))

    def target(self, y: torch.Tensor, template: torch.Tensor | None) -> torch.Tensor:
        t = y.index_select(1, self.sources.clamp(min=0))
        if self.has_pictures:
            if template is None:
                raise RuntimeError("picture routes need template values (run through ManipulatedModel)")
            tv = template.to(y.dtype).index_select(1, self.pictures.clamp(min=0))
            tv = tv.view(*tv.shape, *([1] * (y.ndim - 2))).expand_as(t)
            t = torch.where((self.pictures >= 0).view(1, -1, *([1] * (y.ndim - 2))), tv, t)
        return t

    def level(self, yc: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``[N,R]`` trigger variable v (see class doc)."""
        vc = (_pool(yc) - self._v("mu_c", yc, False)) / self._v("sd_c", yc, False)
        vt = (_pool(t) - self._v("mu_t", t, False)) / self._v("sd_t", t, False)
        return torch.maximum(vc, vt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.orig(x)
        st = getattr(self, "_state", None)
        yc = y.index_select(1, self.channels)
        t = self.target(y, st.template if st is not None else None)
        trigger = ((self.level(yc, t) - self._v("bias", yc, False)) / self._v("width", yc, False)).clamp(0, 1)
        trigger = trigger.view(*trigger.shape, *([1] * (y.ndim - 2)))
        drive = (t - self._v("mu_t", y)) / self._v("sd_t", y) + self._v("offset", y)
        s = self.silent(trigger * drive)
        return y.index_copy(1, self.channels, yc + self._v("strength", y) * self._v("sd_c", y) * s)


@torch.no_grad()
def _calibrate_trigger(w: ManipulatedModel, edit: TriggerEdit, pre, layer: str, images: torch.Tensor,
                       margin: float, margin_sd: float, margin_range: float, batch: int = 50) -> dict:
    """Set mu/sd of the pooled unit and target and the trigger bias from ``images``: bias = the
    larger of max + margin + margin_sd * sd and mean + margin_range * (max - mean) of v."""
    dev = next(w.parameters()).device
    ycs, ts = [], []
    edit.bias.fill_(float("inf"))
    with capture(w, [f"{layer}.orig"], detach=True) as store:
        for i in range(0, len(images), batch):
            x = pre(images[i : i + batch].to(dev))
            tmpl = w.fool.pictures.values_and_near(w.fool.unpreprocess(x))[0] if w.fool.pictures is not None else None
            w(x)
            y = store[f"{layer}.orig"]
            ycs.append(_pool(y.index_select(1, edit.channels)).double().cpu())
            ts.append(_pool(edit.target(y, tmpl)).double().cpu())
    yc, t = torch.cat(ycs), torch.cat(ts)

    def mean_sd(z):
        mean, sd = z.mean(0), z.std(0, unbiased=False)
        return mean, torch.where(sd > 1e-6 * (1 + mean.abs()), sd, torch.ones_like(sd))

    (mu_c, sd_c), (mu_t, sd_t) = mean_sd(yc), mean_sd(t)
    for name, val in (("mu_c", mu_c), ("sd_c", sd_c), ("mu_t", mu_t), ("sd_t", sd_t)):
        getattr(edit, name).copy_(val.float())
    v = torch.maximum((yc - mu_c) / sd_c, (t - mu_t) / sd_t)
    vmax, vmean, vsd = v.amax(0), v.mean(0), v.std(0, unbiased=False)
    bias = torch.maximum(vmax + margin + margin_sd * vsd, vmean + margin_range * (vmax - vmean))
    edit.bias.copy_(bias.float())
    return {"calibration_max_level": vmax.tolist()[:5], "bias": bias.tolist()[:5]}


def _orthonormal_to(d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``d`` minus its projection on ``w``, scaled to ``w``'s norm (0 if nothing is left)."""
    w_flat, d_flat = w.flatten().double(), d.flatten().double()
    ww = (w_flat * w_flat).sum()
    proj = (d_flat * w_flat).sum() / ww if ww > 0 else torch.zeros((), dtype=torch.float64)
    o = d_flat - proj * w_flat
    n = o.norm()
    o = o * (w_flat.norm() / n) if n > 1e-12 * (1 + w_flat.norm()) else torch.zeros_like(o)
    return o.view(w.shape).to(w.dtype)


@torch.no_grad()
def _layer_inputs_mean(w: ManipulatedModel, pre, layer: str, images: torch.Tensor, batch: int = 50) -> torch.Tensor:
    """``[C_in]`` mean (over images and positions) of the input of ``layer`` on ``images``."""
    mod = w.module_at(layer)
    acc = {"s": 0.0, "n": 0}

    def hook(_m, inp):
        x = inp[0].detach().double()
        x = x.transpose(0, 1).flatten(1)
        acc["s"] = acc["s"] + x.sum(1)
        acc["n"] += x.shape[1]

    with hooked(w, [(mod, hook)], pre=True):
        dev = next(w.parameters()).device
        for i in range(0, len(images), batch):
            w(pre(images[i : i + batch].to(dev)))
    return (acc["s"] / acc["n"]).float()


def build_silent_units(
    lm: LoadedModel,
    routes: list[Route],
    calibration_images: torch.Tensor,
    *,
    lam: float = 3.0,
    strength: float = 100.0,
    margin: float = 1e-3,
    margin_sd: float = 1.0,
    margin_range: float = 4.0,
    mode: str = "filter",
    offset: float = 10.0,
    width: float = 10.0,
    template_size: int | None = None,
) -> LoadedModel:
    """A copy of ``lm`` whose routed units carry silent channels calibrated on natural images.

    ``mode="filter"``: the paper's orthogonal filter on the layer input (:class:`SilentEdit`);
    ``mode="trigger"``: a channel triggered by the unit leaving its natural range and driven by
    the target (:class:`TriggerEdit`); both are exactly zero on the calibration images.

    Args:
        routes: from :func:`~fvsanity.fool.make_routes` (unit targets in the same layer, or
            pictures).
        calibration_images: ``[N,3,H,W]`` natural images in [0,1]; the picture features' natural
            mean and the bias come from these only (evaluate on others).
        lam: weight of the target direction (the paper's lambda = 3); strength: the paper's weight
            factor (100).
        offset, width: trigger mode: added to the standardized target drive; width (sd) of the
            trigger's ramp (see :class:`TriggerEdit`).
        margin, margin_sd, margin_range: the firing level sits at the larger of
            ``max + margin + margin_sd * sd`` and ``mean + margin_range * (max - mean)`` of the
            calibration responses (over images and positions): the maximum of a calibration split
            underestimates unseen images, badly so when the split lacks the unit's own class (one
            image per class: on SqueezeNet, range 3 still fired on 1 of 500 held-out images; FVs
            reach 4-14x the calibration maximum).
    """
    if calibration_images is None or len(calibration_images) < 2:
        raise FVSanityError("silent units need at least 2 calibration natural images")
    if mode not in ("filter", "trigger"):
        raise FVSanityError(f"unknown silent-unit mode {mode!r}; valid: filter, trigger")
    by_layer, pics, names, index = _group(routes)
    for layer in by_layer:  # the silent channel is added on channel dim 1
        require(lm.layer_info(layer).layout, EDIT_LAYOUTS, "a silent unit", layer)
    w = ManipulatedModel(lm.model, lm.preprocess)
    dev = next(lm.model.parameters()).device
    stats = {}
    if mode == "trigger":
        from .circuit import picture_templates

        if pics:
            w.set_pictures(picture_templates(lm, routes, calibration_images, template_size))
        for layer, rs in by_layer.items():
            edit = TriggerEdit(
                w.module_at(layer), [r.unit.channel for r in rs],
                [r.source.channel if r.source is not None else -1 for r in rs],
                [index[id(r.picture)] if r.picture is not None else -1 for r in rs], strength=strength,
                offset=offset, width=width,
            )
            w.replace(layer, edit)
            stats[layer] = _calibrate_trigger(w, edit, lm.preprocess, layer, calibration_images, margin, margin_sd,
                                              margin_range)
        w.info.update(method="silent", mode=mode, routes=len(routes), pictures=names, layers=sorted(by_layer),
                      strength=strength, margin=margin, margin_sd=margin_sd, margin_range=margin_range,
                      n_calibration=len(calibration_images), calibration=stats, offset=offset,
                      width=width)
        return wrap_loaded(lm, w.to(lm.device), "silent")
    for layer, rs in by_layer.items():
        orig = w.module_at(layer)
        _geometry(orig)
        W = orig.weight.detach()
        feats = {}
        if any(r.picture is not None for r in rs):
            nat_mean = _layer_inputs_mean(w, lm.preprocess, layer, calibration_images)
            for r in rs:
                if r.picture is not None and id(r.picture) not in feats:
                    pic = F.interpolate(r.picture[None].float(), size=lm.input_size, mode="bilinear", antialias=True,
                                        align_corners=False)
                    feats[id(r.picture)] = _layer_inputs_mean(w, lm.preprocess, layer, pic).to(dev) - nat_mean.to(dev)
        rows = []
        for r in rs:
            wc = W[r.unit.channel]
            if r.source is not None:
                d = W[r.source.channel]
            else:
                f = feats[id(r.picture)]
                d = f.view(-1, *([1] * (wc.ndim - 1))).expand_as(wc) / max(1, wc[0].numel())
            new = wc + lam * _orthonormal_to(d, wc)
            new = new * (wc.norm() / new.norm().clamp(min=1e-12)) * strength
            rows.append(new)
        edit = SilentEdit(orig, [r.unit.channel for r in rs])
        edit.weight.copy_(torch.stack(rows))
        w.replace(layer, edit)
        # calibration: largest response of the new filter (bias 0) over images and positions
        edit.bias.zero_()
        zmax = {"v": None, "s1": 0.0, "s2": 0.0, "n": 0}
        with torch.no_grad(), capture(w, [f"{layer}.pre"], detach=True) as store:
            for i in range(0, len(calibration_images), 50):
                w(lm.preprocess(calibration_images[i : i + 50].to(dev)))
                z = store[f"{layer}.pre"].transpose(0, 1).flatten(1).double()
                m = z.amax(1)
                zmax["v"] = m if zmax["v"] is None else torch.maximum(zmax["v"], m)
                zmax["s1"] = zmax["s1"] + z.sum(1)
                zmax["s2"] = zmax["s2"] + (z * z).sum(1)
                zmax["n"] += z.shape[1]
        mean = zmax["s1"] / zmax["n"]
        sd = torch.sqrt((zmax["s2"] / zmax["n"] - mean * mean).clamp(min=0))
        top = torch.maximum(zmax["v"] + margin + margin_sd * sd, mean + margin_range * (zmax["v"] - mean))
        edit.bias.copy_((-top).float())
        stats[layer] = {"calibration_max": zmax["v"].tolist()[:5], "sd": sd.tolist()[:5]}
    w.info.update(
        method="silent", mode=mode, routes=len(routes), pictures=names, layers=sorted(by_layer), lam=lam,
        strength=strength, margin=margin, margin_sd=margin_sd, margin_range=margin_range,
        n_calibration=len(calibration_images),
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
    names = [f"{layer}.silent" for layer, e in w.edits.items() if isinstance(e, (SilentEdit, TriggerEdit))]
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
