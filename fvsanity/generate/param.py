"""Image parametrizations (Lucid/lucent style), batched with one random stream per element.

``fft_image`` optimizes a Fourier spectrum scaled by 1/f, ``pixel_image`` raw pixels; both go
through ``to_valid_rgb`` (optional colour decorrelation, then a sigmoid) so the image is RGB in
(0, 1). Every element's initial value comes from its own ``torch.Generator``, so an element's FV
depends only on its seed, never on its position in the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# Square root of the colour correlation of ImageNet pixels (Lucid's constant), columns normalised
# by the largest column norm, as in Lucid/lucent.
_COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
_COLOR = _COLOR_SQRT / _COLOR_SQRT.norm(dim=0).max()

ImageFn = Callable[[], torch.Tensor]


def _seeded_randn(shape: Sequence[int], seeds: Sequence[int], sd: float, device) -> torch.Tensor:
    """[len(seeds), *shape] normal draws, element i from ``torch.Generator().manual_seed(seeds[i])``."""
    out = torch.stack([torch.randn(*shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    return (out * sd).to(device)


def fft_scale(h: int, w: int, decay_power: float = 1.0) -> torch.Tensor:
    """[h, w//2+1] spectrum scale 1/max(f, 1/max(h,w))^decay: finite at the zero frequency."""
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    freqs = torch.sqrt(fx * fx + fy * fy)
    return 1.0 / torch.clamp(freqs, min=1.0 / max(h, w)) ** decay_power


def fft_image(
    size: tuple[int, int], seeds: Sequence[int], sd: float = 0.01, decay_power: float = 1.0, device=None
) -> tuple[list[torch.Tensor], ImageFn]:
    """Fourier parametrization: returns ``(params, image_fn)``; ``image_fn()`` -> [B,3,H,W] logits-space.

    Args:
        size: (H, W) in pixels.
        seeds: one seed per batch element (B = len(seeds)).
        sd: standard deviation of the initial spectrum.
    """
    h, w = size
    spectrum = _seeded_randn((3, h, w // 2 + 1, 2), seeds, sd, device).requires_grad_(True)
    scale = fft_scale(h, w, decay_power).to(device)[None, None, :, :, None]

    def image_fn() -> torch.Tensor:
        spec = torch.view_as_complex((scale * spectrum).contiguous())
        img = torch.fft.irfftn(spec, s=(h, w), norm="ortho")
        return img / 4.0  # Lucid's "magic" constant keeps the sigmoid in its linear range

    return [spectrum], image_fn


def pixel_image(size: tuple[int, int], seeds: Sequence[int], sd: float = 0.01, device=None):
    """Pixel parametrization: ``(params, image_fn)`` with image_fn() -> [B,3,H,W] logits-space."""
    h, w = size
    pixels = _seeded_randn((3, h, w), seeds, sd, device).requires_grad_(True)
    return [pixels], lambda: pixels


def decorrelate_color(x: torch.Tensor) -> torch.Tensor:
    """Map decorrelated colour space -> RGB: per pixel, x @ C^T with Lucid's colour matrix."""
    c = _COLOR.to(device=x.device, dtype=x.dtype)
    return torch.einsum("bchw,dc->bdhw", x, c)


def to_valid_rgb(image_fn: ImageFn, decorrelate: bool = True) -> ImageFn:
    """Wrap an image function so it returns RGB in (0, 1) (sigmoid; finite gradients everywhere)."""

    def inner() -> torch.Tensor:
        x = image_fn()
        if decorrelate:
            x = decorrelate_color(x)
        return torch.sigmoid(x)

    return inner


def image(size, seeds, param: str = "fft", decorrelate: bool = True, sd: float = 0.01, device=None):
    """lucent's ``param.image``: ``(params, image_fn)`` with image_fn() -> RGB [B,3,H,W] in (0,1)."""
    if param == "fft":
        params, fn = fft_image(size, seeds, sd=sd, device=device)
    elif param == "pixel":
        params, fn = pixel_image(size, seeds, sd=sd, device=device)
    else:
        from ..errors import FVSanityError

        raise FVSanityError(f"unknown parametrization {param!r}; valid: fft, pixel")
    return params, to_valid_rgb(fn, decorrelate=decorrelate)
