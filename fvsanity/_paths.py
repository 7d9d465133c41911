"""Where fvsanity looks for data, weights and its cache.

Lookup order for shared real data (weights, natural images): ``$FVSANITY_DATA``, then the user
cache (``$FVSANITY_CACHE`` or ``~/.cache/fvsanity``). Nothing here touches the network.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_dirs() -> list[Path]:
    """Candidate data folders, in lookup order (existing ones only)."""
    out: list[Path] = []
    env = os.environ.get("FVSANITY_DATA")
    if env:
        out.append(Path(env).expanduser())
    out.append(cache_dir())
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
    return ", ".join(places)
