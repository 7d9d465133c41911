"""The vocabulary of attribution: the method and reference names, :class:`AttributionError`,
the reference images a clean image is compared with (:func:`reference_images`) and the check of
an image batch (see :mod:`fvsanity.compare.attribution`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import FVSanityError

__all__ = ["METHODS", "NODE_METHODS", "REFERENCES", "SKIP_NAMES", "AttributionError", "reference_images",
           "check_images"]

METHODS = ("eap", "eap-ig")
NODE_METHODS = ("grad_x_act", "ig")
REFERENCES = ("mean", "zeros", "blur")
#: last name component of parameter-free modules treated as skip (identity-edge) connections
SKIP_NAMES = ("shortcut", "downsample", "skip", "identity", "residual")


class AttributionError(FVSanityError, ValueError):
    """Bad attribution input (layer, reference, method) or a degenerate result."""


# ------------------------------------------------------------------------------ references
def reference_images(
    lm, images: torch.Tensor, reference: str | torch.Tensor = "mean", blur_sigma: float | None = None
) -> torch.Tensor:
    """Reference images [N, 3, H, W] (RGB [0, 1]) for ``images`` [N, 3, H, W].

    ``"mean"``: one constant image of the dataset-mean colour (the RGB value the model's
    preprocessing maps to 0), shared by every image and so by FV and natural groups alike;
    ``"zeros"``: black; ``"blur"``: each image blurred by a Gaussian of ``blur_sigma`` pixels
    (default ``min(H, W) / 16``); a tensor [3, H, W], [1, 3, H, W] or [N, 3, H, W]: given images.
    """
    n, _, h, w = images.shape
    if isinstance(reference, torch.Tensor):
        ref = reference.to(images.device, images.dtype)
        if ref.ndim == 3:
            ref = ref.unsqueeze(0)
        if ref.ndim != 4 or ref.shape[1:] != images.shape[1:] or ref.shape[0] not in (1, n):
            raise AttributionError(
                f"reference of shape {tuple(reference.shape)} does not fit images {tuple(images.shape)}; "
                "give [3,H,W], [1,3,H,W] or [N,3,H,W]"
            )
        return ref.expand(n, -1, -1, -1)
    if reference == "mean":
        p = lm.preprocess
        mean = torch.tensor(getattr(p, "mean", (0.5,) * 3), dtype=images.dtype, device=images.device)
        mean = mean / float(getattr(p, "scale", 1.0))
        if getattr(p, "bgr", False):
            mean = mean.flip(0)
        return mean.clamp(0, 1).view(1, 3, 1, 1).expand(n, 3, h, w)
    if reference == "zeros":
        return torch.zeros_like(images)
    if reference == "blur":
        sigma = float(blur_sigma) if blur_sigma is not None else max(1.0, min(h, w) / 16.0)
        return _gaussian_blur(images, sigma)
    raise AttributionError(f"unknown reference {reference!r}; valid: {', '.join(REFERENCES)} or an image tensor")


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    pad_h, pad_w = min(r, x.shape[2] - 1), min(r, x.shape[3] - 1)
    y = F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode="reflect") if min(pad_h, pad_w) > 0 else x
    kh = k[r - pad_h : r + pad_h + 1]
    kw = k[r - pad_w : r + pad_w + 1]
    y = F.conv2d(y, (kh / kh.sum()).view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return F.conv2d(y, (kw / kw.sum()).view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)



def check_images(images: torch.Tensor, what: str = "images") -> None:
    """Refuse anything but an RGB batch [N, 3, H, W] with N >= 1 (one-line AttributionError)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise AttributionError(f"{what} must be an RGB batch [N, 3, H, W] with N >= 1, got {shape}")
