"""Atomic writes, image files and provenance shared by every command.

Everything a long run writes goes through ``atomic_*``: a crash leaves either the old file or
the new one, never half of one, so runs can resume from what is on disk.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def tmp_for(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)  # mkstemp makes 0600; results should be as readable as any file
    return Path(name)


_tmp_for = tmp_for  # deprecated alias (was private but used across modules)


def _to_jsonable(o: Any):
    if hasattr(o, "to_json"):
        return o.to_json()
    if isinstance(o, torch.Tensor):
        return o.detach().cpu().tolist()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def dumps(obj: Any) -> str:
    """JSON text (NaN/inf become null so the file stays valid JSON)."""

    def clean(o):
        if isinstance(o, float) and not np.isfinite(o):
            return None
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    return json.dumps(clean(json.loads(json.dumps(obj, default=_to_jsonable))), indent=2)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    tmp = tmp_for(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, dumps(obj) + "\n")


def atomic_save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> Path:
    """Save a flat dict of tensors (``.safetensors`` if the suffix says so, else ``torch.save``)."""
    path = Path(path)
    tmp = tmp_for(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        else:
            torch.save({k: v.detach().cpu() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Inverse of :func:`atomic_save_tensors` (never unpickles arbitrary objects).

    Raises:
        DataError: a file that is not a tensor file this can read safely (a pickle of other
            objects, a truncated or foreign file), one line naming it.
        OSError: a missing or unreadable file, as the OS says.
    """
    import warnings

    from .errors import DataError

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the refusal below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - a pickle of other objects, a truncated or foreign file
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
        if "weights only load failed" in text.lower():
            why = "it holds other objects than tensors (a pickle, never unpickled)"
        else:
            why = f"{type(e).__name__}: {text.splitlines()[0][:160]}" if text else type(e).__name__
        raise DataError(f"{str(path)!r} is not a tensor file fvsanity reads safely (torch.load weights_only=True "
                        f"or safetensors): {why}") from None


def file_sha256(path: str | os.PathLike) -> str:
    """Full sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """[3,H,W] float in [0,1] -> HxWx3 uint8."""
    return (img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def save_png(path: str | os.PathLike, img: torch.Tensor) -> Path:
    """Write a [3,H,W] RGB [0,1] tensor as PNG, atomically."""
    from PIL import Image

    path = Path(path)
    tmp = tmp_for(path)
    try:
        Image.fromarray(to_uint8(img)).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def image_grid(images: torch.Tensor, nrow: int, pad: int = 2) -> torch.Tensor:
    """[N,3,H,W] -> one [3,H',W'] grid with ``nrow`` images per row, white padding."""
    n, c, h, w = images.shape
    ncol = nrow
    nrows = (n + ncol - 1) // ncol
    grid = torch.ones(c, nrows * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = images[i]
    return grid


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and check it can be written; one-line error otherwise."""
    from .errors import FVSanityError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tmp_for(path / ".write-test")
        probe.unlink()
    except OSError as e:
        raise FVSanityError(f"--out {str(path)!r} is not writable: {e.strerror or e}") from e
    return path


def provenance() -> dict:
    """Package versions, Python, platform and git SHA (if run from a checkout)."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("fvsanity", "torch", "torchvision", "torch-lucent", "timm", "numpy", "scipy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    sha = None
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"versions": versions, "python": platform.python_version(), "platform": platform.platform(), "git_sha": sha}
