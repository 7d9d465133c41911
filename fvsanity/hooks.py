"""Forward hooks as context managers that always remove themselves (even when a call raises)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .errors import UnitError
from .names import resolve_layer


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (``named_modules()`` dotted name); clear error if unknown."""
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    return modules[resolve_layer(model, name)]


@contextlib.contextmanager
def hooked(
    model: nn.Module,
    hooks: Mapping[str | nn.Module, Callable] | Iterable[tuple[str | nn.Module, Callable]],
    pre: bool = False,
) -> Iterator[None]:
    """Register hooks for the duration of the block; every one is removed in ``finally``.

    The one place in fvsanity that calls ``register_forward_hook`` /
    ``register_forward_pre_hook``: everything else that needs a hook goes through here.

    Args:
        model: the network the names refer to.
        hooks: ``{target: fn}`` or ``[(target, fn), ...]`` (pairs when one module takes several
            hooks); a target is a ``named_modules()`` name (resolved by :func:`get_module`, with
            its clear error) or a module. Registered in the given order, so they run in it.
        pre: forward pre-hooks ``fn(module, inputs)`` instead of forward hooks
            ``fn(module, inputs, output)``; a hook's return value replaces inputs / output as
            in PyTorch.
    """
    pairs = list(hooks.items()) if isinstance(hooks, Mapping) else list(hooks)
    handles = []
    try:
        for target, fn in pairs:
            mod = target if isinstance(target, nn.Module) else get_module(model, target)
            handles.append(mod.register_forward_pre_hook(fn) if pre else mod.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture(
    model: nn.Module, layers: Sequence[str], detach: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of ``layers`` on every forward inside the block.

    Yields a dict ``{layer: output}`` refreshed on each forward (last call wins). Outputs stay in
    the autograd graph unless ``detach``. Hooks are removed in ``finally``.
    """
    store: dict[str, torch.Tensor] = {}

    def make(name):
        def hook(_m, _inp, out):
            if isinstance(out, (tuple, list)):
                out = out[0]
            store[name] = out.detach() if detach else out

        return hook

    with hooked(model, [(name, make(name)) for name in layers]):
        yield store


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
    def stop(_m, _i, _o):
        if need.issubset(store.keys()):
            raise StopForward

    with capture(model, layers, detach=detach) as store, hooked(model, [(name, stop) for name in need]):
        yield store


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


__all__ = ["hooked", "capture", "capture_until", "run_partial", "count_hooks", "get_module", "StopForward", "UnitError"]
