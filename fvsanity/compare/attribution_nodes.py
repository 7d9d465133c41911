"""Node (channel) attribution: :func:`node_attribution`, gradient x activation or layer
integrated gradients of a unit over a layer's channels (see :mod:`fvsanity.compare.attribution`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..hooks import get_module, hooked
from ..layouts import infer_layout
from ..units import Unit, layer_names, parse_unit
from .attribution_edges import _forward, _recording, _spatial_sum
from .attribution_references import NODE_METHODS, AttributionError, reference_images
from .attribution_references import check_images as _check_images

__all__ = ["node_attribution"]


def _node_names(model: nn.Module, layers: Sequence[str]) -> list[str]:
    """``layers`` as dotted module names (lucent names translated); an unknown one is refused."""
    from ..units import resolve_layer

    names = [resolve_layer(model, n) for n in layers]
    unknown = [n for n in names if n not in layer_names(model)]
    if unknown:
        raise AttributionError(f"unknown layer {unknown[0]!r}")
    return names


def _read_output(t):
    return t[0] if isinstance(t, (tuple, list)) else t


def _layer_hook(where: str, state: dict):
    """A hook that stores the layer's output (``where="output"``) or first input in
    ``state["seen"]`` and, while ``state["replace"]`` is set, replaces it by that value."""
    if where == "output":

        def hook(_m, _inp, out, state=state):
            out = _read_output(out)
            state["seen"] = out
            if state["replace"] is not None:
                return state["replace"]
            return None

    else:

        def hook(_m, inp, state=state):
            state["seen"] = inp[0]
            if state["replace"] is not None:
                return (state["replace"],) + tuple(inp[1:])
            return None

    return hook


def _averaged_layer_gradient(lm, rec: dict, state: dict, x, a_r, a_c, method: str, alphas, sdt) -> torch.Tensor:
    """dm/da of the hooked layer, averaged over ``alphas``: at the interpolated activation
    ``a_r + alpha (a_c - a_r)`` (``"ig"``) or at the clean activation (``"grad_x_act"``)."""
    gbar = torch.zeros_like(a_c, dtype=sdt)
    for a in alphas:
        with torch.enable_grad():
            if method == "ig":
                leaf = (a_r + a * (a_c - a_r)).requires_grad_(True)
                state["replace"] = leaf
                m = _forward(lm, rec, x)
            else:
                leaf = None
                m = _forward(lm, rec, x.detach().requires_grad_(True))
                leaf = state["seen"]
            (g,) = torch.autograd.grad(m.sum(), [leaf], allow_unused=True)
        state["replace"] = None
        if g is not None:
            gbar += g.detach().to(sdt) / len(alphas)
    return gbar


def _node_batch(lm, rec: dict, state: dict, name: str, x, r, method: str, alphas, sdt) -> torch.Tensor:
    """One batch's attributions [B, C] of layer ``name`` (clean ``x``, reference ``r``)."""
    state["replace"] = None
    with torch.no_grad():
        _forward(lm, rec, r)
        a_r = state["seen"].detach()
        _forward(lm, rec, x)
        a_c = state["seen"].detach()
    gbar = _averaged_layer_gradient(lm, rec, state, x, a_r, a_c, method, alphas, sdt)
    contrib = (a_c - a_r).to(sdt) * gbar
    lay = infer_layout(lm.model, name, tuple(contrib.shape[1:]))
    return _spatial_sum(contrib, lay).cpu()


def node_attribution(
    lm,
    unit: Unit | str,
    images: torch.Tensor,
    layers: Sequence[str],
    method: str = "ig",
    steps: int = 32,
    reference: str | torch.Tensor = "mean",
    where: str = "output",
    batch_size: int = 16,
    blur_sigma: float | None = None,
) -> dict[str, torch.Tensor]:
    """Channel (node) attributions of ``layers`` for ``unit``: ``{layer: [N, C]}``.

    ``A[n, c] = sum over space of (a_clean - a_ref)[n, c] * g[n, c]`` (c = channel, or the token
    dimension D of a ViT's ``[N, T, D]`` layer, summed over all T tokens, class token included,
    so that completeness holds; see :mod:`fvsanity.layouts`) with g = dm/da at the clean
    activation (``"grad_x_act"``) or averaged over ``steps`` midpoints of the straight line from
    a_ref to a_clean *in that layer's activation space* (``"ig"``, layer integrated gradients: the
    layer's output, or its input if ``where="input"``, is replaced by the interpolated value).
    When the layer is a cut of the network (every path to the unit passes through it), IG is
    complete: ``A[n].sum() ~= m(clean) - m(ref)`` up to the Riemann error of ``steps`` points.
    Any module may be named (block outputs, ReLUs, convs).
    """
    unit = parse_unit(unit, lm)
    _check_images(images)
    if method not in NODE_METHODS:
        raise AttributionError(f"unknown node method {method!r}; valid: {', '.join(NODE_METHODS)}")
    if where not in ("output", "input"):
        raise AttributionError(f"where={where!r}; valid: output, input")
    if method == "ig" and steps < 1:
        raise AttributionError(f"steps={steps}: IG needs at least 1 step")
    model = lm.model
    names = _node_names(model, layers)
    dev = lm.device
    mdt = next(model.parameters()).dtype
    sdt = torch.promote_types(mdt, torch.float32)
    refs_all = reference_images(lm, images, reference, blur_sigma)
    alphas = [(k + 0.5) / steps for k in range(steps)] if method == "ig" else [1.0]
    result: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for name in names:
        state: dict = {"replace": None, "seen": None}
        hook = _layer_hook(where, state)
        # registered before the unit hook, so a unit on this layer sees the replacement
        try:
            with hooked(model, [(get_module(model, name), hook)], pre=where == "input"), \
                    _recording(model, [], unit) as rec:
                for start in range(0, images.shape[0], batch_size):
                    x = images[start : start + batch_size].to(dev, mdt)
                    r = refs_all[start : start + batch_size].to(dev, mdt)
                    result[name].append(_node_batch(lm, rec, state, name, x, r, method, alphas, sdt))
        finally:
            state["replace"] = None
    return {n: torch.cat(v) for n, v in result.items()}
