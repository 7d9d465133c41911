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
from typing import Any, Iterator, TypeVar

from .errors import FVSanityError

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
        FVSanityError: unknown name, not callable, or an option it does not take (one line naming
            the options it has). A callable taking ``**kwargs`` accepts any option.
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
    return fn
