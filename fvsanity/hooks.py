"""Forward hooks as context managers that always remove themselves (even when a call raises)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .errors import UnitError


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (``named_modules()`` dotted name); clear error if unknown."""
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    from .units import resolve_layer

    return modules[resolve_layer(model, name)]


@contextlib.contextmanager
def capture(
    model: nn.Module, layers: Sequence[str], detach: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of ``layers`` on every forward inside the block.

    Yields a dict ``{layer: output}`` refreshed on each forward (last call wins). Outputs stay in
    the autograd graph unless ``detach``. Hooks are removed in ``finally``.
    """
    store: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in layers:
            mod = get_module(model, name)

            def hook(_m, _inp, out, _name=name):
                if isinstance(out, (tuple, list)):
                    out = out[0]
                store[_name] = out.detach() if detach else out

            handles.append(mod.register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()


class StopForward(Exception):
    """Raised by a hook to end a forward pass early once every needed layer has run."""


@contextlib.contextmanager
def capture_until(
    model: nn.Module, layers: Sequence[str], detach: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Like :func:`capture`, but the forward stops (``StopForward``) after the last of ``layers``.

    Use ``run_partial(model, x, store)`` inside the block: it swallows the ``StopForward``.
    Saves the cost of the layers after the deepest one needed.
    """
    need = set(layers)
    with capture(model, layers, detach=detach) as store:
        handles = []
        try:
            for name in need:

                def stop(_m, _i, _o):
                    if need.issubset(store.keys()):
                        raise StopForward

                handles.append(get_module(model, name).register_forward_hook(stop))
            yield store
        finally:
            for h in handles:
                h.remove()


def run_partial(model: nn.Module, x: torch.Tensor, store: dict) -> dict:
    """Run ``model(x)`` inside :func:`capture_until`, stopping early; returns ``store``."""
    store.clear()
    try:
        model(x)
    except StopForward:
        pass
    return store


def count_hooks(model: nn.Module) -> int:
    """Number of forward/backward hooks still registered anywhere in ``model`` (for tests)."""
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        n += len(getattr(m, "_backward_pre_hooks", {}))
    return n


__all__ = ["capture", "capture_until", "run_partial", "count_hooks", "get_module", "StopForward", "UnitError"]
