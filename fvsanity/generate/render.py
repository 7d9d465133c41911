"""Batched FV optimization: many units x seeds in one batch, each element with its own objective.

Elements never interact (eval-mode model, per-element optimizer state, per-element random
transforms, per-element initial image), and every batch has one fixed shape (``batch_size``
elements, the last batch padded, :func:`plan_chunks`), so optimizing K units together gives bit
for bit the FVs of K separate runs with the same seeds.

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
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..errors import FVSanityError
from ..hooks import capture_until, run_partial
from ..layouts import pool, to_map
from ..settings import setting
from ..units import Unit, layer_names, parse_unit, resolve_layer
from . import param as P
from . import transforms as T
from .batching import FV_BATCH_CPU, FV_BATCH_CUDA, fv_batch_width, plan_chunks  # noqa: F401 - re-exported
from .fv_result import FVResult, _safe_name, settings_hash  # noqa: F401 - re-exported
from .objectives import OBJECTIVES, Objective, batched_unit_scores, diversity_penalty
from .optim import make_optimizer

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


def _optimizer_names():
    from .optim import OPTIMIZERS

    return OPTIMIZERS.names()


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
        batch_size: the FV compute width: every optimization batch holds exactly this many
            elements (the last batch padded, :func:`plan_chunks`), so an FV never depends on
            what else is rendered (default: 8 on the CPU, 32 on CUDA). It changes the
            floating-point result, so it is recorded and hashed.
        device: default: the model's device.
        amp: bf16 autocast + channels_last for the model's forward and backward (the image, the
            transforms and the optimizer stay float32). None (default): automatic, on for CUDA
            and on CPUs with native bf16 (:func:`cpu_bf16_fast`: AVX512-BF16, AMX, ARM bf16), off
            elsewhere; the ``FVSANITY_AMP`` environment variable (on/off/auto) overrides the
            automatic choice. bf16 FVs differ from float32 ones, so the settings record
            ``"dtype": "bfloat16"`` (hashed; float32 records nothing and hashes as before).
        progress: show a progress bar.
    """

    steps: int = setting(512, help="FV optimization steps")
    size: int | tuple[int, int] | None = setting(None, type=int, default_text="the model's input size",
                                                 help="FV side in px")
    lr: float = setting(0.05, help="learning rate")
    param: str | Callable = setting("fft", choices=lambda: list(P.PARAMS.names()),
                                    help="image parametrization (maco = phase only, fixed magnitude spectrum)")
    param_options: Mapping[str, Any] = setting(
        default_factory=dict, flag="--param-opt", parse="options",
        help="parametrization option, repeatable (e.g. decay_power=1.5; maco: magnitude=SPECTRUM.pt, contrast=1.5)")
    decorrelate: bool = True
    transforms: str | T.TransformSpec = setting(
        "standard", choices=("standard", "lucent", "none"),
        help="robustness transforms (standard = lucent's set scaled to the image size)")
    diversity: float = setting(0.0, help="diversity weight across a unit's seeds")
    optimizer: str | Callable = setting("adam", choices=lambda: list(_optimizer_names()), help="optimizer")
    optimizer_options: Mapping[str, Any] = setting(default_factory=dict, flag="--optimizer-opt", parse="options",
                                                   help="optimizer option, repeatable (e.g. momentum=0.5)")
    checkpoints: Sequence[int] = setting((), parse="ints",
                                         help="comma-separated steps at which to keep images too (e.g. 32,128)")
    batch_size: int | None = setting(None, type=int, flag="--fv-width", default_text="8 on CPU, 32 on CUDA",
                                     help="FV compute width: elements per optimization batch, fixed (changes the "
                                          "last bits, so recorded and hashed)")
    device: str | torch.device | None = None
    amp: bool | None = setting(None, type=bool, default_text="auto: on for CUDA and CPUs with native bf16, or "
                               "$FVSANITY_AMP=on|off",
                               help="bf16 autocast + channels_last for the model (FVs differ slightly from float32; "
                                    "recorded as dtype)")
    progress: bool = True

    MAX_STEPS = 1_000_000  # not fields (no annotation): the sane bounds __post_init__ enforces
    MAX_SIZE = 4096

    def __post_init__(self):
        """Refuse a bad value when the settings are made, before any work (one line each).

        Raises:
            SettingError: ``steps`` not in 1..MAX_STEPS, ``size`` not in 1..MAX_SIZE (or a pair
                of such), ``lr`` not finite > 0, ``diversity`` not finite >= 0, ``batch_size`` < 1,
                a checkpoint < 1, unknown ``transforms``, ``amp`` not None/True/False.
            FVSanityError: an unknown parametrization or optimizer, an option it does not take or
                of the wrong type, or an option value the optimizer itself refuses (e.g. SGD's
                ``momentum=-5``).
        """
        from ..errors import SettingError, check_number
        from . import optim

        check_number("steps", self.steps, integer=True, ge=1, le=self.MAX_STEPS)
        if self.size is not None:
            sides = list(self.size) if isinstance(self.size, (tuple, list)) else [self.size]
            if len(sides) not in (1, 2):
                raise SettingError("size", f"must be an integer or (H, W), got {self.size!r}")
            for s in sides:
                check_number("size", s, integer=True, ge=1, le=self.MAX_SIZE)
        check_number("lr", self.lr, gt=0)
        check_number("diversity", self.diversity, ge=0)
        if self.batch_size is not None:
            check_number("batch_size", self.batch_size, integer=True, ge=1)
        for c in self.checkpoints:
            check_number("checkpoints", c, integer=True, ge=1)
        if not isinstance(self.transforms, T.TransformSpec) and self.transforms not in (None, "standard", "lucent", "none"):
            raise FVSanityError(f"unknown transforms {self.transforms!r}; valid: standard, lucent, none "
                                "(or a TransformSpec)")
        if self.amp is not None and not isinstance(self.amp, bool):
            raise SettingError("amp", f"must be None (automatic), True or False, got {self.amp!r}")
        for name in ("param_options", "optimizer_options"):
            if not isinstance(getattr(self, name), Mapping):
                raise SettingError(name, f"must be a mapping of option names to values, got "
                                         f"{type(getattr(self, name)).__name__}")
        P.check_options(self.param, self.param_options)
        optim.check_options(self.optimizer, self.optimizer_options, lr=self.lr)

    def check_memory(self, n_elements: int, hw, available: int | None = None) -> int:
        """Bytes of memory a render of ``n_elements`` FVs (units x seeds) on an ``hw`` = (H, W)
        canvas needs at least, refused beyond ``available`` (default: this machine's available memory).

        Counted: the result's images and checkpoints [n, 3, H, W] and traces [n, steps] (float32),
        and one batch's parameters, gradients, optimizer state and transformed images (about 8
        canvases per element); the model's activations come on top.

        Raises:
            SettingError: (named ``size``) the estimate exceeds ``available``.
        """
        from ..errors import SettingError, check_number

        check_number("units x seeds", n_elements, integer=True, ge=1)
        h, w = int(hw[0]), int(hw[1])
        canvas = 3 * h * w * 4
        n_ckpt = len({int(c) for c in self.checkpoints if int(c) <= self.steps})
        batch = fv_batch_width(self.batch_size, self.device or "cpu")  # one batch of the fixed width
        need = n_elements * canvas * (1 + n_ckpt) + n_elements * self.steps * 4 + batch * canvas * 8
        available = self.available_memory() if available is None else available
        if available is not None and need > available:
            raise SettingError("size", f"{h}x{w} px is too large for {n_elements} FV(s) x {1 + n_ckpt} image(s) "
                                       f"each: about {need / 2**30:.1f} GiB of memory needed, {available / 2**30:.1f} "
                                       "GiB available; use a smaller size, fewer units x seeds or checkpoints")
        return need

    @staticmethod
    def available_memory() -> int | None:
        """Bytes of memory available now (``MemAvailable`` of /proc/meminfo, else free physical
        pages), or None when unknown."""
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            return None

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


def _settings_json(lm, st: RenderSettings, hw, spec, dev, use_amp: bool, width: int, objective_entry) -> dict:
    """What an :class:`FVResult` records (and :func:`settings_hash` keys) of how it was rendered."""
    settings_d = {
        "model": lm.name,
        "model_fingerprint": lm.fingerprint(),  # the weights these FVs are for (checked on --fv reuse)
        "weights_source": lm.weights_source,  # provenance only: not hashed (the fingerprint is)
        "steps": st.steps,
        "size": list(hw),
        "lr": st.lr,
        "param": _describe(st.param),
        "decorrelate": st.decorrelate,
        "transforms": spec.__dict__ | {"scales": list(spec.scales), "angles": list(spec.angles)},
        "diversity": st.diversity,
        "device": str(dev),
        "amp": use_amp,
        **dtype_settings(use_amp, dev),  # hashed; absent for float32
        "batch_size": width,  # hashed: the compute shape changes the floating-point result
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
    return settings_d


def _optimize_all(lm, plan: _Plan, chunks, units_p: Sequence[Unit], n_s: int, objs):
    """Every chunk optimized (:func:`_optimize_chunk`) and its elements put in place:
    ``(images [U, S, 3, H, W], traces [U, S, steps], final [U, S], acts rows, {step: images})``."""
    n_u = len(units_p)
    images = torch.zeros(n_u, n_s, 3, *plan.hw)
    traces = torch.zeros(n_u, n_s, plan.settings.steps)
    ckpts = {c: torch.zeros(n_u, n_s, 3, *plan.hw) for c in plan.checkpoints}

    final = torch.zeros(n_u, n_s)
    acts_rows: list[list[torch.Tensor | None]] = [[None] * n_s for _ in range(n_u)]

    bar = None
    if plan.settings.progress:
        from ..progress import progress_bar

        bar = progress_bar(total=plan.settings.steps * len(chunks), desc=f"FV {n_u}x{n_s}", unit="step", leave=False)
    try:
        for elems in chunks:
            chunk = _Chunk(
                units=[units_p[r] for r, _, _ in elems], seeds=[sd for _, sd, _ in elems],
                # a padding element (j None) is a group of its own: never in another's diversity term
                groups=[r if j is not None else -1 - k for k, (r, _, j) in enumerate(elems)],
                objectives=None if objs is None else [objs[r] for r, _, _ in elems],
            )
            res = _optimize_chunk(lm, plan, chunk, bar)
            _refuse_non_finite(res, chunk, elems, objs)
            for k, (row, _, j) in enumerate(elems):
                if j is None:
                    continue
                images[row, j] = res["images"][k]
                traces[row, j] = res["traces"][k]
                final[row, j] = res["final"][k]
                acts_rows[row][j] = res["acts"][k]
                for c in plan.checkpoints:
                    ckpts[c][row, j] = res["ckpts"][c][k]
    finally:
        if bar is not None:
            bar.close()
    return images, traces, final, acts_rows, ckpts


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
    steps, size, transforms = st.steps, st.size, st.transforms
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

    # Fixed compute shapes (see :func:`plan_chunks`): an FV depends on its unit, seed and settings only.
    width = fv_batch_width(st.batch_size, dev)
    chunks = plan_chunks(len(units_p), seeds_l, width, coupled=bool(st.diversity) and len(seeds_l) > 1)
    settings_d = _settings_json(lm, st, hw, spec, dev, use_amp, width, objective_entry)
    plan = _Plan(
        settings=st, hw=tuple(hw), spec=spec, device=dev, amp=use_amp, ref_hw=ref_hw, shapes=shapes,
        checkpoints=tuple(sorted({int(c) for c in st.checkpoints if 0 < int(c) <= steps})),
    )
    t0 = time.perf_counter()
    images, traces, final, acts_rows, ckpts = _optimize_all(lm, plan, chunks, units_p, len(seeds_l), objs)
    settings_d["seconds"] = round(time.perf_counter() - t0, 3)
    acts = [torch.stack(r) for r in acts_rows]
    return FVResult(images, traces, final, acts, units_p, seeds_l, settings_d, ckpts,
                    objectives=[] if objs is None else [o.name for o in objs])


class NonFiniteFVError(FVSanityError):
    """An FV (its objective, image or activations) became NaN or infinite during optimization."""


def _refuse_non_finite(res: dict, chunk: _Chunk, elems, objectives) -> None:
    """Raise :class:`NonFiniteFVError` naming the first requested element whose trace, image or
    final score is not finite: its unit (or objective), seed and the first bad step."""
    for k, (row, _, j) in enumerate(elems):
        if j is None:
            continue
        tr = res["traces"][k]
        bad_steps = (~torch.isfinite(tr)).nonzero()
        bad_final = not (torch.isfinite(res["images"][k]).all() and torch.isfinite(res["final"][k]).all())
        if len(bad_steps) or bad_final:
            what = f"objective {objectives[row].name}" if objectives is not None else f"unit {chunk.units[k]}"
            when = f"at step {int(bad_steps[0]) + 1} of {tr.numel()}" if len(bad_steps) else "in its final image"
            raise NonFiniteFVError(
                f"the FV of {what}, seed {chunk.seeds[k]}, became non-finite (NaN/inf) {when}; nothing was "
                "written: lower --lr or --diversity, or use float32 (FVSANITY_AMP=off)"
            )



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
        final_images = image_fn().float()
    final, pooled = _score_batch(lm, final_images, units, dev, objectives)
    return {"images": final_images.cpu(), "traces": traces.cpu(), "ckpts": ckpts, "final": final, "acts": pooled}


@torch.no_grad()
def _score_batch(lm, x: torch.Tensor, units: Sequence[Unit], device, objectives=None
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Objective [B] and, per element, the pooled activations [C_b] of its unit's layer, for
    untransformed images ``x`` [B, 3, H, W] (element b under ``units[b]`` or ``objectives[b]``)."""
    layers = sorted({u.layer for u in units} | {layer for o in objectives or () for layer in o.layers})
    with capture_until(lm.model, layers, detach=True) as store:
        run_partial(lm.model, lm.preprocess(x.to(device)), store)
        if objectives is None:
            final = batched_unit_scores(store, list(units)).float().cpu()
        else:
            final = _objective_scores(dict(store), list(objectives)).float().cpu()
        pooled = {u.layer: pool(store[u.layer].float(), u.layout or lm.layer_info(u.layer).layout).cpu() for u in units}
    return final, [pooled[u.layer][b] for b, u in enumerate(units)]


@torch.no_grad()
def score_images(
    lm, images: torch.Tensor, units: Sequence[Unit], device=None, objectives: Sequence[Objective] | None = None,
    width: int | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Objective and pooled unit-layer activations of untransformed images.

    Args:
        images: [U, S, 3, H, W] (image i is scored under ``units[i]``).
        objectives: optional, one per row: score row i under ``objectives[i]`` instead of its
            unit's own objective (the unit then only names the layer whose activations are pooled).
        width: images per forward pass (default: :func:`fv_batch_width` for the device). Every
            pass has exactly this many (the last padded by repeating an image), so an image's
            numbers never depend on how many share its row.
    Returns:
        final [U, S] objective values and, per unit, [S, C] mean-pooled activations of its layer
        (over space, or over patch tokens for a token layout).
    """
    dev = device or lm.device
    n_u, n_s = images.shape[:2]
    w = fv_batch_width(width, dev)
    final = torch.zeros(n_u, n_s)
    acts_out = []
    for i, u in enumerate(units):
        rows = []
        for start in range(0, n_s, w):
            x = images[i, start : start + w]
            n = x.shape[0]
            if n < w:
                x = torch.cat([x, x[-1:].expand(w - n, *x.shape[1:])])
            f, a = _score_batch(lm, x, [u] * w, dev, None if objectives is None else [objectives[i]] * w)
            final[i, start : start + n] = f[:n]
            rows.append(torch.stack(a[:n]))
        acts_out.append(torch.cat(rows))
    return final, acts_out


evaluate = score_images
"""Deprecated alias of :func:`score_images` (one name per concept: ``evaluate`` meant three things)."""
