"""The embedded default: a model and a natural-image folder that always exist, even offline.

``default_model()``
    1. ``cifar10-resnet20`` with real weights, looked up by :func:`fvsanity.models.load_model`
       (``$FVSANITY_DATA/weights``, the user cache, the packaged copy in ``fvsanity/assets``,
       then a download checked against its full sha256 when online);
    2. otherwise a notice on stderr and ``toy-procedural``, a small CNN fvsanity trains itself on
       procedurally generated images (cached after the first run).

``default_images(model)``
    Only for a model whose classes are CIFAR-10's (or the toy model); any other model raises a
    one-line error asking for ``--images DIR`` (CIFAR-10 labels 0-9 read as, say, ImageNet
    classes would give wrong numbers with no error).

    1. ``cifar10-test`` in ``$FVSANITY_DATA``, the user cache or the packaged copy (100 images
       per class), as class folders;
    2. online: torchvision's CIFAR-10 test set, downloaded once and exported as class-folder
       JPEGs into ``<cache>/cifar10-test``;
    3. otherwise, with no model given, a notice and procedural images (the toy model's ten
       classes) written once to ``<cache>/toy-procedural-images``; a CIFAR-10 model gets a
       one-line error instead (those images are not of its classes).
    When ``model`` is the toy model, its own procedural images are returned directly: CIFAR
    photographs are not what it was trained on.

``FVSANITY_OFFLINE=1`` disables every network attempt.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TextIO

from ._paths import cache_dir, find_data_file, searched_locations
from ._paths import offline as _offline
from .errors import DataError, MissingWeightsError

__all__ = [
    "default_model",
    "default_images",
    "export_cifar10_test",
    "offline",
    "CIFAR_DIR",
    "PROCEDURAL_DIR",
]

CIFAR_DIR = "cifar10-test"
PROCEDURAL_DIR = "toy-procedural-images"
CIFAR_PER_CLASS = 200  # same size as the shared data: 2,000 test images
PROCEDURAL_PER_CLASS = 100


def offline() -> bool:
    """True when ``FVSANITY_OFFLINE=1``: no network attempt anywhere (:func:`fvsanity._paths.offline`;
    a value other than 0 or 1 is an :class:`~fvsanity.errors.EnvError`)."""
    return _offline()


def _say(msg: str, stream: TextIO | None) -> None:
    print(f"fvsanity: {msg}", file=stream if stream is not None else sys.stderr, flush=True)


def default_model(device=None, *, stream: TextIO | None = None):
    """The default :class:`~fvsanity.models.LoadedModel`: CIFAR-10 ResNet-20, else the toy model.

    Args:
        device: where to put the model (default CPU).
        stream: where the fallback notice goes (default stderr).
    """
    from .models import DEFAULT_MODEL, load_model

    try:
        return load_model(DEFAULT_MODEL, device=device)
    except MissingWeightsError as e:
        _say(
            f"notice: the default model {DEFAULT_MODEL} is not available ({e}). Falling back to "
            "'toy-procedural', a small CNN fvsanity trains itself on procedurally generated "
            "images; its results illustrate the method, not a real network.",
            stream,
        )
    return load_model("toy-procedural", device=device)


def export_cifar10_test(dest: str | os.PathLike, root: str | os.PathLike, per_class: int = CIFAR_PER_CLASS) -> Path:
    """Download (if needed) CIFAR-10's test split with torchvision into ``root`` and export the
    first ``per_class`` images of each class as ``dest/<class>/NNNN.jpg`` (quality 95).

    The folder is assembled beside ``dest`` and renamed into place (atomic). Raises on any
    failure (no network, bad archive).
    """
    import torchvision

    dest = Path(dest)
    ds = torchvision.datasets.CIFAR10(root=str(root), train=False, download=True)
    classes = list(ds.classes)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        counts = [0] * len(classes)
        for i in range(len(ds)):
            img, label = ds[i]
            if counts[label] >= per_class:
                continue
            d = tmp / classes[label]
            d.mkdir(exist_ok=True)
            img.convert("RGB").save(d / f"{counts[label]:04d}.jpg", quality=95)
            counts[label] += 1
            if min(counts) >= per_class:
                break
        if dest.exists() and not any(dest.iterdir()):
            dest.rmdir()
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _has_images(d: Path) -> bool:
    return d.is_dir() and any(p.is_file() for p in d.rglob("*"))


def _is_cifar10(model) -> bool:
    from .models import CIFAR10_CLASSES

    return list(getattr(model, "class_names", []) or []) == CIFAR10_CLASSES


def default_images(model=None, *, stream: TextIO | None = None) -> Path:
    """A folder of natural images for the default model (see the module docstring for the chain).

    Args:
        model: the LoadedModel the images are for; the toy model gets its procedural images, a
            model whose classes are not CIFAR-10's gets a :class:`~fvsanity.errors.DataError`.
        stream: where notices go (default stderr).

    Returns:
        a folder path (class sub-folders of images).
    """
    from .models.toy import write_procedural_folder

    if model is not None and getattr(model, "name", "") == "toy-procedural":
        return write_procedural_folder(cache_dir() / PROCEDURAL_DIR, PROCEDURAL_PER_CLASS)
    if model is not None and not _is_cifar10(model):
        names = list(getattr(model, "class_names", []) or [])
        whose = f"its {len(names)} classes ({', '.join(names[:2])}, ...) are not" if names else "its classes are unknown, not"
        raise DataError(
            f"--images DIR is required for {model.name}: the default images are CIFAR-10 test images and "
            f"{whose} CIFAR-10's; pass a folder of natural images of its classes"
        )
    found = find_data_file(CIFAR_DIR)
    if found is not None and _has_images(found):
        return found
    reason = f"no CIFAR-10 test images in {searched_locations(CIFAR_DIR)}"
    if not offline():
        try:
            _say("downloading the CIFAR-10 test set with torchvision (once, ~170 MB) ...", stream)
            return export_cifar10_test(cache_dir() / CIFAR_DIR, cache_dir() / "downloads")
        except Exception as e:  # noqa: BLE001 - any network/archive failure: fall back below
            reason += f" and the download failed ({type(e).__name__})"
    else:
        reason += " and FVSANITY_OFFLINE=1"
    if model is not None:
        raise DataError(f"--images DIR is required for {model.name}: {reason}")
    dest = cache_dir() / PROCEDURAL_DIR
    _say(
        f"notice: {reason}. Using procedurally generated images (the toy model's ten classes) "
        f"in {dest} instead.",
        stream,
    )
    return write_procedural_folder(dest, PROCEDURAL_PER_CLASS)
