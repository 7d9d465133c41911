"""Tiny models and data for tests: seeded, CPU-fast, nothing downloaded.

Helpers here build :class:`~fvsanity.models.LoadedModel` objects around small networks whose
weights are fixed by a seed, so tests can run the whole pipeline in milliseconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .models import LoadedModel, Preprocess, prepare_model


class TinyCNN(nn.Module):
    """conv(3->8) relu pool conv(8->16) relu pool conv(16->16) relu, gap, linear(16->n)."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.conv3(x))
        return self.fc(torch.flatten(self.gap(x), 1))


def tiny_model(seed: int = 0, size: int = 16, num_classes: int = 5) -> LoadedModel:
    """A seeded :class:`TinyCNN` wrapped as a LoadedModel (input ``size`` px, CIFAR-style norm)."""
    g = torch.Generator().manual_seed(seed)
    net = TinyCNN(num_classes)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / max(1, p[0].numel()) ** 0.5))
    return LoadedModel(
        name="tiny",
        model=prepare_model(net),
        preprocess=Preprocess(size=(size, size), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        block_layers=["relu1", "relu2", "relu3", "fc"],
        output_layer="fc",
        class_names=[f"class{i}" for i in range(num_classes)],
    )


def data_root() -> Path | None:
    """A root with the real CIFAR-10 data in the shared layout (``weights/`` with the ResNet-20
    file, ``cifar10-test/<class>/``): ``$FVSANITY_DATA`` if it holds the shared real data, else the
    packaged copy (``fvsanity/assets``, 100 images per class), else None (tests then skip)."""
    from ._paths import PACKAGED_DIR

    env = os.environ.get("FVSANITY_DATA")
    if env and (Path(env) / "weights").is_dir():
        return Path(env)
    if (PACKAGED_DIR / "weights").is_dir() and (PACKAGED_DIR / "cifar10-test").is_dir():
        return PACKAGED_DIR
    return None


#: What :func:`imagenet_root` needs below a data root.
IMAGENET_FILES = ("weights/imagenet_squeezenet1_0_deepcompression.pt", "imagenet-samples")


def imagenet_root() -> Path | None:
    """``$FVSANITY_DATA`` if it holds the SqueezeNet weights and the ImageNet samples, else None."""
    env = os.environ.get("FVSANITY_DATA")
    if env and all((Path(env) / rel).exists() for rel in IMAGENET_FILES):
        return Path(env)
    return None


def random_image_folder(root: str | os.PathLike, per_class: int = 4, n_classes: int = 5, size: int = 16) -> Path:
    """A class-folder image set of seeded random RGB PNGs (``root/class<c>/<i>.png``) for tests
    that need images on disk; the same pixels on every call."""
    import numpy as np
    from PIL import Image

    root = Path(root)
    g = np.random.default_rng(0)
    for c in range(n_classes):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root
