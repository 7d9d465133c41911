"""Batched FV optimization: many units x seeds in one batch, each element with its own objective.

Elements never interact (eval-mode model, per-element optimizer state, per-element random
transforms, per-element initial image), so optimizing K units together gives the same FVs as K
separate runs with the same seeds, at the cost of one forward+backward of the batch per step.

The seams are plug-ins, each a registry: the parametrization (``param.PARAMS``: fft, pixel,
maco), the objective (``objectives.OBJECTIVES``, or any lucent-style ``Objective``), the
optimizer (``optim.OPTIMIZERS``: adam, adamw, nadam, sgd). :class:`RenderSettings` holds every
option; ``render(lm, units, seeds, settings, **overrides)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..errors import FVSanityError
from ..hooks import capture_until, run_partial
from ..layouts import pool, to_map
from ..units import Unit, layer_names, parse_unit, resolve_layer
from . import param as P
from . import transforms as T
from .objectives import OBJECTIVES, Objective, batched_unit_scores, diversity_penalty
from .optim import make_optimizer


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
        objectives: per row, the name of the objective it maximised when rendered with
            ``objective=...`` (empty: each row maximised its unit's own objective).
    """

    images: torch.Tensor
    traces: torch.Tensor
    final: torch.Tensor
    activations: list[torch.Tensor]
    units: list[Unit]
    seeds: list[int]
    settings: dict
    checkpoints: dict[int, torch.Tensor] = field(default_factory=dict)
    objectives: list[str] = field(default_factory=list)

    @property
    def settings_hash(self) -> str:
        return settings_hash(self.settings)

    def to_json(self) -> dict:
        d = {
            "units": [u.to_json() for u in self.units],
            "seeds": list(self.seeds),
            "settings": self.settings,
            "settings_hash": self.settings_hash,
            "final_objective": self.final.tolist(),
            "image_shape": list(self.images.shape),
            "checkpoint_steps": sorted(self.checkpoints),
        }
        if self.objectives:
            d["objectives"] = list(self.objectives)
        return d

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
                    name = f"objective{i}" if self.objectives and u.channel is None and u.direction is None else _safe_name(u)
                    save_png(out / f"{name}_seed{s}.png", self.images[i, j])
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
        return cls(t["images"], t["traces"], t["final"], acts, units, meta["seeds"], meta["settings"], ckpts,
                   objectives=list(meta.get("objectives", [])))


def _safe_name(u: Unit) -> str:
    return str(u).replace(":", "_c").replace("@", "_at").replace(",", "_").replace("/", "-")


AMP_ENV = "FVSANITY_AMP"
"""Environment variable overriding the automatic bf16 choice for every command: ``on`` | ``off`` | ``auto``."""


@functools.lru_cache(maxsize=1)
def cpu_bf16_fast() -> bool:
    """True when this CPU computes bf16 natively and oneDNN has bf16 kernels for it.

    Native: x86 ``avx512_bf16`` or AMX (``amx_bf16``) in ``/proc/cpuinfo``'s flags, or an ARM CPU
    with ``bf16`` in its features. oneDNN alone (``torch.ops.mkldnn._is_mkldnn_bf16_supported``)
    is not enough: it says yes on any AVX-512 CPU, where bf16 is emulated and no faster.
    """
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
    except (AttributeError, RuntimeError):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return False
    return native_bf16(text, platform.machine())


def native_bf16(cpuinfo: str, machine: str) -> bool:
    """Whether ``/proc/cpuinfo`` text lists native bf16: x86 ``avx512_bf16``/``amx_bf16`` flags, or
    ``bf16`` in an ARM CPU's features (``machine``: ``platform.machine()``)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    if machine.lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_amp(amp: bool | None, device) -> bool:
    """Whether a render on ``device`` runs the model in bf16 autocast (+ channels_last).

    ``amp`` True/False is the caller's choice; None (the default) is automatic: the
    ``FVSANITY_AMP`` environment variable if set (``on``/``off``/``auto``), else on for CUDA and on
    a CPU with native bf16 (:func:`cpu_bf16_fast`), off elsewhere.
    """
    if amp is not None:
        return bool(amp)
    env = os.environ.get(AMP_ENV, "auto").strip().lower() or "auto"
    choices = {"on": True, "1": True, "true": True, "off": False, "0": False, "false": False, "auto": None}
    if env not in choices:
        raise FVSanityError(f"{AMP_ENV}={os.environ[AMP_ENV]!r} is not valid; valid: on, off, auto")
    if choices[env] is not None:
        return choices[env]
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return dev.type == "cuda" or (dev.type == "cpu" and cpu_bf16_fast())


def dtype_settings(amp: bool | None, device) -> dict:
    """The settings entry for the compute dtype: ``{"dtype": "bfloat16"}`` when ``amp`` resolves to
    bf16 on ``device``, else ``{}``: float32 adds nothing, so float32 settings and their hashes
    stay what they were before the dtype was recorded, and bf16 FVs never hash like float32 ones."""
    return {"dtype": "bfloat16"} if resolve_amp(amp, device) else {}


def settings_hash(settings: dict) -> str:
    """Short hash of the settings that determine an FV (to refuse mixing different runs).

    ``amp`` is not hashed (an old bf16 flag); the effective compute ``dtype``, recorded only when
    not float32 (:func:`dtype_settings`), is."""
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


@dataclass(frozen=True)
class RenderSettings:
    """Everything that says HOW FVs are rendered (what: the units or objectives, and the seeds).

    Attributes:
        steps: optimization steps (paper/lucent default 512).
        size: image side in px, or (H, W) (default: the model's input size).
        lr: learning rate (0.05, lucent's default for Adam).
        param: a parametrization name in ``param.PARAMS`` ("fft" = Fourier, 1/f scaled, lucent's
            default; "pixel"; "maco" = phase only, fixed magnitude) or a parametrization function
            ``(size, seeds, device, *, decorrelate, **options) -> (params, image_fn)``.
        param_options: keyword options for the parametrization (e.g. ``{"decay_power": 1.5}``,
            maco's ``{"magnitude": tensor_or_file}``).
        decorrelate: colour decorrelation (lucent default True).
        transforms: "standard" (lucent's set scaled to ``size``), "lucent" (224-px magnitudes),
            "none", or a :class:`~fvsanity.generate.transforms.TransformSpec`.
        diversity: weight of lucent's diversity term across a unit's seeds (0 = off).
        optimizer: a name in ``optim.OPTIMIZERS`` ("adam", the default; "adamw", "nadam", "sgd")
            or a factory ``(params, lr, **options) -> torch.optim.Optimizer``.
        optimizer_options: keyword options for the optimizer (e.g. ``{"momentum": 0.5}``).
        checkpoints: steps after which to keep a copy of the images.
        batch_size: elements per optimization batch (default: all on CUDA, 64 on CPU).
        device: default: the model's device.
        amp: bf16 autocast + channels_last for the model's forward and backward (the image, the
            transforms and the optimizer stay float32). None (default): automatic, on for CUDA
            and on CPUs with native bf16 (:func:`cpu_bf16_fast`: AVX512-BF16, AMX, ARM bf16), off
            elsewhere; the ``FVSANITY_AMP`` environment variable (on/off/auto) overrides the
            automatic choice. bf16 FVs differ from float32 ones, so the settings record
            ``"dtype": "bfloat16"`` (hashed; float32 records nothing and hashes as before).
        progress: show a progress bar.
    """

    steps: int = 512
    size: int | tuple[int, int] | None = None
    lr: float = 0.05
    param: str | Callable = "fft"
    param_options: Mapping[str, Any] = field(default_factory=dict)
    decorrelate: bool = True
    transforms: str | T.TransformSpec = "standard"
    diversity: float = 0.0
    optimizer: str | Callable = "adam"
    optimizer_options: Mapping[str, Any] = field(default_factory=dict)
    checkpoints: Sequence[int] = ()
    batch_size: int | None = None
    device: str | torch.device | None = None
    amp: bool | None = None
    progress: bool = True

    def replace(self, **overrides) -> RenderSettings:
        """A copy with ``overrides`` applied; an unknown name is a one-line error naming the fields."""
        names = [f.name for f in fields(self)]
        bad = sorted(set(overrides) - set(names))
        if bad:
            raise FVSanityError(f"unknown render setting {bad[0]!r}; valid: {', '.join(names)}")
        return dataclasses.replace(self, **overrides)


def _describe(obj) -> str:
    """A JSON-able name for a registered name or a plug-in function."""
    if isinstance(obj, str):
        return obj
    mod, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", type(obj).__name__)
    return f"callable:{mod}.{name}" if mod else f"callable:{name}"


def _options_json(options: Mapping[str, Any]) -> dict:
    """Options as JSON for the settings (tensors by content digest, paths as strings)."""
    out = {}
    for k in sorted(options):
        v = options[k]
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            v = {"tensor_sha256": hashlib.sha256(str(t.dtype).encode() + str(list(t.shape)).encode()
                                                 + t.numpy().tobytes()).hexdigest()[:16], "shape": list(t.shape)}
        elif isinstance(v, Path):
            v = str(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


def _objective_label(o: Objective) -> Unit:
    """The row label of an FV rendered for a free-form objective: its first layer."""
    return Unit(layer=o.layers[0])


def _resolve_objectives(lm, units_l, objective, ref_hw_of) -> tuple[list[Unit], list[Objective] | None, Any]:
    """Rows of the render: (units, objectives or None for the units' own, settings entry)."""
    if objective is None:
        return [parse_unit(u, lm) for u in units_l], None, None
    if isinstance(objective, str):
        factory = OBJECTIVES.get(objective)
        if not units_l:
            raise FVSanityError(f"objective {objective!r} turns units into objectives; pass units too")
        units_p = [parse_unit(u, lm) for u in units_l]
        objs = [factory(u, ref_hw_of(u.layer)) for u in units_p]
        if not all(isinstance(o, Objective) for o in objs):
            raise FVSanityError(f"objective {objective!r} must turn each unit into an Objective")
        return units_p, objs, objective
    objs = [objective] if isinstance(objective, Objective) else list(objective) if isinstance(objective, (list, tuple)) else None
    if not objs or not all(isinstance(o, Objective) for o in objs):
        raise FVSanityError(f"objective must be an Objective, a list of them (one per row) or a name "
                            f"({', '.join(OBJECTIVES.names())}), got {type(objective).__name__}")
    names = set(layer_names(lm.model))
    for o in objs:
        for layer in o.layers:
            if layer not in names:
                canon = resolve_layer(lm.model, layer)  # unknown: UnitError naming the closest layers
                raise FVSanityError(f"objective {o.name} names layer {layer!r}; write it as {canon!r}")
    if units_l:
        if len(units_l) != len(objs):
            raise FVSanityError(f"{len(units_l)} units label {len(objs)} objectives; pass one unit per objective "
                                "(or no units)")
        units_p = [parse_unit(u, lm) for u in units_l]
    else:
        units_p = [_objective_label(o) for o in objs]
    return units_p, objs, [o.name for o in objs]


def check_canvas(lm, hw, flag: str = "--size") -> None:
    """Refuse an FV canvas ``hw`` (H, W) that a fixed-input-size model cannot take, naming ``flag``."""
    if lm.config.fixed_input_size and tuple(hw) != tuple(lm.input_size):
        raise FVSanityError(
            f"{lm.name} takes {lm.input_size[0]}x{lm.input_size[1]} px inputs only (fixed input size); "
            f"got {flag} {hw[0]}x{hw[1]}: drop {flag} or pass {lm.input_size[0]}"
        )


def render(
    lm,
    units: Sequence[Unit | str] | Unit | str | None = None,
    seeds: int | Sequence[int] = 1,
    settings: RenderSettings | None = None,
    *,
    objective: Objective | Sequence[Objective] | str | None = None,
    **overrides,
) -> FVResult:
    """Feature visualizations of ``units`` (or ``objective``s) x ``seeds``, optimized together in batches.

    Args:
        lm: a :class:`~fvsanity.models.LoadedModel`.
        units: unit specs (``"layer:c"``, ``"layer:c@y,x"``) or :class:`Unit`s (U of them).
        seeds: number of seeds (0..n-1) or explicit seeds (S of them).
        settings: a :class:`RenderSettings` (default: ``RenderSettings()``).
        objective: what each row maximises instead of its unit's own objective: an
            :class:`~fvsanity.generate.objectives.Objective` (lucent's algebra, e.g.
            ``channel("layer3.2", 5) - 0.1 * channel("layer3.2", 7)``; one row), a list of them
            (one row each; ``units``, if given, label the rows one to one), or a name in
            ``objectives.OBJECTIVES`` applied to each unit (``"channel"``, ``"neuron"``, ...).
        overrides: any :class:`RenderSettings` field by keyword (``steps=64, param="maco"``),
            applied on top of ``settings``: today's keyword calls keep working.

    Returns:
        :class:`FVResult` with images [U, S, 3, H, W]; deterministic on CPU for fixed seeds.
    """
    if settings is not None and not isinstance(settings, RenderSettings):
        raise FVSanityError(f"settings must be a RenderSettings (or None), got {type(settings).__name__}; "
                            "pass single options by keyword (steps=..., param=...)")
    st = (settings or RenderSettings()).replace(**overrides)
    steps, size, lr, transforms = st.steps, st.size, st.lr, st.transforms
    units_l = [] if units is None else [units] if isinstance(units, (str, Unit)) else list(units)
    if not units_l and objective is None:
        raise FVSanityError("no units to visualize; pass at least one LAYER:CHANNEL (or objective=...)")
    seeds_l = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seeds_l:
        raise FVSanityError("seeds must be >= 1")
    if steps < 1:
        raise FVSanityError(f"steps must be >= 1, got {steps}")
    hw = lm.input_size if size is None else ((size, size) if isinstance(size, int) else tuple(size))
    check_canvas(lm, hw, "--size")
    spec = _resolve_transforms(transforms, min(hw))
    dev = torch.device(st.device) if st.device is not None else lm.device
    if dev != lm.device:
        lm.to(dev)
    use_amp = resolve_amp(st.amp, dev)
    shapes = {n: i.shape for n, i in lm.layers.items()}

    def ref_hw_of(layer):
        info = lm.layers.get(layer)
        return tuple(info.layout.grid) if info is not None and info.layout.grid is not None else None

    units_p, objs, objective_entry = _resolve_objectives(lm, units_l, objective, ref_hw_of)
    ref_hw = {u.layer: ref_hw_of(u.layer) for u in units_p if ref_hw_of(u.layer) is not None}

    # One batch element per (unit, seed); chunk if needed (elements are independent, so exact).
    elems = [(i, j) for i in range(len(units_p)) for j in range(len(seeds_l))]
    bs = st.batch_size or (len(elems) if dev.type == "cuda" else 64)
    if st.diversity and len(seeds_l) > 1:
        bs = max(bs, len(seeds_l)) // len(seeds_l) * len(seeds_l)  # keep a unit's seeds together
    settings_d = {
        "model": lm.name,
        "model_fingerprint": lm.fingerprint(),  # the weights these FVs are for (checked on --fv reuse)
        "weights_source": lm.weights_source,  # provenance only: not hashed (the fingerprint is)
        "steps": steps,
        "size": list(hw),
        "lr": lr,
        "param": _describe(st.param),
        "decorrelate": st.decorrelate,
        "transforms": spec.__dict__ | {"scales": list(spec.scales), "angles": list(spec.angles)},
        "diversity": st.diversity,
        "device": str(dev),
        "amp": use_amp,
        **dtype_settings(use_amp, dev),  # hashed; absent for float32
        "batch_size": bs,
    }
    # Keys added after the first release enter only when not at their default, so the settings
    # (and settings_hash, which caches and --fv reuse key on) of a default render never change.
    if st.param_options:
        settings_d["param_options"] = _options_json(st.param_options)
    if _describe(st.optimizer) != "adam":
        settings_d["optimizer"] = _describe(st.optimizer)
    if st.optimizer_options:
        settings_d["optimizer_options"] = _options_json(st.optimizer_options)
    if objective_entry is not None:
        settings_d["objective"] = objective_entry
    plan = _Plan(
        settings=st, hw=tuple(hw), spec=spec, device=dev, amp=use_amp, ref_hw=ref_hw, shapes=shapes,
        checkpoints=tuple(sorted({int(c) for c in st.checkpoints if 0 < int(c) <= steps})),
    )
    n_u, n_s = len(units_p), len(seeds_l)
    images = torch.zeros(n_u, n_s, 3, *hw)
    traces = torch.zeros(n_u, n_s, steps)
    ckpts = {c: torch.zeros(n_u, n_s, 3, *hw) for c in plan.checkpoints}

    bar = None
    if st.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps * ((len(elems) + bs - 1) // bs), desc=f"FV {n_u}x{n_s}", unit="step", leave=False)
    t0 = time.perf_counter()
    try:
        for start in range(0, len(elems), bs):
            part = elems[start : start + bs]
            chunk = _Chunk(
                units=[units_p[i] for i, _ in part], seeds=[seeds_l[j] for _, j in part], groups=[i for i, _ in part],
                objectives=None if objs is None else [objs[i] for i, _ in part],
            )
            res = _optimize_chunk(lm, plan, chunk, bar)
            for k, (i, j) in enumerate(part):
                images[i, j] = res["images"][k]
                traces[i, j] = res["traces"][k]
                for c in plan.checkpoints:
                    ckpts[c][i, j] = res["ckpts"][c][k]
    finally:
        if bar is not None:
            bar.close()
    settings_d["seconds"] = round(time.perf_counter() - t0, 3)
    final, acts = score_images(lm, images, units_p, dev, objectives=objs)
    return FVResult(images, traces, final, acts, units_p, seeds_l, settings_d, ckpts,
                    objectives=[] if objs is None else [o.name for o in objs])


@dataclass(frozen=True)
class _Plan:
    """What ``render`` resolved once for all chunks (settings, canvas, transforms, device, shapes)."""

    settings: RenderSettings
    hw: tuple[int, int]
    spec: T.TransformSpec
    device: torch.device
    amp: bool
    ref_hw: dict
    shapes: dict
    checkpoints: tuple[int, ...]


@dataclass(frozen=True)
class _Chunk:
    """One optimization batch: element k visualizes ``units[k]`` (or ``objectives[k]``) from
    ``seeds[k]``; ``groups[k]`` is its row (a unit's seeds share the diversity term)."""

    units: list[Unit]
    seeds: list[int]
    groups: list[int]
    objectives: list[Objective] | None = None


def _objective_scores(acts: dict, objectives: Sequence[Objective]) -> torch.Tensor:
    """[B] score of element b under ITS OWN objective ``objectives[b]`` (one call per distinct objective)."""
    b = len(objectives)
    out = None
    by_obj: dict[int, list[int]] = {}
    for k, o in enumerate(objectives):
        by_obj.setdefault(id(o), []).append(k)
    for idx in by_obj.values():
        o = objectives[idx[0]]
        some = next(iter(acts.values()))
        ii = torch.tensor(idx, device=some.device)
        vals = o({layer: acts[layer][ii] for layer in o.layers})
        if not isinstance(vals, torch.Tensor) or vals.shape != (len(idx),):
            got = list(vals.shape) if isinstance(vals, torch.Tensor) else type(vals).__name__
            raise FVSanityError(f"objective {o.name} must return one score per batch element ([{len(idx)}]), got {got}")
        if out is None:
            out = torch.zeros(b, device=vals.device, dtype=vals.dtype)
        out = out.index_put((ii.to(vals.device),), vals.to(out.dtype))
    return out


def _optimize_chunk(lm, plan: _Plan, chunk: _Chunk, bar) -> dict:
    """Optimize one batch; returns {"images": [B,3,H,W], "traces": [B, steps], "ckpts": {step: [B,3,H,W]}}."""
    st, dev, use_amp, steps = plan.settings, plan.device, plan.amp, plan.settings.steps
    units, groups, objectives = chunk.units, chunk.groups, chunk.objectives
    model = lm.model
    params, image_fn = P.make_image(st.param, plan.hw, chunk.seeds, dev, decorrelate=st.decorrelate,
                                    options=st.param_options)
    opt = make_optimizer(st.optimizer, params, st.lr, st.optimizer_options)
    spec = plan.spec
    draws = T.draw_params(spec, chunk.seeds, steps).to(dev)
    if objectives is None:
        layers = sorted({u.layer for u in units})
    else:
        layers = sorted({layer for o in objectives for layer in o.layers})
    div_groups: list[tuple[str, list[int]]] = []
    if st.diversity:
        by_group: dict[int, list[int]] = {}
        for k, g in enumerate(groups):
            by_group.setdefault(g, []).append(k)
        for idx in by_group.values():
            if len(idx) > 1:
                div_groups.append((_diversity_layer(lm, units[idx[0]], plan.shapes), idx))
        layers = sorted(set(layers) | {layer for layer, _ in div_groups})
    traces = torch.zeros(len(units), steps, device=dev)  # on the device: no host sync per step (one copy at the end)
    ckpts = {}
    autocast = (
        torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
    )
    with capture_until(model, layers) as store:
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            img = image_fn()
            x = T.apply(img, spec, draws[:, step], out_size=plan.hw if lm.config.fixed_input_size else None)
            x = lm.preprocess(x)
            if use_amp:  # channels_last: faster with bf16 on CUDA and on CPU (oneDNN)
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                run_partial(model, x, store)
                acts = {k: v.float() for k, v in store.items()}
                if objectives is None:
                    scores = batched_unit_scores(acts, units, plan.ref_hw)
                else:
                    scores = _objective_scores(acts, objectives)
                loss = -scores.sum()
                for layer, idx in div_groups:
                    fmap = to_map(acts[layer][idx], lm.layer_info(layer).layout)
                    loss = loss + st.diversity * len(idx) * diversity_penalty(fmap)
            loss.backward()
            opt.step()
            traces[:, step] = scores.detach().float()
            if step + 1 in plan.checkpoints:
                with torch.no_grad():
                    ckpts[step + 1] = image_fn().float().cpu()
            if bar is not None:
                bar.update(1)
    with torch.no_grad():
        final_images = image_fn().float().cpu()
    return {"images": final_images, "traces": traces.cpu(), "ckpts": ckpts}


@torch.no_grad()
def score_images(
    lm, images: torch.Tensor, units: Sequence[Unit], device=None, objectives: Sequence[Objective] | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Objective and pooled unit-layer activations of untransformed images.

    Args:
        images: [U, S, 3, H, W] (image i is scored under ``units[i]``).
        objectives: optional, one per row: score row i under ``objectives[i]`` instead of its
            unit's own objective (the unit then only names the layer whose activations are pooled).
    Returns:
        final [U, S] objective values and, per unit, [S, C] mean-pooled activations of its layer
        (over space, or over patch tokens for a token layout).
    """
    dev = device or lm.device
    n_u, n_s = images.shape[:2]
    layers = sorted({u.layer for u in units} | {layer for o in objectives or () for layer in o.layers})
    final = torch.zeros(n_u, n_s)
    acts_out = []
    with capture_until(lm.model, layers, detach=True) as store:
        for i, u in enumerate(units):
            run_partial(lm.model, lm.preprocess(images[i].to(dev)), store)
            if objectives is None:
                final[i] = batched_unit_scores(store, [u] * n_s).float().cpu()
            else:
                final[i] = _objective_scores(dict(store), [objectives[i]] * n_s).float().cpu()
            acts_out.append(pool(store[u.layer].float(), u.layout or lm.layer_info(u.layer).layout).cpu())
    return final, acts_out


evaluate = score_images
"""Deprecated alias of :func:`score_images` (one name per concept: ``evaluate`` meant three things)."""
