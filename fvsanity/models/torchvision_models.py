"""Any torchvision classifier by name (``googlenet``, ``resnet50``, ...), and the generic block
layout (top-level children, stages expanded one level) other families reuse."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .._paths import offline
from ..errors import MissingWeightsError, UnknownModelError
from .loaded import LoadedModel, prepare_model
from .preprocess import IMAGENET, Preprocess
from .registration import unknown_model_message
from .weights import one_line

__all__ = ["load_torchvision", "generic_blocks", "last_layer", "AUX_PREFIXES"]


def generic_blocks(net: nn.Module) -> list[str]:
    """Top-level children, expanding Sequential stages one level (e.g. ``layer3.1``)."""
    out = []
    for name, child in net.named_children():
        if isinstance(child, nn.Sequential) and len(child) > 1:
            out += [f"{name}.{i}" for i in range(len(child))]
        elif not isinstance(child, (nn.Dropout, nn.Identity)):
            out.append(name)
    return out


def last_layer(net: nn.Module) -> str:
    last = ""
    for name, m in net.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            last = name
    return last


#: Heads that torchvision's builders drop after loading pretrained weights (aux_logits=False):
#: a full checkpoint's keys for them are not "unexpected".
AUX_PREFIXES = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}


def load_torchvision(name: str, pretrained: bool) -> LoadedModel:
    """A torchvision classifier; pretrained weights through torchvision's own builder, which
    loads them strictly and downloads with ``check_hash=True`` (torch.hub checks the sha256
    prefix in the file name)."""
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise UnknownModelError(unknown_model_message(name, available))
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
                f"{one_line(e, 160)}; pass --weights FILE or use --random-weights"
            ) from e
        source = str(hub)
    else:
        kwargs = {"aux_logits": False, "init_weights": False} if name in AUX_PREFIXES else {}
        net = torchvision.models.get_model(name, weights=None, **kwargs)
    pre = IMAGENET
    if name == "inception_v3":
        pre = Preprocess(size=(299, 299), resize=342)
    return LoadedModel(
        name=name,
        model=prepare_model(net),
        preprocess=pre,
        block_layers=generic_blocks(net),
        output_layer=last_layer(net),
        class_names=categories,
        weights_source=source,
    )
