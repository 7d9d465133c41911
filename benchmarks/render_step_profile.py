"""Where a render step's time goes, against a bare forward+backward, and whether torch.compile pays.

Run (from the repository root):
    FVSANITY_DATA=../shared/data python benchmarks/render_step_profile.py \
        [--model cifar10-resnet20|imagenet-squeezenet] [--batch 16] [--steps 20] [--amp auto|on|off]
        [--compile none|pipeline|model|both]

One render step as ``fvsanity.generate.render`` runs it (Fourier parametrization, the batched
grid_sample transforms, the model's preprocessing, the model under hooks with bf16 autocast +
channels_last when ``amp``, the batched objective, backward, Adam, the trace), split into phases
timed with ``perf_counter`` (CPU ops are synchronous; on CUDA each phase is synchronized), next to
a bare forward+backward of a batch of the same size and canvas in the same dtype and memory format.
Samples of the two are interleaved (one step, one bare pass) so load from other processes hits
both alike; each figure is the fastest sample (the least disturbed), medians are printed too.
``--compile`` wraps the image pipeline (parametrization + transforms + preprocessing) and/or the
model in ``torch.compile`` (compile time reported separately, not in the step times).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's fvsanity, not an installed one


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cifar10-resnet20")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--amp", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--compile", choices=["none", "pipeline", "model", "both"], default="none")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from fvsanity import load_model, parse_unit
    from fvsanity.generate import param as P
    from fvsanity.generate import resolve_amp
    from fvsanity.generate import transforms as T
    from fvsanity.generate.objectives import batched_unit_scores
    from fvsanity.hooks import capture_until, run_partial
    from fvsanity.units import describe_layers

    dev = torch.device(args.device)
    lm = load_model(args.model, device=dev)
    hw = tuple(lm.input_size)
    spec = T.TransformSpec.standard(hw[0])
    amp = resolve_amp({"auto": None, "on": True, "off": False}[args.amp], dev)
    n_ch = {n: s for n, _, s in describe_layers(lm)}[lm.output_layer][0]
    units = [parse_unit(f"{lm.output_layer}:{(i * 7) % n_ch}", lm) for i in range(args.batch)]
    seeds = list(range(args.batch))
    params, image_fn = P.make_image("fft", hw, seeds, dev)
    opt = torch.optim.Adam(params, lr=0.05)
    draws = T.draw_params(spec, seeds, args.steps + 3).to(dev)

    def autocast():
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    def pipeline(d):
        x = lm.preprocess(T.apply(image_fn(), spec, d))
        return x.contiguous(memory_format=torch.channels_last) if amp else x

    model = lm.model
    compiled_model = args.compile in ("model", "both")
    ch = torch.tensor([u.channel for u in units], device=dev)
    t_compile = 0.0
    if args.compile in ("pipeline", "both"):
        pipeline = torch.compile(pipeline, dynamic=False)
    if compiled_model:
        model = torch.compile(lm.model, dynamic=False)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    phases: dict[str, list[float]] = {}

    def tick(name, t0):
        sync()
        t = time.perf_counter()
        phases.setdefault(name, []).append(t - t0)
        return t

    x_bare = torch.rand(args.batch, 3, *spec.output_size(hw), device=dev, requires_grad=True)
    store_holder = {}

    def step(k, record):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        x = pipeline(draws[:, k])
        t = tick("pipeline_fwd", t) if record else t
        with autocast():
            if compiled_model:  # no hooks inside a compiled graph: score the model's output (same cost)
                out = model(x).float()
                out = out.flatten(2).mean(-1) if out.ndim > 2 else out
                scores = out[torch.arange(len(units), device=dev), ch]
            else:
                run_partial(model, x, store_holder["store"])
                acts = {n: v.float() for n, v in store_holder["store"].items()}
                scores = batched_unit_scores(acts, units)
            loss = -scores.sum()
        t = tick("model_fwd+objective", t) if record else t
        loss.backward()
        t = tick("backward", t) if record else t
        opt.step()
        t = tick("adam", t) if record else t
        _ = scores.detach().float()
        tick("trace", t) if record else t

    def bare(record):
        x_bare.grad = None
        t = time.perf_counter()
        z = lm.preprocess(x_bare)
        if amp:
            z = z.contiguous(memory_format=torch.channels_last)
        with autocast():
            if compiled_model:
                y = model(z)
            else:  # up to the unit's layer, as the render step runs it (hooks stop the forward there)
                y = run_partial(model, z, store_holder["store"])[lm.output_layer]
        t = tick("bare_fwd", t) if record else t
        y.float().sum().backward()
        tick("bare_bwd", t) if record else t

    hooks = contextlib.nullcontext({}) if compiled_model else capture_until(lm.model, [lm.output_layer])
    with hooks as store:
        store_holder["store"] = store
        t0 = time.perf_counter()
        for k in range(3):  # warm-up (and compilation)
            step(k, False)
            bare(False)
        t_compile = time.perf_counter() - t0
        for k in range(args.steps):
            step(3 + k, True)
            bare(True)

    best = {k: min(v) for k, v in phases.items()}
    med = {k: sorted(v)[len(v) // 2] for k, v in phases.items()}
    step_keys = ["pipeline_fwd", "model_fwd+objective", "backward", "adam", "trace"]
    t_step, t_bare = sum(best[k] for k in step_keys), best["bare_fwd"] + best["bare_bwd"]
    for k in phases:
        print(f"{k:22s} fastest {1e3 * best[k]:9.2f} ms   median {1e3 * med[k]:9.2f} ms")
    res = {
        "benchmark": "render_step_profile",
        "model": lm.name, "batch": args.batch, "steps": args.steps, "device": str(dev), "threads": args.threads,
        "dtype": "bfloat16" if amp else "float32", "compile": args.compile,
        "ms_step": round(1e3 * t_step, 2), "ms_bare_fwd_bwd": round(1e3 * t_bare, 2),
        "overhead_vs_fwd_bwd": round(t_step / t_bare, 3),
        "ms_phases": {k: round(1e3 * v, 2) for k, v in best.items()},
        "seconds_warmup_compile": round(t_compile, 1),
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
