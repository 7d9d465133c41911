"""``fvsanity check``: do a unit's FVs travel through the network like its natural images?

Generates the units' FVs (or loads them with ``--fv``), runs every natural image through the
model once, and compares, layer by layer along each unit's path, FV-vs-natural similarity with
the natural-vs-natural (upper) and natural-vs-other (lower) references (Geirhos et al. 2023).
Per layer the verdict is one of "natural-like", "diverges", "inconclusive" (with its reason), the
FV seeds being the replicates (:mod:`fvsanity.compare.verdict`); printed as a table per unit.
Writes ``check.json`` (per unit: layers + verdict; settings, seeds, versions),
``path_similarity.png`` and ``config.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..errors import FVSanityError

#: the most bootstrap resamples or permutations a check or audit takes
MAX_RESAMPLES = 1_000_000


def register(sub) -> None:
    from ..cli import add_common
    from ..compare.similarity import list_metrics

    p = sub.add_parser("check", help="path-similarity sanity check of units' FVs", description=__doc__)
    add_common(p, out_default="runs/check")
    p.add_argument("--unit", action="append", default=None,
                   help="LAYER:CHANNEL[@Y,X] (repeatable or comma-separated; several run batched)")
    p.add_argument("--images", default=None,
                   help="natural-image folder (class subfolders, <wnid>_<name>.JPEG, or flat + --labels) "
                        "[the default CIFAR-10 images for CIFAR/toy models]")
    p.add_argument("--labels", default=None, help="CSV filename,label for a flat --images folder")
    p.add_argument("--layout", choices=["auto", "classes", "imagenet-samples", "flat"], default="auto",
                   help="layout of --images [%(default)s]")
    p.add_argument("--max-per-class", type=int, default=None, help="subsample natural images per class (by --seed)")
    p.add_argument("--limit", type=int, default=None, help="subsample natural images overall (by --seed)")
    p.add_argument("--fv", default=None,
                   help="existing FVs: a folder/fv.pt from `fvsanity visualize` (refused unless made for this "
                        "model's weights), a tensor file [U,S,3,H,W], or image file(s) for a single unit (tensors "
                        "and images carry no model record: taken as your own images, unchecked) [generate them]")
    p.add_argument("--steps", type=int, default=512, help="FV optimization steps when generating [%(default)s]")
    p.add_argument("--seeds", type=int, default=5,
                   help="FVs (seeds) per unit when generating: the verdict's replicates; fewer than 5 leave "
                        "every layer inconclusive [%(default)s]")
    p.add_argument("--metric", choices=list_metrics(design="unpaired") + list_metrics(design="paired"),
                   default="spearman",
                   help="a per-unit (unpaired) metric for the curves (paper: spearman), or a paired-design metric "
                        "(%s) compared across >= 4 units, with spearman per unit [%%(default)s]"
                        % ", ".join(list_metrics(design="paired")))
    p.add_argument("--paired-metrics", nargs="+", default=None, choices=list_metrics(design="paired"),
                   help="paired-design metrics compared across >= 4 units [cka rsa; with a paired --metric: it]")
    p.add_argument("--top-k", type=int, default=10, help="top-k natural exemplars per unit [%(default)s]")
    p.add_argument("--n-other", type=int, default=200, help="other natural images per unit [%(default)s]")
    p.add_argument("--no-class-images", action="store_true", help="natural refs = top-k exemplars only")
    p.add_argument("--layers", default=None, help="comma-separated layers [the unit's block path]")
    p.add_argument("--alpha", type=float, default=0.05,
                   help="level of each kind of claim (natural-like, diverges) across the layers [%(default)s]")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples [%(default)s]")
    p.add_argument("--n-perm", type=int, default=1000, help="permutations [%(default)s]")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass [%(default)s]")
    p.add_argument("--figure-mode", choices=["auto", "panels", "mean"], default="auto",
                   help="one panel per unit or the mean over units [auto: panels up to 12 units]")
    p.add_argument("--circuits", action="store_true",
                   help="also compare FV and natural circuits (edge attribution; slower) into check.json")
    p.add_argument("--calibration", default=None, metavar="RESULTS_JSON",
                   help="a detection results.json (experiments/detection) measured on this model: report each "
                        "unit's calibrated score and whether it is flagged at the measured 5%%-FPR threshold")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _generate(lm, units, args, out: Path, device, shard=None):
    """FVs for ``units``, reused from ``out/fvs`` only if made for this model's fingerprint and
    these units, seeds and settings (:func:`fvsanity.cache.render_cached`). Under torchrun
    (``shard`` with several ranks) the units are rendered split over the ranks and rank 0 gets
    (and caches) them all; the other ranks get None."""
    from ..cache import render_cached

    seeds = [args.seed + i for i in range(args.seeds)]
    cache = out / "fvs"
    if shard is not None and shard.active:
        from ..cache import CacheEntry, fv_key
        from ..distributed import render_sharded

        entry = CacheEntry.folder(cache, fv_key(lm, units, seeds, steps=args.steps), ("fv.pt", "fv.json"))
        fresh = not entry.valid()  # every rank reads the same folder before rank 0 writes it
        shard.barrier()
        if not fresh:
            if not shard.is_main:
                return None
            print(f"reusing FVs in {cache}")
            return render_cached(lm, units, cache, seeds=seeds, steps=args.steps, device=device)[0]
        res = render_sharded(shard, lm, units, seeds, steps=args.steps, device=device, progress=not args.no_progress)
        if res is not None:
            entry.invalidate()
            res.save(cache)
            entry.commit()
        return res
    res, reused = render_cached(lm, units, cache, seeds=seeds, steps=args.steps, device=device,
                                progress=not args.no_progress)
    if reused:
        print(f"reusing FVs in {cache}")
    return res


def _circuits(lm, units, fv, natural, check, args, max_images: int = 16) -> dict:
    """FV-vs-natural circuit overlap per unit (:func:`fvsanity.compare.circuits.circuit_overlap`).

    Natural group: the unit's natural references from the path check (class images + top-k),
    at most ``max_images`` (seeded choice); other group: as many random images outside the
    references and the unit's class (seeded). ``--n-boot``/``--n-perm``/``--alpha`` apply here too.
    """
    from ..compare.circuits import circuit_overlap
    from ..compare.path import unit_seed

    images = getattr(fv, "images", fv)
    out = {}
    for i, (u, up) in enumerate(zip(units, check.units)):
        g = torch.Generator().manual_seed(unit_seed(args.seed, u))  # from the unit's name, not its position
        refs = torch.tensor(up.natural_indices, dtype=torch.long)
        if refs.numel() > max_images:
            refs = refs[torch.randperm(refs.numel(), generator=g)[:max_images]].sort().values
        excluded = torch.zeros(len(natural), dtype=torch.bool)
        excluded[torch.tensor(up.natural_indices, dtype=torch.long)] = True
        if up.class_index is not None:
            excluded |= natural.labels == up.class_index
        pool = torch.nonzero(~excluded).flatten()
        if refs.numel() < 2 or pool.numel() < 2:
            raise FVSanityError(f"--circuits: unit {u} needs >= 2 natural reference and >= 2 other images")
        other = pool[torch.randperm(pool.numel(), generator=g)[: max(2, refs.numel())]].sort().values
        res = circuit_overlap(lm, u, images[i], natural.decode(refs), natural.decode(other),
                              alpha=args.alpha, n_boot=max(1, args.n_boot), n_perm=max(1, args.n_perm),
                              seed=unit_seed(args.seed, u))
        out[str(u)] = res.to_json()
        print(f"{str(u)}: circuits compared ({refs.numel()} natural, {other.numel()} other images)")
    return out


# ------------------------------------------------------------------------------ command
def run(args: argparse.Namespace) -> int:
    from ..distributed import sharded

    with sharded(args.device) as shard:  # torchrun: FVs split over the ranks, rank 0 checks
        return _run(args, shard, shard.device(args.device))


def _run(args: argparse.Namespace, shard, device) -> int:
    from ..cli import check_ints, save_config
    from ..compare.path import PathCheckSettings, path_check, validate_metrics
    from ..compare.similarity import metric_info
    from ..data import load_images
    from ..errors import SettingError
    from ..generate import RenderSettings
    from ..generate.saved import load_fvs
    from ..io import ensure_writable_dir
    from ..models import load_model
    from ..report.path_figure import plot_path_similarity
    from ..report.writers import write_outputs
    from ..units import check_distinct, parse_units

    check_ints(args, {"steps": (1, RenderSettings.MAX_STEPS), "seeds": (1, None), "top_k": (0, None),
                      "n_other": (1, None), "batch_size": (1, None), "n_boot": (0, MAX_RESAMPLES),
                      "n_perm": (1, MAX_RESAMPLES), "max_per_class": (1, None), "limit": (1, None)})  # n-boot 0: no CIs
    if not 0 < args.alpha < 0.5:  # the verdict's claims need alpha < 0.5 (VerdictSettings)
        raise FVSanityError(f"--alpha must be in (0, 0.5), got {args.alpha}")
    if args.labels is not None and not Path(args.labels).is_file():
        raise FVSanityError(f"--labels file not found: {args.labels!r}")
    if not args.unit and not args.fv:
        raise FVSanityError("pass at least one --unit LAYER:CHANNEL (or --fv with saved FVs)")
    # the metric's design decides its role; refused here, before the model or any image is loaded
    paired_design = "paired" in metric_info(args.metric).designs
    per_unit_metric = "spearman" if paired_design else args.metric
    paired = (args.metric,) if paired_design else tuple(getattr(args, "paired_metrics", None) or ("cka", "rsa"))
    validate_metrics(per_unit_metric, paired)
    out = ensure_writable_dir(args.out)
    # --random-weights: the same weights for the same --seed (load_model seeds without global state)
    lm = load_model(args.model, weights=args.weights, pretrained=not args.random_weights, device=device,
                    allow_partial=args.allow_partial_weights, seed=args.seed)
    calib = None
    if args.calibration:  # refused (one line) before any FV work if measured on another model
        from ..compare.detect import load_calibration

        calib = load_calibration(args.calibration, lm.name)
    units = check_distinct(parse_units(args.unit, lm), "--unit") if args.unit else []
    if units and not args.fv:
        try:  # the FVs to render must fit in memory
            RenderSettings(steps=args.steps).check_memory(len(units) * args.seeds, lm.input_size)
        except SettingError as e:
            raise FVSanityError(f"--seeds {args.seeds} for {len(units)} unit(s) is too many: {e}") from None
    layers = [s.strip() for s in args.layers.split(",") if s.strip()] if args.layers else None
    if layers:  # before any FV work
        from ..units import resolve_layer

        layers = [resolve_layer(lm.model, name) for name in layers]

    images_dir = args.images
    if images_dir is None:
        from ..defaults import default_images

        images_dir = default_images(lm)  # refuses a model the default (CIFAR-10) images do not fit
    natural = load_images(
        images_dir, lm, layout=args.layout, labels=args.labels, max_per_class=args.max_per_class,
        limit=args.limit, seed=args.seed,
    )
    if args.fv:
        units, fv = load_fvs(args.fv, units, lm)
    else:
        fv = None
    if paired_design and len(units) < 4:
        raise FVSanityError(
            f"--metric {args.metric} compares units in a paired design and needs >= 4 --unit, got {len(units)}; "
            "use --metric spearman for fewer units"
        )
    if fv is None:
        fv = _generate(lm, units, args, out, device, shard)
        if fv is None:
            return 0  # not rank 0: its FVs went to rank 0, which checks them
    elif not shard.is_main:
        return 0  # --fv: nothing to split; rank 0 checks

    settings = PathCheckSettings(
        metric=per_unit_metric, layers=layers, top_k=args.top_k, n_other=args.n_other,
        use_class_images=not args.no_class_images, n_boot=args.n_boot, n_perm=args.n_perm, alpha=args.alpha,
        paired_metrics=paired if len(units) >= 4 else (), seed=args.seed, batch_size=args.batch_size,
    )
    if calib is not None:  # the same path check, plus the detection signals (exemplar agreement)
        from ..compare.detect import detection_signals

        res, sig = detection_signals(lm, units, fv, natural, settings, device=device, progress=not args.no_progress)
    else:
        res = path_check(lm, units, fv, natural, settings, device=device, progress=not args.no_progress)
    doc = res.to_json()
    if calib is not None:
        for u, s in zip(doc["units"], sig):
            u["calibrated"] = calib.rate(s.values)
    doc["settings"]["requested_metric"] = args.metric
    if args.circuits:
        doc["circuits"] = _circuits(lm, units, fv, natural, res, args)
    doc["model_provenance"] = lm.provenance()  # weights, and any entries a partial load left random
    written = write_outputs(doc, out, "check")  # check.json and any other registered check output
    fig = plot_path_similarity(doc, out / "path_similarity.png", mode=args.figure_mode)
    args.model_provenance = lm.provenance()
    save_config(args, out)

    if natural.n_unreadable:
        print(f"note: {natural.n_unreadable} unreadable image file(s) skipped (listed in check.json 'data')")
    from ..report.tables import check_lines

    for line in check_lines(doc):
        print(line)
    for name, rows in res.paired.items():
        print(f"paired {name} across {len(units)} units: " + "  ".join(f"{r.name}={r.value:.2f}" for r in rows))
    print(f"wrote {', '.join(str(p) for p in written.values())}, {fig}, {out / 'config.json'}")
    return 0
