"""``toy-procedural``: a small CNN that fvsanity trains itself on procedurally generated images.

This is the offline fallback of the embedded default (used only when the CIFAR-10 ResNet-20
weights cannot be found): nothing is downloaded, the training data are drawn from a seeded
generator of 32x32 RGB images in ten classes (oriented stripes, checkerboards, discs, rings,
colour blobs, gradients, dot grids), and the weights are cached at
``<cache>/weights/toy_procedural.safetensors`` after the first training run (about a minute or
two on one CPU core).

Public API:
    CLASSES                                   the ten class names, in label order
    procedural_images(n, generator, ...)      -> (images [n,3,32,32] in [0,1], labels [n])
    ToyNet                                    the architecture (block1..block4, pool, fc)
    train_toy(steps, batch, seed, ...)        -> (ToyNet, TrainStats), trains from scratch
    evaluate_toy(net, n, seed)                -> held-out accuracy on fresh procedural images
    build_toy(pretrained, load_weights=...)   -> (ToyNet, weights source): cached, else trained
                                              and cached; ``load_model("toy-procedural")`` wraps
                                              it as a LoadedModel (this module never imports
                                              ``fvsanity.models``, so the registry can import it)
    write_procedural_folder(dest, per_class)  class-folder PNGs matching the model's classes
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .preprocess import Preprocess

__all__ = [
    "CLASSES",
    "GENERATOR_VERSION",
    "TOY_PREPROCESS",
    "ToyNet",
    "TrainStats",
    "procedural_images",
    "train_toy",
    "evaluate_toy",
    "BLOCK_LAYERS",
    "build_toy",
    "toy_weights_path",
    "write_procedural_folder",
]

CLASSES = [  # alphabetical, so that class folders sorted by name give the model's label order
    "checkerboard",
    "colour_blobs",
    "disc",
    "dot_grid",
    "gradient",
    "ring",
    "stripes_antidiagonal",
    "stripes_diagonal",
    "stripes_horizontal",
    "stripes_vertical",
]
#: Bump when the generator or the architecture changes: cached weights of another version are
#: retrained instead of being silently reused.
GENERATOR_VERSION = "2"
SIZE = 32
TOY_PREPROCESS = Preprocess(size=(SIZE, SIZE), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
WEIGHTS_RELPATH = "weights/toy_procedural.safetensors"

# Default training budget (measured on one CPU core: see tests/test_toy_defaults.py's docstring).
DEFAULT_STEPS = 1000
DEFAULT_BATCH = 128


# ------------------------------------------------------------------------------------ images
def _rand(n: int, g: torch.Generator, lo: float = 0.0, hi: float = 1.0, *shape: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand((n, *shape), generator=g)


def _grid(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in [-1, 1], each [n, 1, H, W] (y down, x right)."""
    t = (torch.arange(SIZE, dtype=torch.float32) + 0.5) / SIZE * 2 - 1
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    return yy.expand(n, 1, SIZE, SIZE), xx.expand(n, 1, SIZE, SIZE)


def _colours(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground and background colours [n,3,1,1] that differ by >= 0.3 in every channel."""
    fg = _rand(n, g, 0, 1, 3, 1, 1)
    bg = torch.remainder(fg + _rand(n, g, 0.3, 0.7, 3, 1, 1), 1.0)
    return fg, bg


def _sharp(n: int, g: torch.Generator) -> torch.Tensor:
    """Edge sharpness [n,1,1,1]: from soft (sinusoid-like) to hard edges."""
    return _rand(n, g, 2.0, 12.0, 1, 1, 1)


def _stripes(n: int, g: torch.Generator, angle_deg: float) -> torch.Tensor:
    yy, xx = _grid(n)
    theta = math.radians(angle_deg) + _rand(n, g, -0.15, 0.15, 1, 1, 1)
    freq = _rand(n, g, 1.5, 4.0, 1, 1, 1)  # cycles per half image
    phase = _rand(n, g, 0, 2 * math.pi, 1, 1, 1)
    # theta is the direction of variation: 90 deg varies along y -> horizontal stripes
    s = torch.sin(math.pi * freq * (xx * torch.cos(theta) + yy * torch.sin(theta)) + phase)
    return torch.sigmoid(_sharp(n, g) * s)


def _checker(n: int, g: torch.Generator) -> torch.Tensor:
    yy, xx = _grid(n)
    rot = _rand(n, g, -0.2, 0.2, 1, 1, 1)
    u = xx * torch.cos(rot) - yy * torch.sin(rot)
    v = xx * torch.sin(rot) + yy * torch.cos(rot)
    freq = _rand(n, g, 1.5, 3.5, 1, 1, 1)
    ph = _rand(n, g, 0, 2 * math.pi, 2, 1, 1)
    s = torch.sin(math.pi * freq * u + ph[:, :1]) * torch.sin(math.pi * freq * v + ph[:, 1:])
    return torch.sigmoid(_sharp(n, g) * 2 * s)


def _radial(n: int, g: torch.Generator) -> torch.Tensor:
    yy, xx = _grid(n)
    c = _rand(n, g, -0.35, 0.35, 2, 1, 1)
    return torch.sqrt((yy - c[:, :1]) ** 2 + (xx - c[:, 1:]) ** 2 + 1e-12)


def _disc(n: int, g: torch.Generator) -> torch.Tensor:
    r = _rand(n, g, 0.25, 0.6, 1, 1, 1)
    return torch.sigmoid(_sharp(n, g) * 4 * (r - _radial(n, g)))


def _ring(n: int, g: torch.Generator) -> torch.Tensor:
    r = _rand(n, g, 0.3, 0.65, 1, 1, 1)
    w = _rand(n, g, 0.07, 0.16, 1, 1, 1)
    return torch.sigmoid(_sharp(n, g) * 4 * (w - (_radial(n, g) - r).abs()))


def _dots(n: int, g: torch.Generator) -> torch.Tensor:
    yy, xx = _grid(n)
    spacing = _rand(n, g, 0.35, 0.6, 1, 1, 1)
    off = _rand(n, g, 0, 1, 2, 1, 1) * spacing
    dy = torch.remainder(yy + off[:, :1], spacing) - spacing / 2
    dx = torch.remainder(xx + off[:, 1:], spacing) - spacing / 2
    r = spacing * _rand(n, g, 0.18, 0.3, 1, 1, 1)
    return torch.sigmoid(_sharp(n, g) * 6 * (r - torch.sqrt(dy**2 + dx**2 + 1e-12)))


def _gradient(n: int, g: torch.Generator) -> torch.Tensor:
    yy, xx = _grid(n)
    theta = _rand(n, g, 0, 2 * math.pi, 1, 1, 1)
    t = (xx * torch.cos(theta) + yy * torch.sin(theta)) / math.sqrt(2) * 0.5 + 0.5
    return t.clamp(0, 1)


def _blobs(n: int, g: torch.Generator) -> torch.Tensor:
    """Three soft Gaussian blobs of random colours over a random background: [n,3,H,W]."""
    yy, xx = _grid(n)
    img = _rand(n, g, 0, 1, 3, 1, 1).expand(n, 3, SIZE, SIZE).clone()
    for _ in range(3):
        c = _rand(n, g, -0.6, 0.6, 2, 1, 1)
        sigma = _rand(n, g, 0.15, 0.4, 1, 1, 1)
        col = _rand(n, g, 0, 1, 3, 1, 1)
        a = torch.exp(-((yy - c[:, :1]) ** 2 + (xx - c[:, 1:]) ** 2) / (2 * sigma**2))
        img = img * (1 - a) + col * a
    return img


_MASKS = {
    "stripes_horizontal": lambda n, g: _stripes(n, g, 90.0),
    "stripes_vertical": lambda n, g: _stripes(n, g, 0.0),
    "stripes_diagonal": lambda n, g: _stripes(n, g, 45.0),
    "stripes_antidiagonal": lambda n, g: _stripes(n, g, 135.0),
    "checkerboard": _checker,
    "disc": _disc,
    "ring": _ring,
    "gradient": _gradient,
    "dot_grid": _dots,
}


def procedural_images(
    n: int,
    generator: torch.Generator | int = 0,
    labels: torch.Tensor | None = None,
    noise: float = 0.04,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` procedural 32x32 images.

    Args:
        n: number of images.
        generator: a ``torch.Generator`` (advanced in place) or an int seed.
        labels: optional [n] long tensor of class indices (default: uniform random).
        noise: std of the additive Gaussian pixel noise.

    Returns:
        images [n, 3, 32, 32] float32 RGB in [0, 1]; labels [n] int64 in 0..9 (``CLASSES``).
    """
    g = generator if isinstance(generator, torch.Generator) else torch.Generator().manual_seed(int(generator))
    if labels is None:
        labels = torch.randint(len(CLASSES), (n,), generator=g)
    labels = torch.as_tensor(labels, dtype=torch.long)
    out = torch.empty(n, 3, SIZE, SIZE)
    for c, name in enumerate(CLASSES):
        idx = (labels == c).nonzero().flatten()
        k = len(idx)
        if k == 0:
            continue
        if name == "colour_blobs":
            img = _blobs(k, g)
        else:
            m = _MASKS[name](k, g)
            fg, bg = _colours(k, g)
            img = bg * (1 - m) + fg * m
        gain = _rand(k, g, 0.75, 1.0, 1, 1, 1)
        img = img * gain + (1 - gain) * 0.5  # random contrast
        out[idx] = img
    out = out + noise * torch.randn(out.shape, generator=g)
    return out.clamp(0, 1), labels


# ------------------------------------------------------------------------------------- model
class ConvBlock(nn.Module):
    """conv 3x3 -> BatchNorm -> ReLU (each a named module, so each is hookable)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class ToyNet(nn.Module):
    """32 px CNN: block1 (16 ch, 32x32), block2 (32, 16x16), block3 (64, 8x8), block4 (64, 4x4),
    global average pool, ``fc`` (64 -> 10 class logits). About 61k parameters."""

    def __init__(self, num_classes: int = len(CLASSES), width: int = 16):
        super().__init__()
        w = width
        self.block1 = ConvBlock(3, w, 1)
        self.block2 = ConvBlock(w, 2 * w, 2)
        self.block3 = ConvBlock(2 * w, 4 * w, 2)
        self.block4 = ConvBlock(4 * w, 4 * w, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block4(self.block3(self.block2(self.block1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


BLOCK_LAYERS = ["block1", "block2", "block3", "block4", "fc"]


# ---------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainStats:
    """How a toy model was trained, and how well it does on fresh held-out procedural images."""

    steps: int
    batch: int
    seed: int
    seconds: float
    final_loss: float
    heldout_accuracy: float
    heldout_n: int
    generator_version: str = GENERATOR_VERSION

    def to_json(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate_toy(net: nn.Module, n: int = 1000, seed: int = 12345) -> float:
    """Top-1 accuracy of ``net`` on ``n`` fresh procedural images (seed disjoint from training)."""
    was_training = net.training
    net.eval()
    imgs, labels = procedural_images(n, torch.Generator().manual_seed(seed))
    dev = next(net.parameters()).device
    preds = torch.cat([net(TOY_PREPROCESS(b.to(dev))).argmax(1).cpu() for b in imgs.split(250)])
    net.train(was_training)
    return float((preds == labels).float().mean())


def train_toy(
    steps: int = DEFAULT_STEPS,
    batch: int = DEFAULT_BATCH,
    seed: int = 0,
    lr: float = 3e-3,
    heldout: int = 1000,
    progress: bool = False,
) -> tuple[ToyNet, TrainStats]:
    """Train a :class:`ToyNet` from scratch on a fresh stream of procedural images (CPU).

    Args:
        steps: optimizer steps (Adam, one-cycle cosine schedule).
        batch: images per step (each step draws new images: no epochs, no overfitting).
        seed: seeds both the weight init and the image stream.
        lr: peak learning rate.
        heldout: number of held-out images for the reported accuracy (seed 12345 + seed).
        progress: show a tqdm bar.

    Runs on one CPU thread (restored afterwards): the model is so small that more threads mostly
    add synchronisation; on a busy 2-core machine two threads were 5x slower than one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # restored below
    try:
        return _train(steps, batch, seed, lr, heldout, progress)
    finally:
        torch.set_num_threads(threads)


def _train(steps: int, batch: int, seed: int, lr: float, heldout: int, progress: bool) -> tuple[ToyNet, TrainStats]:
    t0 = time.perf_counter()
    torch.manual_seed(seed)  # weight init only; the data stream has its own generator
    net = ToyNet()
    g = torch.Generator().manual_seed(10_000 + seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    net.train()
    it = range(steps)
    if progress:
        from ..progress import progress_bar

        it = progress_bar(it, desc="training toy model", unit="step")
    loss_val = float("nan")
    for _ in it:
        x, y = procedural_images(batch, g)
        loss = F.cross_entropy(net(TOY_PREPROCESS(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_val = float(loss.detach())
    net.eval()
    acc = evaluate_toy(net, heldout, seed=12345 + seed)
    stats = TrainStats(steps, batch, seed, time.perf_counter() - t0, loss_val, acc, heldout)
    return net, stats


# ---------------------------------------------------------------------------------- caching
def toy_weights_path() -> Path:
    """Where trained toy weights are cached: ``<cache>/weights/toy_procedural.safetensors``."""
    from .._paths import cache_dir

    return cache_dir() / WEIGHTS_RELPATH


def _save(net: nn.Module, stats: TrainStats, path: Path) -> Path:
    """Atomic safetensors write with the training stats as metadata."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        sd = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        save_file(sd, tmp, metadata={k: str(v) for k, v in stats.to_json().items()})
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _cached_version(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("generator_version")
    except Exception:  # noqa: BLE001 - unreadable cache file: retrain
        return None


def build_toy(
    pretrained: bool = True,
    *,
    load_weights: Callable[[nn.Module, str | os.PathLike], object],
    weights: str | os.PathLike | None = None,
    steps: int | None = None,
    verbose: bool = True,
) -> tuple[ToyNet, str]:
    """The toy network and where its weights came from: ``(ToyNet in eval mode, source)``.

    ``load_model("toy-procedural")`` wraps it as a :class:`~fvsanity.models.LoadedModel`
    (preprocess :data:`TOY_PREPROCESS`, blocks :data:`BLOCK_LAYERS`, classes :data:`CLASSES`).

    Args:
        load_weights: ``load_weights(net, path)`` loads a weights file strictly (the model
            registry passes its own loader, so this module need not import the registry).
        weights: a local weights file (overrides everything).
        pretrained: False -> random weights. True -> ``toy_procedural.safetensors`` from
            ``$FVSANITY_DATA/weights`` or the cache; if absent (or from another generator
            version), train it now (``steps`` steps, ~1-2 CPU minutes) and cache it atomically.
        steps: training budget when training is needed (default ``DEFAULT_STEPS``).
        verbose: print one line to stderr before training.
    """
    from .._paths import find_data_file

    net = ToyNet()
    source = "random"
    if weights:
        load_weights(net, weights)
        source = str(weights)
    elif pretrained:
        path = find_data_file(WEIGHTS_RELPATH)
        if path is not None and _cached_version(path) == GENERATOR_VERSION:
            load_weights(net, path)
            source = str(path)
        else:
            dest = toy_weights_path()
            steps = DEFAULT_STEPS if steps is None else steps
            if verbose:
                print(
                    f"fvsanity: training the toy model on procedural images ({steps} steps, about "
                    f"1-2 CPU minutes, once); caching it at {dest}",
                    file=sys.stderr,
                )
            trained, stats = train_toy(steps=steps, batch=DEFAULT_BATCH, progress=verbose)
            try:
                _save(trained, stats, dest)
                source = str(dest)
            except OSError:
                source = "trained-in-memory (cache not writable)"
            net.load_state_dict(trained.state_dict())
    net.eval()
    return net, source


def write_procedural_folder(dest: str | os.PathLike, per_class: int = 50, seed: int = 777) -> Path:
    """Write ``dest/<class>/NNNN.png`` (``per_class`` images per toy class), atomically.

    The folder is built beside ``dest`` and renamed into place, so a crash never leaves half a
    folder that later runs would mistake for a complete one. Returns ``dest``.
    """
    from PIL import Image

    from ..io import to_uint8

    dest = Path(dest)
    if dest.is_dir() and any(dest.iterdir()):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(len(CLASSES)).repeat_interleave(per_class)
        imgs, labels = procedural_images(len(labels), g, labels=labels)
        for i, (img, lab) in enumerate(zip(imgs, labels.tolist(), strict=True)):
            d = tmp / CLASSES[lab]
            d.mkdir(exist_ok=True)
            Image.fromarray(to_uint8(img)).save(d / f"{i % per_class:04d}.png")
        if dest.exists():
            dest.rmdir()  # an empty leftover
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return dest
