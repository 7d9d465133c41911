"""GPU figures for benchmarks/gpu.sh: bf16 vs float32, and a timed 1000-unit GoogLeNet sweep.

Run: python benchmarks/gpu_figures.py [--device cuda] [--units 64] [--steps 64]
     [--sweep-units 200] [--sweep-steps 32]   (small values also run on a CPU, for a dry run)

1. ``bf16``: the same units rendered with bf16 autocast + channels_last and in float32, side by
   side (SqueezeNet class units when its weights are found, else GoogLeNet with random weights):
   time ratio and mean final objective ratio (objective parity).
2. ``googlenet_sweep``: torchvision GoogLeNet, random weights, 224 px, class units of ``fc``: one
   timed batch of ``--sweep-units`` units x ``--sweep-steps`` steps, extrapolated linearly to all
   1000 units x 512 steps (per-step cost is flat in the step count; batches of ``--sweep-units``).
Each part prints one JSON line with a ``benchmark`` key.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _timed_render(lm, units, steps, device, amp):
    from fvsanity.generate import render

    render(lm, units[:2], seeds=[0], steps=2, device=device, amp=amp, progress=False)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    res = render(lm, units, seeds=[0], steps=steps, device=device, amp=amp, batch_size=len(units), progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return res, time.perf_counter() - t


def _class_units(lm, n):
    from fvsanity import parse_unit
    from fvsanity.units import describe_layers

    n_ch = {name: shape for name, _, shape in describe_layers(lm)}[lm.output_layer][0]
    return [parse_unit(f"{lm.output_layer}:{(i * 7) % n_ch}", lm) for i in range(n)]


def bf16_vs_fp32(device, n_units, steps) -> dict:
    from fvsanity import load_model
    from fvsanity.errors import MissingWeightsError

    try:
        lm = load_model("imagenet-squeezenet", device=device)
    except MissingWeightsError:
        lm = load_model("googlenet", pretrained=False, device=device)
    units = _class_units(lm, n_units)
    fp, t_fp = _timed_render(lm, units, steps, device, amp=False)
    bf, t_bf = _timed_render(lm, units, steps, device, amp=True)
    return {
        "benchmark": "bf16", "model": lm.name, "units": n_units, "steps": steps, "device": str(device),
        "seconds_float32": round(t_fp, 3), "seconds_bf16": round(t_bf, 3), "speedup_bf16": round(t_fp / t_bf, 3),
        "objective_ratio_bf16_vs_float32": round((bf.final.mean() / fp.final.mean()).item(), 4),
    }


def googlenet_sweep(device, n_units, steps, total_units=1000, total_steps=512) -> dict:
    from fvsanity import load_model

    lm = load_model("googlenet", pretrained=False, device=device)
    units = _class_units(lm, n_units)
    amp = device.type == "cuda"
    _, t = _timed_render(lm, units, steps, device, amp=amp)
    per_unit_step = t / (n_units * steps)
    est = per_unit_step * total_units * total_steps
    return {
        "benchmark": "googlenet_sweep", "model": "googlenet (random weights)", "size": 224, "device": str(device),
        "dtype": "bfloat16" if amp else "float32", "timed_units": n_units, "timed_steps": steps,
        "timed_seconds": round(t, 3), "ms_per_unit_step": round(1e3 * per_unit_step, 4),
        "estimated_seconds_1000_units_512_steps": round(est, 1),
        "estimated_fvs_per_gpu_hour": round(3600 / (per_unit_step * total_steps), 1),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--units", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--sweep-units", type=int, default=200)
    ap.add_argument("--sweep-steps", type=int, default=32)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    print(json.dumps(bf16_vs_fp32(device, args.units, args.steps)), flush=True)
    print(json.dumps(googlenet_sweep(device, args.sweep_units, args.sweep_steps)), flush=True)


if __name__ == "__main__":
    main()
