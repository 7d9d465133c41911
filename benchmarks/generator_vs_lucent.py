"""fvsanity's batched generator vs lucent's ``render_vis`` looped over the same units.

Run (from the repository root):
    FVSANITY_DATA=../shared/data python benchmarks/generator_vs_lucent.py \
        [--model cifar10-resnet20|imagenet-squeezenet] [--units 16] [--steps 64] [--device cpu]

Both sides get the same model, the same class units of the model's output layer, the same
number of Adam steps (lr 0.05), the same image size (the model's input size), the same
Fourier parametrization (lucent's ``param.image(size)``: FFT, decorrelated colours), the same
robustness transforms (lucent's standard set with its pixel magnitudes scaled to the image
size, i.e. fvsanity's ``TransformSpec.standard(size)``, built from lucent's own transform
functions) and the model's own preprocessing (``lm.preprocess``, as lucent's last transform;
lucent's ``preprocess=True`` would apply ImageNet mean/std, which is wrong for SqueezeNet's
Caffe input and for CIFAR). lucent is told ``fixed_image_size=size``, so after its transforms it
resamples the canvas back to ``size`` px; fvsanity optimizes on the slightly larger transformed
canvas (``size + 2 pad - jitters``, ~6-13% more pixels), which only handicaps fvsanity.
``--lucent-canvas default`` gives lucent its own default instead (no ``fixed_image_size``: the
model sees the transformed canvas, about as large as fvsanity's), the like-for-like comparison
of the two libraries' defaults.

``--lucent-weights`` says what lucent's model copy is: ``trainable`` (its parameters require
gradients, as torchvision, timm and lucent's own model zoo return a model and as lucent's
tutorials use it: each backward then also computes, and accumulates, every weight's gradient) or
``frozen`` (``requires_grad`` off, as fvsanity's ``load_model`` prepares every model: lucent's best
case, fvsanity's own optimization handed to it). Both by default, interleaved in the same rounds;
``throughput_ratio_vs_lucent`` is against the first kind given, and each kind's ratio is in
``throughput_ratio_vs_lucent_<kind>``. The weights' flag does not change an input gradient, so
both kinds give the same images (``lucent_kinds_max_abs_diff``).

lucent hooks every module on every ``render_vis`` call and never removes the hooks, so each of
its units runs on a fresh deep copy of the model (copying is not timed). fvsanity renders all
units in one batch (chunks of ``--batch-size`` on CPU).

fvsanity's side runs in the dtype ``render`` picks by default (``--amp auto``: bf16 autocast +
channels_last on CUDA and on CPUs with native bf16, :func:`fvsanity.generate.cpu_bf16_fast`;
``--amp off`` forces float32); lucent's runs in float32 (it has no mixed precision).

Measured side by side in one run, interleaved so that load from other processes on a shared
machine hits both sides alike: ``--repeats`` rounds, each one fvsanity render of all units, one
slice of lucent's units and a block of as many bare forward+backward passes as fvsanity's render
has steps. Each figure uses the fastest sample of each side (the least disturbed one; lucent: its
fastest unit times the unit count), and the raw totals are reported too:
- ``throughput_ratio_vs_lucent``: lucent's time for the N FVs / fvsanity's time for the same FVs
  (``throughput_ratio_totals``: lucent's summed time / fvsanity's mean render time).
- ``overhead_vs_fwd_bwd``: fvsanity's time per optimization step (the step loop only, from its
  settings' ``seconds``) / one forward+backward (input gradient, model + preprocessing) of a
  batch of the same size at the same canvas size, in the same dtype and memory format (fastest
  block mean).
- ``objective_ratio_vs_lucent``: mean final objective (untransformed image at the model's input
  size, fvsanity's ``evaluate``, float32) of fvsanity's FVs / lucent's.
The last line printed is one JSON object with these figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's fvsanity, not an installed one


def lucent_transforms(spec, preprocess) -> list:
    """lucent's standard transforms with fvsanity's magnitudes, then the model's preprocessing."""
    from lucent.optvis import transform as LT

    out = [LT.pad(spec.pad, mode="constant", constant_value=0.5)] if spec.pad else []
    out += [LT.jitter(spec.jitter1)] if spec.jitter1 > 1 else []  # a jitter of 1 px is no jitter
    out += [LT.random_scale(list(spec.scales)), LT.random_rotate(list(spec.angles))]
    out += [LT.jitter(spec.jitter2)] if spec.jitter2 > 1 else []
    return out + [preprocess]


def render_lucent(lm, unit, steps: int, size: int, spec, seed: int, fixed: bool = True,
                  trainable: bool = False) -> tuple[torch.Tensor, float]:
    """One lucent FV of ``unit``: (image [1, 3, H, W] RGB in [0, 1], seconds). ``fixed``: lucent's
    ``fixed_image_size=size`` (resample the transformed canvas to ``size``), else lucent's default
    (the model sees the transformed canvas, as fvsanity's). ``trainable``: the copy's parameters
    require gradients (a model as torchvision returns it), else they are frozen."""
    from lucent.optvis import objectives, param
    from lucent.optvis import render as lrender

    model = copy.deepcopy(lm.model).eval()
    for p in model.parameters():
        p.requires_grad_(trainable)
    np.random.seed(seed)
    torch.manual_seed(seed)
    t = time.perf_counter()
    imgs = lrender.render_vis(
        model, objectives.channel(unit.layer.replace(".", "_"), unit.channel),
        param_f=lambda: param.image(size), transforms=lucent_transforms(spec, lm.preprocess), preprocess=False,
        thresholds=(steps,), show_image=False, progress=False, fixed_image_size=size if fixed else None,
    )
    seconds = time.perf_counter() - t
    return torch.as_tensor(np.asarray(imgs[-1])).permute(0, 3, 1, 2).float(), seconds


def fwd_bwd_seconds(lm, batch: int, hw: tuple[int, int], device, repeats: int, amp: bool = False) -> float:
    """Mean seconds per forward+backward (input gradient) of ``batch`` images of size ``hw`` over a
    block of ``repeats`` passes, as ``render`` runs them: preprocessing in float32, then (``amp``)
    channels_last and the model under bf16 autocast. A block as long as a render's step loop, so
    that on a loaded machine the fastest block and the fastest render see alike load."""
    import contextlib

    x = torch.rand(batch, 3, *hw, device=device, requires_grad=True)

    def once():
        x.grad = None
        z = lm.preprocess(x)
        if amp:
            z = z.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with ctx:
            y = lm.model(z)
        y.float().sum().backward()

    for _ in range(2):
        once()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        once()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cifar10-resnet20", help="cifar10-resnet20 | imagenet-squeezenet [%(default)s]")
    ap.add_argument("--units", type=int, default=16, help="class units of the output layer [%(default)s]")
    ap.add_argument("--steps", type=int, default=64, help="optimization steps [%(default)s]")
    ap.add_argument("--device", default="cpu", help="cpu | cuda [%(default)s]")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")),
                    help="CPU threads [$OMP_NUM_THREADS or 2]")
    ap.add_argument("--batch-size", type=int, default=None, help="fvsanity elements per batch [all units]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--random-weights", action="store_true", help="random weights (timing only, e.g. googlenet)")
    ap.add_argument("--amp", choices=["auto", "on", "off"], default="auto",
                    help="fvsanity's bf16 autocast + channels_last: auto = render's default (CUDA, CPUs with "
                         "native bf16) [%(default)s]")
    ap.add_argument("--lucent-canvas", choices=["fixed", "default"], default="fixed",
                    help="lucent's canvas: fixed = fixed_image_size=size (resampled to the model's size, "
                         "fewer pixels than fvsanity's transformed canvas); default = lucent's default, the "
                         "transformed canvas as fvsanity uses it [%(default)s]")
    ap.add_argument("--lucent-weights", default="trainable,frozen",
                    help="lucent's model copy, comma-separated kinds measured side by side: trainable (as "
                         "torchvision returns a model), frozen (requires_grad off, as fvsanity prepares it); "
                         "the headline ratio is against the first [%(default)s]")
    ap.add_argument("--repeats", type=int, default=3,
                    help="interleaved rounds (fvsanity renders; lucent's units split over them) [%(default)s]")
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.lucent_weights.split(",") if k.strip()]
    if not kinds or any(k not in ("trainable", "frozen") for k in kinds) or len(set(kinds)) != len(kinds):
        raise SystemExit(f"--lucent-weights {args.lucent_weights!r} is not valid; valid: trainable, frozen or both, "
                         f"comma-separated")
    torch.set_num_threads(args.threads)

    from fvsanity import load_model, parse_unit
    from fvsanity.generate import evaluate, render
    from fvsanity.generate.transforms import TransformSpec
    from fvsanity.units import describe_layers

    device = torch.device(args.device)
    lm = load_model(args.model, device=device, pretrained=not args.random_weights)
    size = lm.input_size[0]
    spec = TransformSpec.standard(size)
    n_ch = {name: shape for name, _, shape in describe_layers(lm)}[lm.output_layer][0]
    units = [parse_unit(f"{lm.output_layer}:{(i * 7) % n_ch}", lm) for i in range(args.units)]
    bs = args.batch_size or len(units)
    amp = {"auto": None, "on": True, "off": False}[args.amp]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    render(lm, units[:1], seeds=[args.seed], steps=2, progress=False, transforms=spec, amp=amp)  # warm-up
    canvas = spec.output_size(lm.input_size)
    n_batches = (len(units) + bs - 1) // bs
    rounds = max(1, min(args.repeats, len(units)))
    t_ours, loop_ours, t_fb = [], [], []
    t_units = {k: [] for k in kinds}
    imgs = {k: [None] * len(units) for k in kinds}
    for r in range(rounds):  # interleaved: load from other processes hits both sides alike
        sync()
        t = time.perf_counter()
        ours = render(lm, units, seeds=[args.seed], steps=args.steps, transforms=spec, batch_size=bs,
                      progress=False, amp=amp)
        sync()
        t_ours.append(time.perf_counter() - t)
        loop_ours.append(float(ours.settings["seconds"]))
        for i in range(r, len(units), rounds):
            for k in kinds:
                imgs[k][i], sec = render_lucent(lm, units[i], args.steps, size, spec, args.seed + i,
                                                fixed=args.lucent_canvas == "fixed", trainable=k == "trainable")
                t_units[k].append(sec)
        t_fb.append(fwd_bwd_seconds(lm, min(bs, len(units)), canvas, device, repeats=args.steps * n_batches,
                                    amp=bool(ours.settings.get("amp"))))
    theirs = imgs[kinds[0]]
    # lucent's default canvas returns the untransformed image at its parametrization's size (= size)
    obj_theirs = torch.stack([evaluate(lm, img[None], [u], device)[0][0, 0] for img, u in zip(theirs, units)])
    obj_ours = ours.final[:, 0]

    per_step = min(loop_ours) / (args.steps * n_batches)
    ratio = {k: round(min(t_units[k]) * len(units) / min(t_ours), 3) for k in kinds}
    result = {
        "throughput_ratio_vs_lucent": ratio[kinds[0]],
        "overhead_vs_fwd_bwd": round(per_step / min(t_fb), 3),
        "objective_ratio_vs_lucent": round((obj_ours.mean() / obj_theirs.mean()).item(), 3),
        "units": len(units),
        "steps": args.steps,
        "size": size,
        "device": str(device),
        "dtype": ours.settings.get("dtype", "float32"),
        "model": lm.name,
        "threads": args.threads,
        "lucent_canvas": args.lucent_canvas,
        "lucent_weights": kinds[0],
        **{f"throughput_ratio_vs_lucent_{k}": ratio[k] for k in kinds},
        "lucent_kinds_max_abs_diff": (max(float((a - b).abs().max()) for a, b in zip(imgs[kinds[0]], imgs[kinds[1]]))
                                      if len(kinds) == 2 else None),
        "repeats": rounds,
        "throughput_ratio_totals": round(sum(t_units[kinds[0]]) / (sum(t_ours) / rounds), 3),
        "seconds_fvsanity": round(min(t_ours), 3),
        **{("seconds_lucent" if k == kinds[0] else f"seconds_lucent_{k}"): round(min(t_units[k]) * len(units), 3)
           for k in kinds},
        "seconds_lucent_total": round(sum(t_units[kinds[0]]), 3),
        "ms_per_step_fvsanity": round(1e3 * per_step, 2),
        "ms_fwd_bwd": round(1e3 * min(t_fb), 2),
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    t_ours = min(t_ours)
    t_lucent = result["seconds_lucent"]
    t_fb = min(t_fb)
    print(f"model {lm.name}: {len(units)} class units, {args.steps} steps, {size} px, {device}, {args.threads} threads")
    print(f"fvsanity (batched): {t_ours:.2f} s   lucent render_vis (looped, {kinds[0]} weights): {t_lucent:.2f} s   "
          f"ratio {result['throughput_ratio_vs_lucent']:.2f}x")
    for k in kinds[1:]:
        print(f"  vs lucent with {k} weights: {min(t_units[k]) * len(units):.2f} s, ratio {ratio[k]:.2f}x")
    print(f"fvsanity per step {1e3 * per_step:.1f} ms vs bare forward+backward {1e3 * t_fb:.1f} ms: "
          f"overhead {result['overhead_vs_fwd_bwd']:.2f}x")
    for u, a, b in zip(units, obj_ours.tolist(), obj_theirs.tolist()):
        print(f"  {str(u):<18} objective fvsanity {a:9.3f}   lucent {b:9.3f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
