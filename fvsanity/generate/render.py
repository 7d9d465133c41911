"""Batched FV optimization: many units x seeds in one batch, each element with its own objective.

Elements never interact (eval-mode model, per-element Adam state, per-element random transforms,
per-element initial image), so optimizing K units together gives the same FVs as K separate runs
with the same seeds, at the cost of one forward+backward of the batch per step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import FVSanityError
from ..hooks import capture_until, run_partial
from ..layouts import pool, to_map
from ..units import Unit, parse_unit
from . import param as P
from . import transforms as T
from .objectives import batched_unit_scores, diversity_penalty


@dataclass(frozen=True)
class FVResult:
    """Feature visualizations for U units x S seeds.

    Attributes:
        images: [U, S, 3, H, W] RGB in [0, 1] (CPU, float32).
        traces: [U, S, steps] objective per step (on the transformed image that step optimized).
        final: [U, S] objective of the final, untransformed image at the model's input size.
        activations: [U, S, C_u] spatially mean-pooled activations of each unit's layer for the
            final image, per unit (list, since layers differ).
        units, seeds: what was visualized.
        settings: every option that affects the result (see ``settings_hash``).
        checkpoints: {step: [U, S, 3, H, W]} images after ``step`` optimization steps.
    """

    images: torch.Tensor
    traces: torch.Tensor
    final: torch.Tensor
    activations: list[torch.Tensor]
    units: list[Unit]
    seeds: list[int]
    settings: dict
    checkpoints: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def settings_hash(self) -> str:
        return settings_hash(self.settings)

    def to_json(self) -> dict:
        return {
            "units": [u.to_json() for u in self.units],
            "seeds": list(self.seeds),
            "settings": self.settings,
            "settings_hash": self.settings_hash,
            "final_objective": self.final.tolist(),
            "image_shape": list(self.images.shape),
            "checkpoint_steps": sorted(self.checkpoints),
        }

    def save(self, out: str | Path, pngs: bool = True) -> Path:
        """Write ``fv.pt`` (tensors), ``fv.json`` (settings, seeds, final objectives) and PNGs."""
        from ..io import atomic_save_tensors, atomic_write_json, image_grid, save_png

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"images": self.images, "traces": self.traces, "final": self.final}
        tensors.update({f"act_{i}": a for i, a in enumerate(self.activations)})
        tensors.update({f"ckpt_{k}": v for k, v in self.checkpoints.items()})
        for i, u in enumerate(self.units):
            if u.direction is not None:
                tensors[f"direction_{i}"] = u.direction
        atomic_save_tensors(out / "fv.pt", tensors)
        if pngs:
            for i, u in enumerate(self.units):
                for j, s in enumerate(self.seeds):
                    save_png(out / f"{_safe_name(u)}_seed{s}.png", self.images[i, j])
            n_u, n_s = self.images.shape[:2]
            save_png(out / "grid.png", image_grid(self.images.flatten(0, 1), nrow=n_s))
        atomic_write_json(out / "fv.json", self.to_json())
        return out

    @classmethod
    def load(cls, path: str | Path) -> FVResult:
        """Read a folder written by :meth:`save` (or its ``fv.pt`` / ``fv.json``)."""
        from ..io import load_tensors

        path = Path(path)
        folder = path if path.is_dir() else path.parent
        if not path.exists() or not (folder / "fv.pt").is_file() or not (folder / "fv.json").is_file():
            raise FVSanityError(f"no FVs at {path}: expected fv.pt and fv.json (written by `fvsanity visualize`)")
        meta = json.loads((folder / "fv.json").read_text())
        t = load_tensors(folder / "fv.pt")
        units = []
        for i, u in enumerate(meta["units"]):
            d = t.get(f"direction_{i}")
            units.append(Unit(layer=u["layer"], channel=u.get("channel"), y=u.get("y"), x=u.get("x"), direction=d))
        acts = [t[f"act_{i}"] for i in range(len(units)) if f"act_{i}" in t]
        ckpts = {int(k[5:]): v for k, v in t.items() if k.startswith("ckpt_")}
        return cls(t["images"], t["traces"], t["final"], acts, units, meta["seeds"], meta["settings"], ckpts)


def _safe_name(u: Unit) -> str:
    return str(u).replace(":", "_c").replace("@", "_at").replace(",", "_").replace("/", "-")


def settings_hash(settings: dict) -> str:
    """Short hash of the settings that determine an FV (to refuse mixing different runs)."""
    keys = {k: v for k, v in settings.items() if k not in ("device", "batch_size", "progress", "amp", "weights_source", "seconds")}
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _resolve_transforms(transforms, size: int) -> T.TransformSpec:
    if isinstance(transforms, T.TransformSpec):
        return transforms
    if transforms in (None, "none"):
        return T.TransformSpec.none()
    if transforms == "standard":
        return T.TransformSpec.standard(size)
    if transforms == "lucent":
        return T.TransformSpec()  # lucent's fixed 224-px magnitudes
    raise FVSanityError(f"unknown transforms {transforms!r}; valid: standard, lucent, none")


def _diversity_layer(lm, unit: Unit, shapes: dict) -> str:
    """The unit's layer if it has a 2-D grid (conv map or patch tokens), else the last such block
    before it (``shapes`` unused; kept for callers)."""
    layers = lm.layers
    if unit.layer in layers and layers[unit.layer].layout.spatial:
        return unit.layer
    spatial = [b for b in lm.path_to(unit.layer) if b in layers and layers[b].layout.spatial]
    if not spatial:
        raise FVSanityError(f"no spatial layer before {unit.layer!r} for the diversity term")
    return spatial[-1]


def render(
    lm,
    units: Sequence[Unit | str] | Unit | str,
    seeds: int | Sequence[int] = 1,
    steps: int = 512,
    size: int | tuple[int, int] | None = None,
    lr: float = 0.05,
    param: str = "fft",
    decorrelate: bool = True,
    transforms: str | T.TransformSpec = "standard",
    diversity: float = 0.0,
    checkpoints: Sequence[int] = (),
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    progress: bool = True,
) -> FVResult:
    """Feature visualizations of ``units`` x ``seeds``, optimized together in batches.

    Args:
        lm: a :class:`~fvsanity.models.LoadedModel`.
        units: unit specs (``"layer:c"``, ``"layer:c@y,x"``) or :class:`Unit`s (U of them).
        seeds: number of seeds (0..n-1) or explicit seeds (S of them).
        steps: Adam steps (paper/lucent default 512).
        size: image side in px (default: the model's input size).
        lr: Adam learning rate (0.05, lucent's default).
        param: "fft" (Fourier, 1/f scaled, lucent default) or "pixel".
        decorrelate: colour decorrelation (lucent default True).
        transforms: "standard" (lucent's set scaled to ``size``), "lucent" (224-px magnitudes),
            "none", or a :class:`TransformSpec`.
        diversity: weight of lucent's diversity term across a unit's seeds (0 = off).
        checkpoints: steps after which to keep a copy of the images.
        batch_size: elements per optimization batch (default: all on CUDA, 64 on CPU).
        device: default: the model's device.
        amp: bf16 autocast + channels_last (default: on for CUDA, off on CPU).
        progress: show a progress bar.

    Returns:
        :class:`FVResult`; deterministic on CPU for fixed seeds.
    """
    units_l = [units] if isinstance(units, (str, Unit)) else list(units)
    if not units_l:
        raise FVSanityError("no units to visualize; pass at least one LAYER:CHANNEL")
    units_p = [parse_unit(u, lm) for u in units_l]
    seeds_l = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seeds_l:
        raise FVSanityError("seeds must be >= 1")
    if steps < 1:
        raise FVSanityError(f"steps must be >= 1, got {steps}")
    hw = lm.input_size if size is None else ((size, size) if isinstance(size, int) else tuple(size))
    if lm.config.fixed_input_size and tuple(hw) != tuple(lm.input_size):
        raise FVSanityError(
            f"{lm.name} takes {lm.input_size[0]}x{lm.input_size[1]} px inputs only (fixed input size); "
            f"got size {hw[0]}x{hw[1]}: drop --size or pass {lm.input_size[0]}"
        )
    spec = _resolve_transforms(transforms, min(hw))
    dev = torch.device(device) if device is not None else lm.device
    if dev != lm.device:
        lm.to(dev)
    use_amp = (dev.type == "cuda") if amp is None else bool(amp)
    shapes = {n: i.shape for n, i in lm.layers.items()}
    ref_hw = {u.layer: tuple(u.layout.grid) for u in units_p if u.layout is not None and u.layout.grid is not None}

    # One batch element per (unit, seed); chunk if needed (elements are independent, so exact).
    elems = [(i, j) for i in range(len(units_p)) for j in range(len(seeds_l))]
    bs = batch_size or (len(elems) if dev.type == "cuda" else 64)
    if diversity and len(seeds_l) > 1:
        bs = max(bs, len(seeds_l)) // len(seeds_l) * len(seeds_l)  # keep a unit's seeds together
    settings = {
        "model": lm.name,
        "model_fingerprint": lm.fingerprint(),  # the weights these FVs are for (checked on --fv reuse)
        "weights_source": lm.weights_source,  # provenance only: not hashed (the fingerprint is)
        "steps": steps,
        "size": list(hw),
        "lr": lr,
        "param": param,
        "decorrelate": decorrelate,
        "transforms": spec.__dict__ | {"scales": list(spec.scales), "angles": list(spec.angles)},
        "diversity": diversity,
        "device": str(dev),
        "amp": use_amp,
        "batch_size": bs,
    }
    n_u, n_s = len(units_p), len(seeds_l)
    images = torch.zeros(n_u, n_s, 3, *hw)
    traces = torch.zeros(n_u, n_s, steps)
    ckpt_steps = sorted({int(c) for c in checkpoints if 0 < int(c) <= steps})
    ckpts = {c: torch.zeros(n_u, n_s, 3, *hw) for c in ckpt_steps}

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps * ((len(elems) + bs - 1) // bs), desc=f"FV {n_u}x{n_s}", unit="step", leave=False)
    t0 = time.perf_counter()
    try:
        for start in range(0, len(elems), bs):
            chunk = elems[start : start + bs]
            res = _optimize_chunk(
                lm, [units_p[i] for i, _ in chunk], [seeds_l[j] for _, j in chunk], [i for i, _ in chunk],
                steps, hw, lr, param, decorrelate, spec, diversity, ckpt_steps, dev, use_amp, ref_hw, shapes, bar,
            )
            for k, (i, j) in enumerate(chunk):
                images[i, j] = res["images"][k]
                traces[i, j] = res["traces"][k]
                for c in ckpt_steps:
                    ckpts[c][i, j] = res["ckpts"][c][k]
    finally:
        if bar is not None:
            bar.close()
    settings["seconds"] = round(time.perf_counter() - t0, 3)
    final, acts = evaluate(lm, images, units_p, dev)
    return FVResult(images, traces, final, acts, units_p, seeds_l, settings, ckpts)


def _optimize_chunk(
    lm, units, seeds, groups, steps, hw, lr, param, decorrelate, spec, diversity, ckpt_steps, dev, use_amp, ref_hw, shapes, bar
):
    model = lm.model
    params, image_fn = P.image(hw, seeds, param=param, decorrelate=decorrelate, device=dev)
    opt = torch.optim.Adam(params, lr=lr)
    draws = T.draw_params(spec, seeds, steps).to(dev)
    layers = sorted({u.layer for u in units})
    div_groups: list[tuple[str, list[int]]] = []
    if diversity:
        by_group: dict[int, list[int]] = {}
        for k, g in enumerate(groups):
            by_group.setdefault(g, []).append(k)
        for idx in by_group.values():
            if len(idx) > 1:
                div_groups.append((_diversity_layer(lm, units[idx[0]], shapes), idx))
        layers = sorted(set(layers) | {layer for layer, _ in div_groups})
    traces = torch.zeros(len(units), steps)
    ckpts = {}
    autocast = (
        torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
    )
    with capture_until(model, layers) as store:
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            img = image_fn()
            x = T.apply(img, spec, draws[:, step], out_size=hw if lm.config.fixed_input_size else None)
            x = lm.preprocess(x)
            if use_amp and dev.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                run_partial(model, x, store)
                acts = {k: v.float() for k, v in store.items()}
                scores = batched_unit_scores(acts, units, ref_hw)
                loss = -scores.sum()
                for layer, idx in div_groups:
                    fmap = to_map(acts[layer][idx], lm.layer_info(layer).layout)
                    loss = loss + diversity * len(idx) * diversity_penalty(fmap)
            loss.backward()
            opt.step()
            traces[:, step] = scores.detach().float().cpu()
            if step + 1 in ckpt_steps:
                with torch.no_grad():
                    ckpts[step + 1] = image_fn().float().cpu()
            if bar is not None:
                bar.update(1)
    with torch.no_grad():
        final_images = image_fn().float().cpu()
    return {"images": final_images, "traces": traces, "ckpts": ckpts}


@torch.no_grad()
def evaluate(lm, images: torch.Tensor, units: Sequence[Unit], device=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Objective and pooled unit-layer activations of untransformed images.

    Args:
        images: [U, S, 3, H, W] (image i is scored under ``units[i]``).
    Returns:
        final [U, S] objective values and, per unit, [S, C] mean-pooled activations of its layer
        (over space, or over patch tokens for a token layout).
    """
    dev = device or lm.device
    n_u, n_s = images.shape[:2]
    layers = sorted({u.layer for u in units})
    final = torch.zeros(n_u, n_s)
    acts_out = []
    with capture_until(lm.model, layers, detach=True) as store:
        for i, u in enumerate(units):
            run_partial(lm.model, lm.preprocess(images[i].to(dev)), store)
            final[i] = batched_unit_scores(store, [u] * n_s).float().cpu()
            acts_out.append(pool(store[u.layer].float(), u.layout).cpu())
    return final, acts_out
