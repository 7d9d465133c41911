"""Evaluation of a manipulated model against its original.

* :func:`evaluate_predictions`: on natural images not used to build it: top-1/top-5 of both
  models, the fraction of identical top-1 predictions and the largest |logit difference|.
* :func:`fv_similarity`: SSIM and pixel correlation of the manipulated unit's FV to the target,
  next to the original FV's similarity to the same target.
* :func:`inference_time_ratio`: median over repeats of the manipulated/original forward time,
  measured side by side on the same batch.
* :func:`gate_fraction`: how often the fooling gate is open for given (e.g. transformed FV) inputs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..errors import FVSanityError
from ..hooks import capture
from ..models import LoadedModel
from .metrics import pixel_correlation, ssim

__all__ = [
    "PredictionReport",
    "top1_gained_lost",
    "SimilarityReport",
    "TimingReport",
    "evaluate_predictions",
    "fv_similarity",
    "inference_time_ratio",
    "gate_fraction",
]


@dataclass(frozen=True)
class PredictionReport:
    """Original vs manipulated predictions on ``n`` natural images (accuracies in [0, 1]).

    ``top1_gained`` / ``top1_lost``: labelled images the manipulated model gets right and the
    original wrong / the other way round; ``top1_change_se``: the standard error of the top-1
    change from these paired outcomes, ``sqrt(((g + l) / n - d^2) / n)`` with ``d = (g - l) / n``
    (the same images on both models; NaN without labels). With many changed predictions the change
    is noisy even when the changes are unbiased: the bound a change is held to should be wider
    than about 2 standard errors to be checkable.
    """

    n: int
    top1_original: float
    top1_manipulated: float
    top5_original: float
    top5_manipulated: float
    identical_top1_fraction: float
    n_different_top1: int
    max_abs_logit_diff: float
    n_exactly_equal_logits: int
    top1_gained: int = 0
    top1_lost: int = 0
    top1_change_se: float = float("nan")

    def to_json(self) -> dict:
        return asdict(self)


def top1_gained_lost(pred_a: torch.Tensor, pred_b: torch.Tensor, labels: torch.Tensor) -> tuple[int, int, float]:
    """``(gained, lost, se)``: images model b gets right and model a wrong, the other way round,
    and the standard error of b's top-1 minus a's from these paired outcomes,
    ``sqrt(((g + l) / n - d^2) / n)`` with ``d = (g - l) / n`` (a fraction; NaN for no images)."""
    ra, rb = pred_a == labels, pred_b == labels
    gained, lost, n = int((rb & ~ra).sum()), int((ra & ~rb).sum()), int(labels.numel())
    if not n:
        return gained, lost, float("nan")
    d = (gained - lost) / n
    return gained, lost, max((gained + lost) / n - d * d, 0.0) ** 0.5 / n ** 0.5


@torch.no_grad()
def evaluate_predictions(
    original: LoadedModel, manipulated: LoadedModel, images, labels: torch.Tensor | None = None, batch_size: int = 50
) -> PredictionReport:
    """Compare predictions on natural ``images``.

    Args:
        images: ``[N,3,H,W]`` RGB in [0,1] or a :class:`~fvsanity.data.NaturalImages` (its labels
            are used when ``labels`` is None).
        labels: ``[N]`` class indices (-1 = unknown: excluded from accuracies).
    """
    from ..activations import _iter_batches

    if labels is None:
        labels = getattr(images, "labels", None)
    dev = original.device
    lo, lm_ = [], []
    for x in _iter_batches(images, batch_size):
        x = x.to(dev)
        lo.append(original(x).float().cpu())
        lm_.append(manipulated(x).float().cpu())
    a, b = torch.cat(lo), torch.cat(lm_)
    if a.ndim > 2:  # logits maps: pool like the model's head would not; compare as given
        a, b = a.flatten(1), b.flatten(1)
    n = a.shape[0]
    p1a, p1b = a.argmax(1), b.argmax(1)
    k = min(5, a.shape[1])
    t5a, t5b = a.topk(k, 1).indices, b.topk(k, 1).indices
    if labels is not None:
        y = torch.as_tensor(labels).long()
        ok = y >= 0
        yy = y[ok]

        def acc1(p):
            return float((p[ok] == yy).float().mean()) if ok.any() else float("nan")

        def acc5(t):
            return float((t[ok] == yy[:, None]).any(1).float().mean()) if ok.any() else float("nan")

        t1o, t1m, t5o, t5m = acc1(p1a), acc1(p1b), acc5(t5a), acc5(t5b)
        gained, lost, se = top1_gained_lost(p1a[ok], p1b[ok], yy)
    else:
        t1o = t1m = t5o = t5m = float("nan")
        gained = lost = 0
        se = float("nan")
    same = p1a == p1b
    return PredictionReport(
        n=n, top1_original=t1o, top1_manipulated=t1m, top5_original=t5o, top5_manipulated=t5m,
        identical_top1_fraction=float(same.float().mean()), n_different_top1=int((~same).sum()),
        max_abs_logit_diff=float((a - b).abs().max()) if n else float("nan"),
        n_exactly_equal_logits=int((a == b).all(1).sum()),
        top1_gained=gained, top1_lost=lost, top1_change_se=se,
    )


@dataclass(frozen=True)
class SimilarityReport:
    """Similarity to the target of the manipulated model's FVs vs the original model's FVs.

    Means over the compared FVs (units x seeds); ``*_per_fv`` keep each value.
    """

    n: int
    ssim_manipulated_fv_to_target: float
    ssim_original_fv_to_target: float
    corr_manipulated_fv_to_target: float
    corr_original_fv_to_target: float
    ssim_manipulated_per_fv: list[float]
    ssim_original_per_fv: list[float]
    lpips_uniform_manipulated_fv_to_target: float | None = None
    lpips_uniform_original_fv_to_target: float | None = None
    lpips_backbone: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def fv_similarity(
    manipulated_fvs: torch.Tensor, original_fvs: torch.Tensor, targets: torch.Tensor, backbone: LoadedModel | None = None,
) -> SimilarityReport:
    """SSIM / pixel correlation (and, with a ``backbone``, the LPIPS-form distance with uniform
    weights, :func:`~fvsanity.fool.metrics.perceptual_distance`) to ``targets`` of manipulated
    vs original FVs.

    Args:
        manipulated_fvs, original_fvs: ``[N,3,H,W]`` FVs of the same units (and seeds) on the
            manipulated and on the original model.
        targets: ``[N,3,H',W']`` what each should show (another unit's FV, or the picture;
            resized to the FV size), or ``[3,H',W']`` for one shared target.
    """
    if manipulated_fvs.shape != original_fvs.shape:
        raise FVSanityError(f"FV shapes differ: {tuple(manipulated_fvs.shape)} vs {tuple(original_fvs.shape)}")
    sm = ssim(manipulated_fvs.double(), targets.double())
    so = ssim(original_fvs.double(), targets.double())
    cm = pixel_correlation(manipulated_fvs.double(), targets.double())
    co = pixel_correlation(original_fvs.double(), targets.double())
    lp = {}
    if backbone is not None:
        from .metrics import perceptual_distance

        lp = {
            "lpips_uniform_manipulated_fv_to_target": float(perceptual_distance(manipulated_fvs, targets, backbone).mean()),
            "lpips_uniform_original_fv_to_target": float(perceptual_distance(original_fvs, targets, backbone).mean()),
            "lpips_backbone": backbone.name,
        }
    return SimilarityReport(
        n=int(sm.numel()), ssim_manipulated_fv_to_target=float(sm.mean()), ssim_original_fv_to_target=float(so.mean()),
        corr_manipulated_fv_to_target=float(cm.mean()), corr_original_fv_to_target=float(co.mean()),
        ssim_manipulated_per_fv=sm.tolist(), ssim_original_per_fv=so.tolist(), **lp,
    )


def lpips_backbone(device=None) -> LoadedModel | None:
    """The local backbone for the LPIPS-form distance: the ImageNet SqueezeNet if its weights are
    on disk ($FVSANITY_DATA or the cache), else None (its loader has no download URL)."""
    from ..errors import MissingWeightsError
    from ..models import load_model

    try:
        return load_model("imagenet-squeezenet", device=device)
    except MissingWeightsError:
        return None


@dataclass(frozen=True)
class TimingReport:
    """Forward time of a batch (seconds, medians over ``repeats``) and their ratio."""

    batch_size: int
    repeats: int
    seconds_original: float
    seconds_manipulated: float
    ratio: float
    ratio_per_repeat: list[float]

    def to_json(self) -> dict:
        return asdict(self)


@torch.no_grad()
def inference_time_ratio(
    original: LoadedModel, manipulated: LoadedModel, images: torch.Tensor, repeats: int = 15, warmup: int = 2
) -> TimingReport:
    """Median of per-repeat ratios manipulated/original forward time on ``images`` (one batch).

    The two models alternate within each repeat (order swapped every repeat) so that load
    changes on a shared machine hit both alike.
    """
    dev = original.device
    x = images.to(dev)

    def once(m) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        m(x)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t

    for _ in range(warmup):
        once(original)
        once(manipulated)
    to, tm, ratios = [], [], []
    for r in range(repeats):
        if r % 2:
            b, a = once(manipulated), once(original)
        else:
            a, b = once(original), once(manipulated)
        to.append(a)
        tm.append(b)
        ratios.append(b / a)
    return TimingReport(
        batch_size=int(x.shape[0]), repeats=repeats, seconds_original=statistics.median(to),
        seconds_manipulated=statistics.median(tm), ratio=statistics.median(ratios), ratio_per_repeat=ratios,
    )


@torch.no_grad()
def gate_fraction(manipulated: LoadedModel, images: torch.Tensor, transform_seed: int | None = 0, batch_size: int = 64) -> dict:
    """Fraction of ``images`` for which the fooling gate is open (> 0.5), optionally after one
    random draw of the FV optimizer's transforms per image (what the optimizer shows the model).

    Returns ``{"open_fraction", "mean_gate", "n"}``.
    """
    from ..generate.transforms import TransformSpec, apply, draw_params

    w = manipulated.model
    if getattr(getattr(w, "fool", None), "detector", None) is None:
        raise FVSanityError(f"{manipulated.name} has no fooling gate")
    dev = manipulated.device
    gates = []
    spec = TransformSpec.standard(min(manipulated.input_size))
    with capture(w, ["fool.gate"], detach=True) as store:
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(dev)
            if transform_seed is not None:
                seeds = [transform_seed * 100_003 + i + j for j in range(len(x))]
                x = apply(x, spec, draw_params(spec, seeds, 1)[:, 0])
            manipulated(x)
            gates.append(store["fool.gate"].float().cpu())
    g = torch.cat(gates)
    return {"open_fraction": float((g > 0.5).float().mean()), "mean_gate": float(g.mean()), "n": len(g)}
