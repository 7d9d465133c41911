"""fvsanity: sanity checks for feature visualizations (Geirhos et al. 2023, arXiv 2306.04719).

The short way in (:mod:`fvsanity.facade`)::

    import fvsanity
    lm = fvsanity.load_model("cifar10-resnet20")           # or fvsanity.wrap(your_module, ...)
    fvs = fvsanity.visualize(lm, ["layer3.2:5", "linear:3"])
    report = fvsanity.check(lm, fvs=fvs, images="path/to/images")
    report.trusted(), report.flagged(), report.save("runs/check")

``fvsanity.audit(...)`` writes a full report; ``fvsanity.fool(model, units, target=...)``
builds a model whose FVs lie (the ``fvsanity.fool`` package is callable:
:func:`fvsanity.fool.manipulate`). Each keyword setting is a field of the job's settings dataclass, by plain name.
"""

from ._version import __version__
from .errors import FVSanityError, MissingWeightsError, UnitError, UnknownModelError  # noqa: E402
from .models import LoadedModel, list_models, load_model, register_model, wrap  # noqa: E402
from .units import Unit, parse_unit, parse_units  # noqa: E402

# registers the loader of manipulated-model folders (``load_model("runs/fool/model")``) with the
# model registry; ``fvsanity.models`` itself never imports ``fvsanity.fool``
from . import fool  # noqa: E402, F401  isort: skip
from .auditing import AuditResult, AuditSettings  # noqa: E402  isort: skip
from .checking import CheckReport, CheckSettings, FVSettings, check  # noqa: E402  isort: skip
from .facade import audit, visualize  # noqa: E402  isort: skip
from .generate import FVResult, RenderSettings  # noqa: E402  isort: skip

__all__ = [
    "AuditResult",
    "AuditSettings",
    "CheckReport",
    "CheckSettings",
    "FVResult",
    "FVSanityError",
    "FVSettings",
    "LoadedModel",
    "MissingWeightsError",
    "RenderSettings",
    "Unit",
    "UnitError",
    "UnknownModelError",
    "__version__",
    "audit",
    "check",
    "list_models",
    "load_model",
    "parse_unit",
    "parse_units",
    "register_model",
    "visualize",
    "wrap",
]
