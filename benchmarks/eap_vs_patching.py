"""EAP and EAP-IG edge scores vs real activation patching, on a real pretrained model.

One layer pair (a conv's input channels -> its output channels), natural clean images of the
unit's class: all edge scores by EAP and EAP-IG (one call each, timed) and real patching of a
random sample of present edges (one forward per edge, timed). Reports the Spearman rank
correlation of the image-mean scores with the image-mean patching effects on the sampled edges,
and the speed-up of scoring every edge of the layer at once over patching each of them
(patch time per edge x number of edges / EAP-IG time), measured side by side in one run on the
same images and threads.

    python benchmarks/eap_vs_patching.py                                 # CIFAR-10 ResNet-20
    python benchmarks/eap_vs_patching.py --model imagenet-squeezenet     # ImageNet SqueezeNet

The last line of output is one JSON object:
{"spearman_eap_vs_patching", "spearman_eap_ig_vs_patching", "speedup_vs_patching", "edges_patched"}
("speedup_vs_patching" is for EAP-IG, the default method; the EAP speed-up is printed above it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from scipy.stats import pearsonr, spearmanr

DEFAULTS = {
    # ResNet-20: class unit 3 ("cat"), the first conv of the last block (64 -> 64 channels = 4096
    # edges; its effect on the unit passes BN, ReLU, conv2, BN, the residual sum, ReLU, pool, fc).
    "cifar10-resnet20": {"unit": "linear:3", "layer": "layer3.2.conv1", "images": 16},
    # SqueezeNet: class unit 1 ("goldfish"), the 3x3 expand conv of Fire module features.10
    # (64 -> 256 channels = 16384 edges, 14% of them all-zero in Deep Compression); its effect
    # passes ReLU, max-pool, the whole last Fire module (3 convs, 3 ReLUs) and the classifier conv.
    "imagenet-squeezenet": {"unit": "classifier.1:1", "layer": "features.10.expand3x3", "images": 4},
}


def log(msg: str) -> None:
    print(msg, flush=True)


def natural_images(lm, root: Path, unit, n: int, seed: int) -> torch.Tensor:
    """n natural images: the unit's class first (CIFAR folder or ImageNet sample), then seeded others."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    if lm.name.startswith("cifar10"):
        folder = root / "cifar10-test" / lm.class_names[unit.channel]
        files = sorted(folder.glob("*.jpg"))
        files = [files[i] for i in torch.randperm(len(files), generator=g)[:n].tolist()]
    else:
        files = sorted((root / "imagenet-samples").iterdir())  # sorted wnids = class order
        rest = [f for i, f in enumerate(files) if i != unit.channel]
        files = [files[unit.channel]] + [rest[i] for i in torch.randperm(len(rest), generator=g)[: n - 1].tolist()]
    out = []
    for f in files:
        with Image.open(f) as im:
            out.append(lm.preprocess.load_pil(im))
    return torch.stack(out)


def timed(fn, repeats: int):
    """(result of the last call, best wall time of ``repeats`` calls)."""
    best, res = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t0)
    return res, best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cifar10-resnet20", choices=sorted(DEFAULTS))
    ap.add_argument("--unit", default=None)
    ap.add_argument("--layer", default=None)
    ap.add_argument("--images", type=int, default=None, help="clean images (the unit's class first)")
    ap.add_argument("--edges", type=int, default=256, help="edges patched (random sample of present edges)")
    ap.add_argument("--steps", type=int, default=8, help="EAP-IG steps")
    ap.add_argument("--reference", default="mean")
    ap.add_argument("--repeats", type=int, default=3, help="timing: best of this many EAP / EAP-IG calls")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from fvsanity.compare.attribution import edge_attribution, patch_edges
    from fvsanity.models import load_model
    from fvsanity.testing import data_root
    from fvsanity.units import parse_unit

    root = data_root()
    if root is None:
        sys.exit("set FVSANITY_DATA to the shared data folder (real weights and images)")
    d = DEFAULTS[args.model]
    lm = load_model(args.model)
    unit = parse_unit(args.unit or d["unit"], lm)
    layer = args.layer or d["layer"]
    x = natural_images(lm, root, unit, args.images or d["images"], args.seed)
    log(f"model {lm.name}, unit {unit}, layer {layer}, {x.shape[0]} natural images {tuple(x.shape[1:])}, "
        f"reference {args.reference}, threads {args.threads}")

    kw = dict(layers=[layer], reference=args.reference)
    eap, t_eap = timed(lambda: edge_attribution(lm, unit, x, method="eap", **kw), args.repeats)
    ig, t_ig = timed(lambda: edge_attribution(lm, unit, x, method="eap-ig", steps=args.steps, **kw), args.repeats)
    lay_e, lay_i = eap.layer(layer), ig.layer(layer)
    present = lay_e.mask.nonzero()  # [E_present, 2] (row, u)
    n_edges = int(lay_e.mask.numel())
    g = torch.Generator().manual_seed(args.seed)
    pick = present[torch.randperm(present.shape[0], generator=g)[: args.edges]]
    edges = [(lay_e.rows[r], u) for r, u in pick.tolist()]
    truth, t_patch = timed(lambda: patch_edges(lm, unit, layer, edges, x, args.reference), 1)
    truth = truth.mean(1).double()  # [E] mean over images of m(patched) - m(clean)
    s_eap = lay_e.mean()[pick[:, 0], pick[:, 1]].double()
    s_ig = lay_i.mean()[pick[:, 0], pick[:, 1]].double()
    rho_eap = float(spearmanr(s_eap, truth).statistic)
    rho_ig = float(spearmanr(s_ig, truth).statistic)
    per_edge = t_patch / len(edges)
    speed_eap = per_edge * n_edges / t_eap
    speed_ig = per_edge * n_edges / t_ig

    log(f"edges in layer: {n_edges} ({present.shape[0]} with nonzero weights); patched: {len(edges)}")
    log(f"unit activation: clean {float(eap.metric_clean.mean()):.3f}, reference {float(eap.metric_ref.mean()):.3f}")
    log(f"patching effect |mean| over sampled edges: {float(truth.abs().mean()):.3e} (max {float(truth.abs().max()):.3e})")
    log(f"Spearman vs patching: EAP {rho_eap:.3f}, EAP-IG({args.steps}) {rho_ig:.3f}; "
        f"Pearson: EAP {float(pearsonr(s_eap, truth).statistic):.3f}, EAP-IG {float(pearsonr(s_ig, truth).statistic):.3f}")
    log(f"time: EAP all {n_edges} edges {t_eap * 1e3:.1f} ms, EAP-IG {t_ig * 1e3:.1f} ms, "
        f"patching {per_edge * 1e3:.2f} ms/edge ({t_patch:.1f} s for {len(edges)})")
    log(f"speed-up of scoring all edges vs patching each: EAP {speed_eap:.0f}x, EAP-IG {speed_ig:.0f}x")
    print(json.dumps({
        "spearman_eap_vs_patching": round(rho_eap, 4),
        "spearman_eap_ig_vs_patching": round(rho_ig, 4),
        "speedup_vs_patching": round(speed_ig, 1),
        "edges_patched": len(edges),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
