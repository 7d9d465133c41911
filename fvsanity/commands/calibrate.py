"""``fvsanity calibrate``: measure the manipulation detector on your model, for your FV settings.

Draws units of the model (class units and hidden channels of the block layers), builds every
registered manipulation x target variant on them, renders healthy and manipulated FVs with the
FV settings you will check with (--steps, --size, --param, --seeds ...), fits the combined score
and its thresholds on the calibration units and measures AUC, TPR and FPR on held-out units
(:func:`fvsanity.calibration.calibrate`). Writes ``calibration.json``, ``roc.png``,
``signals.json`` and ``config.json`` to ``--out``; caches in ``--out/work``, so a rerun resumes.
Then: ``fvsanity check --calibration OUT/calibration.json`` with the same FV settings.

    fvsanity calibrate --model cifar10-resnet20 --out runs/cal
    fvsanity calibrate --model cifar10-resnet20 --units 20 --steps 64 --seeds 3 --out runs/cal-small
"""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from ..calibration import CalibrationSettings
    from ..cli import add_common
    from ..settings import add_flags

    p = sub.add_parser("calibrate", help="measure the manipulation detector on this model: calibration.json",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(p, out_default="runs/calibration")
    p.add_argument("--images", default=None,
                   help="natural-image folder (class subfolders, <wnid>_<name>.JPEG, or flat + --labels) "
                        "[the model's default images]")
    p.add_argument("--labels", default=None, help="CSV filename,label for a flat --images folder")
    p.add_argument("--layout", choices=["auto", "classes", "imagenet-samples", "flat"], default="auto",
                   help="layout of --images [%(default)s]")
    p.add_argument("--max-per-class", type=int, default=None, help="subsample natural images per class (by --seed)")
    p.add_argument("--limit", type=int, default=None, help="subsample natural images overall (by --seed)")
    add_flags(p, CalibrationSettings)  # every setting, declared once in its dataclass
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..calibration import CalibrationSettings, calibrate
    from ..cli import resolve_device, save_config
    from ..io import ensure_writable_dir
    from ..models import load_model
    from ..settings import from_args
    from .check import image_options

    settings = from_args(CalibrationSettings, args)  # every value checked, named by its flag, before any work
    opts = image_options(args)
    out = ensure_writable_dir(args.out)
    device = resolve_device(args.device)
    lm = load_model(args.model, weights=args.weights, pretrained=not args.random_weights, device=device,
                    allow_partial=args.allow_partial_weights, seed=args.seed)
    res = calibrate(lm, args.images, out, settings, device=device, image_options=opts)
    args.model_provenance = lm.provenance()
    save_config(args, out)
    d = res.doc
    for s in d["skipped"]:
        print(f"skipped {s['condition']}: {s['reason']}")
    for c, m in d["methods"].items():
        print(f"{c}: AUC {m['auc']:.2f} [{m['auc_ci'][0]:.2f}, {m['auc_ci'][1]:.2f}], TPR {m['tpr_at_5fpr']:.2f} "
              f"[{m['tpr_ci'][0]:.2f}, {m['tpr_ci'][1]:.2f}] at the 5%-FPR threshold ({m['best_signal']}; "
              f"{m['n']} held-out units)")
    t = d["thresholds"]["combined"]
    iv = t["plain"]["fpr_interval"]["interval"]
    conf = t["confident"]
    print(f"combined score: held-out FPR {t['plain']['held_out_fpr']:.3f} at its 5%-FPR threshold (true FPR "
          f"{100 * iv[0]:.1f}-{100 * iv[1]:.1f}% with 90% probability); 90%-confident threshold: "
          + (f"held-out FPR {conf['fpr_at_threshold']:.3f}" if conf.get("attainable")
             else f"none ({conf['n_tuning']} < {conf['n_needed']} calibration units)"))
    print(f"wrote {res.path}, {res.roc}, {out / 'signals.json'}, {out / 'config.json'}")
    return 0
