"""Peak memory of activation capture: 1,000 ImageNet images, ALL block layers, real SqueezeNet.

``fvsanity.activations.collect`` streams: per batch it decodes B images, runs the forward under
hooks, mean-pools each captured output and keeps only [B, C] rows. So the peak resident memory
should be what ONE plain forward of one batch needs, plus the pooled result, independent of
the number of images and of the number of hooked layers. This benchmark measures the peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, a fresh child process per configuration):
first after one plain ``model(x)`` of one batch (no hooks: the reference peak), then after
capturing all block layers of all N images, and checks the stated bound

    bound = peak of one plain batch forward
            + 2 x N x (sum of pooled channels) x 4 bytes   # the pooled result (+ a copy)
            + 128 MiB                                       # allocator slack (glibc arenas, caches)

It also reports what keeping the unpooled block activations of all N images would need, and
(``--no-trim``) the same capture without returning freed heap memory to the OS after each batch
(glibc fragmentation grows the resident size with N there).
The last line printed is one JSON object.

    python benchmarks/activation_memory.py [--batch-sizes 16,64] [--limit N] [--no-trim]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MiB = 2**20


def peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # Linux reports KiB


def child(batch_size: int, limit: int | None, trim: bool) -> dict:
    import torch

    torch.set_num_threads(1)
    from fvsanity.activations import collect_with_responses
    from fvsanity.data import load_images
    from fvsanity.models import load_model
    from fvsanity.testing import data_root
    from fvsanity.units import layer_shapes

    root = data_root()
    if root is None:
        return {"skipped": "shared data not found (set FVSANITY_DATA)"}
    lm = load_model("imagenet-squeezenet")
    nat = load_images(root / "imagenet-samples", lm, limit=limit)
    shapes = layer_shapes(lm.model, lm.input_size, lm.preprocess)  # one forward: warms up torch too
    import math

    per_image = {n: 4 * math.prod(s) for n, s in shapes.items()}
    max_act = max(per_image.values())
    pooled_channels = sum(shapes[n][0] for n in lm.block_layers)
    unpooled_blocks = sum(per_image[n] for n in lm.block_layers)
    base = peak_rss_bytes()
    with torch.no_grad():  # the reference: one plain forward of one batch, no hooks
        lm(nat.decode(range(min(batch_size, len(nat)))))
    plain = peak_rss_bytes()
    t0 = time.perf_counter()
    acts = collect_with_responses(lm, nat, lm.block_layers, (), "mean", batch_size, trim_memory=trim)[0]
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    n = len(nat)
    assert all(a.shape == (n, shapes[k][0]) for k, a in acts.items())
    bound = plain + 2 * n * pooled_channels * 4 + 128 * MiB
    return {
        "batch_size": batch_size,
        "trim_memory": trim,
        "n_images": n,
        "n_layers": len(lm.block_layers),
        "seconds": round(seconds, 1),
        "baseline_peak_mib": round(base / MiB, 1),
        "plain_batch_forward_peak_mib": round(plain / MiB, 1),
        "peak_rss_mib": round(peak / MiB, 1),
        "growth_over_plain_forward_mib": round((peak - plain) / MiB, 1),
        "bound_mib": round(bound / MiB, 1),
        "within_bound": peak <= bound,
        "largest_activation_per_image_mib": round(max_act / MiB, 2),
        "pooled_result_mib": round(n * pooled_channels * 4 / MiB, 2),
        "unpooled_blocks_all_images_mib": round(n * unpooled_blocks / MiB, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="64", help="comma-separated batch sizes [%(default)s]")
    p.add_argument("--limit", type=int, default=None, help="use only N images [all 1000]")
    p.add_argument("--no-trim", action="store_true", help="also run without returning freed memory after each batch")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-no-trim", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.limit, not args.child_no_trim)))
        return 0
    runs = []
    configs = [(int(b), True) for b in args.batch_sizes.split(",")]
    if args.no_trim:
        configs += [(b, False) for b, _ in configs]
    for bs, trim in configs:
        cmd = [sys.executable, __file__, "--child", str(bs)] + (["--limit", str(args.limit)] if args.limit else [])
        cmd += [] if trim else ["--child-no-trim"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return r.returncode
        res = json.loads(r.stdout.strip().splitlines()[-1])
        runs.append(res)
        print(f"batch {bs}, trim {trim}: {res}", flush=True)
    ok = all(r.get("within_bound", True) for r in runs if r.get("trim_memory", True))
    print(json.dumps({"benchmark": "activation_memory", "model": "imagenet-squeezenet", "runs": runs, "all_within_bound (trim_memory runs)": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
