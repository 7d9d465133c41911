"""Layer layouts: how a layer's output is laid out, and the one helper that pools and indexes it.

Three layouts (the batch dimension B first in each):

- ``conv``   ``[B, C, H, W]``: channel is dim 1, space is dims 2+ (CNN feature maps; a 3-D
  output ``[B, C, L]`` outside a vision transformer is read the same way, with no grid).
- ``tokens`` ``[B, N, D]``: ``N = prefix_tokens + h * w`` tokens of width ``D`` (timm ViTs:
  class/register/distillation tokens first, then the patch grid row by row).
- ``vector`` ``[B, C]``: no space (logits, pooled features).

:func:`pool`, :func:`unit_values` and :func:`to_map` are the only places that know which
dimension is the channel; everything that reduces or indexes a layer output goes through them.
:func:`infer_layout` reads a layer's layout from its output shape and the model around it.

Dependency-light on purpose (torch and :mod:`fvsanity.errors` only), so any module can use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import FVSanityError, UnitError
from .hooks import hooked

__all__ = [
    "Layout",
    "LayerInfo",
    "KINDS",
    "POOLS",
    "pool",
    "unit_values",
    "to_map",
    "infer_layout",
    "layout_from_tensor",
    "layer_infos",
    "require",
]

KINDS = ("conv", "tokens", "vector")
POOLS = ("mean", "max", "sum")


@dataclass(frozen=True)
class Layout:
    """How one layer's output is laid out.

    Attributes:
        kind: ``"conv"`` ``[B, C, H, W]`` | ``"tokens"`` ``[B, N, D]`` | ``"vector"`` ``[B, C]``.
        channels: C (conv / vector) or D (tokens): the range of a unit's channel index.
        prefix_tokens: tokens only: class/register tokens before the patch grid (excluded from
            pooling and from the grid).
        grid: tokens: ``(h, w)`` of the patch grid (``h * w = N - prefix_tokens``); conv: ``(H, W)``
            (None for a 1-D ``[B, C, L]`` map); vector: None.
    """

    kind: str
    channels: int
    prefix_tokens: int = 0
    grid: tuple[int, int] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise FVSanityError(f"unknown layout kind {self.kind!r}; valid: {', '.join(KINDS)}")

    @property
    def spatial(self) -> bool:
        """Whether units of this layer have positions (``@y,x`` valid, :func:`to_map` defined)."""
        return self.grid is not None

    def to_json(self) -> dict:
        d = {"kind": self.kind, "channels": self.channels}
        if self.kind == "tokens":
            d["prefix_tokens"] = self.prefix_tokens
        if self.grid is not None:
            d["grid"] = list(self.grid)
        return d


@dataclass(frozen=True)
class LayerInfo:
    """One hookable layer: its dotted name, module class name, output shape (no batch), layout."""

    name: str
    module_type: str
    shape: tuple[int, ...]
    layout: Layout

    def to_json(self) -> dict:
        return {"name": self.name, "module_type": self.module_type, "shape": list(self.shape),
                "layout": self.layout.to_json()}


# ------------------------------------------------------------------------------ inference
def layout_from_tensor(act: torch.Tensor) -> Layout:
    """The layout of an output read without its model: 2-D vector, else conv (channel dim 1).

    The fallback where no layout is known; a ``[B, N, D]`` token output needs its model
    (:func:`infer_layout`), since its shape alone cannot tell tokens from a 1-D map.
    """
    if act.ndim == 2:
        return Layout("vector", channels=act.shape[1])
    if act.ndim < 2:
        raise FVSanityError(f"a layer output needs a batch and a channel dim; got shape {tuple(act.shape)}")
    grid = tuple(act.shape[2:4]) if act.ndim == 4 else None
    return Layout("conv", channels=act.shape[1], grid=grid)


def _vit_ancestor(model: nn.Module, name: str) -> tuple[nn.Module, str] | None:
    """The innermost module on the path to ``name`` (model included) that is a vision
    transformer (has ``num_prefix_tokens`` and ``patch_embed``), and its dotted name."""
    found = None
    parts = name.split(".") if name else []
    mod = model
    path = ""
    for i in range(len(parts) + 1):
        if hasattr(mod, "num_prefix_tokens") and hasattr(mod, "patch_embed"):
            found = (mod, path)
        if i == len(parts):
            break
        mod = getattr(mod, parts[i], None)
        if mod is None:
            break
        path = parts[i] if not path else f"{path}.{parts[i]}"
    return found


def _grid_for(n_patches: int, vit: nn.Module) -> tuple[int, int] | None:
    gs = getattr(getattr(vit, "patch_embed", None), "grid_size", None)
    if gs is not None and len(gs) == 2 and int(gs[0]) * int(gs[1]) == n_patches:
        return int(gs[0]), int(gs[1])
    side = math.isqrt(n_patches)
    if side * side == n_patches:
        return side, side
    if gs is not None and len(gs) == 2 and gs[0] and gs[1]:  # same aspect ratio, other size
        h = round(math.sqrt(n_patches * gs[0] / gs[1]))
        if h > 0 and n_patches % h == 0:
            return h, n_patches // h
    return None


def infer_layout(model: nn.Module, name: str, shape: tuple[int, ...]) -> Layout:
    """The layout of layer ``name`` of ``model`` whose output (without batch) has ``shape``.

    ``(C, H, W)`` -> conv; ``(C,)`` -> vector; ``(N, D)`` inside a vision transformer (a module
    with ``num_prefix_tokens`` and ``patch_embed``, as timm's ViT/DeiT/EVA) -> tokens with the
    model's prefix tokens (0 inside ``patch_embed``, which runs before they are added);
    ``(C, L)`` elsewhere -> conv without a grid (channel dim 1, as before layouts existed).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 1:
        return Layout("vector", channels=shape[0])
    if len(shape) == 2:
        vit = _vit_ancestor(model, name)
        if vit is not None:
            mod, path = vit
            rel = name[len(path) + 1 :] if path else name
            inside_embed = rel == "patch_embed" or rel.startswith("patch_embed.")
            prefix = 0 if inside_embed else int(getattr(mod, "num_prefix_tokens", 0) or 0)
            n, d = shape
            if n > prefix:
                return Layout("tokens", channels=d, prefix_tokens=prefix, grid=_grid_for(n - prefix, mod))
        return Layout("conv", channels=shape[0])
    if len(shape) == 0:
        raise FVSanityError(f"layer {name!r} outputs a scalar per image; no channels to read")
    return Layout("conv", channels=shape[0], grid=shape[1:3] if len(shape) == 3 else None)


def layer_infos(model: nn.Module, input_size: tuple[int, int], preprocess=None) -> dict[str, LayerInfo]:
    """:class:`LayerInfo` of every module with a tensor output, in ``named_modules`` order.

    One forward of a grey image [1, 3, *input_size] (through ``preprocess`` if given) under hooks
    that remove themselves. Not cached here (see ``LoadedModel.layer_info``).
    """
    shapes: dict[str, tuple] = {}
    mods = [(n, m) for n, m in model.named_modules() if n]

    def make(name):
        def hook(_m, _i, out):
            if isinstance(out, (tuple, list)) and out:
                out = out[0]
            if isinstance(out, torch.Tensor):
                shapes[name] = tuple(out.shape[1:])

        return hook

    with hooked(model, [(mod, make(name)) for name, mod in mods]):
        p0 = next(model.parameters(), None)
        dev = p0.device if p0 is not None else torch.device("cpu")
        dtype = p0.dtype if p0 is not None and p0.is_floating_point() else torch.float32
        x = torch.full((1, 3, *input_size), 0.5, device=dev, dtype=dtype)
        if preprocess is not None:
            x = preprocess(x)
        with torch.no_grad():
            model(x)
    out = {}
    for name, mod in mods:
        if name in shapes and len(shapes[name]) >= 1:
            out[name] = LayerInfo(name, type(mod).__name__, shapes[name], infer_layout(model, name, shapes[name]))
    return out


def require(layout: Layout, supported: tuple[str, ...], what: str, layer: str = "") -> None:
    """FVSanityError (one line) unless ``layout.kind`` is one of ``supported``."""
    if layout.kind not in supported:
        where = f" {layer!r}" if layer else ""
        raise FVSanityError(
            f"{what} is not defined on layer{where} with a {layout.kind} layout; supported layouts: "
            f"{', '.join(supported)}"
        )


# ------------------------------------------------------------------------------ reading
def _check(act: torch.Tensor, layout: Layout) -> None:
    want = {"conv": None, "tokens": 3, "vector": 2}[layout.kind]
    if (want is not None and act.ndim != want) or (want is None and act.ndim < 3):
        raise FVSanityError(f"a {layout.kind} layout needs a {want or '3+'}-D output; got shape {tuple(act.shape)}")


def _patches(act: torch.Tensor, layout: Layout) -> torch.Tensor:
    """tokens [B, N, D] -> patch tokens [B, N - prefix, D]."""
    return act[:, layout.prefix_tokens :]


def pool(act: torch.Tensor, layout: Layout | None = None, how: str = "mean", prefix: bool = False) -> torch.Tensor:
    """Pool a layer output to ``[B, C]`` (C = ``layout.channels``).

    conv ``[B, C, *space]``: ``how`` over space; tokens ``[B, N, D]``: over the patch tokens
    (prefix tokens excluded unless ``prefix``); vector ``[B, C]``: returned as is.

    Args:
        act: the layer's output.
        layout: its layout (None: :func:`layout_from_tensor`, i.e. channel dim 1).
        how: ``"mean"``, ``"max"`` or ``"sum"``.
        prefix: tokens: pool over every token, prefix tokens included (attribution sums, which
            must account for every position).
    """
    if how not in POOLS:
        raise FVSanityError(f"unknown pool {how!r}; valid: {', '.join(POOLS)}")
    layout = layout or layout_from_tensor(act)
    _check(act, layout)
    if layout.kind == "vector":
        return act
    if layout.kind == "tokens":
        flat, dim = (act if prefix else _patches(act, layout)), 1
    else:
        flat, dim = act.flatten(2), 2
    if how == "mean":
        return flat.mean(dim)
    if how == "max":
        return flat.amax(dim)
    return flat.sum(dim)


def to_map(act: torch.Tensor, layout: Layout | None = None) -> torch.Tensor | None:
    """The output as a feature map ``[B, C, h, w]``, or None where it has no 2-D grid.

    conv ``[B, C, H, W]``: as is; tokens: the patch tokens on their grid (row-major, as timm's
    ``PatchEmbed`` flattens them), prefix tokens dropped; vector (or a gridless map): None.
    """
    layout = layout or layout_from_tensor(act)
    _check(act, layout)
    if layout.kind == "conv":
        return act if act.ndim == 4 else None
    if layout.kind == "vector" or layout.grid is None:
        return None
    h, w = layout.grid
    p = _patches(act, layout)
    if p.shape[1] != h * w:
        raise FVSanityError(f"{p.shape[1]} patch tokens do not fill the {h}x{w} grid of this layout")
    return p.transpose(1, 2).reshape(act.shape[0], act.shape[2], h, w)


def _pick(size_now: int, pos: int, size_ref: int) -> int:
    """Index at ``size_now`` of position ``pos`` defined on a map of ``size_ref`` (same relative place)."""
    if size_now == size_ref:
        return pos
    return min(size_now - 1, max(0, round((pos + 0.5) * size_now / size_ref - 0.5)))


def unit_values(
    act: torch.Tensor, unit, layout: Layout | None = None, ref_hw: tuple[int, int] | None = None
) -> torch.Tensor:
    """A unit's scalar value per batch element, ``[B]``, from its layer's output ``act``.

    - channel: ``pool(act)[:, c]`` (mean over space / over patch tokens; the value itself for a
      vector layout);
    - neuron (``unit.y``, ``unit.x`` set): channel c at grid position (y, x) (a patch token for
      tokens); ``ref_hw`` is the grid the position was given on (default: this map's), mapped to
      the same relative place on a larger map;
    - direction (``unit.direction`` [C]): dot product of the pooled activation with it.

    Args:
        act: the layer output (see :class:`Layout`).
        unit: a :class:`~fvsanity.units.Unit` (any object with ``channel``, ``y``, ``x``,
            ``direction``; its ``layout`` is used when ``layout`` is None).
        layout: the layer's layout (None: ``unit.layout``, else :func:`layout_from_tensor`).
    """
    layout = layout or getattr(unit, "layout", None) or layout_from_tensor(act)
    direction = getattr(unit, "direction", None)
    if direction is not None:
        pooled = pool(act, layout)
        return pooled @ direction.to(pooled.device, pooled.dtype)
    if unit.y is not None:
        grid = to_map(act, layout)
        if grid is None:
            raise UnitError(f"unit {unit} has a position but its layer has no grid ({layout.kind} layout)")
        h, w = grid.shape[-2:]
        rh, rw = ref_hw or (h, w)
        return grid[:, unit.channel, _pick(h, unit.y, rh), _pick(w, unit.x, rw)]
    return pool(act, layout)[:, unit.channel]
