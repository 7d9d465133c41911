"""The loaded model: :class:`LoadedModel` (an eval-mode ``nn.Module`` plus what fvsanity needs to
drive it) and :func:`prepare_model`, which every model family applies to its network."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UnitError
from ..layouts import LayerInfo
from ..units import cached_layer_infos, resolve_layer
from .preprocess import ModelConfig, Preprocess

__all__ = ["LoadedModel", "prepare_model", "fixed_input_size"]


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
            self.config = ModelConfig.from_preprocess(self.preprocess, fixed_input_size=fixed_input_size(self.model))

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



def fixed_input_size(net: nn.Module) -> bool:
    """Whether ``net`` refuses other input sizes: a timm ``PatchEmbed`` with a strict image size
    (and no dynamic size) anywhere inside it."""
    for m in net.modules():
        if getattr(m, "strict_img_size", False) and not getattr(m, "dynamic_img_pad", False):
            return True
    return False
