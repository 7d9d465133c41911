"""Settings declared once: a dataclass field carries its flag, help text and bounds.

A settings dataclass (``RenderSettings``, ``PathCheckSettings``, ``CheckSettings`` ...) marks
each field a user may set from the command line with :func:`setting`::

    @dataclass(frozen=True)
    class CircuitCheckSettings:
        enabled: bool = setting(False, flag="--circuits", help="also compare FV and natural circuits")
        images: int = setting(16, flag="--circuit-images", bounds=(1, None), help="images per group")

A field holding another settings dataclass is composed (its flags are generated too, minus the
``exclude``-ed ones). :func:`add_flags` generates every flag (type, choices, ``[default]`` in the
help) from the fields, :func:`from_args` builds the settings back from parsed arguments (bounds
checked and errors named by flag), and the parser remembers which field owns each flag
(:func:`flag_owners`), so a test can check every flag's default against its field and every
config key against exactly one field. Fields without ``help`` are library-only (no flag).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import MISSING
from typing import Any

__all__ = [
    "FlagSpec", "add_flags", "flat_json", "flag_owners", "flat_paths", "flag_specs", "from_args", "parse_options",
    "parser_settings", "replace_flat", "setting", "settings_to_json",
]

_META = "fvsanity"


#: what :func:`setting` takes besides the default and the help text
SETTING_OPTIONS = ("flag", "bounds", "choices", "type", "metavar", "default_text", "parse", "exclude", "from_flag")


def setting(
    default: Any = MISSING,
    *,
    help: str | None = None,  # noqa: A002 - argparse's name
    default_factory: Callable[[], Any] | Any = MISSING,
    **options,
) -> Any:
    """A dataclass field with its command-line flag.

    Args:
        default, default_factory: as :func:`dataclasses.field`.
        help: the flag's help text; None: no flag (a library-only field).
        options (each optional):
            ``flag``: the flag (default ``--`` + the field name with ``-``); a bool field whose
            flag starts with ``--no-`` is negated (the flag given: the field False).
            ``bounds``: (lowest, highest) for a number, either None for no bound; checked by
            :func:`from_args` with the flag's name in the error.
            ``choices``: the valid values, or a callable returning them (evaluated when the
            parser is built, e.g. a registry's names).
            ``type``: the argparse type (default: the default's type; ``str`` for a None default).
            ``metavar``; ``default_text``: what ``[...]`` in the help says instead of the
            default (e.g. "the model's input size" for None).
            ``parse``: ``"options"`` (repeatable ``KEY=VALUE`` -> dict, values read as JSON when
            they parse), ``"ints"`` (comma-separated integers -> tuple), ``"names"``
            (comma-separated names -> tuple, or None when empty).
            ``exclude``: for a composed settings field: the inner fields that get no flag here.
            ``from_flag``: the field is set from another flag of the command (e.g. ``"seed"``:
            the common ``--seed``), declared where that flag is.

    Raises:
        TypeError: an option not in :data:`SETTING_OPTIONS`.
    """
    bad = sorted(set(options) - set(SETTING_OPTIONS))
    if bad:
        raise TypeError(f"setting() got an unknown option {bad[0]!r}; valid: {', '.join(SETTING_OPTIONS)}")
    meta = {"help": help, **{k: options.get(k) for k in SETTING_OPTIONS}, "exclude": tuple(options.get("exclude", ()))}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={_META: meta})
    return dataclasses.field(default=default, metadata={_META: meta})


@dataclasses.dataclass(frozen=True)
class FlagSpec:
    """One generated flag: the field it sets (``path`` from the top settings class), and how."""

    path: tuple[str, ...]
    flag: str
    dest: str
    default: Any
    kwargs: dict
    negate: bool = False
    parse: str | None = None
    bounds: tuple | None = None
    owner: type | None = None


def _meta(f: dataclasses.Field) -> dict:
    return dict(f.metadata.get(_META) or {})


def _default(f: dataclasses.Field):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def flag_specs(cls, instance=None, prefix: tuple[str, ...] = (), exclude: Sequence[str] = ()) -> list[FlagSpec]:
    """Every flag the settings class ``cls`` (with defaults from ``instance``, default ``cls()``)
    generates, composed settings included."""
    inst = cls() if instance is None else instance
    specs = []
    for f in dataclasses.fields(cls):
        m = _meta(f)
        if f.name in exclude or m.get("from_flag"):
            continue
        value = getattr(inst, f.name)
        if dataclasses.is_dataclass(value) and not m.get("help"):  # a composed settings object
            inner_ex = tuple(m.get("exclude") or ()) + tuple(e.split(".", 1)[1] for e in exclude
                                                              if e.startswith(f.name + "."))
            specs += flag_specs(type(value), value, prefix + (f.name,), inner_ex)
            continue
        if not m.get("help"):
            continue
        specs.append(_spec(f, m, value, prefix + (f.name,), cls))
    return specs


def _spec(f: dataclasses.Field, m: dict, value, path, owner) -> FlagSpec:
    flag = m.get("flag") or "--" + f.name.replace("_", "-")
    dest = flag.lstrip("-").replace("-", "_")
    choices = m.get("choices")
    choices = list(choices()) if callable(choices) else (list(choices) if choices is not None else None)
    help_ = m["help"]
    shown = m.get("default_text")
    kw: dict = {"help": help_}
    negate = False
    parse = m.get("parse")
    default = value
    if isinstance(value, bool) or (value is None and m.get("type") is bool):
        if value is None:
            kw.update(action=argparse.BooleanOptionalAction, default=None)
        elif flag.startswith("--no-"):
            negate = True
            kw.update(action="store_true", default=not value)
        else:
            kw.update(action="store_true", default=value)
    elif parse == "options":
        kw.update(action="append", default=None, metavar=m.get("metavar") or "KEY=VALUE")
        default = dict(value or {})
    elif parse == "ints":
        kw.update(default=",".join(map(str, value or ())), metavar=m.get("metavar") or "N,N,...")
        shown = shown or "none"
    elif parse == "names":
        kw.update(default=",".join(value) if value else None, metavar=m.get("metavar") or "NAME,NAME,...")
    elif isinstance(value, (tuple, list)):
        kw.update(nargs="+", default=list(value), choices=choices)
        shown = shown or " ".join(map(str, value))
    else:
        typ = m.get("type") or (type(value) if value is not None and not isinstance(value, str) else str)
        kw.update(type=typ, default=value, choices=choices)
        if m.get("metavar"):
            kw["metavar"] = m["metavar"]
    if "action" not in kw or kw.get("action") == argparse.BooleanOptionalAction:
        text = shown if shown is not None else ("%(default)s" if kw.get("default") is not None else None)
        if text is not None:
            kw["help"] = f"{help_} [{text}]"
    return FlagSpec(path=path, flag=flag, dest=dest, default=default, kwargs=kw, negate=negate, parse=parse,
                    bounds=m.get("bounds"), owner=owner)


def add_flags(parser: argparse.ArgumentParser, cls, instance=None, exclude: Sequence[str] = (),
              group: str | None = None) -> list[FlagSpec]:
    """Add the flags of settings class ``cls`` to ``parser`` (in an argument group titled
    ``group`` if given) and remember their owners (:func:`flag_owners`)."""
    specs = flag_specs(cls, instance, exclude=exclude)
    target = parser.add_argument_group(group) if group else parser
    for s in specs:
        target.add_argument(s.flag, dest=s.dest, **s.kwargs)
    owners = getattr(parser, "_fvsanity_flags", {})
    owners.update({s.dest: s for s in specs})
    parser._fvsanity_flags = owners  # type: ignore[attr-defined]
    roots = getattr(parser, "_fvsanity_settings", [])
    parser._fvsanity_settings = roots + [(cls, instance, tuple(exclude))]  # type: ignore[attr-defined]
    return specs


def flag_owners(parser: argparse.ArgumentParser) -> dict[str, FlagSpec]:
    """{dest: FlagSpec} of the flags :func:`add_flags` generated on ``parser``."""
    return dict(getattr(parser, "_fvsanity_flags", {}))


def parser_settings(parser: argparse.ArgumentParser) -> list[tuple[type, Any, tuple[str, ...]]]:
    """[(settings class, default instance or None, excluded fields)] :func:`add_flags` put on ``parser``."""
    return list(getattr(parser, "_fvsanity_settings", []))


def parse_options(flag: str, items) -> dict:
    """``["k=v", ...]`` -> {k: v}; a value is read as JSON when it parses (numbers, true/false,
    lists), else kept as a string (a file path)."""
    from .errors import FVSanityError

    out = {}
    for item in items or ():
        key, eq, value = str(item).partition("=")
        if not eq or not key.strip():
            raise FVSanityError(f"{flag} {item!r} must be KEY=VALUE (e.g. decay_power=1.5)")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def _value(spec: FlagSpec, v):
    from .errors import FVSanityError, check_number

    if spec.negate:
        return not v
    if spec.parse == "options":
        return parse_options(spec.flag, v)
    if spec.parse == "ints":
        try:
            return tuple(int(c) for c in str(v or "").split(",") if c.strip())
        except ValueError:
            raise FVSanityError(f"{spec.flag} must be comma-separated integers (e.g. 32,128), got {v!r}") from None
    if spec.parse == "names":
        names = tuple(c.strip() for c in str(v or "").split(",") if c.strip())
        return names or None
    if isinstance(spec.default, (tuple, list)):
        return tuple(v)
    if spec.bounds is not None and v is not None:
        lo, hi = spec.bounds
        integer = isinstance(spec.default, int) or spec.kwargs.get("type") is int
        check_number(spec.flag, v, integer=integer, ge=lo, le=hi)
        if integer and hi is None and v > 2**63 - 1:  # what torch takes
            check_number(spec.flag, v, integer=True, ge=lo, le=2**63 - 1)
    return v


def from_args(cls, args: argparse.Namespace, instance=None, exclude: Sequence[str] = (), **fixed):
    """The settings ``cls`` from parsed ``args``: each generated flag's value (bounds checked,
    negated, parsed) into its field; ``from_flag`` fields from their flag; ``fixed`` (field name
    -> value, top level) as given; every other field from ``instance`` (default ``cls()``).

    Raises:
        SettingError: a value out of bounds or refused by a settings class, named by its flag.
    """
    from .errors import SettingError

    inst = cls() if instance is None else instance
    flags = {s.path: s for s in flag_specs(cls, inst, exclude=exclude)}

    def build(klass, base, prefix):
        kw = {}
        for f in dataclasses.fields(klass):
            path = prefix + (f.name,)
            m = _meta(f)
            if not prefix and f.name in fixed:
                kw[f.name] = fixed[f.name]
            elif m.get("from_flag") and hasattr(args, m["from_flag"]):
                kw[f.name] = getattr(args, m["from_flag"])
            elif path in flags and hasattr(args, flags[path].dest):
                kw[f.name] = _value(flags[path], getattr(args, flags[path].dest))
            elif dataclasses.is_dataclass(getattr(base, f.name)) and not m.get("help"):
                kw[f.name] = build(type(getattr(base, f.name)), getattr(base, f.name), path)
        try:
            return dataclasses.replace(base, **kw)
        except SettingError as e:
            spec = flags.get(prefix + (e.name,))
            raise (e.renamed(spec.flag) if spec is not None else e) from None

    return build(cls, inst, ())


def settings_to_json(obj) -> Any:
    """A settings dataclass as JSON-able data (tuples as lists, nested settings as dicts)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: settings_to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [settings_to_json(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): settings_to_json(v) for k, v in obj.items()}
    if callable(obj):
        return getattr(obj, "__name__", repr(obj))
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)  # e.g. a torch.device


def replace_flat(obj, **kw):
    """``obj`` (a settings dataclass, possibly composed) with fields replaced by their plain
    names, wherever in the composition they live (:func:`flat_paths`): ``replace_flat(
    AuditSettings(), steps=64, top_k=3)`` sets ``render.steps`` and ``path.top_k``. A name no
    field has, or one two flagged fields share, is a TypeError naming the valid names."""
    paths = flat_paths(obj)
    by_path: dict[tuple[str, ...], Any] = {}
    for name, v in kw.items():
        if name not in paths:
            raise TypeError(f"unknown setting {name!r}; valid: {', '.join(sorted(paths))}")
        by_path[paths[name]] = v

    def rebuild(o, prefix):
        changes = {}
        for f in dataclasses.fields(o):
            p = prefix + (f.name,)
            if p in by_path:
                changes[f.name] = by_path[p]
            elif any(len(q) > len(p) and q[: len(p)] == p for q in by_path):
                changes[f.name] = rebuild(getattr(o, f.name), p)
        return dataclasses.replace(o, **changes) if changes else o

    return rebuild(obj, ())


def _leaves(obj, prefix=()):
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            yield from _leaves(v, prefix + (f.name,))
        else:
            yield prefix + (f.name,), v


def flat_paths(obj) -> dict[str, tuple[str, ...]]:
    """{plain name: field path} of a (composed) settings object: a top-level field wins a name,
    then the one with a flag; names two flagged fields share are left out (set them through
    their inner settings object)."""
    flagged = {s.path for s in flag_specs(type(obj), obj)}
    by_name: dict[str, list[tuple[str, ...]]] = {}
    for path, _ in _leaves(obj):
        by_name.setdefault(path[-1], []).append(path)
    out = {}
    for name, paths in by_name.items():
        pick = [p for p in paths if len(p) == 1] or [p for p in paths if p in flagged] or paths
        if len(pick) == 1:
            out[name] = pick[0]
    return out


def flat_json(obj) -> dict:
    """A composed settings object as one flat JSON dict of plain names (:func:`flat_paths`);
    :func:`replace_flat` reads it back."""
    values = dict(_leaves(obj))
    return {name: settings_to_json(values[path]) for name, path in sorted(flat_paths(obj).items())}
