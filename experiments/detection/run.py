"""The manipulation-detection benchmark (issue 12, item 3): measured error rates of fvsanity's signals.

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
``signals_<model>.json`` (every unit's signals). FVs, detectors and natural passes are cached in
``--work`` (default runs/detection/; ``OUT/work`` with --smoke), so an interrupted run resumes.

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

import numpy as np
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
    """Class units (``class``: true = every channel of the output layer, an int n = n of them drawn
    with ``seed``, false = none) plus ``hidden`` {layer: n} channels per layer, drawn with
    ``seed``; never one of ``exclude`` (units an earlier run measured)."""
    n_cls = lm.layer_info(lm.output_layer).layout.channels
    want = ucfg.get("class", True)
    if want is True:
        classes = list(range(n_cls))
    elif want is False or not want:
        classes = []
    else:
        gc = torch.Generator().manual_seed(int(ucfg["seed"]) + 2)
        skip = {int(u.rsplit(":", 1)[1]) for u in ucfg.get("exclude", []) if u.startswith(f"{lm.output_layer}:")}
        classes = sorted([c for c in torch.randperm(n_cls, generator=gc).tolist() if c not in skip][: int(want)])
    out = [f"{lm.output_layer}:{c}" for c in classes]
    g = torch.Generator().manual_seed(int(ucfg["seed"]) + 1)
    excluded = set(ucfg.get("exclude", []))
    for layer, n in ucfg.get("hidden", {}).items():
        c = lm.layer_info(layer).layout.channels
        fresh = [i for i in torch.randperm(c, generator=g).tolist() if f"{layer}:{i}" not in excluded]
        if len(fresh) < int(n):
            raise SystemExit(f"detection: {layer} has {len(fresh)} channels not in exclude, config asks for {n}")
        out += [f"{layer}:{i}" for i in sorted(fresh[: int(n)])]
    return out


# ----------------------------------------------------------------------------- measuring
def measure(lm, units, seeds, natural, mcfg, fv_dir: Path, cache_dir: Path, progress: bool):
    """FVs of ``units`` on ``lm`` (cached) and their detection signals (list of UnitSignals)."""
    from fvsanity.cache import render_cached
    from fvsanity.compare.detect import detection_signals
    from fvsanity.compare.path import PathCheckSettings

    kw = {"size": int(mcfg["fv_size"])} if mcfg.get("fv_size") else {}
    # the config fixes the dtype (render's automatic choice depends on the CPU): bf16 FVs also live
    # in their own folder (the FV cache key holds the dtype as well)
    kw["amp"] = bool(mcfg.get("amp", False))
    if kw["amp"]:
        fv_dir = fv_dir.with_name(fv_dir.name + "_amp")
    fv, reused = render_cached(lm, units, fv_dir, seeds=list(seeds), steps=int(mcfg["steps"]), pngs=False,
                               progress=progress, **kw)
    log(f"  FVs {'reused' if reused else 'rendered'}: {len(units)} units x {len(seeds)} seeds ({fv_dir.name})")
    st = PathCheckSettings(**mcfg["path"])
    _, sig = detection_signals(lm, units, fv, natural, st, cache_dir=cache_dir)
    return sig, fv.images, reused


def conditions(mcfg: dict, methods: list[str] | None = None, variants: list[str] | None = None):
    """(method, variant) for every registered manipulation method (or those in ``methods``) and
    every config variant."""
    from fvsanity.fool import list_manipulations

    known = list_manipulations()
    bad = [m for m in methods or [] if m not in known]
    if bad:
        raise SystemExit(f"detection: unknown --method {bad[0]!r}; valid: {', '.join(known)}")
    for method in known:
        if methods and method not in methods:
            continue
        for variant in mcfg["variants"]:
            if not variants or variant["name"] in variants:
                yield method, variant


def fool_settings(mcfg: dict, method: str):
    """FoolSettings for ``method``: the config's ``fool_settings`` plus ``method_settings[method]``
    (fields FoolSettings has go there, the others to ``method_options``, e.g. slingshot's sl_*)."""
    import dataclasses

    from fvsanity.fool import FoolSettings

    flat = {f.name for f in dataclasses.fields(FoolSettings)}
    kw = dict(mcfg.get("fool_settings", {}))
    opts = {}
    for k, v in mcfg.get("method_settings", {}).get(method, {}).items():
        (kw if k in flat else opts)[k] = v
    for k in ("det_checkpoints", "det_picture_checkpoints"):
        if k in kw:
            kw[k] = tuple(kw[k])
    return FoolSettings(method=method, progress=False, method_options=opts, **kw)


def build(lm, method: str, variant: dict, units: list[str], build_images, measure_images, mcfg, work: Path, smoke: bool):
    """The manipulated model routing every unit of ``units`` (built on ``build_images`` only).

    With ``mcfg["attacker_fvs"]`` (``{"seeds": [...]}``) the fooling circuit's detector also
    trains on the routed units' own FV trajectories (rendered on the original model with the
    attacker's seeds, disjoint from the auditor's tuning/evaluation seeds, at ``det_steps`` with
    ``det_checkpoints``): the attacker knows which units it manipulates, not the auditor's seeds.
    Without it the detector sees only ``det_units`` other units and rarely fires on the routed
    units' FVs (held-out FV recall 0-15% on ResNet-20), so the manipulation never takes effect.
    """
    from fvsanity.cache import render_cached
    from fvsanity.fool import get_manipulation, make_routes
    from fvsanity.fool.pipeline import build_manipulated, prepare_detector, prepare_manipulation
    from fvsanity.fool.routes import load_picture

    if "shift" in variant:
        routes = make_routes(lm, units, shift=int(variant["shift"]))
    else:
        pic = load_picture(HERE / variant["target"] if not Path(variant["target"]).is_absolute() else variant["target"])
        routes = make_routes(lm, units, pic)
    fs = fool_settings(mcfg, method)
    m = get_manipulation(method)
    ms = m.settings_from(fs)
    prep_dir = work / f"prepare_{method}_{variant['name']}"
    prepared = None
    att = mcfg.get("attacker_fvs")
    if method == "circuit" and att:
        size = {"size": int(fs.fv_size)} if fs.fv_size else {}  # the size the method's own detector FVs use
        fv_att, reused = render_cached(lm, units, work / "fv_attacker", seeds=list(att["seeds"]), steps=int(fs.det_steps),
                                       checkpoints=tuple(fs.det_checkpoints), pngs=False, progress=False, **size)
        log(f"  attacker FVs of the routed units {'reused' if reused else 'rendered'}: {len(units)} units x "
            f"{len(att['seeds'])} seeds, {fs.det_steps} steps")
        prepared = prepare_detector(lm, build_images, measure_images, fs, prep_dir, extra_train_fvs=[fv_att],
                                    routes=routes)
    prepared = prepare_manipulation(m, ms, lm, routes, build_images, measure_images, fs, prep_dir, prepared=prepared)
    return build_manipulated(m, ms, lm, routes, build_images, prepared)


# ----------------------------------------------------------------------------- scoring
def _fill(x: np.ndarray) -> np.ndarray:
    """NaN suspicion scores -> below every finite one (never flagged)."""
    x = np.asarray(x, dtype=np.float64)
    fin = x[np.isfinite(x)]
    low = (fin.min() - 1.0) if fin.size else 0.0
    return np.where(np.isfinite(x), x, low)


#: mean |pixel difference| above which a manipulated FV counts as changed by the manipulation
EFFECTIVE = 0.01
#: the confident operating point: a threshold whose FPR is <= fpr with this probability
CONFIDENCE = 0.9


def _loo_scores(t_h: np.ndarray, t_m: np.ndarray, names, fpr: float, two_sided: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-unit-out scores of a per-manipulation combined score: row i of ``t_h`` and of
    ``t_m`` (the same tuning unit, healthy and manipulated) scored by a fit on every other unit."""
    from fvsanity.compare.detect import fit_combined

    if len(t_h) != len(t_m) or len(t_h) < 3:
        raise SystemExit(f"detection: per-method combined score needs paired tuning units, got {len(t_h)} and {len(t_m)}")
    sh, sm = np.empty(len(t_h)), np.empty(len(t_m))
    for i in range(len(t_h)):
        keep = np.arange(len(t_h)) != i
        f = fit_combined(t_h[keep], t_m[keep], names, fpr=fpr, two_sided=two_sided)
        sh[i], sm[i] = f.score(t_h[i:i + 1])[0], f.score(t_m[i:i + 1])[0]
    return sh, sm


def score(signals: dict, verdicts: dict, fpr: float, n_boot: int, seed: int, changes: dict | None = None) -> dict:
    """Per condition: every candidate score (each signal oriented on tuning, the combined score),
    the best on tuning, measured on evaluation. ``signals[role][cond]`` = [U, K] matrices."""
    from fvsanity.compare.detect import (
        PATH_SIGNALS,
        SIGNALS,
        atypicality,
        auc_ci,
        fit_combined,
        healthy_band,
        min_units_for_confidence,
        rate_above,
        roc_auc,
        roc_curve,
        threshold_at_fpr,
        threshold_fpr_interval,
    )

    def confident(h_tune, h_eval, m_eval) -> dict:
        """The threshold whose FPR is <= fpr with probability CONFIDENCE (from the healthy tuning
        scores ``h_tune``), measured on evaluation units; or why there is none."""
        d = {"confidence": CONFIDENCE, "n_tuning": int(len(h_tune))}
        need = min_units_for_confidence(fpr, CONFIDENCE)
        if len(h_tune) < need:
            return {**d, "attainable": False, "n_needed": need}
        t = threshold_at_fpr(h_tune, fpr, confidence=CONFIDENCE)
        d.update(attainable=True, threshold=t, fpr_at_threshold=rate_above(h_eval, t))
        if m_eval is not None:
            d["tpr"] = rate_above(m_eval, t)
        return d

    names = list(SIGNALS)
    # a signal missing for a whole group (e.g. conditions kept from a run before the signal
    # existed) is left out everywhere: its NaN imputation would score the group, not the signal
    keep = [k for k in range(len(names))
            if all(np.isfinite(m[:, k]).any() for conds_ in signals.values() for m in conds_.values())]
    if len(keep) < len(names):
        log("  signals missing for a whole group, left out: " + ", ".join(n for k, n in enumerate(names) if k not in keep))
        signals = {r: {c: m[:, keep] for c, m in conds_.items()} for r, conds_ in signals.items()}
        names = [names[k] for k in keep]
    changes = changes or {}
    conds = [c for c in signals["tuning"] if c != "healthy"]
    t_h, e_h = signals["tuning"]["healthy"], signals["evaluation"]["healthy"]
    t_all = np.concatenate([signals["tuning"][c] for c in conds])
    # two-sided: each signal and its distance from the healthy tuning band (a manipulation can push
    # a signal out of the band either way); the one-sided fit of the earlier runs stays a candidate
    combined = fit_combined(t_h, t_all, names, fpr=fpr, two_sided=True)
    combined_one = fit_combined(t_h, t_all, names, fpr=fpr)
    # the same fit on the signals a saved check/audit JSON holds (no exemplar agreement)
    path_names = [n for n in PATH_SIGNALS if n in names]
    cols = [names.index(n) for n in path_names]
    combined_path = fit_combined(t_h[:, cols], t_all[:, cols], path_names, fpr=fpr, two_sided=True)
    center, spread = healthy_band(t_h)
    out = {"combined": combined.to_json(), "combined_path": combined_path.to_json(), "methods": {}, "curves": {}}
    # the calibrated scores (what check/audit report): their healthy FPR on evaluation units
    out["combined_eval_healthy_fpr"] = rate_above(combined.score(e_h), combined.threshold_5fpr)
    out["combined_path_eval_healthy_fpr"] = rate_above(combined_path.score(e_h[:, cols]), combined_path.threshold_5fpr)
    # what FPR a threshold from this few healthy tuning units can promise, and whether the
    # evaluation FPR measured is within it (beyond it: the healthy scores shifted between roles)
    out["combined_threshold_fpr"] = threshold_fpr_interval(len(t_h), fpr, n_eval=len(e_h),
                                                           observed=out["combined_eval_healthy_fpr"])
    # the operating point whose FPR claim holds with probability CONFIDENCE (a higher order statistic)
    out["combined_confident"] = confident(combined.score(t_h), combined.score(e_h), None)
    out["combined_path_confident"] = confident(combined_path.score(t_h[:, cols]), combined_path.score(e_h[:, cols]), None)
    for c in conds:
        t_m, e_m = signals["tuning"][c], signals["evaluation"][c]
        cands = {}
        for k, n in enumerate(names):
            th, tm = _fill(t_h[:, k] * SIGNALS[n][0]), _fill(t_m[:, k] * SIGNALS[n][0])
            sign = 1.0 if roc_auc(th, tm) >= 0.5 else -1.0  # orientation chosen on tuning
            cands[n] = (lambda x, k=k, s=sign * SIGNALS[n][0]: s * x[:, k], sign)
            # two-sided: distance from the healthy tuning band, either way
            cands[f"|{n}|"] = (lambda x, k=k: atypicality(x[:, k:k + 1], center[k:k + 1], spread[k:k + 1])[:, 0], 1.0)
        cands["combined"] = (lambda x: combined.score(x), 1.0)
        cands["combined_one_sided"] = (lambda x: combined_one.score(x), 1.0)
        cands["combined_path"] = (lambda x: combined_path.score(x[:, cols]), 1.0)
        # a combined score fit for this manipulation alone (on its tuning units); its tuning
        # figures and threshold come from leave-one-unit-out scores, not from the units it was fit on
        own = fit_combined(t_h, t_m, names, fpr=fpr, two_sided=True)
        cands["combined_method"] = (lambda x, own=own: own.score(x), 1.0)
        loo_h, loo_m = _loo_scores(t_h, t_m, names, fpr)
        rows = {}
        for n, (f, sign) in cands.items():
            both_t = _fill(np.concatenate([f(t_h), f(t_m)]) if n != "combined_method" else np.concatenate([loo_h, loo_m]))
            sth, stm = both_t[: len(t_h)], both_t[len(t_h):]
            both_e = _fill(np.concatenate([f(e_h), f(e_m)]))
            seh, sem = both_e[: len(e_h)], both_e[len(e_h):]
            thr = {"combined": combined.threshold_5fpr, "combined_path": combined_path.threshold_5fpr,
                   "combined_one_sided": combined_one.threshold_5fpr}.get(n)
            thr = threshold_at_fpr(sth, fpr) if thr is None else thr
            rows[n] = {
                "orientation": sign, "tuning_auc": roc_auc(sth, stm), "auc": roc_auc(seh, sem),
                "auc_ci": list(auc_ci(seh, sem, n_boot=n_boot, seed=seed)), "threshold": thr,
                "tpr_at_5fpr": rate_above(sem, thr), "fpr_at_threshold": rate_above(seh, thr),
                "tuning_tpr_at_5fpr": rate_above(stm, thr),
                "confident": confident(sth, seh, sem),
            }
            fp, tp = roc_curve(seh, sem)
            out["curves"].setdefault(c, {})[n] = {"fpr": fp.tolist(), "tpr": tp.tolist()}
        best = max(rows, key=lambda n: (rows[n]["tuning_auc"], rows[n]["tuning_tpr_at_5fpr"], n == "combined"))
        b = rows[best]
        eff = np.asarray(changes.get(c) or [], dtype=np.float64) > EFFECTIVE
        if eff.size == len(e_m) and eff.sum() >= 2:  # the best score on the units the manipulation changed
            f = cands[best][0]
            both = _fill(np.concatenate([f(e_h), f(e_m)]))
            b = {**b, "auc_effective": roc_auc(both[: len(e_h)], both[len(e_h):][eff]),
                 "tpr_at_5fpr_effective": rate_above(both[len(e_h):][eff], b["threshold"]), "n_effective": int(eff.sum())}
        v = verdicts["evaluation"][c]
        out["methods"][c] = {
            "n": int(len(e_m)),
            "effective_fraction": (float(np.mean(np.asarray(changes[c]) > EFFECTIVE)) if changes.get(c) else None),
            "effective_what": f"share of evaluation units whose manipulated FV differs from the healthy FV of the same "
                              f"seed by a mean |difference| > {EFFECTIVE} (benchmark-side; not a signal)", "auc": b["auc"], "auc_ci": b["auc_ci"], "tpr_at_5fpr": b["tpr_at_5fpr"],
            "fpr_at_threshold": b["fpr_at_threshold"], "best_signal": best, "best_chosen_on": "tuning AUC",
            "n_effective": b.get("n_effective"), "auc_effective": b.get("auc_effective"),
            "tpr_at_5fpr_effective": b.get("tpr_at_5fpr_effective"),
            "confident": b["confident"],
            "n_tuning": int(len(t_m)),
            "verdict_tpr_own_layer_diverges": float(np.mean([o == "diverges" for o in v["outcome"]])),
            "verdict_tpr_any_layer_diverges": float(np.mean(v["diverges_any"])),
            "signals": rows,
        }
    return out


def plot_roc(res: dict, model: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = list(res["curves"])
    fig, axes = plt.subplots(1, len(conds), figsize=(3.4 * len(conds), 3.6), squeeze=False)
    for ax, c in zip(axes[0], conds):
        for n, cur in res["curves"][c].items():
            if n.startswith("|") and n != res["methods"][c]["best_signal"]:
                continue  # two-sided single signals: only the chosen one (all are in curves_<model>.json)
            auc = res["methods"][c]["signals"][n]["auc"]
            ax.plot(cur["fpr"], cur["tpr"], lw=2.2 if n == "combined" else 1.0, label=f"{n} ({auc:.2f})",
                    drawstyle="steps-post")
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.6, ls="--")
        ax.axvline(0.05, color="0.6", lw=0.6, ls=":")
        ax.set_title(f"{c}\n(n={res['methods'][c]['n']} manipulated vs healthy eval units)", fontsize=8)
        ax.set_xlabel("false-positive rate (healthy)")
        ax.legend(fontsize=5.5, loc="lower right")
    axes[0][0].set_ylabel("true-positive rate")
    fig.suptitle(f"{model}: ROC per manipulation and signal (evaluation units; AUC in brackets)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    prev = os.environ.get("FVSANITY_AMP")
    os.environ["FVSANITY_AMP"] = "on" if mcfg.get("amp") else "off"
    try:
        return _run_model(name, mcfg, work, out, smoke, progress, methods, healthy_last, variants)
    finally:
        if prev is None:
            os.environ.pop("FVSANITY_AMP", None)
        else:
            os.environ["FVSANITY_AMP"] = prev


def _run_model(name, mcfg, work, out, smoke, progress, methods, healthy_last, variants) -> dict:
    t0 = time.time()
    lm, nat, split, tune_units, eval_units = setup(name, mcfg, smoke)
    nat = nat.load() if hasattr(nat, "load") else nat
    imgs = {"tuning": nat.subset(split.tuning), "evaluation": nat.subset(split.evaluation)}
    build_images = nat.subset(split.building).load().images
    roles = {"tuning": (tune_units, mcfg["seeds"]["tuning"]), "evaluation": (eval_units, mcfg["seeds"]["evaluation"])}
    if set(roles["tuning"][1]) & set(roles["evaluation"][1]):
        raise SystemExit(f"detection: tuning and evaluation FV seeds overlap: {mcfg['seeds']}")
    log(f"{name}: {len(tune_units)} tuning + {len(eval_units)} evaluation units; images {split.sizes()}; "
        f"{mcfg['steps']} FV steps; seeds {mcfg['seeds']}")
    w = work / name
    per_unit: dict = {r: {} for r in roles}
    fvs: dict = {r: {} for r in roles}
    reused: dict = {}
    fingerprints: dict = {}

    def record(role, cond, measured):
        sig, images, was_reused = measured
        per_unit[role][cond] = [s.to_json() for s in sig]
        fvs[role][cond] = images
        reused.setdefault(cond, {})[role] = bool(was_reused)

    def healthy():
        for role, (units, seeds) in roles.items():
            log(f"healthy / {role}")
            record(role, "healthy", measure(lm, units, seeds, imgs[role], mcfg, w / "fv_healthy" / role,
                                            w / "natural" / "original" / role, progress))
        fingerprints["healthy"] = lm.fingerprint()

    if not healthy_last:
        healthy()
    all_units = tune_units + eval_units
    measure_images = imgs["tuning"].load().images[:64]  # only logged by a method's prepare (e.g. detector accuracy)
    built = {}
    for method, variant in conditions(mcfg, methods, variants):
        cond = f"{method}:{variant['name']}"
        log(f"{cond}: building the manipulated model ({len(all_units)} routed units)")
        tb = time.time()
        fooled = build(lm, method, variant, all_units, build_images, measure_images, mcfg, w, smoke)
        built[cond] = fooled.name
        fingerprints[cond] = fooled.fingerprint()
        log(f"{cond}: built in {time.time() - tb:.0f} s (fingerprint {fingerprints[cond][:12]})")
        for role, (units, seeds) in roles.items():
            log(f"{cond} / {role}")
            record(role, cond, measure(fooled, units, seeds, imgs[role], mcfg,
                                       w / f"fv_{method}_{variant['name']}" / role,
                                       w / "natural" / f"{method}_{variant['name']}" / role, progress))
        del fooled
    if healthy_last:
        healthy()
    # benchmark-side only (never a signal): did the manipulation change the FV at all?
    for role in roles:
        for cond, rows in per_unit[role].items():
            if cond == "healthy":
                continue
            change = (fvs[role][cond] - fvs[role]["healthy"]).abs().flatten(2).mean(2).mean(1)  # [U]: mean over seeds
            for r, c in zip(rows, change.tolist()):
                r["fv_change"] = c
    design = {"units": {"tuning": tune_units, "evaluation": eval_units}, "images": split.to_json(),
              "seeds": mcfg["seeds"], "steps": mcfg["steps"], "path": mcfg["path"]}
    meta = {**design, "manipulated_models": built, "fingerprints": fingerprints, "fv_reused": reused,
            "measure_seconds": round(time.time() - t0, 1)}
    out.mkdir(parents=True, exist_ok=True)
    from fvsanity.io import atomic_write_json

    raw = merge_signals(out / f"signals_{name}.json", {"units": per_unit, "meta": meta}, design)
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
    from fvsanity.compare.detect import SIGNALS
    from fvsanity.io import atomic_write_json

    per_unit, meta = raw["units"], raw["meta"]
    signals = {r: {c: np.asarray([[np.nan if u["signals"].get(k) is None else u["signals"][k] for k in SIGNALS]
                                  for u in rows], dtype=np.float64).reshape(len(rows), len(SIGNALS))
                   for c, rows in conds.items()} for r, conds in per_unit.items()}
    verdicts = {r: {c: {"outcome": [u["outcome"] for u in rows], "diverges_any": [u["diverges_any"] for u in rows]}
                    for c, rows in conds.items()} for r, conds in per_unit.items()}
    changes = {c: [u.get("fv_change") for u in rows] for c, rows in per_unit["evaluation"].items() if c != "healthy"}
    changes = {c: v for c, v in changes.items() if all(x is not None for x in v)}
    res = score(signals, verdicts, mcfg.get("fpr", 0.05), mcfg.get("n_boot", 2000), mcfg["units"]["seed"], changes)
    h = verdicts["evaluation"]["healthy"]
    result = {
        "healthy_fpr": float(np.mean([o == "diverges" for o in h["outcome"]])),
        "healthy_fpr_what": "share of healthy evaluation units whose verdict is 'diverges' at their own layer",
        "healthy_fpr_any_layer": float(np.mean(h["diverges_any"])),
        "healthy_outcomes": {o: int(sum(x == o for x in h["outcome"])) for o in ("natural-like", "diverges", "inconclusive")},
        "n_healthy": len(meta["units"]["evaluation"]),
        "n_healthy_tuning": len(meta["units"]["tuning"]),
        "methods": res["methods"],
        "combined_score": res["combined"],
        "combined_path_score": res["combined_path"],
        "combined_eval_healthy_fpr": res["combined_eval_healthy_fpr"],
        "combined_path_eval_healthy_fpr": res["combined_path_eval_healthy_fpr"],
        "combined_threshold_fpr": res["combined_threshold_fpr"],
        "combined_confident": res["combined_confident"],
        "combined_path_confident": res["combined_path_confident"],
        "units": meta["units"],
        "images": meta["images"],
        "fv": {"steps": mcfg["steps"], "seeds": mcfg["seeds"]},
        "path_settings": mcfg["path"],
        "manipulated_models": meta["manipulated_models"],
        "manipulated_fingerprints": meta.get("fingerprints"),
        "fv_reused": meta.get("fv_reused"),
        "signals_described": {k: {"direction": d, "what": t} for k, (d, t) in SIGNALS.items()},
        "seconds": meta.get("measure_seconds"),
    }
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
