"""Content-addressed caches: a result is reused only for the model and settings it was made for.

Everything fvsanity reuses from disk (FVs, natural-image passes, FV detectors, manipulated-model
FVs) is stored with the *key* it was computed for: the model fingerprint (a hash of every
parameter and buffer, the module types and the preprocessing, :func:`model_fingerprint`) plus
every setting that changes the result. The key lives in a JSON key file next to the payload
together with the sha256 of each payload file; on read both are checked again, so a folder
whose key differs (other weights, ``--random-weights``, another size, ...) or whose payload was
replaced is never reused: it is recomputed and overwritten. Writes are atomic and the key file is
removed before a payload is rewritten, so a crash leaves an entry that is simply recomputed.

Public API:
    :func:`model_fingerprint`, :func:`tensor_digest`, :func:`key_digest`
    :class:`CacheEntry`, :func:`cached`
    keys: :func:`fv_key`, :func:`natural_pass_key`, :func:`image_set_identity`,
    :func:`fv_result_digest`
    :func:`render_cached` (FVs through the cache), :func:`check_fv_model` and
    :class:`FVMismatchError` (``--fv`` reuse only for the weights the FVs were made for)

The hashing and the ``--fv`` check live in :mod:`fvsanity.fingerprint` (re-exported here), so
the model registry and the FV loader use them without importing this module: ``cache`` imports
``generate`` (:func:`render_cached`), and nothing ``generate`` imports may import ``cache`` back.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import FVSanityError
from .fingerprint import FVMismatchError, check_fv_model, model_fingerprint, short, tensor_digest
from .io import file_sha256

__all__ = [
    "KEY_FORMAT",
    "FVMismatchError",
    "CacheEntry",
    "cached",
    "model_fingerprint",
    "tensor_digest",
    "key_digest",
    "fv_key",
    "fv_result_digest",
    "natural_pass_key",
    "image_set_identity",
    "render_cached",
    "check_fv_model",
    "short",
]

KEY_FORMAT = "fvsanity-cache/1"


# ------------------------------------------------------------------------------ canonical JSON
def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def key_digest(key: dict) -> str:
    """sha256 (hex) of a key's canonical JSON (sorted keys; tuples and lists alike)."""
    return hashlib.sha256(_canonical(key).encode()).hexdigest()


def _diff_keys(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if _canonical(old.get(k)) != _canonical(new.get(k)))


# ------------------------------------------------------------------------------ entries
@dataclass(frozen=True)
class CacheEntry:
    """One cached result: payload files plus a key file holding the key and the files' sha256.

    Build with :meth:`folder` (a folder of payload files, key in ``folder/cache_key.json``) or
    :meth:`file` (one payload file, key in ``<file>.key.json`` beside it).

    Attributes:
        key_file: where the key record lives.
        key: the JSON-able key this entry must hold to be reused.
        files: the payload files (all must exist and hash as recorded).
    """

    key_file: Path
    key: dict
    files: tuple[Path, ...]

    @classmethod
    def folder(cls, folder: str | os.PathLike, key: dict, names: Sequence[str]) -> CacheEntry:
        folder = Path(folder)
        return cls(folder / "cache_key.json", key, tuple(folder / n for n in names))

    @classmethod
    def file(cls, path: str | os.PathLike, key: dict, extra: Sequence[str | os.PathLike] = ()) -> CacheEntry:
        path = Path(path)
        return cls(path.with_name(path.name + ".key.json"), key, (path, *(Path(p) for p in extra)))

    @property
    def digest(self) -> str:
        return key_digest(self.key)

    def stored(self) -> dict | None:
        """The stored key record, or None if absent or unreadable."""
        try:
            rec = json.loads(self.key_file.read_text())
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) and rec.get("format") == KEY_FORMAT else None

    def why_stale(self) -> str | None:
        """None if this entry can be reused, else why not (one line)."""
        rec = self.stored()
        if rec is None:
            return "no cache key"
        old = rec.get("key")
        if not isinstance(old, dict) or key_digest(old) != self.digest:
            diff = _diff_keys(old if isinstance(old, dict) else {}, self.key)
            return f"made for other settings (differ: {', '.join(diff) or '?'})"
        want = rec.get("files") or {}
        for p in self.files:
            if not p.is_file():
                return f"{p.name} is missing"
            if want.get(p.name) != file_sha256(p):
                return f"{p.name} changed since it was cached"
        return None

    def valid(self) -> bool:
        return self.why_stale() is None

    def invalidate(self) -> None:
        """Remove the key file (before the payload is rewritten)."""
        self.key_file.unlink(missing_ok=True)

    def commit(self) -> None:
        """Record the key and the payload files' sha256, atomically (after the payload is written)."""
        from .io import atomic_write_json

        missing = [p.name for p in self.files if not p.is_file()]
        if missing:
            raise FVSanityError(f"cache payload missing after writing: {', '.join(missing)} in {self.key_file.parent}")
        atomic_write_json(self.key_file, {
            "format": KEY_FORMAT, "digest": self.digest, "key": self.key,
            "files": {p.name: file_sha256(p) for p in self.files},
        })


def cached(entry: CacheEntry, compute: Callable[[], Any], load: Callable[[], Any]) -> tuple[Any, bool]:
    """``(load(), True)`` if ``entry`` holds its key, else ``(compute(), False)``.

    ``compute`` must write the entry's payload files; the key is committed after it returns. A
    payload that fails to load despite a matching key is recomputed too.
    """
    if entry.valid():
        try:
            return load(), True
        except (FVSanityError, OSError, RuntimeError, ValueError, KeyError):
            pass
    entry.invalidate()
    value = compute()
    entry.commit()
    return value, False


# ------------------------------------------------------------------------------ keys
def _library_versions() -> dict:
    from ._version import __version__

    return {"fvsanity": __version__, "torch": torch.__version__.split("+")[0]}


def _units_json(units) -> list:
    out = []
    for u in units:
        d = getattr(u, "direction", None)
        out.append(str(u) if d is None else f"{u}#{tensor_digest(d)[:16]}")
    return out


def _transforms_json(transforms) -> Any:
    if isinstance(transforms, str) or transforms is None:
        return transforms
    d = dict(vars(transforms))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


#: the render options that enter an FV cache key, with the defaults of :func:`fvsanity.generate.render`
FV_KEY_OPTIONS = {
    "steps": 512, "size": None, "lr": 0.05, "param": "fft", "decorrelate": True, "transforms": "standard",
    "diversity": 0.0, "checkpoints": (),
}


def fv_key(lm, units, seeds: Sequence[int], *, dtype: str = "float32", fv_batch: int | None = None, **options) -> dict:
    """The cache key of FVs rendered by :func:`fvsanity.generate.render` with these arguments.

    Holds the model fingerprint and name, the units (direction vectors by digest), seeds and every
    option that changes the images: steps, size (resolved to [H, W] px), lr, param, decorrelate,
    transforms, diversity and the kept checkpoints, plus the fvsanity and torch versions; and the
    compute ``dtype`` ("bfloat16" under autocast) when it is not float32, so a float32 key is what
    it always was and bf16 FVs are never served for a float32 request or back. ``fv_batch``: the
    compute width (:func:`fvsanity.generate.render.fv_batch_width`, default for the CPU), which
    changes the floating-point result. Device and progress do not enter.

    ``options``: the render options by name (:data:`FV_KEY_OPTIONS`, with their defaults); an
    unknown name is a TypeError.
    """
    from .generate.render import fv_batch_width

    bad = sorted(set(options) - set(FV_KEY_OPTIONS))
    if bad:
        raise TypeError(f"fv_key() got an unknown render option {bad[0]!r}; valid: {', '.join(FV_KEY_OPTIONS)}")
    o = {**FV_KEY_OPTIONS, **options}
    steps, size, checkpoints = o["steps"], o["size"], o["checkpoints"]

    if size is None:
        hw = list(lm.input_size)
    elif isinstance(size, int):
        hw = [size, size]
    else:
        hw = [int(x) for x in size]
    return {
        "kind": "fv",
        "model": lm.name,
        "model_fingerprint": lm.fingerprint(),
        "units": _units_json(units),
        "seeds": [int(s) for s in seeds],
        "steps": int(steps),
        "size": hw,
        "lr": float(o["lr"]),
        "param": o["param"],
        "decorrelate": bool(o["decorrelate"]),
        "transforms": _transforms_json(o["transforms"]),
        "diversity": float(o["diversity"]),
        "checkpoints": sorted({int(c) for c in checkpoints if 0 < int(c) <= int(steps)}),
        **({} if dtype == "float32" else {"dtype": str(dtype)}),
        "fv_batch": fv_batch_width(fv_batch, "cpu"),
        **_library_versions(),
    }


def fv_result_digest(res, checkpoints: Sequence[int] | None = None) -> str:
    """Content digest of an :class:`~fvsanity.generate.FVResult`: the model fingerprint it
    records, units, seeds, the images and the checkpoints (those in ``checkpoints`` if given).
    Timing and device do not enter: the same images give the same digest."""
    keep = sorted(k for k in res.checkpoints if checkpoints is None or k in set(checkpoints))
    head = _canonical({"model_fingerprint": (res.settings or {}).get("model_fingerprint"),
                       "units": _units_json(res.units), "seeds": list(res.seeds), "checkpoints": keep})
    return hashlib.sha256(
        head.encode() + tensor_digest(res.images, *(res.checkpoints[k] for k in keep)).encode()
    ).hexdigest()


def image_set_identity(natural) -> dict:
    """What identifies a natural-image set: its pixels, its labels and how it is decoded.

    Files by content: the sha256 of every file's bytes with its path, in order (reading 2,000
    CIFAR JPEGs or 1,000 ImageNet ones takes well under a second), so pictures replaced under the
    same names, with the same sizes and modification times, are another image set. In-memory
    images by the digest of their pixels. Plus the labels (their digest), the class names and the
    decoding size (H, W). The model's preprocessing enters through its fingerprint, elsewhere.
    """
    images = getattr(natural, "images", None)
    ident: dict = {"n": len(natural), "size": list(getattr(natural, "size", ()))}
    labels = getattr(natural, "labels", None)
    if isinstance(labels, torch.Tensor):
        ident["labels"] = tensor_digest(labels)
    names = getattr(natural, "class_names", ())
    if names:
        ident["class_names"] = hashlib.sha256("\n".join(map(str, names)).encode()).hexdigest()[:16]
    if images is not None:
        ident["content"] = tensor_digest(images)
        return ident
    h = hashlib.sha256()
    for p in natural.paths:
        h.update(f"{p}\0".encode())
        try:
            with open(p, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
        except OSError:
            h.update(b"missing")
        h.update(b"\n")
    ident["file_content"] = h.hexdigest()
    return ident


def natural_pass_key(lm, natural, layers: Sequence[str], units=None, pooling: str = "mean",
                     batch_size: int | None = None) -> dict:
    """The cache key of a natural-image pass: model fingerprint, image set (content, labels),
    layers, pooling and the batch size (every forward is padded to it; see
    :func:`fvsanity.activations.pad_batch`).

    No unit list: shards of one sweep with different units share one pass (the units'
    responses are keyed on their own, :func:`fvsanity.compare.pipeline.natural_pass`).
    ``units`` is accepted for old callers and ignored.
    """
    return {
        "kind": "natural_pass",
        "model": lm.name,
        "model_fingerprint": lm.fingerprint(),
        "images": image_set_identity(natural),
        "layers": list(layers),
        "pooling": pooling,
        **({} if batch_size is None else {"batch_size": int(batch_size)}),
        **_library_versions(),
    }


# ------------------------------------------------------------------------------ FVs
def render_cached(lm, units, folder: str | os.PathLike, *, seeds: Sequence[int], pngs: bool = True, **kw):
    """:func:`fvsanity.generate.render` through the cache in ``folder``.

    Args:
        lm, units, seeds: as for ``render`` (seeds explicit).
        folder: where the FVs live (``fv.pt``, ``fv.json``, PNGs if ``pngs``, ``cache_key.json``).
        kw: the other ``render`` options (steps, size, lr, param, decorrelate, transforms,
            diversity, checkpoints; batch_size keyed as the compute width it resolves to;
            device, progress pass through unkeyed; amp, None = automatic as in ``render``, is
            keyed by the dtype it resolves to on the device).

    Returns:
        (FVResult, reused: bool). Reused only if ``folder``'s stored key equals
        :func:`fv_key` of these arguments; otherwise rendered and written.
    """
    from .generate import FVResult, dtype_settings, render
    from .generate.render import fv_batch_width

    keyed = {k: kw[k] for k in ("steps", "size", "lr", "param", "decorrelate", "transforms", "diversity", "checkpoints")
             if k in kw}
    unknown = set(kw) - set(keyed) - {"device", "batch_size", "amp", "progress"}
    if unknown:
        raise TypeError(f"render_cached: unknown render options {sorted(unknown)}")
    folder = Path(folder)
    dev = kw.get("device") or lm.device
    dtype = dtype_settings(kw.get("amp"), dev).get("dtype", "float32")
    width = fv_batch_width(kw.get("batch_size"), dev)
    entry = CacheEntry.folder(folder, fv_key(lm, units, seeds, **keyed, dtype=dtype, fv_batch=width), ("fv.pt", "fv.json"))

    def compute():
        res = render(lm, units, seeds=list(seeds), **kw)
        res.save(folder, pngs=pngs)
        return res

    def load():
        res = FVResult.load(folder)
        # belt and braces (e.g. two runs writing one folder): the payload must say the same
        got = {"model_fingerprint": res.settings.get("model_fingerprint"), "units": _units_json(res.units),
               "seeds": [int(s) for s in res.seeds], "steps": res.settings.get("steps"),
               "dtype": res.settings.get("dtype", "float32")}
        if any(_canonical(v) != _canonical(entry.key.get(k, "float32" if k == "dtype" else None)) for k, v in got.items()):
            raise FVSanityError(f"FVs in {folder} do not match their cache key")
        return res

    return cached(entry, compute, load)
