"""Feature-visualization generator: lucent-quality FVs for many units x seeds in one batch.

``render(lm, ["layer3.2:5", "linear:3"], seeds=2, steps=512)`` -> :class:`FVResult`.
"""

from . import objectives, param, transforms
from .objectives import Objective, channel, direction, neuron, unit_activation
from .render import FVResult, evaluate, render, settings_hash
from .saved import load_fvs

__all__ = [
    "FVResult",
    "Objective",
    "channel",
    "direction",
    "evaluate",
    "load_fvs",
    "neuron",
    "objectives",
    "param",
    "render",
    "settings_hash",
    "transforms",
    "unit_activation",
]
