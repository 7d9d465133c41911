"""The whole fooling experiment, as ``fvsanity fool`` runs it, for any registered method.

:func:`run_fool` runs these steps, each a public function (what differs between methods comes
from the method's class, :mod:`fvsanity.fool.manipulation`; nothing here names a method):

1. pick and prepare: :func:`pick_eval_routes` (the units to evaluate: a seeded pick, or the
   caller's ``eval_units``), :func:`prepare_manipulation` (the method's ``prepare``; the fooling
   circuit's is :func:`prepare_detector`: render FVs of the original model for many units with
   checkpoints from early to late steps, train the detector on them against the training split
   of natural images minus a calibration part, set the gate threshold above every calibration
   image, and evaluate it on FVs of *other* units and on the held-out natural images);
2. :func:`build_manipulated`: the method's ``build``;
3. :func:`render_fool_fvs`: FVs of the evaluated units on both models, and their targets;
4. :func:`evaluate_fool`: natural-image predictions of both models on the evaluation split, the
   FVs' similarity to the targets, inference time, and the method's diagnostics;
5. :func:`closed_loop_check`: the path sanity check (``fvsanity.compare.path``) on both models
   and its unmanipulated control;
6. :func:`save_fool`: the manipulated model, ``fool.json`` and a figure.

Long steps cache their results in ``work_dir`` (FVs via ``FVResult.save``, the detector as
safetensors) and are reused when the settings match, so an interrupted run resumes.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import FVSanityError
from ..models import LoadedModel
from ..units import Unit
from .circuit import build_fooling_circuit, picture_key, picture_templates, template_model
from .detector import (
    DetectorReport,
    FVDetector,
    calibrate_threshold,
    detector_logits,
    evaluate_detector,
    load_detector,
    save_detector,
    train_detector,
)
from .manipulation import Manipulation
from .routes import Route

__all__ = [
    "DetectorBundle",
    "FoolEvaluation",
    "FoolFVs",
    "FoolResult",
    "FoolSettings",
    "build_manipulated",
    "closed_loop_check",
    "evaluate_fool",
    "fool_log",
    "pick_eval_routes",
    "plot_fool",
    "prepare_detector",
    "prepare_manipulation",
    "render_fool_fvs",
    "run_fool",
    "save_fool",
    "split_indices",
    "summarize_fool",
]


@dataclass(frozen=True)
class FoolSettings:
    """Every knob of a fooling run (saved into fool.json).

    ``method`` names a registered manipulation (:func:`~fvsanity.fool.list_manipulations`); it
    reads its own settings dataclass from the fields here that share its fields' names (the
    built-in methods' knobs below, kept flat for configs and fool.json: ``det_*``, ``margin*``,
    ``k``, ``offset`` for ``circuit``; ``lam``, ``strength``, ``silent_*`` for ``silent``) and
    from ``method_options`` (field name -> value) for any other method.

    Detector: ``det_units`` units (half class units of the output layer, half channels of the
    block layers) x ``det_seeds`` seeds, ``det_steps`` steps, images kept at ``det_checkpoints``
    and at the end; ``det_heldout_units`` other units for the held-out evaluation; the last
    ``calib_fraction`` of the training images set the threshold (max logit + ``margin`` +
    ``margin_sd`` standard deviations of their logits). With picture targets, the detector also
    learns the FV trajectories of the picture templates themselves (``det_picture_seeds`` seeds,
    images at ``det_picture_checkpoints`` and at the end): what the picture route shows once
    open, from noise to the picture, so the gate opens at the first step and stays open.
    The detector also learns the routed units' own FV trajectories (what makes the circuit take
    effect: without them it rarely fires on the manipulated units' FVs, e.g. FV recall 0-15% on
    ResNet-20): FVs of the manipulated units and of their source units, rendered on the original
    model with ``det_routed_seeds`` seeds (:data:`ROUTED_SEED0` + i: never the evaluation seeds
    2000+, the control seeds 3000+ or the held-out seeds 1000+, so no evaluated FV is trained on)
    at ``det_steps`` with ``det_checkpoints``; at most ``det_routed_units`` of these units (a
    seeded pick when the routes have more); 0 seeds turns this off. These units are never among
    the detector's held-out units. Then ``det_refine_rounds`` times: the circuit is built with the
    detector so far, the manipulated units' FV trajectories on it (same seeds and checkpoints:
    the images the gate must keep open, part the unit's own FV, part its target's) join the FV
    class, and the detector is trained again on everything (default 0 rounds: on ResNet-20 one round
    did not help, 2 of 8 seeds reached the target instead of 6).
    Measured on ResNet-20 (``--unit linear:3 --target unit:linear:5``, 8 evaluation seeds): without
    the routed units' trajectories the detector missed the manipulated FVs (0 of 8 reached the
    target); with 2 routed seeds 2 of 8 (3 at ``margin_sd`` 0.25), with 8 seeds 6 of 8, and 8 of 8 with ``margin_sd`` 0.25
    (was 0.5: the natural logits' sd is large, 15 there, so 0.5 sd put the threshold 8 logits above
    the calibration maximum, where the FVs' logits hover and the gate flickers under the FV
    transforms; 0.25 still leaves the held-out naturals' maximum 1.4 logits below it, the gate
    exactly shut on every one of them).
    Evaluation: FVs of ``eval_units`` manipulated units (and of their source units on the original
    model) with ``eval_seeds`` seeds and ``eval_steps`` steps. ``eval_seeds`` 8 is what the closed
    loop needs to reach a claim: a "diverges" flag is Holm-corrected over the layers of a unit's
    path, and 8 seeds reach alpha 0.05 over up to 12 layers
    (``fvsanity.compare.verdict.replicates_needed(n_layers=12)``; ResNet-20's class units have 11,
    5 seeds reach only 0.34); fewer seeds leave every unit "inconclusive".
    """

    method: str = "circuit"
    seed: int = 0
    fv_size: int | None = None
    det_units: int = 48
    det_heldout_units: int = 16
    det_seeds: int = 1
    det_steps: int = 256
    det_checkpoints: tuple[int, ...] = (4, 16, 32, 64, 128)
    det_size: int | None = None
    det_epochs: int = 60
    det_stem_stride: int = 2
    det_picture_seeds: int = 8
    det_picture_checkpoints: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    det_routed_seeds: int = 8
    det_routed_units: int = 64
    det_refine_rounds: int = 0
    calib_fraction: float = 0.2
    margin: float = 1.0
    margin_sd: float = 0.25
    k: float = 1000.0
    offset: float = 30.0
    lam: float = 3.0
    strength: float = 100.0
    silent_margin_sd: float = 1.0
    silent_margin_range: float = 4.0
    silent_mode: str = "trigger"
    silent_offset: float = 10.0
    silent_width: float = 10.0
    eval_units: int = 4
    eval_seeds: int = 8
    eval_steps: int = 256
    timing_batch: int = 64
    timing_repeats: int = 21
    check: bool = True
    lpips: bool = True
    check_top_k: int = 10
    check_n_boot: int = 200
    check_n_perm: int = 500
    progress: bool = True
    method_options: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DetectorBundle:
    """A trained detector, its gate threshold and how it did on held-out data."""

    detector: FVDetector
    threshold: float
    training: dict
    heldout: DetectorReport
    heldout_final_only: DetectorReport
    train_units: list[str]
    heldout_units: list[str]
    heldout_picture: DetectorReport | None = None
    picture_key: str = ""
    routed_units: list[str] = field(default_factory=list)
    routed_seeds: list[int] = field(default_factory=list)
    refine_rounds: int = 0

    def to_json(self) -> dict:
        return {
            "threshold": self.threshold, "training": self.training, "heldout": self.heldout.to_json(),
            "heldout_final_only": self.heldout_final_only.to_json(), "train_units": self.train_units,
            "heldout_units": self.heldout_units, "config": self.detector.config(),
            "heldout_picture_trajectories": self.heldout_picture.to_json() if self.heldout_picture else None,
            "picture_key": self.picture_key,
            "routed_units": self.routed_units, "routed_seeds": self.routed_seeds, "refine_rounds": self.refine_rounds,
        }


@dataclass(frozen=True)
class FoolResult:
    """What fool.json holds (``to_json``) plus the FVs for the figure and the method's line under it."""

    summary: dict
    details: dict
    figure_fvs: dict = field(default_factory=dict, repr=False)
    figure_note: str = ""

    def to_json(self) -> dict:
        return {**self.summary, **self.details}


def split_indices(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random split of ``range(n)``: (first ``round(fraction*n)``, rest), each sorted."""
    g = torch.Generator().manual_seed(int(seed) + 4242)
    perm = torch.randperm(n, generator=g)
    k = int(round(fraction * n))
    return perm[:k].sort().values, perm[k:].sort().values


def fool_log(msg: str) -> None:
    """One timestamped progress line of a fooling run (stdout, flushed)."""
    print(f"[fool {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _pick_units(lm: LoadedModel, n: int, seed: int, exclude: set[str]) -> list[Unit]:
    """``n`` units: half channels of the output layer, half spread over the other block layers."""
    shapes = {name: info.layout.channels for name, info in lm.layers.items()}
    g = torch.Generator().manual_seed(int(seed) + 777)
    blocks = [b for b in lm.block_layers if b != lm.output_layer and b in shapes]
    c_out = shapes[lm.output_layer]
    free_out = sum(1 for c in range(c_out) if f"{lm.output_layer}:{c}" not in exclude)
    # at most 3/4 of the output channels go to the first (training) pick, so some stay held out
    n_out = min((n + 1) // 2 if blocks else n, free_out if exclude else max(1, (3 * c_out) // 4))
    picks: list[Unit] = []

    def take(layer: str, count: int) -> None:
        if count <= 0:
            return
        c = shapes[layer]
        order = torch.randperm(c, generator=g).tolist()
        got = 0
        for ch in order:
            u = Unit(layer=layer, channel=ch)
            if str(u) in exclude:
                continue
            picks.append(u)
            exclude.add(str(u))
            got += 1
            if got == count:
                return

    take(lm.output_layer, n_out)
    rest = n - n_out
    for i, b in enumerate(blocks):
        take(b, rest // len(blocks) + (1 if i < rest % len(blocks) else 0))
    return picks


#: first seed of the routed units' detector FVs (``det_routed_seeds`` from here): disjoint from the
#: detector's own units (0+), its held-out units (1000+), the evaluation (2000+) and control (3000+)
ROUTED_SEED0 = 500


def routed_detector_units(routes: list[Route] | None, n_max: int, seed: int) -> list[Unit]:
    """The units whose FV trajectories the detector learns for ``routes``: each route's
    manipulated unit and its source unit (unit targets), in route order, without repeats; at most
    ``n_max`` (a seeded pick, ``seed + 555``, kept in route order, when there are more)."""
    seen: dict[str, Unit] = {}
    for r in routes or []:
        for u in (r.unit, r.source):
            if u is not None and str(u) not in seen:
                seen[str(u)] = u
    units = list(seen.values())
    if len(units) <= n_max:
        return units
    g = torch.Generator().manual_seed(int(seed) + 555)
    keep = torch.randperm(len(units), generator=g)[:n_max].sort().values.tolist()
    return [units[i] for i in keep]


def _render_cached(lm: LoadedModel, units: list[Unit], seeds: list[int], steps: int, size, checkpoints, folder: Path, progress: bool):
    """``render`` through the content-addressed cache in ``folder``: reused only if made for this
    model's fingerprint (weights, buffers, preprocessing) and these units, seeds, steps, size and
    checkpoints (:func:`fvsanity.cache.render_cached`)."""
    from ..cache import render_cached

    return render_cached(lm, units, folder, seeds=list(seeds), steps=steps, size=size,
                         checkpoints=tuple(checkpoints), progress=progress, pngs=False)[0]


def _all_stages(res, steps=None) -> torch.Tensor:
    """[U*S*(1+K), 3, H, W]: final images and the checkpoints (those in ``steps`` if given)."""
    keep = sorted(k for k in res.checkpoints if steps is None or k in set(steps))
    return torch.cat([res.images.flatten(0, 1)] + [res.checkpoints[k].flatten(0, 1) for k in keep])


def prepare_detector(
    lm: LoadedModel, train_images: torch.Tensor, eval_images: torch.Tensor, settings: FoolSettings, work_dir: str | Path,
    *, extra_train_fvs=None, routes: list[Route] | None = None,
) -> DetectorBundle:
    """Render FVs, train the detector, calibrate the threshold, evaluate on held-out data.

    Args:
        train_images: ``[N,3,H,W]`` natural images for training (the last ``calib_fraction``
            of a seeded shuffle is held back to set the threshold).
        eval_images: natural images never used here except for the held-out accuracy.
        extra_train_fvs: FVResults of this model rendered elsewhere (e.g. a shared FV set), or a
            callable returning them (called after this function's own FVs are rendered); their
            units join the training units and are kept out of the held-out units.
        routes: the routes the detector will guard; their pictures' template trajectories join
            the FV class (held-out seeds are evaluated separately), and so do the FV trajectories
            of their manipulated and source units (:func:`routed_detector_units`, at most
            ``det_routed_units``, with ``det_routed_seeds`` seeds from :data:`ROUTED_SEED0`:
            other seeds than every FV the run evaluates; units already in ``extra_train_fvs``
            are not rendered again).
    """
    from ..units import parse_unit

    work = Path(work_dir)
    s = settings
    progress = s.progress
    extra = list(extra_train_fvs) if extra_train_fvs is not None and not callable(extra_train_fvs) else None
    exclude: set[str] = {str(u) for r in (extra or []) for u in r.units}
    routed = [u for u in routed_detector_units(routes, s.det_routed_units, s.seed) if str(u) not in exclude] \
        if s.det_routed_seeds > 0 else []
    routed_seeds = [ROUTED_SEED0 + i for i in range(s.det_routed_seeds)] if routed else []
    exclude |= {str(u) for u in routed}  # neither drawn again nor held out
    n_own = s.det_units - sum(len(r.units) for r in (extra or []))
    train_units = _pick_units(lm, max(0, n_own), s.seed, exclude)
    held_units = _pick_units(lm, s.det_heldout_units, s.seed + 1, exclude)
    seeds = list(range(s.det_seeds))
    fool_log(f"detector FVs: {len(train_units)} training units (+ {sum(len(r.units) for r in (extra or []))} shared) + "
         f"{len(held_units)} held-out units, {len(seeds)} seed(s), {s.det_steps} steps, checkpoints {s.det_checkpoints}")
    fv_held = _render_cached(lm, held_units, [x + 1000 for x in seeds], s.det_steps, s.fv_size, s.det_checkpoints,
                             work / "fv_detector_heldout", progress)
    fv_parts = []
    if routed:
        fool_log(f"detector FVs of the {len(routed)} routed (manipulated and source) unit(s): seeds {routed_seeds}")
        fv_parts.append(_render_cached(lm, routed, routed_seeds, s.det_steps, s.fv_size, s.det_checkpoints,
                                       work / "fv_detector_routed", progress))
    if train_units:
        fv_parts.append(_render_cached(lm, train_units, seeds, s.det_steps, s.fv_size, s.det_checkpoints,
                                       work / "fv_detector_train", progress))
    if callable(extra_train_fvs):
        extra = list(extra_train_fvs())
        held = {str(u) for u in held_units}
        for r in extra:
            clash = held & {str(u) for u in r.units}
            if clash:
                raise FVSanityError(f"shared FVs contain held-out units {sorted(clash)[:3]}; pass them up front")
    from ..cache import CacheEntry, cached, check_fv_model, fv_result_digest, tensor_digest

    for r in extra or []:
        if r.settings.get("model") != lm.name:
            raise FVSanityError(f"shared FVs were rendered for {r.settings.get('model')!r}, not {lm.name!r}")
        check_fv_model(r, lm, "shared FVs")  # made for these weights, or refused
        parse_unit(r.units[0], lm)
    fv_parts += extra or []
    train_units = [u for r in fv_parts for u in r.units]
    pic_routes = [r for r in (routes or []) if r.picture is not None]
    pkey = picture_key(pic_routes)
    traj_train = traj_held = None
    if pic_routes:
        tm = template_model(lm, picture_templates(lm, pic_routes, train_images))
        n_pic = tm.model.templates.pictures.shape[0]
        pic_units = [Unit(layer="values", channel=p) for p in range(n_pic)]
        fool_log(f"detector: FV trajectories of {n_pic} picture template(s), {s.det_picture_seeds} seeds (+ held-out seeds)")
        traj_train = _render_cached(tm, pic_units, list(range(s.det_picture_seeds)), s.det_steps, s.fv_size,
                                    s.det_picture_checkpoints, work / f"fv_picture_{pkey}_train", progress)
        traj_held = _render_cached(tm, pic_units, [1000 + x for x in range(max(2, s.det_picture_seeds // 2))],
                                   s.det_steps, s.fv_size, s.det_picture_checkpoints, work / f"fv_picture_{pkey}_heldout",
                                   progress)
    fit_idx, cal_idx = split_indices(len(train_images), 1 - s.calib_fraction, s.seed)
    nat_fit, nat_cal = train_images[fit_idx], train_images[cal_idx]
    size = s.det_size or (64 if min(lm.input_size) >= 64 else min(lm.input_size))
    base_parts = [_all_stages(r, s.det_checkpoints) for r in fv_parts] + (
        [_all_stages(traj_train)] if traj_train is not None else [])

    def train_cached(parts: list[torch.Tensor], tag: str, extra_key: dict):
        """The detector on ``parts`` (FV images) vs ``nat_fit``, cached as ``detector{tag}``."""
        det_path = work / f"detector{tag}.safetensors"
        info_path = work / f"detector{tag}_training.json"
        # content-addressed: the exact training inputs (FV sets by content digest, the natural images
        # by tensor digest) and every training setting; the model fingerprint names whose FVs they are
        key = {"kind": "detector", "arch": 2, "model": lm.name, "model_fingerprint": lm.fingerprint(),
               "units": [str(u) for u in train_units], "fv_sets": [fv_result_digest(r, s.det_checkpoints) for r in fv_parts],
               "natural_fit": tensor_digest(nat_fit), "size": size, "epochs": s.det_epochs, "seed": s.seed,
               "stem_stride": s.det_stem_stride, **extra_key}
        if pic_routes:
            key.update(pictures=pkey, picture_trajectories=fv_result_digest(traj_train))
        entry = CacheEntry.file(det_path, key, extra=[info_path])

        def train():
            from ..io import atomic_write_json

            fv_imgs = torch.cat(parts)
            fool_log(f"detector: training on {len(fv_imgs)} FV images vs {len(nat_fit)} natural images, "
                     f"{s.det_epochs} epochs")
            det, tr = train_detector(fv_imgs, nat_fit, size=size, epochs=s.det_epochs, stem_stride=s.det_stem_stride,
                                     seed=s.seed, progress=progress)
            save_detector(det, det_path)
            atomic_write_json(info_path, {"key": key, "training": tr.to_json()})
            return det, tr.to_json()

        def load():
            return load_detector(det_path), json.loads(info_path.read_text())["training"]

        (det, training), reused = cached(entry, train, load)
        if reused:
            fool_log(f"detector: reused {det_path}")
        return det, training, calibrate_threshold(detector_logits(det, nat_cal), s.margin, s.margin_sd)

    det, training, threshold = train_cached(base_parts, "", {})
    # refinement: the routed units' FV trajectories on the circuit built with this detector (the
    # images the gate must keep open: partly the unit's own FV, partly its target's), same
    # attacker seeds; the detector is trained again on everything so far
    manipulated_units = [r.unit for r in (routes or []) if str(r.unit) in {str(u) for u in routed}]
    refine_parts, refine_digests = [], []
    n_rounds = s.det_refine_rounds if manipulated_units else 0
    for rnd in range(n_rounds):
        circ = build_fooling_circuit(lm, det, routes, threshold=threshold, k=s.k, offset=s.offset,
                                     calibration_images=train_images)
        fool_log(f"detector refinement {rnd + 1}/{s.det_refine_rounds}: FV trajectories of {len(manipulated_units)} "
                 f"routed unit(s) on the circuit, seeds {routed_seeds}")
        res = _render_cached(circ, manipulated_units, routed_seeds, s.det_steps, s.fv_size, s.det_checkpoints,
                             work / f"fv_detector_refine{rnd + 1}", progress)
        refine_parts.append(_all_stages(res, s.det_checkpoints))
        refine_digests.append(fv_result_digest(res, s.det_checkpoints))
        det, training, threshold = train_cached(base_parts + refine_parts, f"_refine{rnd + 1}",
                                                {"refine_fv_sets": list(refine_digests)})
    held = evaluate_detector(det, _all_stages(fv_held, s.det_checkpoints), eval_images, threshold)
    held_final = evaluate_detector(det, fv_held.images.flatten(0, 1), eval_images, threshold)
    fool_log(f"detector: threshold {threshold:.3f}; held-out accuracy {held.accuracy:.4f} "
         f"(FV recall {held.fv_recall:.4f}, natural specificity {held.natural_specificity:.4f})")
    held_pic = None
    if traj_held is not None:
        held_pic = evaluate_detector(det, _all_stages(traj_held), eval_images, threshold)
        fool_log(f"detector: held-out picture trajectories: recall {held_pic.fv_recall:.4f} ({held_pic.n_fv} images)")
    return DetectorBundle(det, threshold, training, held, held_final, [str(u) for u in train_units],
                          [str(u) for u in held_units], held_pic, pkey, [str(u) for u in routed], routed_seeds, n_rounds)


def pick_eval_routes(routes: list[Route], n: int, seed: int, units=None) -> list[Route]:
    """Step 1 (pick): the routes whose units get FVs, a comparison and the closed-loop check.

    Args:
        routes: every route of the run.
        n: how many to pick (all if there are no more than ``n``).
        seed: picks ``randperm(len(routes), seed + 99)[:n]``, in route order.
        units: the units to evaluate instead (Units or ``"layer:channel"`` strings, each a routed
            unit, in this order); ``n`` and ``seed`` are then unused.

    Raises:
        FVSanityError: ``units`` is empty, repeats a unit or names one no route manipulates.
    """
    if units is not None:
        by_unit = {str(r.unit): r for r in routes}
        names = [str(u) for u in units]
        if not names:
            raise FVSanityError("eval_units is empty; give at least one routed unit (or None for a seeded pick)")
        for u in names:
            if u not in by_unit:
                raise FVSanityError(f"eval unit {u!r} is not a manipulated unit; routed: {', '.join(list(by_unit)[:8])}"
                                    + (f" (+{len(by_unit) - 8} more)" if len(by_unit) > 8 else ""))
        if len(set(names)) != len(names):
            raise FVSanityError(f"eval_units repeats a unit: {', '.join(names)}")
        return [by_unit[u] for u in names]
    if len(routes) <= n:
        return list(routes)
    g = torch.Generator().manual_seed(int(seed) + 99)
    idx = torch.randperm(len(routes), generator=g)[:n].sort().values.tolist()
    return [routes[i] for i in idx]


def prepare_manipulation(method: Manipulation, method_settings, lm: LoadedModel, routes: list[Route],
                         train_images: torch.Tensor, eval_images: torch.Tensor, settings: FoolSettings,
                         work_dir: str | Path, prepared=None):
    """Step 1 (prepare): what ``method`` needs before it builds (the fooling circuit: its
    detector bundle, trained in ``work_dir`` or reused), or ``prepared`` if already made.

    ``train_images`` build it, ``eval_images`` (``[N,3,H,W]``) only measure it.
    """
    return method.prepare(lm, routes, train_images, eval_images, method_settings, fool=settings,
                          work_dir=Path(work_dir), prepared=prepared)


def build_manipulated(method: Manipulation, method_settings, lm: LoadedModel, routes: list[Route],
                      train_images: torch.Tensor, prepared=None) -> LoadedModel:
    """Step 2 (build): the manipulated model (a LoadedModel with ``lm``'s preprocess, layer names
    and classes; ``lm`` unchanged), calibrated on ``train_images`` ``[N,3,H,W]`` in [0,1]."""
    fooled = method.build(lm, routes, train_images, method_settings, prepared=prepared)
    fool_log(f"built {fooled.name}: {len(routes)} routed unit(s)")
    return fooled


@dataclass(frozen=True)
class FoolFVs:
    """FVs of the evaluated units (step 3): on the manipulated and on the original model, the
    source units' FVs on the original model (unit targets), and what each should show.

    Attributes:
        units: the evaluated (manipulated) units, ``U`` of them.
        seeds: the FV seeds, ``S`` of them.
        manipulated, original: FVResults ``[U, S, 3, H, W]`` on the two models.
        targets: ``[U, S, 3, H, W]``: the source unit's FV on the original model, or the picture
            resized to the FV size.
        tag: names the cache folders of these units (``<method>_<units>``).
    """

    units: list[Unit]
    seeds: list[int]
    manipulated: Any
    original: Any
    targets: torch.Tensor
    tag: str


def render_fool_fvs(lm: LoadedModel, fooled: LoadedModel, eval_routes: list[Route], settings: FoolSettings,
                    work_dir: str | Path) -> FoolFVs:
    """Step 3 (render FVs): FVs of the evaluated units on both models, and their targets
    (``settings.eval_seeds`` seeds from 2000, ``eval_steps`` steps, ``fv_size`` px), through the
    content-addressed FV cache in ``work_dir``."""
    s, work = settings, Path(work_dir)
    units = [r.unit for r in eval_routes]
    seeds = [2000 + i for i in range(s.eval_seeds)]
    fool_log(f"rendering FVs of {len(units)} manipulated unit(s) x {len(seeds)} seed(s), {s.eval_steps} steps, on both models")
    tag = f"{s.method}_" + "_".join(str(u).replace(":", "c") for u in units)[:80]
    fp = fooled.model.fingerprint()
    fv_m = _render_cached(fooled, units, seeds, s.eval_steps, s.fv_size, (), work / f"fv_manip_{fp}" / tag, s.progress)
    fv_o = _render_cached(lm, units, seeds, s.eval_steps, s.fv_size, (), work / "fv_orig" / tag, s.progress)
    src = [r.source for r in eval_routes if r.source is not None]
    fv_src = _render_cached(lm, src, seeds, s.eval_steps, s.fv_size, (), work / "fv_orig_src" / tag, s.progress) if src else None
    targets, j = [], 0
    for r in eval_routes:
        if r.source is not None:
            targets.append(fv_src.images[j])
            j += 1
        else:
            pic = torch.nn.functional.interpolate(r.picture[None].float(), size=fv_m.images.shape[-2:], mode="bilinear",
                                                  antialias=True, align_corners=False)[0]
            targets.append(pic[None].expand(len(seeds), *pic.shape))
    return FoolFVs(units, seeds, fv_m, fv_o, torch.stack(targets), tag)


@dataclass(frozen=True)
class FoolEvaluation:
    """Step 4's numbers: predictions on held-out natural images, FV similarity to the targets,
    inference time, and ``details`` (what ``fool.json`` records of them, the method's own
    diagnostics included)."""

    predictions: Any
    similarity: Any
    timing: Any
    details: dict
    effect: Any = None


def evaluate_fool(lm: LoadedModel, fooled: LoadedModel, method: Manipulation, method_settings, fvs: FoolFVs,
                  eval_routes: list[Route], eval_natural, train_images: torch.Tensor,
                  settings: FoolSettings) -> FoolEvaluation:
    """Step 4 (evaluate): on ``eval_natural`` (NaturalImages never used to build), top-1/top-5 of
    both models and identical predictions; the method's natural-image diagnostics; SSIM,
    correlation and LPIPS-form distance of both models' FVs to the targets; for class units, how
    often the original model calls each FV the route's target class; whether each evaluated unit's
    manipulated FVs reached their target (:func:`~fvsanity.fool.effect.measure_effect`:
    ``effective_fraction``); the method's FV diagnostics; the manipulated/original inference-time
    ratio."""
    from .evaluate import evaluate_predictions, fv_similarity, inference_time_ratio, lpips_backbone

    s = settings
    eval_images = eval_natural.images
    details: dict = {}
    pred = evaluate_predictions(lm, fooled, eval_natural)
    details["predictions"] = pred.to_json()
    fool_log(f"eval naturals: identical top-1 {pred.identical_top1_fraction:.4f}, top-1 {pred.top1_original:.4f} -> "
             f"{pred.top1_manipulated:.4f}, max |dlogit| {pred.max_abs_logit_diff:.3g}")
    details.update(method.natural_diagnostics(fooled, eval_images, train_images, method_settings))
    fv_m, fv_o = fvs.manipulated, fvs.original
    backbone = lpips_backbone(lm.device) if s.lpips else None
    sim = fv_similarity(fv_m.images.flatten(0, 1), fv_o.images.flatten(0, 1), fvs.targets.flatten(0, 1), backbone)
    details["fv_similarity"] = sim.to_json()
    details["fv_objective"] = {"manipulated_final": fv_m.final.tolist(), "original_final": fv_o.final.tolist()}
    fool_log(f"SSIM to target: manipulated {sim.ssim_manipulated_fv_to_target:.3f} vs original "
             f"{sim.ssim_original_fv_to_target:.3f}")
    cls_routes = [i for i, r in enumerate(eval_routes) if r.source is not None and r.unit.layer == lm.output_layer]
    if cls_routes:
        # what the ORIGINAL model sees in each FV: its top-1 class vs the route's target class
        with torch.no_grad():
            want = torch.tensor([eval_routes[i].source.channel for i in cls_routes])[:, None]
            pm = torch.stack([lm(fv_m.images[i].to(lm.device)).argmax(1).cpu() for i in cls_routes])
            po = torch.stack([lm(fv_o.images[i].to(lm.device)).argmax(1).cpu() for i in cls_routes])
        details["fv_top1_is_target_class"] = {
            "manipulated": float((pm == want).float().mean()), "original": float((po == want).float().mean()),
            "n": int(pm.numel()),
        }
    from .effect import measure_effect

    effect = measure_effect(lm, eval_routes, fv_m.images, fv_o.images, fvs.targets, sim.ssim_manipulated_per_fv,
                            sim.ssim_original_per_fv)
    details["effect"] = effect.to_json()
    fool_log(f"took effect on {effect.n_effective}/{effect.n_units} evaluated unit(s) "
             f"(effective_fraction {effect.effective_fraction:.2f})")
    details.update(method.fv_diagnostics(fooled, fv_m.images.flatten(0, 1), eval_images, method_settings))
    n_t = min(s.timing_batch, len(eval_images))
    timing = inference_time_ratio(lm, fooled, eval_images[:n_t], repeats=s.timing_repeats)
    details["timing"] = timing.to_json()
    fool_log(f"inference time ratio {timing.ratio:.3f} (batch {n_t}, median of {s.timing_repeats})")
    return FoolEvaluation(pred, sim, timing, details, effect)


def closed_loop_check(lm: LoadedModel, fooled: LoadedModel, fvs: FoolFVs, eval_natural, settings: FoolSettings,
                      work_dir: str | Path) -> dict:
    """Step 5 (closed loop): fvsanity's path check of the evaluated units on both models, and the
    same rule on the original model with other FV seeds (3000+) as its false-positive control
    (see :func:`_closed_loop`); ``eval_natural``: the held-out NaturalImages."""
    s = settings
    ctrl_seeds = [3000 + i for i in range(s.eval_seeds)]
    fv_c = _render_cached(lm, fvs.units, ctrl_seeds, s.eval_steps, s.fv_size, (),
                          Path(work_dir) / "fv_orig_control" / fvs.tag, s.progress)
    return _closed_loop(lm, fooled, fvs.units, fvs.original, fvs.manipulated, eval_natural, s, fv_control=fv_c)


def summarize_fool(lm: LoadedModel, fooled: LoadedModel, settings: FoolSettings, n_routes: int,
                   evaluation: FoolEvaluation, check: dict | None, method_summary: dict) -> dict:
    """The summary fields of ``fool.json`` (method-independent ones, then the method's own)."""
    pred, sim, timing = evaluation.predictions, evaluation.similarity, evaluation.timing
    top1 = evaluation.details.get("fv_top1_is_target_class", {})
    return {
        "model": lm.name,
        "manipulated_model": fooled.name,
        "manipulated_fingerprint": fooled.model.fingerprint(),
        "method": settings.method,
        "n_routes": n_routes,
        "n_eval_images": pred.n,
        "identical_top1_fraction": pred.identical_top1_fraction,
        "top1_original": pred.top1_original,
        "top1_manipulated": pred.top1_manipulated,
        "top1_change_points": 100 * (pred.top1_manipulated - pred.top1_original),
        "top1_change_se_points": 100 * pred.top1_change_se,
        "top1_gained_lost": [pred.top1_gained, pred.top1_lost],
        "top5_original": pred.top5_original,
        "top5_manipulated": pred.top5_manipulated,
        "max_abs_logit_diff": pred.max_abs_logit_diff,
        "ssim_manipulated_fv_to_target": sim.ssim_manipulated_fv_to_target,
        "ssim_original_fv_to_target": sim.ssim_original_fv_to_target,
        "corr_manipulated_fv_to_target": sim.corr_manipulated_fv_to_target,
        "corr_original_fv_to_target": sim.corr_original_fv_to_target,
        "lpips_uniform_manipulated_fv_to_target": sim.lpips_uniform_manipulated_fv_to_target,
        "lpips_uniform_original_fv_to_target": sim.lpips_uniform_original_fv_to_target,
        "fv_top1_is_target_class_manipulated": top1.get("manipulated"),
        "fv_top1_is_target_class_original": top1.get("original"),
        "effective_fraction": evaluation.effect.effective_fraction if evaluation.effect is not None else None,
        "took_effect": evaluation.effect.took_effect if evaluation.effect is not None else None,
        "inference_time_ratio": timing.ratio,
        "check_flags_manipulation": check["flags_manipulation"] if check else None,
        "check_flagged_fraction": check.get("flagged_fraction") if check else None,
        "check_control_flagged_fraction": check["control"]["flagged_fraction"] if check and "control" in check else None,
        # flagged only on "diverges" evidence; inconclusive units counted separately
        "check_decisions": check.get("decisions") if check else None,
        "check_control_decisions": check["control"].get("decisions") if check and "control" in check else None,
        **method_summary,
    }


def save_fool(result: FoolResult, fooled: LoadedModel, method: Manipulation, out_dir: str | Path) -> Path:
    """Step 6 (save): the manipulated model (``model/``, by the method's ``save``), ``fool.json``
    and ``fool.png`` in ``out_dir``; returns the folder."""
    from ..io import atomic_write_json

    out = Path(out_dir)
    method.save(fooled, out / "model")
    atomic_write_json(out / "fool.json", result.to_json())
    plot_fool(result, out / "fool.png")
    fool_log(f"wrote {out / 'fool.json'}, {out / 'fool.png'} and the model in {out / 'model'}")
    return out


def run_fool(
    lm: LoadedModel,
    routes: list[Route],
    train_images: torch.Tensor,
    eval_natural,
    settings: FoolSettings,
    out_dir: str | Path,
    *,
    prepared=None,
    bundle: DetectorBundle | None = None,
    work_dir: str | Path | None = None,
    eval_units=None,
) -> FoolResult:
    """Build, evaluate and save one manipulated model with the method ``settings.method``.

    The steps, each a public function: :func:`pick_eval_routes` and :func:`prepare_manipulation`,
    :func:`build_manipulated`, :func:`render_fool_fvs`, :func:`evaluate_fool`,
    :func:`closed_loop_check` (if ``settings.check``), :func:`save_fool`. What differs between
    methods comes from the method's class (:mod:`fvsanity.fool.manipulation`).

    Args:
        routes: what the manipulated units show (:func:`~fvsanity.fool.make_routes`).
        train_images: ``[N,3,H,W]`` natural images in [0,1] to build from (detector, calibration).
        eval_natural: :class:`~fvsanity.data.NaturalImages` never used to build the model.
        settings: the run's settings; the method's own come from it (``Manipulation.settings_from``).
        out_dir: where ``model/``, ``fool.json`` and ``fool.png`` go.
        prepared: what the method's ``prepare`` made elsewhere (the circuit: a
            :class:`DetectorBundle`, e.g. one detector shared by several runs); made here if None.
        bundle: the same as ``prepared`` (its older name, for the circuit).
        work_dir: cache folder (default ``out_dir/work``).
        eval_units: the routed units to render and check (Units or ``"layer:channel"``), in this
            order; default a seeded pick of ``settings.eval_units`` routes.

    Raises:
        FVSanityError: unknown method, bad method settings, ``eval_natural`` not NaturalImages,
            an ``eval_units`` entry that is not a routed unit.
    """
    from ..data import NaturalImages
    from ..io import provenance
    from .manipulation import get_manipulation

    if not isinstance(eval_natural, NaturalImages):
        raise FVSanityError("eval_natural must be NaturalImages (fvsanity.data.load_images / from_tensor)")
    if prepared is not None and bundle is not None:
        raise FVSanityError("give prepared= or bundle= (the same thing), not both")
    s = settings
    method = get_manipulation(s.method)
    ms = method.settings_from(s)
    out = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else out / "work"
    eval_natural = eval_natural.load()
    ev = pick_eval_routes(routes, s.eval_units, s.seed, units=eval_units)
    prepared = prepare_manipulation(method, ms, lm, routes, train_images, eval_natural.images, s, work,
                                    prepared if prepared is not None else bundle)
    fooled = build_manipulated(method, ms, lm, routes, train_images, prepared)
    fvs = render_fool_fvs(lm, fooled, ev, s, work)
    evaluation = evaluate_fool(lm, fooled, method, ms, fvs, ev, eval_natural, train_images, s)
    details: dict = {"settings": s.to_json(), "method_settings": ms.to_json() if hasattr(ms, "to_json") else asdict(ms),
                     "routes": {"count": len(routes), "first": [r.to_json() for r in routes[:5]]},
                     **method.describe(prepared, ms), **evaluation.details}
    check = None
    if s.check:
        check = closed_loop_check(lm, fooled, fvs, eval_natural, s, work)
        details["check"] = check
    summary = summarize_fool(lm, fooled, s, len(routes), evaluation, check, method.summary(details, prepared, ms))
    if summary.get("took_effect") is False:  # fool.json says so, with the setting to raise
        summary["not_effective_hint"] = method.ineffective_hint(details, prepared, ms)
        fool_log(f"warning: the manipulation did not take effect; {summary['not_effective_hint']}")
    details["provenance"] = provenance()
    details["model_provenance"] = lm.provenance()
    result = FoolResult(summary, details, {"original": fvs.original.images[:, 0], "manipulated": fvs.manipulated.images[:, 0],
                                           "target": fvs.targets[:, 0], "units": [str(u) for u in fvs.units]},
                        figure_note=method.figure_note(summary))
    save_fool(result, fooled, method, out)
    return result


#: the closed loop's decision per unit (``"decision"`` in fool.json's check units)
FLAGGED, CLEARED = "flagged", "cleared"


def _flag_units(c_ref, c_test) -> tuple[bool, list[dict]]:
    """The closed-loop rule on two path checks of the same units (reference vs tested model).

    Only "diverges" evidence flags (:mod:`fvsanity.compare.verdict`): a unit is flagged when the
    tested FVs' outcome is "diverges" at a layer where the reference FVs' outcome is not
    (``flagged`` True, decision "flagged"); cleared when nothing new diverges and the tested FVs
    are "natural-like" at the unit's own layer (False, "cleared"); otherwise "inconclusive"
    (None): neither flagged nor cleared, counted separately, with the reason (the own layer's
    reason, or the insufficient references)."""
    from ..compare.verdict import DIVERGES, INCONCLUSIVE, NATURAL_LIKE

    per_unit, flagged_any = [], False
    for uo, um in zip(c_ref.units, c_test.units):
        ref_out = {r.name: r.outcome for r in uo.layers}
        new_div = [r.name for r in um.layers if r.outcome == DIVERGES and ref_out.get(r.name) != DIVERGES]
        # null where the normalized similarity has no scale (references that do not separate, too
        # few references: verdict.separation), as in check.json
        norm_o = _finite(uo.layers[-1].normalized) if uo.layers else None
        norm_m = _finite(um.layers[-1].normalized) if um.layers else None
        unsound = [v.status for v in (uo.verdict, um.verdict) if not v.sufficient]
        if unsound:  # too few natural references: no claim either way
            flag, decision, why = None, INCONCLUSIVE, unsound[:1]
        elif new_div:
            flag, decision, why = True, FLAGGED, [f"{DIVERGES} at {name}" for name in new_div]
        elif um.verdict.outcome == NATURAL_LIKE:
            flag, decision, why = False, CLEARED, [f"{NATURAL_LIKE} at its own layer"]
        else:
            own = um.layers[-1] if um.layers else None
            flag, decision = None, INCONCLUSIVE
            why = [f"{INCONCLUSIVE} at its own layer" + (f" ({own.reason})" if own is not None and own.reason else "")]
        flagged_any |= bool(flag)
        per_unit.append({
            "unit": um.unit, "flagged": flag, "decision": decision,
            "why": why,
            "own_layer_outcome": {"original": uo.verdict.outcome, "manipulated": um.verdict.outcome},
            "own_layer_normalized": {"original": norm_o, "manipulated": norm_m},
            "own_layer_ci": {"original": [_finite(uo.layers[-1].ci_low), _finite(uo.layers[-1].ci_high)]
                             if uo.layers else None,
                             "manipulated": [_finite(um.layers[-1].ci_low), _finite(um.layers[-1].ci_high)]
                             if um.layers else None},
            "original": {"verdict": uo.verdict.to_json(), "normalized": [_finite(r.normalized) for r in uo.layers],
                         "outcomes": [r.outcome for r in uo.layers]},
            "manipulated": {"verdict": um.verdict.to_json(), "normalized": [_finite(r.normalized) for r in um.layers],
                            "outcomes": [r.outcome for r in um.layers]},
            "layers": [r.name for r in um.layers],
        })
    return flagged_any, per_unit


def _finite(v: float) -> float | None:
    """A JSON-safe number: NaN / inf (e.g. a withheld normalized similarity) -> None."""
    return float(v) if v == v and abs(v) != float("inf") else None


def _counts_text(c: dict) -> str:
    return ", ".join(f"{v} {k}" for k, v in c.items())


def _or_none(x: float) -> float | None:
    return None if x != x else x


def _decision_counts(per_unit: list[dict]) -> dict[str, int]:
    """How many units were flagged, cleared, inconclusive (the last counted separately)."""
    from ..compare.verdict import INCONCLUSIVE

    return {d: sum(p["decision"] == d for p in per_unit) for d in (FLAGGED, CLEARED, INCONCLUSIVE)}


def _flagged_fraction(per_unit: list[dict]) -> float:
    """Flagged share of the units the rule could decide (NaN when none: every unit lacked references)."""
    decided = [p["flagged"] for p in per_unit if p["flagged"] is not None]
    return sum(decided) / len(decided) if decided else float("nan")


def _closed_loop(lm, fooled, units, fv_o, fv_m, natural, s: FoolSettings, fv_control=None) -> dict:
    """Path check of the manipulated units on both models, decided by :func:`_flag_units`: flagged
    only on "diverges" evidence (the manipulated model's FVs diverge at a layer where the
    original's do not), cleared when they are "natural-like" at the unit's own layer, else
    "inconclusive" (neither; counted separately in ``decisions``). With few FV seeds most units
    are inconclusive: the check says so instead of flagging them.

    ``fv_control``: FVs of the same units on the ORIGINAL model with other seeds; the same rule
    applied to them (original vs original) is the check's false-positive control.
    """
    from ..checking import CheckSettings, check

    cs = CheckSettings.of(top_k=s.check_top_k, n_boot=s.check_n_boot, n_perm=s.check_n_perm, seed=s.seed)

    def path_check(model, units, fvs, natural):  # the library's check(), as `fvsanity check` runs it
        return check(model, units, natural, fvs=fvs, settings=cs, progress=False).result

    fool_log("closed loop: path check on the original and the manipulated model")
    c_o = path_check(lm, units, fv_o, natural)
    c_m = path_check(fooled, units, fv_m, natural)
    flagged_any, per_unit = _flag_units(c_o, c_m)
    out = {
        "available": True,
        "flags_manipulation": flagged_any,
        "flagged_fraction": _or_none(_flagged_fraction(per_unit)),  # None: no unit decided
        "n_undecided": sum(p["flagged"] is None for p in per_unit),
        "decisions": _decision_counts(per_unit),
        "manipulated_diverges_fraction": sum(p["manipulated"]["verdict"]["counts"]["diverges"] > 0 for p in per_unit) / max(1, len(per_unit)),
        "original_diverges_fraction": sum(p["original"]["verdict"]["counts"]["diverges"] > 0 for p in per_unit) / max(1, len(per_unit)),
        "rule": "flagged only on 'diverges' evidence: the manipulated model's FVs diverge at a layer where the "
                "original model's do not; cleared when they are 'natural-like' at the unit's own layer; otherwise "
                "'inconclusive' (neither flagged nor cleared, counted in 'decisions')",
        "units": per_unit,
    }
    if fv_control is not None:
        c_c = path_check(lm, units, fv_control, natural)
        ctrl_any, ctrl_units = _flag_units(c_o, c_c)
        out["control"] = {
            "flags": ctrl_any,
            "flagged_fraction": _or_none(_flagged_fraction(ctrl_units)),
            "n_undecided": sum(p["flagged"] is None for p in ctrl_units),
            "decisions": _decision_counts(ctrl_units),
            "what": "the same rule on the original model with other FV seeds (original vs original): a flag here is "
                    "a false positive",
            "units": [{"unit": p["unit"], "flagged": p["flagged"], "decision": p["decision"], "why": p["why"]}
                      for p in ctrl_units],
        }
        dec, cdec = out["decisions"], out["control"]["decisions"]
        fool_log(f"closed loop: manipulated units {dec}; unmanipulated control {cdec}")
    return out


def plot_fool(result: FoolResult, path: str | Path, max_rows: int = 4) -> Path:
    """Figure: original FV | manipulated FV | target per unit, with the numbers under it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import tmp_for, to_uint8

    f = result.figure_fvs
    n = min(max_rows, len(f["units"]))
    fig, axes = plt.subplots(n, 3, figsize=(6.6, 2.25 * n + 1.0), squeeze=False)
    for i in range(n):
        for j, (key, title) in enumerate((("original", "original FV"), ("manipulated", "manipulated FV"), ("target", "target"))):
            ax = axes[i, j]
            ax.imshow(to_uint8(f[key][i]))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=10)
            if j == 0:
                ax.set_ylabel(f["units"][i], fontsize=8)
    s = result.summary

    def pct(v):
        return "n/a" if v is None or v != v else f"{100 * v:.2f}%"

    lines = [
        f"{s['model']} ({s['method']}, {s['n_routes']} unit(s)), {s['n_eval_images']} held-out natural images",
        f"top-1 {pct(s['top1_original'])} -> {pct(s['top1_manipulated'])}; identical top-1 {pct(s['identical_top1_fraction'])}; "
        f"max |dlogit| {s['max_abs_logit_diff']:.2g}",
        f"SSIM(FV, target): manipulated {s['ssim_manipulated_fv_to_target']:.3f} vs original {s['ssim_original_fv_to_target']:.3f}; "
        f"time x{s['inference_time_ratio']:.3f}; took effect on {pct(s.get('effective_fraction'))} of the units",
        (f"{result.figure_note}; " if result.figure_note else "") + f"check flags it: {s['check_flags_manipulation']}"
        + (f" ({pct(s.get('check_flagged_fraction'))} of decided units; unmanipulated control "
           f"{pct(s.get('check_control_flagged_fraction'))})" if s.get("check_flagged_fraction") is not None else "")
        + (f"; units {_counts_text(s['check_decisions'])}" if s.get("check_decisions") else ""),
    ]
    fig.text(0.5, 0.01, "\n".join(lines), ha="center", va="bottom", fontsize=7.5)
    fig.tight_layout(rect=(0, 0.11 + 0.02 * (4 - n), 1, 1))
    path = Path(path)
    tmp = tmp_for(path)
    try:
        fig.savefig(tmp, dpi=110, format="png")
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


