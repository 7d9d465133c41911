"""``audit``: from a model and units to a report, one finished unit at a time.

For each unit: its feature visualizations (FVs, generated in batches across units or reused
from a ``visualize`` run), its top natural exemplars, the path-similarity sanity check along its
block path (:mod:`fvsanity.compare.path`) and, optionally, the overlap of its FV and natural
circuits (:mod:`fvsanity.compare.circuits`). Outputs in ``out``:

``units/<id>/``      one folder per finished unit (``unit.json``, FV and exemplar PNGs, the
                     layer-profile figure, ``tensors.safetensors``), renamed into place when the
                     unit is complete: a crash or Ctrl-C never leaves half a unit
``run.json``         the run's settings and their hashes, written first: a rerun with the same
                     ``out`` resumes (finished units are skipped) and refuses different settings
``natural_pass.safetensors``  pooled activations of every natural image (computed once; keyed by
                     model fingerprint, images and layers, not by the units, so audits of other
                     units of the same model and images reuse it; written under
                     ``natural_pass.lock``, so processes sharing ``out`` compute it once)
``plan.json``        the units of the last run, in order (what ``audit --merge`` orders by)
``audit.json``       every number, the settings, seeds, package versions, the FV-settings hash
``report.html``      self-contained report (:mod:`fvsanity.report.html`)
``table.md``, ``table.tex``   the per-unit sanity table (:mod:`fvsanity.report.tables`)

The run flows one way: :func:`prepare_audit` (units resolved once into Units, images loaded,
``out`` checked) -> :func:`audit_natural_pass` (one :class:`~fvsanity.compare.pipeline.NaturalPass`
for all units) -> :func:`audit_units` / :func:`audit_unit` (per unit, handed the Units and the
pass) -> :func:`finalize` (the registered report writers, :mod:`fvsanity.report.writers`).

Sharded (``torchrun``, :mod:`fvsanity.distributed`): every rank prepares the same plan (rank 0
first: it writes run.json), rank 0 computes the natural pass and the others read it after a
barrier, each rank audits its share of the units into the shared ``out`` (a unit's working
folder ``units/.<id>~<host>~<pid>~*`` is renamed into place when complete, and only folders of
dead processes of the same host are ever removed), and rank 0 merges every unit into the report
after the last one is done. :func:`merge_audit` (``audit --merge OUT``) does that merge alone.

Public API: :class:`AuditSettings`, :func:`run_audit` -> :class:`AuditResult`, the four steps
above, :func:`merge_audit`, :func:`load_audit`, :func:`select_units`, :func:`unit_id`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checking import CheckSettings, unit_circuits
from .errors import FVSanityError, SettingError
from .settings import setting

__all__ = [
    "AuditSettings",
    "AuditResult",
    "FORMAT",
    "run_audit",
    "merge_audit",
    "load_audit",
    "finalize",
    "prepare_audit",
    "audit_natural_pass",
    "audit_units",
    "audit_unit",
    "AuditPlan",
    "AuditContext",
    "select_units",
    "unit_id",
    "fv_settings",
    "MixedRunError",
    "min_holm_p",
    "design_notes",
]

FORMAT = "fvsanity-audit/1"
#: shown in the report: thumbnails of this many top natural exemplars per unit
N_EXEMPLARS_SHOWN = 6


class MixedRunError(FVSanityError):
    """``--out`` holds an audit made with different settings."""


# ------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class AuditSettings(CheckSettings):
    """Everything that determines an audit's numbers (besides the model and the images): a
    check's settings (:class:`~fvsanity.checking.CheckSettings`: ``seed``, ``seeds``, ``render``,
    ``path``, ``circuits``) and how the FVs are batched or where they come from.

    Attributes:
        fv_batch_units: units optimized together in one render call (no effect on the numbers).
        fv_source: a ``visualize`` output folder whose FVs are reused instead of generating.

    ``AuditSettings.of(steps=64, seeds=5, top_k=3)`` sets fields by plain name; :meth:`to_json`
    is the flat record in ``run.json`` (read back by :func:`merge_audit`).
    """

    fv_batch_units: int = setting(8, flag="--fv-batch", bounds=(1, None), help="units optimized together per batch")
    fv_source: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.path.layers is not None:
            raise SettingError("layers", "is not an audit setting: an audit compares each unit along its own block "
                               "path (use `fvsanity check --layers`)")

    def to_json(self) -> dict:
        from .settings import flat_json

        return flat_json(self)

    def path_settings(self):
        """The per-unit :class:`~fvsanity.compare.path.PathCheckSettings` of this audit (the paired
        design across units is computed in :func:`finalize`, from every unit's means)."""
        import dataclasses

        per_unit, _ = self.design()
        return dataclasses.replace(self.path, metric=per_unit, paired_metrics=())

    @property
    def paired_metrics(self) -> tuple[str, ...]:
        """The paired-design metrics across units (:meth:`~fvsanity.checking.CheckSettings.design`)."""
        return self.design()[1]


def fv_settings(cfg: AuditSettings, lm) -> dict:
    """The settings that determine the FVs (hashed with the generator's ``settings_hash``); the
    compute dtype only when not float32 (bf16 autocast, automatic on this device)."""
    from .generate import dtype_settings
    from .generate.render import fv_batch_width

    hw = list(lm.input_size) if cfg.render.size is None else [cfg.render.size, cfg.render.size]
    return {
        "model": lm.name,
        "model_fingerprint": lm.fingerprint(),  # other weights: another run, never a resumed one
        "steps": cfg.render.steps,
        "size": hw,
        "lr": cfg.render.lr,
        "param": cfg.render.param,
        "transforms": cfg.render.transforms,
        "diversity": cfg.render.diversity,
        "seeds": cfg.fv_seeds,  # resolved (automatic seeds are refused here until resolved for the units)
        **dtype_settings(None, lm.device),
        "fv_batch": fv_batch_width(None, lm.device),  # the compute width: it changes the FVs' last bits
    }


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def unit_id(unit) -> str:
    """A file-system-safe id for a unit: ``classifier.1:7`` -> ``classifier.1_c7``."""
    s = str(unit)
    return s.replace(":", "_c").replace("@", "_at").replace(",", "_").replace("/", "-")


def select_units(lm, units: Sequence[str] | str | None = None, layer: str | None = None, sample: int | None = None, seed: int = 0) -> list:
    """Parse ``units`` (specs) or draw ``sample`` distinct channels of ``layer`` (seeded).

    Raises:
        FVSanityError: neither or both given, an unknown layer, or a sample larger than the layer.
    """
    from .units import parse_units, resolve_layer

    if units and layer:
        raise FVSanityError("give either --units or --layer/--sample, not both")
    if units:
        return parse_units(units, lm)
    if not layer:
        raise FVSanityError("no units: pass --units LAYER:CHANNEL,... or --layer LAYER --sample N")
    layer = resolve_layer(lm.model, layer)
    n_ch = lm.layer_info(layer).layout.channels  # D for a token layer, not the token count
    n = n_ch if sample is None else int(sample)
    if not 1 <= n <= n_ch:
        raise FVSanityError(f"--sample {n} out of range for {layer!r}: valid 1..{n_ch}")
    g = torch.Generator().manual_seed(int(seed))
    chans = sorted(torch.randperm(n_ch, generator=g)[:n].tolist())
    return parse_units([f"{layer}:{c}" for c in chans], lm)


# ------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class AuditResult:
    """What :func:`run_audit` returns: the audit dict (as in audit.json) and where it lives.

    Attributes:
        out: the output folder.
        audit: the audit.json content.
        computed: ids of the units computed in this call (the others were resumed from disk).
        report, table_md, table_tex, json_path: the written files.
    """

    out: Path
    audit: dict
    computed: tuple[str, ...]
    report: Path
    table_md: Path
    table_tex: Path
    json_path: Path

    def to_json(self) -> dict:
        return self.audit


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _unit_seed(seed: int, unit) -> int:
    """:func:`fvsanity.compare.path.unit_seed` (from the unit's name)."""
    from .compare.path import unit_seed

    return unit_seed(seed, unit)


def _thumb(img: torch.Tensor, max_side: int = 160) -> torch.Tensor:
    """Downscale [3,H,W] so its longer side is <= max_side (keeps small images as they are)."""
    h, w = img.shape[-2:]
    if max(h, w) <= max_side:
        return img
    s = max_side / max(h, w)
    return torch.nn.functional.interpolate(
        img[None], size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear", antialias=True, align_corners=False
    )[0].clamp(0, 1)


# ------------------------------------------------------------------------------ run state
def min_holm_p(n_fv: int, n_other: int, n_layers: int, n_perm: int, exact_limit: int = 200_000) -> float:
    """Smallest Holm-adjusted p the per-layer permutation test can reach.

    The test (:mod:`fvsanity.compare.path`) is exact over all C(S + n, S) relabellings of S FVs
    and n other images when there are at most ``exact_limit`` of them (smallest p = 1 / C), else
    Monte Carlo with ``n_perm`` draws (smallest p = 1 / (n_perm + 1)); Holm multiplies the
    smallest p by the number of layers.
    """
    import math

    c = math.comb(n_fv + n_other, n_fv)
    p = 1.0 / c if c <= max(n_perm, exact_limit) else 1.0 / (n_perm + 1)  # stats.permutation_test's rule
    return min(1.0, n_layers * p)


def design_notes(n_fv: int, n_layers: int, alpha: float = 0.05) -> list[str]:
    """What the verdict cannot claim with ``n_fv`` FV seeds per unit and paths of up to
    ``n_layers`` layers (:mod:`fvsanity.compare.verdict`: sign-flip tests over the seeds, smallest
    attainable p 2^-S; "diverges" Holm over the layers), in the verdict's wording; [] when both
    claims are reachable."""
    from .compare.verdict import (
        DIVERGES,
        INCONCLUSIVE,
        REASON_FLOOR,
        SEEDS,
        attainable_p,
        replicates_needed,
    )

    notes = []
    f_nat = attainable_p(n_fv, correction="fixed-sequence")
    f_div = attainable_p(n_fv, n_layers=max(1, n_layers), correction="holm")
    if f_nat > alpha:
        need = replicates_needed(alpha, correction="fixed-sequence")
        notes.append(f"with {n_fv} FV seed(s) per unit every layer is {INCONCLUSIVE}: "
                     + REASON_FLOOR.format(need=need, what=SEEDS, floor=f_nat, alpha=alpha) + "; raise --seeds")
    elif f_div > alpha:
        need = replicates_needed(alpha, n_layers=max(1, n_layers), correction="holm")
        notes.append(f"with {n_fv} FV seed(s) per unit and up to {n_layers} layers the claim {DIVERGES!r} is out "
                     "of reach: " + REASON_FLOOR.format(need=need, what=SEEDS, floor=f_div, alpha=alpha)
                     + f"; such layers read {INCONCLUSIVE!r}")
    return notes


def _check_run(out: Path, run: dict) -> None:
    """Write ``run.json`` or refuse if ``out`` holds a run with other settings."""
    from .io import atomic_write_json

    p = out / "run.json"
    if p.is_file():
        try:
            old = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old is not None:
            if old.get("fv_settings_hash") != run["fv_settings_hash"]:
                diff = sorted(k for k in set(old.get("fv_settings", {})) | set(run["fv_settings"])
                              if old.get("fv_settings", {}).get(k) != run["fv_settings"].get(k))
                hint = ""
                if "dtype" in diff:  # float32 FVs record no dtype; bf16 ones record "bfloat16"
                    was = old.get("fv_settings", {}).get("dtype", "float32")
                    hint = f" (its FVs are {was}: FVSANITY_AMP={'off' if was == 'float32' else 'on'} resumes it)"
                raise MixedRunError(
                    f"--out {str(out)!r} holds an audit with other FV settings (hash {old.get('fv_settings_hash')} "
                    f"!= {run['fv_settings_hash']}; differ: {', '.join(diff) or '?'}){hint}; use a new --out or the "
                    "same settings"
                )
            if old.get("run_hash") != run["run_hash"]:
                diff = sorted(k for k in set(old.get("check_settings", {})) | set(run["check_settings"])
                              if old.get("check_settings", {}).get(k) != run["check_settings"].get(k))
                if old.get("model") != run["model"]:
                    diff.insert(0, "model")
                if old.get("images") != run["images"]:
                    raise MixedRunError(
                        f"--out {str(out)!r} holds an audit of other images (the image set at "
                        f"{run['images'].get('root')} differs from the one it started with: files, content or labels "
                        "changed); its numbers cannot be reused: use a new --out, or restore the images to resume"
                    )
                raise MixedRunError(
                    f"--out {str(out)!r} holds an audit with other settings (differ: {', '.join(diff) or '?'}); "
                    "use a new --out or the same settings"
                )
            return
    atomic_write_json(p, run)


def audit_natural_pass(lm, natural, layers, units, cfg: AuditSettings, out: Path, device=None, progress: bool = False):
    """The audit's one natural-image pass (a :class:`~fvsanity.compare.pipeline.NaturalPass`).

    Reused from ``out/natural_pass.safetensors`` only if it was made for this model fingerprint,
    image set (paths, sizes, mtimes), layers and pooling (:func:`fvsanity.cache.natural_pass_key`;
    no unit list, so audits of other units of the same model and images share it).
    """
    from .compare.pipeline import natural_pass

    return natural_pass(lm, natural, layers, units, batch_size=cfg.path.batch_size, device=device, progress=progress,
                        cache_dir=out)


_natural_pass = audit_natural_pass  # deprecated private name


# ------------------------------------------------------------------------------ one unit
@dataclass
class AuditContext:
    """What every unit step of one :func:`run_audit` call reads (built once, handed down).

    Attributes:
        lm, units (resolved Units), cfg, natural (NaturalImages), natural_pass (the one
        :class:`~fvsanity.compare.pipeline.NaturalPass` for all units), out, run (run.json),
        device, circuit_fn, fv_seeds; fv_seconds_per_unit is updated per FV batch.
    """

    lm: object
    units: list
    cfg: AuditSettings
    natural: object
    natural_pass: object
    out: Path
    run: dict
    device: object
    circuit_fn: Callable
    fv_seeds: list
    fv_seconds_per_unit: float = 0.0

    def __getitem__(self, key: str):  # the dict this used to be
        return getattr(self, key)


def audit_unit(ctx: AuditContext, i: int, fv_images: torch.Tensor, fv_final: torch.Tensor) -> dict:
    """Compute and atomically write unit ``i`` of ``ctx.units``; returns its record.

    ``fv_images`` [S, 3, H, W] its FVs, ``fv_final`` [S] their final objective values. Reads the
    natural images' activations from ``ctx.natural_pass`` (no forward pass over them) and runs
    the FVs through the model once (for the path check and the paired-design means alike).
    """
    from safetensors.torch import save_file

    from .compare.path import fv_activations, path_check, split_halves
    from .io import atomic_write_json, save_png
    from .report.path_figure import plot_path_similarity

    t0 = time.perf_counter()
    lm, u, cfg, natural = ctx.lm, ctx.units[i], ctx.cfg, ctx.natural
    nat = ctx.natural_pass.for_units([u])
    nat_acts = nat.acts
    uid = unit_id(u)
    final_dir = ctx.out / "units" / uid
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(uid), dir=ctx.out / "units"))
    try:
        seed_u = _unit_seed(cfg.seed, u)
        path = lm.path_to(u.layer)
        fv_acts = fv_activations(lm, fv_images[None], path, cfg.path.batch_size, ctx.device)  # [1, S, C] per layer
        # the base seed: path_check seeds the unit from its name, exactly as `fvsanity check` does
        check = path_check(lm, [u], fv_images[None], natural, cfg.path_settings(), natural_pass=nat, fv_acts=fv_acts)
        up = check.units[0]
        path_json = up.to_json()
        fv_seeds = ctx.fv_seeds
        fv_files = []
        for j, s in enumerate(fv_seeds):
            name = f"fv_seed{s}.png"
            save_png(tmp / name, fv_images[j])
            fv_files.append(name)
        top_i = list(up.top_k_indices)
        shown = top_i[:N_EXEMPLARS_SHOWN]
        ex_files = []
        if shown:
            ex = natural.decode(shown)
            for k, img in enumerate(ex):
                name = f"exemplar{k}.png"
                save_png(tmp / name, _thumb(img))
                ex_files.append(name)
        # the layer-profile figure, from this unit's numbers alone
        metric = cfg.path_settings().metric
        fig_dict = {"model": lm.name, "units": [path_json], "settings": {"metric": metric}}
        plot_path_similarity(fig_dict, tmp / "profile.png", mode="panels", title=f"layer profile ({metric} of pooled activations)")

        # means for the paired design across units (computed in finalize)
        refs = torch.tensor(up.natural_indices, dtype=torch.long)
        tensors = {"fv_images": fv_images.contiguous(), "fv_final": fv_final.contiguous()}
        h1, h2 = split_halves(refs, cfg.seed, u)  # as path_check's paired design
        for name in up_layers(up):
            tensors[f"fv_mean:{name}"] = fv_acts[name][0].mean(0).contiguous()
            tensors[f"nat_mean:{name}"] = nat_acts[name][refs].mean(0).contiguous()
            if h1.numel() and h2.numel():
                tensors[f"half1:{name}"] = nat_acts[name][h1].mean(0).contiguous()
                tensors[f"half2:{name}"] = nat_acts[name][h2].mean(0).contiguous()
        save_file(tensors, str(tmp / "tensors.safetensors"))

        circuit = None
        if cfg.circuits.circuits:
            try:
                circuit = ctx.circuit_fn(lm, u, fv_images, natural, up, tmp, cfg, seed_u)
            except FVSanityError as e:  # e.g. all edge scores zero: a finding for this unit, not a crash
                circuit = {"error": str(e)}

        r = nat.responses[:, 0]
        record = {
            "unit": str(u),
            "id": uid,
            "layer": u.layer,
            "channel": u.channel,
            "kind": u.kind,
            "class_name": up.class_name,
            "fv": {
                "seeds": list(fv_seeds),
                "final_objective": [float(v) for v in fv_final],
                "images": [f"units/{uid}/{f}" for f in fv_files],
            },
            "natural_response": {
                "max": float(r.max()),
                "mean": float(r.mean()),
                "std": float(r.std()) if r.numel() > 1 else 0.0,
                "fv_over_max": float(fv_final.mean() / r.max()) if float(r.max()) > 0 else None,
            },
            "exemplars": {
                "indices": top_i,
                "values": [float(v) for v in up.top_k_values],
                "paths": [natural.paths[j] for j in top_i] if natural.paths else [],
                "images": [f"units/{uid}/{f}" for f in ex_files],
            },
            "path": path_json,
            "status": up.status,
            "verdict": path_json["verdict"],
            "activation_range": path_json["activation_range"],
            "circuit": circuit,
            "figures": {
                "profile": f"units/{uid}/profile.png",
                "circuit": f"units/{uid}/circuit.png" if (tmp / "circuit.png").is_file() else None,
                "circuit_profile": (
                    f"units/{uid}/circuit_profile.png" if (tmp / "circuit_profile.png").is_file() else None
                ),
            },
            "seconds": round(time.perf_counter() - t0 + ctx.fv_seconds_per_unit, 3),
            "finished_at": _now(),
            "run_hash": ctx.run["run_hash"],
            "fv_settings_hash": ctx.run["fv_settings_hash"],
        }
        atomic_write_json(tmp / "unit.json", record)
        if final_dir.exists():  # a stale unit (other settings): moved aside in one rename, then removed
            old = Path(tempfile.mkdtemp(prefix=_tmp_prefix(uid), dir=ctx.out / "units"))
            os.replace(final_dir, old / "old")
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final_dir)  # the done-marker: unit.json appears with every other file, at once
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return record


_unit_step = audit_unit  # deprecated private name


def up_layers(up) -> list[str]:
    return [r.name for r in up.layers]


def _default_circuit_fn(lm, u, fv_images, natural, up, folder: Path, cfg: AuditSettings, seed: int):
    """FV vs natural circuit overlap, exactly as ``fvsanity check --circuits`` computes it
    (:func:`fvsanity.checking.unit_circuits`: the same references, seeds and statistics), plus
    ``circuit.png`` (attribution graph, FV vs natural) and ``circuit_profile.png`` (overlap per
    layer against the nulls) in ``folder``. Returns the overlap's JSON dict."""
    from .report.attribution_graph import plot_attribution_graph, plot_overlap_profile

    res, out = unit_circuits(lm, u, fv_images, natural, up, cfg)
    plot_attribution_graph(res.fv, res.natural, path=folder / "circuit.png",
                           suptitle=f"{u}: top edges, FV vs natural circuit ({res.method})")
    plot_overlap_profile(res, path=folder / "circuit_profile.png", title=f"{u}: circuit overlap per layer")
    return out


# ------------------------------------------------------------------------------ the run
def _load_units_done(out: Path, run_hash: str) -> dict[str, dict]:
    done = {}
    d = out / "units"
    if not d.is_dir():
        return done
    for p in sorted(d.iterdir()):
        f = p / "unit.json"
        if p.name.startswith(".") or not f.is_file():
            continue
        try:
            rec = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if rec.get("run_hash") == run_hash:
            done[rec["id"]] = rec
    return done


def _host() -> str:
    import socket

    return "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname()) or "host"


def _tmp_prefix(uid: str) -> str:
    """``.<uid>~<host>~<pid>~``: a unit's working folder names the process that owns it."""
    return f".{uid}~{_host()}~{os.getpid()}~"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


def _clean_stale_tmp(out: Path) -> list[str]:
    """Remove unfinished unit folders (``units/.<uid>~<host>~<pid>~*``) whose owner is dead: a
    process of THIS host that no longer runs (or an old-style name without an owner). Folders of
    live processes and of other hosts are never touched, so shards sharing ``out`` (torchrun ranks
    or separate jobs) cannot delete each other's work. Returns the names removed."""
    d = out / "units"
    gone = []
    if not d.is_dir():
        return gone
    host = _host()
    for p in d.iterdir():
        if not (p.name.startswith(".") and p.is_dir()):
            continue
        parts = p.name.rsplit("~", 3)
        if len(parts) == 4:
            if parts[1] != host or not parts[2].isdigit():
                continue  # another host's (or unparsable): not ours to judge
            pid = int(parts[2])
            if pid == os.getpid() or _pid_alive(pid):
                continue
        shutil.rmtree(p, ignore_errors=True)
        gone.append(p.name)
    return gone


@dataclass(frozen=True)
class AuditPlan:
    """What :func:`prepare_audit` decided before any forward pass (handed down to the later steps).

    Attributes:
        lm: the model (on ``device``); units: the resolved Units; ids: their folder ids.
        natural: the NaturalImages; out: the output folder; cfg: the settings; device.
        run: the run.json record (hashes of the settings); fv_settings: what the FVs are made
            with (``seeds`` among them); fv_given: FVs from ``cfg.fv_source`` or None.
        done: records of units already finished in ``out``; todo: indices of the units to compute.
        notes: warnings for the report (e.g. a design that cannot reach ``alpha``).
    """

    lm: object
    units: list
    ids: list
    natural: object
    out: Path
    cfg: AuditSettings
    device: object
    run: dict
    fv_settings: dict
    fv_given: object
    done: dict
    todo: list
    notes: list


def prepare_audit(
    lm, units, images, out, cfg: AuditSettings | None = None, *, device=None, image_options: dict | None = None,
    log: Callable[[str], None] | None = None, write_plan: bool = True,
) -> AuditPlan:
    """Select and prepare: resolve the units (once), load the images, check ``out`` (resume or
    refuse other settings), find the finished units, write ``plan.json`` (the units in order, read
    by ``audit --merge``; ``write_plan=False`` on ranks other than 0). No forward pass over the
    natural images. Arguments as :func:`run_audit`."""
    from .cache import image_set_identity
    from .compare.pipeline import resolve_units
    from .data import NaturalImages, load_images
    from .generate import settings_hash
    from .io import ensure_writable_dir

    cfg = cfg or AuditSettings()
    cfg.design()  # the metrics refused before any forward pass
    say = log or (lambda m: print(f"fvsanity: {m}", file=sys.stderr, flush=True))
    out = ensure_writable_dir(out)
    dev = torch.device(device) if device is not None else lm.device
    if dev != lm.device:
        lm.to(dev)
    units = resolve_units(units, lm)
    if not units:
        raise FVSanityError("no units to audit")
    ids = [unit_id(u) for u in units]
    if len(set(ids)) != len(ids):
        dup = next(x for x in ids if ids.count(x) > 1)
        raise FVSanityError(f"unit {dup!r} given twice")

    cfg = cfg.resolved(lm, units)  # automatic seeds: enough for both claims on these units' paths
    # FVs from an earlier `visualize` run?
    fv_given = None
    fvs = fv_settings(cfg, lm)
    if cfg.fv_source:
        from .cache import check_fv_model
        from .generate.saved import load_fvs

        _, fv_given = load_fvs(cfg.fv_source, units, lm)
        if not hasattr(fv_given, "settings"):
            raise FVSanityError(f"--fv {cfg.fv_source!r} must be a `fvsanity visualize` output (fv.pt + fv.json)")
        check_fv_model(fv_given, lm, str(cfg.fv_source))  # made for these weights, or refused
        fvs = dict(fv_given.settings) | {"model": lm.name, "seeds": list(fv_given.seeds), "source": str(cfg.fv_source)}
        fvs.pop("seconds", None)
    fv_hash = settings_hash(fvs)

    natural = images if isinstance(images, NaturalImages) else load_images(images, lm, **(image_options or {}))
    # what changes the comparison's numbers (the FVs' settings are hashed apart, in fv_settings)
    check_settings = {**{k: v for k, v in cfg.path.to_json().items() if k not in ("batch_size", "seed", "layers")},
                      **asdict(cfg.circuits), "seed": cfg.seed}
    run = {
        "format": FORMAT,
        "model": lm.provenance(),
        # by content (file bytes, labels, decoding size): pictures replaced under the same names
        # are another image set, refused on resume, never reused
        "images": {"root": str(getattr(natural, "root", None)), "n": len(natural), **image_set_identity(natural)},
        "fv_settings": fvs,
        "fv_settings_hash": fv_hash,
        "check_settings": check_settings,
    }
    run["run_hash"] = _hash({k: run[k] for k in ("model", "images", "fv_settings", "check_settings")})
    run["config"] = cfg.to_json()  # not hashed: what `audit --merge` finalizes with
    run["natural"] = natural.to_json() if hasattr(natural, "to_json") else run["images"]
    _check_run(out, run)
    (out / "units").mkdir(exist_ok=True)
    _clean_stale_tmp(out)

    n_fv = len(fvs["seeds"])
    n_lay = max(len(lm.path_to(u.layer)) for u in units)
    notes = design_notes(n_fv, n_lay, cfg.path.alpha)
    for n in notes:
        say("warning: " + n)
    done = _load_units_done(out, run["run_hash"])
    done = {k: v for k, v in done.items() if k in set(ids)}
    todo = [i for i, uid in enumerate(ids) if uid not in done]
    if write_plan:
        from .io import atomic_write_json

        atomic_write_json(out / "plan.json", {"run_hash": run["run_hash"], "ids": ids, "notes": notes})
    if done:
        say(f"resuming in {out}: {len(ids) - len(todo)} of {len(ids)} units already finished")
    return AuditPlan(lm, units, ids, natural, out, cfg, dev, run, fvs, fv_given, done, todo, notes)


def _test_exit_hook(shard, n_done: int) -> None:
    """Tests only: ``FVSANITY_TEST_EXIT_AFTER=RANK:N`` ends rank RANK abruptly (``os._exit``, no
    cleanup, as a kill would) after its N-th finished unit."""
    spec = os.environ.get("FVSANITY_TEST_EXIT_AFTER")
    if not spec:
        return
    rank, _, n = spec.partition(":")
    if int(rank) == shard.rank and n_done >= int(n):
        sys.stderr.flush()
        os._exit(17)


def audit_units(
    plan: AuditPlan, nat_pass, *, progress: bool = True, circuit_fn: Callable | None = None,
    render_fn: Callable | None = None, shard=None,
) -> list[str]:
    """The per-unit steps: FVs in batches of ``cfg.fv_batch_units`` units (rendered, or taken from
    ``plan.fv_given``), then :func:`audit_unit` for each; fills ``plan.done``. Returns the ids
    computed (in order). ``nat_pass``: the run's :class:`~fvsanity.compare.pipeline.NaturalPass`.
    ``shard``: a :class:`~fvsanity.distributed.Shard`; this process does only its share of
    ``plan.todo`` (``shard.split``; every unit's numbers are independent of who computes it)."""
    from .distributed import SINGLE
    from .generate import render

    shard = shard or SINGLE
    todo = shard.split(plan.todo)

    cfg, units = plan.cfg, plan.units
    ctx = AuditContext(
        lm=plan.lm, units=units, cfg=cfg, natural=plan.natural, natural_pass=nat_pass, out=plan.out, run=plan.run,
        device=plan.device, circuit_fn=circuit_fn or _default_circuit_fn, fv_seeds=plan.fv_settings["seeds"],
    )
    computed: list[str] = []
    bar = None
    if progress:
        from .progress import progress_bar

        total, initial = (len(todo), 0) if shard.active else (len(plan.ids), len(plan.ids) - len(plan.todo))
        bar = progress_bar(total=total, initial=initial, unit="unit",
                   desc=f"audit units ({shard.tag()})" if shard.active else "audit units")
    try:
        step = max(1, cfg.fv_batch_units)
        for s in range(0, len(todo), step):
            chunk = todo[s : s + step]
            t0 = time.perf_counter()
            if plan.fv_given is not None:
                imgs = plan.fv_given.images[chunk]
                final = plan.fv_given.final[chunk]
            else:
                res = (render_fn or render)(
                    plan.lm, [units[i] for i in chunk], seeds=plan.fv_settings["seeds"], **cfg.render_kwargs(),
                    device=plan.device, progress=progress,
                )
                imgs, final = res.images, res.final
            ctx.fv_seconds_per_unit = (time.perf_counter() - t0) / len(chunk)
            for k, i in enumerate(chunk):
                rec = audit_unit(ctx, i, imgs[k], final[k])
                plan.done[rec["id"]] = rec
                computed.append(rec["id"])
                if bar is not None:
                    bar.update(1)
                _test_exit_hook(shard, len(computed))
    finally:
        if bar is not None:
            bar.close()
    return computed


def run_audit(
    lm,
    units,
    images,
    out: str | os.PathLike,
    cfg: AuditSettings | None = None,
    *,
    device=None,
    progress: bool = True,
    image_options: dict | None = None,
    circuit_fn: Callable | None = None,
    render_fn: Callable | None = None,
    log: Callable[[str], None] | None = None,
    shard=None,
) -> AuditResult:
    """Audit ``units`` of ``lm`` against the natural images in ``images``; write to ``out``.

    Four steps, each a public function: :func:`prepare_audit` (units resolved once, images,
    resume), :func:`audit_natural_pass` (every natural image through the model once),
    :func:`audit_units` (per unit: FVs, path check, figures, atomically written) and
    :func:`finalize` (audit.json, tables, report).

    Args:
        lm: a :class:`~fvsanity.models.LoadedModel`.
        units: Unit objects or spec strings (see :func:`select_units`).
        images: an image folder (see :func:`fvsanity.data.load_images`) or a NaturalImages.
        out: output folder (created; resumed if it holds a run with the same settings).
        cfg: :class:`AuditSettings` (default settings if None).
        device: where to run (default: the model's device).
        progress: tqdm bars on stderr.
        image_options: extra keyword arguments for ``load_images`` (``max_per_class``, ``limit``,
            ``layout``, ``labels``).
        circuit_fn, render_fn: replace the circuit comparison / FV generator (tests).
        log: one-line status messages (default: stderr).
        shard: a :class:`~fvsanity.distributed.Shard` (under torchrun, from
            :func:`fvsanity.distributed.sharded`): every rank calls this with the same arguments;
            rank 0 writes run.json and the natural pass, each rank audits its share of the units
            into the shared ``out``, and rank 0 merges every unit into one report (the same
            files as one process writes). None: one process.

    Returns:
        :class:`AuditResult`. Finished units are on disk even if the call is interrupted.
    """
    from .compare.path import order_layers
    from .distributed import SINGLE
    from .io import provenance

    shard = shard or SINGLE
    t_start = time.perf_counter()

    def prepare(write: bool) -> AuditPlan:
        return prepare_audit(lm, units, images, out, cfg, device=device, image_options=image_options,
                             log=log if write else (log or (lambda m: None)), write_plan=write)

    # rank 0 writes run.json / plan.json and removes its host's dead leftovers first; the others
    # then read and check the same files (every rank ends with the same plan and the same todo)
    plan = prepare(True) if shard.is_main else None
    shard.barrier()
    if plan is None:
        plan = prepare(False)
    computed: list[str] = []
    if plan.todo:
        union = order_layers(lm, [n for u in plan.units for n in lm.path_to(u.layer)])

        def nat():
            return audit_natural_pass(lm, plan.natural, union, plan.units, plan.cfg, plan.out, plan.device,
                                      progress and shard.is_main)

        # the natural pass once: rank 0 computes and caches it, the others read the cache
        nat_pass = nat() if shard.is_main else None
        shard.barrier()
        if nat_pass is None:
            nat_pass = nat()
        computed = audit_units(plan, nat_pass, progress=progress, circuit_fn=circuit_fn, render_fn=render_fn,
                               shard=shard)
    out = plan.out
    paths = (out / "report.html", out / "table.md", out / "table.tex", out / "audit.json")
    if shard.active:
        computed = [x for part in shard.all_gather(computed) for x in part]  # also waits for every rank
        if not shard.is_main:
            shard.barrier()  # rank 0 writes the report
            return AuditResult(out, load_audit(out), tuple(computed), *paths)
        plan.done.update(_load_units_done(out, plan.run["run_hash"]))
        missing = [x for x in plan.ids if x not in plan.done]
        if missing:
            raise FVSanityError(f"units not finished by any rank: {', '.join(missing)}; run again to resume")
    wall = time.perf_counter() - t_start
    try:
        calls = _record_call(plan.out, wall, computed)
        audit = finalize(plan.out, [plan.done[x] for x in plan.ids], plan.run, plan.cfg, plan.natural, provenance(),
                         wall, computed, notes=plan.notes, calls=calls)
    finally:
        if shard.active:
            shard.barrier()
    return AuditResult(out, audit, tuple(computed), *paths)


def _record_call(out: Path, wall_s: float, computed: Sequence[str]) -> list[dict]:
    """Append this call to ``out/calls.json`` (the history of runs into ``out``); returns it."""
    from .io import atomic_write_json

    p = out / "calls.json"
    try:
        calls = json.loads(p.read_text()) if p.is_file() else []
    except (OSError, json.JSONDecodeError):
        calls = []
    calls.append({"finished_at": _now(), "wall_s_run": round(wall_s, 3), "units_computed": len(computed)})
    atomic_write_json(p, calls)
    return calls


def _paired(out: Path, records: list[dict], cfg: AuditSettings) -> dict:
    """The paired design across units (CKA/RSA per common layer), from the per-unit tensors."""
    from .compare.path import paired_similarity
    from .io import load_tensors

    if len(records) < 4 or not cfg.paired_metrics:
        return {}
    records = sorted(records, key=lambda r: r["unit"])  # rows in unit-name order, as path_check
    tens = [load_tensors(out / "units" / r["id"] / "tensors.safetensors") for r in records]
    layer_lists = [[x["name"] for x in r["path"]["layers"]] for r in records]
    common = [n for n in layer_lists[0] if all(n in ls for ls in layer_lists)]
    common = [n for n in common if len({t[f"fv_mean:{n}"].numel() for t in tens}) == 1]
    if not common:
        return {}
    fv_means = {n: torch.stack([t[f"fv_mean:{n}"] for t in tens]) for n in common}
    nat_means = {n: torch.stack([t[f"nat_mean:{n}"] for t in tens]) for n in common}
    halves = None
    if all(f"half1:{n}" in t for t in tens for n in common):
        halves = (
            {n: torch.stack([t[f"half1:{n}"] for t in tens]) for n in common},
            {n: torch.stack([t[f"half2:{n}"] for t in tens]) for n in common},
        )
    res = {}
    for pm in cfg.paired_metrics:
        try:
            res[pm] = [p.to_json() for p in paired_similarity(
                fv_means, nat_means, halves, common, metric=pm, n_perm=cfg.path.n_perm, seed=cfg.seed)]
        except FVSanityError as e:
            res[pm] = {"error": str(e)}
    return res


def _across_units(records: list[dict], alpha: float) -> list[dict]:
    """The verdict per layer with units as replicates (:func:`fvsanity.compare.path.across_units`)."""
    from types import SimpleNamespace as NS

    from .compare.path import across_units

    def num(v):
        return float("nan") if v is None else float(v)

    if len(records) < 2:
        return []
    units = [
        NS(layers=[NS(name=x["name"], fv_vs_natural=num(x["fv_vs_natural"]), natural_vs_other=num(x["natural_vs_other"]),
                      normalized=num(x["normalized"]))
                   for x in r["path"]["layers"]],
           verdict=NS(status=r["path"].get("status", "ok")))  # insufficient units are left out
        for r in records
    ]
    return [a.to_json() for a in across_units(units, alpha)]


def _summary(records: list[dict]) -> dict:
    from .compare.verdict import OUTCOMES
    from .report.tables import layer_counts

    n = len(records)
    short = sum(1 for r in records if r["verdict"].get("status", "ok") != "ok")  # too few references
    per_layer = layer_counts(records)
    return {
        "n_units": n,
        "n_insufficient": short,
        "units": {o: sum(1 for r in records if r["verdict"].get("outcome") == o) for o in OUTCOMES},
        "n_unit_layers": sum(r["verdict"]["n_layers"] for r in records),
        "unit_layers": {o: sum(c[o] for c in per_layer.values()) for o in OUTCOMES},
        "layers": per_layer,
    }


def finalize(
    out: Path, records: list[dict], run: dict, cfg: AuditSettings, natural, prov: dict, wall_s: float,
    computed: Sequence[str] = (), notes: Sequence[str] = (), calls: Sequence[dict] = (),
) -> dict:
    """Write audit.json, table.md, table.tex, report.html (and every other writer registered for
    the ``"audit"`` document, :mod:`fvsanity.report.writers`) from the finished units."""
    from .report.writers import write_outputs

    audit = {
        "format": FORMAT,
        "model": run["model"],
        "images": natural.to_json() if hasattr(natural, "to_json") else run.get("natural", run["images"]),
        "settings": cfg.to_json(),
        "fv_settings": run["fv_settings"],
        "fv_settings_hash": run["fv_settings_hash"],
        "run_hash": run["run_hash"],
        "seeds": {"seed": cfg.seed, "fv_seeds": run["fv_settings"]["seeds"]},
        "summary": _summary(records),
        "paired": _paired(out, records, cfg),
        "across_units": _across_units(records, cfg.path.alpha),
        "units": records,
        "timing": {
            "wall_s_run": round(wall_s, 3),  # run_audit start -> last unit done (no model load, no report)
            "units_computed_this_call": list(computed),
            "unit_seconds_total": round(sum(r.get("seconds", 0.0) for r in records), 3),
            "calls": list(calls),
            "wall_s_all_calls": round(sum(c["wall_s_run"] for c in calls), 3) if calls else round(wall_s, 3),
        },
        "notes": list(notes),
        "provenance": prov,
        "written_at": _now(),
    }
    if len(records) >= 2:
        from .report.path_figure import plot_path_similarity

        fig = {"model": run["model"]["name"], "units": [r["path"] for r in records],
               "settings": {"metric": cfg.path.metric}, "across_units": audit["across_units"]}
        plot_path_similarity(fig, out / "path_similarity.png", mode="mean")
        audit["figures"] = {"path_similarity": "path_similarity.png"}
    write_outputs(audit, out, "audit")  # audit.json, table.md, table.tex, report.html, and any registered
    return audit


def _config_from_run(run: dict) -> AuditSettings:
    """The :class:`AuditSettings` a run.json was written with (its flat ``config``; for a
    run.json of an older version, rebuilt from the hashed FV and check settings)."""
    from .settings import flat_paths

    d = run.get("config")
    if not isinstance(d, dict):
        fvs = run.get("fv_settings", {})
        d = dict(run.get("check_settings", {}))
        seeds = fvs.get("seeds") or [0]
        d.update({k: fvs[k] for k in ("steps", "lr", "param", "transforms", "diversity") if k in fvs})
        d["seeds"] = len(seeds)
        d["fv_source"] = fvs.get("source")
    names = flat_paths(AuditSettings())
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names and k not in ("device", "progress")}
    return AuditSettings.of(**d)


def merge_audit(out: str | os.PathLike, log: Callable[[str], None] | None = None) -> AuditResult:
    """Merge every finished unit in ``out`` into ``audit.json``, the tables and the report.

    For folders written by shards (torchrun ranks, or separate jobs whose ``units/`` folders were
    copied together): the same files a one-process run of those units writes (units in the order
    of the last run's ``plan.json``, then any others by name). Nothing is computed; no model is
    loaded.

    Raises:
        FVSanityError: no run.json or no finished unit in ``out``.
        MixedRunError: a unit made with other settings or another model fingerprint than the
            run.json (one line naming the unit).
    """
    from .io import provenance

    out = Path(out)
    say = log or (lambda m: print(f"fvsanity: {m}", file=sys.stderr, flush=True))
    try:
        run = json.loads((out / "run.json").read_text())
    except FileNotFoundError:
        raise FVSanityError(f"--merge {str(out)!r}: no run.json there (not an audit output folder)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise FVSanityError(f"--merge {str(out)!r}: run.json unreadable ({e})") from None
    recs: dict[str, dict] = {}
    d = out / "units"
    for p in sorted(d.iterdir()) if d.is_dir() else ():
        f = p / "unit.json"
        if p.name.startswith(".") or not f.is_file():
            continue
        try:
            rec = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise FVSanityError(f"--merge {str(out)!r}: {f} unreadable ({e})") from None
        if rec.get("fv_settings_hash") != run.get("fv_settings_hash"):
            raise MixedRunError(
                f"--merge {str(out)!r}: unit {rec.get('unit', p.name)!r} has FVs made with other settings or another "
                f"model fingerprint (FV settings hash {rec.get('fv_settings_hash')} != {run.get('fv_settings_hash')} "
                "of run.json); merge only units of one run")
        if rec.get("run_hash") != run.get("run_hash"):
            raise MixedRunError(
                f"--merge {str(out)!r}: unit {rec.get('unit', p.name)!r} was audited with other settings, model or "
                f"images (run hash {rec.get('run_hash')} != {run.get('run_hash')} of run.json); merge only units of one run")
        recs[rec["id"]] = rec
    if not recs:
        raise FVSanityError(f"--merge {str(out)!r}: no finished unit under {str(d)!r}")
    try:
        plan = json.loads((out / "plan.json").read_text())
    except (OSError, json.JSONDecodeError):
        plan = {}
    planned = [x for x in plan.get("ids", []) if x in recs] if plan.get("run_hash") == run.get("run_hash") else []
    unfinished = [x for x in plan.get("ids", []) if x not in recs] if planned else []
    if unfinished:
        say(f"warning: {len(unfinished)} unit(s) of the last run are not finished ({', '.join(unfinished[:5])}"
            f"{', ...' if len(unfinished) > 5 else ''}); rerun the same command to finish them")
    order = planned + sorted((x for x in recs if x not in set(planned)), key=lambda x: recs[x]["unit"])
    records = [recs[x] for x in order]
    cfg = _config_from_run(run)
    if planned and len(planned) == len(records) and isinstance(plan.get("notes"), list):
        notes = plan["notes"]  # the notes the run itself gave
    else:
        n_lay = max(len(r["path"]["layers"]) for r in records)
        notes = design_notes(len(run["fv_settings"]["seeds"]), n_lay, cfg.path.alpha)
    try:
        calls = json.loads((out / "calls.json").read_text())
    except (OSError, json.JSONDecodeError):
        calls = []
    wall = round(sum(c.get("wall_s_run", 0.0) for c in calls), 3)
    audit = finalize(out, records, run, cfg, None, provenance(), wall, (), notes=notes, calls=calls)
    return AuditResult(out, audit, (), out / "report.html", out / "table.md", out / "table.tex", out / "audit.json")


def load_audit(out: str | os.PathLike) -> dict:
    """Read ``out/audit.json``."""
    p = Path(out) / "audit.json"
    if not p.is_file():
        raise FVSanityError(f"no audit.json in {str(out)!r}; run `fvsanity audit --out {out}` first")
    return json.loads(p.read_text())
