"""fvsanity: sanity checks for feature visualizations (Geirhos et al. 2023, arXiv 2306.04719)."""

from ._version import __version__
from .errors import FVSanityError, MissingWeightsError, UnitError, UnknownModelError  # noqa: E402
from .models import LoadedModel, list_models, load_model, register_model  # noqa: E402
from .units import Unit, parse_unit, parse_units  # noqa: E402

# registers the loader of manipulated-model folders (``load_model("runs/fool/model")``) with the
# model registry; ``fvsanity.models`` itself never imports ``fvsanity.fool``
from . import fool  # noqa: E402, F401  isort: skip

__all__ = [
    "FVSanityError",
    "__version__",
    "LoadedModel",
    "MissingWeightsError",
    "Unit",
    "UnitError",
    "UnknownModelError",
    "list_models",
    "load_model",
    "parse_unit",
    "parse_units",
    "register_model",
]
