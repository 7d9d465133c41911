"""Fooling circuit on real models: FVs show arbitrary targets, natural predictions do not change.

    python experiments/fooling_circuit/run.py            # CIFAR-10 ResNet-20 and ImageNet SqueezeNet
    python experiments/fooling_circuit/run.py --only cifar10-resnet20
    python experiments/fooling_circuit/run.py --smoke    # tiny model, seconds

Per model: one detector (trained and calibrated on one half of the natural images; FVs of many
units, checkpoints from early to late steps), then one manipulated model per variant (all class
units permuted; one class unit showing target.png), each evaluated on the other half of the
images. Writes figures/fooling_circuit/<model>_<variant>.png and results.json; manipulated
models and cached FVs go to --work (gitignored runs/ by default). Calls only the public API.
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


def _data_root() -> Path:
    return Path(os.environ.get("FVSANITY_DATA", ROOT.parent / "shared" / "data"))


def _setup(name: str, run: dict, smoke: bool):
    """(model, training images [N,3,H,W], held-out NaturalImages)."""
    import torch

    from fvsanity import load_model
    from fvsanity.data import from_tensor, load_images
    from fvsanity.fool import split_indices
    from fvsanity.testing import tiny_model

    if smoke:
        lm = tiny_model()
        g = torch.Generator().manual_seed(0)
        imgs = torch.rand(40, 3, 16, 16, generator=g)
        nat = from_tensor(imgs, torch.arange(40) % 5)
        split = 0.5
    else:
        lm = load_model(run["model"])
        nat = load_images(_data_root() / run["images"], lm, into_memory=True)
        split = run["split"]
    tr, ev = split_indices(len(nat), split, 0)
    return lm, nat.images[tr], nat.subset(ev)


def main(argv: list[str] | None = None) -> int:
    import torch

    from fvsanity.fool import FoolSettings, make_routes, prepare_detector, run_fool
    from fvsanity.generate import FVResult
    from fvsanity.io import atomic_write_json, provenance

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model, random images, seconds")
    ap.add_argument("--only", default=None, help="run only this model's entry of config.json")
    ap.add_argument("--config", default=str(HERE / "config.json"))
    ap.add_argument("--figures", default=None, help="[figures/fooling_circuit, or a temp folder with --smoke]")
    ap.add_argument("--work", default=None, help="cache / model folder [runs/fooling_circuit]")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = json.loads(Path(args.config).read_text())
    if args.smoke:
        runs = {"tiny": {"variants": cfg["smoke"]["variants"], "settings": cfg["smoke"]["settings"]}}
        figures = Path(args.figures or ROOT / "runs" / "smoke" / "fooling_circuit")
        work = Path(args.work or figures / "work")
    else:
        runs = {k: v for k, v in cfg["runs"].items() if args.only in (None, k)}
        if not runs:
            print(f"--only {args.only!r}: valid: {', '.join(cfg['runs'])}", file=sys.stderr)
            return 2
        figures = Path(args.figures or ROOT / "figures" / "fooling_circuit")
        work = Path(args.work or ROOT / "runs" / "fooling_circuit")
    figures.mkdir(parents=True, exist_ok=True)
    res_path = figures / "results.json"
    results = json.loads(res_path.read_text()) if res_path.is_file() and not args.smoke else {}
    results.update({"config": cfg, "provenance": provenance(), "smoke": args.smoke})
    results.setdefault("runs", {})
    for name, run in runs.items():
        lm, train, ev = _setup(name, run, args.smoke)
        settings = FoolSettings(**{**run["settings"], "det_checkpoints": tuple(run["settings"]["det_checkpoints"]),
                                   "progress": not args.smoke})
        shared = run.get("shared_fvs")
        extra = None
        if shared and (ROOT / shared / "fv.json").is_file():
            extra = [FVResult.load(ROOT / shared)]
        variant_routes = []
        for var in run["variants"]:
            target = var.get("target")
            if target is not None and not target.startswith("unit:"):
                target = str(HERE / target)
            variant_routes.append(make_routes(lm, var["units"], target, shift=var.get("shift"), picture_size=lm.input_size))
        # one detector per model, guarding every variant's routes (incl. picture trajectories)
        bundle = prepare_detector(lm, train, ev.load().images, settings, work / name, extra_train_fvs=extra,
                                  routes=[r for rs in variant_routes for r in rs])
        for var, routes in zip(run["variants"], variant_routes):
            out = work / name / var["name"]
            res = run_fool(lm, routes, train, ev, settings, out, bundle=bundle, work_dir=work / name)
            key = f"{name}_{var['name']}"
            shutil.copyfile(out / "fool.png", figures / f"{key}.png")
            d = res.to_json()
            results["runs"][key] = {
                "summary": res.summary,
                "variant": var,
                "shared_fvs": shared if extra else None,
                "detector": d.get("detector", {}).get("heldout"),
                "detector_heldout_picture_trajectories": d.get("detector", {}).get("heldout_picture_trajectories"),
                "detector_heldout_final_only": d.get("detector", {}).get("heldout_final_only"),
                "threshold": d.get("detector", {}).get("threshold"),
                "predictions": d["predictions"],
                "fv_similarity": d["fv_similarity"],
                "gate_on_manipulated_fvs": d.get("gate_on_manipulated_fvs"),
                "gate_on_eval_naturals": d.get("gate_on_eval_naturals"),
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
