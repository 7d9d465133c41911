"""``load_model(spec)``: one call from any spec (registered name, torchvision name, ``timm:NAME``,
a registered loader's spec, a factory) to a :class:`~fvsanity.models.LoadedModel`, with a
``weights=FILE`` applied strictly afterwards."""

from __future__ import annotations

import os
import sys

import torch

from ..errors import FVSanityError
from . import custom
from .loaded import LoadedModel
from .registration import LOADERS, MODELS
from .timm_models import load_timm
from .torchvision_models import AUX_PREFIXES, load_torchvision
from .weights import few, load_weights

__all__ = ["load_model", "DEFAULT_MODEL"]

DEFAULT_MODEL = "cifar10-resnet20"


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    device: str | torch.device | None = None,
    seed: int = 0,
    allow_partial: bool = False,
) -> LoadedModel:
    """Load a model by name, ready for fvsanity.

    Args:
        spec: registry name (see module doc), a torchvision name, ``timm:NAME``, the ``model/``
            folder ``fvsanity fool`` wrote (a manipulated model; ``manipulated.json`` inside; loaded
            by the loader ``fvsanity.fool`` registers with :func:`register_loader`), or a factory
            ``path/to/file.py:NAME`` / ``dotted.module:NAME`` (see :mod:`fvsanity.models.custom`).
        weights: a local state dict file (``.pt``/``.pth``/``.th`` via ``weights_only=True``, or
            ``.safetensors``); overrides the named model's own weights. Loaded strictly: missing,
            unexpected or other-shaped keys and NaN/inf values are a one-line
            :class:`~fvsanity.errors.MissingWeightsError`.
        pretrained: False gives random weights (structural tests; refused together with
            ``weights``, which it would ignore); True looks the weights up
            (``$FVSANITY_DATA``, the user cache, the packaged copy, then a download checked
            against a full sha256) and raises :class:`~fvsanity.errors.MissingWeightsError` with
            where it looked if none are found.
        device: where to put the model (default: CPU).
        seed: seeds the random initialisation (what ``pretrained=False`` or a partial ``weights``
            file leaves), without touching the global RNG state.
        allow_partial: with ``weights``, load the entries that fit and leave the model's missing
            or other-shaped entries at their (seeded) random initialisation: printed on stderr,
            listed in ``lm.random_parameters``, noted in ``lm.weights_source`` and
            ``lm.provenance()``. Unexpected keys of the file are ignored (printed too).
    """
    if allow_partial and weights is None:
        raise FVSanityError("--allow-partial-weights applies to a --weights FILE only; none was given")
    if weights is not None and not pretrained:
        raise FVSanityError(f"--random-weights and --weights {str(weights)!r} conflict (random weights would ignore "
                            "the file); give one of them")
    if spec not in MODELS:
        # other kinds of spec (register_loader): e.g. the model/ folder ``fvsanity fool`` wrote
        for loader in LOADERS:
            can_load, load = LOADERS.get(loader)
            if can_load(str(spec)):
                return load(str(spec), weights=weights, device=device)
    weights = str(weights) if weights is not None else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        own = pretrained and weights is None  # a weights file replaces the model's own weights
        if spec in MODELS:
            lm = MODELS[spec](pretrained=own)
        elif spec.startswith("timm:"):
            lm = load_timm(spec[5:], own)
        elif custom.is_factory_spec(spec):  # my_pkg.models:build, path/to/file.py:build
            lm = custom.load_factory(spec, pretrained=own)
        else:
            lm = load_torchvision(spec, own)
    if weights is not None:
        random_keys, ignored = load_weights(
            lm.model, weights, allow_partial=allow_partial, model_name=lm.name,
            ignore_prefixes=AUX_PREFIXES.get(spec, ()),
        )
        lm.weights_source = weights
        lm.random_parameters = list(random_keys)
        if random_keys or ignored:
            n_all = len(lm.model.state_dict())
            note = f"partial: {len(random_keys)} of {n_all} state-dict entries left random"
            lm.weights_source = f"{weights} ({note})"
            print(
                f"fvsanity: warning: --allow-partial-weights: {len(random_keys)} of {n_all} state-dict entries of "
                f"{lm.name} are not in {weights} (or have another shape) and stay random"
                + (f": {few(random_keys, 10)}" if random_keys else "")
                + (f"; ignored {len(ignored)} key(s) the model lacks: {few(ignored, 5)}" if ignored else ""),
                file=sys.stderr,
                flush=True,
            )
    if device is not None:
        lm.to(device)
    return lm
