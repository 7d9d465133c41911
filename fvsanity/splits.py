"""Three-way splits (tuning / building / evaluation) of images and units, disjoint by construction.

An experiment that reports held-out numbers needs three roles, and no item may serve two:

- **tuning**: what settings (thresholds, margins, offsets, checkpoints) are chosen by looking at
  results on;
- **building**: what the manipulated model or detector is trained and calibrated on (no result
  on it is used to choose anything);
- **evaluation**: only measured, once the settings are fixed.

:func:`three_way_split` draws a fresh split of ``range(n)``. :func:`split_with_tuning` is for the
common honest case where settings were already chosen by looking at some images (an earlier
"held-out" half): those images *are* the tuning split, and the rest is divided into building and
evaluation. :func:`unit_split` picks evaluation units among candidates, avoiding every unit whose
results informed a setting. All randomness comes from a ``torch.Generator`` seeded with ``seed``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .errors import FVSanityError

__all__ = ["ROLES", "Split", "SplitError", "UnitSplit", "split_with_tuning", "three_way_split", "unit_split"]


class SplitError(FVSanityError, ValueError):
    """A split that cannot be made as asked (bad fractions, too few items, overlapping roles)."""


def _digest(idx: torch.Tensor) -> str:
    """First 16 hex digits of the sha256 of the comma-joined indices (to compare splits in JSON)."""
    return hashlib.sha256(",".join(str(int(i)) for i in idx.tolist()).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Split:
    """Indices into ``range(n)`` for the three roles: sorted ``[k]`` int64 tensors, pairwise disjoint.

    ``seed`` is the generator seed the split was drawn with; ``how`` says how (for results files).
    """

    tuning: torch.Tensor
    building: torch.Tensor
    evaluation: torch.Tensor
    n: int
    seed: int
    how: str

    def __post_init__(self) -> None:
        parts = {"tuning": self.tuning, "building": self.building, "evaluation": self.evaluation}
        seen = torch.zeros(self.n, dtype=torch.long)
        for name, idx in parts.items():
            if idx.dtype != torch.long or idx.dim() != 1:
                raise SplitError(f"{name} indices must be a 1-D int64 tensor, got {idx.dtype} of shape {tuple(idx.shape)}")
            if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= self.n):
                raise SplitError(f"{name} indices must lie in 0..{self.n - 1}")
            seen.index_add_(0, idx, torch.ones_like(idx))
        if self.n and int(seen.max()) > 1:
            raise SplitError(f"split roles overlap on {int((seen > 1).sum())} item(s); each item may serve one role")

    def sizes(self) -> dict[str, int]:
        """``{"tuning": k_t, "building": k_b, "evaluation": k_e}``."""
        return {"tuning": len(self.tuning), "building": len(self.building), "evaluation": len(self.evaluation)}

    def to_json(self) -> dict:
        """Sizes, seed, how it was drawn, and a digest of each role's indices."""
        return {
            "n": self.n, "seed": self.seed, "how": self.how, "sizes": self.sizes(),
            "sha256_16": {k: _digest(getattr(self, k)) for k in ("tuning", "building", "evaluation")},
        }


def _counts(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    if len(fractions) != 3 or any(not (0.0 <= float(f) <= 1.0) for f in fractions):
        raise SplitError(f"fractions must be three numbers in [0, 1] (tuning, building, evaluation), got {list(fractions)}")
    if abs(sum(float(f) for f in fractions) - 1.0) > 1e-6:
        raise SplitError(f"fractions must sum to 1, got {list(fractions)} (sum {sum(fractions):g})")
    k_t = int(round(float(fractions[0]) * n))
    k_b = min(n - k_t, int(round(float(fractions[1]) * n)))
    return k_t, k_b, n - k_t - k_b


ROLES = ("tuning", "building", "evaluation")


def three_way_split(n: int, fractions: Sequence[float] = (0.5, 0.25, 0.25), seed: int = 0,
                    order: Sequence[str] = ROLES) -> Split:
    """A fresh seeded split of ``range(n)`` into tuning, building and evaluation.

    Args:
        n: number of items (>= 0).
        fractions: (tuning, building, evaluation), each in [0, 1], summing to 1; sizes are
            ``round(f_t*n)``, ``round(f_b*n)`` and the rest.
        seed: seeds the ``torch.Generator`` of one ``randperm(n)``: its first part is tuning, the
            next building, the rest evaluation (each returned sorted).
        order: the roles of the permutation's consecutive parts (each part sized by its role's
            fraction). The default is tuning, building, evaluation. Another order re-deals the same
            seeded parts: with ``("tuning", "evaluation", "building")`` and equal building and
            evaluation fractions, the new evaluation split is the default order's building split
            (images a model was trained on but nothing was ever measured on).
    """
    if int(n) < 0:
        raise SplitError(f"n must be >= 0, got {n}")
    order = tuple(order)
    if sorted(order) != sorted(ROLES):
        raise SplitError(f"order must name each of {list(ROLES)} once, got {list(order)}")
    k_t, k_b, _ = _counts(int(n), fractions)
    size = {"tuning": k_t, "building": k_b, "evaluation": int(n) - k_t - k_b}
    perm = torch.randperm(int(n), generator=torch.Generator().manual_seed(int(seed)))
    parts, at = {}, 0
    for role in order:
        parts[role] = perm[at:at + size[role]].sort().values
        at += size[role]
    how = f"three_way_split(fractions={[float(f) for f in fractions]})"
    if order != ROLES:
        how = f"three_way_split(fractions={[float(f) for f in fractions]}, order={list(order)})"
    return Split(parts["tuning"], parts["building"], parts["evaluation"], int(n), int(seed), how)


def split_with_tuning(n: int, tuning: torch.Tensor | Sequence[int], evaluation_fraction: float = 0.5, seed: int = 0) -> Split:
    """Keep ``tuning`` (items results were already looked at) and divide the rest into building/evaluation.

    Use it when settings were chosen by looking at results on some items: those items can no
    longer be held out, so they become the tuning split, and only items that nothing was chosen on
    are left for evaluation.

    Args:
        n: number of items.
        tuning: ``[k]`` distinct indices in ``range(n)`` that settings were chosen on.
        evaluation_fraction: share of the remaining ``n - k`` items for evaluation (in (0, 1));
            ``round(evaluation_fraction * (n - k))`` items, the rest is building.
        seed: seeds the ``torch.Generator`` of one ``randperm`` over the remaining items (in
            ascending order); its first part is evaluation, the rest building.
    """
    t = torch.as_tensor(tuning, dtype=torch.long).flatten()
    if len(t) and (int(t.min()) < 0 or int(t.max()) >= int(n)):
        raise SplitError(f"tuning indices must lie in 0..{int(n) - 1}")
    if len(torch.unique(t)) != len(t):
        raise SplitError("tuning indices contain duplicates")
    if not 0.0 < float(evaluation_fraction) < 1.0:
        raise SplitError(f"evaluation_fraction must be in (0, 1), got {evaluation_fraction}")
    mask = torch.ones(int(n), dtype=torch.bool)
    mask[t] = False
    rest = torch.nonzero(mask).flatten()
    perm = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(int(seed)))]
    k_e = int(round(float(evaluation_fraction) * len(rest)))
    if len(rest) and (k_e == 0 or k_e == len(rest)):
        raise SplitError(f"{len(rest)} untouched item(s) cannot give both a building and an evaluation part "
                         f"with evaluation_fraction={evaluation_fraction}")
    return Split(t.sort().values, perm[k_e:].sort().values, perm[:k_e].sort().values, int(n), int(seed),
                 f"split_with_tuning(evaluation_fraction={float(evaluation_fraction)})")


@dataclass(frozen=True)
class UnitSplit:
    """Units (``"layer:channel"`` strings) whose results informed settings, and units only measured."""

    tuning: tuple[str, ...]
    evaluation: tuple[str, ...]
    seed: int

    def to_json(self) -> dict:
        return {"tuning": list(self.tuning), "evaluation": list(self.evaluation), "seed": self.seed}


def unit_split(candidates: Sequence[str], tuning: Iterable[str], n_evaluation: int, seed: int = 0) -> UnitSplit:
    """Pick ``n_evaluation`` evaluation units among ``candidates`` that are not in ``tuning``.

    Args:
        candidates: distinct unit strings to pick from (e.g. every class unit of the output layer).
        tuning: units whose results informed a setting (a sweep's units, units evaluated while the
            settings were chosen); they may lie outside ``candidates``.
        n_evaluation: how many to pick (1 .. the number of candidates not in ``tuning``).
        seed: seeds the ``torch.Generator`` of one ``randperm`` over the free candidates (in the
            given order); the first ``n_evaluation`` are returned in the order of ``candidates``.
    """
    cands = [str(c) for c in candidates]
    if len(set(cands)) != len(cands):
        raise SplitError("candidate units contain duplicates")
    tune = tuple(dict.fromkeys(str(u) for u in tuning))
    free = [c for c in cands if c not in set(tune)]
    if not 1 <= int(n_evaluation) <= len(free):
        raise SplitError(f"n_evaluation must be in 1..{len(free)} ({len(cands)} candidates, "
                         f"{len(cands) - len(free)} of them used for tuning), got {n_evaluation}")
    order = torch.randperm(len(free), generator=torch.Generator().manual_seed(int(seed)))[: int(n_evaluation)]
    return UnitSplit(tune, tuple(free[i] for i in order.sort().values.tolist()), int(seed))
