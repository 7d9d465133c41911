"""Path-level check: do FVs of class units reach the unit through the same edges as its images?

For every unit in config.json (CIFAR-10 ResNet-20 class units by default): FVs (rendered, or
loaded from ``fv_dir``), the class's natural images and other-class natural images; EAP-IG edge
scores of every conv / shortcut / linear edge on the way to the unit for the three groups
(:func:`fvsanity.compare.circuits.circuit_overlap`), compared per layer with the same-class
split-half null and the other-class null (calibrated score, bootstrap CI, permutation p with
Holm across layers). Repeated for each reference in ``references`` (sensitivity).

Writes to ``--out DIR`` (a full run without it: figures/circuit_overlap/, said in one line
before it starts; ``--smoke`` without it: a fresh temporary folder): results.json (config, per-unit per-layer
numbers, per-layer summary over units, provenance), attribution_graph.png (one unit: FV vs
natural circuit), overlap_profile.png (all units), fvs.png. Per-unit results are cached
atomically under ``cache_dir`` (runs/circuit_overlap; ``OUT/cache`` with --smoke or an --out
outside figures/) so an interrupted run resumes. The last line printed is one JSON
object of the headline numbers.

    python experiments/circuit_overlap/run.py
    python experiments/circuit_overlap/run.py --smoke     # tiny model, seconds, a temporary folder
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))  # experiments/_outdir.py


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_class_images(lm, root: Path, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, 3, H, W] RGB images and [N] labels: ``per_class`` seeded picks from each class folder."""
    from PIL import Image

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    g = torch.Generator().manual_seed(seed)
    imgs, labels = [], []
    for label, cls in enumerate(classes):
        files = sorted((root / cls).iterdir())
        pick = torch.randperm(len(files), generator=g)[:per_class].tolist()
        for i in sorted(pick):
            with Image.open(files[i]) as im:
                imgs.append(lm.preprocess.load_pil(im))
            labels.append(label)
    return torch.stack(imgs), torch.tensor(labels)


def rounded(obj, digits: int = 4):
    """Floats rounded (results.json stays small); NaN/inf become None."""
    if isinstance(obj, float):
        return round(obj, digits) if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


def compact_unit(u: dict, ref0: str) -> dict:
    """Full per-layer numbers for the main reference; primary statistic only for the others."""
    out = {k: v for k, v in u.items() if k != "references"}
    out["references"] = {}
    for ref, d in u["references"].items():
        if ref == ref0:
            out["references"][ref] = d
            continue
        keep = ("name", d["primary"], "null_same", "null_other", "calibrated", "p_value", "p_holm")
        out["references"][ref] = {
            **{k: v for k, v in d.items() if k != "layers"},
            "layers": [{k: la[k] for k in keep} for la in d["layers"]],
        }
    return out


def get_fvs(lm, units: list[str], cfg: dict, fv_dir: Path):
    """The units' FVs through the library's cache (:func:`fvsanity.cache.render_cached`): reused
    only when made for these weights, units, seeds and every render setting."""
    from fvsanity.cache import render_cached

    res, reused = render_cached(lm, units, fv_dir, seeds=list(range(cfg["seeds"])), steps=cfg["fv_steps"],
                                progress=False)
    log(f"{'loaded' if reused else 'rendered'} FVs: {len(units)} units x {cfg['seeds']} seeds x {cfg['fv_steps']} steps")
    return res


def main(argv: list[str] | None = None) -> int:
    from _outdir import add_out_argument, inside_figures, output_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=HERE / "config.json")
    add_out_argument(ap, "circuit_overlap")
    ap.add_argument("--smoke", action="store_true", help="tiny model and random images, seconds")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from fvsanity.compare.attribution import edge_attribution
    from fvsanity.compare.circuits import CircuitOverlap, circuit_overlap
    from fvsanity.io import atomic_write_json, atomic_write_text, image_grid, provenance, save_png
    from fvsanity.report.attribution_graph import (
        plot_attribution_graph,
        plot_overlap_profile,
        save_figure,
    )

    cfg = json.loads(args.config.read_text())
    if args.smoke:
        cfg = {**cfg, **cfg["smoke"]}
    cfg.pop("smoke", None)
    out = output_dir("circuit_overlap", args.out, args.smoke)  # a full run: figures/circuit_overlap (cfg["out"])
    # caches never land in figures/: a full run's go to cache_dir (runs/, gitignored)
    cache = (out / "cache") if args.smoke or (args.out and not inside_figures(out)) else (REPO / cfg["cache_dir"])
    cache.mkdir(parents=True, exist_ok=True)

    if args.smoke:
        from fvsanity.testing import tiny_model

        lm = tiny_model()
        g = torch.Generator().manual_seed(cfg["seed"])
        n_cls = len(lm.class_names)
        images = torch.rand(n_cls * cfg["per_class"], 3, *lm.input_size, generator=g)
        labels = torch.arange(n_cls).repeat_interleave(cfg["per_class"])
    else:
        from fvsanity.models import load_model
        from fvsanity.testing import data_root

        root = data_root()
        if root is None:
            raise SystemExit("set FVSANITY_DATA to the shared data folder (see README)")
        lm = load_model(cfg["model"])
        images, labels = load_class_images(lm, root / cfg["images"], cfg["per_class"], cfg["seed"])
    units = list(cfg["units"])
    fv = get_fvs(lm, units, cfg, cache / "fvs")
    log(f"FV objective (mean over seeds): {[round(float(v), 2) for v in fv.final.mean(1)]}")

    # cache key: every setting that changes the numbers (not the figure or output options)
    cosmetic = ("out", "cache_dir", "dpi", "graph_unit", "graph_top", "claim", "references")
    key = hashlib.sha256(
        json.dumps({k: cfg[k] for k in sorted(cfg) if k not in cosmetic}, sort_keys=True).encode()
    ).hexdigest()[:12]
    per_unit: dict[str, dict] = {}
    overlaps: dict[str, list] = {ref: [] for ref in cfg["references"]}
    for i, spec in enumerate(units):
        u_channel = int(spec.split(":")[1])
        nat_idx = (labels == u_channel).nonzero()[:, 0][: cfg["n_natural"]]
        g = torch.Generator().manual_seed(cfg["seed"] + 1000 + i)
        others = (labels != u_channel).nonzero()[:, 0]
        oth_idx = others[torch.randperm(others.numel(), generator=g)[: cfg["n_other"]]]
        per_unit[spec] = {"unit": spec, "fv_objective": fv.final[i].tolist(), "references": {}}
        for ref in cfg["references"]:
            f = cache / f"{spec.replace(':', '_')}_{ref}_{key}.json"
            if f.is_file():
                d = json.loads(f.read_text())
                log(f"{spec} [{ref}]: cached")
            else:
                t0 = time.perf_counter()
                co = circuit_overlap(
                    lm, spec, fv.images[i], images[nat_idx], images[oth_idx],
                    layers=cfg["layers"], method=cfg["method"], steps=cfg["steps"], reference=ref,
                    generator=cfg["seed"] + i, n_splits=cfg["n_splits"], n_boot=cfg["n_boot"],
                    n_perm=cfg["n_perm"], alpha=cfg["alpha"],
                )
                d = co.to_json()
                d["seconds"] = round(time.perf_counter() - t0, 2)
                atomic_write_json(f, d)
                s = d["summary"]
                log(f"{spec} [{ref}]: {s['n_layers_above_other']}/{s['n_layers']} layers above other, "
                    f"median calibrated {s['median_calibrated']}, {d['seconds']} s")
            per_unit[spec]["references"][ref] = d
            overlaps[ref].append(CircuitOverlap.from_json(d))

    # summary over units, per layer and reference
    summary = {}
    for ref, ovs in overlaps.items():
        names = [la.name for la in ovs[0].layers]
        prim = ovs[0].primary
        rows = []
        for j, name in enumerate(names):
            las = [ov.layers[j] for ov in ovs]
            rows.append({
                "name": name,
                f"fv_{prim}_median": float(np.median([la.fv_vs_natural[prim] for la in las])),
                f"same_{prim}_median": float(np.median([la.null_same[prim] for la in las])),
                f"other_{prim}_median": float(np.median([la.null_other[prim] for la in las])),
                "fv_jaccard_top1pct_median": float(np.median([la.fv_vs_natural["jaccard_top1pct"] for la in las])),
                "same_jaccard_top1pct_median": float(np.median([la.null_same["jaccard_top1pct"] for la in las])),
                "other_jaccard_top1pct_median": float(np.median([la.null_other["jaccard_top1pct"] for la in las])),
                "calibrated_median": float(np.nanmedian([la.calibrated for la in las])),
                "n_units_above_other": int(sum(la.p_holm < cfg["alpha"] for la in las)),
                "n_units_fv_below_other": int(sum(la.fv_vs_natural[prim] < la.null_other[prim] for la in las)),
            })
        pairs = [(la.p_holm < cfg["alpha"]) for ov in ovs for la in ov.layers]
        summary[ref] = {
            "primary": prim,
            "n_units": len(ovs),
            "fraction_unit_layers_not_above_other": 1.0 - float(np.mean(pairs)),
            "median_calibrated_all": float(np.nanmedian([la.calibrated for ov in ovs for la in ov.layers])),
            "layers": rows,
        }

    # figures: overlap profile (all units, first reference), attribution graph of one unit, FVs
    ref0 = cfg["references"][0]
    fig = plot_overlap_profile(overlaps[ref0],
                         title=f"{lm.name}: FV vs natural circuit overlap per layer ({cfg['method']}, reference {ref0}, "
                               f"{len(units)} units)")
    save_figure(fig, out / "overlap_profile.png", dpi=cfg["dpi"])
    gi = units.index(cfg["graph_unit"]) if cfg["graph_unit"] in units else 0
    gspec = units[gi]
    ch = int(gspec.split(":")[1])
    nat_idx = (labels == ch).nonzero()[:, 0][: cfg["n_natural"]]
    kw = dict(layers=cfg["layers"], method=cfg["method"], steps=cfg["steps"], reference=ref0)
    a_fv = edge_attribution(lm, gspec, fv.images[gi], **kw)
    a_nat = edge_attribution(lm, gspec, images[nat_idx], **kw)
    name = lm.class_names[ch] if lm.class_names else str(ch)
    fig = plot_attribution_graph(a_fv, a_nat, top=cfg["graph_top"],
                           titles=(f"FV circuit ({a_fv.metric_clean.shape[0]} FVs)",
                                   f"natural circuit ({a_nat.metric_clean.shape[0]} '{name}' images)"),
                           suptitle=f"{lm.name} {gspec} ('{name}'): top edges of the last blocks, "
                                    f"{cfg['method']}, reference {ref0}")
    save_figure(fig, out / "attribution_graph.png", dpi=cfg["dpi"])
    save_png(out / "fvs.png", image_grid(fv.images.flatten(0, 1), nrow=fv.images.shape[1]))

    head = {
        "model": lm.name,
        "n_units": len(units),
        "method": cfg["method"],
        "reference": ref0,
        "fraction_unit_layers_not_above_other": summary[ref0]["fraction_unit_layers_not_above_other"],
        "median_calibrated_all_layers": summary[ref0]["median_calibrated_all"],
        "compute_seconds": round(sum(r["seconds"] for u in per_unit.values() for r in u["references"].values()), 1),
    }
    results = {
        "claim": cfg.get("claim"),
        "config": cfg,
        "smoke": args.smoke,
        "headline": head,
        "summary": summary,
        "units": [compact_unit(u, ref0) for u in per_unit.values()],
        "fv_settings": fv.settings,
        "provenance": provenance(),
    }
    atomic_write_text(out / "results.json", json.dumps(rounded(results), separators=(",", ":")) + "\n")
    log(f"wrote {out}")
    print(json.dumps(head))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
