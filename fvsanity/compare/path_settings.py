"""The path check's settings, :class:`PathCheckSettings` (see :mod:`fvsanity.compare.path`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..settings import setting
from .path_common import MAX_RESAMPLES, _metric_choices

__all__ = ["PathCheckSettings"]


@dataclass(frozen=True)
class PathCheckSettings:
    """Every setting of the path-similarity check that changes its numbers.

    Attributes:
        metric: vector metric for the per-unit curves (``spearman``, ``pearson``, ``cosine``:
            the metrics of the ``unpaired`` design).
        layers: layers to compare (None: ``lm.path_to(unit.layer)`` per unit).
        top_k: exemplars per unit added to its natural references (0: class images only).
        n_other: other natural images per unit (the lower reference and the permutation pool).
        use_class_images: add the images of the unit's class (class units, labelled data).
        n_boot, n_perm, alpha, confidence: bootstrap size, permutations, test level, interval level.
        paired_metrics: representation metrics for the paired design across units (U >= 4;
            metrics of the ``paired`` design).
        seed: base seed; each unit's random choices use :func:`unit_seed` (seed, unit name).
        batch_size: images per forward pass (no effect on the numbers).
    """

    metric: str = setting("spearman", choices=lambda: _metric_choices("unpaired") + _metric_choices("paired"),
                          help="a per-unit (unpaired) metric for the curves (paper: spearman), or a paired-design "
                               "metric compared across >= 4 units, with spearman per unit")
    layers: tuple[str, ...] | None = setting(None, parse="names", default_text="the unit's block path",
                                             help="comma-separated layers to compare")
    top_k: int = setting(10, bounds=(0, None), help="top-k natural exemplars per unit")
    n_other: int = setting(200, bounds=(1, None), help="other natural images per unit")
    use_class_images: bool = setting(True, flag="--no-class-images", help="natural refs = top-k exemplars only")
    n_boot: int = setting(1000, bounds=(0, MAX_RESAMPLES), help="bootstrap resamples (0: no intervals)")
    n_perm: int = setting(1000, bounds=(1, MAX_RESAMPLES), help="image permutations")
    alpha: float = setting(0.05, help="level of each kind of claim (natural-like, diverges) across the layers, in (0, 0.5)")
    confidence: float = 0.95
    paired_metrics: tuple[str, ...] = setting(("cka", "rsa"), choices=lambda: _metric_choices("paired"),
                                              help="paired-design metrics compared across >= 4 units")
    seed: int = setting(0, from_flag="seed")
    batch_size: int = setting(64, bounds=(1, None), help="images per forward pass")

    def __post_init__(self):
        from ..errors import SettingError

        if not (isinstance(self.alpha, (int, float)) and 0 < self.alpha < 0.5):  # the verdict's claims need it
            raise SettingError("alpha", f"must be in (0, 0.5), got {self.alpha!r}")
        object.__setattr__(self, "paired_metrics", tuple(self.paired_metrics))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers) or None)

    @classmethod
    def from_kwargs(cls, settings: PathCheckSettings | None = None, **kw) -> PathCheckSettings:
        """``settings`` (default: the defaults) with the given fields replaced; an unknown name is
        a TypeError naming the valid ones (the old keyword calls of :func:`path_check`)."""
        import dataclasses

        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(kw) - names)
        if bad:
            raise TypeError(f"unknown path-check setting {bad[0]!r}; valid: {', '.join(sorted(names))}")
        return dataclasses.replace(settings or cls(), **kw)

    def to_json(self) -> dict:
        from dataclasses import asdict

        d = asdict(self)
        d["paired_metrics"] = list(self.paired_metrics)
        d["layers"] = list(self.layers) if self.layers else None
        return d
