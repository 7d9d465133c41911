"""The model registry (:data:`MODELS`, :func:`register_model`, :func:`list_models`) and the
loaders of other kinds of spec (:data:`LOADERS`, :func:`register_loader`)."""

from __future__ import annotations

import difflib
from collections.abc import Callable

from ..errors import FVSanityError
from ..registry import Registry
from .loaded import LoadedModel

__all__ = ["MODELS", "LOADERS", "register_model", "register_loader", "list_models", "unknown_model_message"]


#: model name -> ``fn(pretrained) -> LoadedModel`` (the package's one registry convention)
MODELS: Registry = Registry("model")


def register_model(name: str):
    """Decorator: ``fn(pretrained: bool) -> LoadedModel`` under ``name``.

    ``fn`` builds the model and, when ``pretrained``, loads its own weights; a ``--weights FILE``
    is applied afterwards by :func:`load_model` (strictly, for every model alike).

    Raises:
        FVSanityError: ``name`` is already registered (a second registration would silently
            change what an existing name loads).
    """
    if name in MODELS:
        raise FVSanityError(f"model {name!r} is already registered; pick another name (registered: {', '.join(sorted(MODELS))})")

    def deco(fn):
        MODELS.register(name, fn)
        return fn

    return deco


#: Other kinds of model spec (e.g. the ``model/`` folder ``fvsanity fool`` writes), by loader
#: name: ``(can_load(spec) -> bool, load(spec, *, weights, device) -> LoadedModel)``. The packages
#: that own such specs register here, so this module never imports them.
LOADERS = Registry("model loader")


def register_loader(name: str, can_load: Callable[[str], bool], load: Callable[..., LoadedModel]) -> None:
    """Teach :func:`load_model` another kind of spec (a spec that is not a registered name).

    Args:
        name: the loader's name (e.g. ``"manipulated"``).
        can_load: ``can_load(spec: str) -> bool``: whether ``spec`` is this loader's (cheap; e.g.
            a folder holding ``manipulated.json``).
        load: ``load(spec, *, weights, device) -> LoadedModel``; ``weights`` is the ``--weights``
            file or None (refuse it with an :class:`~fvsanity.errors.FVSanityError` if the spec
            carries its own weights).

    Raises:
        RegistryError: ``name`` is already registered.
    """
    LOADERS.register(name, (can_load, load))


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a glob ``pattern`` (torchvision/timm names load too)."""
    import fnmatch

    return sorted(n for n in MODELS if fnmatch.fnmatch(n, pattern))


def unknown_model_message(name: str, choices: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, choices, n=5, cutoff=0.5)
    hint = f"; closest: {', '.join(prefix + c for c in close)}" if close else ""
    return (
        f"unknown model {prefix}{name!r}{hint}; registered: {', '.join(list_models())}, "
        "any torchvision name, or timm:NAME"
    )
