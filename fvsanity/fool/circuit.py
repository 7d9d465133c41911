"""Fooling circuit (Geirhos et al. 2023, section 3.1): a gated unit that shows another target.

For a natural input the manipulated unit equals the original unit, bit for bit; for an input the
FV detector calls FV-like it equals the target pathway (another unit of the same layer, or a
picture template). The gate is ``sigmoid(k (logit - threshold) - offset)`` with a large ``k``,
shut hard (``torch.where``) at and below the threshold, so:

* detector logit <= threshold: output = original, exactly, in forward; zero gradient to the gate;
* above it the gate ramps from sigmoid(-offset) (~1e-13) to 1 within ``(60 + offset)/k`` logits.

Every step is written so no NaN/inf appears in forward or backward: the gate's logit is
substituted by a safe constant where the gate is shut (double ``where``) and clamped to
[-100, 100] (sigmoid saturates there), so an infinite or NaN detector logit yields gate 0 or 1
with zero, finite gradients.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import FVSanityError
from ..layouts import pool, require
from ..models import LoadedModel
from .gate import fooling_gate
from .model import ManipulatedModel, PictureTemplates, register_edit, wrap_loaded
from .routes import EDIT_LAYOUTS, Route

__all__ = [
    "fooling_gate", "gated_value", "GatedEdit", "build_fooling_circuit", "picture_templates", "template_model",
    "picture_key",
]

def gated_value(original: torch.Tensor, target: torch.Tensor, gate: torch.Tensor, is_fv: torch.Tensor) -> torch.Tensor:
    """``original`` where not ``is_fv`` (exactly), else ``gate*target + (1-gate)*original``.

    ``gate``/``is_fv`` broadcast against ``original`` (e.g. ``[N,1,1,1]``).
    """
    blend = gate * target + (1 - gate) * original
    return torch.where(is_fv, blend, original)


def _bshape(y: torch.Tensor) -> tuple[int, ...]:
    return (1,) * (y.ndim - 2)


@register_edit("gate")
class GatedEdit(nn.Module):
    """Wraps a layer ``orig``; channel ``channels[r]`` shows channel ``sources[r]`` of the same
    layer (``sources[r] >= 0``) or picture template ``pictures[r]`` when the gate is open.

    Output shape = ``orig``'s (``[N,C]`` or ``[N,C,H,W]``); only the routed channels change.
    """

    def __init__(self, orig: nn.Module, channels, sources, pictures):
        super().__init__()
        self.orig = orig
        ch = torch.as_tensor(channels, dtype=torch.long)
        self.register_buffer("channels", ch)
        self.register_buffer("sources", torch.as_tensor(sources, dtype=torch.long))
        self.register_buffer("pictures", torch.as_tensor(pictures, dtype=torch.long))
        if not (len(ch) == len(self.sources) == len(self.pictures)) or len(set(ch.tolist())) != len(ch):
            raise FVSanityError("each routed channel appears once, with one source or picture")
        if bool(((self.sources < 0) == (self.pictures < 0)).any()):
            raise FVSanityError("every route needs exactly one of a source channel and a picture")
        self.has_pictures = bool((self.pictures >= 0).any())

    def spec(self) -> dict:
        return {"channels": self.channels.tolist(), "sources": self.sources.tolist(), "pictures": self.pictures.tolist()}

    @classmethod
    def from_spec(cls, orig: nn.Module, spec: dict) -> GatedEdit:
        return cls(orig, spec["channels"], spec["sources"], spec["pictures"])

    def target(self, y: torch.Tensor, template: torch.Tensor | None) -> torch.Tensor:
        """``[N,R,...]`` target values of the routed channels for layer output ``y``."""
        tgt = y.index_select(1, self.sources.clamp(min=0))
        if self.has_pictures:
            if template is None:
                raise RuntimeError("picture routes need template values (run through ManipulatedModel)")
            tv = template.to(y.dtype).index_select(1, self.pictures.clamp(min=0))
            tv = tv.view(*tv.shape, *_bshape(y)).expand_as(tgt)
            use_pic = (self.pictures >= 0).view(1, -1, *_bshape(y))
            tgt = torch.where(use_pic, tv, tgt)
        return tgt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.orig(x)
        st = getattr(self, "_state", None)
        if st is None or st.gate is None:
            raise RuntimeError("GatedEdit runs only inside ManipulatedModel.forward (no gate for this forward)")
        orig_sel = y.index_select(1, self.channels)
        tgt = self.target(y, st.template)
        shape = (y.shape[0],) + (1,) * (y.ndim - 1)
        gate, is_fv = st.gate.to(y.dtype).view(shape), st.is_fv.view(shape)
        if self.has_pictures and st.near is not None:
            # picture routes stay open at the picture itself (closer than any natural image)
            near = st.near.index_select(1, self.pictures.clamp(min=0)) & (self.pictures >= 0)
            near = near.view(*near.shape, *_bshape(y))
            is_fv = is_fv | near
            gate = torch.where(near, torch.ones_like(gate), gate)
        new = gated_value(orig_sel, tgt, gate, is_fv)
        return y.index_copy(1, self.channels, new)


# ------------------------------------------------------------------------------ assembly helpers
def _group(routes: list[Route]) -> tuple[dict[str, list[Route]], list[torch.Tensor], list[str], dict[int, int]]:
    """Routes per layer, the distinct pictures (by identity), their names, id(picture) -> index."""
    by_layer: dict[str, list[Route]] = {}
    pics: list[torch.Tensor] = []
    names: list[str] = []
    index: dict[int, int] = {}
    for r in routes:
        by_layer.setdefault(r.unit.layer, []).append(r)
        if r.picture is not None and id(r.picture) not in index:
            index[id(r.picture)] = len(pics)
            pics.append(r.picture)
            names.append(r.picture_name or "picture")
    return by_layer, pics, names, index


@torch.no_grad()
def _channel_means(lm: LoadedModel, layer: str, channels: list[int], images: torch.Tensor, batch: int = 50) -> torch.Tensor:
    """``[N, R]`` spatial-mean activations of ``channels`` of ``layer`` on ``images`` (base model)."""
    from ..hooks import capture

    out = []
    dev = lm.device
    idx = torch.as_tensor(channels, dtype=torch.long, device=dev)
    layout = lm.layer_info(layer).layout
    with capture(lm.model, [layer], detach=True) as store:
        for i in range(0, len(images), batch):
            lm(images[i : i + batch].to(dev))
            out.append(pool(store[layer], layout).index_select(1, idx).float().cpu())
    return torch.cat(out)


def picture_key(routes: list[Route]) -> str:
    """Short hash of the distinct pictures of ``routes`` (cache keys), '' if there are none."""
    import hashlib

    _, pics, _, _ = _group([r for r in routes if r.picture is not None])
    if not pics:
        return ""
    h = hashlib.sha256()
    for p in pics:
        t = p.detach().float().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:12]


def picture_templates(
    lm: LoadedModel, routes: list[Route], calibration_images: torch.Tensor | None, size: int | None = None,
    near_fraction: float = 0.7,
) -> PictureTemplates | None:
    """Templates for the distinct pictures of ``routes`` (None if no route has a picture).

    ref = median natural distance, scale = max natural activation of the units routed to the
    picture (so the picture drives them like their best natural image), near threshold =
    ``near_fraction`` x the closest calibration image's distance. Deterministic given the inputs,
    so the detector (trained on the templates' FV trajectories) and the circuit see the same ones.
    """
    by_layer, pics, _, index = _group(routes)
    if not pics:
        return None
    if calibration_images is None or len(calibration_images) == 0:
        raise FVSanityError("picture targets need calibration natural images (--train-images)")
    size = size or min(64, lm.input_size[0])
    tmpl = PictureTemplates(len(pics), size)
    with torch.no_grad():
        tmpl.pictures.copy_(torch.stack([
            torch.nn.functional.adaptive_avg_pool2d(p[None].float(), (size, size))[0] for p in pics
        ]))
        d = torch.cat([tmpl.distance(calibration_images[i : i + 100].float()) for i in range(0, len(calibration_images), 100)])
        tmpl.ref.copy_(d.median(0).values.clamp(min=1e-6))
        tmpl.near_threshold.copy_(near_fraction * d.min(0).values)
        scale = torch.zeros(len(pics))
        for layer, rs in by_layer.items():
            pr = [r for r in rs if r.picture is not None]
            if not pr:
                continue
            acts = _channel_means(lm, layer, [r.unit.channel for r in pr], calibration_images)
            for j, r in enumerate(pr):
                p = index[id(r.picture)]
                scale[p] = max(float(scale[p]), float(acts[:, j].max()), 1e-3)
        tmpl.scale.copy_(torch.where(scale > 0, scale, torch.ones_like(scale)))
    return tmpl


class _TemplateNet(nn.Module):
    """Model input -> ``[N, P]`` picture-template values, exposed as layer ``values``."""

    def __init__(self, templates: PictureTemplates, preprocess):
        super().__init__()
        from .model import Unpreprocess

        self.unpreprocess = Unpreprocess(preprocess)
        self.templates = templates
        self.values = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.values(self.templates(self.unpreprocess(x)))


def template_model(lm: LoadedModel, templates: PictureTemplates) -> LoadedModel:
    """A model whose units ``values:p`` are the picture templates alone.

    Its FVs are what a fooling circuit's picture route shows once the gate is open, step for
    step (same parametrization, transforms and seeds), so FVs rendered from it at several
    checkpoints teach the detector the whole trajectory from noise to the picture.
    """
    from ..models import prepare_model

    net = _TemplateNet(copy.deepcopy(templates).cpu(), lm.preprocess)
    return LoadedModel(
        name=f"{lm.name}+templates", model=prepare_model(net), preprocess=lm.preprocess, block_layers=["values"],
        output_layer="values", class_names=[f"picture {p}" for p in range(templates.pictures.shape[0])],
        weights_source="picture templates",
    ).to(lm.device)


def build_fooling_circuit(
    lm: LoadedModel,
    detector: nn.Module,
    routes: list[Route],
    *,
    threshold: float,
    k: float = 1000.0,
    offset: float = 30.0,
    calibration_images: torch.Tensor | None = None,
    template_size: int | None = None,
) -> LoadedModel:
    """A copy of ``lm`` whose routed units show their targets to FV-like inputs.

    Args:
        lm: the base model (unchanged).
        detector: an :class:`~fvsanity.fool.FVDetector` (RGB in [0,1] -> logits).
        routes: from :func:`~fvsanity.fool.make_routes`.
        threshold: detector logit above which the input counts as FV-like (e.g.
            :func:`~fvsanity.fool.calibrate_threshold` on held-back natural images).
        k, offset: gate steepness (per logit) and offset (see module doc).
        calibration_images: ``[N,3,H,W]`` natural images for picture templates' scale.
        template_size: side (px) picture templates compare at (default min(64, input size)).

    Returns:
        a :class:`LoadedModel` with the same preprocess, layer names and classes.
    """
    by_layer, pics, names, index = _group(routes)
    for layer in by_layer:  # the gate edits channel dim 1
        require(lm.layer_info(layer).layout, EDIT_LAYOUTS, "the fooling circuit's gated edit", layer)
    w = ManipulatedModel(lm.model, lm.preprocess)
    w.set_detector(detector, threshold, k, offset)
    if pics:
        w.set_pictures(picture_templates(lm, routes, calibration_images, template_size))
    for layer, rs in by_layer.items():
        edit = GatedEdit(
            w.module_at(layer),
            [r.unit.channel for r in rs],
            [r.source.channel if r.source is not None else -1 for r in rs],
            [index[id(r.picture)] if r.picture is not None else -1 for r in rs],
        )
        w.replace(layer, edit)
    w.info.update(method="circuit", routes=len(routes), pictures=names, layers=sorted(by_layer))
    return wrap_loaded(lm, w.to(lm.device), "circuit")
