"""Optimizers for FV rendering, registered by name in :data:`OPTIMIZERS`.

One convention::

    factory(params, lr, **options) -> torch.optim.Optimizer

``params`` is the parametrization's list of leaf tensors [B, ...] (B = batch elements) and ``lr``
the learning rate. The batched renderer optimizes many units at once and promises the same FVs
as separate runs, so an optimizer must act elementwise (Adam, SGD with momentum, AdamW, NAdam
do; L-BFGS and anything with a global norm, such as gradient clipping over all parameters, do
not). ``adam`` is the default (lucent's). Add one with ``@OPTIMIZERS.register("name")``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import FVSanityError
from ..registry import Registry, resolve_with_options

__all__ = ["OPTIMIZERS", "check_options", "make_optimizer"]

OPTIMIZERS = Registry("optimizer")
"""name -> ``factory(params, lr, **options) -> torch.optim.Optimizer``."""


@OPTIMIZERS.register("adam")
def adam(params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
    """Adam (lucent's and the paper's choice; the default)."""
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps)


@OPTIMIZERS.register("adamw")
def adamw(params, lr: float, weight_decay: float = 0.01, betas: tuple[float, float] = (0.9, 0.999)):
    """AdamW: Adam with decoupled weight decay (pulls the parametrization towards 0 = grey)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas))


@OPTIMIZERS.register("nadam")
def nadam(params, lr: float, betas: tuple[float, float] = (0.9, 0.999)):
    """NAdam (Nesterov Adam; what Fel et al. use for MACO, there with lr 1.0)."""
    return torch.optim.NAdam(params, lr=lr, betas=tuple(betas))


@OPTIMIZERS.register("sgd")
def sgd(params, lr: float, momentum: float = 0.9, nesterov: bool = False):
    """SGD with (heavy-ball or Nesterov) momentum."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=bool(nesterov))


def _describe(opt) -> str:
    return repr(opt) if isinstance(opt, str) else getattr(opt, "__name__", type(opt).__name__)


def check_options(optimizer, options=None, *, lr: float | None = None) -> Callable:
    """The factory of ``optimizer`` (a name in :data:`OPTIMIZERS` or a factory), after checking
    that it takes every key of ``options`` with a value of the type it declares
    (:func:`fvsanity.registry.resolve_with_options`). With ``lr``, a built-in factory (one of this
    module's) is also tried once on a one-element dummy parameter, so that a value torch itself
    refuses (its ``ValueError``, e.g. SGD's ``momentum=-5``) is refused here, before any work; a
    plug-in's factory is never called here (it may count or log its calls), its refusal is one
    line when :func:`make_optimizer` builds it.

    Raises:
        FVSanityError: unknown name, not callable, an option it does not take or of the wrong
            type, or (with ``lr``) options it refuses (one line).
    """
    factory = resolve_with_options(OPTIMIZERS, optimizer, options, fixed=("params", "lr"), arg="optimizer",
                                   callable_word="factory")
    if lr is not None and getattr(factory, "__module__", None) == __name__:
        _build(factory, optimizer, [torch.zeros(1, requires_grad=True)], lr, options)
    return factory


def _build(factory, optimizer, params, lr, options) -> torch.optim.Optimizer:
    """``factory(params, lr, **options)``; a ValueError it raises (torch's refusal of a value) is
    one line naming the options."""
    try:
        return factory(params, lr, **dict(options or {}))
    except ValueError as e:
        opts = ", ".join(f"{k}={v!r}" for k, v in sorted(dict(options or {}).items())) or "no options"
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FVSanityError(f"optimizer {_describe(optimizer)} refuses lr={lr!r}, {opts}: {why}") from None


def make_optimizer(optimizer, params, lr: float, options=None) -> torch.optim.Optimizer:
    """An optimizer from a registered name or a factory.

    Args:
        optimizer: a name in :data:`OPTIMIZERS` or ``factory(params, lr, **options)``.
        params: list of leaf tensors; lr: learning rate; options: factory keyword options.

    Raises:
        FVSanityError: unknown name, an option the factory does not take, or a factory that
            does not return a ``torch.optim.Optimizer``.
    """
    factory = check_options(optimizer, options)
    opt = _build(factory, optimizer, params, lr, options)
    if not isinstance(opt, torch.optim.Optimizer):
        raise FVSanityError(f"optimizer {_describe(optimizer)} must return a torch.optim.Optimizer, "
                            f"got {type(opt).__name__}")
    return opt
