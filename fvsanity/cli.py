"""``fvsanity <command>``: the command line.

Each command lives in ``fvsanity/commands/<name>.py`` and exposes ``register(subparsers)``,
which adds its parser and sets ``func(args) -> int``; the command list is the set of those
modules (:func:`list_commands`). Common flags (``--device``, ``--seed``, ``--out``,
``--config``) come from :func:`add_common`; a ``--config FILE`` (or ``--config=FILE``) JSON/YAML
file supplies defaults that explicit flags override, and the final config is saved beside the
outputs. Every error a user causes (bad flags, a malformed config, bad values) prints one line
``fvsanity: error: ...`` on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import pkgutil
import sys
from pathlib import Path
from typing import Any

from .errors import FVSanityError


class UsageError(FVSanityError):
    """A command line argparse refuses (unknown flag, invalid choice, missing value)."""


class ConfigError(FVSanityError):
    """A ``--config`` file that cannot be read, parsed or applied."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is a :class:`UsageError` (one line, exit 2) instead of usage + exit."""

    def error(self, message: str):  # noqa: D102 - argparse API
        command = self.prog.removeprefix("fvsanity").strip()
        raise UsageError(f"{command}: {message}" if command else message)


def list_commands() -> list[str]:
    """Names of the command modules in ``fvsanity/commands`` (each exposes ``register``), sorted."""
    from . import commands

    return sorted(m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_"))


def add_common(p: argparse.ArgumentParser, out_default: str | None = None) -> None:
    """--device, --seed, --out, --config, --model, --weights, --random-weights, --allow-partial-weights."""
    p.add_argument("--model", default="cifar10-resnet20", help="model name (fvsanity layers --list) [%(default)s]")
    p.add_argument("--weights", default=None, help="local weights file (.pt/.pth/.th/.safetensors)")
    p.add_argument("--random-weights", action="store_true", help="use random weights (structure tests)")
    p.add_argument("--allow-partial-weights", action="store_true",
                   help="load a --weights FILE that lacks some entries: they stay random, are printed and recorded")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... [cuda if available, else cpu]")
    p.add_argument("--seed", type=int, default=0, help="base random seed [%(default)s]")
    p.add_argument("--out", default=out_default, help="output folder" + (" [%(default)s]" if out_default else ""))
    p.add_argument("--config", default=None, help="JSON/YAML file of defaults; flags override it")


# ------------------------------------------------------------------------------ --config
def config_path(argv: list[str]) -> Path | None:
    """The ``--config FILE`` / ``--config=FILE`` named on the command line (the last one wins, as
    in argparse), or None. A ``--config`` without a value is left to argparse to refuse."""
    path = None
    for i, a in enumerate(argv):
        if a == "--":
            break
        if a == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
    return None if path is None else Path(path)


def _strict_yaml_loader(yaml, where: str):
    """A ``yaml.SafeLoader`` that refuses aliases (``*name``: the billion-laughs bomb, and merges
    ``<<: *name``) and duplicate keys (PyYAML keeps the last), each a one-line :class:`ConfigError`."""

    class StrictLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                ev = self.peek_event()
                raise ConfigError(f"{where}: YAML alias *{ev.anchor} at line {ev.start_mark.line + 1} is not allowed "
                                  "in a config (write the value out)")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                self.flatten_mapping(node)
                seen: dict = {}
                for key_node, _ in node.value:
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    try:
                        if key in seen:
                            raise ConfigError(f"{where}: duplicate key {key!r} at line {line} (first at line "
                                              f"{seen[key]}; each key once: YAML keeps only the last)")
                        seen[key] = line
                    except TypeError:  # an unhashable key: SafeLoader refuses it
                        continue
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def read_config(path: str | Path) -> dict[str, Any]:
    """A config file as a dict: YAML for ``.yaml``/``.yml``, JSON otherwise.

    Raises:
        ConfigError: missing or unreadable file, a parse error (with line and column), a
            duplicate key, a YAML alias (refused: no alias bombs), or a document that is not a
            mapping of flag names to values.
    """
    path = Path(path)
    where = f"--config {str(path)!r}"
    if not path.exists():
        raise ConfigError(f"{where}: file not found")
    if not path.is_file():
        raise ConfigError(f"{where} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8 text (byte {e.start})") from e
    except OSError as e:
        raise ConfigError(f"{where} cannot be read: {e.strerror or type(e).__name__}") from e
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ModuleNotFoundError as e:  # declared in pyproject; a broken install
            raise ConfigError(f"{where}: reading YAML needs PyYAML (pip install pyyaml), or use a .json file") from e
        try:
            cfg = yaml.load(text, Loader=_strict_yaml_loader(yaml, where))  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{where}: invalid YAML{at}: {problem}") from e
        except RecursionError:
            raise ConfigError(f"{where}: the YAML is nested too deeply") from None
        cfg = {} if cfg is None else cfg  # an empty YAML file sets nothing
        kind = "YAML"
    else:
        def pairs(items):
            seen = set()
            for k, _ in items:
                if k in seen:
                    raise ConfigError(f"{where}: duplicate key {k!r} (each key once: JSON keeps only the last)")
                seen.add(k)
            return dict(items)

        try:
            cfg = json.loads(text, object_pairs_hook=pairs)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
        except RecursionError:
            raise ConfigError(f"{where}: the JSON is nested too deeply") from None
        kind = "JSON"
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: the {kind} must be a mapping of flag names to values, got {type(cfg).__name__}")
    return cfg


# keys a saved config.json holds that are not flags: accepted in a --config, never applied
_RECORD_KEYS = ("command", "config", "model_provenance")


def _flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "version", "config")}


def _check_value(where: str, key: str, action: argparse.Action, v: Any) -> Any:
    """The config value ``v`` for the flag ``action``, checked as argparse checks the flag."""
    flag = action.option_strings[-1]

    def bad(what: str):
        return ConfigError(f"{where}: {key!r} ({flag}) must be {what}, got {json.dumps(v)}")

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(v, bool):
            raise bad("true or false")
        return v
    if isinstance(action, argparse._AppendAction):
        vals = v if isinstance(v, list) else [v]
        if not all(isinstance(x, str) for x in vals):
            raise bad("a string or a list of strings")
        return vals
    if v is None:
        return v
    if action.nargs in ("+", "*"):  # e.g. --paired-metrics cka rsa: a list of values
        vals = v if isinstance(v, list) else [v]
        if action.nargs == "+" and not vals:
            raise bad("a non-empty list")
        return [_check_scalar(where, key, action, x, bad) for x in vals]
    return _check_scalar(where, key, action, v, bad)


def _check_scalar(where: str, key: str, action: argparse.Action, v: Any, bad) -> Any:
    """One value of the flag ``action`` from a config, converted and checked like argparse does."""
    flag = action.option_strings[-1]
    typ = action.type
    if isinstance(v, str) and typ not in (None, str):
        try:
            v = typ(v)  # what argparse does with the same string on the command line
        except (TypeError, ValueError):
            raise bad(f"{'an integer' if typ is int else 'a number'}") from None
    if typ is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise bad("an integer")
    if typ is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise bad("a number")
    if typ in (None, str) and not isinstance(v, str):
        raise bad("a string")
    if action.choices is not None and v not in action.choices:
        raise ConfigError(f"{where}: {key!r} ({flag}) {json.dumps(v)} is not valid; valid: "
                          f"{', '.join(map(str, action.choices))}")
    return float(v) if typ is float else v


def load_config_defaults(parser: argparse.ArgumentParser, argv: list[str], command: str | None = None) -> dict:
    """If ``--config FILE`` (or ``--config=FILE``) is in ``argv``, make its keys ``parser``'s
    defaults (explicit flags still override them).

    Keys are flag names with ``_`` or ``-`` (``n_boot``, ``n-boot``, ``--n-boot``). A saved
    ``config.json`` round-trips: its ``command`` must be ``command``; ``config`` and other keys
    the command records but that are no flag (``parser``'s ``set_defaults``) are not applied.

    Returns:
        {dest: list} for repeatable flags (``--unit``): argparse would append command-line values
        to a default list, so these are applied by :func:`apply_config_lists` after parsing, only
        where the flag was not given.

    Raises:
        ConfigError: unreadable/malformed file, an unknown key (named with the closest flag and
            the valid ones), or a value of the wrong type or not among the flag's choices.
    """
    path = config_path(argv)
    if path is None or not any(a.dest == "config" for a in parser._actions):
        return {}  # a command without --config: argparse refuses the flag
    where = f"--config {str(path)!r}"
    cfg = read_config(path)
    flags = _flag_actions(parser)
    recorded = set(_RECORD_KEYS) | (set(parser._defaults) - {"func"})
    defaults = {}
    for raw, v in cfg.items():
        key = str(raw).lstrip("-").replace("-", "_")
        if key in flags:
            if v is None:
                if flags[key].default is None:
                    continue  # null: the flag was not given (a saved config records it so); keep its default
                raise ConfigError(f"{where}: {str(raw)!r} ({flags[key].option_strings[-1]}) must not be null; "
                                  f"leave the key out for its default ({json.dumps(flags[key].default, default=str)})")
            defaults[key] = _check_value(where, str(raw), flags[key], v)
        elif key == "command":
            if command is not None and v != command:
                raise ConfigError(f"{where} is a config of 'fvsanity {v}', not of 'fvsanity {command}'")
        elif key not in recorded:
            names = sorted(k.replace("_", "-") for k in flags)
            close = difflib.get_close_matches(key.replace("_", "-"), names, n=1, cutoff=0.6)
            hint = f"; closest: {close[0]}" if close else ""
            raise ConfigError(f"{where}: unknown key {str(raw)!r}{hint}; valid: {', '.join(names)}")
    lists = {k: v for k, v in defaults.items() if isinstance(flags[k], argparse._AppendAction)}
    for k in defaults:
        flags[k].required = False  # the config gives it
    parser.set_defaults(**{k: v for k, v in defaults.items() if k not in lists})
    return lists


def apply_config_lists(args: argparse.Namespace, lists: dict) -> None:
    """Repeatable flags from the config (see :func:`load_config_defaults`) where none were given."""
    for k, v in lists.items():
        if getattr(args, k, None) is None:
            setattr(args, k, list(v))


def save_config(args: argparse.Namespace, out: str | Path, name: str = "config.json") -> Path:
    """Write the final (merged) config beside the outputs (a valid ``--config`` for a rerun)."""
    from .io import atomic_write_json

    cfg = {k: v for k, v in vars(args).items() if k != "func" and not callable(v)}
    return atomic_write_json(Path(out) / name, cfg)


def resolve_device(name: str | None):
    """``--device`` as a ``torch.device`` (None: cuda if available, else cpu); a device this
    machine or PyTorch build lacks is a one-line error naming the devices there are
    (:meth:`fvsanity.distributed.Shard.device`)."""
    from .distributed import SINGLE

    return SINGLE.device(name)


#: what --seed may be: every seed fvsanity derives from it goes to torch.Generator.manual_seed
#: (which takes < 2**64) and numpy's default_rng (>= 0)
SEED_RANGE = (0, 2**63 - 1)
_INT64 = (-(2**63), 2**63 - 1)


def check_environment() -> None:
    """Refuse an ``FVSANITY_*`` variable holding a number or a choice it cannot be, naming the
    variable and its valid values: ``FVSANITY_THREADS``, ``FVSANITY_DIST_TIMEOUT_S``
    (:func:`fvsanity.distributed.check_env`), ``FVSANITY_OFFLINE`` (0 or 1,
    :func:`fvsanity._paths.offline`), ``FVSANITY_AMP`` (on, off, auto,
    :func:`fvsanity.generate.render.resolve_amp`). Unset or empty variables are their defaults."""
    import os

    from ._paths import offline
    from .distributed import check_env

    check_env()
    offline()
    from .progress import interactive

    interactive()  # its own check: FVSANITY_PROGRESS='sometimes' is not valid; valid: always, never, auto
    if os.environ.get("FVSANITY_AMP", "").strip():
        from .generate.render import resolve_amp

        resolve_amp(None, "cpu")  # its own check: FVSANITY_AMP='fast' is not valid; valid: on, off, auto


def check_common(args: argparse.Namespace) -> None:
    """The checks every command shares, before it starts: the environment
    (:func:`check_environment`), ``--seed`` in :data:`SEED_RANGE`, a ``--device`` this machine
    has, and ``--weights`` not given with ``--random-weights``."""
    from .errors import check_number

    check_environment()
    if getattr(args, "seed", None) is not None:
        check_number("--seed", args.seed, integer=True, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    if getattr(args, "device", None) is not None:
        resolve_device(args.device)
    if getattr(args, "random_weights", False) and getattr(args, "weights", None) is not None:
        raise FVSanityError(f"--random-weights and --weights {str(args.weights)!r} conflict (random weights would "
                            "ignore the file); give one of them")


def check_ints(args: argparse.Namespace, bounds: dict[str, tuple[int, int | None]]) -> None:
    """Refuse an integer flag outside its bounds, before any work: ``bounds`` maps a flag's dest
    to (lowest, highest or None); every other integer flag must fit 64 bits (what torch takes).

    Raises:
        SettingError: ``--steps must be in 1..1000000, got 99999999999999999999`` (one line).
    """
    from .errors import check_number

    for dest, (lo, hi) in bounds.items():
        v = getattr(args, dest, None)
        if v is not None:
            flag = "--" + dest.replace("_", "-")
            check_number(flag, v, integer=True, ge=lo, le=hi)
            if hi is None and not v <= _INT64[1]:
                check_number(flag, v, integer=True, ge=lo, le=_INT64[1])
    for dest, v in vars(args).items():
        if isinstance(v, int) and not isinstance(v, bool) and not _INT64[0] <= v <= _INT64[1]:
            check_number("--" + dest.replace("_", "-"), v, integer=True, ge=_INT64[0], le=_INT64[1])


def build_parser() -> argparse.ArgumentParser:
    """The ``fvsanity`` parser with one subparser per module of :func:`list_commands`."""
    parser = _Parser(prog="fvsanity", description="Sanity checks for feature visualizations.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"fvsanity {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in list_commands():
        importlib.import_module(f".commands.{name}", __package__).register(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A Python warning as one ``fvsanity: warning: ...`` line (no file path, no source line):
    what a user reads, not where in the code it was raised."""
    return "fvsanity: warning: " + " ".join(str(message).split()) + "\n"


def main(argv: list[str] | None = None) -> int:
    import warnings

    argv = list(sys.argv[1:] if argv is None else argv)
    fmt = warnings.formatwarning
    warnings.formatwarning = _one_line_warning  # how warnings print; who records them is unchanged
    try:
        return _main(argv)
    finally:
        warnings.formatwarning = fmt


def _main(argv: list[str]) -> int:
    try:
        parser = build_parser()
        commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
        lists = load_config_defaults(commands[argv[0]], argv[1:], command=argv[0]) if argv and argv[0] in commands else {}
        args = parser.parse_args(argv)
        apply_config_lists(args, lists)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        check_common(args)
        return int(args.func(args) or 0)
    except FVSanityError as e:
        print(f"fvsanity: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fvsanity: interrupted; finished results are on disk, run again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
