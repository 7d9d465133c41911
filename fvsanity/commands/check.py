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

from ..errors import FVSanityError


def register(sub) -> None:
    from ..checking import CheckSettings
    from ..cli import add_common
    from ..settings import add_flags

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
    add_flags(p, CheckSettings)  # every setting, declared once in its dataclass
    p.add_argument("--figure-mode", choices=["auto", "panels", "mean"], default="auto",
                   help="one panel per unit or the mean over units [auto: panels up to 12 units]")
    p.add_argument("--calibration", default=None, metavar="CALIBRATION_JSON",
                   help="a calibration.json of `fvsanity calibrate` for this model and these FV settings (or a "
                        "detection results.json of experiments/detection): report each "
                        "unit's calibrated score and whether it is flagged at the measured 5%%-FPR threshold")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def image_options(args: argparse.Namespace) -> dict:
    """The --images options of ``check`` and ``audit`` for :func:`fvsanity.data.load_images`."""
    from ..cli import check_ints

    check_ints(args, {"max_per_class": (1, None), "limit": (1, None)})
    if getattr(args, "labels", None) is not None and not Path(args.labels).is_file():
        raise FVSanityError(f"--labels file not found: {args.labels!r}")
    opts = {"max_per_class": args.max_per_class, "limit": args.limit, "seed": args.seed}
    if hasattr(args, "layout"):
        opts.update(layout=args.layout, labels=args.labels)
    return opts


# ------------------------------------------------------------------------------ command
def run(args: argparse.Namespace) -> int:
    from ..distributed import sharded

    with sharded(args.device) as shard:  # torchrun: FVs split over the ranks, rank 0 checks
        return _run(args, shard, shard.device(args.device))


def _run(args: argparse.Namespace, shard, device) -> int:
    from ..checking import CheckSettings, check
    from ..cli import save_config
    from ..io import ensure_writable_dir
    from ..models import load_model
    from ..report.tables import check_lines
    from ..settings import from_args

    settings = from_args(CheckSettings, args)  # every value checked, named by its flag, before any work
    settings.design()  # the metric's design decides its role; refused before the model or any image
    opts = image_options(args)
    if not args.unit and not args.fv:
        raise FVSanityError("pass at least one --unit LAYER:CHANNEL (or --fv with saved FVs)")
    out = ensure_writable_dir(args.out)
    # --random-weights: the same weights for the same --seed (load_model seeds without global state)
    lm = load_model(args.model, weights=args.weights, pretrained=not args.random_weights, device=device,
                    allow_partial=args.allow_partial_weights, seed=args.seed)
    report = check(lm, args.unit, args.images, fvs=args.fv, settings=settings, calibration=args.calibration,
                   device=device, progress=not args.no_progress, cache=out / "fvs", image_options=opts, shard=shard)
    if report is None:
        return 0  # not rank 0: its FVs went to rank 0, which checks them
    written = report.save(out, figure_mode=args.figure_mode)
    args.model_provenance = lm.provenance()
    save_config(args, out)
    for note in report.doc.get("notes", []):
        print(f"note: {note} (listed in check.json 'data')")
    for line in check_lines(report.doc):
        print(line)
    for name, rows in report.result.paired.items():
        print(f"paired {name} across {len(report.units)} units: " + "  ".join(f"{r.name}={r.value:.2f}" for r in rows))
    for u, c in report.doc.get("circuits", {}).items():
        print(f"{u}: circuits compared ({len(c['natural_indices'])} natural, {len(c['other_indices'])} other images)")
    print(f"wrote {', '.join(str(p) for p in written.values())}, {out / 'config.json'}")
    return 0
