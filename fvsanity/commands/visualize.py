"""``fvsanity visualize``: feature visualizations of one or more units, batched."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    from ..cli import add_common

    p = sub.add_parser("visualize", help="generate feature visualizations", description=__doc__)
    add_common(p, out_default="runs/visualize")
    p.add_argument("--unit", action="append", required=True, help="LAYER:CHANNEL[@Y,X] (repeatable, or comma-separated)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per unit [%(default)s]")
    p.add_argument("--steps", type=int, default=512, help="optimization steps [%(default)s]")
    p.add_argument("--size", type=int, default=None, help="image side in px [model input size]")
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate [%(default)s]")
    p.add_argument("--param", choices=["fft", "pixel"], default="fft", help="parametrization [%(default)s]")
    p.add_argument("--transforms", choices=["standard", "lucent", "none"], default="standard",
                   help="robustness transforms (standard = lucent's set scaled to the image size) [%(default)s]")
    p.add_argument("--diversity", type=float, default=0.0, help="diversity weight across seeds [%(default)s]")
    p.add_argument("--batch-size", type=int, default=None, help="elements per batch [all on CUDA, 64 on CPU]")
    p.add_argument("--checkpoints", default="", help="comma-separated steps at which to keep images too (e.g. 32,128)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..cli import resolve_device, save_config
    from ..errors import FVSanityError
    from ..generate import render
    from ..io import ensure_writable_dir
    from ..models import load_model
    from ..units import parse_units

    for flag, v in (("--steps", args.steps), ("--seeds", args.seeds), ("--size", args.size), ("--batch-size", args.batch_size)):
        if v is not None and v < 1:
            raise FVSanityError(f"{flag} must be >= 1, got {v}")
    if not args.lr > 0:
        raise FVSanityError(f"--lr must be > 0, got {args.lr}")
    try:
        checkpoints = [int(c) for c in str(args.checkpoints).split(",") if c.strip()]
    except ValueError:
        raise FVSanityError(f"--checkpoints must be comma-separated step numbers, got {args.checkpoints!r}") from None
    bad = [c for c in checkpoints if not 1 <= c <= args.steps]
    if bad:
        raise FVSanityError(f"--checkpoints {bad[0]} out of range; valid: 1..{args.steps} (--steps)")
    out = ensure_writable_dir(args.out)
    device = resolve_device(args.device)
    lm = load_model(args.model, weights=args.weights, pretrained=not args.random_weights, device=device, seed=args.seed,
                    allow_partial=args.allow_partial_weights)
    units = parse_units(args.unit, lm)
    seeds = [args.seed + i for i in range(args.seeds)]
    res = render(
        lm, units, seeds=seeds, steps=args.steps, size=args.size, lr=args.lr, param=args.param,
        transforms=args.transforms, diversity=args.diversity, batch_size=args.batch_size,
        progress=not args.no_progress,
        checkpoints=checkpoints,
    )
    res.save(out)
    args.model_provenance = lm.provenance()  # weights, and any entries a partial load left random
    save_config(args, out)
    for u, vals in zip(res.units, res.final.tolist()):
        print(f"{str(u):<24} final objective " + "  ".join(f"{v:9.3f}" for v in vals))
    print(f"wrote {len(res.units) * len(res.seeds)} FVs in {res.settings['seconds']:.1f}s to {Path(out).resolve()}"
          " (grid.png, fv.pt, fv.json)")
    return 0
