"""SSIM(FV, target) of the ResNet-20 picture variant's saved slingshot over more FV seeds than the
experiment's two, on the model ``run.py`` saved (``--work``, default runs/slingshot): fvsanity's
default FVs (512 steps) of the manipulated and the original model, seeds ``--first`` ..
``--first`` + n - 1 (from 2000: the experiment's evaluation seeds and more; the trials used seeds
0-3), rendered in chunks of ``--chunk`` seeds. Writes ``--out DIR``/ssim_seeds.json (default
figures/slingshot: a full run, said in one line before it starts; a ``--out`` ending in .json is
that file) and prints it: per seed, mean, sd, standard error, the normal 95% interval of the mean and the
verdict on the issue's bound (``met``: the interval lies at or above 0.3; ``missed``: below;
``inconclusive``: it straddles 0.3).

    python experiments/slingshot/run.py --only cifar10-resnet20 --variant picture   # the model
    python experiments/slingshot/ssim_seeds.py --seeds 8                              # ~2 CPU min
    python experiments/slingshot/ssim_seeds.py --seeds 400 --first 2008 \
        --out figures/slingshot/ssim_seeds_400.json                                  # fresh seeds
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's fvsanity
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))  # experiments/_outdir.py


def main(argv=None) -> int:
    import torch
    from _outdir import add_out_argument, output_file

    from fvsanity import load_model
    from fvsanity.fool import get_manipulation, make_routes
    from fvsanity.fool.metrics import ssim
    from fvsanity.generate.render import render
    from fvsanity.io import atomic_write_json, provenance

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=8, help="how many FV seeds [8]")
    ap.add_argument("--first", type=int, default=2000, help="the first FV seed [2000]")
    ap.add_argument("--chunk", type=int, default=50, help="seeds per render batch [50]")
    ap.add_argument("--bound", type=float, default=0.3, help="the SSIM bound the verdict is about [0.3]")
    add_out_argument(ap, None, what="folder of ssim_seeds.json (or a .json file)",
                     default="figures/slingshot: a full run")
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
    saved = json.loads((folder / "slingshot.json").read_text()).get("settings") or {}
    stale = {k: (saved.get(k), v) for k, v in var["settings"].items() if saved.get(k) != v}
    if stale:
        raise SystemExit(f"the saved slingshot at {folder} was built with other settings than config.json's picture "
                         f"variant (saved, config: {stale}); re-run run.py --only cifar10-resnet20 --variant picture")
    out_path = output_file("slingshot", args.out, "ssim_seeds.json")
    lm = load_model("cifar10-resnet20")
    fooled = get_manipulation("slingshot").load(folder, base=lm)
    unit = var["units"][0]
    pic = make_routes(lm, [unit], str(HERE / var["target"]), picture_size=lm.input_size)[0].picture[None]
    if args.seeds < 2 or args.chunk < 1:
        raise SystemExit(f"--seeds must be >= 2 and --chunk >= 1, got {args.seeds} and {args.chunk}")
    seeds = list(range(args.first, args.first + args.seeds))
    out = {"unit": unit, "seeds": seeds, "steps": var["eval_steps"], "settings": var["settings"],
           "provenance": provenance()}
    for name, m in (("manipulated", fooled), ("original", lm)):
        v = torch.cat([ssim(render(m, [unit], chunk, steps=var["eval_steps"], progress=False).images[0],
                            pic.expand(len(chunk), -1, -1, -1))
                       for chunk in (seeds[i:i + args.chunk] for i in range(0, len(seeds), args.chunk))])
        se = float(v.std() / len(seeds) ** 0.5)
        lo, hi = float(v.mean()) - 1.96 * se, float(v.mean()) + 1.96 * se
        out[name] = {"per_seed": v.tolist(), "mean": float(v.mean()), "sd": float(v.std()), "standard_error": se,
                     "ci95": [lo, hi], "bound": args.bound,
                     "verdict": "met" if lo >= args.bound else "missed" if hi < args.bound else "inconclusive"}
        print(f"{name}: SSIM {out[name]['mean']:.4f} +- {se:.4f} (95% {lo:.4f}..{hi:.4f}) over {len(seeds)} seeds: "
              f"{out[name]['verdict']} (bound {args.bound})", flush=True)
    atomic_write_json(out_path, out)
    print(json.dumps({k: {kk: vv for kk, vv in out[k].items() if kk != "per_seed"} for k in ("manipulated", "original")},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
