"""Layer names: ``model.named_modules()`` dotted names, with lucent's underscore names accepted.

Kept apart from :mod:`fvsanity.units` so the low-level :mod:`fvsanity.hooks` can resolve names
without importing units (which imports layouts, which hooks into models).
"""

from __future__ import annotations

import difflib

from torch import nn

from .errors import UnitError

__all__ = ["layer_names", "resolve_layer"]


def layer_names(model: nn.Module) -> list[str]:
    """Every non-root ``named_modules()`` name of ``model``, in module order."""
    return [n for n, _ in model.named_modules() if n]


def resolve_layer(model: nn.Module, name: str) -> str:
    """Canonical dotted name for ``name`` (accepts lucent's underscores); UnitError if unknown."""
    names = layer_names(model)
    if name in names:
        return name
    alt = name.replace("_", ".")
    if alt in names:
        return alt
    # lucent names keep underscores inside module names (conv2d0_pre_relu_conv): try all splits
    for cand in names:
        if cand.replace(".", "_") == name:
            return cand
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
    hint = ", ".join(close) if close else ", ".join(names[:8]) + ", ..."
    raise UnitError(f"unknown layer {name!r}; closest valid layers: {hint} (see `fvsanity layers MODEL`)")
