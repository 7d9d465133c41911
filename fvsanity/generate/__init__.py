"""Feature-visualization generator: lucent-quality FVs for many units x seeds in one batch.

``render(lm, ["layer3.2:5", "linear:3"], seeds=2, steps=512)`` -> :class:`FVResult`.

Plug-in seams, each a :class:`~fvsanity.registry.Registry`: parametrizations
(:data:`PARAMS`: fft, pixel, maco), objectives (:data:`OBJECTIVES`; or any lucent-style
:class:`Objective` passed as ``render(objective=...)``), optimizers (:data:`OPTIMIZERS`).
"""

from . import objectives, optim, param, transforms
from .objectives import OBJECTIVES, Objective, channel, direction, neuron, unit_activation
from .optim import OPTIMIZERS
from .param import PARAMS
from .render import (
    FVResult,
    RenderSettings,
    cpu_bf16_fast,
    dtype_settings,
    evaluate,
    render,
    resolve_amp,
    score_images,
    settings_hash,
)
from .saved import load_fvs

__all__ = [
    "FVResult",
    "OBJECTIVES",
    "OPTIMIZERS",
    "Objective",
    "PARAMS",
    "RenderSettings",
    "channel",
    "cpu_bf16_fast",
    "direction",
    "dtype_settings",
    "evaluate",
    "load_fvs",
    "neuron",
    "objectives",
    "optim",
    "param",
    "render",
    "resolve_amp",
    "score_images",
    "settings_hash",
    "transforms",
    "unit_activation",
]
