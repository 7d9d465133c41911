"""Weights files: reading a state dict safely (:func:`load_state_dict_file`), checking it against a
model before loading (:func:`check_state_dict`, :func:`load_weights`), and finding a known file
offline first (:func:`find_or_fetch`), downloading only what has a known full sha256."""

from __future__ import annotations

import hashlib
import os
import urllib.request
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from .._paths import cache_dir, find_data_file, offline, searched_locations
from ..errors import MissingWeightsError
from ..io import file_sha256

__all__ = ["load_state_dict_file", "check_state_dict", "load_weights", "find_or_fetch", "verify_sha256", "download",
           "one_line", "few", "keep_metadata"]


def one_line(text: str, limit: int = 200) -> str:
    """``text`` collapsed to one line of at most ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def few(keys: list[str], n: int = 3) -> str:
    """The first ``n`` keys and how many more: ``"a, b, c (+4 more)"``."""
    head = ", ".join(keys[:n])
    return head + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``weights_only=True``, never pickle).

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` and strips a ``module.`` prefix.
    Raises :class:`~fvsanity.errors.MissingWeightsError` (one line) for a missing, truncated or
    unreadable file, a pickle that holds anything but tensors (refused before any of it runs),
    and a file that holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - truncated or corrupt: one line, no traceback
            raise MissingWeightsError(
                f"cannot read weights file {path} (safetensors): {type(e).__name__}: {one_line(e)}"
            ) from e
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
            blocked = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln]
            if blocked:
                reason = (
                    f"it holds Python objects, not only tensors ({one_line(blocked[0], 120)}); fvsanity "
                    "never unpickles them (that could run code): save model.state_dict() or .safetensors"
                )
            else:
                msg = one_line(e, 120)
                reason = f"{type(e).__name__}" + (f": {msg}" if msg else "")
            raise MissingWeightsError(f"cannot read weights file {path} (torch.load weights_only=True): {reason}") from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise MissingWeightsError(
            f"{path} holds a {type(sd).__name__}, not a state dict (a dict of parameter name -> tensor)"
        )
    out = OrderedDict((str(k).removeprefix("module."), v) for k, v in sd.items() if isinstance(v, torch.Tensor))
    keep_metadata(sd, out)
    if not out:
        raise MissingWeightsError(f"{path} holds no tensors, not a state dict (a dict of parameter name -> tensor)")
    return out


def keep_metadata(src: dict, dst: dict) -> None:
    """Carry torch's per-module version metadata over to a filtered copy of a state dict (module
    loaders such as BatchNorm's read it), with a ``module.`` prefix stripped like the keys."""
    meta = getattr(src, "_metadata", None)
    if meta is not None:
        dst._metadata = OrderedDict(  # type: ignore[attr-defined]
            (k.removeprefix("module.") if k != "module" else "", v) for k, v in meta.items()
        )


def check_state_dict(
    model: nn.Module,
    sd: dict[str, torch.Tensor],
    source: str,
    *,
    allow_partial: bool = False,
    model_name: str | None = None,
    ignore_prefixes: tuple[str, ...] = (),
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Check a state dict against ``model`` before anything is loaded.

    Refused always (one-line :class:`~fvsanity.errors.MissingWeightsError`): any NaN/inf in a
    floating tensor (naming the first bad tensor), and a file of which no tensor fits. Refused
    unless ``allow_partial``: missing keys, unexpected keys, and keys whose shape differs from the
    model's (naming the first few of each, with both shapes, and their counts).

    Args:
        model: the module the weights are for.
        sd: name -> tensor (as read by :func:`load_state_dict_file`).
        source: the file, for messages.
        allow_partial: load what fits; missing and other-shaped entries stay as initialised.
        model_name: the model's name, for messages.
        ignore_prefixes: keys with these prefixes are dropped silently (heads the model was built
            without, e.g. GoogLeNet's ``aux1.``).

    Returns:
        ``(to_load, random_keys, ignored_keys)``: the entries to load, the model's state-dict
        keys that stay random (missing or other-shaped), the file's keys that are not used.
    """
    what = model_name or type(model).__name__
    for k, v in sd.items():
        if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all()):
            n_bad = int((~torch.isfinite(v)).sum())
            raise MissingWeightsError(
                f"weights in {source} hold {n_bad} non-finite value(s) (NaN/inf) in {k!r} "
                f"{list(v.shape)}; refusing to load them"
            )
    given = sd
    sd = {k: v for k, v in sd.items() if not k.startswith(ignore_prefixes)} if ignore_prefixes else dict(sd)
    expected = model.state_dict()
    # BatchNorm's step counter: torch itself fills it in for checkpoints that predate it (such as
    # the CIFAR ResNets'); it never changes an eval-mode output
    optional = {
        f"{name}.num_batches_tracked" if name else "num_batches_tracked"
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    missing = [k for k in expected if k not in sd and k not in optional]
    unexpected = [k for k in sd if k not in expected]
    other_shape = [k for k in sd if k in expected and tuple(sd[k].shape) != tuple(expected[k].shape)]
    to_load = OrderedDict((k, v) for k, v in sd.items() if k in expected and k not in other_shape)
    keep_metadata(given, to_load)
    if not to_load:
        raise MissingWeightsError(
            f"no tensor in {source} fits {what}: file keys {few(list(sd))}; model keys {few(list(expected))}"
        )
    if (missing or unexpected or other_shape) and not allow_partial:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({few(unexpected)})")
        if other_shape:
            shapes = [f"{k}: file {list(sd[k].shape)} vs model {list(expected[k].shape)}" for k in other_shape]
            parts.append(f"{len(other_shape)} with another shape ({few(shapes, 2)})")
        raise MissingWeightsError(
            f"weights in {source} do not fit {what}: {'; '.join(parts)}; pass --allow-partial-weights "
            "(API: allow_partial=True) to load the rest and leave the others random"
        )
    return to_load, missing + other_shape, unexpected


def load_weights(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    allow_partial: bool = False,
    model_name: str | None = None,
    ignore_prefixes: tuple[str, ...] = (),
) -> tuple[list[str], list[str]]:
    """Load a weights file into ``model`` (strict unless ``allow_partial``; see
    :func:`check_state_dict`). Returns ``(random_keys, ignored_keys)``."""
    sd = load_state_dict_file(path)
    to_load, random_keys, ignored = check_state_dict(
        model, sd, str(path), allow_partial=allow_partial, model_name=model_name, ignore_prefixes=ignore_prefixes
    )
    result = model.load_state_dict(to_load, strict=False)
    leftover = sorted(
        k for k in set(result.missing_keys) - set(random_keys) if not k.endswith("num_batches_tracked")
    ) + list(result.unexpected_keys)
    if leftover:  # cannot happen after check_state_dict; never load silently if it does
        raise MissingWeightsError(f"weights in {path} did not load into {model_name or 'the model'}: {few(leftover)}")
    return random_keys, ignored


def verify_sha256(path: Path, sha256: str) -> Path:
    """Check ``path`` against a known sha256 (full, or the prefix a file name carries)."""
    digest = file_sha256(path)
    if not digest.startswith(sha256.lower()):
        raise MissingWeightsError(
            f"checksum mismatch for {path}: sha256 {digest} != expected {sha256}; delete or replace the file"
        )
    return path


def download(url: str, dest: Path, sha256: str) -> Path:
    """Fetch ``url`` to ``dest`` atomically if its full sha256 matches. Raises on any failure.

    Nothing unverified is kept: the bytes go to ``dest.part`` and are renamed into place only
    after the checksum matched.
    """
    if len(sha256) != 64:
        raise MissingWeightsError(f"refusing to download {url}: no full sha256 is known for it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=20) as r, open(tmp, "wb") as f:  # noqa: S310
            for chunk in iter(lambda: r.read(1 << 20), b""):
                h.update(chunk)
                f.write(chunk)
        if h.hexdigest() != sha256:
            raise MissingWeightsError(f"checksum mismatch for {url}: sha256 {h.hexdigest()} != expected {sha256}")
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def find_or_fetch(relpath: str, url: str | None, sha256: str | None, hint: str) -> Path:
    """A known weights file: ``$FVSANITY_DATA``, the user cache, the packaged copy (each checked
    against ``sha256`` when known), else a download to the cache, only when the full sha256 is
    known; else a one-line error saying where it looked and what to do."""
    p = find_data_file(relpath)
    if p is not None:
        return verify_sha256(p, sha256) if sha256 else p
    where = f"no weights for {hint}: looked in {searched_locations(relpath)}"
    todo = f"pass --weights FILE (state dict or .safetensors) or put the file at $FVSANITY_DATA/{relpath}"
    if url and (sha256 is None or len(sha256) != 64):
        raise MissingWeightsError(
            f"{where}; fvsanity knows no full sha256 for {url}, so it does not download it: fetch it "
            f"yourself, check it, and {todo}"
        )
    if url and offline():
        raise MissingWeightsError(f"{where}; not downloading {url} (FVSANITY_OFFLINE=1); {todo}")
    if url:
        try:
            return download(url, cache_dir() / relpath, sha256)
        except MissingWeightsError as e:
            raise MissingWeightsError(f"{where}; {e}; {todo}") from e
        except Exception as e:  # noqa: BLE001 - offline, proxy, ...: one clear message
            raise MissingWeightsError(f"{where} and the download of {url} failed ({type(e).__name__}); {todo}") from e
    raise MissingWeightsError(f"{where}; {todo} or set FVSANITY_DATA")
