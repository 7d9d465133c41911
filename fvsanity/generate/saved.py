"""FVs a user hands over (``--fv``): a ``visualize`` output, a tensor file, or image files.

:func:`load_fvs` is what ``fvsanity check --fv`` and ``fvsanity audit --fv`` read. FVs with
metadata (``fv.json``) must have been made for the same model weights (their
``model_fingerprint``; :func:`fvsanity.fingerprint.check_fv_model`), or they are refused; plain images
and bare tensors are taken as the user's own images, unchecked.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import FVSanityError
from ..fingerprint import check_fv_model
from .render import FVResult

__all__ = ["IMAGE_SUFFIXES", "load_fvs", "read_fv_result"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _read_image(path: Path) -> torch.Tensor:
    """[3, H, W] RGB in [0, 1], decoded like natural images (:func:`fvsanity.data.to_rgb`)."""
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    from ..data import to_rgb

    try:
        with Image.open(path) as im:
            return to_tensor(to_rgb(im))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise FVSanityError(f"--fv image {str(path)!r} cannot be read: {e}") from e


def read_fv_result(spec, flag: str = "--fv") -> FVResult:
    """:meth:`FVResult.load` of a ``fvsanity visualize`` output named by ``flag`` (``spec``), with
    any malformed content a one-line error: an ``fv.pt`` that is a pickle of other objects or not
    a dict of tensors, an ``fv.json`` that is not valid JSON or lacks what ``visualize`` writes.

    Raises:
        FVSanityError: naming ``flag``, the path and what is wrong.
    """
    import json

    try:
        return FVResult.load(spec)
    except FVSanityError as e:
        raise FVSanityError(f"{flag} {str(spec)!r}: {e}") from None
    except json.JSONDecodeError as e:
        raise FVSanityError(f"{flag} {str(spec)!r}: fv.json is not valid JSON (line {e.lineno}, column {e.colno}: "
                            f"{e.msg})") from None
    except (KeyError, AttributeError, TypeError, ValueError, IndexError) as e:
        what = f"missing {e.args[0]!r}" if isinstance(e, KeyError) and e.args else type(e).__name__
        raise FVSanityError(f"{flag} {str(spec)!r} is not a `fvsanity visualize` output (fv.pt: a dict of tensors, "
                            f"fv.json: its record): {what}") from None


def select_fvs(res, units: list, lm, where: str = "the FVs"):
    """(units, ``res``) with ``res`` (an FVResult) cut to the rows of ``units`` in their order
    (all of its units when ``units`` is empty), refused in one line when it lacks one."""
    from ..units import parse_unit

    have = [str(u) for u in res.units]
    if not units:
        return [parse_unit(u, lm) for u in res.units], res
    pick = []
    for u in units:
        if str(u) not in have:
            raise FVSanityError(f"{where} has no FVs for unit {str(u)!r}; it has: {', '.join(have)}")
        pick.append(have.index(str(u)))
    if pick == list(range(len(have))):
        return units, res
    from dataclasses import replace

    idx = torch.tensor(pick)
    return units, replace(
        res, images=res.images[idx], traces=res.traces[idx], final=res.final[idx],
        activations=[res.activations[i] for i in pick] if res.activations else [],
        units=[res.units[i] for i in pick], checkpoints={k: v[idx] for k, v in res.checkpoints.items()},
    )


def load_fvs(spec: str, units: list, lm):
    """(units, FV source) from ``--fv``: an FVResult folder/file, a tensor file, or image(s).

    Returns (units, images [U, S, 3, H, W] or FVResult). ``units`` may be empty when the FVResult
    names its own units.
    """
    from ..io import load_tensors

    path = Path(spec)
    if not path.exists():
        raise FVSanityError(f"--fv {spec!r} not found")
    folder = path if path.is_dir() else path.parent
    if (folder / "fv.json").is_file() and (folder / "fv.pt").is_file() and (path.is_dir() or path.name in ("fv.pt", "fv.json")):
        res = read_fv_result(folder)
        check_fv_model(res, lm, spec)  # made for these weights, or refused
        return select_fvs(res, units, lm, f"--fv {spec!r}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FVSanityError(f"--fv folder {spec!r} holds neither fv.pt/fv.json nor images ({', '.join(IMAGE_SUFFIXES)})")
        images = torch.stack([_read_image(p) for p in files])[None]
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        images = _read_image(path)[None, None]
    elif path.suffix in (".pt", ".pth", ".safetensors"):
        try:
            t = load_tensors(path)
        except Exception as e:  # noqa: BLE001 - any unreadable tensor file
            raise FVSanityError(f"--fv {spec!r} is not a readable tensor file: {type(e).__name__}") from e
        images = t.get("images") if isinstance(t, dict) else t
        if not isinstance(images, torch.Tensor):
            raise FVSanityError(f"--fv {spec!r} has no 'images' tensor; keys: {', '.join(t) if isinstance(t, dict) else '-'}")
        if images.ndim == 3:
            images = images[None, None]
        elif images.ndim == 4:
            images = images[None]
    else:
        raise FVSanityError(f"--fv {spec!r}: unknown file type; valid: a folder, fv.pt, .pt/.safetensors, {', '.join(IMAGE_SUFFIXES)}")
    if images.ndim != 5 or images.shape[2] != 3:
        raise FVSanityError(f"--fv {spec!r}: images must be [U, S, 3, H, W], got {tuple(images.shape)}")
    if not units:
        raise FVSanityError(f"--fv {spec!r} does not name its units; pass --unit LAYER:CHANNEL")
    if images.shape[0] != len(units):
        raise FVSanityError(f"--fv {spec!r} holds FVs for {images.shape[0]} unit(s) but {len(units)} --unit given")
    return units, images.float().clamp(0, 1)
