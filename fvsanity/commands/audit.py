"""``fvsanity audit``: FVs, natural exemplars, path similarity (and circuits) per unit -> a report.

Examples:
    fvsanity audit --model imagenet-squeezenet --units classifier.1:1,classifier.1:9 \\
        --images data/imagenet-samples --out runs/audit
    fvsanity audit --model cifar10-resnet20 --layer layer3.2 --sample 8 --steps 256 --out runs/a

Writes ``report.html`` (self-contained), ``audit.json``, ``table.md``, ``table.tex`` and one
folder per unit under ``units/``. Rerunning with the same ``--out`` resumes: finished units are
kept, and a run with other settings is refused.

Sharded (units split over processes; rank 0 writes the one report):
    torchrun --nproc_per_node=4 -m fvsanity audit --layer layer3.2 --out runs/a
    fvsanity audit --merge runs/a    # the report from every finished unit in runs/a
"""

from __future__ import annotations

import argparse
import sys
import time


def register(sub) -> None:
    from ..auditing import AuditSettings
    from ..cli import add_common
    from ..settings import add_flags

    p = sub.add_parser("audit", help="audit units' FVs: report.html, audit.json, tables", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(p, out_default="runs/audit")
    g = p.add_argument_group("units (one of)")
    g.add_argument("--units", action="append", default=None,
                   help="LAYER:CHANNEL[,LAYER:CHANNEL...] (repeatable)")
    g.add_argument("--layer", default=None, help="audit channels of this layer (with --sample)")
    g.add_argument("--sample", type=int, default=None, help="number of channels of --layer, drawn by --seed [all]")
    p.add_argument("--images", default=None,
                   help="natural-image folder (class subfolders, <wnid>_<name>.JPEG files, or flat) "
                        "[the default images: CIFAR-10 test, or procedural images for the toy model]")
    p.add_argument("--max-per-class", type=int, default=None, help="subsample natural images per class")
    p.add_argument("--limit", type=int, default=None, help="subsample natural images overall")
    p.add_argument("--fv", default=None,
                   help="reuse FVs from a `fvsanity visualize` output folder (default units: all of its units)")
    add_flags(p, AuditSettings, exclude=("path.layers",))  # every setting, declared once in its dataclass
    p.add_argument("--calibration", default=None, metavar="CALIBRATION_JSON",
                   help="a calibration.json of `fvsanity calibrate` for this model and these FV settings (or a "
                        "detection results.json of experiments/detection): report each "
                        "unit's calibrated score (path-only signals) and whether it is flagged at the measured "
                        "5%%-FPR threshold (written to calibrated.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--merge", default=None, metavar="OUT",
                   help="only merge the finished units in OUT (written by shards) into its report, JSON and "
                        "tables; nothing is computed")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    """The :class:`~fvsanity.auditing.AuditSettings` of the parsed flags (each value checked and
    named by its flag)."""
    from ..auditing import AuditSettings
    from ..cli import check_ints
    from ..settings import from_args

    cfg = from_args(AuditSettings, args, exclude=("path.layers",), fv_source=args.fv)
    check_ints(args, {"sample": (1, None), "max_per_class": (1, None), "limit": (1, None)})
    return cfg


def _merge(args: argparse.Namespace) -> int:
    from ..auditing import merge_audit
    from ..report.tables import summary_sentence

    res = merge_audit(args.merge)
    s = res.audit["summary"]
    print(f"merged {s['n_units']} units. {summary_sentence(s)}", file=sys.stderr)
    print(f"report: {res.report}")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..distributed import from_env, sharded

    if getattr(args, "merge", None):
        return _merge(args) if from_env().is_main else 0  # under torchrun: rank 0 merges

    # under torchrun: this rank's device, and a process group when there is more than one rank
    with sharded(args.device) as shard:
        return _run(args, shard, shard.device(args.device))


def _run(args: argparse.Namespace, shard, device) -> int:
    t0 = time.perf_counter()
    from ..auditing import run_audit, select_units
    from ..cli import save_config
    from ..errors import FVSanityError, SettingError
    from ..io import ensure_writable_dir
    from ..models import load_model
    from ..units import check_distinct

    cfg = config_from_args(args)
    cfg.design()  # e.g. a --config metric: refused before any model work
    out = ensure_writable_dir(args.out)  # fail before any slow work
    lm = load_model(args.model, weights=args.weights, pretrained=not args.random_weights, device=device,
                    allow_partial=args.allow_partial_weights, seed=args.seed)
    specs = args.units
    if args.fv and not args.units and not args.layer:
        from ..generate.saved import read_fv_result

        specs = [str(u) for u in read_fv_result(args.fv).units]  # every unit of the FV set
    units = check_distinct(select_units(lm, specs, args.layer, args.sample, args.seed), "--units")
    cfg = cfg.resolved(lm, units)  # automatic seeds: enough for both claims on these units' paths
    calib = None
    if getattr(args, "calibration", None):  # refused (one line) before any FV work if measured otherwise
        from ..compare.detect import fv_identity, load_calibration

        calib = load_calibration(args.calibration, lm, fv=fv_identity(lm, cfg.render, cfg.seeds))
    try:  # the FVs to render must fit in memory
        hw = lm.input_size if cfg.render.size is None else (cfg.render.size, cfg.render.size)
        cfg.render.check_memory(min(len(units), cfg.fv_batch_units) * cfg.seeds, hw)
    except SettingError as e:
        if args.size is not None:
            raise e.renamed("--size") from None
        raise FVSanityError(f"--seeds {cfg.seeds} for {min(len(units), cfg.fv_batch_units)} unit(s) per batch "
                            f"(--fv-batch) is too many: {e}") from None
    images = args.images
    if images is None:
        from ..defaults import default_images

        images = default_images(lm)
    opts = {"max_per_class": args.max_per_class, "limit": args.limit, "seed": args.seed}
    res = run_audit(lm, units, images, out, cfg, device=device, progress=not args.no_progress, image_options=opts,
                    shard=shard)
    if not shard.is_main:
        return 0  # rank 0 reports
    args.model_provenance = lm.provenance()  # weights, and any entries a partial load left random
    save_config(args, out)
    from ..report.tables import summary_sentence

    s = res.audit["summary"]
    print(
        f"audited {s['n_units']} units ({len(res.computed)} computed now). {summary_sentence(s)} "
        f"Wall time {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    if calib is not None:
        from ..compare.detect import signals_from_json
        from ..io import atomic_write_json

        rows = [{"unit": rec["path"]["unit"], **calib.rate(signals_from_json(rec["path"]))} for rec in res.audit["units"]]
        atomic_write_json(out / "calibrated.json", {"model": lm.name, "calibration": calib.source, "units": rows})
        for r in rows:
            print(f"{r['unit']}: {r['text']}")
    print(f"report: {res.report}")
    return 0
