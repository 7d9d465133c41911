"""Silent units on real models: a filter that never fires on natural images takes over the FV.

    python experiments/silent_units/run.py            # CIFAR-10 ResNet-20 and ImageNet SqueezeNet
    python experiments/silent_units/run.py --only cifar10-resnet20
    python experiments/silent_units/run.py --smoke    # tiny model, seconds

Per model and variant (all class units permuted; one class unit with the target picture): build
the silent units on one half of the natural images, then on the other half measure the fraction
of images on which every silent channel stays exactly zero, the predictions of both models, the
FVs' similarity to the targets, the inference time ratio and the path check. Writes
figures/silent_units/<model>_<variant>.png and results.json; models and FVs go to --work
(gitignored runs/ by default). Calls only the public API.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _setup(run: dict, smoke: bool):
    """(model, calibration images [N,3,H,W], held-out NaturalImages)."""
    import torch

    from fvsanity import load_model
    from fvsanity.data import from_tensor, load_images
    from fvsanity.fool import split_indices
    from fvsanity.testing import tiny_model

    if smoke:
        lm = tiny_model()
        g = torch.Generator().manual_seed(0)
        nat = from_tensor(torch.rand(40, 3, 16, 16, generator=g), torch.arange(40) % 5)
        split = 0.5
    else:
        lm = load_model(run["model"])
        root = Path(os.environ.get("FVSANITY_DATA", ROOT.parent / "shared" / "data"))
        nat = load_images(root / run["images"], lm, into_memory=True)
        split = run["split"]
    tr, ev = split_indices(len(nat), split, 0)
    return lm, nat.images[tr], nat.subset(ev)


def main(argv: list[str] | None = None) -> int:
    import torch

    from fvsanity.fool import FoolSettings, make_routes, run_fool
    from fvsanity.io import atomic_write_json, provenance

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model, random images, seconds")
    ap.add_argument("--only", default=None, help="run only this model's entry of config.json")
    ap.add_argument("--config", default=str(HERE / "config.json"))
    ap.add_argument("--figures", default=None, help="[figures/silent_units, or runs/smoke/... with --smoke]")
    ap.add_argument("--work", default=None, help="cache / model folder [runs/silent_units]")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = json.loads(Path(args.config).read_text())
    if args.smoke:
        runs = {"tiny": {"variants": cfg["smoke"]["variants"], "settings": cfg["smoke"]["settings"]}}
        figures = Path(args.figures or ROOT / "runs" / "smoke" / "silent_units")
        work = Path(args.work or figures / "work")
    else:
        runs = {k: v for k, v in cfg["runs"].items() if args.only in (None, k)}
        if not runs:
            print(f"--only {args.only!r}: valid: {', '.join(cfg['runs'])}", file=sys.stderr)
            return 2
        figures = Path(args.figures or ROOT / "figures" / "silent_units")
        work = Path(args.work or ROOT / "runs" / "silent_units")
    figures.mkdir(parents=True, exist_ok=True)
    res_path = figures / "results.json"
    results = json.loads(res_path.read_text()) if res_path.is_file() and not args.smoke else {}
    results.update({"config": cfg, "provenance": provenance(), "smoke": args.smoke})
    results.setdefault("runs", {})
    for name, run in runs.items():
        lm, calib, ev = _setup(run, args.smoke)
        settings = FoolSettings(**{**run["settings"], "progress": not args.smoke})
        for var in run["variants"]:
            target = var.get("target")
            if target is not None and not target.startswith("unit:"):
                target = str(HERE / target)
            routes = make_routes(lm, var["units"], target, shift=var.get("shift"), picture_size=lm.input_size)
            out = work / name / var["name"]
            res = run_fool(lm, routes, calib, ev, settings, out, work_dir=work / name)
            key = f"{name}_{var['name']}"
            shutil.copyfile(out / "fool.png", figures / f"{key}.png")
            d = res.to_json()
            results["runs"][key] = {
                "summary": res.summary,
                "variant": var,
                "silent_zero_eval": d["silent_zero_eval"],
                "silent_zero_calibration": d["silent_zero_calibration"],
                "silent_fired_on_manipulated_fvs": d.get("silent_fired_on_manipulated_fvs"),
                "predictions": d["predictions"],
                "fv_similarity": d["fv_similarity"],
                "timing": d["timing"],
                "check": {k: v for k, v in d.get("check", {}).items() if k != "units"},
                "check_units": [
                    {"unit": u["unit"], "flagged": u["flagged"], "why": u.get("why"),
                     "own_layer_normalized": u.get("own_layer_normalized"),
                     "original_not_above": u["original"]["verdict"]["n_not_above"],
                     "manipulated_not_above": u["manipulated"]["verdict"]["n_not_above"], "n_layers": len(u["layers"])}
                    for u in d.get("check", {}).get("units", [])
                ],
                "model_dir": str(out / "model"),
            }
            if res_path.is_file() and not args.smoke:  # merge: another run may have written other keys
                on_disk = json.loads(res_path.read_text())
                on_disk.setdefault("runs", {})[key] = results["runs"][key]
                results["runs"] = on_disk["runs"]
            atomic_write_json(res_path, results)
    print(f"wrote {res_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
