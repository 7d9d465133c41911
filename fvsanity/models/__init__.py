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

Layout (one file per job, as timm has it): :mod:`.loaded` (:class:`LoadedModel`,
:func:`prepare_model`), :mod:`.registration` (the registry and spec loaders), :mod:`.weights`
(reading, checking and finding weights files), one file per family (:mod:`.imagenet`,
:mod:`.torchvision_models`, :mod:`.timm_models`, :mod:`.procedural`, :mod:`.custom`), and :mod:`.factory` (:func:`load_model`). Importing this package registers every
family; the default family, the CIFAR-10 ResNets, is defined here (its download address is this
package's ``_CIFAR_URL``).
"""

from __future__ import annotations

from ..layouts import LayerInfo
from .loaded import LoadedModel, fixed_input_size, prepare_model
from .preprocess import CIFAR10, ModelConfig, Preprocess
from .registration import (  # noqa: F401 - LOADERS re-exported
    LOADERS,
    MODELS,
    list_models,
    register_loader,
    register_model,
    unknown_model_message,
)
from .resnet_cifar import CifarResNet
from .weights import (
    check_state_dict,
    download,
    few,
    find_or_fetch,
    keep_metadata,
    load_state_dict_file,
    load_weights,
    one_line,
    verify_sha256,
)

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

# ------------------------------------------------------------------ the CIFAR-10 ResNets
#: CIFAR-10's classes in label order (what the packaged default images are labelled with).
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
#: Known files: depth -> (file name, sha256). ResNet-20: the full sha256 (its bytes are packaged
#: and in the shared data). ResNet-56: only the sha256 prefix its file name carries is known here, so
#: a local copy is checked against that prefix and it is never downloaded (see find_or_fetch).
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
        path = find_or_fetch(f"weights/{fname}", url, sha, f"cifar10-resnet{depth}")
        load_weights(net, path, model_name=f"cifar10-resnet{depth}")
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


# the other families register after the CIFAR ResNets (the first registered is the default)
from . import custom  # noqa: E402
from .factory import DEFAULT_MODEL, load_model  # noqa: E402
from .imagenet import (  # noqa: E402, F401
    _INCEPTION5H_URL,
    _inceptionv1,
    _squeezenet,
    _squeezenet_blocks,
    imagenet_class_names,
)
from .procedural import _toy  # noqa: E402, F401
from .timm_models import load_timm, timm_blocks, timm_loaded  # noqa: E402, F401
from .torchvision_models import AUX_PREFIXES, generic_blocks, last_layer, load_torchvision  # noqa: E402

# the names this package had before it was split, kept importable from here
_REGISTRY = MODELS
_prepare = prepare_model
_one_line = one_line
_few = few
_keep_metadata = keep_metadata
_load_weights = load_weights
_verify = verify_sha256
_download = download
_find_or_fetch = find_or_fetch
_imagenet_class_names = imagenet_class_names
_generic_blocks = generic_blocks
_last_layer = last_layer
_AUX_PREFIXES = AUX_PREFIXES
_torchvision = load_torchvision
_timm_blocks = timm_blocks
_timm = load_timm
_fixed_input_size = fixed_input_size
_unknown_msg = unknown_model_message

# your own nn.Module (wrap) and factory specs: custom.py gets LoadedModel handed over instead of
# importing the modules that define it
custom.bind(LoadedModel, prepare_model)
wrap = custom.wrap
