"""Model input conventions, as a differentiable map from RGB images in [0, 1].

Every fvsanity image (FVs, natural images, targets) is an NCHW float tensor, RGB, values in
[0, 1]. ``Preprocess`` turns that into what the model expects: torchvision's mean/std
normalisation, lucent's InceptionV1 scaling (``x * 255 - 117``) or Caffe's BGR 0..255 minus
mean (SqueezeNet Deep Compression). It is differentiable, so FV gradients flow through it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from PIL import Image

_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class Preprocess:
    """RGB [0,1] NCHW -> model input.

    Args:
        size: (H, W) the model was trained on, in pixels.
        mean, std: per channel, in the model's channel order and value scale (after ``scale``
            and the optional BGR flip): ``out = (flip(x) * scale - mean) / std``.
        scale: multiply [0,1] inputs by this first (255 for Caffe/lucent models).
        bgr: flip RGB to BGR before normalising.
        resize: side length images are resized to before the center crop of ``size``
            (None: resize straight to ``size``).
        interpolation: how natural images are resized: ``"bilinear"`` (torchvision's default)
            or ``"bicubic"`` (timm's ViTs); recorded in ``to_json`` only when not bilinear, so
            the fingerprints of models that predate it do not change.
    """

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    scale: float = 1.0
    bgr: bool = False
    resize: int | None = None
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; valid: {', '.join(_INTERPOLATIONS)}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an NCHW RGB batch with 3 channels, got shape {tuple(x.shape)}")
        if self.bgr:
            x = x.flip(1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        if self.scale != 1.0:  # x * 1 and x / 1 are x exactly: skipping them saves two passes per FV step
            x = x * self.scale
        x = x - mean
        if any(s != 1.0 for s in self.std):
            x = x / torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return x

    def load_pil(self, img: Image.Image) -> torch.Tensor:
        """PIL image -> [3, H, W] RGB float in [0,1] at ``size`` (resize, then center crop)."""
        import torchvision.transforms.functional as TF

        img = img.convert("RGB")
        h, w = self.size
        mode = TF.InterpolationMode(self.interpolation)
        if self.resize is not None:
            img = TF.resize(img, self.resize, interpolation=mode, antialias=True)
            img = TF.center_crop(img, [h, w])
        else:
            img = TF.resize(img, [h, w], interpolation=mode, antialias=True)
        return TF.to_tensor(img)

    def to_json(self) -> dict:
        d = asdict(self)
        if d["interpolation"] == "bilinear":
            del d["interpolation"]
        return d


IMAGENET = Preprocess(size=(224, 224), resize=256)
CIFAR10 = Preprocess(size=(32, 32))
LUCENT_INCEPTION = Preprocess(size=(224, 224), mean=(117.0,) * 3, std=(1.0,) * 3, scale=255.0, resize=256)
CAFFE_SQUEEZENET = Preprocess(
    size=(227, 227), mean=(104.0, 117.0, 123.0), std=(1.0, 1.0, 1.0), scale=255.0, bgr=True
)


@dataclass(frozen=True)
class ModelConfig:
    """A model's input conventions, like timm's ``pretrained_cfg`` (recorded on ``LoadedModel.config``).

    Attributes:
        input_size: (H, W) in px the model was trained on.
        mean, std: normalisation (see :class:`Preprocess`).
        interpolation: how natural images are resized (``"bilinear"``, ``"bicubic"``).
        crop_pct: resize side = input side / crop_pct before the center crop (None: no crop).
        fixed_input_size: the model accepts ``input_size`` only (a ViT whose patch grid and
            position embedding are fixed): FV transforms then keep the canvas at that size
            (``fvsanity.generate.transforms.apply(..., out_size=...)``) and ``--size`` must equal it.
    """

    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    crop_pct: float | None = None
    fixed_input_size: bool = False

    @classmethod
    def from_preprocess(cls, pre: Preprocess, fixed_input_size: bool = False) -> ModelConfig:
        crop = pre.size[0] / pre.resize if pre.resize else None
        return cls(tuple(pre.size), tuple(pre.mean), tuple(pre.std), pre.interpolation, crop, fixed_input_size)

    def to_json(self) -> dict:
        return asdict(self)
