"""Ground truth for edge attribution: :func:`patch_edges`, real activation patching of single
edges (see :mod:`fvsanity.compare.attribution`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..hooks import hooked
from ..units import Unit, parse_unit
from .attribution_edges import _conv_padding, _discover, _forward, _recording
from .attribution_references import AttributionError, reference_images
from .attribution_references import check_images as _check_images

__all__ = ["patch_edges"]


def _patch_shapes(spec, a_c: torch.Tensor, z_c: torch.Tensor) -> tuple[int, int]:
    """(c_out, c_in) of the patched module; a linear layer must take 2-D inputs."""
    if spec.kind == "linear" and a_c.ndim != 2:
        raise AttributionError(f"patching {spec.name!r}: linear layers with {a_c.ndim}-D inputs are not supported")
    return z_c.shape[1], a_c.shape[1]


def _edge_patch(spec, v: int, u: int, delta: torch.Tensor, d_out: torch.Tensor, z_c: torch.Tensor, c_out: int):
    """What patching edge (v, u) adds to output channel v of ``spec``'s module: the reference
    minus clean contribution of input channel u through W[v, u] (skip: ``d_out[:, v]``)."""
    mod = spec.module
    if spec.kind == "conv":
        g = mod.groups
        cin_g, cout_g = mod.weight.shape[1], c_out // g
        grp = v // cout_g
        if not grp * cin_g <= u < (grp + 1) * cin_g:
            return torch.zeros_like(z_c[:, v])
        w = mod.weight[v : v + 1, u - grp * cin_g : u - grp * cin_g + 1]
        return F.conv2d(delta[:, u : u + 1], w, None, mod.stride, _conv_padding(mod), mod.dilation)[:, 0]
    if spec.kind == "linear":
        return delta[..., u] * mod.weight[v, u]
    return d_out[:, v] if spec.src[v] == u else torch.zeros_like(d_out[:, v])


def patch_edges(
    lm,
    unit: Unit | str,
    layer: str,
    edges,
    clean: torch.Tensor,
    ref: str | torch.Tensor = "mean",
    blur_sigma: float | None = None,
) -> torch.Tensor:
    """Real activation patching of single edges (one forward per edge): ground truth for EAP.

    For edge (v, u) of ``layer`` (a Conv2d, Linear or skip module), channel u's contribution to
    output channel v is replaced by its reference value, i.e. ``conv(a_u_ref - a_u_clean, W[v, u])``
    is added to z_v (skip: ``delta_out_v``), everything else stays clean.

    Args:
        edges: [(v, u), ...] or a LongTensor [E, 2] of (output channel, input channel).
        clean: [N, 3, H, W] RGB images; ref: reference (see :func:`reference_images`).
    Returns:
        [E, N] ``m(patched) - m(clean)`` per edge and image (metric units).
    """
    unit = parse_unit(unit, lm)
    _check_images(clean, "clean")
    specs = _discover(lm, unit, [layer], tuple(clean.shape[1:]))
    if len(specs) != 1:
        raise AttributionError(f"layer {layer!r} names a block; give one conv/linear/shortcut module")
    spec = specs[0]
    edges = torch.as_tensor(edges, dtype=torch.long).reshape(-1, 2)
    model, dev = lm.model, lm.device
    mdt = next(model.parameters()).dtype
    x = clean.to(dev, mdt)
    r = reference_images(lm, clean, ref, blur_sigma).to(dev, mdt)
    with torch.no_grad():
        with _recording(model, [spec], unit) as rec:
            _forward(lm, rec, r)
            a_r, z_r = (t.detach() for t in rec["io"][spec.name])
            m0 = _forward(lm, rec, x).detach()
            a_c, z_c = (t.detach() for t in rec["io"][spec.name])
        delta = a_r - a_c
        d_out = z_r - z_c
        c_out, c_in = _patch_shapes(spec, a_c, z_c)
        bad = [(int(v), int(u)) for v, u in edges if not (0 <= v < c_out and 0 <= u < c_in)]
        if bad:
            raise AttributionError(f"edge {bad[0]} out of range for {spec.name!r}: v in 0..{c_out - 1}, u in 0..{c_in - 1}")
        out = torch.empty(len(edges), x.shape[0], dtype=torch.promote_types(mdt, torch.float32))
        patch: dict = {"v": None, "add": None}

        def hook(_m, _i, o):
            if patch["add"] is None:
                return None
            o = o.clone()
            o[:, patch["v"]] += patch["add"]
            return o

        with hooked(model, [(spec.module, hook)]), _recording(model, [], unit) as rec:
            for i, (v, u) in enumerate(edges.tolist()):
                patch["v"], patch["add"] = v, _edge_patch(spec, v, u, delta, d_out, z_c, c_out)
                out[i] = (_forward(lm, rec, x) - m0).to(out.dtype).cpu()
                patch["add"] = None
    return out
