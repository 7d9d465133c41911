"""Slingshot trials on the TUNING split (never the evaluation split): fine-tune the picture
variant's unit with given settings and, every ``--every`` steps, measure on the tuning split the
top-1 change (points), the unit's AUROC change for its class and SSIM(FV, target) of fvsanity's
default FVs (``--fv-steps`` 512, seeds 0 .. ``--fv-seeds`` - 1), as the README's trial table reports them.

    python experiments/slingshot/tune.py '{"sl_steps": 2000, "sl_nat_augment": "mixup", "sl_beta": 10}' \\
        --every 500 --tag mixb10 > /tmp/trial_mixb10.log
    python experiments/slingshot/tune.py '{"sl_steps": 600, "sl_lr": 1e-4, "sl_nat_batch": 16}' \\
        --model imagenet-squeezenet --threads 2 --every 300 --fv-steps 256

With ``--wise FOLDER`` nothing is fine-tuned: the saved slingshot model in FOLDER (a run.py
``model`` folder) is interpolated towards the original (``fvsanity.fool.slingshot.interpolate_weights``,
the ``sl_wise`` setting) at every ``--alphas`` value, each measured as above (``step`` is then
1000 x alpha)::

    python experiments/slingshot/tune.py '{}' --wise runs/slingshot/cifar10-resnet20_picture/model \
        --alphas 0.5,0.6,0.7,0.8,0.9,1 --fv-seeds 32 --tag wise

The model's ``--variant`` of config.json (picture by default; its units, target and ``fv_size``;
the settings given here replace the variant's). One CPU thread by default; about 0.3 CPU s per fine-tuning step and
7 CPU s per evaluation on ResNet-20. Prints one line per evaluation:
``[tag] step N: top1 +0.60 pts, auroc [-0.0152], ssim [[a, b]], ...`` (AUROC and SSIM per unit;
AUROC NaN where the unit's class has no tuning image).
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
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))  # experiments/_outdir.py


def _variant_routes():
    """run.py's ``variant_routes``, loaded by path (another experiment's ``run`` module may be
    imported already)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("slingshot_run_for_tune", HERE / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.variant_routes


def main(argv=None) -> int:
    import torch
    from _outdir import add_out_argument, output_file

    from fvsanity import load_model
    from fvsanity.data import load_images
    from fvsanity.fool.evaluate import top1_gained_lost
    from fvsanity.fool.metrics import ssim
    from fvsanity.fool.slingshot import SlingshotSettings, auroc, finetune_slingshot
    from fvsanity.generate.render import render
    from fvsanity.io import atomic_write_json, provenance
    from fvsanity.models import prepare_model
    from fvsanity.splits import ROLES, three_way_split

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("settings", help="JSON of SlingshotSettings fields")
    ap.add_argument("--every", type=int, default=500, help="evaluate every this many steps [500]")
    ap.add_argument("--tag", default="trial")
    ap.add_argument("--fv-steps", type=int, default=512)
    ap.add_argument("--fv-seeds", type=int, default=2, help="FV seeds 0..n-1 per evaluation [2]")
    ap.add_argument("--save-fvs", default=None, help="folder for the FVs (<tag>_<step>.pt)")
    ap.add_argument("--model", default="cifar10-resnet20", help="a run of config.json [cifar10-resnet20]")
    ap.add_argument("--variant", default="picture", help="a variant of the run [picture]; for unit targets the "
                                                         "target is the original model's FV of the source unit "
                                                         "(same seeds and steps)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads [1]")
    ap.add_argument("--n-build", type=int, default=None, help="building images for the preservation loss "
                                                                "[the variant's n_build, else the run's]")
    ap.add_argument("--wise", default=None, help="a saved slingshot model folder: measure its interpolations "
                                                 "towards the original at --alphas instead of fine-tuning")
    add_out_argument(ap, None, what="also write every evaluation (rewritten after each) to DIR/<tag>.json, or to "
                     "this .json file", default="none: only printed")
    ap.add_argument("--alphas", default="0.5,0.6,0.7,0.8,0.9,1", help="with --wise: interpolation weights")
    args = ap.parse_args(argv)
    variant_routes = _variant_routes()
    out_path = output_file("slingshot", args.out, f"{args.tag}.json", why="a tuning record") if args.out else None
    torch.set_num_threads(max(1, args.threads))
    cfg = json.loads((HERE / "config.json").read_text())
    run = cfg["runs"][args.model]
    var = run["variants"][args.variant]
    data = Path(os.environ.get("FVSANITY_DATA", ROOT.parent / "shared" / "data"))
    lm = load_model(run["model"])
    nat = load_images(data / run["images"], lm, into_memory=True)
    sp = three_way_split(len(nat), run["split"]["fractions"], run["split"]["seed"],
                         run["split"].get("order", ROLES))
    n_build = args.n_build or var.get("n_build", run["n_build"])
    train = nat.images[sp.building[:n_build]]
    tun = nat.subset(sp.tuning)
    routes, fv_size = variant_routes(lm, var)
    units = [r.unit for r in routes]
    if all(r.picture is not None for r in routes):
        pics = [r.picture[None].expand(args.fv_seeds, -1, -1, -1) for r in routes]
    else:  # unit targets: the original model's FVs of the source units, with the evaluation's seeds and steps
        src = render(lm, [r.source for r in routes], args.fv_seeds, steps=args.fv_steps, size=fv_size, progress=False)
        pics = [src.images[i] for i in range(len(routes))]
    s = SlingshotSettings(**{**var["settings"], **json.loads(args.settings), "fv_size": fv_size})

    def logits(model):
        with torch.no_grad():
            return torch.cat([model(lm.preprocess(b)) for b in tun.images.split(100)])

    z0 = logits(lm.model)
    top0 = (z0.argmax(1) == tun.labels).float().mean().item()
    au0 = [auroc(z0[:, u.channel], tun.labels == u.channel) for u in units]

    records = []

    def evaluate(step, net, extra=None):
        if (step + 1) % args.every:
            return
        t = time.process_time()
        m = dataclasses.replace(lm, model=prepare_model(copy.deepcopy(net).eval()))
        z = logits(m.model)
        top = (z.argmax(1) == tun.labels).float().mean().item()
        changed = int((z.argmax(1) != z0.argmax(1)).sum())
        se = 100 * top1_gained_lost(z0.argmax(1), z.argmax(1), tun.labels)[2]
        au = [round(auroc(z[:, u.channel], tun.labels == u.channel) - a0, 4) for u, a0 in zip(units, au0)]
        res = render(m, units, args.fv_seeds, steps=args.fv_steps, size=fv_size, progress=False)
        ss = [[round(v, 3) for v in ssim(res.images[i], pics[i]).tolist()] for i in range(len(units))]
        print(f"[{args.tag}] step {step + 1}: top1 {100 * (top - top0):+.2f} pts (se {se:.2f}; {changed} of {len(z)} changed), auroc {au}, "
              f"ssim {ss} (mean {sum(map(sum, ss)) / sum(map(len, ss)):.3f}), eval cpu {time.process_time() - t:.0f}s, process cpu {time.process_time():.0f}s",
              flush=True)
        records.append({**(extra or {}), "step": step + 1, "top1_change_points": 100 * (top - top0), "top1_change_se_points": se,
                        "changed": changed,
                        "n_images": len(z), "auroc_change": au, "ssim": ss})
        if out_path is not None:
            atomic_write_json(out_path, {"tag": args.tag, "model": args.model, "variant": args.variant,
                                         "wise": args.wise, "fv_seeds": args.fv_seeds, "fv_steps": args.fv_steps,
                                         "settings": dataclasses.asdict(s), "split": "tuning",
                                         "evaluations": records, "provenance": provenance()})
        if args.save_fvs:
            Path(args.save_fvs).mkdir(parents=True, exist_ok=True)
            torch.save(res.images, Path(args.save_fvs) / f"{args.tag}_{step + 1}.pt")

    if args.wise:
        from fvsanity.fool import get_manipulation
        from fvsanity.fool.slingshot import interpolate_weights

        tuned = get_manipulation("slingshot").load(args.wise, base=lm).model
        args.every = 1
        for a in [float(x) for x in args.alphas.split(",")]:
            print(f"[{args.tag}] alpha {a}:", flush=True)
            evaluate(round(1000 * a) - 1, interpolate_weights(lm.model, tuned, a), {"alpha": a})
        return 0
    evaluate(-1, lm.model)  # step 0: the original model's FVs (the SSIM baseline)
    _, tr = finetune_slingshot(lm, routes, train, s, log_every=250, callback=evaluate,
                               log=lambda msg: print(f"[{args.tag}]", msg, flush=True))
    print(f"[{args.tag}] done, fine-tuning + evaluations {tr.cpu_seconds:.0f} CPU s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
