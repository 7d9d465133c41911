"""Fooling circuit on real models: FVs show arbitrary targets, natural predictions do not change.

    python experiments/fooling_circuit/run.py            # CIFAR-10 ResNet-20 and ImageNet SqueezeNet
    python experiments/fooling_circuit/run.py --only cifar10-resnet20
    python experiments/fooling_circuit/run.py --smoke    # tiny model, seconds, a temporary folder

Three-way split of the natural images (fvsanity.splits): the tuning split is the half the
settings were chosen on (the old evaluation half); the rest is divided into a building split (the
detector is trained and calibrated on it) and an evaluation split (only measured). Per model: one
detector (FVs of many units, checkpoints from early to late steps), then one manipulated model
per variant (all class units permuted; one class unit showing target.png), each measured on the
evaluation images and on evaluation units that no setting was chosen on. Writes
<model>_<variant>.png and results.json to ``--out DIR`` (a full run without it:
figures/fooling_circuit, said in one line before it starts; ``--smoke`` without it: a fresh
temporary folder; ``--figures`` is a deprecated alias); manipulated models and cached FVs go to
--work (gitignored runs/fooling_circuit by default, OUT/work with --smoke). Calls only the public API.
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
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))  # experiments/_outdir.py, _fooling.py


def main(argv: list[str] | None = None) -> int:
    import torch
    from _fooling import setup, variant_routes
    from _outdir import add_out_argument, output_dir, work_dir

    from fvsanity.errors import FVSanityError
    from fvsanity.fool import FoolSettings, prepare_detector, run_fool
    from fvsanity.generate import FVResult
    from fvsanity.io import atomic_write_json, provenance

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model, random images, seconds")
    ap.add_argument("--only", default=None, help="run only this model's entry of config.json")
    ap.add_argument("--config", default=str(HERE / "config.json"))
    add_out_argument(ap, "fooling_circuit", alias="--figures")
    ap.add_argument("--work", default=None, help="cache / model folder [runs/fooling_circuit; OUT/work with --smoke]")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = json.loads(Path(args.config).read_text())
    if args.smoke:
        runs = {"tiny": {k: cfg["smoke"][k] for k in ("variants", "settings", "split", "units")}}
    else:
        runs = {k: v for k, v in cfg["runs"].items() if args.only in (None, k)}
        if not runs:
            print(f"--only {args.only!r}: valid: {', '.join(cfg['runs'])}", file=sys.stderr)
            return 2
    figures = output_dir("fooling_circuit", args.out, args.smoke)  # the PNGs and results.json
    work = work_dir("fooling_circuit", figures, args.smoke, args.work)  # models, FVs: runs/fooling_circuit, OUT/work with --smoke
    res_path = figures / "results.json"
    results = json.loads(res_path.read_text()) if res_path.is_file() and not args.smoke else {}
    results.update({"config": cfg, "provenance": provenance(), "smoke": args.smoke})
    results.setdefault("runs", {})
    for name, run in runs.items():
        lm, nat, split = setup(run, run["split"], args.smoke)
        build = nat.images[split.building]
        ev = nat.subset(split.evaluation)
        settings = FoolSettings(**{**run["settings"], "det_checkpoints": tuple(run["settings"]["det_checkpoints"]),
                                   "progress": not args.smoke})
        shared = run.get("shared_fvs")
        extra = None
        if shared and (ROOT / shared / "fv.json").is_file():
            extra = [FVResult.load(ROOT / shared)]
        plans = [variant_routes(lm, var, run["units"], settings.eval_units, HERE) for var in run["variants"]]
        # one detector per model, guarding every variant's routes (incl. picture trajectories)
        bundle = prepare_detector(lm, build, ev.load().images, settings, work / name, extra_train_fvs=extra,
                                  routes=[r for rs, _, _ in plans for r in rs])
        seen = set(run["units"].get("tuning_detector_heldout", [])) & set(bundle.heldout_units)
        if seen:
            raise FVSanityError(f"detector held-out units {sorted(seen)} were held out while tuning; change settings.seed")
        for var, (routes, want, us) in zip(run["variants"], plans):
            out = work / name / var["name"]
            res = run_fool(lm, routes, build, ev, settings, out, prepared=bundle, work_dir=work / name,
                           eval_units=want)
            if list(res.figure_fvs["units"]) != want:
                raise FVSanityError(f"run_fool evaluated {res.figure_fvs['units']}, not the evaluation units {want}")
            key = f"{name}_{var['name']}"
            shutil.copyfile(out / "fool.png", figures / f"{key}.png")
            d = res.to_json()
            results["runs"][key] = {
                "summary": res.summary,
                "variant": var,
                "routed_units": var["units"] if var["units"] != "heldout" else want,
                "split": {
                    "held_out": True,
                    "images": split.to_json(),
                    "units": us.to_json(),
                    "detector_train_units": bundle.train_units,
                    "detector_heldout_units": bundle.heldout_units,
                    "numbers_from": {
                        "predictions, identical top-1, max logit diff, gate on naturals": "evaluation images",
                        "detector held-out accuracy": "evaluation images + detector held-out units (FVs of units "
                                                      "disjoint from those held out while tuning)",
                        "detector held-out picture recall": "picture-trajectory seeds 1000+ (the same seeds as "
                                                            "while tuning: NOT held out)",
                        "FV similarity, target-class share, check": "evaluation units (not in units.tuning), "
                                                                    "check on evaluation images",
                        "detector training / threshold, circuit calibration": "building images",
                    },
                },
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
                    {"unit": u["unit"], "flagged": u["flagged"], "decision": u.get("decision"), "why": u.get("why"),
                     "own_layer_normalized": u.get("own_layer_normalized"),
                     "original_outcomes": u["original"]["verdict"]["counts"],
                     "manipulated_outcomes": u["manipulated"]["verdict"]["counts"], "n_layers": len(u["layers"])}
                    for u in d.get("check", {}).get("units", [])
                ],
                "model_dir": str(out / "model"),
            }
            if res_path.is_file() and not args.smoke:  # merge: another run may have written other keys
                on_disk = json.loads(res_path.read_text())
                on_disk.setdefault("runs", {})[key] = results["runs"][key]
                results["runs"] = on_disk["runs"]
            results["runs"][key]["provenance"] = results["provenance"]  # --only keeps other runs: each its own
            atomic_write_json(res_path, results)
    print(f"wrote {res_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
