"""lucent's standard robustness transforms, batched: every element gets its own random draw.

lucent applies ``pad(12) -> jitter(8) -> random_scale(0.9..1.1) -> random_rotate(-10..10 deg)
-> jitter(4)`` with one draw for the whole batch, and its pixel sizes are made for 224 px. Here
the pipeline is one affine ``grid_sample`` per element (so different scales still share one
output size and one batched forward), the draws come from each element's own generator, and
pixel magnitudes scale with the image size (12 px at 224 px is 2 px at 32 px; lucent's issue #10).

A model with a fixed input size (a ViT whose patch grid and position embedding are fixed) gets
``apply(..., out_size=input size)``: the same pad, jitter, scale and rotation, read through a
window of the input size centred where lucent's larger output would be centred, so the model
sees exactly the size it accepts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TransformSpec:
    """Magnitudes for an image of ``size`` px (defaults = lucent's standard set at 224 px)."""

    pad: int = 12
    jitter1: int = 8
    jitter2: int = 4
    scales: tuple[float, ...] = tuple(1 + (i - 5) / 50 for i in range(11))
    angles: tuple[float, ...] = tuple(range(-10, 11)) + (0,) * 5

    @classmethod
    def standard(cls, size: int) -> TransformSpec:
        """lucent's standard transforms with pixel amounts scaled by ``size / 224``."""
        f = size / 224.0
        return cls(pad=max(1, round(12 * f)), jitter1=max(2, round(8 * f)), jitter2=max(1, round(4 * f)))

    @classmethod
    def none(cls) -> TransformSpec:
        return cls(pad=0, jitter1=1, jitter2=1, scales=(1.0,), angles=(0.0,))

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        h, w = size
        trim = (self.jitter1 - 1) + (self.jitter2 - 1)
        return h + 2 * self.pad - trim, w + 2 * self.pad - trim


def draw_params(spec: TransformSpec, seeds: Sequence[int], steps: int, offset: int = 1) -> torch.Tensor:
    """[B, steps, 6] transform draws (dx1, dy1, scale, angle, dx2, dy2), element b from its own seed.

    ``offset`` separates this stream from the one used for the initial image.
    """
    rows = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s) * 7919 + offset)
        j1 = torch.randint(0, spec.jitter1, (steps, 2), generator=g).float()
        sc = torch.tensor(spec.scales)[torch.randint(0, len(spec.scales), (steps,), generator=g)]
        an = torch.tensor(spec.angles, dtype=torch.float32)[torch.randint(0, len(spec.angles), (steps,), generator=g)]
        j2 = torch.randint(0, spec.jitter2, (steps, 2), generator=g).float()
        rows.append(torch.cat([j1, sc[:, None], an[:, None], j2], dim=1))
    return torch.stack(rows)


def apply(
    images: torch.Tensor, spec: TransformSpec, params: torch.Tensor, out_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Transform a batch: [B,3,H,W] in [0,1] -> [B,3,H',W'] (H' = ``spec.output_size``).

    ``params`` is [B, 6] (one step of :func:`draw_params`). Padding is grey (0.5) as in lucent;
    regions rotated in from outside the padded canvas are grey too. Differentiable in ``images``.
    ``out_size`` (H', W') overrides the output size (a fixed-input-size model: its input size);
    the sampling is the same, only the output window around the centre changes.
    """
    b, _, h, w = images.shape
    # The grey pad is never materialised: sampling the unpadded canvas minus 0.5 with zeros outside
    # is the same (pad and beyond read 0, i.e. grey), and a centred pad only rescales normalised
    # coordinates (padded x * (w + 2 pad) / w = unpadded x), so theta is divided by w, not w + 2 pad.
    ho, wo = spec.output_size((h, w)) if out_size is None else (int(out_size[0]), int(out_size[1]))
    p = params.to(images.device, images.dtype)
    dx1, dy1, s, ang, dx2, dy2 = p.unbind(1)
    # Crop offsets relative to the centred window, in input pixels.
    cx1 = dx1 - (spec.jitter1 - 1) / 2
    cy1 = dy1 - (spec.jitter1 - 1) / 2
    cx2 = dx2 - (spec.jitter2 - 1) / 2
    cy2 = dy2 - (spec.jitter2 - 1) / 2
    rad = ang * (math.pi / 180)
    cos, sin = torch.cos(rad), torch.sin(rad)
    # output pixel offset u (from centre) -> input offset R(u + c2)/s + c1
    a11, a12, a21, a22 = cos / s, -sin / s, sin / s, cos / s
    tx = a11 * cx2 + a12 * cy2 + cx1
    ty = a21 * cx2 + a22 * cy2 + cy1
    # grid[b, i, j] = theta[b] @ (x_j, y_i, 1), x_j / y_i the output's normalised pixel centres (as
    # F.affine_grid(align_corners=False) builds it, without its [B, H*W, 3] x [3, 2] batched matmul)
    xs = (torch.arange(wo, device=images.device, dtype=images.dtype) * 2 + 1) / wo - 1
    ys = (torch.arange(ho, device=images.device, dtype=images.dtype) * 2 + 1) / ho - 1
    col = lambda v: v[:, None, None]  # noqa: E731 - [B] -> [B, 1, 1]
    gx = col(a11 * wo / w) * xs[None, None, :] + (col(a12 * ho / w) * ys[None, :, None] + col(2 * tx / w))
    gy = col(a21 * wo / h) * xs[None, None, :] + (col(a22 * ho / h) * ys[None, :, None] + col(2 * ty / h))
    grid = torch.stack([gx, gy], -1)  # [B, ho, wo, 2]
    # grey outside the canvas: sample (x - 0.5) with zero padding, add 0.5 back
    return F.grid_sample(images - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 0.5
