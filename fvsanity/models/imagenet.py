"""The registered ImageNet models: ``imagenet-squeezenet`` (Deep Compression weights) and
``inceptionv1`` (lucent's InceptionV1, GoogLeNet as in Lucid), and ImageNet's class names."""

from __future__ import annotations

from .loaded import LoadedModel, prepare_model
from .preprocess import CAFFE_SQUEEZENET, LUCENT_INCEPTION
from .registration import register_model
from .weights import find_or_fetch, load_weights

__all__ = ["imagenet_class_names"]


def _squeezenet_blocks() -> list[str]:
    return [f"features.{i}" for i in (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)] + ["classifier.1"]


@register_model("imagenet-squeezenet")
def _squeezenet(pretrained: bool = True) -> LoadedModel:
    import torchvision

    net = torchvision.models.squeezenet1_0()
    source = "random"
    if pretrained:
        # no public download: the shared data's decoding of the Deep Compression Caffe model
        path = find_or_fetch("weights/imagenet_squeezenet1_0_deepcompression.pt", None, None, "imagenet-squeezenet")
        load_weights(net, path, model_name="imagenet-squeezenet")
        source = str(path)
    return LoadedModel(
        name="imagenet-squeezenet",
        model=prepare_model(net),
        preprocess=CAFFE_SQUEEZENET,
        block_layers=_squeezenet_blocks(),
        output_layer="classifier.1",
        class_names=imagenet_class_names(),
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
        path = find_or_fetch("weights/inception5h.pth", _INCEPTION5H_URL, None, "inceptionv1 (lucent)")
        load_weights(net, path, model_name="inceptionv1")
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


def imagenet_class_names() -> list[str]:
    try:
        from torchvision.models import SqueezeNet1_0_Weights

        return list(SqueezeNet1_0_Weights.IMAGENET1K_V1.meta["categories"])
    except Exception:  # noqa: BLE001
        return []
