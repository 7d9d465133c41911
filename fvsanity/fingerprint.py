"""Model fingerprints: what identifies a model's function, and the check that saved FVs match it.

:func:`model_fingerprint` hashes every parameter, buffer and module type plus the preprocessing;
:func:`tensor_digest` hashes tensors; :func:`check_fv_model` refuses saved FVs made for other
weights. This module imports nothing of fvsanity but :mod:`fvsanity.errors`, so the model
registry (``LoadedModel.fingerprint``), the FV loader (``generate.saved``) and the caches
(:mod:`fvsanity.cache`, which re-exports these names) all build on it without importing each other.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .errors import FVSanityError

__all__ = ["FVMismatchError", "check_fv_model", "model_fingerprint", "short", "tensor_digest"]

_FINGERPRINT_FORMAT = b"fvsanity-model-fingerprint/1\n"


class FVMismatchError(FVSanityError):
    """Saved FVs were made for another model: other weights, preprocessing or architecture."""


def short(fingerprint: str | None, n: int = 12) -> str:
    """The first ``n`` hex digits of a fingerprint, for messages and folder names."""
    return (fingerprint or "none")[:n]


def _update_tensor(h, name: str, t: torch.Tensor) -> None:
    """Feed ``name``, dtype, shape and the raw bytes of ``t`` into the hash ``h``."""
    t = t.detach()
    if t.is_sparse or t.is_quantized or t.device.type == "meta":
        raise FVSanityError(f"cannot fingerprint tensor {name!r} ({t.layout}, {t.device.type}): no dense data")
    h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
    if t.numel():
        flat = t.cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().data)


def tensor_digest(*tensors: torch.Tensor | None, named: Iterable[tuple[str, torch.Tensor]] = ()) -> str:
    """sha256 (hex) of tensors' dtypes, shapes and bytes (``None`` entries count as absent).

    Args:
        tensors: positional tensors, hashed in order (any dtype, device, layout: dense only).
        named: (name, tensor) pairs, hashed after the positional ones, in the order given.
    """
    h = hashlib.sha256()
    for i, t in enumerate(tensors):
        if t is None:
            h.update(f"{i}\0none\0".encode())
        else:
            _update_tensor(h, str(i), t)
    for name, t in named:
        _update_tensor(h, name, t)
    return h.hexdigest()


def model_fingerprint(model: nn.Module, preprocess: Any = None) -> str:
    """sha256 (64 hex digits) of a model's function: tensors, module types and preprocessing.

    Hashes, in a fixed order: the dotted name and class name of every module (so a swapped
    activation or an edit module changes it), then every parameter and buffer, persistent or not
    (name, dtype, shape, raw bytes; sorted by name), then ``preprocess.to_json()``. Two loads of
    the same weights give the same fingerprint; changing any element of any weight changes it.
    Device and ``requires_grad`` do not enter. Cost: one pass over the weights (about 1 ms per
    MB on one CPU core).

    Args:
        model: any ``nn.Module`` (eval or train mode alike).
        preprocess: an object with ``to_json()`` (a :class:`~fvsanity.models.Preprocess`), or None.
    """
    h = hashlib.sha256(_FINGERPRINT_FORMAT)
    for name, mod in model.named_modules(remove_duplicate=False):
        h.update(f"module\0{name}\0{type(mod).__qualname__}\n".encode())
    tensors: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tensors[f"param:{name}"] = p
    for name, b in model.named_buffers(remove_duplicate=False):
        if b is not None:
            tensors[f"buffer:{name}"] = b
    for name in sorted(tensors):
        _update_tensor(h, name, tensors[name])
    pre = preprocess.to_json() if preprocess is not None and hasattr(preprocess, "to_json") else preprocess
    h.update(b"preprocess\0" + json.dumps(pre, sort_keys=True, default=str).encode())
    return h.hexdigest()



def check_fv_model(res, lm, source: str) -> None:
    """Refuse saved FVs made for another model than ``lm`` (``--fv`` reuse).

    Compares the ``model_fingerprint`` recorded in ``res.settings`` with ``lm.fingerprint()``.

    Raises:
        FVMismatchError: the fingerprints differ (one line naming both models, their weights and
            fingerprints) or the FVs predate fingerprints (no ``model_fingerprint`` recorded).
    """
    s = res.settings or {}
    theirs = s.get("model_fingerprint")
    if not theirs:
        raise FVMismatchError(
            f"--fv {source!r} predates model fingerprints (its fv.json names model {s.get('model')!r} but not the "
            "weights it was made for); re-render it with `fvsanity visualize` for this model, or copy its PNGs "
            "into a folder of their own and pass that (taken as your own images, unchecked)"
        )
    ours = lm.fingerprint()
    if theirs == ours:
        return
    their_w, our_w = s.get("weights_source"), lm.weights_source
    if s.get("model") != lm.name:
        what = f"model {s.get('model')!r}, this is {lm.name!r}"
    elif their_w is not None and their_w != our_w:
        what = f"weights {their_w}, these are {our_w}"
    else:
        what = f"same name and weights source ({our_w}) but other weights or preprocessing"
    raise FVMismatchError(
        f"--fv {source!r} was made for model fingerprint {short(theirs)}... ({what}); this model is "
        f"{short(ours)}...; re-render the FVs or pass the matching --model/--weights"
    )


def architecture_signature(lm) -> str:
    """sha256 (16 hex) of what a calibration depends on besides the weights: the input size,
    the preprocessing, the output layer and every block layer's name, layout kind and width.
    A model and a manipulated copy of it (same layer names, other weights) share it; another
    architecture, or another head, does not."""
    import hashlib
    import json

    blocks = []
    for name in list(lm.block_layers) + [lm.output_layer]:
        lay = lm.layer_info(name).layout
        blocks.append([name, lay.kind, int(lay.channels)])
    pre = lm.preprocess
    doc = {"input_size": list(lm.input_size), "mean": [float(x) for x in getattr(pre, "mean", ())],
           "std": [float(x) for x in getattr(pre, "std", ())], "output_layer": lm.output_layer, "blocks": blocks}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]
