"""How :func:`fvsanity.generate.render` batches its work: the compute width
(:func:`fv_batch_width`) and fixed-shape chunks of (unit, seed) elements (:func:`plan_chunks`), so
an FV depends on its unit, seed and settings only, never on what it was batched with."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import FVSanityError

__all__ = ["FV_BATCH_CPU", "FV_BATCH_CUDA", "fv_batch_width", "plan_chunks"]


FV_BATCH_CPU = 8
"""Default FV compute width on the CPU: every optimization batch holds exactly this many elements."""
FV_BATCH_CUDA = 32
"""Default FV compute width on an accelerator."""


def fv_batch_width(batch_size: int | None, device) -> int:
    """The FV compute width: ``batch_size`` if given, else :data:`FV_BATCH_CPU` on the CPU and
    :data:`FV_BATCH_CUDA` elsewhere. Never the number of elements in flight, which would make an
    FV depend on what it is rendered beside."""
    if batch_size is not None:
        return int(batch_size)
    return FV_BATCH_CPU if torch.device(device).type == "cpu" else FV_BATCH_CUDA


def plan_chunks(n_rows: int, seeds: Sequence[int], width: int, coupled: bool = False
                ) -> list[list[tuple[int, int, int | None]]]:
    """The optimization batches of a render: each a list of exactly ``width`` elements
    ``(row, seed, j)``, ``j`` indexing ``seeds``, or None for a padding element (rendered, dropped).

    Why fixed shapes: CPU kernels (oneDNN convolutions, the split of work over threads) round
    differently for other batch shapes (measured on ResNet-20: the input gradient of one image
    differs by ~2e-7 between batches of 1, 2 and 3), and an FV's optimization amplifies that to
    another image (objective 25.0 vs 38.8 after 32 steps). At one shape, an element's result does
    not depend on its position or its neighbours (measured bit for bit on ResNet-20 at 32 px and
    SqueezeNet at 227 px; ``tests/test_batch_invariance.py``). So the (row, seed) elements are
    packed in order into batches of ``width``, the last one padded by repeating its last element:
    an FV depends on its row, its seed, the settings and ``width`` alone, never on the other rows,
    the number of seeds, their order, a resume or a rank. ``coupled`` (the diversity term ties a
    row's seeds together): one batch per row, its seeds then padding up to ``width`` (a row with
    more seeds than ``width``: exactly its seeds).
    """
    if width < 1:
        raise FVSanityError(f"FV batch size must be >= 1, got {width}")
    elems = [[(row, int(s), j) for j, s in enumerate(seeds)] for row in range(n_rows)]

    def padded(part):
        return part + [(part[-1][0], part[-1][1], None)] * (width - len(part))

    if coupled:
        return [padded(row) for row in elems]
    flat = [e for row in elems for e in row]
    return [padded(flat[i : i + width]) for i in range(0, len(flat), width)]
