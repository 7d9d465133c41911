"""Generator benchmark: batched vs one-by-one FVs, overhead vs a bare forward+backward, lucent parity.

Run: FVSANITY_DATA=../shared/data python benchmarks/generate_bench.py [--model cifar10-resnet20]
     [--units 8] [--steps 64] [--threads 2]

Measured side by side in one run:
- batch_speedup: time of K units one at a time / time of the same K units in one batch.
- overhead_vs_fwd_bwd: per-step time of the batched optimization / one forward+backward of the
  model on a batch of the same size (what the DESIGN says it should approach).
- lucent_ratio: fvsanity's final objective / lucent render_vis's, same model, units, steps, size
  (mean over units; >= 0.9 is the target, > 1 means fvsanity optimizes better).
The last line is one JSON object with these figures.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cifar10-resnet20")
    ap.add_argument("--units", type=int, default=8)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layer", default=None, help="layer of the units [model's output layer]")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from fvsanity import load_model, parse_unit
    from fvsanity.generate import evaluate, render

    lm = load_model(args.model)
    layer = args.layer or lm.output_layer
    n_ch = len(lm.class_names) or 10
    units = [parse_unit(f"{layer}:{(i * 7) % n_ch}", lm) for i in range(args.units)]
    kw = dict(seeds=[0], steps=args.steps, progress=False)

    render(lm, units[:1], seeds=[0], steps=2, progress=False)  # warm-up
    t = time.perf_counter()
    batched = render(lm, units, **kw)
    t_batch = time.perf_counter() - t
    t = time.perf_counter()
    singles = [render(lm, [u], **kw) for u in units]
    t_single = time.perf_counter() - t
    # Elements are independent; float rounding differs between batch sizes and Adam amplifies it
    # over many steps (1e-7 after 4 steps), so compare the final objectives, relatively.
    max_diff = max(abs(batched.final[i, 0].item() / s.final[0, 0].item() - 1) for i, s in enumerate(singles))

    # bare forward+backward (input gradient) of the same batch size, same image size
    x = torch.rand(len(units), 3, *lm.input_size, requires_grad=True)
    for _ in range(2):
        lm(x).sum().backward()
    t = time.perf_counter()
    for _ in range(args.steps):
        x.grad = None
        lm(x).sum().backward()
    t_fb = (time.perf_counter() - t) / args.steps
    per_step = t_batch / args.steps

    # lucent parity
    from lucent.optvis import objectives, param
    from lucent.optvis import render as lrender

    ours = batched.final[:, 0]
    theirs = []
    for u in units:
        np.random.seed(0)
        torch.manual_seed(0)
        imgs = lrender.render_vis(
            lm.model, objectives.channel(u.layer.replace(".", "_"), u.channel),
            param_f=lambda: param.image(lm.input_size[0]), thresholds=(args.steps,),
            show_image=False, progress=False, fixed_image_size=lm.input_size[0],
        )  # lucent otherwise upsamples images < 224 px to 224 and optimizes at that size
        x = torch.as_tensor(np.asarray(imgs[-1])).permute(0, 3, 1, 2).float()
        theirs.append(evaluate(lm, x[None], [u])[0][0, 0].item())
    theirs_t = torch.tensor(theirs)
    print(f"model {lm.name}, {len(units)} units of {layer}, {args.steps} steps, {args.threads} threads")
    print(f"batched: {t_batch:.2f}s   one-by-one: {t_single:.2f}s   speed-up {t_single / t_batch:.2f}x   max rel. objective diff {max_diff:.2e}")
    print(f"per step: {per_step * 1e3:.1f} ms   bare fwd+bwd: {t_fb * 1e3:.1f} ms   overhead {per_step / t_fb:.2f}x")
    for u, a, b in zip(units, ours.tolist(), theirs):
        print(f"  {str(u):<16} fvsanity {a:9.3f}   lucent {b:9.3f}")
    ratio = (ours.mean() / theirs_t.mean()).item()
    print(f"lucent parity: mean objective fvsanity/lucent = {ratio:.3f} (target >= 0.9)")
    print(json.dumps({
        "model": lm.name, "units": len(units), "steps": args.steps,
        "batch_speedup": round(t_single / t_batch, 3),
        "overhead_vs_fwd_bwd": round(per_step / t_fb, 3),
        "batch_vs_single_max_rel_objective_diff": max_diff,
        "lucent_ratio": round(ratio, 3),
        "lucent_ratio_min_unit": round((ours / theirs_t).min().item(), 3),
    }))


if __name__ == "__main__":
    main()
