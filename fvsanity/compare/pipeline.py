"""The objects the comparator hands DOWN: resolved units and the natural-image pass.

A check or an audit resolves its units once, at its entry (the CLI command or the top-level
library call), and runs the natural images through the model once per (model fingerprint,
image set, layers); everything below (path statistics, the audit's per-unit step, circuits)
takes these objects and never re-parses a unit spec or re-hooks the model for the same images.

* :func:`resolve_units`: spec strings -> :class:`~fvsanity.units.Unit` (validated against the
  model); Units pass through untouched (they were validated where they were made).
* :class:`NaturalPass`: pooled activations ``{layer: [N, C]}`` of every natural image, the
  responses ``[N, U]`` of the run's units, the labels ``[N]``, the model fingerprint and the
  image set's identity. :func:`natural_pass` builds it, optionally through an on-disk cache whose
  key holds NO unit list (:func:`fvsanity.cache.natural_pass_key`): shards of one sweep with
  different units share one pass; a unit's response is read from the pooled activations when
  they hold it (a channel or direction of a pooled layer), else from a small per-unit-set file.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import FVSanityError

__all__ = ["NaturalPass", "natural_pass", "resolve_units", "NaturalPassMismatch", "response_from_pooled"]


class NaturalPassMismatch(FVSanityError):
    """A :class:`NaturalPass` handed down does not fit the model, images, layers or units asked for."""


def resolve_units(units, lm) -> list:
    """Units for a public entry point: spec strings are parsed and validated once; Unit objects
    pass through as they are (no second validation). ``units``: a spec string (commas allowed),
    a Unit, or a sequence of either. Returns ``list[Unit]``."""
    from ..units import Unit, parse_units

    if isinstance(units, (str, Unit)):
        units = [units]
    out = []
    for u in units:
        out += [u] if isinstance(u, Unit) else parse_units(u, lm)
    return out


def response_from_pooled(acts: dict[str, torch.Tensor], unit, pooling: str = "mean") -> torch.Tensor | None:
    """A unit's response [N] read from mean-pooled activations ``{layer: [N, C]}``, or None when
    they do not hold it (a neuron unit, its layer not pooled, or another pooling).

    Equals :func:`fvsanity.activations.unit_response` on the full output: a channel unit's
    response is its channel mean, a direction unit's the direction times the channel means.
    """
    a = acts.get(unit.layer)
    if pooling != "mean" or a is None or a.ndim != 2 or unit.y is not None:
        return None
    if unit.direction is not None:
        return a @ unit.direction.to(a.dtype)
    return a[:, unit.channel].clone()


@dataclass(frozen=True, eq=False)
class NaturalPass:
    """Every natural image through the model once: what every later step reads.

    Attributes:
        acts: {layer: Tensor [N, C]} spatially pooled activations (CPU float32).
        responses: Tensor [N, U] the response of ``units[j]`` to each image (CPU float32).
        units: the Units whose responses are held (column order of ``responses``).
        labels: Tensor [N] int64 class labels of the images (-1: unknown).
        fingerprint: the model fingerprint (:meth:`LoadedModel.fingerprint`) it was made with.
        images: the image set's identity (:func:`fvsanity.cache.image_set_identity`).
        pooling: how ``acts`` were pooled over space.
        reused: whether the activations were read back from disk.

    Unpacks as ``acts, responses = nat_pass`` (the tuple older code passed around).
    """

    acts: dict[str, torch.Tensor]
    responses: torch.Tensor
    units: tuple = ()
    labels: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    fingerprint: str | None = None
    images: dict = field(default_factory=dict)
    pooling: str = "mean"
    reused: bool = False

    def __iter__(self) -> Iterator:
        yield self.acts
        yield self.responses

    def __len__(self) -> int:
        return int(self.responses.shape[0])

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.acts)

    def response(self, unit) -> torch.Tensor:
        """[N] response of ``unit`` (one of :attr:`units`, matched by its name)."""
        names = [str(u) for u in self.units]
        if str(unit) not in names:
            raise NaturalPassMismatch(f"unit {str(unit)!r} is not in this natural pass; valid: {', '.join(names)}")
        return self.responses[:, names.index(str(unit))]

    def for_units(self, units: Sequence) -> NaturalPass:
        """The same pass restricted to ``units`` (columns of :attr:`responses` picked by name)."""
        cols = torch.stack([self.response(u) for u in units], 1) if units else self.responses[:, :0]
        return NaturalPass(self.acts, cols, tuple(units), self.labels, self.fingerprint, self.images,
                           self.pooling, self.reused)

    def require(self, layers: Sequence[str], n_images: int | None = None) -> None:
        """Refuse (one line) a pass that lacks one of ``layers`` or holds another number of images."""
        missing = [n for n in layers if n not in self.acts]
        if missing:
            raise NaturalPassMismatch(
                f"natural pass has no layer {missing[0]!r}; it holds: {', '.join(self.acts) or 'none'}")
        if n_images is not None and len(self) != n_images:
            raise NaturalPassMismatch(f"natural pass holds {len(self)} images, the natural images are {n_images}")


def natural_pass(
    lm,
    natural,
    layers: Sequence[str],
    units: Sequence = (),
    *,
    batch_size: int = 64,
    device=None,
    progress: bool = False,
    cache_dir: str | Path | None = None,
    pooling: str = "mean",
) -> NaturalPass:
    """Run ``natural`` through ``lm`` once: pooled ``layers`` and the responses of ``units``.

    Args:
        lm: a LoadedModel; natural: :class:`~fvsanity.data.NaturalImages`.
        layers: layers to pool (in forward order); units: resolved Units (strings are parsed).
        batch_size, device, progress: as :func:`fvsanity.activations.collect_with_responses`.
        cache_dir: a folder to reuse the pass from: ``natural_pass.safetensors`` keyed by
            :func:`fvsanity.cache.natural_pass_key` (model fingerprint, images, layers, pooling;
            no units), plus ``natural_responses-<digest>.safetensors`` for units whose response
            the pooled activations do not hold (neurons, layers not pooled), keyed with them.
        pooling: ``mean`` (the path check's) or ``max``.

    Returns:
        :class:`NaturalPass`.
    """
    from .. import activations
    from ..cache import image_set_identity

    units = tuple(resolve_units(list(units), lm)) if units else ()
    layers = list(layers)
    fp = lm.fingerprint()
    ident = image_set_identity(natural)
    labels = getattr(natural, "labels", None)
    labels = labels if isinstance(labels, torch.Tensor) else torch.full((len(natural),), -1, dtype=torch.long)

    def run(lays, us):
        return activations.collect_with_responses(lm, natural, lays, list(us), pooling, batch_size, device, progress)

    def derive(acts):
        return [response_from_pooled(acts, u, pooling) for u in units]

    def assemble(acts, resp, reused: bool) -> NaturalPass:
        return NaturalPass(acts, resp, units, labels, fp, ident, pooling, reused)

    if cache_dir is None:
        acts, resp = run(layers, units)
        return assemble(acts, resp, False)

    cache_dir = Path(cache_dir)
    with _file_lock(cache_dir / "natural_pass.lock"):  # processes sharing cache_dir: one computes, the rest read
        return _cached_pass(lm, natural, layers, units, cache_dir, pooling, run, derive, assemble, batch_size)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (``fcntl.flock``; held until the block ends, released
    by the OS if the process dies). Where ``fcntl`` is missing (Windows) no lock is taken."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _cached_pass(lm, natural, layers, units, cache_dir: Path, pooling, run, derive, assemble,
                 batch_size: int | None = None) -> NaturalPass:
    """:func:`natural_pass` through the on-disk cache in ``cache_dir`` (called under its lock).

    ``run(layers, units) -> (acts, responses)`` computes, ``derive(acts)`` reads each unit's
    response from pooled activations (None where it cannot), ``assemble(acts, responses,
    reused)`` makes the :class:`NaturalPass`."""
    from ..cache import CacheEntry, _units_json, cached, key_digest, natural_pass_key
    from ..io import atomic_save_tensors, load_tensors

    p = cache_dir / "natural_pass.safetensors"
    entry = CacheEntry.file(p, natural_pass_key(lm, natural, layers, pooling=pooling, batch_size=batch_size))
    fresh: dict = {}

    def compute():
        # one forward for the activations and every response (derived ones included: same numbers)
        acts, resp = run(layers, units)
        atomic_save_tensors(p, {f"act:{k}": v for k, v in acts.items()})
        fresh["resp"] = resp
        return acts

    def load():
        t = load_tensors(p)
        return {name: t[f"act:{name}"] for name in layers}  # in forward order (the file sorts its keys)

    acts, reused = cached(entry, compute, load)
    if "resp" in fresh or not units:
        resp = fresh.get("resp", torch.empty(len(natural), 0))
        extra = [j for j, r in enumerate(derive(acts)) if r is None]
    else:
        cols = derive(acts)
        extra = [j for j, r in enumerate(cols) if r is None]
        resp = torch.stack([c if c is not None else torch.empty(len(natural)) for c in cols], 1)
    if extra:  # units the pooled activations do not hold: their own small entry, keyed with them
        key = {"kind": "natural_responses", "pass": entry.digest, "units": _units_json([units[j] for j in extra])}
        q = cache_dir / f"natural_responses-{key_digest(key)[:12]}.safetensors"
        r_entry = CacheEntry.file(q, key)
        have = resp[:, extra] if "resp" in fresh else None

        def r_compute():
            r = have if have is not None else run([], [units[j] for j in extra])[1]
            atomic_save_tensors(q, {"responses": r.contiguous()})
            return r

        r = cached(r_entry, r_compute, lambda: load_tensors(q)["responses"])[0]
        resp[:, extra] = r
    return assemble(acts, resp, reused)
