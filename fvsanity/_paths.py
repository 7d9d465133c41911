"""Where fvsanity looks for data, weights and its cache.

Lookup order for real data (weights, natural images), same layout in each place
(``weights/<file>``, ``cifar10-test/<class>/NNNN.jpg``, ...):

1. ``$FVSANITY_DATA``;
2. the user cache (``$FVSANITY_CACHE``, else ``$XDG_CACHE_HOME/fvsanity``, else
   ``~/.cache/fvsanity``);
3. the packaged copy (``fvsanity/assets``: the CIFAR-10 ResNet-20 weights and 100 CIFAR-10 test
   images per class, shipped with the package).

A checksummed download (:mod:`fvsanity.models`) comes after all three. Nothing here touches the
network.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The packaged data folder. A module attribute so that tests can hide it (``monkeypatch``).
PACKAGED_DIR = Path(__file__).resolve().parent / "assets"


def offline(env=None) -> bool:
    """True when ``FVSANITY_OFFLINE=1``: no network attempt anywhere (``0``, empty or unset:
    online).

    Raises:
        EnvError: any other value (``yes``, ``true``: refused rather than silently online).
    """
    from .errors import EnvError

    env = os.environ if env is None else env
    v = env.get("FVSANITY_OFFLINE", "").strip()
    if v not in ("", "0", "1"):
        raise EnvError(f"FVSANITY_OFFLINE={env['FVSANITY_OFFLINE']!r} is not valid; valid: 1 (no network) or 0")
    return v == "1"


def data_dirs() -> list[Path]:
    """Candidate data folders, in lookup order (existing ones only)."""
    out: list[Path] = []
    env = os.environ.get("FVSANITY_DATA")
    if env:
        out.append(Path(env).expanduser())
    out.append(cache_dir())
    out.append(PACKAGED_DIR)
    return [p for p in out if p.is_dir()]


def cache_dir() -> Path:
    """The user cache folder (created lazily by writers, not here)."""
    env = os.environ.get("FVSANITY_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fvsanity"


def find_data_file(relpath: str) -> Path | None:
    """First existing ``<data dir>/<relpath>``, or None."""
    for d in data_dirs():
        p = d / relpath
        if p.exists():
            return p
    return None


def searched_locations(relpath: str) -> str:
    """Human-readable list of the places ``find_data_file`` looks, for error messages."""
    places = []
    env = os.environ.get("FVSANITY_DATA")
    places.append(f"$FVSANITY_DATA/{relpath}" + (f" ({Path(env) / relpath})" if env else " (unset)"))
    places.append(str(cache_dir() / relpath))
    places.append(f"the packaged copy ({PACKAGED_DIR / relpath})")
    return ", ".join(places)


def describe_location(path: str | os.PathLike) -> str:
    """Where a data file came from, for humans: ``"packaged copy (fvsanity/assets/...)"``,
    ``"$FVSANITY_DATA (/data/weights/...)"``, ``"user cache (...)"`` or the path itself."""
    p = Path(path).expanduser().resolve()
    env = os.environ.get("FVSANITY_DATA")
    roots = [("$FVSANITY_DATA", Path(env).expanduser())] if env else []
    roots += [("user cache", cache_dir()), ("packaged copy", PACKAGED_DIR)]
    for label, root in roots:
        try:
            rel = p.relative_to(root.resolve())
        except (ValueError, OSError):
            continue
        if label == "packaged copy":
            return f"{label} (fvsanity/assets/{rel.as_posix()})"
        return f"{label} ({p})"
    return str(path)
