"""Objectives: what an FV maximises, as small composable values (lucent's algebra).

An :class:`Objective` maps the captured activations of a batch to one score per element,
``{layer: Tensor[B, ...]} -> Tensor[B]``; how a layer's output is read (conv ``[B, C, H, W]``,
tokens ``[B, N, D]``, vector ``[B, C]``) is its :class:`~fvsanity.layouts.Layout`, and every
reduction goes through :mod:`fvsanity.layouts` (``pool``, ``unit_values``). They combine with ``+``, ``-``, ``*`` (by a
number) and ``sum(...)``, as in lucent: ``channel("layer3.2", 5) - 0.1 * channel("layer3.2", 7)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..layouts import Layout, layout_from_tensor, pool, to_map, unit_values
from ..units import Unit

Acts = dict[str, torch.Tensor]


class Objective:
    """A named function of activations -> [B] scores, with the layers it needs."""

    def __init__(self, fn: Callable[[Acts], torch.Tensor], layers: tuple[str, ...], name: str):
        self.fn = fn
        self.layers = tuple(dict.fromkeys(layers))
        self.name = name

    def __call__(self, acts: Acts) -> torch.Tensor:
        return self.fn(acts)

    def __add__(self, other):
        if isinstance(other, (int, float)):
            return Objective(lambda a: self(a) + other, self.layers, f"{self.name} + {other}")
        return Objective(lambda a: self(a) + other(a), self.layers + other.layers, f"{self.name} + {other.name}")

    __radd__ = __add__

    def __neg__(self):
        return Objective(lambda a: -self(a), self.layers, f"-({self.name})")

    def __sub__(self, other):
        return self + (-other)

    def __mul__(self, k: float):
        if not isinstance(k, (int, float)):
            raise TypeError("objectives multiply by numbers only")
        return Objective(lambda a: k * self(a), self.layers, f"{k} * {self.name}")

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return f"Objective({self.name})"


def _spatial_mean(t: torch.Tensor, layout: Layout | None = None) -> torch.Tensor:
    """[B, C] mean over space (patch tokens for a token layout); deprecated: use ``layouts.pool``."""
    return pool(t, layout)


def channel(layer: str, n: int, layout: Layout | None = None) -> Objective:
    """Mean over space (over patch tokens for tokens) of channel ``n`` of ``layer`` (a plain
    logit for a vector layout). ``layout`` None reads channel dim 1."""
    return Objective(lambda a: pool(a[layer], layout)[:, n], (layer,), f"channel({layer}:{n})")


def neuron(
    layer: str,
    n: int,
    y: int | None = None,
    x: int | None = None,
    ref_hw: tuple[int, int] | None = None,
    layout: Layout | None = None,
) -> Objective:
    """Channel ``n`` at one grid position (default: the centre), as lucent's ``neuron``; for a
    token layout the position is a patch token of the patch grid.

    ``ref_hw`` is the map size at the model's input size; if the optimized canvas is larger, the
    position is mapped to the same relative place.
    """
    probe = Unit(layer=layer, channel=n, y=y, x=x, layout=layout)

    def fn(a: Acts) -> torch.Tensor:
        if y is None:
            t = to_map(a[layer], layout or layout_from_tensor(a[layer]))
            h, w = t.shape[-2:]
            return t[:, n, h // 2, w // 2]
        return unit_values(a[layer], probe, layout, ref_hw)

    return Objective(fn, (layer,), f"neuron({layer}:{n}@{y},{x})")


def direction(layer: str, vec: torch.Tensor, layout: Layout | None = None) -> Objective:
    """Dot product of the activation at each position with ``vec`` [C], averaged over space
    (equal to the dot product with the pooled activation)."""
    probe = Unit(layer=layer, direction=vec, layout=layout)
    return Objective(lambda a: unit_values(a[layer], probe, layout), (layer,), f"direction({layer})")


def for_unit(unit: Unit, ref_hw: tuple[int, int] | None = None) -> Objective:
    """The objective that visualizes ``unit`` (read with ``unit.layout``)."""
    if unit.kind == "direction":
        return direction(unit.layer, unit.direction, unit.layout)
    if unit.kind == "neuron":
        return neuron(unit.layer, unit.channel, unit.y, unit.x, ref_hw, unit.layout)
    return channel(unit.layer, unit.channel, unit.layout)


def unit_activation(acts: Acts, unit: Unit) -> torch.Tensor:
    """Deprecated name of :func:`fvsanity.layouts.unit_values`: [B] value of ``unit`` for every
    element of a batch, from ``acts[unit.layer]``."""
    return unit_values(acts[unit.layer], unit)


def batched_unit_scores(
    acts: Acts,
    units: list[Unit],
    ref_hw: dict[str, tuple[int, int]] | None = None,
    layouts: dict[str, Layout] | None = None,
) -> torch.Tensor:
    """[B] score of element b under ITS OWN unit ``units[b]`` (one gather per layer, no loop over B).

    Each layer is read with ``layouts[layer]`` if given, else its units' ``layout``
    (:func:`fvsanity.layouts.unit_values` per element; channel units in one gather).
    """
    b = len(units)
    out = None
    by_layer: dict[str, list[int]] = {}
    for i, u in enumerate(units):
        by_layer.setdefault(u.layer, []).append(i)
    for layer, idx in by_layer.items():
        t = acts[layer]
        ii = torch.tensor(idx, device=t.device)
        sub = t[ii]
        us = [units[i] for i in idx]
        lay = (layouts or {}).get(layer) or us[0].layout
        if all(u.kind == "channel" for u in us):
            ch = torch.tensor([u.channel for u in us], device=t.device)
            vals = pool(sub, lay)[torch.arange(len(idx), device=t.device), ch]
        else:
            rh = (ref_hw or {}).get(layer)
            vals = torch.stack([unit_values(sub[j : j + 1], u, lay, rh)[0] for j, u in enumerate(us)])
        if out is None:
            out = torch.zeros(b, device=t.device, dtype=vals.dtype)
        out = out.index_put((ii,), vals)
    return out


def _safe_unit_rows(g: torch.Tensor) -> torch.Tensor:
    """Rows of g [B, D] scaled to unit norm; zero rows stay zero with zero (finite) gradient."""
    n2 = (g * g).sum(-1, keepdim=True)
    ok = n2 > 0
    safe = torch.where(ok, n2, torch.ones_like(n2))
    return torch.where(ok, g / torch.sqrt(safe), torch.zeros_like(g))


def diversity_penalty(t: torch.Tensor) -> torch.Tensor:
    """lucent's diversity term for one group of S images: mean pairwise cosine of Gram matrices.

    ``t`` is [S, C, H, W]; returns a scalar to SUBTRACT from the objective (0 when S == 1).
    Safe at all-zero activations (no clamped-denominator gradient blow-up).
    """
    s = t.shape[0]
    if s < 2:
        return t.sum() * 0
    f = t.flatten(2)
    grams = _safe_unit_rows(torch.bmm(f, f.transpose(1, 2)).flatten(1))
    sim = grams @ grams.T
    return (sim.sum() - sim.diagonal().sum()) / (s * (s - 1))


# ---------------------------------------------------------------------------------- registry
# Named objectives for ``render(objective="name")`` and ``fvsanity visualize --objective``: a
# factory turns each unit into the Objective its FV maximises. Convention:
#     factory(unit: Unit, ref_hw: tuple[int, int] | None = None) -> Objective
# (``ref_hw``: the unit layer's map size at the model's input size, for neuron positions).
# Add one with ``@OBJECTIVES.register("name")``; ``unit`` (the default) is ``for_unit``.
from ..errors import UnitError  # noqa: E402
from ..registry import Registry  # noqa: E402

OBJECTIVES = Registry("objective")
OBJECTIVES.register("unit", for_unit)


@OBJECTIVES.register("channel")
def _channel_of(unit: Unit, ref_hw: tuple[int, int] | None = None) -> Objective:
    """The unit's channel, mean over space (a neuron spec's position is ignored)."""
    if unit.channel is None:
        raise UnitError(f"objective 'channel' needs a LAYER:CHANNEL unit, got {unit}")
    return channel(unit.layer, unit.channel)


@OBJECTIVES.register("neuron")
def _neuron_of(unit: Unit, ref_hw: tuple[int, int] | None = None) -> Objective:
    """The unit's channel at its @Y,X position, or at the centre of the map."""
    if unit.channel is None:
        raise UnitError(f"objective 'neuron' needs a LAYER:CHANNEL[@Y,X] unit, got {unit}")
    return neuron(unit.layer, unit.channel, unit.y, unit.x, ref_hw)


@OBJECTIVES.register("direction")
def _direction_of(unit: Unit, ref_hw: tuple[int, int] | None = None) -> Objective:
    """The unit's direction vector (``LAYER:dir=FILE.pt``), mean over space."""
    if unit.direction is None:
        raise UnitError(f"objective 'direction' needs a LAYER:dir=FILE.pt unit, got {unit}")
    return direction(unit.layer, unit.direction)
