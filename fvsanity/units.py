"""Units: what an FV maximises. ``"layer:channel"``, ``"layer:channel@y,x"`` (neuron) or a direction.

Layer names are ``model.named_modules()`` dotted names (``layer3.1``, ``features.12.expand3x3``,
``classifier.1``); lucent's underscore names (``layer3_1``) are accepted and translated. Errors
name the closest valid layers or the valid channel range.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import UnitError
from .layouts import Layout, layer_infos
from .names import layer_names, resolve_layer  # noqa: F401 - re-exported: units.layer_names, units.resolve_layer


@dataclass(frozen=True)
class Unit:
    """One unit of one layer.

    Attributes:
        layer: dotted module name.
        channel: channel index (None for a pure direction).
        y, x: spatial position for a neuron (None: channel = mean over space).
        direction: a [C] vector for a direction unit (dot product with the activation,
            averaged over space), else None.
        layout: the layer's :class:`~fvsanity.layouts.Layout` (set by :func:`parse_unit`; None
            for a unit built by hand, read then as channel-dim-1). ``channel`` ranges over
            ``layout.channels`` (D for tokens) and ``y, x`` over ``layout.grid`` (the patch grid
            for tokens).
    """

    layer: str
    channel: int | None = None
    y: int | None = None
    x: int | None = None
    direction: torch.Tensor | None = field(default=None, compare=False, repr=False)
    layout: Layout | None = field(default=None, compare=False, repr=False)

    @property
    def kind(self) -> str:
        if self.direction is not None:
            return "direction"
        return "neuron" if self.y is not None else "channel"

    def __str__(self) -> str:
        if self.direction is not None:
            return f"{self.layer}:direction"
        s = f"{self.layer}:{self.channel}"
        return s + (f"@{self.y},{self.x}" if self.y is not None else "")

    def to_json(self) -> dict:
        d = {"spec": str(self), "layer": self.layer, "kind": self.kind, "channel": self.channel}
        if self.y is not None:
            d.update(y=self.y, x=self.x)
        if self.direction is not None:
            d["direction"] = self.direction.tolist()
        if self.layout is not None:
            d["layout"] = self.layout.kind
        return d


_SPEC = re.compile(r"^(?P<layer>[^:@]+):(?P<ch>-?[0-9]+)(@(?P<y>-?[0-9]+),(?P<x>-?[0-9]+))?$")
_FORMS = "expected LAYER:CHANNEL (e.g. 'layer3.2:5'), LAYER:CHANNEL@Y,X or LAYER:dir=FILE.pt"


def _show(value: str, limit: int = 60) -> str:
    """``repr(value)``, shortened to about ``limit`` characters for one-line messages."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 5] + "...'" + f" ({len(value)} chars)"


def _int(text: str, spec: str) -> int:
    """``int(text)``; UnitError naming ``spec`` if it has more digits than Python converts (4300)."""
    try:
        return int(text)
    except ValueError as e:
        raise UnitError(f"bad unit {_show(spec)}; {_FORMS} (a number with {len(text)} digits)") from e


def _num(v: int) -> str:
    """An integer for a message: in full up to 20 digits, else abbreviated with its length."""
    s = str(v)
    digits = len(s.lstrip("-"))
    return s if digits <= 20 else f"{s[:9]}... ({digits} digits)"


def _spec_problem(spec: str) -> str:
    """Why ``spec`` (stripped, no whitespace) does not match ``_SPEC``: for the error message."""
    if ":" not in spec:
        return "missing ':CHANNEL'"
    layer, _, rest = spec.partition(":")
    if not layer or "@" in layer:
        return "missing the layer name before ':'"
    ch, at, pos = rest.partition("@")
    if not ch:
        return "missing the channel after ':'"
    if not re.fullmatch(r"-?[0-9]+", ch):
        return f"channel {_show(ch)} is not a whole number"
    if at and not re.fullmatch(r"-?[0-9]+,-?[0-9]+", pos):
        return f"position {_show('@' + pos)} must be @Y,X (two whole numbers)"
    return "malformed"


def layer_shapes(model: nn.Module, input_size: tuple[int, int], preprocess=None) -> dict[str, tuple]:
    """Output shape (without batch) of every module, from one forward of a grey image."""
    return {n: info.shape for n, info in layer_infos(model, input_size, preprocess).items()}


def cached_layer_infos(model: nn.Module, input_size: tuple[int, int], preprocess=None) -> dict:
    """:func:`fvsanity.layouts.layer_infos`, cached on ``model`` per input size (one forward per
    model and size; shared by ``LoadedModel.layers`` and the deprecated :func:`_shapes_for`).

    The key also counts the modules, so an edit that wraps a layer (``fvsanity.fool``) recomputes.
    """
    key = (tuple(input_size), sum(1 for _ in model.modules()))
    cache = getattr(model, "_fvsanity_layers", None)
    if cache is None or cache[0] != key:
        cache = (key, layer_infos(model, key[0], preprocess))
        try:
            object.__setattr__(model, "_fvsanity_layers", cache)
        except Exception:  # noqa: BLE001 - a module that refuses attributes: recompute next time
            pass
    return cache[1]


def _shapes_for(model, input_size, preprocess) -> dict[str, tuple]:
    """Deprecated: use ``LoadedModel.layers`` / ``LoadedModel.layer_info(name).shape``.

    ``{layer: output shape without batch}``, cached on ``model`` per input size.
    """
    return {n: info.shape for n, info in cached_layer_infos(model, input_size, preprocess).items()}


def _layer_info(lm, layer: str):
    """``lm.layer_info(layer)``, or the same computed here for a LoadedModel-like object without it."""
    if hasattr(lm, "layer_info"):
        return lm.layer_info(layer)
    infos = layer_infos(lm.model, lm.input_size, lm.preprocess)
    if layer not in infos:
        raise UnitError(f"layer {layer!r} produced no tensor output in a forward pass")
    return infos[layer]


def parse_unit(spec: str | Unit, lm) -> Unit:
    """Parse and validate a unit spec against a :class:`~fvsanity.models.LoadedModel`.

    Forms: ``"layer:channel"``, ``"layer:channel@y,x"``, ``"layer:dir=FILE"`` (a ``.pt`` tensor of
    shape [C], loaded with ``weights_only=True``), or a :class:`Unit`.
    """
    if isinstance(spec, Unit):
        unit = spec
    else:
        if not isinstance(spec, str):
            raise UnitError(f"bad unit {spec!r} ({type(spec).__name__}); {_FORMS}")
        spec = spec.strip()  # spaces around the spec are forgiven, spaces inside it are not
        if not spec:
            raise UnitError(f"empty unit spec; {_FORMS}")
        if ":dir=" in spec:
            layer, path = spec.split(":dir=", 1)
            try:
                vec = torch.load(Path(path), map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise UnitError(f"cannot read direction file {path!r}: {type(e).__name__}") from e
            unit = Unit(layer=layer, direction=torch.as_tensor(vec, dtype=torch.float32).flatten())
        else:
            if any(c.isspace() for c in spec):
                raise UnitError(
                    f"bad unit {_show(spec)}; {_FORMS} (no spaces inside a unit spec: write "
                    f"{_show(''.join(spec.split()))})"
                )
            m = _SPEC.match(spec)
            if not m:
                raise UnitError(f"bad unit {_show(spec)}; {_FORMS} ({_spec_problem(spec)})")
            y = m.group("y")
            unit = Unit(
                layer=m.group("layer"),
                channel=_int(m.group("ch"), spec),
                y=_int(y, spec) if y is not None else None,
                x=_int(m.group("x"), spec) if y is not None else None,
            )
    layer = resolve_layer(lm.model, unit.layer)
    info = _layer_info(lm, layer)
    layout, shape = info.layout, info.shape
    n_ch = layout.channels
    what = "token width (D)" if layout.kind == "tokens" else "channels"
    if unit.direction is not None:
        if unit.direction.numel() != n_ch:
            raise UnitError(f"direction for {layer!r} has {unit.direction.numel()} entries, layer has {n_ch} {what}")
    elif not 0 <= unit.channel < n_ch:
        raise UnitError(f"channel {_num(unit.channel)} out of range for {layer!r}: valid 0..{n_ch - 1}")
    if unit.y is not None:
        if layout.grid is None:
            raise UnitError(f"layer {layer!r} has no spatial dims (shape {shape}); drop the @y,x")
        h, w = layout.grid
        grid = "patch grid " if layout.kind == "tokens" else ""
        if not (0 <= unit.y < h and 0 <= unit.x < w):
            raise UnitError(
                f"position @{_num(unit.y)},{_num(unit.x)} out of range for {layer!r}: valid {grid}y 0..{h - 1}, "
                f"x 0..{w - 1}"
            )
    return Unit(layer=layer, channel=unit.channel, y=unit.y, x=unit.x, direction=unit.direction, layout=layout)


def parse_units(specs, lm) -> list[Unit]:
    """Parse several specs; a string may hold several separated by commas outside ``@y,x``."""
    out: list[Unit] = []
    for s in [specs] if isinstance(specs, (str, Unit)) else specs:
        if isinstance(s, str):
            if not s.strip():
                raise UnitError(f"empty unit spec {s!r}; {_FORMS}")
            parts: list[str] = []
            for piece in s.split(","):
                if parts and ":" not in piece and "@" in parts[-1] and "," not in parts[-1].split("@")[1]:
                    parts[-1] += "," + piece  # the x of a "@y,x"
                elif piece.strip():
                    parts.append(piece)
                else:
                    raise UnitError(f"empty unit in {_show(s)} (a doubled, leading or trailing comma); {_FORMS}")
            out += [parse_unit(part, lm) for part in parts]
        else:
            out.append(parse_unit(s, lm))
    return out


def check_distinct(units: list[Unit], flag: str = "units") -> list[Unit]:
    """``units`` if no unit is in it twice (compared by spec, after parsing: ``layer3_2:1`` and
    ``layer3.2:1`` are one unit; direction units are not compared), else a one-line
    :class:`~fvsanity.errors.UnitError` naming it."""
    seen: set[str] = set()
    for u in units:
        if u.direction is not None:
            continue
        if str(u) in seen:
            raise UnitError(f"unit {str(u)!r} given twice in {flag}; give each unit once")
        seen.add(str(u))
    return units


def describe_layers(lm) -> list[tuple[str, str, tuple]]:
    """(name, module type, output shape) for every module, in forward-registration order."""
    infos = lm.layers if hasattr(lm, "layers") else layer_infos(lm.model, lm.input_size, lm.preprocess)
    return [(i.name, i.module_type, i.shape) for i in infos.values()]
