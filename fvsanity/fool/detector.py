"""FV detector: a small CNN that tells feature visualizations from natural images.

It reads the raw RGB input in [0, 1] of any size, pools it to ``size`` px (plus three channels
of pooled local contrast |x(i+1,j+1) - x(i,j)| measured at full resolution, where FV textures differ most
from photos), and returns one logit per image: > threshold means "FV". It is cheap next to the
models it guards (about 3 M multiply-adds at 64 px, under 1 M at 32 px).

Training (:func:`train_detector`) uses FVs fvsanity rendered for the model (many units, several
seeds, several optimization checkpoints) against natural images; both classes are augmented with
the FV optimizer's own robustness transforms (the optimizer only ever shows the model
transformed images) and horizontal flips, so the transform itself is no cue.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FVSanityError

__all__ = [
    "FVDetector",
    "DetectorTraining",
    "DetectorReport",
    "train_detector",
    "detector_logits",
    "evaluate_detector",
    "calibrate_threshold",
    "save_detector",
    "load_detector",
]


class FVDetector(nn.Module):
    """RGB ``[N,3,H,W]`` in [0,1] -> ``[N]`` logits (positive: FV-like).

    Args:
        size: side (px) the input is pooled to before the convolutions.
        width: channels of the first convolution (then 2x, 2x, 4x).
    """

    def __init__(self, size: int = 64, width: int = 16, stem_stride: int = 2):
        super().__init__()
        self.size = int(size)
        self.width = int(width)
        self.stem_stride = int(stem_stride)
        w = self.width
        self.features = nn.Sequential(
            nn.Conv2d(6, w, 3, stride=self.stem_stride, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(8 * w, 1)

    def config(self) -> dict:
        return {"size": self.size, "width": self.width, "stem_stride": self.stem_stride}

    def prepare(self, rgb: torch.Tensor) -> torch.Tensor:
        """``[N,3,H,W]`` -> ``[N,6,size,size]``: pooled RGB - 0.5 and pooled local contrast
        (|diagonal pixel difference|, at the input's full resolution)."""
        contrast = (rgb[..., 1:, 1:] - rgb[..., :-1, :-1]).abs()
        s = (self.size, self.size)

        def pool(t: torch.Tensor) -> torch.Tensor:
            return t if tuple(t.shape[-2:]) == s else F.adaptive_avg_pool2d(t, s)

        return torch.cat([pool(rgb) - 0.5, pool(contrast) * 4.0], 1)

    def classify(self, prepared: torch.Tensor) -> torch.Tensor:
        h = self.features(prepared)
        h = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)
        return self.head(h).squeeze(1)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.classify(self.prepare(rgb))


@dataclass(frozen=True)
class DetectorTraining:
    """How a detector was trained (numbers for the report)."""

    n_fv: int
    n_natural: int
    epochs: int
    batch_size: int
    lr: float
    augment: bool
    seed: int
    final_loss: float
    train_accuracy: float
    losses: list[float] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DetectorReport:
    """Accuracy of a detector at ``threshold`` on a set of FVs and natural images.

    ``fv_recall``: fraction of FVs with logit > threshold; ``natural_specificity``: fraction
    of natural images with logit <= threshold; ``accuracy``: the mean of both (balanced).
    """

    threshold: float
    n_fv: int
    n_natural: int
    fv_recall: float
    natural_specificity: float
    accuracy: float
    max_natural_logit: float
    min_fv_logit: float

    def to_json(self) -> dict:
        return asdict(self)


def _init_weights(det: FVDetector, g: torch.Generator) -> None:
    """He-uniform weights and zero biases drawn from ``g`` (never the global generator)."""
    with torch.no_grad():
        for m in det.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu", generator=g)
                nn.init.zeros_(m.bias)


def _transforms_for(size: int):
    from ..generate.transforms import TransformSpec

    return TransformSpec.standard(size)


def _augment(rgb: torch.Tensor, spec, g: torch.Generator) -> torch.Tensor:
    """Random FV-optimizer transforms (one draw per image) then random horizontal flips."""
    from ..generate.transforms import apply, draw_params

    seeds = torch.randint(0, 2**31 - 1, (rgb.shape[0],), generator=g).tolist()
    params = draw_params(spec, seeds, steps=1)[:, 0]
    out = apply(rgb, spec, params)
    flip = torch.rand(rgb.shape[0], generator=g) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1).to(out.device), out.flip(-1), out)


def _prepared_batch(det: FVDetector, rgb: torch.Tensor, augment: bool, spec, g) -> torch.Tensor:
    """Prepare a batch; with ``augment``, a random half is transformed (both classes alike)."""
    if not augment:
        return det.prepare(rgb)
    pick = torch.rand(rgb.shape[0], generator=g) < 0.5
    out = torch.empty(rgb.shape[0], 6, det.size, det.size, dtype=rgb.dtype, device=rgb.device)
    idx_t = pick.nonzero().flatten()
    idx_n = (~pick).nonzero().flatten()
    if len(idx_t):
        out[idx_t.to(rgb.device)] = det.prepare(_augment(rgb[idx_t.to(rgb.device)], spec, g))
    if len(idx_n):
        plain = rgb[idx_n.to(rgb.device)]
        flip = torch.rand(plain.shape[0], generator=g) < 0.5
        plain = torch.where(flip.view(-1, 1, 1, 1).to(plain.device), plain.flip(-1), plain)
        out[idx_n.to(rgb.device)] = det.prepare(plain)
    return out


def train_detector(
    fv_images: torch.Tensor,
    natural_images: torch.Tensor,
    *,
    size: int = 64,
    width: int | None = None,
    stem_stride: int = 2,
    epochs: int = 60,
    batch_size: int = 64,
    lr: float = 2e-3,
    augment: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> tuple[FVDetector, DetectorTraining]:
    """Train an :class:`FVDetector` (balanced logistic loss, Adam, cosine learning rate).

    Args:
        fv_images: ``[M,3,H,W]`` FVs in [0,1] (any mix of units, seeds, checkpoints).
        natural_images: ``[K,3,H',W']`` natural images in [0,1] (sizes may differ from the FVs').
        size: detector input side (px); width: first-layer channels (default 16);
            stem_stride: stride of the first convolution (2 halves the detector's cost).
        epochs, batch_size, lr: optimisation; each epoch visits every image once.
        augment: FV-optimizer transforms + flips on a random half of each batch.
        seed: seeds initialisation, shuffling and augmentation (``torch.Generator``).

    Returns:
        ``(detector, DetectorTraining)``; the detector is in eval mode, gradients off.
    """
    if fv_images.ndim != 4 or natural_images.ndim != 4 or len(fv_images) == 0 or len(natural_images) == 0:
        raise FVSanityError(
            f"detector training needs non-empty [N,3,H,W] FVs and natural images, got "
            f"{tuple(fv_images.shape)} and {tuple(natural_images.shape)}"
        )
    dev = torch.device(device) if device is not None else fv_images.device
    width = width or 16
    g = torch.Generator().manual_seed(seed)
    det = FVDetector(size=size, width=width, stem_stride=stem_stride)
    _init_weights(det, g)
    det = det.to(dev)
    spec = _transforms_for(max(fv_images.shape[-1], natural_images.shape[-1]))
    opt = torch.optim.Adam(det.parameters(), lr=lr)
    n_fv, n_nat = len(fv_images), len(natural_images)
    # balanced: each class contributes half of the loss whatever the counts
    n_total = n_fv + n_nat
    steps_per_epoch = max(1, (n_total + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    losses: list[float] = []
    det.train()
    for ep in range(epochs):
        order = torch.randperm(n_total, generator=g)
        total, count = 0.0, 0
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            is_fv = idx < n_fv
            fv_idx, nat_idx = idx[is_fv], idx[~is_fv] - n_fv
            parts, labels = [], []
            if len(fv_idx):
                parts.append(_prepared_batch(det, fv_images[fv_idx].to(dev).float(), augment, spec, g))
                labels.append(torch.ones(len(fv_idx), device=dev))
            if len(nat_idx):
                parts.append(_prepared_batch(det, natural_images[nat_idx].to(dev).float(), augment, spec, g))
                labels.append(torch.zeros(len(nat_idx), device=dev))
            x, y = torch.cat(parts), torch.cat(labels)
            weight = torch.where(y > 0.5, n_total / (2.0 * n_fv), n_total / (2.0 * n_nat))
            loss = F.binary_cross_entropy_with_logits(det.classify(x), y, weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        losses.append(total / count)
        if progress:
            print(f"detector epoch {ep + 1}/{epochs}: loss {losses[-1]:.4f}", flush=True)
    det.eval()
    for p in det.parameters():
        p.requires_grad_(False)
    lf = detector_logits(det, fv_images)
    ln = detector_logits(det, natural_images)
    acc = 0.5 * (float((lf > 0).float().mean()) + float((ln <= 0).float().mean()))
    info = DetectorTraining(
        n_fv=n_fv, n_natural=n_nat, epochs=epochs, batch_size=batch_size, lr=lr, augment=augment,
        seed=seed, final_loss=losses[-1] if losses else float("nan"), train_accuracy=acc, losses=losses,
    )
    return det, info


@torch.no_grad()
def detector_logits(det: FVDetector, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """``[N]`` logits for ``[N,3,H,W]`` images in [0,1] (batched, no gradients), on CPU."""
    dev = next(det.parameters()).device
    out = [det(images[i : i + batch_size].to(dev).float()).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def calibrate_threshold(natural_logits: torch.Tensor, margin: float = 1.0, margin_sd: float = 0.0) -> float:
    """Threshold above every calibration natural image: ``max + margin + margin_sd * sd``.

    ``sd`` is the standard deviation of the calibration logits (0 for a single image): the
    largest of a few hundred calibration images underestimates the tail of thousands of unseen
    ones, by an amount that scales with the spread. With the fooling gate shut at and below this
    value, natural images scored like the calibration set keep the model's exact output.
    """
    if natural_logits.numel() == 0:
        raise FVSanityError("threshold calibration needs at least one natural image")
    sd = float(natural_logits.float().std()) if natural_logits.numel() > 1 else 0.0
    return float(natural_logits.max()) + float(margin) + float(margin_sd) * sd


def evaluate_detector(
    det: FVDetector, fv_images: torch.Tensor, natural_images: torch.Tensor, threshold: float = 0.0
) -> DetectorReport:
    """Balanced accuracy of ``det`` at ``threshold`` on (held-out) FVs and natural images."""
    lf = detector_logits(det, fv_images)
    ln = detector_logits(det, natural_images)
    rec = float((lf > threshold).float().mean()) if len(lf) else float("nan")
    spec = float((ln <= threshold).float().mean()) if len(ln) else float("nan")
    return DetectorReport(
        threshold=float(threshold), n_fv=len(lf), n_natural=len(ln), fv_recall=rec,
        natural_specificity=spec, accuracy=0.5 * (rec + spec),
        max_natural_logit=float(ln.max()) if len(ln) else float("nan"),
        min_fv_logit=float(lf.min()) if len(lf) else float("nan"),
    )


def save_detector(det: FVDetector, path: str | os.PathLike) -> Path:
    """Write ``det`` as safetensors (config in the file's metadata); atomic."""
    from safetensors.torch import save_file

    from ..io import tmp_for

    path = Path(path)
    tmp = tmp_for(path)
    try:
        sd = {k: v.detach().cpu().contiguous() for k, v in det.state_dict().items()}
        save_file(sd, str(tmp), metadata={"fvsanity": "fv-detector/1", "config": json.dumps(det.config())})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_detector(path: str | os.PathLike, device: str | torch.device | None = None) -> FVDetector:
    """Inverse of :func:`save_detector` (eval mode, gradients off)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FVSanityError(f"detector file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("fvsanity") != "fv-detector/1":
        raise FVSanityError(f"{path} is not an fvsanity FV detector (metadata {meta.get('fvsanity')!r})")
    det = FVDetector(**json.loads(meta["config"]))
    det.load_state_dict(load_file(str(path)))
    det.eval()
    for p in det.parameters():
        p.requires_grad_(False)
    return det.to(device) if device is not None else det
