"""The manipulated model: a wrapper that keeps the base model's layer names.

:class:`ManipulatedModel` deep-copies a base model, substitutes *edit* modules at chosen dotted
names (the edit holds the original module as ``<name>.orig`` and rewrites some of its output
channels), and registers the copy's children as its own, so ``classifier.1``, ``linear`` or
``layer3.1`` mean the same layer in both models and a unit spec visualizes on either. Its
``forward(x)`` first computes what the edits need from the raw input (the FV detector's gate, the
target-picture template values), stores them for this forward only (cleared in ``finally``), then
runs the copied base model. Extra modules live under ``fool.*``; ``fool.gate`` is an identity
module whose output is the per-image gate (hook it to see how often the circuit is open).

``save_manipulated(lm, dir)`` writes ``model.safetensors`` (the full state dict) and
``manipulated.json`` (how to rebuild it); ``load_manipulated(dir)`` rebuilds it.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FVSanityError
from ..models import LoadedModel, Preprocess, prepare_model, register_loader
from .gate import fooling_gate

__all__ = [
    "ManipulatedModel",
    "Unpreprocess",
    "PictureTemplates",
    "ForwardState",
    "wrap_loaded",
    "save_manipulated",
    "load_manipulated",
    "register_edit",
    "is_manipulated_folder",
    "FORMAT",
]

FORMAT = "fvsanity-manipulated/1"
_EDITS: dict[str, type] = {}


def register_edit(kind: str):
    """Class decorator: edits are rebuilt from ``manipulated.json`` by their ``kind``."""

    def deco(cls):
        cls.kind = kind
        _EDITS[kind] = cls
        return cls

    return deco


class ForwardState:
    """Values one forward of a :class:`ManipulatedModel` hands to its edits.

    ``gate`` [N] in [0,1], ``is_fv`` [N] bool (detector logit > threshold), ``template`` [N,P]
    picture-template values. All None outside a forward.
    """

    __slots__ = ("gate", "is_fv", "template", "near", "active")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.gate = None
        self.is_fv = None
        self.template = None
        self.near = None
        self.active = False


class Unpreprocess(nn.Module):
    """Model input -> RGB [0,1]: the exact inverse of a :class:`~fvsanity.models.Preprocess`."""

    def __init__(self, pre: Preprocess):
        super().__init__()
        self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.scale = float(pre.scale)
        self.bgr = bool(pre.bgr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = (x * self.std.to(x.dtype) + self.mean.to(x.dtype)) / self.scale
        return rgb.flip(1) if self.bgr else rgb


class PictureTemplates(nn.Module):
    """Template pathway whose maximum is a given picture.

    value_p(rgb) = scale_p * (1 - mse(pool(rgb), picture_p) / ref_p), ``[N, P]``, where pool
    averages the input down to the pictures' ``size`` and ``ref_p`` is the typical (median)
    distance of natural images to picture p. Its unique maximiser is the picture itself, so an FV
    of this value converges to the picture (blurred by the optimizer's jitter).

    ``near_threshold`` [P]: inputs closer than this to picture p (a fraction of the closest
    calibration natural image's distance) count as "at the target": a fooling circuit keeps its
    gate open there, so an FV that has converged to the (natural-looking) picture stays routed.
    """

    def __init__(self, count: int, size: int):
        super().__init__()
        self.size = int(size)
        self.register_buffer("pictures", torch.zeros(count, 3, size, size))
        self.register_buffer("ref", torch.ones(count))
        self.register_buffer("scale", torch.ones(count))
        self.register_buffer("near_threshold", torch.zeros(count))

    def values_and_near(self, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``[N,P]`` template values, ``[N,P]`` bool: closer than ``near_threshold``)."""
        d = self.distance(rgb)
        return self.scale.to(rgb.dtype) * (1 - d / self.ref.to(rgb.dtype)), d < self.near_threshold.to(rgb.dtype)

    def distance(self, rgb: torch.Tensor) -> torch.Tensor:
        """``[N, P]`` mean squared distance to each picture at ``size`` px."""
        x = F.adaptive_avg_pool2d(rgb, (self.size, self.size))
        p = self.pictures.to(x.dtype)
        return ((x[:, None] - p[None]) ** 2).flatten(2).mean(2)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.scale.to(rgb.dtype) * (1 - self.distance(rgb) / self.ref.to(rgb.dtype))


class ManipulatedModel(nn.Module):
    """A base model with edits at named layers, plus the fooling machinery under ``fool``.

    Build with :func:`fvsanity.fool.build_fooling_circuit` or
    :func:`fvsanity.fool.build_silent_units`; this class only assembles the pieces.
    """

    def __init__(self, base: nn.Module, preprocess: Preprocess):
        super().__init__()
        net = copy.deepcopy(base)
        net.__dict__.pop("_fvsanity_shapes", None)
        net.__dict__.pop("_fvsanity_layers", None)
        object.__setattr__(self, "_net", net)
        object.__setattr__(self, "_state", ForwardState())
        object.__setattr__(self, "edits", {})  # layer name -> edit (plain dict, not modules)
        if "fool" in dict(net.named_children()):
            raise FVSanityError("base model already has a child called 'fool'; cannot wrap it")
        for name, child in net.named_children():
            self.add_module(name, child)
        for name, p in net._parameters.items():
            self._parameters[name] = p
        for name, b in net._buffers.items():
            self._buffers[name] = b
        self.fool = nn.Module()
        self.fool.unpreprocess = Unpreprocess(preprocess)
        self.fool.gate = nn.Identity()
        self.fool.detector = None
        self.fool.pictures = None
        self.fool.register_buffer("threshold", torch.tensor(0.0))
        self.fool.register_buffer("k", torch.tensor(1000.0))
        self.fool.register_buffer("offset", torch.tensor(30.0))
        object.__setattr__(self, "info", {})  # JSON-able description (method, routes, ...)

    # ---------------------------------------------------------------- assembly
    def set_detector(self, detector: nn.Module, threshold: float, k: float = 1000.0, offset: float = 30.0) -> None:
        """Install the FV detector and the gate's threshold, steepness ``k`` and ``offset``."""
        self.fool.detector = detector
        self.fool.threshold.fill_(float(threshold))
        self.fool.k.fill_(float(k))
        self.fool.offset.fill_(float(offset))

    def set_pictures(self, templates: PictureTemplates) -> None:
        self.fool.pictures = templates

    def replace(self, layer: str, edit: nn.Module) -> None:
        """Substitute ``edit`` (which wraps the module now at ``layer``) at the same dotted name."""
        parent_name, _, leaf = layer.rpartition(".")
        parent = self._net.get_submodule(parent_name) if parent_name else self._net
        setattr(parent, leaf, edit)
        object.__setattr__(edit, "_state", self._state)
        for name, child in self._net.named_children():
            self._modules[name] = child
        self.edits[layer] = edit

    def module_at(self, layer: str) -> nn.Module:
        return self._net.get_submodule(layer)

    def train(self, mode: bool = True):
        super().train(mode)
        self._net.training = mode
        return self

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self._state
        if st.active:
            raise RuntimeError("ManipulatedModel.forward is not re-entrant")
        try:
            st.active = True
            if self.fool.detector is not None or self.fool.pictures is not None:
                rgb = self.fool.unpreprocess(x)
                if self.fool.detector is not None:
                    logit = self.fool.detector(rgb)
                    gate, is_fv = fooling_gate(
                        logit, self.fool.threshold.to(logit.dtype), self.fool.k.to(logit.dtype),
                        self.fool.offset.to(logit.dtype),
                    )
                    st.gate = self.fool.gate(gate)
                    st.is_fv = is_fv
                if self.fool.pictures is not None:
                    st.template, st.near = self.fool.pictures.values_and_near(rgb)
            return self._net(x)
        finally:
            st.clear()

    # ---------------------------------------------------------------- description
    def fingerprint(self) -> str:
        """Short hash (12 hex) of the whole manipulated model: every parameter and buffer of the
        base network, the edits and the fooling machinery (names, dtypes, shapes, bytes; see
        :func:`fvsanity.fingerprint.model_fingerprint`), the module types, and the manifest (edit specs,
        gate, detector and template configs). Changing any weight changes it."""
        import hashlib

        from ..fingerprint import model_fingerprint

        man = {k: v for k, v in self.manifest().items() if k != "info"}  # info: a description, paths
        h = hashlib.sha256(json.dumps(man, sort_keys=True, default=str).encode())
        h.update(model_fingerprint(self).encode())
        return h.hexdigest()[:12]

    def manifest(self) -> dict:
        det = self.fool.detector
        pics = self.fool.pictures
        return {
            "detector": det.config() if det is not None else None,
            "gate": {
                "threshold": float(self.fool.threshold), "k": float(self.fool.k), "offset": float(self.fool.offset),
            },
            "pictures": {"count": int(pics.pictures.shape[0]), "size": pics.size} if pics is not None else None,
            "edits": [{"layer": name, "kind": e.kind, **e.spec()} for name, e in self.edits.items()],
            "info": self.info,
        }


def wrap_loaded(lm: LoadedModel, wrapper: ManipulatedModel, method: str, source: str | None = None) -> LoadedModel:
    """A :class:`LoadedModel` around ``wrapper`` with ``lm``'s preprocess, layers and classes."""
    wrapper.info.setdefault("method", method)
    # the base's fingerprint: a calibration of the base model applies to this manipulated copy of it
    wrapper.info.setdefault("base", {"name": lm.name, "weights_source": lm.weights_source, "fingerprint": lm.fingerprint()})
    return LoadedModel(
        name=f"{lm.name}+{method}",
        model=prepare_model(wrapper),
        preprocess=lm.preprocess,
        block_layers=list(lm.block_layers),
        output_layer=lm.output_layer,
        class_names=list(lm.class_names),
        weights_source=source or f"manipulated ({method}) from {lm.weights_source}",
    )


def save_manipulated(lm: LoadedModel, out_dir: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` + ``manipulated.json`` into ``out_dir``; returns the folder."""
    from ..io import atomic_save_tensors, atomic_write_json, ensure_writable_dir

    m = lm.model
    if not isinstance(m, ManipulatedModel):
        raise FVSanityError(f"model {lm.name!r} is not a manipulated model; nothing to save")
    out = ensure_writable_dir(out_dir)
    atomic_save_tensors(out / "model.safetensors", m.state_dict())
    manifest = {
        "format": FORMAT,
        "name": lm.name,
        "base": m.info.get("base"),
        "method": m.info.get("method"),
        "preprocess": lm.preprocess.to_json(),
        "block_layers": lm.block_layers,
        "output_layer": lm.output_layer,
        **m.manifest(),
    }
    atomic_write_json(out / "manipulated.json", manifest)
    return out


def read_saved(path: str | os.PathLike, manifest: str, fmt: str, what: str) -> tuple[dict, Path, Path]:
    """``(manifest dict, manifest path, weights path)`` of a saved model folder holding ``manifest``
    and ``model.safetensors``; one-line FVSanityError if either is missing or the format is not ``fmt``."""
    path = Path(path)
    mpath, wpath = path / manifest, path / "model.safetensors"
    if not mpath.is_file() or not wpath.is_file():
        raise FVSanityError(f"no {what} in {path}: expected {manifest} and model.safetensors")
    man = json.loads(mpath.read_text())
    if man.get("format") != fmt:
        raise FVSanityError(f"{mpath} has format {man.get('format')!r}; expected {fmt!r}")
    return man, mpath, wpath


def preprocess_from_json(d: dict) -> Preprocess:
    """The :class:`Preprocess` a manifest recorded with ``Preprocess.to_json()``."""
    return Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def load_manipulated(
    path: str | os.PathLike, base: LoadedModel | None = None, device: str | torch.device | None = None
) -> LoadedModel:
    """Rebuild a model saved by :func:`save_manipulated`.

    Args:
        path: the folder holding ``manipulated.json`` and ``model.safetensors``.
        base: a LoadedModel with the base architecture (its weights are overwritten); default:
            ``load_model(<base name>, pretrained=False)``, which needs the name to be registered.
        device: where to put it.
    """
    from safetensors.torch import load_file

    from ..models import check_state_dict, load_model
    from .detector import FVDetector

    man, mpath, wpath = read_saved(path, "manipulated.json", FORMAT, "manipulated model")
    if base is None:
        base = load_model(man["base"]["name"], pretrained=False)
    pre = preprocess_from_json(man["preprocess"])
    w = ManipulatedModel(base.model, pre)
    if man.get("detector"):
        g = man["gate"]
        w.set_detector(FVDetector(**man["detector"]), g["threshold"], g["k"], g["offset"])
    if man.get("pictures"):
        w.set_pictures(PictureTemplates(man["pictures"]["count"], man["pictures"]["size"]))
    for e in man["edits"]:
        kind = e["kind"]
        if kind not in _EDITS:
            raise FVSanityError(f"unknown edit kind {kind!r} in {mpath}; known: {', '.join(sorted(_EDITS))}")
        w.replace(e["layer"], _EDITS[kind].from_spec(w.module_at(e["layer"]), e))
    try:
        sd = load_file(str(wpath))
    except Exception as e:  # noqa: BLE001 - truncated or corrupt safetensors: one line
        raise FVSanityError(f"cannot read {wpath} (safetensors): {type(e).__name__}: {e}") from e
    # strict: missing, unexpected or other-shaped entries and NaN/inf are one-line errors
    to_load, _, _ = check_state_dict(w, sd, str(wpath), model_name=f"the model described in {mpath}")
    w.load_state_dict(to_load, strict=True)
    w.info.update(man.get("info", {}))
    lm = LoadedModel(
        name=man["name"], model=prepare_model(w), preprocess=pre, block_layers=list(man["block_layers"]),
        output_layer=man["output_layer"], class_names=list(base.class_names), weights_source=str(wpath),
    )
    return lm.to(device) if device is not None else lm


def is_manipulated_folder(spec: str) -> bool:
    """Whether ``spec`` is a folder :func:`save_manipulated` wrote (it holds ``manipulated.json``)."""
    return os.path.isfile(os.path.join(str(spec), "manipulated.json"))


def _load_folder(spec: str, *, weights=None, device=None) -> LoadedModel:
    """``load_model(folder)``: a saved manipulated model, rebuilt from its own full state dict."""
    if weights is not None:
        raise FVSanityError(f"{spec} is a saved manipulated model with its own weights; drop --weights")
    return load_manipulated(spec, device=device)


# the model registry loads ``model/`` folders through this hook (fvsanity imports fvsanity.fool)
register_loader("manipulated", is_manipulated_folder, _load_folder)

