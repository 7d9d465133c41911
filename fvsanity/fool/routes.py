"""Routes: which unit shows what. A manipulated unit shows another unit of its layer, or a picture."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import FVSanityError, UnitError
from ..models import LoadedModel
from ..units import Unit, parse_unit

__all__ = ["Route", "make_routes", "parse_unit_range", "load_picture", "heldout_routes"]


@dataclass(frozen=True)
class Route:
    """Unit ``unit`` (a channel) shows ``source`` (a channel of the same layer) or ``picture``.

    ``picture`` is ``[3,H,W]`` RGB in [0,1] (``picture_name`` says where it came from).
    """

    unit: Unit
    source: Unit | None = None
    picture: torch.Tensor | None = field(default=None, compare=False, repr=False)
    picture_name: str | None = None

    def to_json(self) -> dict:
        return {
            "unit": str(self.unit),
            "source": str(self.source) if self.source is not None else None,
            "picture": self.picture_name,
        }


def load_picture(path: str | Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An image file as ``[3,H,W]`` RGB in [0,1] (resized to ``size`` (H, W) px if given)."""
    import torchvision.transforms.functional as TF
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FVSanityError(f"target picture not found: {str(path)!r} (give an image file or unit:LAYER:CHANNEL)")
    try:
        with Image.open(path) as im:  # closes the file (Image.open alone leaks it until GC)
            img = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise FVSanityError(f"cannot read target picture {str(path)!r}: {type(e).__name__}") from e
    if size is not None:
        img = TF.resize(img, list(size), antialias=True)
    return TF.to_tensor(img)


#: layer layouts the channel edits (gate, silent units) are defined on: they index channel dim 1
EDIT_LAYOUTS = ("conv", "vector")


def parse_unit_range(spec: str, lm: LoadedModel, layer: str | None = None) -> list[Unit]:
    """``all`` (every channel of ``layer``, default the output layer), ``L:a-b`` or a unit list."""
    from ..units import parse_units, resolve_layer

    spec = spec.strip()
    m = re.fullmatch(r"(?:(?P<layer>[^:]+):)?(?P<a>\d+)-(?P<b>\d+)", spec)
    if spec == "all" or spec.endswith(":all") or m:
        name = spec[:-4] if spec.endswith(":all") else (m.group("layer") if m and m.group("layer") else None)
        name = resolve_layer(lm.model, name or layer or lm.output_layer)
        n_ch = lm.layer_info(name).layout.channels
        lo, hi = (int(m.group("a")), int(m.group("b"))) if m else (0, n_ch - 1)
        if not 0 <= lo <= hi < n_ch:
            raise UnitError(f"unit range {spec!r} out of range for {name!r}: valid 0..{n_ch - 1}")
        return [Unit(layer=name, channel=c) for c in range(lo, hi + 1)]
    return parse_units(spec, lm)


def make_routes(
    lm: LoadedModel,
    units: list[Unit] | str,
    target: str | Unit | torch.Tensor | None = None,
    *,
    shift: int | None = None,
    picture_size: tuple[int, int] | None = None,
) -> list[Route]:
    """Routes for ``units``.

    Args:
        units: Units (or a spec string: ``all``, ``L:a-b``, ``L:C,L:C``).
        target: ``"unit:L:C"`` / a Unit (every unit shows that unit; same layer), an image path or
            a ``[3,H,W]`` tensor (every unit shows that picture), or None with ``shift``.
        shift: unit ``c`` shows channel ``(c + shift) % C`` of its layer (the paper's permutation).
    """
    from ..layouts import require

    if isinstance(units, str):
        units = parse_unit_range(units, lm)
    units = [parse_unit(u, lm) for u in units]
    if not units:
        raise FVSanityError("no units to manipulate; give --unit L:C, a range L:a-b, or all")
    from ..units import check_distinct

    check_distinct(units, "--unit")
    for u in units:
        if u.kind != "channel":
            raise UnitError(f"unit {u} is a {u.kind}; fooling manipulates whole channels (LAYER:CHANNEL)")
        require(lm.layer_info(u.layer).layout, EDIT_LAYOUTS, "a fooling edit", u.layer)  # before any training
    if (target is None) == (shift is None):
        raise FVSanityError("give exactly one of target (unit:L:C or an image) and shift (permute channels)")
    routes: list[Route] = []
    if shift is not None:
        for u in units:
            n_ch = lm.layer_info(u.layer).layout.channels
            routes.append(Route(unit=u, source=Unit(layer=u.layer, channel=(u.channel + shift) % n_ch)))
        return routes
    if isinstance(target, str) and target.startswith("unit:"):
        target = target[5:]
        src = parse_unit(target, lm)
    elif isinstance(target, Unit):
        src = parse_unit(target, lm)
    else:
        src = None
    if src is not None:
        for u in units:
            if src.layer != u.layer:
                raise UnitError(
                    f"target unit {src} is in layer {src.layer!r} but {u} is in {u.layer!r}; "
                    f"the target must be a channel of the same layer (e.g. unit:{u.layer}:N)"
                )
        return [Route(unit=u, source=Unit(layer=u.layer, channel=src.channel)) for u in units]
    if isinstance(target, torch.Tensor):
        pic, name = target.detach().float().cpu(), "tensor"
    else:
        pic, name = load_picture(target, picture_size), str(target)
    if pic.ndim != 3 or pic.shape[0] != 3:
        raise FVSanityError(f"target picture must be [3,H,W] RGB, got shape {tuple(pic.shape)}")
    return [Route(unit=u, picture=pic, picture_name=name) for u in units]


def heldout_routes(
    lm: LoadedModel,
    units: str,
    target: str | None = None,
    *,
    shift: int | None = None,
    n_eval: int,
    tuning: Sequence[str] = (),
    tuning_sources: Sequence[str] = (),
    seed: int = 0,
):
    """(routes, evaluation units, UnitSplit): the routes of ``units`` (a :func:`make_routes`
    spec, or ``"heldout"``: one held-out class unit) to ``target`` / by ``shift``, and at most
    ``n_eval`` evaluation units among the routed class units of the output layer that are not in
    ``tuning`` (units whose results informed a setting) and whose source is not in
    ``tuning_sources``, drawn seeded (:func:`fvsanity.splits.unit_split`); ``run_fool(...,
    eval_units=)`` then evaluates exactly these units."""
    from ..splits import unit_split

    classes = [str(u) for u in parse_unit_range("all", lm) if u.layer == lm.output_layer]
    n_cls = len(classes)
    bad_src = set(tuning_sources)
    cands = [c for c in classes if shift is None or f"{lm.output_layer}:{(int(c.rsplit(':', 1)[1]) + shift) % n_cls}" not in bad_src]
    spec = units
    if spec == "heldout":
        us = unit_split(cands, list(tuning), 1, seed)
        spec = us.evaluation[0]
    routes = make_routes(lm, spec, target, shift=shift, picture_size=lm.input_size)
    if units != "heldout":
        routed = {str(r.unit) for r in routes}
        us = unit_split([c for c in cands if c in routed], list(tuning), min(n_eval, len(routes)), seed)
    return routes, list(us.evaluation), us
