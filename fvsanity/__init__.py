"""fvsanity: sanity checks for feature visualizations (Geirhos et al. 2023, arXiv 2306.04719)."""

__version__ = "0.1.0"

from .errors import FVSanityError, MissingWeightsError, UnitError, UnknownModelError  # noqa: E402
from .models import LoadedModel, list_models, load_model, register_model  # noqa: E402
from .units import Unit, parse_unit, parse_units  # noqa: E402

__all__ = [
    "FVSanityError",
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
