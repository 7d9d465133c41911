"""Geirhos et al. 2023, Fig. 5 at small scale: do class units' FVs travel like natural images?

For each setup in config.json (real ImageNet SqueezeNet + 1,000 ImageNet images; CIFAR-10
ResNet-20 + 2,000 test images): FVs of last-layer class units (loaded from ``fv_dir`` if they
are there, else generated and saved there), one streamed activation pass of the natural images,
and the layer-by-layer path-similarity check (Spearman; references: natural vs natural of the
class / top-k exemplars, natural vs other classes). Also: the same check on the FVs saved at
intermediate optimization steps, and the objective traces (to show whether they plateaued).

Writes to ``--out DIR`` (a full run without it: figures/path_similarity/, said in one line
before it starts; ``--smoke`` without it: a fresh temporary folder; FVs are kept in each setup's
``fv_dir``, under runs/): path_similarity_<setup>.png (mean over
units), path_similarity_<setup>_units.png (per unit), objective_traces_<setup>.png,
check_<setup>.json (everything fvsanity check would write) and results.json (numbers, config,
seeds, versions, git SHA). The last line printed is one JSON object of the headline numbers.

    python experiments/path_similarity/run.py                 # both setups (long on CPU)
    python experiments/path_similarity/run.py --setup cifar
    python experiments/path_similarity/run.py --smoke    # tiny model, seconds, a temporary folder
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))  # experiments/_outdir.py


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def expand_units(spec) -> list[str]:
    """``"layer:{a..b step s}"`` or a list of unit specs -> list of unit specs."""
    if isinstance(spec, list):
        return [str(s) for s in spec]
    m = re.fullmatch(r"(.+):\{(\d+)\.\.(\d+) step (\d+)\}", spec)
    if not m:
        return [spec]
    layer, a, b, s = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))
    return [f"{layer}:{c}" for c in range(a, b + 1, s)]


def get_fvs(lm, units, cfg, fv_dir: Path | None, allow_generate: bool, progress: bool):
    """FVResult for ``units``: loaded from ``fv_dir`` (subset of its units allowed), else rendered."""
    from dataclasses import replace

    from fvsanity.generate import FVResult, render

    if fv_dir is not None and (fv_dir / "fv.json").is_file():
        res = FVResult.load(fv_dir)
        have = [str(u) for u in res.units]
        want_seeds = list(range(cfg["seeds"])) if isinstance(cfg["seeds"], int) else list(cfg["seeds"])
        if (set(units) <= set(have) and res.settings.get("model_fingerprint") == lm.fingerprint()
                and res.settings.get("steps") == cfg["steps"] and list(res.seeds) == want_seeds
                and bool(res.settings.get("amp", False)) == bool(cfg.get("amp", False))):
            idx = torch.tensor([have.index(u) for u in units])
            log(f"loaded FVs from {fv_dir} ({res.settings.get('steps')} steps, seeds {res.seeds})")
            return replace(
                res, images=res.images[idx], traces=res.traces[idx], final=res.final[idx],
                activations=[res.activations[i] for i in idx.tolist()] if res.activations else [],
                units=[res.units[i] for i in idx.tolist()], checkpoints={k: v[idx] for k, v in res.checkpoints.items()},
            )
        log(f"FVs in {fv_dir} do not cover the units, or were made for other weights / steps / seeds; generating")
    if not allow_generate:
        raise SystemExit(f"no FVs at {fv_dir} and --no-generate given")
    amp = bool(cfg.get("amp", False))  # bf16 autocast (see config.json's note on when it is allowed)
    log(f"generating FVs: {len(units)} units x {cfg['seeds']} seeds x {cfg['steps']} steps{' (bf16 autocast)' if amp else ''}")
    res = render(lm, units, seeds=cfg["seeds"], steps=cfg["steps"], checkpoints=cfg.get("checkpoints", ()), progress=progress,
                 amp=amp)
    if fv_dir is not None:
        tmp = fv_dir.with_name(fv_dir.name + "_tmp")
        res.save(tmp)
        replace_dir(tmp, fv_dir)
        log(f"saved FVs to {fv_dir}")
    return res


def replace_dir(new: Path, dest: Path) -> None:
    """Move the folder ``new`` to ``dest``, replacing any folder there, without a moment where
    neither exists: the old ``dest`` is renamed aside, ``new`` renamed in, and only then is the
    old one deleted. If moving ``new`` in fails, the old folder is put back and the error raised.
    """
    import shutil
    import uuid

    aside = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
    if dest.exists():
        os.replace(dest, aside)
    try:
        os.replace(new, dest)
    except BaseException:
        if aside.exists():
            os.replace(aside, dest)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def trace_stats(traces: torch.Tensor) -> dict:
    """Plateau numbers from traces [U, S, steps] (objective per step, under random transforms).

    Smoothed with a window of steps/16; ``gain_last_quarter`` = (end - at 75%) / (end - start):
    the share of the total gain made in the last quarter of the steps.
    """
    steps = traces.shape[-1]
    w = max(1, steps // 16)
    flat = traces.flatten(0, 1).double()
    start = flat[:, :w].mean(1)
    end = flat[:, -w:].mean(1)
    q = int(steps * 0.75)
    mid = flat[:, max(0, q - w) : q].mean(1)
    gain = (end - mid) / (end - start).abs().clamp_min(1e-12)
    return {
        "steps": steps,
        "window": w,
        "gain_last_quarter_median": float(gain.median()),
        "gain_last_quarter_max": float(gain.max()),
        "gain_last_quarter_per_fv": [round(float(g), 4) for g in gain],
    }


def plot_traces(traces: torch.Tensor, units, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = traces.shape[-1]
    w = max(1, steps // 32)
    kernel = torch.ones(1, 1, w) / w
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i in range(traces.shape[0]):
        for j in range(traces.shape[1]):
            t = traces[i, j].double()
            rel = t / t[-w:].mean().abs().clamp_min(1e-12)
            sm = torch.nn.functional.conv1d(rel[None, None].float(), kernel).flatten()
            ax.plot(range(w - 1, steps), sm.tolist(), lw=0.6, alpha=0.6)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xlabel("optimization step")
    ax.set_ylabel("objective / final objective (smoothed)")
    ax.set_ylim(-0.2, 1.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarize(check: dict) -> dict:
    """Per-layer mean curves, verdict counts, early (first 2/3) vs late (last 1/3) layers."""
    from fvsanity.report.path_figure import mean_profile

    units = check["units"]
    names = [r["name"] for r in units[0]["layers"]]
    curves = {}
    for key in ("fv_vs_natural", "natural_vs_natural", "natural_vs_other", "normalized"):
        prof = mean_profile(check, key)
        curves[key] = {n: {"mean": prof[n][0], "ci95_half": prof[n][1], "n": prof[n][2]} for n in names}
    med = {}
    above = {}
    for n in names:
        vals = sorted(float(r["normalized"]) for u in units for r in u["layers"] if r["name"] == n and r["normalized"] is not None)
        med[n] = vals[len(vals) // 2] if vals else float("nan")
        above[n] = sum(1 for u in units for r in u["layers"] if r["name"] == n and r["above_baseline"]) / len(units)
    n_early = (2 * len(names)) // 3
    early, late = names[:n_early], names[n_early:]

    def avg(d, keys):
        v = [d[k] for k in keys if isinstance(d[k], float) and math.isfinite(d[k])]
        return sum(v) / len(v) if v else float("nan")

    diff = {n: curves["fv_vs_natural"][n]["mean"] - curves["natural_vs_other"][n]["mean"] for n in names}
    from fvsanity.compare.verdict import OUTCOMES as outcomes
    per_layer = {n: {o: sum(1 for u in units for r in u["layers"] if r["name"] == n and r.get("outcome") == o)
                     for o in outcomes} for n in names}
    return {
        "n_units": len(units),
        "layers": names,
        "mean_curves": curves,
        "median_normalized": med,
        "fraction_units_above_baseline": above,
        "fv_minus_other": diff,
        "verdict_labels": {u["unit"]: u["verdict"]["label"] for u in units},
        "layer_outcomes": per_layer,
        "unit_layer_outcomes": {o: sum(c[o] for c in per_layer.values()) for o in outcomes},
        "unit_outcomes": {o: sum(1 for u in units if u["verdict"]["outcome"] == o) for o in outcomes},
        "early_layers": early,
        "late_layers": late,
        "early": {
            "fraction_above_baseline": avg(above, early),
            "median_normalized": avg(med, early),
            "fv_minus_other": avg(diff, early),
        },
        "late": {
            "fraction_above_baseline": avg(above, late),
            "median_normalized": avg(med, late),
            "fv_minus_other": avg(diff, late),
        },
        "paired": check.get("paired", {}),
        "across_units": check.get("across_units", []),
    }


def run_setup(name: str, cfg: dict, common: dict, out: Path, smoke: bool, allow_generate: bool, progress: bool) -> dict:
    from fvsanity.activations import collect_with_responses
    from fvsanity.compare.path import path_check
    from fvsanity.data import from_tensor, load_images
    from fvsanity.io import atomic_write_json
    from fvsanity.models import load_model
    from fvsanity.report.path_figure import plot_path_similarity
    from fvsanity.units import parse_units

    t0 = time.time()
    if smoke:
        from fvsanity.testing import tiny_model

        lm = tiny_model(size=16)
        g = torch.Generator().manual_seed(0)
        labels = torch.arange(60) % 5
        colours = torch.rand(5, 3, 1, 1, generator=g)
        natural = from_tensor((colours[labels] + 0.3 * torch.rand(60, 3, 16, 16, generator=g)).clamp(0, 1), labels)
        fv_dir = None
    else:
        from fvsanity.testing import data_root

        root = data_root()
        if root is None:
            raise SystemExit("shared data not found: set FVSANITY_DATA (see ../shared/data/README.md)")
        lm = load_model(cfg["model"])
        natural = load_images(root / cfg["images"], lm, max_per_class=cfg.get("max_per_class"), seed=common["seed"])
        fv_dir = REPO / cfg["fv_dir"]
    units = parse_units(expand_units(cfg["units"]), lm)
    log(f"{name}: {lm.name}, {len(units)} units, {len(natural)} natural images ({natural.n_unreadable} unreadable)")
    fvs = get_fvs(lm, [str(u) for u in units], cfg, fv_dir, allow_generate, progress)

    layers = lm.path_to(units[0].layer)
    t1 = time.time()
    nat_pass = collect_with_responses(lm, natural, layers, units, "mean", common["batch_size"], progress=progress)
    log(f"{name}: natural activation pass {time.time() - t1:.1f}s")
    kw = dict(metric=common["metric"], top_k=cfg["top_k"], n_other=cfg["n_other"], alpha=common["alpha"],
              use_class_images=cfg.get("use_class_images", True),
              seed=common["seed"], batch_size=common["batch_size"], natural_pass=nat_pass)
    t1 = time.time()
    check = path_check(lm, units, fvs, natural, n_boot=common["n_boot"], n_perm=common["n_perm"], **kw)
    log(f"{name}: path check {time.time() - t1:.1f}s")
    doc = check.to_json()
    atomic_write_json(out / f"check_{name}.json", doc)
    plot_path_similarity(doc, out / f"path_similarity_{name}.png", mode="mean",
                         title=f"{lm.name}: {len(units)} class units, FVs {fvs.settings.get('steps')} steps x {len(fvs.seeds)} seeds")
    sub = dict(doc, units=doc["units"][:8])
    plot_path_similarity(sub, out / f"path_similarity_{name}_units.png", mode="panels", normalized=False,
                         title=f"{lm.name}: first {len(sub['units'])} units (x: layer outcome 'diverges')",
                         dpi=75)
    plot_traces(fvs.traces, units, out / f"objective_traces_{name}.png", f"{lm.name}: objective traces ({len(units)} units x {len(fvs.seeds)} seeds)")

    by_step = {}
    for step in sorted(fvs.checkpoints):
        c = path_check(lm, units, fvs.checkpoints[step], natural, n_boot=0, n_perm=common["n_perm"], **kw).to_json()
        s = summarize(c)
        by_step[str(step)] = {
            "fv_vs_natural": {n: v["mean"] for n, v in s["mean_curves"]["fv_vs_natural"].items()},
            "fraction_units_above_baseline": s["fraction_units_above_baseline"],
            "early": s["early"], "late": s["late"],
        }
    summary = summarize(doc)
    summary.update(
        model=lm.name,
        units=[str(u) for u in units],
        n_natural=len(natural),
        n_unreadable=natural.n_unreadable,
        fv_settings=fvs.settings,
        fv_seeds=list(fvs.seeds),
        fv_final_objective_mean=float(fvs.final.mean()),
        traces=trace_stats(fvs.traces),
        by_checkpoint_step=by_step,
        seconds=round(time.time() - t0, 1),
    )
    log(f"{name}: done in {summary['seconds']}s")
    return summary


def main(argv=None) -> int:
    from _outdir import add_out_argument, output_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(HERE / "config.json"))
    p.add_argument("--setup", action="append", default=None, help="setup name(s) from the config [all]")
    add_out_argument(p, "path_similarity")
    p.add_argument("--smoke", action="store_true", help="tiny model, random images, a few steps (seconds)")
    p.add_argument("--no-generate", action="store_true", help="fail instead of generating missing FVs")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads [%(default)s]")
    p.add_argument("--progress", action="store_true", help="progress bars")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("FVSANITY_OFFLINE", "1")

    from fvsanity.io import atomic_write_json, dumps, provenance

    config = json.loads(Path(args.config).read_text())
    common = {k: v for k, v in config.items() if k not in ("setups", "claim")}
    if args.smoke:
        setups = {"tiny": {"units": "fc:{0..4 step 1}", "steps": 8, "seeds": 2, "checkpoints": [4], "top_k": 3, "n_other": 30}}
        common.update(n_boot=100, n_perm=200, batch_size=32)
    else:
        setups = {k: v for k, v in config["setups"].items() if args.setup is None or k in args.setup}
        unknown = set(args.setup or ()) - set(config["setups"])
        if unknown:
            raise SystemExit(f"unknown setup {sorted(unknown)}; valid: {', '.join(config['setups'])}")
    out = output_dir("path_similarity", args.out, args.smoke)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() and not args.smoke else {}
    results.setdefault("setups", {})
    for name, cfg in setups.items():
        results["setups"][name] = run_setup(name, cfg, common, out, args.smoke, not args.no_generate, args.progress)
        results.update(claim=config.get("claim"), config=config, smoke=args.smoke, provenance=provenance())
        atomic_write_json(results_path, results)  # after each setup: a crash keeps finished ones
    head = {"smoke": args.smoke, "out": str(out)}
    for name, s in results["setups"].items():
        head[name] = {
            "n_units": s["n_units"],
            "early_fraction_above": round(s["early"]["fraction_above_baseline"], 3),
            "late_fraction_above": round(s["late"]["fraction_above_baseline"], 3),
            "early_median_normalized": round(s["early"]["median_normalized"], 3),
            "late_median_normalized": round(s["late"]["median_normalized"], 3),
            "unit_layer_outcomes": s.get("unit_layer_outcomes"),  # absent in results from before the verdict
        }
    print(json.dumps(json.loads(dumps(head))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
