"""Silent-unit trigger sweep: which offset / ramp width lets the FV hand over to the target?

    python experiments/silent_units/sweep.py                 # both models, the configs below
    python experiments/silent_units/sweep.py --only cifar10-resnet20

For each (offset, width) it builds trigger-mode silent units for all class units (i -> i+shift),
calibrated on the TUNING split of the images (config.json's "split": the half the settings are
chosen on; run.py calibrates on the building split and measures on the evaluation split, neither
of which this sweep touches), renders FVs of a few manipulated units (1 seed, 256 steps; these
units are tuning units: config.json's "units"."tuning" lists them, and run.py evaluates other
units) and counts how many the ORIGINAL model calls the target class. Merges its entries into
``--out DIR``/sweep.json (default figures/silent_units: a full run, said in one line before it
starts; a ``--out`` ending in .json is that file) and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))  # experiments/_outdir.py

SETUPS = {
    "cifar10-resnet20": {"images": "cifar10-test", "shift": 3, "margin_range": 1.25, "units": [0, 1, 2, 4, 5, 6],
                         "configs": [(2.0, 1.0), (3.0, 1.0), (20.0, 1.0), (20.0, 10.0)]},
    "imagenet-squeezenet": {"images": "imagenet-samples", "shift": 100, "margin_range": 3.0, "units": [401, 650, 7, 123, 555, 890],
                            "configs": [(3.0, 1.0), (10.0, 1.0), (10.0, 10.0)]},
}


def image_split(n: int, split_cfg: dict):
    """The three-way Split of ``n`` images from config.json; the sweep calibrates on ``.tuning`` only."""
    from fvsanity.fool import split_indices
    from fvsanity.splits import split_with_tuning

    t = split_cfg["tuned_on"]
    _old_build, old_eval = split_indices(n, t["fraction"], t["seed"])
    return split_with_tuning(n, old_eval, split_cfg["evaluation_fraction"], split_cfg["seed"])


def main(argv: list[str] | None = None) -> int:
    import torch
    from _outdir import add_out_argument, output_file

    from fvsanity import load_model
    from fvsanity.data import load_images
    from fvsanity.errors import FVSanityError
    from fvsanity.fool import build_silent_units, make_routes, silent_zero_fraction
    from fvsanity.generate import render
    from fvsanity.io import atomic_write_json, provenance

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(SETUPS), default=None)
    ap.add_argument("--steps", type=int, default=256)
    add_out_argument(ap, None, what="folder of sweep.json (or a .json file)",
                     default="figures/silent_units: a full run")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    data = Path(os.environ.get("FVSANITY_DATA", ROOT.parent / "shared" / "data"))
    run_cfg = json.loads((HERE / "config.json").read_text())["runs"]
    out = output_file("silent_units", args.out, "sweep.json")
    results: dict = json.loads(out.read_text()) if out.is_file() else {}
    results.setdefault("runs", {})
    results["steps"] = args.steps
    for name, cfg in SETUPS.items():
        if args.only not in (None, name):
            continue
        lm = load_model(name)
        nat = load_images(data / cfg["images"], lm, into_memory=True)
        split = image_split(len(nat), run_cfg[name]["split"])
        tr = split.tuning
        n_cls = len(lm.class_names) or 10
        units = [f"{lm.output_layer}:{u}" for u in cfg["units"]]
        loose = sorted(set(units) - set(run_cfg[name]["units"]["tuning"]))
        if loose:
            raise FVSanityError(f"sweep units {loose} are missing from config.json's units.tuning for {name}")
        for offset, width in cfg["configs"]:
            fooled = build_silent_units(lm, make_routes(lm, "all", shift=cfg["shift"]), nat.images[tr], mode="trigger",
                                        margin_sd=1.0, margin_range=cfg["margin_range"], offset=offset, width=width)
            res = render(fooled, units, seeds=[0], steps=args.steps, progress=False)
            with torch.no_grad():
                top = lm(res.images[:, 0]).argmax(1).tolist()
            hits = [int(t == (u + cfg["shift"]) % n_cls) for t, u in zip(top, cfg["units"])]
            fired = [silent_zero_fraction(fooled, res.images[i, :1])["fraction"] == 0.0 for i in range(len(units))]
            key = f"{name} offset={offset:g} width={width:g}"
            results["runs"][key] = {"units": units, "top1_of_fv": top, "target_class_hits": sum(hits),
                                    "n": len(units), "fired": fired, "steps": args.steps,
                                    "calibration": f"tuning split ({len(tr)} images)", "split": split.to_json()}
            print(f"{key}: {sum(hits)} of {len(units)} FVs called the target class; fired {sum(fired)}", flush=True)
    results["provenance"] = provenance()
    atomic_write_json(out, results)
    print(json.dumps({k: f"{v['target_class_hits']}/{v['n']}" for k, v in results["runs"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
