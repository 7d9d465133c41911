"""One registry convention for every plug-in family (parametrizations, objectives, optimizers,
models, metrics, manipulations).

A :class:`Registry` maps a short name to an object (a class or a function). Registering is a
decorator; looking up an unknown name is a one-line :class:`RegistryError` that names the valid
choices and the closest one; the CLI generates its ``choices`` from :meth:`Registry.names`::

    PARAMS = Registry("parametrization")

    @PARAMS.register("fft")
    def fft_image(size, seeds, device, **opts): ...

    PARAMS.get("fft")          # the function
    PARAMS.get("ftt")          # RegistryError: unknown parametrization 'ftt'; did you mean 'fft'? (choices: fft)
    "fft" in PARAMS, PARAMS.names()

Names are kept in registration order (the first one registered is usually the default).
Registering a name twice is refused, so a plug-in cannot silently replace a built-in; a test
that registers a toy entry removes it with :meth:`Registry.unregister` (or uses
:meth:`Registry.registered`, which undoes itself).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import math
import numbers
import os
import types
import typing
from typing import Any, Iterator, TypeVar

from .errors import FVSanityError, show_value

__all__ = ["Registry", "RegistryError", "resolve_with_options"]

T = TypeVar("T")


class RegistryError(FVSanityError, KeyError):
    """An unknown or duplicate registry name (one line, naming the valid choices)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class Registry:
    """Name -> object for one kind of plug-in.

    Args:
        kind: what the entries are, singular (``"parametrization"``, ``"optimizer"``); used in
            error messages.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Any] = {}

    # -- registering ---------------------------------------------------------------------------
    def register(self, name: str, obj: Any = None) -> Any:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator that does.

        Returns ``obj`` itself (so the decorated function or class is unchanged).

        Raises:
            RegistryError: ``name`` is not a non-empty string, or is already registered.
        """
        if not isinstance(name, str) or not name:
            raise RegistryError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries:
            raise RegistryError(f"{self.kind} {name!r} is already registered; pick another name "
                                f"(registered: {self._listing()})")

        def deco(o: T) -> T:
            if name in self._entries:  # registered between the call and the decoration
                raise RegistryError(f"{self.kind} {name!r} is already registered; pick another name "
                                    f"(registered: {self._listing()})")
            self._entries[name] = o
            return o

        return deco if obj is None else deco(obj)

    def unregister(self, name: str) -> Any:
        """Remove ``name`` and return what it held (for tests and plug-ins that clean up)."""
        self.get(name)  # one-line error when unknown
        return self._entries.pop(name)

    @contextlib.contextmanager
    def registered(self, name: str, obj: Any) -> Iterator[Any]:
        """``with reg.registered("toy", fn):`` registers ``fn`` and always removes it on exit."""
        self.register(name, obj)
        try:
            yield obj
        finally:
            self._entries.pop(name, None)

    # -- looking up ----------------------------------------------------------------------------
    def get(self, name: str) -> Any:
        """The object registered as ``name``.

        Raises:
            RegistryError: unknown name; the message names the valid choices and a close match.
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            pass
        hint = ""
        if isinstance(name, str):
            close = difflib.get_close_matches(name, list(self._entries), n=1, cutoff=0.6)
            if close:
                hint = f"; did you mean {close[0]!r}?"
        raise RegistryError(f"unknown {self.kind} {name!r}{hint} (choices: {self._listing()})")

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order (what the CLI offers as ``choices``)."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._entries))

    def __getitem__(self, name: str) -> Any:
        """``reg[name]``: as :meth:`get` (a :class:`RegistryError`, which is also a ``KeyError``)."""
        return self.get(name)

    def items(self) -> tuple[tuple[str, Any], ...]:
        """``(name, object)`` pairs in registration order."""
        return tuple(self._entries.items())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {self._listing()})"

    def _listing(self) -> str:
        return ", ".join(self._entries) or "none registered"


def _describe(entry) -> str:
    return repr(entry) if isinstance(entry, str) else getattr(entry, "__name__", type(entry).__name__)


def resolve_with_options(registry: Registry, entry, options=None, *, fixed: tuple[str, ...], arg: str,
                         callable_word: str, hidden: tuple[str, ...] = ()):
    """The callable ``entry`` names (a name in ``registry``, or the callable itself), after checking
    that it takes every key of ``options`` as a keyword.

    Args:
        fixed: the parameters the caller always passes (not options), e.g. ``("params", "lr")``.
        arg: the argument's name in messages (``"optimizer"``); callable_word: ``"factory"``.
        hidden: keywords accepted but not listed as options (e.g. ``decorrelate``).

    Raises:
        FVSanityError: unknown name, not callable, an option it does not take (one line naming
            the options it has), or an option value of another type than the parameter's
            annotation (or, unannotated, its default) says (:func:`check_option_types`). A
            callable taking ``**kwargs`` accepts any option.
    """
    fn = registry.get(entry) if isinstance(entry, str) else entry
    if not callable(fn):
        raise FVSanityError(f"{arg} must be a registered name ({', '.join(registry.names())}) or a "
                            f"{callable_word}, got {type(entry).__name__}")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn
    if options and not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        known = [n for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY or
                 (p.kind is p.POSITIONAL_OR_KEYWORD and n not in fixed)]
        bad = sorted(set(options) - set(known) - set(hidden))
        if bad:
            raise FVSanityError(f"{registry.kind} {_describe(entry)} has no option {bad[0]!r}; "
                                f"options: {', '.join(k for k in known if k not in hidden) or 'none'}")
    if options:
        check_option_types(fn, options, what=f"{registry.kind} {_describe(entry)}")
    return fn


def check_option_types(fn, options, *, what: str) -> None:
    """Refuse an option whose value does not fit the type ``fn`` declares for that parameter.

    The type is the parameter's annotation (``float``, ``int``, ``bool``, ``str``, a ``Path``,
    ``tuple[float, float]``, a class such as ``torch.Tensor``, or a union of them), else the type
    of its default (a float default takes any finite number). Options ``fn`` takes through
    ``**kwargs``, parameters without either, and annotations of other kinds are not checked.

    Raises:
        FVSanityError: ``"<what> option <key>=<value> must be <kind>"``, one line.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - an annotation that cannot be resolved: fall back to defaults
        hints = {}
    for key, value in dict(options).items():
        p = sig.parameters.get(key)
        if p is None:
            continue
        want = hints.get(key, p.annotation if not isinstance(p.annotation, str) else inspect.Parameter.empty)
        if want is inspect.Parameter.empty:
            if p.default is inspect.Parameter.empty or p.default is None:
                continue
            want = float if isinstance(p.default, float) else type(p.default)
        ok, kind = _fits(value, want)
        if not ok:
            raise FVSanityError(f"{what} option {key}={show_value(value)} must be {kind}")


_KINDS = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", type(None): "null"}


def _fits(v, want) -> tuple[bool, str]:
    """(whether ``v`` fits the type ``want``, what ``want`` is in words); unknown kinds fit."""
    origin, args = typing.get_origin(want), typing.get_args(want)
    if want is Any or want is object:
        return True, "anything"
    if origin in (typing.Union, types.UnionType):
        res = [_fits(v, a) for a in args]
        return any(ok for ok, _ in res), " or ".join(dict.fromkeys(k for _, k in res))
    if want is type(None):
        return v is None, _KINDS[want]
    if want is bool:
        return isinstance(v, bool), _KINDS[want]
    if want is int:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool), _KINDS[want]
    if want is float:
        ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
        return ok, _KINDS[want]
    if want is str:
        return isinstance(v, str), _KINDS[want]
    if isinstance(want, type) and issubclass(want, os.PathLike):
        return isinstance(v, (str, os.PathLike)), "a path"
    if origin in (tuple, list) or want in (tuple, list):
        if not isinstance(v, (tuple, list)):
            n = f"{len(args)} " if origin is tuple and args and args[-1] is not Ellipsis else ""
            return False, f"a list of {n}values"
        if origin is tuple and args and args[-1] is not Ellipsis:
            inner = [_fits(x, a) for x, a in zip(v, args)]
            kinds = " or ".join(dict.fromkeys(_fits(None, a)[1] for a in args))
            return len(v) == len(args) and all(ok for ok, _ in inner), f"a list of {len(args)} values, each {kinds}"
        if args:
            return all(_fits(x, args[0])[0] for x in v), f"a list of values, each {_fits(None, args[0])[1]}"
        return True, "a list"
    if isinstance(want, type) and origin is None:
        return isinstance(v, want), f"a {want.__name__}"
    return True, str(want)
