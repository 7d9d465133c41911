"""Gradient slingshots on a real model: does fine-tuning the weights alone (same class, no added
modules) pull the FV to a target while natural behaviour stays, and do the checks see it?

    python experiments/slingshot/run.py            # CIFAR-10 ResNet-20 (about 30 CPU minutes)
    python experiments/slingshot/run.py --smoke    # tiny model, random images, a temporary folder

Natural images: fvsanity.splits.three_way_split; the slingshot is fine-tuned on (``n_build`` of)
the building split and everything is measured on the evaluation split. Per variant (a class unit
showing target.png; every class unit showing the FV of class i+1), one manipulated model through
the fooling pipeline (:func:`fvsanity.fool.run_fool`: top-1/top-5, max |logit diff|, FV-to-target
SSIM / correlation / LPIPS-form distance with fvsanity's FV settings, the closed-loop path check
and its unmanipulated control), plus: the unit's AUROC for its class and its top-k exemplar
Jaccard (original vs manipulated), lucent ``render_vis`` FVs of the manipulated and original
weights (SSIM to the picture), and the exemplar-agreement signal (fvsanity.compare.exemplars) on
the manipulated and the original model. Writes <model>_<variant>.png and results.json to
``--out DIR`` (a full run without it: figures/slingshot, said in one line before it starts;
``--smoke`` without it: a fresh temporary folder; ``--figures`` is a deprecated alias); models and
cached FVs go to --work (gitignored runs/slingshot by default, OUT/work with --smoke).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's fvsanity, not an installed one
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))  # experiments/_outdir.py


def _data_root() -> Path:
    return Path(os.environ.get("FVSANITY_DATA", ROOT.parent / "shared" / "data"))


def _setup(run: dict, smoke: bool):
    """(model, NaturalImages, Split)."""
    import torch

    from fvsanity import load_model
    from fvsanity.data import from_tensor, load_images
    from fvsanity.splits import ROLES, three_way_split
    from fvsanity.testing import tiny_model

    if smoke:
        lm = tiny_model()
        g = torch.Generator().manual_seed(0)
        nat = from_tensor(torch.rand(60, 3, 16, 16, generator=g), torch.arange(60) % 5)
    else:
        lm = load_model(run["model"])
        nat = load_images(_data_root() / run["images"], lm, into_memory=True)
    sp = run["split"]
    return lm, nat, three_way_split(len(nat), sp["fractions"], sp["seed"], sp.get("order", ROLES))


def lucent_fvs(lm, unit, seeds, steps: int, size: int | None = None):
    """FVs of ``unit`` by lucent's ``render_vis`` (its fft parametrization at ``size`` px, else the
    model's input size, its Adam at lr 0.05, its standard transforms with pixel amounts scaled to the
    size): ``[S,3,H,W]``."""
    import numpy as np
    import torch
    from lucent.optvis import param, render, transform

    class Net(torch.nn.Module):  # lucent names layers by attribute path: "net_<layer>"
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

    h, w = lm.input_size if size is None else (size, size)
    f = min(h, w) / 224
    tr = [transform.pad(max(1, round(12 * f)), mode="constant", constant_value=0.5),
          transform.jitter(max(2, round(8 * f))), transform.random_scale([1 + (i - 5) / 50.0 for i in range(11)]),
          transform.random_rotate(list(range(-10, 11)) + 5 * [0]), transform.jitter(max(2, round(4 * f))),
          lm.preprocess]
    import copy

    model = Net(copy.deepcopy(lm.model)).eval()  # lucent leaves its hooks on the model: give it a copy
    out = []
    for s in seeds:
        torch.manual_seed(s)
        np.random.seed(s)
        imgs = render.render_vis(model, f"net_{unit.layer.replace('.', '_')}:{unit.channel}",
                                 lambda: param.image(h, w), transforms=tr, thresholds=(steps,), preprocess=False,
                                 progress=False, show_image=False, fixed_image_size=(h, w))
        out.append(torch.as_tensor(np.asarray(imgs[-1])).permute(0, 3, 1, 2).float())
    return torch.cat(out)


def variant_routes(lm, var: dict):
    """``(routes, fv_size)`` of a config variant: its units routed to its target (a picture beside
    config.json, ``unit:L:C``) or shifted; ``fv_size`` is the FV canvas (auditors' and the
    attacker's), None for the model's input size."""
    from fvsanity.fool import make_routes

    target = var.get("target")
    if target is not None and not target.startswith("unit:"):
        target = str(HERE / target)
    fv_size = var.get("fv_size")
    routes = make_routes(lm, var["units"], target, shift=var.get("shift"),
                         picture_size=lm.input_size if fv_size is None else (fv_size, fv_size))
    return routes, fv_size


def run_variant(lm, nat, split, name: str, var: dict, cfg: dict, work: Path, figures: Path, model_name: str,
                smoke: bool) -> dict:

    from fvsanity.compare.exemplars import exemplar_agreement
    from fvsanity.fool import FoolSettings, get_manipulation, run_fool
    from fvsanity.fool.metrics import ssim
    from fvsanity.fool.slingshot import unit_diagnostics

    routes, fv_size = variant_routes(lm, var)
    build = split.building[: var.get("n_build", cfg["n_build"])]
    train = nat.images[build]
    ev = nat.subset(split.evaluation)
    c = cfg["check"]
    s = FoolSettings(method="slingshot", seed=0, eval_units=var.get("eval_units", len(routes)),
                     eval_seeds=var["eval_seeds"], eval_steps=var["eval_steps"], check=True, lpips=c["lpips"] and not smoke,
                     check_top_k=c["check_top_k"], check_n_boot=c["check_n_boot"], check_n_perm=c["check_n_perm"],
                     timing_repeats=c["timing_repeats"], progress=False, method_options=dict(var["settings"]),
                     fv_size=fv_size)
    out = work / f"{model_name}_{name}"
    t0 = time.process_time()
    res = run_fool(lm, routes, train, ev, s, out)
    run_cpu = time.process_time() - t0
    shutil.copyfile(out / "fool.png", figures / f"{model_name}_{name}.png")
    # the plain class, back from model.safetensors (load_model(folder) does the same for a registered model)
    fooled = get_manipulation("slingshot").load(out / "model", base=lm)
    sm = res.summary
    units = [r.unit for r in routes]
    ud = unit_diagnostics(lm, fooled, units, ev.images, ev.labels, k=cfg["exemplars"]["k"])
    aurocs = [d["auroc_change"] for d in ud if "auroc_change" in d]
    row = {k: sm.get(k) for k in ("top1_original", "top1_manipulated", "top1_change_points", "top1_change_se_points",
                                  "top1_gained_lost", "top5_original",
                                  "top5_manipulated", "max_abs_logit_diff", "identical_top1_fraction",
                                  "ssim_manipulated_fv_to_target", "ssim_original_fv_to_target",
                                  "corr_manipulated_fv_to_target", "corr_original_fv_to_target",
                                  "lpips_uniform_manipulated_fv_to_target", "lpips_uniform_original_fv_to_target",
                                  "inference_time_ratio", "check_flags_manipulation", "check_flagged_fraction",
                                  "check_control_flagged_fraction", "finetune_cpu_seconds")}
    row.update({
        "n_units": len(routes), "eval_units": res.figure_fvs["units"], "n_eval_images": len(ev),
        "n_build_images": len(train), "fv_settings": {"steps": var["eval_steps"], "seeds": var["eval_seeds"],
                                                      "size": fv_size or lm.input_size[0],
                                                      "rest": "fvsanity defaults (fft, Adam lr 0.05, standard transforms)"},
        "auroc_change": max(aurocs, key=abs) if aurocs else None,
        "auroc_change_mean": sum(aurocs) / len(aurocs) if aurocs else None,
        "exemplar_jaccard": sum(d["exemplar_jaccard"] for d in ud) / len(ud),
        "per_unit": ud, "run_cpu_seconds": run_cpu,
    })
    # the exemplar-agreement signal: what an auditor holding only the model sees (manipulated model,
    # its FV) and the same signal on the original model with its own FV (the false-positive control)
    ex = cfg["exemplars"]
    sig_m, sig_o = [], []
    for i, u in enumerate(res.figure_fvs["units"]):
        kw = dict(k=ex["k"], n_random=ex["n_random"], threshold=ex["threshold"])
        sig_m.append(exemplar_agreement(fooled, u, res.figure_fvs["manipulated"][i:i + 1], ev, **kw).to_json())
        sig_o.append(exemplar_agreement(lm, u, res.figure_fvs["original"][i:i + 1], ev, **kw).to_json())

    def frac(sig):
        d = [x["flagged"] for x in sig if x["flagged"] is not None]
        return sum(d) / len(d) if d else None

    row["exemplar_signal"] = {"flagged_fraction_manipulated": frac(sig_m), "flagged_fraction_original": frac(sig_o),
                              "median_manipulated": [x["median"] for x in sig_m],
                              "median_original": [x["median"] for x in sig_o], "threshold": ex["threshold"],
                              "per_unit_manipulated": sig_m, "per_unit_original": sig_o}
    if var.get("lucent"):
        t1 = time.process_time()
        u = routes[0].unit
        seeds = [2000 + i for i in range(var["eval_seeds"])]
        fm = lucent_fvs(fooled, u, seeds, var["eval_steps"], fv_size)
        fo = lucent_fvs(lm, u, seeds, var["eval_steps"], fv_size)
        pic = routes[0].picture[None] if routes[0].picture is not None else None
        if pic is not None:
            row["lucent"] = {"unit": str(u), "seeds": seeds, "steps": var["eval_steps"],
                             "ssim_manipulated_fv_to_target": float(ssim(fm, pic).mean()),
                             "ssim_original_fv_to_target": float(ssim(fo, pic).mean()),
                             "cpu_seconds": time.process_time() - t1}
            _lucent_figure(fo, fm, pic, figures / f"{model_name}_{name}_lucent.png", row["lucent"])
    return row


def _lucent_figure(fo, fm, pic, path: Path, nums: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fvsanity.io import to_uint8

    fig, ax = plt.subplots(1, 3, figsize=(6.6, 2.9))
    for a, img, t in zip(ax, (fo[0], fm[0], pic[0]), ("original FV (lucent)", "manipulated FV (lucent)", "target")):
        a.imshow(to_uint8(img))
        a.set_title(t, fontsize=9)
        a.set_xticks([])
        a.set_yticks([])
    fig.text(0.5, 0.02, f"lucent render_vis, {nums['steps']} steps, seeds {nums['seeds']}: SSIM(FV, target) "
                        f"manipulated {nums['ssim_manipulated_fv_to_target']:.3f} vs original "
                        f"{nums['ssim_original_fv_to_target']:.3f}", ha="center", fontsize=7.5)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    import torch
    from _outdir import add_out_argument

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, random images")
    ap.add_argument("--only", default=None, help="one model of config.json")
    ap.add_argument("--variant", default=None, help="with --only: re-run this variant, keep the model's other "
                                                    "variants' rows from the existing results.json")
    ap.add_argument("--work", default=None, help="[runs/slingshot; OUT/work with --smoke]")
    add_out_argument(ap, "slingshot", alias="--figures")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads [1] (CPU times are per process: with "
                                                           "more threads than free cores they count spin-waits)")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> int:
    import torch
    from _outdir import output_dir, work_dir

    from fvsanity.io import atomic_write_json, provenance

    cfg = json.loads((HERE / "config.json").read_text())
    torch.manual_seed(0)
    if args.variant and not args.only:
        raise SystemExit("--variant needs --only MODEL")
    if args.smoke:
        sm = cfg["smoke"]
        runs = {"tiny": {"model": "tiny", "split": sm["split"], "variants": sm["variants"], "n_build": sm["n_build"]}}
    else:
        runs = {k: v for k, v in cfg["runs"].items() if args.only in (None, k)}
        if not runs:
            raise SystemExit(f"--only {args.only!r}: valid: {', '.join(cfg['runs'])}")
    figures = output_dir("slingshot", args.out, args.smoke)  # the PNGs and results.json
    work = work_dir("slingshot", figures, args.smoke, args.work)  # models, FVs: runs/slingshot, OUT/work with --smoke
    work.mkdir(parents=True, exist_ok=True)
    results = {"config": cfg, "provenance": provenance(), "smoke": args.smoke}
    old = figures / "results.json"
    prev = json.loads(old.read_text()) if args.only and old.exists() else {}
    if prev:  # one model re-run: keep the others' rows (each with its provenance)
        results.update({k: {**v, "provenance": v.get("provenance", prev.get("provenance"))}
                        for k, v in prev.items() if k in cfg["runs"] and k != args.only})
    t_all = time.process_time()
    for name, run in runs.items():
        lm, nat, split = _setup(run, args.smoke)
        rcfg = {"n_build": run["n_build"], "check": cfg["check"], "exemplars": cfg["exemplars"]}
        kept = {}
        if args.variant:  # the other variants' rows as they were (their settings must be unchanged)
            kept = {v: r for v, r in prev.get(name, {}).get("variants", {}).items() if v != args.variant}
            stale = [v for v in kept if _substance(prev["config"]["runs"].get(name, {}).get("variants", {}).get(v))
                     != _substance(run["variants"].get(v))]
            if stale or set(kept) | {args.variant} != set(run["variants"]):
                raise SystemExit(f"--variant {args.variant}: the kept variants {sorted(kept)} do not match "
                                 f"config.json's {sorted(run['variants'])} (changed: {stale}); re-run the whole model")
        rows = {v: kept[v] if v in kept else run_variant(lm, nat, split, v, var, rcfg, work, figures, name, args.smoke)
                for v, var in run["variants"].items()}
        pic = rows.get("picture") or next(iter(rows.values()))
        results[name] = {
            # the per-model fields of issue 13: prediction numbers over the worst variant, FV
            # similarity of the picture target, check flags over every evaluated unit
            "top1_change_points": max((r["top1_change_points"] for r in rows.values()), key=abs),
            "auroc_change": max((r["auroc_change"] for r in rows.values() if r["auroc_change"] is not None),
                                key=abs, default=None),
            "exemplar_jaccard": min(r["exemplar_jaccard"] for r in rows.values()),
            "ssim_manipulated_fv_to_target": pic["ssim_manipulated_fv_to_target"],
            "ssim_original_fv_to_target": pic["ssim_original_fv_to_target"],
            "check_flagged_fraction": _weighted([(r["check_flagged_fraction"], len(r["eval_units"])) for r in rows.values()]),
            "exemplar_signal_flagged_fraction": _weighted(
                [(r["exemplar_signal"]["flagged_fraction_manipulated"], len(r["eval_units"])) for r in rows.values()]),
            "exemplar_signal_control_flagged_fraction": _weighted(
                [(r["exemplar_signal"]["flagged_fraction_original"], len(r["eval_units"])) for r in rows.values()]),
            "finetune_cpu_seconds": sum(r["finetune_cpu_seconds"] for r in rows.values()),
            "variants": rows,
            "split": split.to_json(),
            "provenance": results["provenance"],
        }
    results["total_cpu_seconds"] = time.process_time() - t_all
    atomic_write_json(figures / "results.json", results)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk not in ("variants", "split", "provenance")}
                      for k, v in results.items() if k in runs}, indent=1, default=str))
    print(f"wrote {figures / 'results.json'} ({results['total_cpu_seconds'] / 60:.1f} CPU min)")
    return 0


def _substance(variant):
    """A config variant without its notes (``*_note``: prose that does not change a result)."""
    return None if variant is None else {k: v for k, v in variant.items() if not k.endswith("_note")}


def _weighted(pairs):
    ok = [(v, n) for v, n in pairs if v is not None and v == v]
    return sum(v * n for v, n in ok) / sum(n for _, n in ok) if ok else None


if __name__ == "__main__":
    sys.exit(main())
