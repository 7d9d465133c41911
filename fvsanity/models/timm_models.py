"""Any timm model (``timm:NAME``) and :func:`timm_loaded` for a timm model built by hand, with
timm's data config as the model's input conventions and a ViT's blocks as its path."""

from __future__ import annotations

from torch import nn

from ..errors import MissingWeightsError, UnknownModelError
from .imagenet import imagenet_class_names
from .loaded import LoadedModel, fixed_input_size, prepare_model
from .preprocess import ModelConfig, Preprocess
from .registration import unknown_model_message
from .torchvision_models import generic_blocks, last_layer

__all__ = ["load_timm", "timm_loaded"]


def timm_blocks(net: nn.Module) -> list[str]:
    """Block outputs of a timm model: a vision transformer's ``blocks.0 .. blocks.N-1`` and its
    final ``norm``; otherwise the generic top-level children (stages expanded one level)."""
    blocks = getattr(net, "blocks", None)
    if hasattr(net, "num_prefix_tokens") and isinstance(blocks, nn.Sequential) and len(blocks):
        out = [f"blocks.{i}" for i in range(len(blocks))]
        norm = getattr(net, "norm", None)
        if norm is not None and not isinstance(norm, nn.Identity):
            out.append("norm")
        return out
    return generic_blocks(net)


def load_timm(name: str, pretrained: bool) -> LoadedModel:
    """A timm model; pretrained weights through ``timm.create_model`` (timm loads them strictly).

    The model's own data config (timm's ``pretrained_cfg``: input size, mean/std, interpolation,
    crop, fixed input size) becomes :attr:`LoadedModel.config`. A fixed-size model (a ViT whose
    ``PatchEmbed`` refuses other sizes) keeps its size: FV transforms then end at the input size.
    """
    import timm

    if not timm.list_models(name) and not timm.list_models(name.split(".")[0]):
        raise UnknownModelError(unknown_model_message(name, timm.list_models(), prefix="timm:"))
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
    fixed = bool(pcfg.get("fixed_input_size", False)) or fixed_input_size(net)
    config = ModelConfig.from_preprocess(preprocess, fixed_input_size=fixed)
    pre = preprocess
    head = pcfg.get("classifier")
    head = head[0] if isinstance(head, (tuple, list)) and head else head
    mods = dict(net.named_modules())
    output = head if isinstance(head, str) and isinstance(mods.get(head), (nn.Linear, nn.Conv2d)) else last_layer(net)
    n_classes = int(getattr(net, "num_classes", 0) or 0)
    if class_names is None:
        class_names = imagenet_class_names() if n_classes == 1000 else []
    return LoadedModel(
        name=name,
        model=prepare_model(net),
        preprocess=pre,
        block_layers=timm_blocks(net),
        output_layer=output,
        class_names=list(class_names),
        weights_source=source,
        config=config,
    )
