"""``fvsanity <command>``: the command line.

Each command lives in ``fvsanity/commands/<name>.py`` and exposes ``register(subparsers)``,
which adds its parser and sets ``func(args) -> int``. Common flags (``--device``, ``--seed``,
``--out``, ``--config``) come from :func:`add_common`; a ``--config`` JSON/YAML file supplies
defaults that explicit flags override, and the final config is saved beside the outputs.
Errors that users cause print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from .errors import FVSanityError

COMMANDS = ["layers", "visualize", "check", "fool", "audit", "demo", "bench"]


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


def load_config_defaults(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """If ``--config FILE`` is on the command line, make its keys the parser's defaults."""
    if "--config" not in argv:
        return
    i = argv.index("--config")
    if i + 1 >= len(argv):
        return
    path = Path(argv[i + 1])
    if not path.is_file():
        raise FVSanityError(f"--config file not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml  # optional dependency

        cfg = yaml.safe_load(text) or {}
    else:
        cfg = json.loads(text)
    parser.set_defaults(**{k.replace("-", "_"): v for k, v in cfg.items()})


def save_config(args: argparse.Namespace, out: str | Path, name: str = "config.json") -> Path:
    """Write the final (merged) config beside the outputs."""
    from .io import atomic_write_json

    cfg = {k: v for k, v in vars(args).items() if k != "func" and not callable(v)}
    return atomic_write_json(Path(out) / name, cfg)


def resolve_device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise FVSanityError(f"unknown --device {name!r}; valid: cpu, cuda, cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FVSanityError(f"--device {name!r} requested but CUDA is not available; valid here: cpu")
    return dev


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fvsanity", description="Sanity checks for feature visualizations.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"fvsanity {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as e:
            if e.name and e.name.endswith(f"commands.{name}"):
                continue  # command not built yet
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        if argv and argv[0] in parser._subparsers._group_actions[0].choices:  # type: ignore[union-attr]
            load_config_defaults(parser._subparsers._group_actions[0].choices[argv[0]], argv)  # type: ignore[union-attr]
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except FVSanityError as e:
        print(f"fvsanity: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fvsanity: interrupted; finished results are on disk, run again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
