"""Manipulation methods as plug-ins: one class per method, in one registry.

A method is a subclass of :class:`Manipulation` with a ``name``, a frozen settings dataclass
(``Settings``, fields declared with :func:`setting`) and the hooks the fooling run
(:func:`fvsanity.fool.run_fool`) calls in order:

``prepare``
    what ``build`` needs that is trained or measured first (the fooling circuit: its FV
    detector); default nothing.
``build``
    the manipulated :class:`~fvsanity.models.LoadedModel` (required).
``describe``, ``natural_diagnostics``, ``fv_diagnostics``, ``summary``, ``figure_note``,
``ineffective_hint``
    what ``fool.json`` records besides the method-independent numbers: a description of what
    ``prepare`` made, numbers on natural images, numbers on the manipulated model's FVs, the
    summary fields, one line under the figure, and (when the manipulated FVs did not reach their
    targets) which setting to raise; each defaults to nothing (the hint to a generic line).
``save`` / ``load``
    the ``model/`` folder (default: :func:`~fvsanity.fool.save_manipulated` /
    :func:`~fvsanity.fool.load_manipulated`, which rebuild any model assembled from registered
    edits; ``load_model("out/model")`` reads it too).

Registering a method (``@register_manipulation``) adds it to ``fvsanity fool --method``; its
settings dataclass generates its flags (field ``det_steps`` -> ``--det-steps``; the field's
``help``, bounds and choices come from :func:`setting`). A settings field that
:class:`~fvsanity.fool.FoolSettings` also has (the built-in methods' knobs, kept flat there for
configs and ``fool.json``) is read from it; other fields from ``FoolSettings.method_options``.

    @register_manipulation
    class Identity(Manipulation):
        name = "identity"
        help = "changes nothing (a control)"

        def build(self, lm, routes, train_images, settings, *, prepared=None):
            return wrap_loaded(lm, ManipulatedModel(lm.model, lm.preprocess), self.name)

The registry is :data:`MANIPULATIONS`, a :class:`fvsanity.registry.Registry` (refuses a taken
name; an unknown one is a one-line error naming the choices).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import FVSanityError
from ..registry import Registry

__all__ = [
    "MANIPULATIONS",
    "Manipulation",
    "MethodSettings",
    "NoSettings",
    "check_settings",
    "get_manipulation",
    "list_manipulations",
    "register_manipulation",
    "setting",
    "unregister_manipulation",
]


def setting(default: Any, help: str = "", *, min: float | None = None, gt: float | None = None,  # noqa: A002
            lt: float | None = None, choices: tuple | None = None, type: type | None = None,  # noqa: A002
            flag: bool = True):
    """A settings-dataclass field with what its CLI flag and its check need.

    Args:
        default: the default value (tuples of ints become comma-separated flags).
        help: the flag's help text (``[%(default)s]`` is appended).
        min, gt, lt: bounds (``>= min``, ``> gt``, ``< lt``) checked by :func:`check_settings`.
        choices: the valid values.
        type: the value's type when ``default`` is None (e.g. ``int`` for an optional size).
        flag: False: no CLI flag for this field (API only).
    """
    meta = {"help": help, "min": min, "gt": gt, "lt": lt, "choices": choices, "type": type, "flag": flag}
    return dataclasses.field(default=default, metadata=meta)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_settings(settings: Any) -> None:
    """Check every field of a settings dataclass against its :func:`setting` bounds and choices,
    then the dataclass's own ``check()`` (cross-field rules), if it has one.

    Raises:
        FVSanityError: one line naming the flag, the bound and the value
            (``--det-steps must be >= 1, got -1``).
    """
    for f in dataclasses.fields(settings):
        v, m = getattr(settings, f.name), f.metadata
        if v is None:
            continue
        flag = _flag(f.name)
        if isinstance(v, float) and not math.isfinite(v):
            bounds = " and ".join(f"{w} {m[k]}" for k, w in (("min", ">="), ("gt", ">"), ("lt", "<")) if m.get(k) is not None)
            raise FVSanityError(f"{flag} must be a finite number{' ' + bounds if bounds else ''}, got {v}")
        if m.get("choices") is not None and v not in m["choices"]:
            raise FVSanityError(f"{flag} {v!r} is not valid; valid: {', '.join(map(str, m['choices']))}")
        for key, ok, word in (("min", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                              ("lt", lambda a, b: a < b, "<")):
            bound = m.get(key)
            if bound is not None and not ok(v, bound):
                raise FVSanityError(f"{flag} must be {word} {bound}, got {v}")
    extra = getattr(settings, "check", None)
    if callable(extra):
        extra()


class MethodSettings:
    """Base of the methods' frozen settings dataclasses: checked when built (:func:`check_settings`)."""

    def __post_init__(self) -> None:
        check_settings(self)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class NoSettings(MethodSettings):
    """Settings of a method that has none."""


class Manipulation:
    """One way of manipulating a model (see the module doc). Stateless: every hook receives the
    method's ``settings`` (an instance of ``Settings``)."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    Settings: ClassVar[type] = NoSettings

    # ------------------------------------------------------------------ settings
    @classmethod
    def make_settings(cls, **values: Any) -> Any:
        """``Settings(**values)``, checked (:func:`check_settings`) even if ``Settings`` does not
        derive from :class:`MethodSettings` (which checks itself when built)."""
        obj = cls.Settings(**values)
        if not isinstance(obj, MethodSettings):
            check_settings(obj)
        return obj

    @classmethod
    def settings_from(cls, fool_settings: Any) -> Any:
        """This method's ``Settings`` from a :class:`~fvsanity.fool.FoolSettings`: fields it also
        has are read from it, the others from its ``method_options`` (or their defaults).

        Raises:
            FVSanityError: ``method_options`` names a field ``Settings`` lacks, or one that
                belongs to FoolSettings itself.
        """
        names = [f.name for f in dataclasses.fields(cls.Settings)]
        flat = {f.name for f in dataclasses.fields(fool_settings)}
        opts = dict(getattr(fool_settings, "method_options", None) or {})
        unknown = sorted(set(opts) - set(names))
        if unknown:
            raise FVSanityError(f"method {cls.name!r} has no setting {unknown[0]!r}; valid: {', '.join(names) or 'none'}")
        doubled = sorted(set(opts) & flat)
        if doubled:
            raise FVSanityError(f"method_options {doubled[0]!r} is a FoolSettings field; set it there")
        vals = {n: getattr(fool_settings, n) for n in names if n in flat}
        vals.update(opts)
        for f in dataclasses.fields(cls.Settings):  # JSON configs give lists where tuples are meant
            if isinstance(f.default, tuple) and isinstance(vals.get(f.name), list):
                vals[f.name] = tuple(vals[f.name])
        return cls.make_settings(**vals)

    # ------------------------------------------------------------------ hooks
    def prepare(self, lm, routes, train_images: torch.Tensor, eval_images: torch.Tensor, settings, *, fool,
                work_dir: Path, prepared: Any = None) -> Any:
        """What :meth:`build` needs that is trained or measured first; ``prepared`` is what the
        caller already made (reuse it). Default: ``prepared`` (nothing to do).

        Args:
            lm: the original model; routes: what the manipulated units show.
            train_images, eval_images: ``[N,3,H,W]`` natural images to build from / to measure on.
            settings: this method's settings; fool: the run's FoolSettings (seed, sizes, progress).
            work_dir: a cache folder for long steps.
        """
        return prepared

    def build(self, lm, routes, train_images: torch.Tensor, settings, *, prepared: Any = None):
        """The manipulated :class:`~fvsanity.models.LoadedModel` (same preprocess, layer names and
        classes as ``lm``; ``lm`` itself unchanged). ``train_images``: ``[N,3,H,W]`` natural
        images in [0,1] for any calibration."""
        raise NotImplementedError(f"manipulation {self.name!r} does not implement build")

    def describe(self, prepared: Any, settings) -> dict:
        """``fool.json`` entries describing what :meth:`prepare` made (e.g. the detector)."""
        return {}

    def natural_diagnostics(self, fooled, eval_images: torch.Tensor, train_images: torch.Tensor, settings) -> dict:
        """``fool.json`` entries measured on natural images (``[N,3,H,W]``) besides the predictions."""
        return {}

    def fv_diagnostics(self, fooled, fv_images: torch.Tensor, eval_images: torch.Tensor, settings) -> dict:
        """``fool.json`` entries measured on the manipulated model's FVs (``[U*S,3,H,W]``)."""
        return {}

    def summary(self, details: dict, prepared: Any, settings) -> dict:
        """Summary fields of this method (``details``: what ``fool.json`` records so far)."""
        return {}

    def figure_note(self, summary: dict) -> str:
        """One line under the figure (e.g. the detector's held-out accuracy); '' for none."""
        return ""

    def ineffective_hint(self, details: dict, prepared: Any, settings) -> str:
        """When the manipulated FVs did not reach their targets (``fool.json``'s ``effect``): the
        setting to raise, in a few words with the flag (``fvsanity fool`` prints it and exits 3)."""
        return "raise the method's strength settings, or --eval-steps"

    def save(self, fooled, folder: str | Path) -> Path:
        """Write the manipulated model to ``folder`` (``model/`` of the run)."""
        from . import model

        return model.save_manipulated(fooled, folder)

    @classmethod
    def load(cls, folder: str | Path, base=None, device=None):
        """Read back what :meth:`save` wrote."""
        from .model import load_manipulated

        return load_manipulated(folder, base=base, device=device)


#: The manipulation methods by name (``fvsanity fool --method`` choices), in registration order.
MANIPULATIONS = Registry("manipulation")


def register_manipulation(cls: type[Manipulation]) -> type[Manipulation]:
    """Class decorator: make ``cls`` a ``fvsanity fool --method`` choice under ``cls.name``.

    Raises:
        FVSanityError: not a Manipulation, no name, a taken name (:class:`~fvsanity.registry.RegistryError`),
            or ``Settings`` is not a dataclass.
    """
    if not isinstance(cls, type) or not issubclass(cls, Manipulation):
        raise FVSanityError(f"{cls!r} is not a Manipulation subclass")
    if not cls.name:
        raise FVSanityError(f"manipulation {cls.__name__} has no name")
    if not dataclasses.is_dataclass(cls.Settings):
        raise FVSanityError(f"manipulation {cls.name!r}: Settings must be a (frozen) dataclass")
    return MANIPULATIONS.register(cls.name, cls)


def unregister_manipulation(name: str) -> None:
    """Remove a method (tests, plug-ins reloaded); unknown names are ignored."""
    if name in MANIPULATIONS:
        MANIPULATIONS.unregister(name)


def list_manipulations() -> list[str]:
    """Registered method names in registration order (the built-ins first: circuit, silent)."""
    return list(MANIPULATIONS.names())


def get_manipulation(name: str) -> Manipulation:
    """The registered method ``name`` (an instance).

    Raises:
        RegistryError: unknown name (one line naming the registered ones and the closest).
    """
    return MANIPULATIONS.get(name)()
