"""The sanity check as a library call: :func:`check` renders (or takes) the units' FVs, runs the
natural images through the model once, and compares, layer by layer along each unit's path, the
FVs with the unit's natural references (:func:`fvsanity.compare.path.path_check`), optionally
with circuits (:func:`unit_circuits`) and a calibrated manipulation score. ``fvsanity check``,
``fvsanity audit`` and the fooling closed loop all call into here, so the same unit, model,
images and seeds give the same numbers whichever way it is checked.

    report = fvsanity.check(lm, ["layer3.2:5", "linear:3"], "path/to/images")
    report.trusted(), report.flagged(), report.save("runs/check")
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .compare.path import PathCheckSettings
from .errors import FVSanityError, SettingError
from .generate.render import RenderSettings
from .settings import replace_flat, setting

__all__ = ["CheckReport", "CheckSettings", "FVSettings", "seeds_needed", "CircuitCheckSettings", "check", "circuit_references", "unit_circuits"]


@dataclass(frozen=True)
class CircuitCheckSettings:
    """The FV-vs-natural circuit comparison (:func:`fvsanity.compare.circuits.circuit_overlap`).

    Attributes:
        circuits: compare circuits at all (edge attribution; slower).
        circuit_images: natural reference images (top exemplars first, then class images) and as
            many unrelated images per unit.
        circuit_steps: EAP-IG integration steps.
        circuit_splits: random splits of the groups each statistic averages over.
    """

    circuits: bool = setting(False, help="also compare FV and natural circuits (edge attribution; slower)")
    circuit_images: int = setting(16, bounds=(2, None),
                                  help="natural (and other) images per unit for the circuit comparison")
    circuit_steps: int = setting(8, bounds=(1, None), help="EAP-IG steps for the circuits")
    circuit_splits: int = setting(20, bounds=(1, None), help="random splits each circuit statistic averages over")


#: render fields a check or audit passes on (and hashes); the others must keep their defaults
CHECK_RENDER_FIELDS = ("steps", "size", "lr", "param", "transforms", "diversity")
_RENDER_EXCLUDED = tuple(f.name for f in dataclasses.fields(RenderSettings) if f.name not in CHECK_RENDER_FIELDS)


def seeds_needed(n_layers: int, alpha: float = 0.05) -> int:
    """The fewest FV seeds with which both of the verdict's claims are reachable on a path of
    ``n_layers`` layers: "natural-like" (sign-flip test along the path, fixed sequence) and
    "diverges" (Holm over the layers); 2^-S is the smallest p S seeds attain, so e.g. 5 for one
    layer, 8 for 11 (:func:`fvsanity.compare.verdict.replicates_needed`)."""
    from .compare.verdict import replicates_needed

    nat = replicates_needed(alpha, correction="fixed-sequence")
    div = replicates_needed(alpha, n_layers=max(1, int(n_layers)), correction="holm")
    return max(n for n in (nat, div, 1) if n is not None)


@dataclass(frozen=True)
class FVSettings:
    """A set of FVs: how many per unit, from which base seed, rendered how.

    Attributes:
        seed: the base seed: FV seeds are ``seed .. seed + seeds - 1``.
        seeds: FVs per unit (a check's replicates); None: automatic, :func:`seeds_needed` for the
            units' paths (:meth:`resolved`), so both claims are reachable.
        render: how each FV is rendered (:class:`~fvsanity.generate.RenderSettings`).
    """

    seed: int = setting(0, from_flag="seed")
    seeds: int | None = setting(None, type=int, bounds=(1, None),
                                default_text="auto: enough that natural-like and diverges are both reachable on "
                                             "the units' paths, e.g. 8 on ResNet-20's 11 layers",
                                help="FVs (seeds) per unit: a check's replicates")
    render: RenderSettings = setting(default_factory=RenderSettings)

    def __post_init__(self):
        from .errors import check_number

        if self.seeds is not None:
            check_number("seeds", self.seeds, integer=True, ge=1)

    @property
    def fv_seeds(self) -> list[int]:
        if self.seeds is None:
            raise FVSanityError("seeds is automatic until resolved for the units (FVSettings.resolved)")
        return [self.seed + i for i in range(self.seeds)]

    def resolved(self, lm, units, layers=None, alpha: float = 0.05):
        """These settings with an automatic ``seeds`` (None) replaced by :func:`seeds_needed` for
        the longest comparison path of ``units`` (``layers`` if given, else each unit's block path)."""
        if self.seeds is not None:
            return self
        n = max((len(layers) if layers else len(lm.path_to(u.layer)) for u in units), default=1)
        return dataclasses.replace(self, seeds=seeds_needed(n, alpha))

    @classmethod
    def of(cls, settings=None, **kw):
        """``settings`` (default: the defaults) with fields replaced by their plain names,
        wherever they live: ``CheckSettings.of(steps=64, seeds=5, top_k=3)``."""
        return replace_flat(settings if settings is not None else cls(), **kw)


@dataclass(frozen=True)
class CheckSettings(FVSettings):
    """Every setting of a check: the FVs (:class:`FVSettings`: ``seed``, ``seeds``, ``render``)
    and how they are compared.

    Attributes:
        render: as in :class:`FVSettings`, but a check passes on only steps, size, lr, param,
            transforms and diversity (the other render fields keep their defaults).
        path: the path-similarity check (``path.seed`` follows ``seed``); a paired-design
            ``path.metric`` (cka, rsa) means the paired design across units with spearman per unit.
        circuits: the circuit comparison.
    """

    render: RenderSettings = setting(default_factory=RenderSettings, exclude=_RENDER_EXCLUDED)
    path: PathCheckSettings = setting(default_factory=PathCheckSettings)
    circuits: CircuitCheckSettings = setting(default_factory=CircuitCheckSettings)

    def __post_init__(self):
        super().__post_init__()
        if self.path.seed != self.seed:  # one base seed: the path check's follows it
            object.__setattr__(self, "path", dataclasses.replace(self.path, seed=self.seed))
        default = RenderSettings()
        for name in _RENDER_EXCLUDED:
            if name not in ("device", "progress") and getattr(self.render, name) != getattr(default, name):
                raise SettingError(f"render.{name}", f"is not used by a check or audit (only "
                                   f"{', '.join(CHECK_RENDER_FIELDS)}); render the FVs yourself and pass them")

    def resolved(self, lm, units, layers=None, alpha=None):
        """:meth:`FVSettings.resolved` on this check's comparison layers and alpha."""
        layers = layers if layers is not None else self.path.layers
        return super().resolved(lm, units, layers, self.path.alpha if alpha is None else alpha)

    def render_kwargs(self) -> dict:
        """The render options a check passes on (:func:`fvsanity.generate.render` / the cache)."""
        return {name: getattr(self.render, name) for name in CHECK_RENDER_FIELDS}

    def design(self) -> tuple[str, tuple[str, ...]]:
        """(per-unit metric, paired metrics): a paired-design ``path.metric`` becomes the paired
        design with spearman per unit."""
        from .compare.path import validate_metrics
        from .compare.similarity import metric_info

        metric = self.path.metric
        if "paired" in metric_info(metric).designs:
            per_unit, paired = "spearman", (metric,)
        else:
            per_unit, paired = metric, tuple(self.path.paired_metrics)
        validate_metrics(per_unit, paired)
        return per_unit, paired


# ------------------------------------------------------------------------------ circuits
def circuit_references(natural, up, unit, settings: CircuitCheckSettings, seed: int):
    """(natural reference indices, other indices) for the circuit comparison of ``unit``.

    Natural: the unit's top exemplars, then its other references (class images), at most
    ``circuit_images``; other: ``circuit_images`` images outside the references and the unit's class, drawn
    with a generator seeded from ``seed`` and the unit's name (never its position)."""
    from .compare.path import unit_seed

    refs = list(dict.fromkeys(list(up.top_k_indices) + list(up.natural_indices)))[: settings.circuit_images]
    excluded = torch.zeros(len(natural), dtype=torch.bool)
    excluded[torch.tensor(list(up.natural_indices), dtype=torch.long)] = True
    if up.class_index is not None:
        excluded |= natural.labels == up.class_index
    pool = torch.nonzero(~excluded).flatten()
    if len(refs) < 2 or pool.numel() < 2:
        raise FVSanityError(f"circuits: unit {unit} needs >= 2 natural reference and >= 2 other images, "
                            f"got {len(refs)} and {pool.numel()}")
    g = torch.Generator().manual_seed(unit_seed(seed, unit))
    other = pool[torch.randperm(pool.numel(), generator=g)[: settings.circuit_images]].sort().values.tolist()
    return refs, other


def unit_circuits(lm, unit, fv_images: torch.Tensor, natural, up, settings: CheckSettings):
    """The FV-vs-natural circuit overlap of one checked unit (``up``: its path-check record),
    on the references of :func:`circuit_references`. Returns (CircuitOverlap, its JSON with the
    image indices used)."""
    from .compare.circuits import circuit_overlap
    from .compare.path import unit_seed

    refs, other = circuit_references(natural, up, unit, settings.circuits, settings.seed)
    p = settings.path
    res = circuit_overlap(lm, unit, fv_images, natural.decode(refs), natural.decode(other),
                          steps=settings.circuits.circuit_steps, n_splits=settings.circuits.circuit_splits, alpha=p.alpha, confidence=p.confidence,
                          n_boot=max(1, p.n_boot), n_perm=p.n_perm, seed=unit_seed(settings.seed, unit))
    doc = res.to_json()
    doc["natural_indices"], doc["other_indices"] = refs, other
    return res, doc


# ------------------------------------------------------------------------------ the report
@dataclass
class CheckReport:
    """What :func:`check` found, per unit.

    Attributes:
        doc: the check.json document (units with their layers and verdicts, settings, seeds).
        result: the :class:`~fvsanity.compare.path.PathCheck`.
        fvs: the FVs checked (an FVResult or a [U, S, 3, H, W] tensor).
        settings: the :class:`CheckSettings`.
    """

    doc: dict
    result: Any
    fvs: Any
    settings: CheckSettings

    @property
    def units(self) -> list[str]:
        return [u["unit"] for u in self.doc["units"]]

    @property
    def verdicts(self) -> dict[str, str]:
        """{unit: outcome at its own layer}: natural-like, diverges or inconclusive."""
        return {u["unit"]: u["verdict"]["outcome"] for u in self.doc["units"]}

    def _flag(self, u: dict) -> bool | None:
        cal = u.get("calibrated")
        return None if not cal else bool(cal.get("flagged"))

    def trusted(self) -> list[str]:
        """Units whose FVs travel like their natural images at their own layer (natural-like)
        and, with a calibration, are not flagged as manipulated."""
        return [u["unit"] for u in self.doc["units"]
                if u["verdict"]["outcome"] == "natural-like" and not self._flag(u)]

    def flagged(self) -> list[str]:
        """Units whose FVs diverge from their natural images at their own layer, or that a
        calibration flags as manipulated."""
        return [u["unit"] for u in self.doc["units"] if u["verdict"]["outcome"] == "diverges" or self._flag(u)]

    def inconclusive(self) -> list[str]:
        """The other units: neither trusted nor flagged (each unit's verdict says what would decide it)."""
        done = set(self.trusted()) | set(self.flagged())
        return [u for u in self.units if u not in done]

    def save(self, out, figure_mode: str = "auto") -> dict[str, Path]:
        """Write ``check.json`` (and any registered check output) and ``path_similarity.png``
        into ``out``; returns {name: path}."""
        from .io import ensure_writable_dir
        from .report.path_figure import plot_path_similarity
        from .report.writers import write_outputs

        out = ensure_writable_dir(out)
        written = dict(write_outputs(self.doc, out, "check"))
        written["path_similarity"] = plot_path_similarity(self.doc, out / "path_similarity.png", mode=figure_mode)
        return written

    def __repr__(self) -> str:
        return (f"CheckReport({len(self.units)} units: {len(self.trusted())} trusted, {len(self.flagged())} flagged, "
                f"{len(self.inconclusive())} inconclusive)")


# ------------------------------------------------------------------------------ check
def _render(lm, units, settings: CheckSettings, cache: Path | None, device, progress: bool, shard=None):
    """FVs for ``units``: through the cache in ``cache`` (reused only if made for this model's
    fingerprint and these units, seeds and settings), split over the ranks under torchrun (rank 0
    gets them all, the others None)."""
    from .cache import CacheEntry, fv_key, render_cached
    from .generate import render

    kw = settings.render_kwargs()
    seeds = settings.fv_seeds
    if cache is None:
        if shard is not None and shard.active:
            from .distributed import render_sharded

            return render_sharded(shard, lm, units, seeds, device=device, progress=progress, **kw)
        return render(lm, units, seeds=seeds, device=device, progress=progress, **kw)
    if shard is not None and shard.active:
        from .distributed import render_sharded

        entry = CacheEntry.folder(cache, fv_key(lm, units, seeds, **kw), ("fv.pt", "fv.json"))
        fresh = not entry.valid()  # every rank reads the same folder before rank 0 writes it
        shard.barrier()
        if not fresh:
            if not shard.is_main:
                return None
            print(f"reusing FVs in {cache}")
            return render_cached(lm, units, cache, seeds=seeds, device=device, **kw)[0]
        res = render_sharded(shard, lm, units, seeds, device=device, progress=progress, **kw)
        if res is not None:
            entry.invalidate()
            res.save(cache)
            entry.commit()
        return res
    res, reused = render_cached(lm, units, cache, seeds=seeds, device=device, progress=progress, **kw)
    if reused:
        print(f"reusing FVs in {cache}")
    return res


def run_header(command: str, lm, images, units) -> str:
    """The first line of a run: the model, where its weights and the images come from, the units."""
    from ._paths import describe_location

    weights = describe_location(lm.weights_source) if lm.weights_source not in (None, "random") else "random"
    try:
        where = describe_location(images) if images is not None else "in memory"
    except (TypeError, OSError):
        where = "in memory"
    return (f"fvsanity {command}: model {lm.name} (weights: {weights}), images: {where}, "
            f"units {', '.join(map(str, units))}")


def _natural(lm, images, image_options: dict | None):
    from .data import NaturalImages, load_images

    if isinstance(images, NaturalImages):
        return images
    if images is None:
        from .defaults import default_images

        images = default_images(lm)  # refuses a model the default (CIFAR-10) images do not fit
    return load_images(images, lm, **(image_options or {}))


def check(
    model,
    units=None,
    images=None,
    *,
    fvs=None,
    settings: CheckSettings | None = None,
    calibration=None,
    device=None,
    progress: bool = True,
    cache: str | Path | None = None,
    image_options: dict | None = None,
    shard=None,
    **overrides,
) -> CheckReport | None:
    """Check whether units' FVs travel through the network like their natural images.

    Args:
        model: a :class:`~fvsanity.models.LoadedModel` or a model name for
            :func:`~fvsanity.models.load_model`.
        units: unit specs (``"layer3.2:5"``) or Units; optional with ``fvs`` that name their units.
        images: a natural-image folder, :class:`~fvsanity.data.NaturalImages`, or None (the
            model's default images).
        fvs: FVs to check instead of rendering: an FVResult, a [U, S, 3, H, W] tensor, or a
            ``fvsanity visualize`` folder / file (:func:`fvsanity.generate.saved.load_fvs`).
        settings: :class:`CheckSettings`; ``overrides`` replace its fields by plain name
            (``seeds=5, steps=256, top_k=3``, :meth:`CheckSettings.of`).
        calibration: a calibration results.json (or a loaded
            :class:`~fvsanity.compare.detect.Calibration`) of this model: every unit gets its
            calibrated manipulation score and flag.
        device, progress: where to run; progress bars.
        cache: a folder where rendered FVs are kept and reused.
        image_options: for :func:`~fvsanity.data.load_images` (layout, labels, max_per_class,
            limit, seed).
        shard: under torchrun, a :class:`~fvsanity.distributed.Shard`: FVs rendered split over
            the ranks; rank 0 checks and gets the report, the others None.

    Returns:
        :class:`CheckReport` (None on ranks other than 0).
    """
    from .compare.path import path_check
    from .models import LoadedModel, load_model
    from .units import check_distinct, parse_units

    settings = CheckSettings.of(settings, **overrides) if overrides else (settings or CheckSettings())
    per_unit, paired = settings.design()  # refused before the model or any image is loaded
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    units = check_distinct(parse_units(units, lm), "--unit") if units else []
    if not units and fvs is None:
        raise FVSanityError("pass at least one --unit LAYER:CHANNEL (or --fv with saved FVs)")
    if units and fvs is None:
        settings = settings.resolved(lm, units)  # automatic seeds: enough for both claims on these paths
        try:  # the FVs to render must fit in memory
            settings.render.check_memory(len(units) * settings.seeds, lm.input_size if settings.render.size is None
                                         else (settings.render.size,) * 2)
        except SettingError as e:
            raise FVSanityError(f"--seeds {settings.seeds} for {len(units)} unit(s) is too many: {e}") from None
    calib = calibration
    if isinstance(calibration, (str, Path)):  # refused (one line) before any FV work if measured otherwise
        from .compare.detect import fv_identity, load_calibration

        seeds = settings.seeds if settings.seeds is not None else len(getattr(fvs, "seeds", []) or []) or None
        calib = load_calibration(calibration, lm, fv=fv_identity(lm, settings.render, seeds))
    if settings.path.layers:  # before any FV work
        from .units import resolve_layer

        path_settings = dataclasses.replace(settings.path, layers=[resolve_layer(lm.model, n) for n in settings.path.layers])
        settings = dataclasses.replace(settings, path=path_settings)
    natural = _natural(lm, images, image_options)
    if isinstance(fvs, (str, Path)):
        from .generate.saved import load_fvs

        units, fvs = load_fvs(str(fvs), units, lm)
    elif hasattr(fvs, "units") and hasattr(fvs, "images"):  # an FVResult in memory
        from .cache import check_fv_model
        from .generate.saved import select_fvs

        check_fv_model(fvs, lm, "fvs")  # made for these weights, or refused
        units, fvs = select_fvs(fvs, units, lm, "fvs")
    elif fvs is not None and not units:
        raise FVSanityError("FVs given as a tensor [U, S, 3, H, W] need their units (the U specs, in order)")
    if "paired" in _designs(settings.path.metric) and len(units) < 4:
        raise FVSanityError(f"--metric {settings.path.metric} compares units in a paired design and needs >= 4 --unit, "
                            f"got {len(units)}; use --metric spearman for fewer units")
    if progress and (shard is None or shard.is_main):  # every input checked: say what is being checked
        import sys

        print(run_header("check", lm, getattr(natural, "root", images), units), file=sys.stderr)
    if fvs is None:
        fvs = _render(lm, units, settings, None if cache is None else Path(cache), device, progress, shard)
        if fvs is None:
            return None  # not rank 0: its FVs went to rank 0, which checks them
    elif shard is not None and not shard.is_main:
        return None  # given FVs: nothing to split; rank 0 checks
    ps = dataclasses.replace(settings.path, metric=per_unit, paired_metrics=paired if len(units) >= 4 else ())
    if calib is not None:  # the same path check, plus the detection signals (exemplar agreement)
        from .compare.detect import detection_signals

        res, sig = detection_signals(lm, units, fvs, natural, ps, device=device, progress=progress)
    else:
        res = path_check(lm, units, fvs, natural, ps, device=device, progress=progress)
    doc = res.to_json()
    if calib is not None:
        for u, s in zip(doc["units"], sig):
            u["calibrated"] = calib.rate(s.values)
    doc["settings"]["requested_metric"] = settings.path.metric
    seeds = list(getattr(fvs, "seeds", None) or (settings.fv_seeds if settings.seeds is not None else []))
    doc["settings"]["fv"] = {"seeds": seeds, **settings.render_kwargs()}
    if settings.circuits.circuits:
        images_ = getattr(fvs, "images", fvs)
        doc["circuits"] = {}
        for i, (u, up) in enumerate(zip(units, res.units)):
            _, d = unit_circuits(lm, u, images_[i], natural, up, settings)
            doc["circuits"][str(u)] = d
    doc["model_provenance"] = lm.provenance()  # weights, and any entries a partial load left random
    if getattr(natural, "n_unreadable", 0):
        doc.setdefault("notes", []).append(f"{natural.n_unreadable} unreadable image file(s) skipped")
    return CheckReport(doc=doc, result=res, fvs=fvs, settings=settings)


def _designs(metric: str) -> tuple[str, ...]:
    from .compare.similarity import metric_info

    return tuple(metric_info(metric).designs)
