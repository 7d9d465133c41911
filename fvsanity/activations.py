"""Layer activations of many images, streamed batch by batch under hooks that remove themselves.

``collect(lm, images, layers)`` runs the model once per batch inside :func:`pooled_capture`:
each hooked layer's output is pooled over space inside its hook (the full map is dropped right
there) and the forward stops after the deepest layer asked for. Only the pooled ``[N, C]`` rows
are kept, so memory is bounded by one batch of the model's own forward temporaries plus the
pooled result, whatever N is and however many layers are hooked.
``top_k_exemplars`` finds a unit's most exciting natural images the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import DataError, FVSanityError
from .hooks import StopForward, hooked, run_partial
from .layouts import Layout, infer_layout, unit_values
from .layouts import pool as _layout_pool
from .units import Unit, parse_unit

POOLS = ("mean", "max", None)

__all__ = [
    "collect",
    "collect_with_responses",
    "iter_batches",
    "pad_batch",
    "pooled_capture",
    "PooledStore",
    "run_pooled",
    "unit_response",
    "unit_values",
    "top_k_exemplars",
    "pool_activation",
    "release_freed_memory",
    "POOLS",
]


def pool_activation(act: torch.Tensor, pool: str | None, layout: Layout | None = None) -> torch.Tensor:
    """Pool a layer output to [B, C] (``mean`` / ``max``; ``None`` -> unchanged).

    Goes through :func:`fvsanity.layouts.pool`: conv [B, C, *space] over space, tokens [B, N, D]
    over the patch tokens, vector [B, C] as is. ``layout`` None reads channel dim 1.
    """
    if pool not in POOLS:
        raise FVSanityError(f"unknown pool {pool!r}; valid: mean, max, None")
    if pool is None:
        return act
    return _layout_pool(act, layout, pool)


def unit_response(act: torch.Tensor, unit: Unit, layout: Layout | None = None) -> torch.Tensor:
    """Deprecated name of :func:`fvsanity.layouts.unit_values`: a unit's value per image, [B]."""
    return unit_values(act, unit, layout)


def iter_batches(images, batch_size: int) -> Iterable[torch.Tensor]:
    """Batches [B, 3, H, W] of ``images``: a Tensor [N, 3, H, W], NaturalImages (decoded batch by
    batch), or any iterable of batches (returned as it is)."""
    from .data import NaturalImages

    if isinstance(images, NaturalImages):
        return images.batches(batch_size)
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise DataError(f"expected images [N, 3, H, W], got shape {tuple(images.shape)}")
        return (images[s : s + batch_size] for s in range(0, images.shape[0], batch_size))
    return images  # any iterable of [B, 3, H, W] tensors


_iter_batches = iter_batches  # deprecated private name


def pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` [B, ...] with its last row repeated up to ``size`` rows (B >= size: ``x`` as it is).

    Why: CPU kernels round differently for other batch shapes, so a forward of the same image in
    a batch of 5 and in a batch of 64 can differ in the last bits; padding every batch to one size
    makes an image's numbers independent of the images that happen to share its batch (the last
    batch of a folder, a ``--limit``, a resumed run)."""
    b = x.shape[0]
    if b >= size or b == 0:
        return x
    return torch.cat([x, x[-1:].expand(size - b, *x.shape[1:])])


@dataclass
class PooledStore:
    """What :func:`pooled_capture` fills on each forward.

    Attributes:
        pooled: {layer: pooled output [B, C]} (full output [B, C, H, W] if pool is None).
        responses: {j: Tensor [B]} response of ``units[j]``.
        seen: layers whose hook ran in the current forward.
    """

    pooled: dict[str, torch.Tensor] = field(default_factory=dict)
    responses: dict[int, torch.Tensor] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)

    def clear(self) -> None:
        self.pooled.clear()
        self.responses.clear()
        self.seen.clear()


@contextlib.contextmanager
def pooled_capture(
    model: nn.Module,
    layers: Sequence[str],
    units: Sequence[Unit] = (),
    pool: str | None = "mean",
    layouts: dict[str, Layout] | None = None,
) -> Iterator[PooledStore]:
    """Hooks that pool each layer's output AS IT IS PRODUCED and stop the forward early.

    Yields a :class:`PooledStore` refilled on every forward run with :func:`run_pooled`. Only
    pooled tensors (and unit responses) are kept, so each layer's full output is freed as the
    forward goes on (:func:`fvsanity.hooks.capture` would hold every hooked layer's full output
    at once). The forward raises :class:`~fvsanity.hooks.StopForward` once every needed layer has
    run. Hooks are removed in ``finally``, also when the forward raises.

    ``layouts``: {layer: Layout} (e.g. from ``LoadedModel.layer_info``); a layer not in it gets
    :func:`fvsanity.layouts.infer_layout` from its first output.
    """
    if pool not in POOLS:
        raise FVSanityError(f"unknown pool {pool!r}; valid: mean, max, None")
    store = PooledStore()
    want = set(layers)
    units_at: dict[str, list[tuple[int, Unit]]] = {}
    for j, u in enumerate(units):
        units_at.setdefault(u.layer, []).append((j, u))
    need = want | set(units_at)
    known = dict(layouts or {})

    def make(name):
        def hook(_m, _inp, out):
            if isinstance(out, (tuple, list)):
                out = out[0]
            out = out.detach()
            lay = known.get(name)
            if lay is None:
                lay = known[name] = infer_layout(model, name, tuple(out.shape[1:]))
            if name in want:
                store.pooled[name] = pool_activation(out, pool, lay)
            for j, u in units_at.get(name, ()):
                store.responses[j] = unit_values(out, u, lay)
            store.seen.add(name)
            if store.seen >= need:
                raise StopForward

        return hook

    with hooked(model, [(name, make(name)) for name in need]):
        yield store


def run_pooled(model: nn.Module, x: torch.Tensor, store: PooledStore) -> PooledStore:
    """One forward of model input ``x`` inside :func:`pooled_capture` (swallows the early stop)."""
    return run_partial(model, x, store)


_LIBC = None


def release_freed_memory() -> bool:
    """Ask glibc to give freed heap memory back to the OS (``malloc_trim(0)``); False elsewhere.

    Why: with glibc's dynamic mmap threshold, a batch's large forward temporaries end up on the
    brk heap; small long-lived allocations made between batches pin it, and the resident size
    grows by up to one batch of temporaries per batch (measured on SqueezeNet, 16 images per
    batch: +47 MiB per batch, 1.7 GiB after 20 batches; with this call after each batch: flat).
    Returns whether the call was made. Frees nothing that is in use.
    """
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            lib = ctypes.CDLL("libc.so.6")
            _LIBC = lib if hasattr(lib, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if _LIBC is False:
        return False
    _LIBC.malloc_trim(0)
    return True


def _known_length(images) -> int | None:
    from .data import NaturalImages

    if isinstance(images, (NaturalImages, torch.Tensor)):
        return len(images)
    return None


class _Sink:
    """Collects pooled rows. With N known and pooling on, the [N, C] outputs are allocated ONCE,
    before the first forward (channel counts from the cached layer shapes), and filled in place.

    Why: small long-lived tensors allocated between batches land on top of the C heap above the
    freed forward temporaries, so glibc cannot give that memory back and the resident size grows
    by about one batch of temporaries per batch (measured: +47 MiB per batch of 16 on SqueezeNet).
    Preallocated outputs keep the peak flat. Unknown N (a generic iterable) or ``pool=None``: rows
    are appended to lists and concatenated at the end.
    """

    def __init__(self, lm, layers: list[str], n_units: int, pool, n_total: int | None):
        self.layers = layers
        self.n_units = n_units
        self.n = 0
        self.pre: dict[str, torch.Tensor] | None = None
        self.resp_pre: torch.Tensor | None = None
        self.lists: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
        self.resp_list: list[torch.Tensor] = []
        if n_total is not None and pool is not None:
            infos = lm.layers
            if all(name in infos for name in layers):
                self.pre = {name: torch.empty(n_total, infos[name].layout.channels) for name in layers}
                self.resp_pre = torch.empty(n_total, n_units)

    def add(self, store: PooledStore, b: int) -> None:
        """Take the first ``b`` rows of the store (the rest are the padding of a short batch)."""
        s = self.n
        if self.pre is not None:
            for name in self.layers:
                self.pre[name][s : s + b] = store.pooled[name][:b]
            for j in range(self.n_units):
                self.resp_pre[s : s + b, j] = store.responses[j][:b]
        else:
            for name in self.layers:
                self.lists[name].append(store.pooled[name][:b].float().cpu())
            if self.n_units:
                self.resp_list.append(torch.stack([store.responses[j][:b] for j in range(self.n_units)], 1).float().cpu())
        self.n += b

    def result(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if self.pre is not None:
            return {k: v[: self.n] for k, v in self.pre.items()}, self.resp_pre[: self.n]
        acts = {name: torch.cat(c) for name, c in self.lists.items()}
        return acts, (torch.cat(self.resp_list) if self.n_units else torch.empty(self.n, 0))


def _refuse_non_finite(store: PooledStore, n: int, start: int, images) -> None:
    """Raise :class:`~fvsanity.errors.DataError` naming the first image (index, and file when
    known) whose pooled activations or unit responses are NaN or infinite."""
    for name, t in list(store.pooled.items()) + [(f"unit {j}", r) for j, r in store.responses.items()]:
        ok = torch.isfinite(t[:n].reshape(n, -1)).all(1)
        if not bool(ok.all()):
            i = start + int((~ok).nonzero()[0])
            paths = getattr(images, "paths", ())
            where = f" ({paths[i]})" if i < len(paths) and paths[i] else ""
            raise DataError(f"image {i}{where} gives non-finite (NaN/inf) activations at {name}; "
                            "the model or its weights produce NaN on it")


def collect_with_responses(
    lm,
    images,
    layers: Sequence[str],
    units: Sequence[Unit | str] = (),
    pool: str | None = "mean",
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = False,
    trim_memory: bool = True,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One streamed pass: pooled activations of ``layers`` and the responses of ``units``.

    Memory: one batch of the model's own forward temporaries plus the pooled rows; the full
    output of a hooked layer is pooled and dropped inside its hook.

    Args:
        lm: a LoadedModel.
        images: Tensor [N, 3, H, W] RGB in [0, 1], :class:`~fvsanity.data.NaturalImages`, or an
            iterable of such batches.
        layers: dotted layer names.
        units: units whose scalar response (:func:`fvsanity.layouts.unit_values`) is recorded per image.
        pool: ``mean`` | ``max`` over space (over patch tokens for a token layout), or None to
            keep full outputs (memory grows with N).
        batch_size: images per forward pass. Every pass has exactly this many (a short batch is
            padded by repeating its last image, see :func:`pad_batch`), so an image's numbers do
            not depend on how many images come with it; they may differ in the last bits between
            batch sizes (kernels round differently for other shapes).
        device: where to run (default: the model's device).
        progress: show a tqdm bar.
        trim_memory: after each batch, return freed heap memory to the OS
            (:func:`release_freed_memory`; keeps the resident size flat with glibc).

    Returns:
        ({layer: Tensor [N, C] (or the full [N, ...] output when pool is None)} on CPU float32,
        Tensor [N, len(units)] of unit responses on CPU float32).
    """
    if pool not in POOLS:
        raise FVSanityError(f"unknown pool {pool!r}; valid: mean, max, None")
    units = [parse_unit(u, lm) if isinstance(u, str) else u for u in units]
    layers = list(layers)
    dev = torch.device(device) if device is not None else lm.device
    if not layers and not units:
        raise FVSanityError("no layers to collect; pass layers=[...] (see `fvsanity layers MODEL`)")
    need = set(layers) | {u.layer for u in units}
    n_total = _known_length(images)
    sink = _Sink(lm, layers, len(units), pool, n_total)
    batches = iter_batches(images, batch_size)
    if progress:
        from .progress import progress_bar

        batches = progress_bar(batches, desc="activations", unit="batch")
    layouts = {name: lm.layer_info(name).layout for name in need}
    with torch.no_grad(), pooled_capture(lm.model, layers, units, pool, layouts) as store:
        for x in batches:
            n = x.shape[0]
            run_pooled(lm.model, lm.preprocess(pad_batch(x, batch_size).to(dev, torch.float32)), store)
            missing = sorted(need - store.seen)
            if missing:
                raise FVSanityError(f"layer {missing[0]!r} did not run in the forward pass")
            _refuse_non_finite(store, n, sink.n, images)
            sink.add(store, n)
            if trim_memory:
                release_freed_memory()
    if sink.n == 0:
        raise DataError("no images to collect activations from (empty input)")
    acts, responses_t = sink.result()
    return acts, responses_t


def collect(
    lm,
    images,
    layers: Sequence[str],
    pool: str | None = "mean",
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Pooled activations ``{layer: Tensor [N, C]}`` of ``images`` (see :func:`collect_with_responses`).

    ``images``: Tensor [N, 3, H, W] RGB in [0, 1], NaturalImages, or an iterable of batches.
    With ``pool=None`` the full maps [N, C, H, W] are kept (memory then grows with N).
    """
    if not layers:
        raise FVSanityError("no layers to collect; pass layers=[...] (see `fvsanity layers MODEL`)")
    return collect_with_responses(lm, images, layers, (), pool, batch_size, device, progress)[0]


def top_k_exemplars(
    lm,
    unit: Unit | str,
    images,
    k: int,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    responses: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` images that excite ``unit`` most.

    Args:
        responses: precomputed responses [N] (skips the forward passes).

    Returns:
        (indices [k] int64 into ``images``, values [k] float32), highest first; ties go to the
        lower index.
    """
    if responses is None:
        unit = parse_unit(unit, lm) if isinstance(unit, str) else unit
        responses = collect_with_responses(lm, images, [], [unit], None, batch_size, device)[1][:, 0]
    n = responses.numel()
    if not 1 <= k <= n:
        raise FVSanityError(f"top-k k={k} out of range for {n} images; valid: 1..{n}")
    order = torch.sort(responses.flatten(), descending=True, stable=True).indices[:k]
    return order, responses.flatten()[order]
