"""``fvsanity visualize``: feature visualizations of one or more units, batched."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path


def register(sub) -> None:
    from ..checking import FVSettings
    from ..cli import add_common
    from ..generate import OBJECTIVES
    from ..settings import add_flags

    p = sub.add_parser("visualize", help="generate feature visualizations", description=__doc__)
    add_common(p, out_default="runs/visualize")
    p.add_argument("--unit", action="append", required=True, help="LAYER:CHANNEL[@Y,X] (repeatable, or comma-separated)")
    add_flags(p, FVSettings)  # every setting, declared once in its dataclass
    p.add_argument("--objective", choices=list(OBJECTIVES.names()), default=None,
                   help="how each unit becomes an objective [the unit's own: channel mean, neuron at @Y,X, or direction]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run, model_provenance=None)  # model_provenance: recorded in config.json by run


def run(args: argparse.Namespace) -> int:
    from ..distributed import sharded

    with sharded(args.device) as shard:  # torchrun: units split over the ranks, rank 0 saves
        return _run(args, shard, shard.device(args.device))


def _run(args: argparse.Namespace, shard, device) -> int:
    from ..checking import FVSettings
    from ..cli import save_config
    from ..distributed import render_sharded
    from ..errors import FVSanityError, SettingError
    from ..generate.render import check_canvas
    from ..io import ensure_writable_dir
    from ..models import load_model
    from ..settings import from_args
    from ..units import check_distinct, parse_units

    args.param_opt, args.optimizer_opt = list(args.param_opt or []), list(args.optimizer_opt or [])  # config.json: lists
    fvs = from_args(FVSettings, args)  # every setting checked here, named by its flag, before anything is loaded
    settings = dataclasses.replace(fvs.render, progress=not args.no_progress)
    bad = [c for c in settings.checkpoints if not 1 <= c <= settings.steps]
    if bad:
        raise FVSanityError(f"--checkpoints {bad[0]} out of range; valid: 1..{settings.steps} (--steps)")
    out = ensure_writable_dir(args.out)
    lm = load_model(args.model, weights=args.weights, pretrained=not args.random_weights, device=device, seed=args.seed,
                    allow_partial=args.allow_partial_weights)
    units = check_distinct(parse_units(args.unit, lm), "--unit")
    fvs = fvs.resolved(lm, units)  # automatic seeds: as many as a check of these units needs
    hw = lm.input_size if args.size is None else (args.size, args.size)
    check_canvas(lm, hw, "--size")
    try:
        settings.check_memory(len(units) * fvs.seeds, hw)
    except SettingError as e:
        if args.size is not None:
            raise e.renamed("--size") from None
        raise FVSanityError(f"--seeds {fvs.seeds} for {len(units)} unit(s) is too many: {e}") from None
    res = render_sharded(shard, lm, units, fvs.fv_seeds, settings, objective=args.objective)
    if res is None:
        return 0  # not rank 0: its FVs went to rank 0
    res.save(out)
    args.model_provenance = lm.provenance()  # weights, and any entries a partial load left random
    save_config(args, out)
    for u, vals in zip(res.units, res.final.tolist()):
        print(f"{str(u):<24} final objective " + "  ".join(f"{v:9.3f}" for v in vals))
    print(f"wrote {len(res.units) * len(res.seeds)} FVs in {res.settings['seconds']:.1f}s to {Path(out).resolve()}"
          " (grid.png, fv.pt, fv.json)")
    return 0
