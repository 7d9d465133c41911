"""The manipulation-detection benchmark: measured error rates of fvsanity's signals.

Population, per model in config.json: units (class units plus hidden channels), each measured
healthy (original model, fresh FV seeds) and manipulated by every registered manipulation method
(``fvsanity.fool.MANIPULATIONS``, iterated: a method registered later joins automatically) with
every target variant of the config (another unit of the same layer, a picture). One manipulated
model per (method, variant) routes every population unit at once.

Roles, disjoint by construction (fvsanity.splits): natural images split into tuning / building /
evaluation (the manipulation is built and calibrated on the building images; tuning units are
measured on tuning images, evaluation units on evaluation images); units split into tuning and
evaluation units; FV seeds differ (tuning seeds vs evaluation seeds). The signals and the combined
score (fvsanity.compare.detect) use only what an auditor has; the combined score, each signal's
orientation, the best signal per method and every threshold are chosen on tuning units and only
measured on evaluation units.

Writes ``--out DIR`` (a full run without it: figures/detection/, said in one line before it
starts; ``--smoke`` without it: a fresh temporary folder): results.json, roc_<model>.png, and
``signals_<model>.json`` (every unit's signals). The measuring and scoring are
:mod:`fvsanity.calibration`'s (what ``fvsanity calibrate`` runs on a user's model); this script
reads the config, draws the units and keeps the results of several models and runs in one file.
FVs, detectors, natural passes and each condition's signals are cached in ``--work`` (default runs/detection/; ``OUT/work`` with --smoke), so an interrupted run resumes.

    python experiments/detection/run.py                          # every model of config.json
    python experiments/detection/run.py --model cifar10-resnet20
    python experiments/detection/run.py --smoke                  # tiny model, random images, seconds
    python experiments/detection/run.py --model cifar10-resnet20 --method slingshot   # re-measure one method
    python experiments/detection/run.py --table                  # results.json as markdown tables
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))  # experiments/_outdir.py


def log(msg: str) -> None:
    print(f"[detection {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- setup
def setup(name: str, mcfg: dict, smoke: bool):
    """(model, NaturalImages, Split of the images, tuning units, evaluation units)."""
    from fvsanity.data import from_tensor, load_images
    from fvsanity.models import load_model
    from fvsanity.splits import three_way_split
    from fvsanity.testing import tiny_model

    if smoke:
        lm = tiny_model()
        g = torch.Generator().manual_seed(0)
        nat = from_tensor(torch.rand(90, 3, 16, 16, generator=g), torch.arange(90) % 5)
    else:
        lm = load_model(mcfg.get("model", name))
        root = Path(os.environ.get("FVSANITY_DATA", ROOT / "data")) / mcfg["images"]
        nat = load_images(root, lm, max_per_class=mcfg.get("max_per_class"), into_memory=True)
    sp = mcfg["split"]
    split = three_way_split(len(nat), sp["fractions"], sp["seed"])
    units = candidate_units(lm, mcfg["units"])
    g = torch.Generator().manual_seed(int(mcfg["units"]["seed"]))
    perm = torch.randperm(len(units), generator=g).tolist()
    n_t = int(mcfg["units"]["n_tuning"])
    tune = sorted((units[i] for i in perm[:n_t]), key=units.index)
    ev = sorted((units[i] for i in perm[n_t:]), key=units.index)
    return lm, nat, split, tune, ev


def candidate_units(lm, ucfg: dict) -> list[str]:
    """The config's units (:func:`fvsanity.calibration.candidate_units`)."""
    from fvsanity.calibration import candidate_units as draw

    return draw(lm, ucfg)


def variants_of(mcfg: dict) -> list[dict]:
    """The config's target variants, picture paths resolved against this folder."""
    out = []
    for v in mcfg["variants"]:
        if "target" in v and not Path(v["target"]).is_absolute():
            v = {**v, "target": str(HERE / v["target"])}
        out.append(dict(v))
    return out


def score(signals: dict, verdicts: dict, fpr: float, n_boot: int, seed: int, changes: dict | None = None) -> dict:
    """:func:`fvsanity.calibration.score_population` (kept under this name for callers of the script)."""
    from fvsanity.calibration import score_population

    return score_population(signals, verdicts, fpr, n_boot, seed, changes, log)


# ----------------------------------------------------------------------------- main
def run_model(name: str, mcfg: dict, work: Path, out: Path, smoke: bool, progress: bool,
              methods: list[str] | None = None, healthy_last: bool = False, variants: list[str] | None = None) -> dict:
    """Measure healthy units and every condition (or those of ``methods``), merge them into
    ``OUT/signals_<model>.json`` (conditions measured earlier under the same design are kept,
    others dropped) and score them.

    Every FV set is rendered through :func:`fvsanity.cache.render_cached`, keyed on the model's
    fingerprint (every weight and buffer of the manipulated model, so a manipulation rebuilt
    with other settings or code re-renders) and the FV settings; the natural passes likewise.
    Manipulated models are rebuilt every run (never cached): only what they produce is.
    The config's ``amp`` (default off) fixes the dtype of every render of the run, the
    manipulations' own FVs included (``FVSANITY_AMP``), whatever this CPU would choose.
    """
    from fvsanity.calibration import amp_env

    with amp_env(bool(mcfg.get("amp"))):
        return _run_model(name, mcfg, work, out, smoke, progress, methods, healthy_last, variants)


def _run_model(name, mcfg, work, out, smoke, progress, methods, healthy_last, variants) -> dict:
    from fvsanity.calibration import conditions, fool_settings_for, measure_population
    from fvsanity.compare.path import PathCheckSettings
    from fvsanity.io import atomic_write_json

    lm, nat, split, tune_units, eval_units = setup(name, mcfg, smoke)
    nat = nat.load() if hasattr(nat, "load") else nat
    roles = {"tuning": (tune_units, mcfg["seeds"]["tuning"]), "evaluation": (eval_units, mcfg["seeds"]["evaluation"])}
    log(f"{name}: {len(tune_units)} tuning + {len(eval_units)} evaluation units; images {split.sizes()}; "
        f"{mcfg['steps']} FV steps; seeds {mcfg['seeds']}")
    render = {"steps": int(mcfg["steps"]), "amp": bool(mcfg.get("amp", False)),
              **({"size": int(mcfg["fv_size"])} if mcfg.get("fv_size") else {})}
    conds = conditions(variants_of(mcfg), methods, variants)
    per_method = mcfg.get("method_settings", {})
    att = mcfg.get("attacker_fvs") or {}
    raw = measure_population(lm, nat, split, roles, conds, render=render, path=PathCheckSettings(**mcfg["path"]),
                             fool_settings=lambda m: fool_settings_for(m, mcfg.get("fool_settings", {}), per_method),
                             work=work / name, progress=progress, healthy_last=healthy_last,
                             attacker_seeds=att.get("seeds"), log=log)
    raw["meta"]["steps"], raw["meta"]["path"] = mcfg["steps"], mcfg["path"]  # the design as configured
    out.mkdir(parents=True, exist_ok=True)
    raw = merge_signals(out / f"signals_{name}.json", raw, {k: raw["meta"][k] for k in ("units", "images", "seeds",
                                                                                    "steps", "path")})
    atomic_write_json(out / f"signals_{name}.json", raw)
    return finish(name, mcfg, raw, out)


def merge_signals(path: Path, new: dict, design: dict) -> dict:
    """``new`` plus the conditions of an earlier ``signals_<model>.json`` measured under the same
    design (units, images, seeds, steps, path settings) and not re-measured now; an earlier file of
    another design is ignored (its conditions are dropped, never mixed in)."""
    if not path.is_file():
        return new
    try:
        old = json.loads(path.read_text())
        om = old["meta"]
        same = all(json.dumps(om.get(k), sort_keys=True) == json.dumps(v, sort_keys=True) for k, v in design.items())
    except (OSError, ValueError, KeyError, TypeError):
        return new
    if not same:
        log(f"  {path.name}: earlier measurements of another design dropped")
        return new
    units, meta = new["units"], dict(new["meta"])
    kept = []
    for cond in old["units"]["evaluation"]:
        if cond in units["evaluation"]:
            continue
        kept.append(cond)
        for role in units:
            units[role][cond] = old["units"][role][cond]
        for k in ("manipulated_models", "fingerprints", "fv_reused"):
            if cond in (om.get(k) or {}):
                meta.setdefault(k, {})[cond] = om[k][cond]
    if kept:
        log(f"  kept from {path.name} (same design, not re-measured now): {', '.join(kept)}")
        meta["measure_seconds"] = round(meta["measure_seconds"] + float(om.get("measure_seconds") or 0), 1)
    return {"units": units, "meta": meta}


def finish(name: str, mcfg: dict, raw: dict, out: Path) -> dict:
    """Scores, results and the ROC figure from the measured signals (``signals_<model>.json``)."""
    from fvsanity.calibration import plot_roc, summarize_population
    from fvsanity.io import atomic_write_json

    result, res = summarize_population(raw, mcfg.get("fpr", 0.05), mcfg.get("n_boot", 2000), mcfg["units"]["seed"], log)
    result["fv"] = {"steps": mcfg["steps"], "seeds": mcfg["seeds"]}
    result["path_settings"] = mcfg["path"]
    out.mkdir(parents=True, exist_ok=True)
    plot_roc(res, name, out / f"roc_{name}.png")
    atomic_write_json(out / f"curves_{name}.json", res["curves"])
    log(f"{name}: healthy verdict FPR {result['healthy_fpr']:.3f}; "
        + "; ".join(f"{c}: AUC {m['auc']:.3f} TPR@5% {m['tpr_at_5fpr']:.2f} ({m['best_signal']})"
                    for c, m in result["methods"].items()))
    return result


def _threshold_text(t: dict | None) -> str:
    """What a 5%-FPR threshold from this few tuning units promises (:func:`threshold_fpr_interval`)."""
    if not t:
        return ""
    return (f"; a threshold from {t['n_tuning']} healthy tuning units has a true FPR of mean {t['mean']:.3f}, "
            f"{100 * t['confidence']:.0f}% interval [{t['interval'][0]:.3f}, {t['interval'][1]:.3f}]; chance of "
            f"measuring >= {t['observed']:.3f} on {t['n_eval']} evaluation units {t['p_at_least_observed']:.2f}")


def _confident_text(c: dict | None, rate: str) -> str:
    """A confident operating point (``confident`` of a method or ``combined_confident``) in words."""
    if not c:
        return "n/a"
    if not c.get("attainable"):
        return f"none ({c['n_tuning']} < {c['n_needed']} tuning units)"
    return f"{c[rate]:.2f} ({c['fpr_at_threshold']:.2f})" if rate in c else f"{c['fpr_at_threshold']:.3f}"


def markdown_table(res: dict) -> str:
    """The README's per-method table of one model's results.json entry."""
    from fvsanity.calibration import CONFIDENCE

    conf = next((m["confident"]["confidence"] for m in res["methods"].values() if m.get("confident")), CONFIDENCE)
    rows = ["| manipulation | n | effective (FV changed) | best score (chosen on tuning) | AUC [95% CI] | "
            f"TPR at the 5%-FPR threshold (FPR measured) | TPR at the {100 * conf:.0f}%-confident one (FPR measured) | "
            "verdict: diverges at own layer / any layer |",
            "|---|---|---|---|---|---|---|---|"]
    for c, m in res["methods"].items():
        eff = "n/a" if m.get("effective_fraction") is None else f"{100 * m['effective_fraction']:.0f}%"
        best = m["best_signal"].replace("|", "\\|")  # a two-sided signal's name, e.g. |rank_own|
        rows.append(f"| {c} | {m['n']} | {eff} | {best} | {m['auc']:.2f} [{m['auc_ci'][0]:.2f}, "
                    f"{m['auc_ci'][1]:.2f}] | {m['tpr_at_5fpr']:.2f} ({m['fpr_at_threshold']:.2f}) | "
                    f"{_confident_text(m.get('confident'), 'tpr')} | "
                    f"{m['verdict_tpr_own_layer_diverges']:.2f} / {m['verdict_tpr_any_layer_diverges']:.2f} |")
    ho = res.get("healthy_outcomes", {})
    rows.append(f"\nhealthy evaluation units: {res['n_healthy']}; verdict at the own layer: "
                + ", ".join(f"{k} {v}" for k, v in ho.items())
                + f"; verdict FPR (own layer 'diverges') {res['healthy_fpr']:.3f}, any layer {res['healthy_fpr_any_layer']:.3f}; "
                f"combined score's FPR at its tuned threshold {res['combined_eval_healthy_fpr']:.3f} "
                f"(path-only {res['combined_path_eval_healthy_fpr']:.3f}){_threshold_text(res.get('combined_threshold_fpr'))}; "
                f"at its {100 * conf:.0f}%-confident threshold {_confident_text(res.get('combined_confident'), '')}; "
                f"measured in {res.get('seconds')} s")
    return "\n".join(rows)


def main(argv=None) -> int:
    from _outdir import add_out_argument

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(HERE / "config.json"))
    ap.add_argument("--model", action="append", help="only these models of the config (repeatable)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, random images, seconds")
    add_out_argument(ap, "detection")
    ap.add_argument("--work", default=None, help="cache folder [runs/detection, or OUT/work with --smoke]")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--rescore", action="store_true", help="re-score OUT/signals_<model>.json (no FVs, no path checks)")
    ap.add_argument("--method", action="append", default=None,
                    help="measure only these manipulation methods (repeatable); the other conditions of an earlier "
                         "run of the same design are kept from OUT/signals_<model>.json")
    ap.add_argument("--variant", action="append", default=None, help="measure only these target variants (repeatable)")
    ap.add_argument("--healthy-last", action="store_true",
                    help="measure the healthy units after the conditions (a second process sharing --work)")
    ap.add_argument("--table", action="store_true", help="print OUT/results.json as the README's markdown tables")
    args = ap.parse_args(argv)
    if args.table:
        res = json.loads(((Path(args.out) if args.out else ROOT / "figures" / "detection") / "results.json").read_text())
        for k, v in res.items():
            if not k.startswith("_"):
                print(f"### {k}\n\n{markdown_table(v)}\n")
        return 0
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)  # an in-process caller (the tests) keeps its own


def _main(args) -> int:
    from _outdir import output_dir, work_dir

    from fvsanity.io import atomic_write_json, provenance

    cfg = json.loads(Path(args.config).read_text())
    if args.smoke:
        models = {"tiny": cfg["smoke"]}
    else:
        models = {k: v for k, v in cfg["models"].items() if not args.model or k in args.model}
        if args.model and not models:
            raise SystemExit(f"detection: unknown model {args.model}; valid: {', '.join(cfg['models'])}")
    out = output_dir("detection", args.out, args.smoke, why="re-scoring the full run" if args.rescore else "full run")
    work = work_dir("detection", out, args.smoke, args.work)  # runs/detection, or OUT/work with --smoke
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.is_file() and not args.smoke else {}
    for name, mcfg in models.items():
        if args.rescore:
            raw = json.loads((out / f"signals_{name}.json").read_text())
            if "meta" not in raw:  # written by the first version of this script: the rest is in results.json
                old = results[name]
                raw["meta"] = {"units": old["units"], "images": old["images"],
                               "manipulated_models": old["manipulated_models"], "measure_seconds": old["seconds"]}
            results[name] = finish(name, mcfg, raw, out)
        else:
            results[name] = run_model(name, mcfg, work, out, args.smoke, progress=False,
                                      methods=args.method or mcfg.get("run_methods"),
                                      healthy_last=args.healthy_last, variants=args.variant)
        if res_path.is_file() and not args.smoke:  # another process may have written other models meanwhile
            results = {**json.loads(res_path.read_text()), name: results[name]}
        results["_meta"] = {"config": cfg, "provenance": provenance(), "smoke": args.smoke}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(res_path, results)
    print(json.dumps({k: {"healthy_fpr": v["healthy_fpr"], "methods": {c: {x: m[x] for x in ("auc", "tpr_at_5fpr", "best_signal")}
                                                                     for c, m in v["methods"].items()}}
                      for k, v in results.items() if not k.startswith("_")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
