"""What a unit is compared with: its natural references and other images
(:func:`select_references`), the layer order of its path (:func:`order_layers`) and the checks of
the metrics asked for (:func:`validate_metrics`); see :mod:`fvsanity.compare.path`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import FVSanityError
from .path_common import unit_seed

__all__ = ["MIN_REFERENCES", "MIN_OTHER", "order_layers", "References", "select_references", "validate_metrics"]

#: fewest natural references (and, for a class unit, images of its class) a verdict needs
MIN_REFERENCES = 2
#: fewest other natural images (lower reference, permutation pool) a verdict needs
MIN_OTHER = 2



def order_layers(lm, names: Sequence[str]) -> list[str]:
    """``names`` without repeats, in the model's module order (``named_modules``)."""
    order = {n: i for i, (n, _) in enumerate(lm.model.named_modules())}
    return sorted(dict.fromkeys(names), key=lambda n: order.get(n, len(order)))


_order_layers = order_layers  # deprecated private name


def _fv_tensor(fv_images) -> torch.Tensor:
    images = getattr(fv_images, "images", fv_images)
    if not isinstance(images, torch.Tensor):
        raise FVSanityError(f"FVs must be a Tensor [U, S, 3, H, W] or an FVResult, got {type(fv_images).__name__}")
    if images.ndim == 4:
        images = images[:, None]
    if images.ndim != 5 or images.shape[2] != 3:
        raise FVSanityError(f"FV images must have shape [U, S, 3, H, W], got {tuple(images.shape)}")
    return images


@dataclass(frozen=True)
class References:
    """A unit's natural references R and other images O (indices into the natural images).

    Attributes:
        natural: sorted int64 [m] R = class images + top-k exemplars.
        other: sorted int64 [n] O, at most ``n_other`` images outside R (and the unit's class).
        class_indices: int64 [c] the images of the unit's class in R (empty if not a class unit).
        top_k_indices, top_k_values: the unit's top exemplars (highest first) and responses.
        class_index: the unit's class for a class unit with labelled images, else None.
        class_name: its name, when known.
        status: ``"ok"`` or ``"insufficient references: <why>"`` (rule: module docstring).
    """

    natural: torch.Tensor
    other: torch.Tensor
    class_indices: torch.Tensor
    top_k_indices: torch.Tensor
    top_k_values: torch.Tensor
    class_index: int | None
    class_name: str | None
    status: str = "ok"


def select_references(
    lm,
    unit,
    natural,
    responses: torch.Tensor,
    *,
    top_k: int = 10,
    n_other: int = 200,
    use_class_images: bool = True,
    seed: int = 0,
) -> References:
    """The one reference selection of ``check`` and ``audit`` (see the module docstring).

    Args:
        lm: the LoadedModel; unit: a parsed Unit.
        natural: :class:`~fvsanity.data.NaturalImages` (its labels pick a class unit's images).
        responses: [N] the unit's response to every natural image (for the top-k).
        top_k: exemplars added to R (0: class images only); n_other: size of O.
        use_class_images: put the images of a class unit's class in R.
        seed: the BASE seed; O is drawn with :func:`unit_seed` (seed, unit name).

    Returns:
        :class:`References`, with ``status`` saying whether they suffice for a verdict.
    """
    from ..activations import top_k_exemplars

    n_nat = len(natural)
    labels = natural.labels
    has_labels = bool((labels >= 0).any())
    is_class = unit.layer == lm.output_layer and unit.kind == "channel" and has_labels
    empty = torch.empty(0, dtype=torch.long)
    cls_idx = natural.indices_of_class(unit.channel) if (is_class and use_class_images) else empty
    if top_k > 0:
        top_i, top_v = top_k_exemplars(lm, unit, natural, min(int(top_k), n_nat), responses=responses)
    else:
        top_i, top_v = empty, torch.empty(0)
    ref = torch.unique(torch.cat([cls_idx, top_i]))  # sorted
    pool = torch.ones(n_nat, dtype=torch.bool)
    pool[ref] = False
    if is_class:
        pool &= (labels >= 0) & (labels != unit.channel)
    pool_idx = torch.nonzero(pool).flatten()
    if pool_idx.numel() > n_other:
        gen = torch.Generator().manual_seed(unit_seed(seed, unit))
        pool_idx = pool_idx[torch.randperm(pool_idx.numel(), generator=gen)[:n_other]].sort().values
    cname = None
    for names in (natural.class_names, lm.class_names) if is_class else ():
        if names and unit.channel < len(names) and names[unit.channel]:
            cname = names[unit.channel]
            break

    why = []
    if is_class and use_class_images and cls_idx.numel() < MIN_REFERENCES:
        what = f"class {unit.channel}" + (f" ({cname})" if cname else "")
        rest = f"top-{int(top_k)} exemplars only" if top_k > 0 else "no references"
        why.append(f"{cls_idx.numel()} image(s) of {what} in the natural images; {rest}")
    elif ref.numel() < MIN_REFERENCES:
        why.append(f"{ref.numel()} natural reference image(s), need >= {MIN_REFERENCES}")
    if pool_idx.numel() < MIN_OTHER:
        why.append(f"{pool_idx.numel()} other natural image(s), need >= {MIN_OTHER}")
    status = "insufficient references: " + "; ".join(why) if why else "ok"
    return References(ref, pool_idx, cls_idx, top_i, top_v, unit.channel if is_class else None, cname, status)


def validate_metrics(metric: str, paired_metrics: Sequence[str] = ()) -> None:
    """Refuse, with one line, a per-unit ``metric`` outside the unpaired design or a paired
    metric outside the paired design (e.g. ``mmd``). Cheap: call it before any model work."""
    from .similarity import check_design

    check_design(metric, "unpaired")
    for pm in paired_metrics:
        check_design(pm, "paired")
