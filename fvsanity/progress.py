"""Progress bars for people, quiet logs for machines.

:func:`progress_bar` is tqdm on an interactive terminal; under a pipe or a file (CI, nohup,
torchrun logs) it draws nothing, since tqdm would write every update there, so a log stays one
line per event. ``FVSANITY_PROGRESS=always`` draws bars anyway, ``never`` never does.
"""

from __future__ import annotations

import os
import sys

__all__ = ["interactive", "progress_bar"]


def interactive(stream=None) -> bool:
    """Whether bars are drawn: ``FVSANITY_PROGRESS`` (always / never), else whether ``stream``
    (default stderr) is a terminal.

    Raises:
        EnvError: ``FVSANITY_PROGRESS`` set to something else (one line, the valid values).
    """
    v = os.environ.get("FVSANITY_PROGRESS", "").strip().lower()
    if v in ("always", "1", "on"):
        return True
    if v in ("never", "0", "off"):
        return False
    if v not in ("", "auto"):
        from .errors import EnvError

        raise EnvError(f"FVSANITY_PROGRESS={v!r} is not valid; valid: always, never, auto")
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(iterable=None, **kw):
    """``tqdm(iterable, **kw)`` on stderr, disabled unless :func:`interactive` (or ``disable=``)."""
    from tqdm.auto import tqdm

    kw.setdefault("file", sys.stderr)
    kw["disable"] = kw.get("disable", False) or not interactive(kw["file"])
    return tqdm(iterable, **kw)
