"""Model registry and loading: ``load_model(spec)`` -> :class:`LoadedModel`.

Specs:
    ``cifar10-resnet20`` / ``cifar10-resnet56``  fvsanity's CIFAR ResNets, real weights
    ``imagenet-squeezenet``                      torchvision SqueezeNet 1.0, Deep Compression weights
    ``inceptionv1``                              lucent's InceptionV1 (GoogLeNet as in Lucid)
    ``googlenet``, ``resnet50``, ...             any torchvision classification model
    ``timm:convnext_tiny``                       any timm model
    ``toy-procedural``                           a small CNN fvsanity trains itself (offline fallback)

``weights=FILE`` always works offline (state dict via ``weights_only=True``, or safetensors).
"""

from __future__ import annotations

import difflib
import hashlib
import os
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._paths import cache_dir, find_data_file, searched_locations
from ..errors import FVSanityError, MissingWeightsError, UnknownModelError
from .preprocess import CAFFE_SQUEEZENET, CIFAR10, IMAGENET, LUCENT_INCEPTION, Preprocess
from .resnet_cifar import CifarResNet

__all__ = [
    "LoadedModel",
    "Preprocess",
    "load_model",
    "list_models",
    "register_model",
    "load_state_dict_file",
    "DEFAULT_MODEL",
]

DEFAULT_MODEL = "cifar10-resnet20"


@dataclass
class LoadedModel:
    """An eval-mode model with everything fvsanity needs to drive it.

    Attributes:
        name: the spec it was loaded from.
        model: the ``nn.Module`` (eval mode, no in-place activations, gradients off for params).
        preprocess: RGB [0,1] NCHW -> model input (differentiable).
        block_layers: hookable block outputs in forward order (the default comparison path).
        output_layer: the module whose output channels are the class units.
        class_names: one name per output class (may be empty).
        weights_source: where the weights came from ("random" if none were loaded).
    """

    name: str
    model: nn.Module
    preprocess: Preprocess
    block_layers: list[str]
    output_layer: str
    class_names: list[str] = field(default_factory=list)
    weights_source: str = "random"

    @property
    def input_size(self) -> tuple[int, int]:
        return self.preprocess.size

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        for b in self.model.buffers():  # parameter-free models (e.g. picture templates)
            return b.device
        return torch.device("cpu")

    def to(self, device: str | torch.device) -> LoadedModel:
        self.model.to(device)
        return self

    def fingerprint(self) -> str:
        """sha256 (64 hex) of every parameter, buffer and module type plus the preprocessing.

        Two loads of the same weights agree; any changed weight element differs. Keys every
        cache (:mod:`fvsanity.cache`); recomputed on each call (ms: one pass over the weights).
        """
        from ..cache import model_fingerprint

        return model_fingerprint(self.model, self.preprocess)

    def __call__(self, rgb: torch.Tensor) -> torch.Tensor:
        """Logits for RGB [0,1] images [N,3,H,W]."""
        return self.model(self.preprocess(rgb))

    def path_to(self, layer: str) -> list[str]:
        """Block outputs from the input up to and including ``layer`` (the comparison path)."""
        if layer in self.block_layers:
            return self.block_layers[: self.block_layers.index(layer) + 1]
        order = [n for n, _ in self.model.named_modules() if n]
        if layer not in order:
            return list(self.block_layers)
        pos = order.index(layer)
        path = [b for b in self.block_layers if b in order and order.index(b) < pos]
        return path + [layer]


_REGISTRY: dict[str, Callable[..., LoadedModel]] = {}


def register_model(name: str):
    """Decorator: ``fn(weights: str | None, pretrained: bool) -> LoadedModel`` under ``name``."""

    def deco(fn):
        _REGISTRY[name] = fn
        return fn

    return deco


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a glob ``pattern`` (torchvision/timm names load too)."""
    import fnmatch

    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def _prepare(model: nn.Module) -> nn.Module:
    model.eval()
    for m in model.modules():
        # In-place activations would rewrite tensors captured by hooks (a conv output read by an
        # objective would silently become post-ReLU); turn them off once, at load.
        if hasattr(m, "inplace") and isinstance(m.inplace, bool):
            m.inplace = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``weights_only=True``, never pickle).

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` and strips a ``module.`` prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
            raise MissingWeightsError(
                f"cannot read weights file {path} (torch.load weights_only=True): {type(e).__name__}"
            ) from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise MissingWeightsError(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> None:
    sd = load_state_dict_file(path)
    try:
        model.load_state_dict(sd, strict=strict)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise MissingWeightsError(f"weights in {path} do not fit this model: {first}") from e


def _download(url: str, dest: Path, sha256_prefix: str | None) -> Path:
    """Fetch ``url`` to ``dest`` atomically, checking the sha256 prefix. Raises on any failure."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    with urllib.request.urlopen(url, timeout=20) as r, open(tmp, "wb") as f:  # noqa: S310
        f.write(r.read())
    if sha256_prefix:
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        if not digest.startswith(sha256_prefix):
            tmp.unlink()
            raise MissingWeightsError(f"checksum mismatch for {url}: {digest[:8]} != {sha256_prefix}")
    os.replace(tmp, dest)
    return dest


def _find_or_fetch(relpath: str, url: str | None, sha: str | None, hint: str) -> Path:
    """Weights in $FVSANITY_DATA or the cache; else download to the cache; else a clear error."""
    p = find_data_file(relpath)
    if p is not None:
        return p
    if url and os.environ.get("FVSANITY_OFFLINE", "0") != "1":
        try:
            return _download(url, cache_dir() / relpath, sha)
        except Exception:  # noqa: BLE001 - offline: fall through to the error below
            pass
    raise MissingWeightsError(
        f"no weights for {hint}: looked in {searched_locations(relpath)}"
        + (f" and {url}" if url else "")
        + "; pass --weights FILE (state dict or .safetensors) or set FVSANITY_DATA"
    )


# --------------------------------------------------------------------------------- registered
_CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_CIFAR_URLS = {
    20: ("cifar10_resnet20-12fca82f.th", "12fca82f"),
    56: ("cifar10_resnet56-4bfd9763.th", "4bfd9763"),
}


def _cifar_resnet(depth: int, weights: str | None, pretrained: bool) -> LoadedModel:
    net = CifarResNet(depth)
    source = "random"
    if weights:
        _load_weights(net, weights)
        source = str(weights)
    elif pretrained:
        fname, sha = _CIFAR_URLS[depth]
        url = (
            "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
            + fname.removeprefix("cifar10_")
        )
        path = _find_or_fetch(f"weights/{fname}", url, sha, f"cifar10-resnet{depth}")
        _load_weights(net, path)
        source = str(path)
    return LoadedModel(
        name=f"cifar10-resnet{depth}",
        model=_prepare(net),
        preprocess=CIFAR10,
        block_layers=net.block_names(),
        output_layer="linear",
        class_names=list(_CIFAR_CLASSES),
        weights_source=source,
    )


@register_model("cifar10-resnet20")
def _resnet20(weights: str | None = None, pretrained: bool = True) -> LoadedModel:
    return _cifar_resnet(20, weights, pretrained)


@register_model("cifar10-resnet56")
def _resnet56(weights: str | None = None, pretrained: bool = True) -> LoadedModel:
    return _cifar_resnet(56, weights, pretrained)


def _squeezenet_blocks() -> list[str]:
    return [f"features.{i}" for i in (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)] + ["classifier.1"]


@register_model("imagenet-squeezenet")
def _squeezenet(weights: str | None = None, pretrained: bool = True) -> LoadedModel:
    import torchvision

    net = torchvision.models.squeezenet1_0()
    source = "random"
    path = weights
    if path is None and pretrained:
        path = _find_or_fetch(
            "weights/imagenet_squeezenet1_0_deepcompression.pt", None, None, "imagenet-squeezenet"
        )
    if path is not None:
        _load_weights(net, path)
        source = str(path)
    return LoadedModel(
        name="imagenet-squeezenet",
        model=_prepare(net),
        preprocess=CAFFE_SQUEEZENET,
        block_layers=_squeezenet_blocks(),
        output_layer="classifier.1",
        class_names=_imagenet_class_names(),
        weights_source=source,
    )


@register_model("inceptionv1")
def _inceptionv1(weights: str | None = None, pretrained: bool = True) -> LoadedModel:
    from lucent.modelzoo import inceptionv1

    net = inceptionv1(pretrained=False)
    source = "random"
    if weights:
        _load_weights(net, weights)
        source = str(weights)
    elif pretrained:
        url = "https://github.com/ProGamerGov/pytorch-old-tensorflow-models/raw/master/inception5h.pth"
        path = _find_or_fetch("weights/inception5h.pth", url, None, "inceptionv1 (lucent)")
        _load_weights(net, path)
        source = str(path)
    blocks = [
        n
        for n, _ in net.named_children()
        if n.startswith(("conv2d", "mixed", "maxpool", "localresponsenorm")) or n == "softmax2_pre_activation_matmul"
    ]
    return LoadedModel(
        name="inceptionv1",
        model=_prepare(net),
        preprocess=LUCENT_INCEPTION,
        block_layers=[b for b in blocks if b.startswith(("mixed", "conv2d2"))] + ["softmax2_pre_activation_matmul"],
        output_layer="softmax2_pre_activation_matmul",
        weights_source=source,
    )


@register_model("toy-procedural")
def _toy(weights: str | None = None, pretrained: bool = True) -> LoadedModel:
    from .toy import load_toy

    return load_toy(weights=weights, pretrained=pretrained)


def _imagenet_class_names() -> list[str]:
    try:
        from torchvision.models import SqueezeNet1_0_Weights

        return list(SqueezeNet1_0_Weights.IMAGENET1K_V1.meta["categories"])
    except Exception:  # noqa: BLE001
        return []


def _generic_blocks(net: nn.Module) -> list[str]:
    """Top-level children, expanding Sequential stages one level (e.g. ``layer3.1``)."""
    out = []
    for name, child in net.named_children():
        if isinstance(child, nn.Sequential) and len(child) > 1:
            out += [f"{name}.{i}" for i in range(len(child))]
        elif not isinstance(child, (nn.Dropout, nn.Identity)):
            out.append(name)
    return out


def _last_layer(net: nn.Module) -> str:
    last = ""
    for name, m in net.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            last = name
    return last


def _torchvision(name: str, weights: str | None, pretrained: bool) -> LoadedModel:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise UnknownModelError(_unknown_msg(name, available))
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    net = torchvision.models.get_model(name, weights=None, **kwargs)
    source = "random"
    categories: list[str] = []
    if weights:
        _load_weights(net, weights, strict=False)
        source = str(weights)
    elif pretrained:
        w = torchvision.models.get_model_weights(name).DEFAULT
        categories = list(w.meta.get("categories", []))
        hub = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
        try:
            sd = w.get_state_dict(progress=False, check_hash=False)
        except Exception as e:  # noqa: BLE001 - offline, proxy, ...: one clear message
            raise MissingWeightsError(
                f"no weights for {name}: not cached at {hub} and download of {w.url} failed "
                f"({type(e).__name__}); pass --weights FILE or use --random-weights"
            ) from e
        net.load_state_dict(sd, strict=False)
        source = str(hub)
    pre = IMAGENET
    if name == "inception_v3":
        pre = Preprocess(size=(299, 299), resize=342)
    return LoadedModel(
        name=name,
        model=_prepare(net),
        preprocess=pre,
        block_layers=_generic_blocks(net),
        output_layer=_last_layer(net),
        class_names=categories,
        weights_source=source,
    )


def _timm(name: str, weights: str | None, pretrained: bool) -> LoadedModel:
    import timm

    if not timm.list_models(name) and not timm.list_models(name.split(".")[0]):
        raise UnknownModelError(_unknown_msg(name, timm.list_models(), prefix="timm:"))
    source = "random"
    try:
        net = timm.create_model(name, pretrained=pretrained and not weights)
        if pretrained and not weights:
            source = f"timm:{name}"
    except Exception as e:  # noqa: BLE001
        raise MissingWeightsError(
            f"no weights for timm:{name}: not in the Hugging Face cache and the download failed "
            f"({type(e).__name__}); pass --weights FILE or use --random-weights"
        ) from e
    if weights:
        _load_weights(net, weights, strict=False)
        source = str(weights)
    cfg = timm.data.resolve_data_config({}, model=net)
    size = tuple(cfg["input_size"][1:])
    pre = Preprocess(
        size=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), resize=int(size[0] / cfg.get("crop_pct", 0.875))
    )
    return LoadedModel(
        name=f"timm:{name}",
        model=_prepare(net),
        preprocess=pre,
        block_layers=_generic_blocks(net),
        output_layer=_last_layer(net),
        weights_source=source,
    )


def _unknown_msg(name: str, choices: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, choices, n=5, cutoff=0.5)
    hint = f"; closest: {', '.join(prefix + c for c in close)}" if close else ""
    return (
        f"unknown model {prefix}{name!r}{hint}; registered: {', '.join(list_models())}, "
        "any torchvision name, or timm:NAME"
    )


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Load a model by name, ready for fvsanity.

    Args:
        spec: registry name (see module doc), a torchvision name, ``timm:NAME``, or the ``model/``
            folder ``fvsanity fool`` wrote (a manipulated model; ``manipulated.json`` inside).
        weights: a local state dict file (``.pt``/``.pth``/``.th`` via ``weights_only=True``, or
            ``.safetensors``); overrides the named model's own weights.
        pretrained: False gives random weights (structural tests); True looks the weights up
            (``$FVSANITY_DATA``, the cache, then the public URL) and raises
            :class:`~fvsanity.errors.MissingWeightsError` with where it looked if none are found.
        device: where to put the model (default: CPU).
        seed: seeds the random initialisation (what ``pretrained=False`` leaves), without
            touching the global RNG state.
    """
    if spec not in _REGISTRY and os.path.isfile(os.path.join(str(spec), "manipulated.json")):
        # a model saved by ``fvsanity fool`` (model/ folder): rebuilt from its own full state dict
        from ..fool.model import load_manipulated

        if weights is not None:
            raise FVSanityError(f"{spec} is a saved manipulated model with its own weights; drop --weights")
        return load_manipulated(spec, device=device)
    weights = str(weights) if weights is not None else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec in _REGISTRY:
            lm = _REGISTRY[spec](weights=weights, pretrained=pretrained)
        elif spec.startswith("timm:"):
            lm = _timm(spec[5:], weights, pretrained)
        else:
            lm = _torchvision(spec, weights, pretrained)
    if device is not None:
        lm.to(device)
    return lm
