"""Model registry and loading: ``load_model(spec)`` -> :class:`LoadedModel`.

Specs:
    ``cifar10-resnet20`` / ``cifar10-resnet56``  fvsanity's CIFAR ResNets, real weights
    ``imagenet-squeezenet``                      torchvision SqueezeNet 1.0, Deep Compression weights
    ``inceptionv1``                              lucent's InceptionV1 (GoogLeNet as in Lucid)
    ``googlenet``, ``resnet50``, ...             any torchvision classification model
    ``timm:convnext_tiny``                       any timm model
    ``my_pkg.models:build``, ``file.py:build``   your own model from a factory (``models.custom``)
    ``toy-procedural``                           a small CNN fvsanity trains itself (offline fallback)

``weights=FILE`` always works offline (state dict via ``weights_only=True``, or safetensors) and
is loaded strictly (``allow_partial=True`` opts into a partial load that is recorded). Known
weights are looked up in ``$FVSANITY_DATA``, the user cache and the packaged copy
(``fvsanity/assets``), each checked against its sha256 when one is known; fvsanity downloads
only files whose full sha256 it knows (today the CIFAR-10 ResNet-20, which is also packaged).
"""

from __future__ import annotations

import difflib
import hashlib
import os
import sys
import urllib.request
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._paths import cache_dir, find_data_file, offline, searched_locations
from ..errors import FVSanityError, MissingWeightsError, UnitError, UnknownModelError
from ..io import file_sha256
from ..layouts import LayerInfo
from ..registry import Registry
from ..units import cached_layer_infos, resolve_layer
from .preprocess import (
    CAFFE_SQUEEZENET,
    CIFAR10,
    IMAGENET,
    LUCENT_INCEPTION,
    ModelConfig,
    Preprocess,
)
from .resnet_cifar import CifarResNet

__all__ = [
    "LoadedModel",
    "ModelConfig",
    "LayerInfo",
    "Preprocess",
    "load_model",
    "list_models",
    "MODELS",
    "register_model",
    "register_loader",
    "prepare_model",
    "load_state_dict_file",
    "DEFAULT_MODEL",
    "CIFAR10_CLASSES",
    "check_state_dict",
    "wrap",
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
        weights_source: where the weights came from ("random" if none were loaded; a partial
            load says so: ``"FILE (partial: 2 of 52 state-dict entries left random)"``).
        random_parameters: state-dict keys left at their random initialisation by a partial load
            (``load_model(..., allow_partial=True)``); empty otherwise.
        config: the model's input conventions (:class:`ModelConfig`: input size, mean/std,
            interpolation, fixed input size); derived from ``preprocess`` if not given.

    Layers: :meth:`layer_info` / :attr:`layers` give every hookable layer's output shape and
    :class:`~fvsanity.layouts.Layout` (conv, tokens, vector), from one forward at the input size.
    """

    name: str
    model: nn.Module
    preprocess: Preprocess
    block_layers: list[str]
    output_layer: str
    class_names: list[str] = field(default_factory=list)
    weights_source: str = "random"
    random_parameters: list[str] = field(default_factory=list)
    config: ModelConfig | None = None

    def __post_init__(self):
        if self.config is None:
            self.config = ModelConfig.from_preprocess(self.preprocess, fixed_input_size=_fixed_input_size(self.model))

    @property
    def layers(self) -> dict[str, LayerInfo]:
        """``{name: LayerInfo}`` of every module with a tensor output, in ``named_modules`` order.

        Computed by one forward of a grey image at :attr:`input_size` and cached on the model
        (per input size; a model whose structure changes must be reloaded).
        """
        return cached_layer_infos(self.model, self.input_size, self.preprocess)

    def layer_info(self, name: str) -> LayerInfo:
        """The :class:`~fvsanity.layouts.LayerInfo` (name, module type, shape, layout) of ``name``.

        Accepts lucent's underscore names. Raises :class:`~fvsanity.errors.UnitError` (one line)
        for an unknown layer or one without a tensor output.
        """
        layers = self.layers
        if name not in layers:
            name = resolve_layer(self.model, name)
            if name not in layers:
                raise UnitError(f"layer {name!r} produced no tensor output in a forward pass")
        return layers[name]

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

    def provenance(self) -> dict:
        """What every output records about the model: ``{"name", "weights", "random_parameters"}``."""
        return {"name": self.name, "weights": self.weights_source, "random_parameters": list(self.random_parameters)}

    def to(self, device: str | torch.device) -> LoadedModel:
        self.model.to(device)
        return self

    def fingerprint(self) -> str:
        """sha256 (64 hex) of every parameter, buffer and module type plus the preprocessing.

        Two loads of the same weights agree; any changed weight element differs. Keys every
        cache (:mod:`fvsanity.cache`); recomputed on each call (ms: one pass over the weights).
        """
        from ..fingerprint import model_fingerprint

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


#: model name -> ``fn(pretrained) -> LoadedModel`` (the package's one registry convention)
MODELS: Registry = Registry("model")
_REGISTRY = MODELS  # deprecated alias


def register_model(name: str):
    """Decorator: ``fn(pretrained: bool) -> LoadedModel`` under ``name``.

    ``fn`` builds the model and, when ``pretrained``, loads its own weights; a ``--weights FILE``
    is applied afterwards by :func:`load_model` (strictly, for every model alike).

    Raises:
        FVSanityError: ``name`` is already registered (a second registration would silently
            change what an existing name loads).
    """
    if name in _REGISTRY:
        raise FVSanityError(f"model {name!r} is already registered; pick another name (registered: {', '.join(sorted(_REGISTRY))})")

    def deco(fn):
        MODELS.register(name, fn)
        return fn

    return deco


#: Other kinds of model spec (e.g. the ``model/`` folder ``fvsanity fool`` writes), by loader
#: name: ``(can_load(spec) -> bool, load(spec, *, weights, device) -> LoadedModel)``. The packages
#: that own such specs register here, so this module never imports them.
LOADERS = Registry("model loader")


def register_loader(name: str, can_load: Callable[[str], bool], load: Callable[..., LoadedModel]) -> None:
    """Teach :func:`load_model` another kind of spec (a spec that is not a registered name).

    Args:
        name: the loader's name (e.g. ``"manipulated"``).
        can_load: ``can_load(spec: str) -> bool``: whether ``spec`` is this loader's (cheap; e.g.
            a folder holding ``manipulated.json``).
        load: ``load(spec, *, weights, device) -> LoadedModel``; ``weights`` is the ``--weights``
            file or None (refuse it with an :class:`~fvsanity.errors.FVSanityError` if the spec
            carries its own weights).

    Raises:
        RegistryError: ``name`` is already registered.
    """
    LOADERS.register(name, (can_load, load))


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a glob ``pattern`` (torchvision/timm names load too)."""
    import fnmatch

    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def prepare_model(model: nn.Module) -> nn.Module:
    """``model`` in eval mode, in-place activations off, parameters without gradients (in place)."""
    model.eval()
    for m in model.modules():
        # In-place activations would rewrite tensors captured by hooks (a conv output read by an
        # objective would silently become post-ReLU); turn them off once, at load.
        if hasattr(m, "inplace") and isinstance(m.inplace, bool):
            m.inplace = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


_prepare = prepare_model  # deprecated alias (was private but used across modules)


def _one_line(text: str, limit: int = 200) -> str:
    """``text`` collapsed to one line of at most ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _few(keys: list[str], n: int = 3) -> str:
    """The first ``n`` keys and how many more: ``"a, b, c (+4 more)"``."""
    head = ", ".join(keys[:n])
    return head + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``weights_only=True``, never pickle).

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` and strips a ``module.`` prefix.
    Raises :class:`~fvsanity.errors.MissingWeightsError` (one line) for a missing, truncated or
    unreadable file, a pickle that holds anything but tensors (refused before any of it runs),
    and a file that holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - truncated or corrupt: one line, no traceback
            raise MissingWeightsError(
                f"cannot read weights file {path} (safetensors): {type(e).__name__}: {_one_line(e)}"
            ) from e
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
            blocked = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln]
            if blocked:
                reason = (
                    f"it holds Python objects, not only tensors ({_one_line(blocked[0], 120)}); fvsanity "
                    "never unpickles them (that could run code): save model.state_dict() or .safetensors"
                )
            else:
                msg = _one_line(e, 120)
                reason = f"{type(e).__name__}" + (f": {msg}" if msg else "")
            raise MissingWeightsError(f"cannot read weights file {path} (torch.load weights_only=True): {reason}") from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise MissingWeightsError(
            f"{path} holds a {type(sd).__name__}, not a state dict (a dict of parameter name -> tensor)"
        )
    out = OrderedDict((str(k).removeprefix("module."), v) for k, v in sd.items() if isinstance(v, torch.Tensor))
    _keep_metadata(sd, out)
    if not out:
        raise MissingWeightsError(f"{path} holds no tensors, not a state dict (a dict of parameter name -> tensor)")
    return out


def _keep_metadata(src: dict, dst: dict) -> None:
    """Carry torch's per-module version metadata over to a filtered copy of a state dict (module
    loaders such as BatchNorm's read it), with a ``module.`` prefix stripped like the keys."""
    meta = getattr(src, "_metadata", None)
    if meta is not None:
        dst._metadata = OrderedDict(  # type: ignore[attr-defined]
            (k.removeprefix("module.") if k != "module" else "", v) for k, v in meta.items()
        )


def check_state_dict(
    model: nn.Module,
    sd: dict[str, torch.Tensor],
    source: str,
    *,
    allow_partial: bool = False,
    model_name: str | None = None,
    ignore_prefixes: tuple[str, ...] = (),
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Check a state dict against ``model`` before anything is loaded.

    Refused always (one-line :class:`~fvsanity.errors.MissingWeightsError`): any NaN/inf in a
    floating tensor (naming the first bad tensor), and a file of which no tensor fits. Refused
    unless ``allow_partial``: missing keys, unexpected keys, and keys whose shape differs from the
    model's (naming the first few of each, with both shapes, and their counts).

    Args:
        model: the module the weights are for.
        sd: name -> tensor (as read by :func:`load_state_dict_file`).
        source: the file, for messages.
        allow_partial: load what fits; missing and other-shaped entries stay as initialised.
        model_name: the model's name, for messages.
        ignore_prefixes: keys with these prefixes are dropped silently (heads the model was built
            without, e.g. GoogLeNet's ``aux1.``).

    Returns:
        ``(to_load, random_keys, ignored_keys)``: the entries to load, the model's state-dict
        keys that stay random (missing or other-shaped), the file's keys that are not used.
    """
    what = model_name or type(model).__name__
    for k, v in sd.items():
        if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all()):
            n_bad = int((~torch.isfinite(v)).sum())
            raise MissingWeightsError(
                f"weights in {source} hold {n_bad} non-finite value(s) (NaN/inf) in {k!r} "
                f"{list(v.shape)}; refusing to load them"
            )
    given = sd
    sd = {k: v for k, v in sd.items() if not k.startswith(ignore_prefixes)} if ignore_prefixes else dict(sd)
    expected = model.state_dict()
    # BatchNorm's step counter: torch itself fills it in for checkpoints that predate it (such as
    # the CIFAR ResNets'); it never changes an eval-mode output
    optional = {
        f"{name}.num_batches_tracked" if name else "num_batches_tracked"
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    missing = [k for k in expected if k not in sd and k not in optional]
    unexpected = [k for k in sd if k not in expected]
    other_shape = [k for k in sd if k in expected and tuple(sd[k].shape) != tuple(expected[k].shape)]
    to_load = OrderedDict((k, v) for k, v in sd.items() if k in expected and k not in other_shape)
    _keep_metadata(given, to_load)
    if not to_load:
        raise MissingWeightsError(
            f"no tensor in {source} fits {what}: file keys {_few(list(sd))}; model keys {_few(list(expected))}"
        )
    if (missing or unexpected or other_shape) and not allow_partial:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
        if other_shape:
            shapes = [f"{k}: file {list(sd[k].shape)} vs model {list(expected[k].shape)}" for k in other_shape]
            parts.append(f"{len(other_shape)} with another shape ({_few(shapes, 2)})")
        raise MissingWeightsError(
            f"weights in {source} do not fit {what}: {'; '.join(parts)}; pass --allow-partial-weights "
            "(API: allow_partial=True) to load the rest and leave the others random"
        )
    return to_load, missing + other_shape, unexpected


def _load_weights(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    allow_partial: bool = False,
    model_name: str | None = None,
    ignore_prefixes: tuple[str, ...] = (),
) -> tuple[list[str], list[str]]:
    """Load a weights file into ``model`` (strict unless ``allow_partial``; see
    :func:`check_state_dict`). Returns ``(random_keys, ignored_keys)``."""
    sd = load_state_dict_file(path)
    to_load, random_keys, ignored = check_state_dict(
        model, sd, str(path), allow_partial=allow_partial, model_name=model_name, ignore_prefixes=ignore_prefixes
    )
    result = model.load_state_dict(to_load, strict=False)
    leftover = sorted(
        k for k in set(result.missing_keys) - set(random_keys) if not k.endswith("num_batches_tracked")
    ) + list(result.unexpected_keys)
    if leftover:  # cannot happen after check_state_dict; never load silently if it does
        raise MissingWeightsError(f"weights in {path} did not load into {model_name or 'the model'}: {_few(leftover)}")
    return random_keys, ignored


def _verify(path: Path, sha256: str) -> Path:
    """Check ``path`` against a known sha256 (full, or the prefix a file name carries)."""
    digest = file_sha256(path)
    if not digest.startswith(sha256.lower()):
        raise MissingWeightsError(
            f"checksum mismatch for {path}: sha256 {digest} != expected {sha256}; delete or replace the file"
        )
    return path


def _download(url: str, dest: Path, sha256: str) -> Path:
    """Fetch ``url`` to ``dest`` atomically if its full sha256 matches. Raises on any failure.

    Nothing unverified is kept: the bytes go to ``dest.part`` and are renamed into place only
    after the checksum matched.
    """
    if len(sha256) != 64:
        raise MissingWeightsError(f"refusing to download {url}: no full sha256 is known for it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=20) as r, open(tmp, "wb") as f:  # noqa: S310
            for chunk in iter(lambda: r.read(1 << 20), b""):
                h.update(chunk)
                f.write(chunk)
        if h.hexdigest() != sha256:
            raise MissingWeightsError(f"checksum mismatch for {url}: sha256 {h.hexdigest()} != expected {sha256}")
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def _find_or_fetch(relpath: str, url: str | None, sha256: str | None, hint: str) -> Path:
    """A known weights file: ``$FVSANITY_DATA``, the user cache, the packaged copy (each checked
    against ``sha256`` when known), else a download to the cache, only when the full sha256 is
    known; else a one-line error saying where it looked and what to do."""
    p = find_data_file(relpath)
    if p is not None:
        return _verify(p, sha256) if sha256 else p
    where = f"no weights for {hint}: looked in {searched_locations(relpath)}"
    todo = f"pass --weights FILE (state dict or .safetensors) or put the file at $FVSANITY_DATA/{relpath}"
    if url and (sha256 is None or len(sha256) != 64):
        raise MissingWeightsError(
            f"{where}; fvsanity knows no full sha256 for {url}, so it does not download it: fetch it "
            f"yourself, check it, and {todo}"
        )
    if url and offline():
        raise MissingWeightsError(f"{where}; not downloading {url} (FVSANITY_OFFLINE=1); {todo}")
    if url:
        try:
            return _download(url, cache_dir() / relpath, sha256)
        except MissingWeightsError as e:
            raise MissingWeightsError(f"{where}; {e}; {todo}") from e
        except Exception as e:  # noqa: BLE001 - offline, proxy, ...: one clear message
            raise MissingWeightsError(f"{where} and the download of {url} failed ({type(e).__name__}); {todo}") from e
    raise MissingWeightsError(f"{where}; {todo} or set FVSANITY_DATA")


# --------------------------------------------------------------------------------- registered
#: CIFAR-10's classes in label order (what the packaged default images are labelled with).
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
#: Known files: depth -> (file name, sha256). ResNet-20: the full sha256 (its bytes are packaged
#: and in the shared data). ResNet-56: only the sha256 prefix its file name carries is known here, so
#: a local copy is checked against that prefix and it is never downloaded (see _find_or_fetch).
_CIFAR_FILES = {
    20: ("cifar10_resnet20-12fca82f.th", "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8"),
    56: ("cifar10_resnet56-4bfd9763.th", "4bfd9763"),
}
_CIFAR_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"


def _cifar_resnet(depth: int, pretrained: bool) -> LoadedModel:
    net = CifarResNet(depth)
    source = "random"
    if pretrained:
        fname, sha = _CIFAR_FILES[depth]
        url = _CIFAR_URL + fname.removeprefix("cifar10_")
        path = _find_or_fetch(f"weights/{fname}", url, sha, f"cifar10-resnet{depth}")
        _load_weights(net, path, model_name=f"cifar10-resnet{depth}")
        source = str(path)
    return LoadedModel(
        name=f"cifar10-resnet{depth}",
        model=prepare_model(net),
        preprocess=CIFAR10,
        block_layers=net.block_names(),
        output_layer="linear",
        class_names=list(CIFAR10_CLASSES),
        weights_source=source,
    )


@register_model("cifar10-resnet20")
def _resnet20(pretrained: bool = True) -> LoadedModel:
    return _cifar_resnet(20, pretrained)


@register_model("cifar10-resnet56")
def _resnet56(pretrained: bool = True) -> LoadedModel:
    return _cifar_resnet(56, pretrained)


def _squeezenet_blocks() -> list[str]:
    return [f"features.{i}" for i in (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)] + ["classifier.1"]


@register_model("imagenet-squeezenet")
def _squeezenet(pretrained: bool = True) -> LoadedModel:
    import torchvision

    net = torchvision.models.squeezenet1_0()
    source = "random"
    if pretrained:
        # no public download: the shared data's decoding of the Deep Compression Caffe model
        path = _find_or_fetch("weights/imagenet_squeezenet1_0_deepcompression.pt", None, None, "imagenet-squeezenet")
        _load_weights(net, path, model_name="imagenet-squeezenet")
        source = str(path)
    return LoadedModel(
        name="imagenet-squeezenet",
        model=prepare_model(net),
        preprocess=CAFFE_SQUEEZENET,
        block_layers=_squeezenet_blocks(),
        output_layer="classifier.1",
        class_names=_imagenet_class_names(),
        weights_source=source,
    )


#: lucent's InceptionV1 weights: no full sha256 is known here, so they are never downloaded.
_INCEPTION5H_URL = "https://github.com/ProGamerGov/pytorch-old-tensorflow-models/raw/master/inception5h.pth"


@register_model("inceptionv1")
def _inceptionv1(pretrained: bool = True) -> LoadedModel:
    from lucent.modelzoo import inceptionv1

    net = inceptionv1(pretrained=False)
    source = "random"
    if pretrained:
        path = _find_or_fetch("weights/inception5h.pth", _INCEPTION5H_URL, None, "inceptionv1 (lucent)")
        _load_weights(net, path, model_name="inceptionv1")
        source = str(path)
    blocks = [
        n
        for n, _ in net.named_children()
        if n.startswith(("conv2d", "mixed", "maxpool", "localresponsenorm")) or n == "softmax2_pre_activation_matmul"
    ]
    return LoadedModel(
        name="inceptionv1",
        model=prepare_model(net),
        preprocess=LUCENT_INCEPTION,
        block_layers=[b for b in blocks if b.startswith(("mixed", "conv2d2"))] + ["softmax2_pre_activation_matmul"],
        output_layer="softmax2_pre_activation_matmul",
        weights_source=source,
    )


@register_model("toy-procedural")
def _toy(pretrained: bool = True) -> LoadedModel:
    from . import toy

    net, source = toy.build_toy(pretrained, load_weights=_load_weights)
    return LoadedModel(
        name="toy-procedural",
        model=prepare_model(net),
        preprocess=toy.TOY_PREPROCESS,
        block_layers=list(toy.BLOCK_LAYERS),
        output_layer="fc",
        class_names=list(toy.CLASSES),
        weights_source=source,
    )


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


#: Heads that torchvision's builders drop after loading pretrained weights (aux_logits=False):
#: a full checkpoint's keys for them are not "unexpected".
_AUX_PREFIXES = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}


def _torchvision(name: str, pretrained: bool) -> LoadedModel:
    """A torchvision classifier; pretrained weights through torchvision's own builder, which
    loads them strictly and downloads with ``check_hash=True`` (torch.hub checks the sha256
    prefix in the file name)."""
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise UnknownModelError(_unknown_msg(name, available))
    source = "random"
    categories: list[str] = []
    if pretrained:
        w = torchvision.models.get_model_weights(name).DEFAULT
        categories = list(w.meta.get("categories", []))
        hub = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
        if not hub.is_file() and offline():
            raise MissingWeightsError(
                f"torchvision weights for {name} are not cached at {hub}; not downloading {w.url} "
                "(FVSANITY_OFFLINE=1); pass --weights FILE or use --random-weights"
            )
        try:
            net = torchvision.models.get_model(name, weights=w, progress=False)
        except Exception as e:  # noqa: BLE001 - offline, proxy, bad bytes, ...: one clear message
            state = "cached at" if hub.is_file() else "not cached at"
            raise MissingWeightsError(
                f"torchvision weights for {name} ({state} {hub}; {w.url}) did not load: {type(e).__name__}: "
                f"{_one_line(e, 160)}; pass --weights FILE or use --random-weights"
            ) from e
        source = str(hub)
    else:
        kwargs = {"aux_logits": False, "init_weights": False} if name in _AUX_PREFIXES else {}
        net = torchvision.models.get_model(name, weights=None, **kwargs)
    pre = IMAGENET
    if name == "inception_v3":
        pre = Preprocess(size=(299, 299), resize=342)
    return LoadedModel(
        name=name,
        model=prepare_model(net),
        preprocess=pre,
        block_layers=_generic_blocks(net),
        output_layer=_last_layer(net),
        class_names=categories,
        weights_source=source,
    )


def _timm_blocks(net: nn.Module) -> list[str]:
    """Block outputs of a timm model: a vision transformer's ``blocks.0 .. blocks.N-1`` and its
    final ``norm``; otherwise the generic top-level children (stages expanded one level)."""
    blocks = getattr(net, "blocks", None)
    if hasattr(net, "num_prefix_tokens") and isinstance(blocks, nn.Sequential) and len(blocks):
        out = [f"blocks.{i}" for i in range(len(blocks))]
        norm = getattr(net, "norm", None)
        if norm is not None and not isinstance(norm, nn.Identity):
            out.append("norm")
        return out
    return _generic_blocks(net)


def _timm(name: str, pretrained: bool) -> LoadedModel:
    """A timm model; pretrained weights through ``timm.create_model`` (timm loads them strictly).

    The model's own data config (timm's ``pretrained_cfg``: input size, mean/std, interpolation,
    crop, fixed input size) becomes :attr:`LoadedModel.config`. A fixed-size model (a ViT whose
    ``PatchEmbed`` refuses other sizes) keeps its size: FV transforms then end at the input size.
    """
    import timm

    if not timm.list_models(name) and not timm.list_models(name.split(".")[0]):
        raise UnknownModelError(_unknown_msg(name, timm.list_models(), prefix="timm:"))
    source = "random"
    try:
        net = timm.create_model(name, pretrained=pretrained)
        if pretrained:
            source = f"timm:{name}"
    except Exception as e:  # noqa: BLE001
        raise MissingWeightsError(
            f"no weights for timm:{name}: not in the Hugging Face cache and the download failed "
            f"({type(e).__name__}); pass --weights FILE or use --random-weights"
        ) from e
    return timm_loaded(net, f"timm:{name}", source)


def timm_loaded(
    net: nn.Module,
    name: str,
    source: str = "random",
    class_names: list[str] | None = None,
    preprocess: Preprocess | None = None,
) -> LoadedModel:
    """Wrap a built timm model (e.g. a tiny ``VisionTransformer`` for tests) as a :class:`LoadedModel`.

    Input conventions come from timm's data config for ``net`` (a ViT built without a pretrained
    config takes its ``patch_embed.img_size``), or from ``preprocess`` when given. Class names
    default to ImageNet's for a 1000-class model.
    """
    import timm

    cfg = timm.data.resolve_data_config({}, model=net)
    size = tuple(int(v) for v in cfg["input_size"][1:])
    pcfg = getattr(net, "pretrained_cfg", None) or {}
    img = getattr(getattr(net, "patch_embed", None), "img_size", None)
    if "input_size" not in pcfg and img is not None and len(img) == 2:
        size = (int(img[0]), int(img[1]))
    crop = cfg.get("crop_pct", 0.875) or 1.0
    if preprocess is None:
        interp = str(cfg.get("interpolation", "bilinear"))
        preprocess = Preprocess(
            size=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), resize=int(size[0] / crop),
            interpolation=interp if interp in ("bilinear", "bicubic", "nearest") else "bilinear",
        )
    fixed = bool(pcfg.get("fixed_input_size", False)) or _fixed_input_size(net)
    config = ModelConfig.from_preprocess(preprocess, fixed_input_size=fixed)
    pre = preprocess
    head = pcfg.get("classifier")
    head = head[0] if isinstance(head, (tuple, list)) and head else head
    mods = dict(net.named_modules())
    output = head if isinstance(head, str) and isinstance(mods.get(head), (nn.Linear, nn.Conv2d)) else _last_layer(net)
    n_classes = int(getattr(net, "num_classes", 0) or 0)
    if class_names is None:
        class_names = _imagenet_class_names() if n_classes == 1000 else []
    return LoadedModel(
        name=name,
        model=prepare_model(net),
        preprocess=pre,
        block_layers=_timm_blocks(net),
        output_layer=output,
        class_names=list(class_names),
        weights_source=source,
        config=config,
    )


def _fixed_input_size(net: nn.Module) -> bool:
    """Whether ``net`` refuses other input sizes: a timm ``PatchEmbed`` with a strict image size
    (and no dynamic size) anywhere inside it."""
    for m in net.modules():
        if getattr(m, "strict_img_size", False) and not getattr(m, "dynamic_img_pad", False):
            return True
    return False


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
    allow_partial: bool = False,
) -> LoadedModel:
    """Load a model by name, ready for fvsanity.

    Args:
        spec: registry name (see module doc), a torchvision name, ``timm:NAME``, the ``model/``
            folder ``fvsanity fool`` wrote (a manipulated model; ``manipulated.json`` inside; loaded
            by the loader ``fvsanity.fool`` registers with :func:`register_loader`), or a factory
            ``path/to/file.py:NAME`` / ``dotted.module:NAME`` (see :mod:`fvsanity.models.custom`).
        weights: a local state dict file (``.pt``/``.pth``/``.th`` via ``weights_only=True``, or
            ``.safetensors``); overrides the named model's own weights. Loaded strictly: missing,
            unexpected or other-shaped keys and NaN/inf values are a one-line
            :class:`~fvsanity.errors.MissingWeightsError`.
        pretrained: False gives random weights (structural tests; refused together with
            ``weights``, which it would ignore); True looks the weights up
            (``$FVSANITY_DATA``, the user cache, the packaged copy, then a download checked
            against a full sha256) and raises :class:`~fvsanity.errors.MissingWeightsError` with
            where it looked if none are found.
        device: where to put the model (default: CPU).
        seed: seeds the random initialisation (what ``pretrained=False`` or a partial ``weights``
            file leaves), without touching the global RNG state.
        allow_partial: with ``weights``, load the entries that fit and leave the model's missing
            or other-shaped entries at their (seeded) random initialisation: printed on stderr,
            listed in ``lm.random_parameters``, noted in ``lm.weights_source`` and
            ``lm.provenance()``. Unexpected keys of the file are ignored (printed too).
    """
    if allow_partial and weights is None:
        raise FVSanityError("--allow-partial-weights applies to a --weights FILE only; none was given")
    if weights is not None and not pretrained:
        raise FVSanityError(f"--random-weights and --weights {str(weights)!r} conflict (random weights would ignore "
                            "the file); give one of them")
    if spec not in _REGISTRY:
        # other kinds of spec (register_loader): e.g. the model/ folder ``fvsanity fool`` wrote
        for loader in LOADERS:
            can_load, load = LOADERS.get(loader)
            if can_load(str(spec)):
                return load(str(spec), weights=weights, device=device)
    weights = str(weights) if weights is not None else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        own = pretrained and weights is None  # a weights file replaces the model's own weights
        if spec in _REGISTRY:
            lm = _REGISTRY[spec](pretrained=own)
        elif spec.startswith("timm:"):
            lm = _timm(spec[5:], own)
        elif custom.is_factory_spec(spec):  # my_pkg.models:build, path/to/file.py:build
            lm = custom.load_factory(spec, pretrained=own)
        else:
            lm = _torchvision(spec, own)
    if weights is not None:
        random_keys, ignored = _load_weights(
            lm.model, weights, allow_partial=allow_partial, model_name=lm.name,
            ignore_prefixes=_AUX_PREFIXES.get(spec, ()),
        )
        lm.weights_source = weights
        lm.random_parameters = list(random_keys)
        if random_keys or ignored:
            n_all = len(lm.model.state_dict())
            note = f"partial: {len(random_keys)} of {n_all} state-dict entries left random"
            lm.weights_source = f"{weights} ({note})"
            print(
                f"fvsanity: warning: --allow-partial-weights: {len(random_keys)} of {n_all} state-dict entries of "
                f"{lm.name} are not in {weights} (or have another shape) and stay random"
                + (f": {_few(random_keys, 10)}" if random_keys else "")
                + (f"; ignored {len(ignored)} key(s) the model lacks: {_few(ignored, 5)}" if ignored else ""),
                file=sys.stderr,
                flush=True,
            )
    if device is not None:
        lm.to(device)
    return lm


# your own nn.Module (wrap) and factory specs: custom.py gets LoadedModel handed over instead of
# importing this package (which imports it), so the import graph stays acyclic
from . import custom  # noqa: E402

custom.bind(LoadedModel, prepare_model)
wrap = custom.wrap
