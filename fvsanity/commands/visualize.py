"""``fvsanity visualize``: feature visualizations of one or more units, batched."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path


def register(sub) -> None:
    from ..cli import add_common
    from ..generate import OBJECTIVES, OPTIMIZERS, PARAMS

    p = sub.add_parser("visualize", help="generate feature visualizations", description=__doc__)
    add_common(p, out_default="runs/visualize")
    p.add_argument("--unit", action="append", required=True, help="LAYER:CHANNEL[@Y,X] (repeatable, or comma-separated)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per unit [%(default)s]")
    p.add_argument("--steps", type=int, default=512, help="optimization steps [%(default)s]")
    p.add_argument("--size", type=int, default=None, help="image side in px [model input size]")
    p.add_argument("--lr", type=float, default=0.05, help="learning rate [%(default)s]")
    p.add_argument("--param", choices=list(PARAMS.names()), default="fft",
                   help="image parametrization (maco = phase only, fixed magnitude spectrum) [%(default)s]")
    p.add_argument("--param-opt", action="append", default=None, metavar="KEY=VALUE",
                   help="parametrization option, repeatable (e.g. decay_power=1.5; maco: magnitude=SPECTRUM.pt, contrast=1.5)")
    p.add_argument("--objective", choices=list(OBJECTIVES.names()), default=None,
                   help="how each unit becomes an objective [the unit's own: channel mean, neuron at @Y,X, or direction]")
    p.add_argument("--optimizer", choices=list(OPTIMIZERS.names()), default="adam", help="optimizer [%(default)s]")
    p.add_argument("--optimizer-opt", action="append", default=None, metavar="KEY=VALUE",
                   help="optimizer option, repeatable (e.g. momentum=0.5)")
    p.add_argument("--transforms", choices=["standard", "lucent", "none"], default="standard",
                   help="robustness transforms (standard = lucent's set scaled to the image size) [%(default)s]")
    p.add_argument("--diversity", type=float, default=0.0, help="diversity weight across seeds [%(default)s]")
    p.add_argument("--batch-size", type=int, default=None, help="FV compute width: elements per optimization batch, "
                   "fixed (changes the last bits, so recorded and hashed) [8 on CPU, 32 on CUDA]")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast + channels_last for the model (FVs differ slightly from float32; recorded as "
                        "dtype) [auto: on for CUDA and CPUs with native bf16, or $FVSANITY_AMP=on|off]")
    p.add_argument("--checkpoints", default="", help="comma-separated steps at which to keep images too (e.g. 32,128)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run, model_provenance=None)  # model_provenance: recorded in config.json by run


def parse_options(flag: str, items) -> dict:
    """``["k=v", ...]`` -> {k: v}; a value is read as JSON when it parses (numbers, true/false,
    lists), else kept as a string (a file path)."""
    import json

    from ..errors import FVSanityError

    out = {}
    for item in items or ():
        key, eq, value = str(item).partition("=")
        if not eq or not key.strip():
            raise FVSanityError(f"{flag} {item!r} must be KEY=VALUE (e.g. decay_power=1.5)")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


#: RenderSettings field -> the flag that sets it
_FLAGS = {"param_options": "--param-opt", "optimizer_options": "--optimizer-opt"}


@contextlib.contextmanager
def _as_flags():
    """A :class:`~fvsanity.errors.SettingError` of a RenderSettings field, named by its flag (``lr`` -> ``--lr``)."""
    from ..errors import SettingError

    try:
        yield
    except SettingError as e:
        raise e.renamed(_FLAGS.get(e.name, "--" + e.name.replace("_", "-"))) from None


def run(args: argparse.Namespace) -> int:
    from ..distributed import sharded

    with sharded(args.device) as shard:  # torchrun: units split over the ranks, rank 0 saves
        return _run(args, shard, shard.device(args.device))


def _run(args: argparse.Namespace, shard, device) -> int:
    from ..cli import check_ints, save_config
    from ..distributed import render_sharded
    from ..errors import FVSanityError, SettingError
    from ..generate import RenderSettings
    from ..generate.render import check_canvas
    from ..io import ensure_writable_dir
    from ..models import load_model
    from ..units import check_distinct, parse_units

    check_ints(args, {"seeds": (1, None), "steps": (1, RenderSettings.MAX_STEPS), "size": (1, RenderSettings.MAX_SIZE),
                      "batch_size": (1, None)})  # the other settings: RenderSettings below
    try:
        checkpoints = [int(c) for c in str(args.checkpoints).split(",") if c.strip()]
    except ValueError:
        raise FVSanityError(f"--checkpoints must be comma-separated step numbers, got {args.checkpoints!r}") from None
    args.param_opt, args.optimizer_opt = list(args.param_opt or []), list(args.optimizer_opt or [])  # config.json: lists
    bad = [c for c in checkpoints if not 1 <= c <= args.steps]
    if bad:
        raise FVSanityError(f"--checkpoints {bad[0]} out of range; valid: 1..{args.steps} (--steps)")
    param_options = parse_options("--param-opt", args.param_opt)
    optimizer_options = parse_options("--optimizer-opt", args.optimizer_opt)
    with _as_flags():  # every setting checked here, before anything is loaded or written
        settings = RenderSettings(
            steps=args.steps, size=args.size, lr=args.lr, param=args.param, param_options=param_options,
            transforms=args.transforms, diversity=args.diversity, optimizer=args.optimizer,
            optimizer_options=optimizer_options, batch_size=args.batch_size, progress=not args.no_progress,
            amp=args.amp, checkpoints=checkpoints,
        )
    out = ensure_writable_dir(args.out)
    lm = load_model(args.model, weights=args.weights, pretrained=not args.random_weights, device=device, seed=args.seed,
                    allow_partial=args.allow_partial_weights)
    units = check_distinct(parse_units(args.unit, lm), "--unit")
    hw = lm.input_size if args.size is None else (args.size, args.size)
    check_canvas(lm, hw, "--size")
    try:
        settings.check_memory(len(units) * args.seeds, hw)
    except SettingError as e:
        if args.size is not None:
            raise e.renamed("--size") from None
        raise FVSanityError(f"--seeds {args.seeds} for {len(units)} unit(s) is too many: {e}") from None
    seeds = [args.seed + i for i in range(args.seeds)]
    res = render_sharded(shard, lm, units, seeds, settings, objective=args.objective)
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
