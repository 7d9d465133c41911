"""Image parametrizations (Lucid/lucent style), batched with one random stream per element.

A parametrization turns a few tensors to optimize into a batch of RGB images. Every one is a
function registered in :data:`PARAMS` (``fft``, ``pixel``, ``maco``) with one convention::

    fn(size, seeds, device, *, decorrelate=True, **options) -> (params, image_fn)

``size`` is (H, W) px, ``seeds`` one int per batch element (B = len(seeds)), ``params`` the list
of leaf tensors the optimizer updates and ``image_fn()`` returns RGB [B, 3, H, W] in (0, 1).
Element b's initial value comes from ``torch.Generator().manual_seed(seeds[b])`` alone, so an
element's FV depends only on its seed, never on its position in the batch; and nothing may mix
elements (the batched optimizer relies on it). Add one with ``@PARAMS.register("name")``.

- ``fft``: a Fourier spectrum scaled by 1/f (Lucid's default);
- ``pixel``: raw pixels;
- ``maco``: phase only (Fel et al. 2023, "Unlocking feature visualization for deeper networks
  with magnitude constrained optimization"): the magnitude of the spectrum is fixed and only
  the Fourier phase is optimized.

All three go through :func:`to_valid_rgb` (optional colour decorrelation, then a sigmoid).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import FVSanityError
from ..registry import Registry, resolve_with_options

__all__ = [
    "PARAMS",
    "check_options",
    "decorrelate_color",
    "fft_image",
    "fft_scale",
    "image",
    "maco_image",
    "magnitude_spectrum",
    "make_image",
    "pixel_image",
    "to_valid_rgb",
]

# Square root of the colour correlation of ImageNet pixels (Lucid's constant), columns normalised
# by the largest column norm, as in Lucid/lucent.
_COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
_COLOR = _COLOR_SQRT / _COLOR_SQRT.norm(dim=0).max()

ImageFn = Callable[[], torch.Tensor]

PARAMS = Registry("parametrization")
"""name -> ``fn(size, seeds, device, *, decorrelate=True, **options) -> (params, image_fn)``."""


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


# ------------------------------------------------------------------------------------- MACO
def _spectrum_energy(mag: torch.Tensor, w: int) -> torch.Tensor:
    """Per channel, sum over the FULL (two-sided) spectrum of |X|^2 for an rfft magnitude
    [..., h, w//2+1] (columns 1..ceil(w/2)-1 stand for two bins each)."""
    weights = torch.full((mag.shape[-1],), 2.0, dtype=mag.dtype)
    weights[0] = 1.0
    if w % 2 == 0:
        weights[-1] = 1.0
    return (mag * mag * weights).flatten(-2).sum(-1)


def _load_magnitude(magnitude, h: int, w: int) -> torch.Tensor:
    """A user magnitude spectrum (tensor or ``.pt``/``.npy`` file) as [3, h, w//2+1] float32."""
    if isinstance(magnitude, (str, Path)):
        path = Path(magnitude)
        if not path.is_file():
            raise FVSanityError(f"maco magnitude file {str(path)!r} not found (a .pt or .npy [3, H, W//2+1] spectrum)")
        try:
            if path.suffix == ".npy":
                import numpy as np

                magnitude = torch.from_numpy(np.load(path, allow_pickle=False))
            else:
                magnitude = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is one user error
            raise FVSanityError(f"maco magnitude file {str(path)!r} is unreadable ({type(e).__name__})") from None
    if not isinstance(magnitude, torch.Tensor):
        raise FVSanityError(f"maco magnitude must be a tensor or a .pt/.npy file, got {type(magnitude).__name__}")
    m = magnitude.detach().float().cpu()
    if m.ndim == 2:
        m = m.expand(3, *m.shape)
    if m.ndim != 3 or m.shape[0] != 3:
        raise FVSanityError(f"maco magnitude must be [3, H, W//2+1] or [H, W//2+1], got {list(magnitude.shape)}")
    if not torch.isfinite(m).all() or (m < 0).any():
        raise FVSanityError("maco magnitude must be finite and >= 0")
    if tuple(m.shape[1:]) != (h, w // 2 + 1):
        m = F.interpolate(m[None], size=(h, w // 2 + 1), mode="bilinear", align_corners=False)[0].clamp_min(0)
    return m


def maco_image(
    size: tuple[int, int],
    seeds: Sequence[int],
    magnitude: torch.Tensor | str | Path | None = None,
    decay_power: float = 1.0,
    contrast: float = 1.0,
    device=None,
) -> tuple[list[torch.Tensor], ImageFn, torch.Tensor]:
    """MACO (phase-only) parametrization: ``(params, image_fn, magnitude)``.

    The image is ``irfft2(magnitude * exp(i * phase))`` (orthonormal FFT) and only ``phase``
    [B, 3, H, W//2+1] is a parameter, so the amplitude spectrum stays what ``magnitude`` says
    through the whole optimization (except at the zero and Nyquist frequencies, whose imaginary
    part the real FFT drops: there the effective magnitude is ``|magnitude * cos(phase)|``).
    Fel et al. (2023) fix it to an average natural-image spectrum; then FVs cannot grow the
    high-frequency energy that makes unconstrained FVs adversarial-looking.

    Args:
        size: (H, W) px.
        seeds: one per element; element b's phase is uniform on [-pi, pi) from its own generator.
        magnitude: [3, H, W//2+1] (or [H, W//2+1], shared by the colours) amplitude spectrum in
            the same space as the image this returns (pre-decorrelation, pre-sigmoid; e.g. from
            :func:`magnitude_spectrum` of natural images), a ``.pt``/``.npy`` file holding one, or
            None for the default: the fft parametrization's spectral shape ``fft_scale(H, W,
            decay_power)`` (1/f^decay) with its amplitude set so the image's pixels have standard
            deviation ``contrast`` (in logit units, before colour decorrelation). A spectrum of
            another size is resized bilinearly.
        decay_power, contrast: shape and amplitude of the default magnitude (ignored when
            ``magnitude`` is given).

    Returns:
        params ``[phase]``, image_fn() -> [B, 3, H, W] logits-space, and the fixed magnitude
        [3, H, W//2+1] (float32, on ``device``).
    """
    h, w = size
    if magnitude is None:
        if not contrast > 0:
            raise FVSanityError(f"maco contrast must be > 0, got {contrast}")
        shape = fft_scale(h, w, decay_power)
        energy = _spectrum_energy(shape, w)  # sum |X|^2 over the full spectrum = sum of pixels^2
        mag = (shape * (contrast * math.sqrt(h * w) / torch.sqrt(energy))).expand(3, h, w // 2 + 1).contiguous()
    else:
        mag = _load_magnitude(magnitude, h, w)
    mag = mag.to(device)
    phases = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        phases.append((torch.rand(3, h, w // 2 + 1, generator=g) * 2 - 1) * math.pi)
    phase = torch.stack(phases).to(device).requires_grad_(True)

    def image_fn() -> torch.Tensor:
        spec = torch.complex(mag * torch.cos(phase), mag * torch.sin(phase))
        return torch.fft.irfftn(spec, s=(h, w), norm="ortho")

    return [phase], image_fn, mag


def magnitude_spectrum(images: torch.Tensor, decorrelate: bool = True, eps: float = 1e-3) -> torch.Tensor:
    """Mean amplitude spectrum of natural ``images`` in the space MACO's phase lives in.

    Maps RGB [N, 3, H, W] in [0, 1] back through the parametrization (logit of the clamped
    pixels, then the inverse colour decorrelation when ``decorrelate``) and averages
    ``|rfft2(x, norm="ortho")|`` over the images. Passing the result as ``maco``'s
    ``magnitude`` gives FVs whose amplitude spectrum is that of these images on average.

    Returns:
        [3, H, W//2+1] float32 (CPU).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise FVSanityError(f"magnitude_spectrum needs RGB images [N, 3, H, W], got {list(images.shape)}")
    x = torch.logit(images.detach().double().clamp(eps, 1 - eps))
    if decorrelate:
        inv = torch.linalg.inv(_COLOR.double())
        x = torch.einsum("bchw,dc->bdhw", x, inv)
    return torch.fft.rfftn(x, dim=(-2, -1), norm="ortho").abs().mean(0).float()


# ------------------------------------------------------------------------------- colour, RGB
def decorrelate_color(x: torch.Tensor) -> torch.Tensor:
    """Map decorrelated colour space -> RGB: per pixel, x @ C^T with Lucid's colour matrix.

    One batched matmul ``C @ x[b].view(3, H*W)`` (bit-identical to ``einsum("bchw,dc->bdhw")``,
    which permutes and copies: 45x slower for 16 x 3 x 227 x 227 on a 2-core CPU)."""
    c = _COLOR.to(device=x.device, dtype=x.dtype)
    return torch.matmul(c, x.flatten(-2)).view_as(x)


def to_valid_rgb(image_fn: ImageFn, decorrelate: bool = True) -> ImageFn:
    """Wrap an image function so it returns RGB in (0, 1) (sigmoid; finite gradients everywhere)."""

    def inner() -> torch.Tensor:
        x = image_fn()
        if decorrelate:
            x = decorrelate_color(x)
        return torch.sigmoid(x)

    return inner


# ---------------------------------------------------------------------------------- registry
@PARAMS.register("fft")
def fft(size, seeds, device=None, *, decorrelate: bool = True, sd: float = 0.01, decay_power: float = 1.0):
    """Fourier spectrum scaled by 1/f^decay_power, initial spectrum ~ N(0, sd) (lucent's default)."""
    params, fn = fft_image(size, seeds, sd=sd, decay_power=decay_power, device=device)
    return params, to_valid_rgb(fn, decorrelate=decorrelate)


@PARAMS.register("pixel")
def pixel(size, seeds, device=None, *, decorrelate: bool = True, sd: float = 0.01):
    """Raw pixels (pre-sigmoid), initial values ~ N(0, sd)."""
    params, fn = pixel_image(size, seeds, sd=sd, device=device)
    return params, to_valid_rgb(fn, decorrelate=decorrelate)


@PARAMS.register("maco")
def maco(size, seeds, device=None, *, decorrelate: bool = True, magnitude=None, decay_power: float = 1.0,
         contrast: float = 1.0):
    """Phase only, magnitude fixed (Fel et al. 2023); options as :func:`maco_image`."""
    params, fn, _ = maco_image(size, seeds, magnitude=magnitude, decay_power=decay_power, contrast=contrast,
                               device=device)
    return params, to_valid_rgb(fn, decorrelate=decorrelate)


def _describe(param) -> str:
    return repr(param) if isinstance(param, str) else getattr(param, "__name__", type(param).__name__)


def check_options(param, options=None) -> Callable:
    """The parametrization function of ``param`` (a name in :data:`PARAMS` or a function), after
    checking that it takes every key of ``options`` (:func:`fvsanity.registry.resolve_with_options`).

    Raises:
        FVSanityError: unknown name, not callable, or an option it does not take (one line
            naming the options it has).
    """
    return resolve_with_options(PARAMS, param, options, fixed=("size", "seeds", "device"), arg="param",
                                callable_word="function", hidden=("decorrelate",))


def make_image(param, size, seeds, device=None, *, decorrelate: bool = True, options=None):
    """``(params, image_fn)`` from a registered name or a parametrization function.

    Args:
        param: a name in :data:`PARAMS` or a function with the parametrization convention.
        size: (H, W) px; seeds: one per batch element.
        options: keyword options for the parametrization (e.g. ``{"decay_power": 1.5}``).

    Raises:
        FVSanityError: unknown name, an option the parametrization does not take, or a
            function that does not return ``(params, image_fn)``.
    """
    fn = check_options(param, options)
    out = fn(tuple(size), list(seeds), device, decorrelate=decorrelate, **dict(options or {}))
    if not (isinstance(out, tuple) and len(out) == 2 and callable(out[1])):
        raise FVSanityError(f"parametrization {_describe(param)} must return (params, image_fn)")
    params = list(out[0])
    if not params or not all(isinstance(p, torch.Tensor) and p.requires_grad and p.is_leaf for p in params):
        raise FVSanityError(f"parametrization {_describe(param)} must return leaf tensors with requires_grad=True")
    return params, out[1]


def image(size, seeds, param: str = "fft", decorrelate: bool = True, sd: float = 0.01, device=None, **options):
    """lucent's ``param.image``: ``(params, image_fn)`` with image_fn() -> RGB [B,3,H,W] in (0,1).

    ``param`` is a name in :data:`PARAMS` (``fft``, ``pixel``, ``maco``) or a parametrization
    function; ``sd`` goes to those that take it (fft, pixel), other options by keyword.
    """
    fn = PARAMS.get(param) if isinstance(param, str) else param
    if "sd" in inspect.signature(fn).parameters:
        options = {"sd": sd, **options}
    return make_image(fn, size, seeds, device, decorrelate=decorrelate, options=options)
