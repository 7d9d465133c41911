"""``fvsanity fool``: build a manipulated model whose FVs show a chosen target, and evaluate it.

Methods: ``circuit`` (the paper's fooling circuit: an FV detector gates the unit to the target)
and ``silent`` (silent units: a parallel channel, zero on natural images, that dominates the FV).
Targets: ``unit:LAYER:CHANNEL`` (same layer), an image file, or ``--shift N`` (unit c shows
channel (c+N) mod C, the paper's permutation; default when no --target is given).
Natural images: ``--train-images`` build the detector / calibrate; ``--eval-images`` measure.
If they are the same folder (or --eval-images is omitted) the images are split at random
(``--split``, by ``--seed``). Writes ``model/`` (model.safetensors + manipulated.json; load with
``fvsanity.fool.load_manipulated``), ``fool.json``, ``fool.png`` and ``config.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    from ..cli import add_common

    p = sub.add_parser("fool", help="build and evaluate a model whose FVs are manipulated", description=__doc__)
    add_common(p, out_default="runs/fool")
    p.add_argument("--unit", "--units", dest="unit", default="all",
                   help="units to manipulate: LAYER:C[,LAYER:C], LAYER:a-b, LAYER:all or all "
                        "(every class unit of the output layer) [%(default)s]")
    p.add_argument("--target", default=None, help="unit:LAYER:CHANNEL or an image file [permutation by --shift]")
    p.add_argument("--shift", type=int, default=None, help="unit c shows channel (c+shift) mod C [C // 10 without --target: 100 of 1000 classes]")
    p.add_argument("--method", choices=["circuit", "silent"], default="circuit", help="[%(default)s]")
    p.add_argument("--train-images", default=None, help="natural images for the detector / calibration [CIFAR-10 default]")
    p.add_argument("--eval-images", default=None, help="held-out natural images [a split of --train-images]")
    p.add_argument("--split", type=float, default=0.5, help="training fraction when splitting one folder [%(default)s]")
    p.add_argument("--limit", type=int, default=None, help="use at most this many images per folder (by --seed)")
    p.add_argument("--det-units", type=int, default=48, help="units whose FVs train the detector [%(default)s]")
    p.add_argument("--det-heldout-units", type=int, default=16, help="other units for its held-out test [%(default)s]")
    p.add_argument("--det-seeds", type=int, default=1, help="FV seeds per detector unit [%(default)s]")
    p.add_argument("--det-steps", type=int, default=256, help="FV steps for detector data [%(default)s]")
    p.add_argument("--det-checkpoints", default="4,16,32,64,128", help="kept optimization steps [%(default)s]")
    p.add_argument("--det-epochs", type=int, default=60, help="detector training epochs [%(default)s]")
    p.add_argument("--margin", type=float, default=1.0, help="threshold = calib max + margin + margin-sd*sd [%(default)s]")
    p.add_argument("--margin-sd", type=float, default=0.5, help="see --margin [%(default)s]")
    p.add_argument("--k", type=float, default=1000.0, help="gate steepness per detector logit [%(default)s]")
    p.add_argument("--lam", type=float, default=3.0, help="silent: weight of the target in the silent channel [%(default)s]")
    p.add_argument("--strength", type=float, default=100.0, help="silent: weight of the silent channel [%(default)s]")
    p.add_argument("--silent-mode", choices=["filter", "trigger"], default="trigger",
                   help="silent: 'filter' = the paper's orthogonal filter on the layer input; 'trigger' = fires when "
                        "the pooled unit or its target leaves its natural range, then the target drives it [%(default)s]")
    p.add_argument("--silent-margin-range", type=float, default=4.0,
                   help="silent: firing level = calibration mean + this x (max - mean), at least max + 1 sd [%(default)s]")
    p.add_argument("--silent-offset", type=float, default=10.0,
                   help="silent (trigger): added to the standardized target drive [%(default)s]")
    p.add_argument("--silent-width", type=float, default=10.0,
                   help="silent (trigger): ramp width of the trigger, in sd [%(default)s]")
    p.add_argument("--eval-units", type=int, default=4, help="manipulated units whose FVs are rendered [%(default)s]")
    p.add_argument("--eval-seeds", type=int, default=2, help="FV seeds per evaluated unit [%(default)s]")
    p.add_argument("--eval-steps", type=int, default=256, help="FV steps for the evaluation [%(default)s]")
    p.add_argument("--fv-size", type=int, default=None, help="FV side in px [model input size]")
    p.add_argument("--no-check", action="store_true", help="skip the closed-loop path check")
    p.add_argument("--work", default=None, help="cache folder for FVs and the detector [OUT/work]")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run, eval_split=None)  # eval_split: recorded in config.json by run


def _images(lm, folder, limit, seed):
    from ..data import load_images

    return load_images(folder, lm, limit=limit, seed=seed, into_memory=True)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..cli import resolve_device, save_config
    from ..errors import FVSanityError
    from ..fool import make_routes
    from ..fool.pipeline import FoolSettings, run_fool, split_indices
    from ..io import ensure_writable_dir
    from ..models import load_model

    for flag in ("det_units", "det_heldout_units", "det_seeds", "det_steps", "det_epochs", "eval_units", "eval_seeds",
                 "eval_steps", "fv_size", "limit"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise FVSanityError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    for flag, v, lo, strict in (("--k", args.k, 0, True), ("--strength", args.strength, 0, True),
                                ("--silent-width", args.silent_width, 0, True), ("--margin", args.margin, 0, False),
                                ("--margin-sd", args.margin_sd, 0, False)):
        if not (v > lo if strict else v >= lo):
            raise FVSanityError(f"{flag} must be {'>' if strict else '>='} {lo}, got {v}")
    if not 0 < args.split < 1:
        raise FVSanityError(f"--split must be in (0, 1), got {args.split}")
    out = ensure_writable_dir(args.out or "runs/fool")
    device = resolve_device(args.device)
    lm = load_model(args.model, weights=args.weights, pretrained=not args.random_weights, device=device,
                    allow_partial=args.allow_partial_weights, seed=args.seed)
    if args.train_images is None:
        from ..defaults import default_images

        args.train_images = str(default_images(lm))
    train = _images(lm, args.train_images, args.limit, args.seed)
    if args.eval_images is None or Path(args.eval_images).resolve() == Path(args.train_images).resolve():
        tr, ev = split_indices(len(train), args.split, args.seed)
        eval_nat, train_imgs = train.subset(ev), train.images[tr]
        args.eval_split = {"train": len(tr), "eval": len(ev), "seed": args.seed, "from": args.train_images}
    else:
        eval_nat, train_imgs = _images(lm, args.eval_images, args.limit, args.seed), train.images
    shift = args.shift
    out_c = lm.layer_info(lm.output_layer).layout.channels
    if args.target is None and shift is None:
        shift = max(1, out_c // 10)  # 100 of ImageNet's 1000 classes, 1 of CIFAR-10's 10
    if args.target is not None and shift is not None:
        raise FVSanityError("give either --target or --shift, not both")
    if shift is not None:
        if shift % out_c == 0 and args.unit in ("all", f"{lm.output_layer}:all"):
            raise FVSanityError(f"--shift {shift} is a multiple of the {out_c} class units (identity); valid: 1..{out_c - 1}")
    routes = make_routes(lm, args.unit, args.target, shift=shift, picture_size=lm.input_size)
    try:
        ckpts = tuple(int(c) for c in args.det_checkpoints.split(",") if c.strip())
    except ValueError as e:
        raise FVSanityError(f"--det-checkpoints must be comma-separated step numbers, got {args.det_checkpoints!r}") from e
    if any(not 1 <= c <= args.det_steps for c in ckpts):
        raise FVSanityError(f"--det-checkpoints {args.det_checkpoints!r} out of range; valid: 1..{args.det_steps} (--det-steps)")
    settings = FoolSettings(
        method=args.method, seed=args.seed, fv_size=args.fv_size, det_units=args.det_units,
        det_heldout_units=args.det_heldout_units, det_seeds=args.det_seeds, det_steps=args.det_steps,
        det_checkpoints=ckpts, det_epochs=args.det_epochs, margin=args.margin, margin_sd=args.margin_sd, k=args.k,
        lam=args.lam, strength=args.strength, silent_mode=args.silent_mode,
        silent_margin_range=args.silent_margin_range, silent_offset=args.silent_offset,
        silent_width=args.silent_width, eval_units=args.eval_units, eval_seeds=args.eval_seeds,
        eval_steps=args.eval_steps, check=not args.no_check, progress=not args.no_progress,
    )
    args.model_provenance = lm.provenance()  # weights, and any entries a partial load left random
    save_config(args, out)
    torch.manual_seed(args.seed)  # nothing below draws from it; set for any third-party code
    res = run_fool(lm, routes, train_imgs, eval_nat, settings, out, work_dir=args.work)
    s = res.summary
    print(f"identical top-1 {s['identical_top1_fraction']:.4f}; top-1 {s['top1_original']:.4f} -> {s['top1_manipulated']:.4f}; "
          f"SSIM(FV, target) {s['ssim_manipulated_fv_to_target']:.3f} (original {s['ssim_original_fv_to_target']:.3f}); "
          f"time x{s['inference_time_ratio']:.3f}; check flags it: {s['check_flags_manipulation']} "
          f"(control: {s.get('check_control_flagged_fraction')})")
    print(f"wrote {out / 'fool.json'}, {out / 'fool.png'}, {out / 'model'}")
    return 0
