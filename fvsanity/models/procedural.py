"""The registered ``toy-procedural`` model: a small CNN fvsanity trains itself (built by
:mod:`fvsanity.models.toy`; the offline fallback)."""

from __future__ import annotations

from .loaded import LoadedModel, prepare_model
from .registration import register_model
from .weights import load_weights

__all__: list[str] = []


@register_model("toy-procedural")
def _toy(pretrained: bool = True) -> LoadedModel:
    from . import toy

    net, source = toy.build_toy(pretrained, load_weights=load_weights)
    return LoadedModel(
        name="toy-procedural",
        model=prepare_model(net),
        preprocess=toy.TOY_PREPROCESS,
        block_layers=list(toy.BLOCK_LAYERS),
        output_layer="fc",
        class_names=list(toy.CLASSES),
        weights_source=source,
    )
