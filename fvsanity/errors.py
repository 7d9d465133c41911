"""Exceptions with one-line messages meant for users (the CLI prints them and exits 2), and
:func:`check_number`, the range check that settings dataclasses and commands share."""

from __future__ import annotations

import math
import numbers


class FVSanityError(Exception):
    """Base class: a user-facing error whose message is one line naming the bad value."""


class UnknownModelError(FVSanityError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class MissingWeightsError(FVSanityError, FileNotFoundError):
    pass


class UnitError(FVSanityError, ValueError):
    pass


class DataError(FVSanityError, ValueError):
    pass


class EnvError(FVSanityError, ValueError):
    """An ``FVSANITY_*`` environment variable whose value is not one of its valid values."""


class SettingError(FVSanityError, ValueError):
    """A setting outside its valid values: ``"<name> <problem>"``, e.g. ``lr must be > 0, got -1.0``.

    ``name`` is the setting as its owner calls it (a dataclass field); a command that fills the
    settings from flags reports it under the flag's name with :meth:`renamed`.
    """

    def __init__(self, name: str, problem: str):
        self.name, self.problem = name, problem
        super().__init__(f"{name} {problem}")

    def renamed(self, name: str) -> SettingError:
        """The same error under another name (``lr`` -> ``--lr``)."""
        return SettingError(name, self.problem)


def show_value(v) -> str:
    """A value for a one-line message: numbers as written, long integers abbreviated, strings quoted."""
    if isinstance(v, bool) or v is None:
        return repr(v)
    if isinstance(v, numbers.Integral):
        s = str(int(v))
        return s if len(s) <= 30 else f"{s[:10]}... ({len(s.lstrip('-'))} digits)"
    if isinstance(v, numbers.Real):
        return repr(float(v))
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def check_number(name: str, value, *, integer: bool = False, ge=None, gt=None, le=None, lt=None):
    """``value`` if it is a number (an integer with ``integer``; else finite) within the bounds.

    Raises:
        SettingError: ``"<name> must be <what>, got <value>"``: the valid range (``in 1..4096``,
            ``> 0``, ``>= 0 and < 1``) and, for a value of the wrong kind, the kind.
    """
    parts = []
    if integer and ge is not None and le is not None:
        parts.append(f"in {ge}..{le}")
    else:
        parts += [f"{op} {b}" for op, b in ((">=", ge), (">", gt), ("<=", le), ("<", lt)) if b is not None]
    bounds = " and ".join(parts)
    kind = "an integer" if integer else "a finite number"
    ok_kind = not isinstance(value, bool) and isinstance(value, numbers.Integral if integer else numbers.Real)
    if not ok_kind or (not integer and not math.isfinite(value)):
        raise SettingError(name, f"must be {kind}{' ' + bounds if bounds else ''}, got {show_value(value)}")
    if ((ge is not None and not value >= ge) or (gt is not None and not value > gt)
            or (le is not None and not value <= le) or (lt is not None and not value < lt)):
        raise SettingError(name, f"must be {bounds}, got {show_value(value)}")
    return value
