"""``fvsanity fool``: build a manipulated model whose FVs show a chosen target, and evaluate it.

Methods (``--method``, from the manipulation registry, ``fvsanity.fool.list_manipulations``):
{methods}. Each method's flags come from its settings dataclass.
Targets: ``unit:LAYER:CHANNEL`` (same layer), an image file, or ``--shift N`` (unit c shows
channel (c+N) mod C, the paper's permutation; default when no --target is given).
Natural images: ``--train-images`` build the detector / calibrate; ``--eval-images`` measure.
If they are the same folder (or --eval-images is omitted) the images are split at random
(``--split``, by ``--seed``). Writes ``model/`` (model.safetensors + manipulated.json; load with
``fvsanity.fool.load_manipulated`` or ``--model OUT/model``), ``fool.json``, ``fool.png`` and
``config.json`` to ``--out``.

Exit codes: 0 when the manipulation took effect (at least half of the evaluated units' manipulated
FVs reached their targets: ``effective_fraction`` in ``fool.json``, criterion in
``fvsanity.fool.effect``), 3 when it did not (one line on stderr naming the setting to raise;
``fool.json`` and the model are written all the same), 2 for bad input.
"""

from __future__ import annotations

import argparse
import dataclasses

_DOC = __doc__


def _methods_doc() -> str:
    from ..fool import get_manipulation, list_manipulations

    return "; ".join(f"``{n}`` ({get_manipulation(n).help})" for n in list_manipulations())


def _field_type(f: dataclasses.Field):
    """The Python type of a settings field's value (its default's, or the ``type`` it declares)."""
    return f.metadata.get("type") or type(f.default)


def add_method_flags(p: argparse.ArgumentParser) -> None:
    """One flag per field of every registered method's settings dataclass (``det_steps`` ->
    ``--det-steps``), in one argument group per method. Tuples of ints are comma-separated
    strings (parsed by :func:`method_settings_from_args`); booleans are ``--x/--no-x``.

    Raises:
        FVSanityError: two methods declare one field with different types or defaults, or a
            field takes the name of one of the command's own flags.
    """
    from ..errors import FVSanityError
    from ..fool import get_manipulation, list_manipulations

    own = {a.dest for a in p._actions}
    seen: dict[str, tuple[str, object, type]] = {}
    for name in list_manipulations():
        method = get_manipulation(name)
        group = None
        for f in dataclasses.fields(method.Settings):
            m = f.metadata
            if not m.get("flag", True):
                continue
            if f.name in seen:
                other, default, typ = seen[f.name]
                if (default, typ) != (f.default, _field_type(f)):
                    raise FVSanityError(f"manipulation {name!r}: setting {f.name!r} clashes with method {other!r}'s "
                                        f"(default {default!r}); rename it")
                continue
            if f.name in own:
                raise FVSanityError(f"manipulation {name!r}: setting {f.name!r} clashes with the fool command's own "
                                    f"--{f.name.replace('_', '-')}; rename it")
            if group is None:
                group = p.add_argument_group(f"--method {name}", method.help)
            seen[f.name] = (name, f.default, _field_type(f))
            flag = "--" + f.name.replace("_", "-")
            help_ = (m.get("help") or f.name) + " [%(default)s]"
            typ = _field_type(f)
            if typ is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
            elif typ is tuple:
                group.add_argument(flag, default=",".join(map(str, f.default)), help=help_)
            else:
                group.add_argument(flag, type=typ, default=f.default, choices=m.get("choices"), help=help_)


def method_settings_from_args(method, args: argparse.Namespace):
    """``method.Settings`` from the parsed flags (checked: one-line errors naming the flag)."""
    from ..errors import FVSanityError

    vals = {}
    for f in dataclasses.fields(method.Settings):
        if not f.metadata.get("flag", True) or not hasattr(args, f.name):
            continue
        v = getattr(args, f.name)
        if _field_type(f) is tuple and isinstance(v, str):
            try:
                v = tuple(int(c) for c in v.split(",") if c.strip())
            except ValueError as e:
                flag = "--" + f.name.replace("_", "-")
                raise FVSanityError(f"{flag} must be comma-separated step numbers, got {v!r}") from e
        elif isinstance(v, list):  # from a --config file
            v = tuple(v)
        vals[f.name] = v
    return method.make_settings(**vals)


#: ``fvsanity fool``'s exit code when the manipulation did not take effect
NOT_EFFECTIVE = 3


def register(sub) -> None:
    from ..cli import add_common
    from ..fool import list_manipulations
    from ..fool.pipeline import FoolSettings

    d = FoolSettings()  # the one place the evaluation defaults are declared

    doc = _DOC.replace("{methods}", _methods_doc())
    p = sub.add_parser("fool", help="build and evaluate a model whose FVs are manipulated", description=doc)
    add_common(p, out_default="runs/fool")
    p.add_argument("--unit", "--units", dest="unit", default="all",
                   help="units to manipulate: LAYER:C[,LAYER:C], LAYER:a-b, LAYER:all or all "
                        "(every class unit of the output layer) [%(default)s]")
    p.add_argument("--target", default=None, help="unit:LAYER:CHANNEL or an image file [permutation by --shift]")
    p.add_argument("--shift", type=int, default=None, help="unit c shows channel (c+shift) mod C [C // 10 without --target: 100 of 1000 classes]")
    p.add_argument("--method", choices=list_manipulations(), default="circuit", help="[%(default)s]")
    p.add_argument("--train-images", default=None, help="natural images for the detector / calibration [CIFAR-10 default]")
    p.add_argument("--eval-images", default=None, help="held-out natural images [a split of --train-images]")
    p.add_argument("--split", type=float, default=0.5, help="training fraction when splitting one folder [%(default)s]")
    p.add_argument("--limit", type=int, default=None, help="use at most this many images per folder (by --seed)")
    p.add_argument("--eval-units", type=int, default=d.eval_units, help="manipulated units whose FVs are rendered [%(default)s]")
    p.add_argument("--eval-seeds", type=int, default=d.eval_seeds,
                   help="FV seeds per evaluated unit: the closed-loop check's replicates (8 reach a claim over a "
                        "path of up to 12 layers) [%(default)s]")
    p.add_argument("--eval-steps", type=int, default=d.eval_steps, help="FV steps for the evaluation [%(default)s]")
    p.add_argument("--fv-size", type=int, default=None, help="FV side in px [model input size]")
    p.add_argument("--no-check", action="store_true", help="skip the closed-loop path check")
    p.add_argument("--work", default=None, help="cache folder for FVs and the detector [OUT/work]")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_method_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..cli import check_ints, resolve_device, save_config
    from ..errors import FVSanityError
    from ..fool import get_manipulation
    from ..fool.api import fool_settings, prepare_fool
    from ..generate import RenderSettings
    from ..io import ensure_writable_dir
    from ..models import load_model

    check_ints(args, {"eval_units": (1, None), "eval_seeds": (1, None), "eval_steps": (1, RenderSettings.MAX_STEPS),
                      "fv_size": (1, RenderSettings.MAX_SIZE), "limit": (1, None)})
    if not 0 < args.split < 1:
        raise FVSanityError(f"--split must be in (0, 1), got {args.split}")
    method = get_manipulation(args.method)
    method_settings = method_settings_from_args(method, args)  # checked here, before anything loads
    settings = fool_settings(args.method, method_settings=method_settings, seed=args.seed, fv_size=args.fv_size,
                             eval_units=args.eval_units, eval_seeds=args.eval_seeds, eval_steps=args.eval_steps,
                             check=not args.no_check, progress=not args.no_progress)
    out = ensure_writable_dir(args.out or "runs/fool")
    device = resolve_device(args.device)
    lm = load_model(args.model, weights=args.weights, pretrained=not args.random_weights, device=device,
                    allow_partial=args.allow_partial_weights, seed=args.seed)
    plan = prepare_fool(lm, args.unit, args.target, method=args.method, shift=args.shift, out=out, work=args.work,
                        settings=settings, images={"train": args.train_images, "eval": args.eval_images,
                                                   "split": args.split, "limit": args.limit})
    args.model_provenance = lm.provenance()  # weights, and any entries a partial load left random
    save_config(args, out)  # every input checked; before the long run: an interrupted run says how it began
    res = plan.run()
    s = res.summary
    top1 = s.get("fv_top1_is_target_class_manipulated")
    top1_txt = "" if top1 is None else (f"FVs called the target class {top1:.2f} "
                                        f"(original {s['fv_top1_is_target_class_original']:.2f}); ")
    print(f"identical top-1 {s['identical_top1_fraction']:.4f}; top-1 {s['top1_original']:.4f} -> {s['top1_manipulated']:.4f}; "
          f"SSIM(FV, target) {s['ssim_manipulated_fv_to_target']:.3f} (original {s['ssim_original_fv_to_target']:.3f}); "
          f"{top1_txt}effective on {s['effective_fraction']:.2f} of the evaluated units; "
          f"time x{s['inference_time_ratio']:.3f}; check flags it: {s['check_flags_manipulation']} "
          f"(control: {s.get('check_control_flagged_fraction')})")
    print(f"wrote {out / 'fool.json'}, {out / 'fool.png'}, {out / 'model'}")
    if s.get("took_effect") is False:
        import sys

        print(f"fvsanity: the manipulation did not take effect: {res.details['effect']['n_effective']} of "
              f"{res.details['effect']['n_units']} evaluated units reached their target (effective_fraction "
              f"{s['effective_fraction']:.2f}); {s['not_effective_hint']}", file=sys.stderr)
        return NOT_EFFECTIVE
    return 0
