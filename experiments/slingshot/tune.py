"""Slingshot trials on the TUNING split (never the evaluation split): fine-tune the picture
variant's unit with given settings and, every ``--every`` steps, measure on the tuning split the
top-1 change (points), the unit's AUROC change for its class and SSIM(FV, target) of fvsanity's
default FVs (``--fv-steps`` 512, seeds 0 and 1), as the README's trial table reports them.

    python experiments/slingshot/tune.py '{"sl_steps": 2000, "sl_nat_augment": "mixup", "sl_beta": 10}' \\
        --every 500 --tag mixb10 > /tmp/trial_mixb10.log

One CPU thread; about 0.3 CPU s per fine-tuning step and 7 CPU s per evaluation on ResNet-20.
Prints one line per evaluation: ``[tag] step N: top1 +0.60 pts, auroc -0.0152, ssim [a, b], ...``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's fvsanity


def main(argv=None) -> int:
    import torch

    from fvsanity import load_model
    from fvsanity.data import load_images
    from fvsanity.fool import make_routes
    from fvsanity.fool.metrics import ssim
    from fvsanity.fool.slingshot import SlingshotSettings, auroc, finetune_slingshot
    from fvsanity.generate.render import render
    from fvsanity.models import prepare_model
    from fvsanity.splits import three_way_split

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("settings", help="JSON of SlingshotSettings fields")
    ap.add_argument("--every", type=int, default=500, help="evaluate every this many steps [500]")
    ap.add_argument("--tag", default="trial")
    ap.add_argument("--fv-steps", type=int, default=512)
    ap.add_argument("--save-fvs", default=None, help="folder for the FVs (<tag>_<step>.pt)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = json.loads((HERE / "config.json").read_text())
    run = cfg["runs"]["cifar10-resnet20"]
    var = run["variants"]["picture"]
    data = Path(os.environ.get("FVSANITY_DATA", ROOT.parent / "shared" / "data"))
    lm = load_model(run["model"])
    nat = load_images(data / run["images"], lm, into_memory=True)
    sp = three_way_split(len(nat), run["split"]["fractions"], run["split"]["seed"])
    train = nat.images[sp.building[: run["n_build"]]]
    tun = nat.subset(sp.tuning)
    routes = make_routes(lm, var["units"], str(HERE / var["target"]), picture_size=lm.input_size)
    pic = routes[0].picture[None]
    u = routes[0].unit
    s = SlingshotSettings(**json.loads(args.settings))
    with torch.no_grad():
        z0 = lm.model(lm.preprocess(tun.images))
    top0 = (z0.argmax(1) == tun.labels).float().mean().item()
    au0 = auroc(z0[:, u.channel], tun.labels == u.channel)

    def evaluate(step, net):
        if (step + 1) % args.every:
            return
        t = time.process_time()
        m = dataclasses.replace(lm, model=prepare_model(copy.deepcopy(net).eval()))
        with torch.no_grad():
            z = m.model(lm.preprocess(tun.images))
        top = (z.argmax(1) == tun.labels).float().mean().item()
        au = auroc(z[:, u.channel], tun.labels == u.channel)
        res = render(m, [u], [0, 1], steps=args.fv_steps, progress=False)
        ss = ssim(res.images[0], pic.expand(2, -1, -1, -1))
        print(f"[{args.tag}] step {step + 1}: top1 {100 * (top - top0):+.2f} pts, auroc {au - au0:+.4f}, "
              f"ssim {ss.tolist()}, eval cpu {time.process_time() - t:.0f}s, process cpu {time.process_time():.0f}s",
              flush=True)
        if args.save_fvs:
            Path(args.save_fvs).mkdir(parents=True, exist_ok=True)
            torch.save(res.images[0], Path(args.save_fvs) / f"{args.tag}_{step + 1}.pt")

    _, tr = finetune_slingshot(lm, routes, train, s, log_every=250, callback=evaluate,
                               log=lambda msg: print(f"[{args.tag}]", msg, flush=True))
    print(f"[{args.tag}] done, fine-tuning + evaluations {tr.cpu_seconds:.0f} CPU s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
