"""SSIM(FV, target) of the ResNet-20 picture variant's saved slingshot over more FV seeds than the
experiment's two, on the model ``run.py`` saved (``--work``, default runs/slingshot): fvsanity's
default FVs (512 steps) of the manipulated and the original model, seeds 2000..2000+n-1 (the
experiment's evaluation seeds and more; the trials used seeds 0-3). Writes
figures/slingshot/ssim_seeds.json and prints it.

    python experiments/slingshot/run.py --only cifar10-resnet20 --variant picture   # the model
    python experiments/slingshot/ssim_seeds.py --seeds 8                              # ~2 CPU min
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's fvsanity


def main(argv=None) -> int:
    import torch

    from fvsanity import load_model
    from fvsanity.fool import get_manipulation, make_routes
    from fvsanity.fool.metrics import ssim
    from fvsanity.generate.render import render
    from fvsanity.io import atomic_write_json, provenance

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=8, help="FV seeds from 2000 [8]")
    ap.add_argument("--work", default=str(ROOT / "runs" / "slingshot"), help="run.py's --work [runs/slingshot]")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    cfg = json.loads((HERE / "config.json").read_text())
    var = cfg["runs"]["cifar10-resnet20"]["variants"]["picture"]
    folder = Path(args.work) / "cifar10-resnet20_picture" / "model"
    if not folder.is_dir():
        raise SystemExit(f"no saved slingshot at {folder}; run `python experiments/slingshot/run.py --only "
                         f"cifar10-resnet20 --variant picture` first")
    lm = load_model("cifar10-resnet20")
    fooled = get_manipulation("slingshot").load(folder, base=lm)
    unit = var["units"][0]
    pic = make_routes(lm, [unit], str(HERE / var["target"]), picture_size=lm.input_size)[0].picture[None]
    seeds = list(range(2000, 2000 + args.seeds))
    out = {"unit": unit, "seeds": seeds, "steps": var["eval_steps"], "settings": var["settings"],
           "provenance": provenance()}
    for name, m in (("manipulated", fooled), ("original", lm)):
        v = ssim(render(m, [unit], seeds, steps=var["eval_steps"], progress=False).images[0],
                 pic.expand(len(seeds), -1, -1, -1))
        out[name] = {"per_seed": v.tolist(), "mean": float(v.mean()), "sd": float(v.std()),
                     "standard_error": float(v.std() / len(seeds) ** 0.5)}
    atomic_write_json(ROOT / "figures" / "slingshot" / "ssim_seeds.json", out)
    print(json.dumps({k: out[k] for k in ("manipulated", "original")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
