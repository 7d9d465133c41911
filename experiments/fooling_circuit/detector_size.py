"""Diagnostic: is the ResNet-20 detector's held-out failure the seed or the number of natural images?

    python experiments/fooling_circuit/detector_size.py    # after run.py --only cifar10-resnet20

Reuses the FVs that run.py cached in --work (training FVs, held-out FVs, picture trajectories)
and retrains the detector with run.py's recipe (60 epochs, 32 px, stem stride 2; threshold from
the building split's calibration part) in two variants: (a) seed 0 instead of the config's 4 on
the same 400 building images; (b) the config's seed on 800 natural images (the 400 building-fit
images plus the first 400 tuning images). Each is scored on the same held-out FVs and evaluation
images as run.py's detector. NOTHING is chosen from this: it only explains the held-out numbers.
Writes ``--out DIR``/detector_size.json (default figures/fooling_circuit: a full run, said in
one line before it starts; a ``--out`` ending in .json is that file) and prints one JSON line.
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


def main(argv: list[str] | None = None) -> int:
    import torch
    from _outdir import add_out_argument, output_file

    from fvsanity import load_model
    from fvsanity.data import load_images
    from fvsanity.fool import (
        FoolSettings,
        calibrate_threshold,
        detector_logits,
        evaluate_detector,
        load_detector,
        split_indices,
        train_detector,
    )
    from fvsanity.generate import FVResult
    from fvsanity.io import atomic_write_json, provenance
    from fvsanity.splits import split_with_tuning

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "runs" / "fooling_circuit" / "cifar10-resnet20"))
    add_out_argument(ap, None, what="folder of detector_size.json (or a .json file)",
                     default="figures/fooling_circuit: a full run")
    args = ap.parse_args(argv)
    out_path = output_file("fooling_circuit", args.out, "detector_size.json")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    run = json.loads((HERE / "config.json").read_text())["runs"]["cifar10-resnet20"]
    s = FoolSettings(**{**run["settings"], "det_checkpoints": tuple(run["settings"]["det_checkpoints"])})
    work = Path(args.work)
    lm = load_model(run["model"])
    nat = load_images(Path(os.environ.get("FVSANITY_DATA", ROOT.parent / "shared" / "data")) / run["images"], lm,
                      into_memory=True)
    t = run["split"]["tuned_on"]
    split = split_with_tuning(len(nat), split_indices(len(nat), t["fraction"], t["seed"])[1],
                              run["split"]["evaluation_fraction"], run["split"]["seed"])
    build, ev, tune = nat.images[split.building], nat.images[split.evaluation], nat.images[split.tuning]
    fit, cal = split_indices(len(build), 1 - s.calib_fraction, s.seed)  # as prepare_detector does

    def stages(r, keep=None):
        ks = sorted(k for k in r.checkpoints if keep is None or k in set(keep))
        return torch.cat([r.images.flatten(0, 1)] + [r.checkpoints[k].flatten(0, 1) for k in ks])

    held = FVResult.load(work / "fv_detector_heldout")
    held_imgs = stages(held, s.det_checkpoints)
    fv_imgs = torch.cat([stages(FVResult.load(work / "fv_detector_train"), s.det_checkpoints),
                         stages(FVResult.load(next(work.glob("fv_picture_*_train"))))])

    def score(det) -> dict:
        th = calibrate_threshold(detector_logits(det, build[cal]), s.margin, s.margin_sd)
        r = evaluate_detector(det, held_imgs, ev, th)
        return {"threshold": th, "accuracy": r.accuracy, "fv_recall": r.fv_recall,
                "natural_specificity": r.natural_specificity}

    size = s.det_size or (64 if min(lm.input_size) >= 64 else min(lm.input_size))  # as prepare_detector does
    out = {"run_py_detector": {"seed": s.seed, "n_natural": len(fit), **score(load_detector(work / "detector.safetensors"))}}
    for tag, seed, naturals in [("seed0_400_building", 0, build[fit]),
                                ("seed_config_800_building_plus_tuning", s.seed, torch.cat([build[fit], tune[:400]]))]:
        det, _ = train_detector(fv_imgs, naturals, size=size, epochs=s.det_epochs, stem_stride=s.det_stem_stride,
                                seed=seed, progress=False)
        out[tag] = {"seed": seed, "n_natural": len(naturals), **score(det)}
        print(tag, out[tag], flush=True)
    atomic_write_json(out_path, {"runs": out, "split": split.to_json(), "note": __doc__.split("\n\n")[1],
                                 "provenance": provenance()})
    print(json.dumps({k: round(v["accuracy"], 4) for k, v in out.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
