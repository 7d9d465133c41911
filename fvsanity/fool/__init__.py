"""Fooling: manipulated models whose feature visualizations show arbitrary targets while their
natural-image predictions stay exactly the same (Geirhos et al. 2023, sections 3.1-3.2).

    from fvsanity import load_model
    from fvsanity.fool import (train_detector, calibrate_threshold, make_routes,
                               build_fooling_circuit, build_silent_units, evaluate_predictions)

    lm = load_model("cifar10-resnet20")
    det, _ = train_detector(fv_images, natural_train)              # FVs vs natural images
    thr = calibrate_threshold(detector_logits(det, natural_calib))
    routes = make_routes(lm, "all", shift=3)                        # class i shows class i+3
    fooled = build_fooling_circuit(lm, det, routes, threshold=thr)  # a LoadedModel, same names
    evaluate_predictions(lm, fooled, natural_eval, labels)          # identical top-1 ...
    save_manipulated(fooled, "out/"); load_manipulated("out/")

Building blocks: :class:`FVDetector` (detector.py), the gated unit (circuit.py), silent channels
(silent.py: ``mode="filter"``, the paper's orthogonal filters, or ``mode="trigger"``, a channel
that fires once the pooled unit or its target leaves its natural range and is then driven by the
target), picture templates and their FV trajectories for the detector (circuit.py:
``picture_templates``, ``template_model``), the wrapper that keeps layer names and its save/load
(model.py; a saved ``model/`` folder is also a ``load_model`` spec), metrics (SSIM, pixel
correlation, an LPIPS-form distance on a local backbone; metrics.py), the evaluation
(evaluate.py) and the whole experiment as ``fvsanity fool`` runs it (pipeline.py:
:func:`prepare_detector`, :func:`run_fool` and its steps, with the closed-loop check and its
control).

Methods are plug-ins (manipulation.py): one :class:`Manipulation` subclass per method with a
frozen settings dataclass, registered with :func:`register_manipulation`; ``run_fool`` and
``fvsanity fool --method`` (choices and flags) take them from the registry. The built-ins
(methods.py): :class:`FoolingCircuit` (``circuit``) and :class:`SilentUnits` (``silent``).
Importing this package also registers the loader that lets ``load_model("out/model")`` read a
saved manipulated model (``fvsanity`` imports it).
"""

import sys as _sys
import types as _types

from .api import fool_settings, manipulate
from .circuit import GatedEdit, build_fooling_circuit, gated_value
from .detector import (
    DetectorReport,
    DetectorTraining,
    FVDetector,
    calibrate_threshold,
    detector_logits,
    evaluate_detector,
    load_detector,
    save_detector,
    train_detector,
)
from .effect import EffectReport, UnitEffect, measure_effect
from .gate import fooling_gate
from .manipulation import (
    MANIPULATIONS,
    Manipulation,
    MethodSettings,
    get_manipulation,
    list_manipulations,
    register_manipulation,
    setting,
    unregister_manipulation,
)
from .methods import (  # registers circuit, silent
    CircuitSettings,
    FoolingCircuit,
    SilentSettings,
    SilentUnits,
)
from .metrics import pixel_correlation, ssim
from .model import ManipulatedModel, load_manipulated, register_edit, save_manipulated, wrap_loaded
from .pipeline import (
    DetectorBundle,
    FoolEvaluation,
    FoolFVs,
    FoolResult,
    FoolSettings,
    build_manipulated,
    closed_loop_check,
    evaluate_fool,
    pick_eval_routes,
    prepare_detector,
    prepare_manipulation,
    render_fool_fvs,
    run_fool,
    save_fool,
    split_indices,
)
from .routes import Route, load_picture, make_routes, parse_unit_range
from .silent import SilentEdit, build_silent_units, silent_zero_fraction
from .slingshot import (  # registers slingshot (weight-only; saves a plain state dict)
    Slingshot,
    SlingshotSettings,
)

__all__ = [
    "fool_settings",
    "manipulate",
    "MANIPULATIONS",
    "EffectReport",
    "UnitEffect",
    "measure_effect",
    "CircuitSettings",
    "DetectorBundle",
    "DetectorReport",
    "FoolEvaluation",
    "FoolFVs",
    "FoolResult",
    "FoolSettings",
    "FoolingCircuit",
    "Manipulation",
    "MethodSettings",
    "SilentSettings",
    "SilentUnits",
    "Slingshot",
    "SlingshotSettings",
    "build_manipulated",
    "closed_loop_check",
    "evaluate_fool",
    "get_manipulation",
    "list_manipulations",
    "pick_eval_routes",
    "prepare_detector",
    "prepare_manipulation",
    "register_edit",
    "register_manipulation",
    "render_fool_fvs",
    "run_fool",
    "save_fool",
    "setting",
    "split_indices",
    "unregister_manipulation",
    "wrap_loaded",
    "DetectorTraining",
    "FVDetector",
    "GatedEdit",
    "ManipulatedModel",
    "Route",
    "SilentEdit",
    "build_fooling_circuit",
    "build_silent_units",
    "calibrate_threshold",
    "detector_logits",
    "evaluate_detector",
    "fooling_gate",
    "gated_value",
    "load_detector",
    "load_manipulated",
    "load_picture",
    "make_routes",
    "parse_unit_range",
    "pixel_correlation",
    "save_detector",
    "save_manipulated",
    "silent_zero_fraction",
    "ssim",
    "train_detector",
]


# ``fvsanity.fool(...)``: the package is callable, as the one-call facade of the command
# (``fvsanity.fool.manipulate``); ``fvsanity.fool.pipeline`` and the rest stay importable as ever
class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kwargs):
        """:func:`fvsanity.fool.api.manipulate`."""
        from .api import manipulate

        return manipulate(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
