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
    from ..cli import add_common
    from ..compare.similarity import list_metrics

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
    p.add_argument("--steps", type=int, default=512, help="FV optimization steps [%(default)s]")
    p.add_argument("--seeds", type=int, default=5,
                   help="FVs per unit (the verdict's replicates; < 5: every layer inconclusive) [%(default)s]")
    p.add_argument("--size", type=int, default=None, help="FV size in px [the model's input size]")
    p.add_argument("--fv", default=None,
                   help="reuse FVs from a `fvsanity visualize` output folder (default units: all of its units)")
    p.add_argument("--fv-batch", type=int, default=8, help="units optimized together per batch [%(default)s]")
    p.add_argument("--metric", default="spearman", choices=list_metrics(design="unpaired"),
                   help="per-unit (unpaired) metric for the path check; the paired design across units uses "
                        "cka and rsa [%(default)s]")
    p.add_argument("--paired-metrics", nargs="+", default=["cka", "rsa"], choices=list_metrics(design="paired"),
                   help="paired-design metrics compared across >= 4 units [%(default)s]")
    p.add_argument("--top-k", type=int, default=10, help="top natural exemplars per unit [%(default)s]")
    p.add_argument("--n-other", type=int, default=200, help="other natural images per unit [%(default)s]")
    p.add_argument("--no-class-images", action="store_true", help="natural refs = top-k exemplars only")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples [%(default)s]")
    p.add_argument("--n-perm", type=int, default=1000, help="permutations [%(default)s]")
    p.add_argument("--alpha", type=float, default=0.05,
                   help="level of each kind of claim (natural-like, diverges) across the layers [%(default)s]")
    p.add_argument("--circuits", action="store_true", help="also compare FV vs natural circuits (slower)")
    p.add_argument("--circuit-images", type=int, default=16,
                   help="natural (and other) images per unit for the circuit comparison [%(default)s]")
    p.add_argument("--circuit-steps", type=int, default=8, help="EAP-IG steps for the circuits [%(default)s]")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass [%(default)s]")
    p.add_argument("--calibration", default=None, metavar="RESULTS_JSON",
                   help="a detection results.json (experiments/detection) measured on this model: report each "
                        "unit's calibrated score (path-only signals) and whether it is flagged at the measured "
                        "5%%-FPR threshold (written to calibrated.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--merge", default=None, metavar="OUT",
                   help="only merge the finished units in OUT (written by shards) into its report, JSON and "
                        "tables; nothing is computed")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    from ..audit import AuditConfig
    from ..cli import check_ints
    from ..errors import FVSanityError
    from ..generate import RenderSettings
    from .check import MAX_RESAMPLES

    # --n-boot 0: no CIs; the verdict needs a test, so --n-perm >= 1
    check_ints(args, {"steps": (1, RenderSettings.MAX_STEPS), "seeds": (1, None), "size": (1, RenderSettings.MAX_SIZE),
                      "fv_batch": (1, None), "top_k": (1, None), "n_other": (1, None), "n_boot": (0, MAX_RESAMPLES),
                      "n_perm": (1, MAX_RESAMPLES), "batch_size": (1, None), "circuit_images": (1, None),
                      "circuit_steps": (1, None), "sample": (1, None), "max_per_class": (1, None), "limit": (1, None)})
    if not 0 < args.alpha < 0.5:  # the verdict's claims need alpha < 0.5 (VerdictSettings)
        raise FVSanityError(f"--alpha must be in (0, 0.5), got {args.alpha}")
    return AuditConfig(
        steps=args.steps, seeds=args.seeds, size=args.size, seed=args.seed, metric=args.metric, top_k=args.top_k,
        n_other=args.n_other, use_class_images=not args.no_class_images, n_boot=args.n_boot, n_perm=args.n_perm,
        alpha=args.alpha, circuits=args.circuits, fv_batch_units=args.fv_batch, batch_size=args.batch_size,
        paired_metrics=tuple(getattr(args, "paired_metrics", None) or ("cka", "rsa")),
        fv_source=args.fv,
        circuit_kwargs=(
            {"max_natural": args.circuit_images, "n_other": args.circuit_images, "steps": args.circuit_steps}
            if args.circuits else {}
        ),
    )


def _merge(args: argparse.Namespace) -> int:
    from ..audit import merge_audit
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
    from ..audit import run_audit, select_units
    from ..cli import save_config
    from ..compare.path import validate_metrics
    from ..errors import FVSanityError, SettingError
    from ..generate import RenderSettings
    from ..io import ensure_writable_dir
    from ..models import load_model
    from ..units import check_distinct

    cfg = config_from_args(args)
    validate_metrics(cfg.metric, cfg.paired_metrics)  # e.g. a --config metric: refused before any model work
    out = ensure_writable_dir(args.out)  # fail before any slow work
    lm = load_model(args.model, weights=args.weights, pretrained=not args.random_weights, device=device,
                    allow_partial=args.allow_partial_weights, seed=args.seed)
    calib = None
    if getattr(args, "calibration", None):  # refused (one line) before any FV work if measured on another model
        from ..compare.detect import load_calibration

        calib = load_calibration(args.calibration, lm.name)
    specs = args.units
    if args.fv and not args.units and not args.layer:
        from ..generate.saved import read_fv_result

        specs = [str(u) for u in read_fv_result(args.fv).units]  # every unit of the FV set
    units = check_distinct(select_units(lm, specs, args.layer, args.sample, args.seed), "--units")
    try:  # the FVs to render must fit in memory
        hw = lm.input_size if args.size is None else (args.size, args.size)
        RenderSettings(steps=args.steps).check_memory(min(len(units), cfg.fv_batch_units) * args.seeds, hw)
    except SettingError as e:
        if args.size is not None:
            raise e.renamed("--size") from None
        raise FVSanityError(f"--seeds {args.seeds} for {min(len(units), cfg.fv_batch_units)} unit(s) per batch "
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
