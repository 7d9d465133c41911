"""Image similarity for fooled FVs: SSIM (Wang et al. 2004) and pixel correlation, in torch.

Both take RGB images in [0, 1] as ``[N, 3, H, W]`` tensors (or ``[3, H, W]``) and return one
number per image pair, ``[N]``. Images of different sizes are compared after resizing the second
to the first's size (bilinear, antialiased), since a target picture rarely has an FV's size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..compare.similarity import pearson

__all__ = ["ssim", "pixel_correlation", "match_size", "perceptual_distance"]


def _batch(x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"expected [N,C,H,W] or [C,H,W], got shape {tuple(x.shape)}")
    return x


def match_size(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Broadcast batch sizes and resize ``y`` to ``x``'s spatial size: -> ([N,C,H,W], [N,C,H,W])."""
    x, y = _batch(x), _batch(y).to(x.dtype)
    if y.shape[-2:] != x.shape[-2:]:
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
    n = max(x.shape[0], y.shape[0])
    return x.expand(n, *x.shape[1:]), y.expand(n, *y.shape[1:])


def _gaussian_window(size: int, sigma: float, dtype, device) -> torch.Tensor:
    ax = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    data_range: float = 1.0,
    window: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Mean structural similarity per image pair (Gaussian window, 'valid' positions only).

    Args:
        x, y: ``[N,C,H,W]`` (or ``[C,H,W]``) images, values in ``[0, data_range]``; ``y`` is
            resized to ``x``'s size if they differ. A batch of 1 broadcasts.
        window, sigma: Gaussian window side (px) and standard deviation (px), Wang et al.'s 11/1.5;
            the window shrinks to the image for images smaller than it.
        k1, k2: stabilising constants, ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``.

    Returns:
        ``[N]`` SSIM averaged over channels and window positions; 1 for identical images.
        Finite for constant images (the constants keep every denominator >= C1*C2 > 0).
    """
    x, y = match_size(x, y)
    c = x.shape[1]
    win = min(window, x.shape[-1], x.shape[-2])
    w = _gaussian_window(win, sigma, x.dtype, x.device).expand(c, 1, win, win)

    def filt(t):
        return F.conv2d(t, w, groups=c)

    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx * mx
    syy = filt(y * y) - my * my
    sxy = filt(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def pixel_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of all pixel values per image pair, ``[N]`` in [-1, 1].

    :func:`fvsanity.compare.similarity.pearson` of the flattened images (after
    :func:`match_size`). A constant image has no correlation with anything: returns 0 there,
    with finite (zero) gradients.
    """
    x, y = match_size(x, y)
    return pearson(x.flatten(1), y.flatten(1))


def _unit_normalize(f: torch.Tensor) -> torch.Tensor:
    """``f / ||f||`` over channels (dim 1) per position; 0 where the norm is 0 (double where)."""
    sq = (f * f).sum(1, keepdim=True)
    nz = sq > 0
    norm = torch.sqrt(torch.where(nz, sq, torch.ones_like(sq)))
    return torch.where(nz, f / norm, torch.zeros_like(f))


def perceptual_distance(
    x: torch.Tensor, y: torch.Tensor, backbone, layers: list[str] | None = None, size: int | None = None,
) -> torch.Tensor:
    """LPIPS-form distance (Zhang et al. 2018) with uniform weights, ``[N]``; 0 for identical images.

    Per layer: features unit-normalized over channels at each position, squared difference summed
    over channels and averaged over positions; then averaged over layers. LPIPS proper multiplies
    each channel by learned weights (the "lin" layers), which need a download; with uniform
    weights this is LPIPS's untrained baseline form, so compare values only with each other.

    Args:
        x, y: ``[N,3,H,W]`` / ``[3,H,W]`` RGB in [0,1] (``y`` is resized to ``x``'s size).
        backbone: a :class:`~fvsanity.models.LoadedModel` (e.g. the ImageNet SqueezeNet).
        layers: backbone layers to compare (default: up to 5 of its block layers, evenly spaced).
        size: both images are resized to this side first (default: the backbone's input size).
    """
    from ..hooks import capture

    x, y = match_size(x, y)
    side = size or backbone.input_size[0]
    if x.shape[-1] != side or x.shape[-2] != side:
        x = F.interpolate(x.float(), size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        y = F.interpolate(y.float(), size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    if layers is None:
        blocks = list(backbone.block_layers)
        k = min(5, len(blocks))
        layers = [blocks[round(i * (len(blocks) - 1) / max(1, k - 1))] for i in range(k)]
    dev = backbone.device
    with torch.no_grad(), capture(backbone.model, layers, detach=True) as store:
        backbone(x.to(dev).float())
        fx = {name: store[name].clone() for name in layers}
        backbone(y.to(dev).float())
        fy = {name: store[name] for name in layers}
    d = []
    for name in layers:
        a, b = _unit_normalize(fx[name].double()), _unit_normalize(fy[name].double())
        diff = ((a - b) ** 2).sum(1)
        d.append(diff.reshape(len(diff), -1).mean(1))
    return torch.stack(d, 1).mean(1).float().cpu()
