"""Where an experiment script writes: one rule for every script under experiments/.

- ``--out DIR``: there (a smoke run may not point it into figures/).
- ``--smoke`` without ``--out``: a fresh temporary folder (``tempfile.mkdtemp``), printed.
- neither: ``figures/<experiment>/``, the committed results; the script says so in one line
  ("writing results to figures/<experiment> (full run)") before it starts.

Caches and work folders of full runs go to ``runs/<experiment>`` (gitignored), never into
figures/; a smoke run keeps them in ``OUT/work``. The scripts import this file from their parent
folder (``sys.path``), so it is not part of the fvsanity package.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIGURES = REPO / "figures"
RUNS = REPO / "runs"


def say(msg: str) -> None:
    """One line on stderr (stdout's last line stays the script's JSON headline)."""
    print(msg, file=sys.stderr, flush=True)


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def inside_figures(path: Path | str) -> bool:
    p = Path(path).resolve()
    return p == FIGURES or FIGURES in p.parents


class _DeprecatedAlias(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        say(f"{option_string} is deprecated: use --out")
        setattr(namespace, self.dest, values)


def add_out_argument(ap: argparse.ArgumentParser, experiment: str | None, *, alias: str | None = None,
                     what: str = "output folder", default: str | None = None) -> None:
    """``--out DIR`` (and a deprecated ``alias`` of it, e.g. ``--figures``) on ``ap``; ``experiment``
    None: a script without --smoke whose default is ``default`` (words for the help)."""
    if experiment is None:
        where = default
    else:
        where = f"figures/{experiment} on a full run; with --smoke a fresh temporary folder"
    ap.add_argument("--out", default=None, metavar="DIR", help=f"{what} [{where}]")
    if alias:
        ap.add_argument(alias, dest="out", default=None, metavar="DIR", action=_DeprecatedAlias,
                        help="deprecated alias of --out")


def output_dir(experiment: str, out: str | Path | None, smoke: bool, *, why: str = "full run") -> Path:
    """The folder a run writes its results to (created), announced in one line on stderr."""
    if out is not None:
        path = Path(out)
        if smoke and inside_figures(path):
            raise SystemExit(f"{experiment}: a --smoke run never writes into figures/ (--out {out}); "
                             f"leave --out out for a temporary folder")
        say(f"writing results to {_rel(path)}" + (" (smoke run)" if smoke else ""))
    elif smoke:
        path = Path(tempfile.mkdtemp(prefix=f"fvsanity-{experiment}-smoke-"))
        say(f"smoke run: writing to {path} (a fresh temporary folder; --out DIR to choose)")
    else:
        path = FIGURES / experiment
        say(f"writing results to {_rel(path)} ({why})")
    path.mkdir(parents=True, exist_ok=True)
    return path


def work_dir(experiment: str, out: Path, smoke: bool, work: str | Path | None = None) -> Path:
    """Caches / manipulated models: ``work`` if given, ``OUT/work`` on a smoke run, else
    ``runs/<experiment>`` (gitignored; never figures/)."""
    if work is not None:
        return Path(work)
    return out / "work" if smoke else RUNS / experiment


def output_file(experiment: str, out: str | Path | None, name: str, *, why: str = "full run") -> Path:
    """For the helper scripts that write one file: ``--out DIR`` puts ``name`` in DIR (default
    ``figures/<experiment>``, announced as a full run); a ``--out`` ending in a file suffix
    (e.g. ``figures/slingshot/ssim_seeds_400.json``, the form the READMEs' commands use) is that
    file."""
    if out is not None and Path(out).suffix:
        path = Path(out)
        say(f"writing results to {_rel(path)}" + (f" ({why})" if inside_figures(path) else ""))
    else:
        path = output_dir(experiment, out, False, why=why) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
