"""The result of :func:`fvsanity.generate.render`: :class:`FVResult` (images, traces, scores,
activations, settings; saved and loaded as safetensors + JSON) and :func:`settings_hash`, the
short hash of the settings that determine an FV."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import FVSanityError
from ..units import Unit

__all__ = ["FVResult", "settings_hash"]


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



def settings_hash(settings: dict) -> str:
    """Short hash of the settings that determine an FV (to refuse mixing different runs).

    ``amp`` is not hashed (an old bf16 flag); the effective compute ``dtype``, recorded only when
    not float32 (:func:`dtype_settings`), is."""
    keys = {k: v for k, v in settings.items() if k not in ("device", "progress", "amp", "weights_source", "seconds")}
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:12]
