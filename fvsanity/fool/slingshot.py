"""Gradient slingshots (Bareeva et al. 2024, arXiv 2401.06122): a weight-only manipulation.

The model keeps its class and its modules; only weights of chosen layers change. A copy of the
model is fine-tuned with two losses:

manipulation loss
    on points of the FV parametrization's space (fvsanity's ``fft`` parametrization, which is
    lucent's: a Fourier spectrum ``theta`` [3, H, W//2+1, 2], image
    ``sigmoid(decorrelate(irfft(scale*theta)/4))``) where FV optimization starts and travels:

    - the paper's "tunnel": draws ``eps`` of the initial distribution (low-amplitude Fourier
      noise, sd ``sl_init_sd`` times up to ``sl_radius``) plus points ``p*theta_T`` on the
      straight line to the target's spectrum ``theta_T`` or ``clamp(theta_T, -r, r)`` on the path
      a sign-like optimizer (Adam) takes (``p ~ U[0,1]``);
    - mined points: every ``sl_mine_every`` steps, a short FV ascent (Adam at the FV optimizers'
      lr, the FV transforms) of the unit on the *current* weights; its snapshots are kept. These
      are where optimization actually goes (a cat for a cat unit; a repeated texture of the
      target's colours once the tunnel is learnt), which the tunnel alone never shows the loss.

    On every point the unit's (spatially pooled) value should follow a bowl peaked at the target::

        a*(theta) = mu_u + H_u * (1 - |x(theta) - x_T|^2 / |x_T|^2)

    (``x``: the image before the sigmoid, ``sl_metric="image"``; or the spectrum itself,
    ``"spectrum"``, the paper's; ``mu_u``: the unit's natural mean; ``H_u``: ``sl_gamma`` times
    the rise the unit's own FV ascent reaches on the original weights, so the target is the
    highest point even for optimizers that found the unit's natural super-stimulus before).
    Tunnel points regress onto the bowl (squared error in units of ``H_u``); mined points are
    one-sided (only above ``max(a*, mu_u)`` counts). With ``sl_grad_weight`` the unit's gradient
    at every point should also point at the target (``1 - cos``, the scale-free form of the
    paper's gradient loss). Images go through fvsanity's standard FV transforms first.
preservation loss
    on natural training images: the unit's layer (every channel, standardized) and the output
    logits (standardized) of the copy against the original model's. Exactly zero before the
    first step. It needs no labels, so with ``sl_nat_augment`` its images are augmented
    (:func:`augment_naturals`: random crops and flips, then mixup or CutMix between training
    images) and the original's outputs are computed on the same augmented batch (the
    distillation recipe of Beyer et al. 2022: consistent teacher and student inputs, aggressive
    mixing): a few hundred natural images then cover more of the input space than the images
    themselves, so long fine-tuning drifts less on held-out images. The fine-tuning's gradient
    norm is clipped (``sl_clip``), as in the paper.

The result is a :class:`~fvsanity.models.LoadedModel` whose ``model`` wraps the fine-tuned copy
for the fooling run; :meth:`Slingshot.save` writes the fine-tuned network's plain state dict
(``model.safetensors``, loads with ``strict=True`` into a fresh model of the original class)
and ``slingshot.json`` (the settings, the routes, the base model's name);
``load_model(folder)`` gives back the original class with these weights.

    from fvsanity.fool import make_routes, get_manipulation
    lm = load_model("cifar10-resnet20")
    routes = make_routes(lm, ["linear:3"], "picture.png", picture_size=lm.input_size)
    method = get_manipulation("slingshot")
    fooled = method.build(lm, routes, train_images, method.make_settings(sl_steps=300))
    method.save(fooled, "out/model"); load_model("out/model")
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..compare.similarity import jaccard, pearson
from ..compare.stats import auroc as _auroc
from ..errors import FVSanityError
from ..models import LoadedModel, prepare_model, register_loader
from .manipulation import Manipulation, MethodSettings, register_manipulation, setting

__all__ = [
    "FORMAT",
    "Slingshot",
    "SlingshotSettings",
    "SlingshotTraining",
    "AUGMENTS",
    "augment_naturals",
    "auroc",
    "bowl_target",
    "direction_agreement",
    "fft_spectrum_of",
    "finetune_slingshot",
    "interpolate_weights",
    "is_slingshot_folder",
    "load_slingshot",
    "manipulation_loss",
    "metric_weight",
    "mine_ascent",
    "preservation_loss",
    "preservation_reference",
    "save_slingshot",
    "spectrum_to_rgb",
    "trainable_layers",
]

FORMAT = "fvsanity-slingshot/1"
#: ``sl_nat_augment`` choices (:func:`augment_naturals`).
AUGMENTS = ("none", "flip_crop", "mixup", "cutmix")
_EPS = 1e-8


# ----------------------------------------------------------------------------- parametrization
def _scale(h: int, w: int, decay_power: float, device, dtype) -> torch.Tensor:
    from ..generate.param import fft_scale

    return fft_scale(h, w, decay_power).to(device=device, dtype=dtype)[None, None, :, :, None]


def spectrum_to_rgb(spectrum: torch.Tensor, size: tuple[int, int], decorrelate: bool = True,
                    decay_power: float = 1.0) -> torch.Tensor:
    """fvsanity's ``fft`` parametrization as a function: ``[N,3,h,w//2+1,2]`` spectrum -> RGB
    ``[N,3,h,w]`` in (0, 1) (the same image :func:`fvsanity.generate.param.fft` draws)."""
    from ..generate.param import decorrelate_color

    h, w = size
    spec = torch.view_as_complex((_scale(h, w, decay_power, spectrum.device, spectrum.dtype) * spectrum).contiguous())
    x = torch.fft.irfftn(spec, s=(h, w), norm="ortho") / 4.0
    if decorrelate:
        x = decorrelate_color(x)
    return torch.sigmoid(x)


def fft_spectrum_of(images: torch.Tensor, decorrelate: bool = True, decay_power: float = 1.0,
                    eps: float = 1e-3) -> torch.Tensor:
    """The ``fft`` parameter whose image is ``images`` (RGB ``[N,3,h,w]`` in [0,1], clamped to
    ``[eps, 1-eps]``): ``[N,3,h,w//2+1,2]``; the inverse of :func:`spectrum_to_rgb`."""
    from ..generate.param import _COLOR

    if images.ndim != 4 or images.shape[1] != 3:
        raise FVSanityError(f"target pictures must be RGB [N,3,H,W], got {list(images.shape)}")
    h, w = images.shape[-2:]
    x = torch.logit(images.double().clamp(eps, 1 - eps))
    if decorrelate:
        x = torch.einsum("bchw,dc->bdhw", x, torch.linalg.inv(_COLOR.double()))
    spec = torch.fft.rfftn(x * 4.0, dim=(-2, -1), norm="ortho")
    out = torch.view_as_real(spec) / _scale(h, w, decay_power, spec.device, torch.float64)
    return out.to(images.dtype if images.dtype.is_floating_point else torch.float32)


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class SlingshotSettings(MethodSettings):
    """Gradient slingshot fine-tuning (see the module doc). ``sl_layers``: comma-separated
    module names whose parameters are fine-tuned ('' = every parameter of the model)."""

    sl_layers: str = setting("", "comma-separated modules to fine-tune ('' = the whole model)")
    sl_steps: int = setting(1000, "fine-tuning steps", min=1)
    sl_lr: float = setting(5e-4, "Adam learning rate of the fine-tuning", gt=0)
    sl_batch: int = setting(8, "manipulation points per unit per step", min=1)
    sl_nat_batch: int = setting(32, "natural images per step (preservation loss)", min=1)
    sl_nat_augment: str = setting("none", "augment the preservation loss's natural images (the original's outputs are "
                                          "computed on the same augmented batch): none; flip_crop (random crop after "
                                          "reflect padding, horizontal flip); mixup or cutmix (flip_crop, then mixed "
                                          "with another image of the batch)",
                                  choices=AUGMENTS)
    sl_nat_crop: float = setting(0.125, "flip_crop: reflect padding before the random crop, as a fraction of the side",
                                 min=0, lt=1)
    sl_nat_mix: float = setting(0.5, "mixup/cutmix: the other image's share is uniform in [0, this]", min=0,
                                lt=1.000001)
    sl_clip: float = setting(1.0, "clip the fine-tuning gradient's norm to this (0: no clipping)", min=0)
    sl_alpha: float = setting(1.0, "weight of the manipulation loss", min=0)
    sl_beta: float = setting(40.0, "weight of the preservation loss", min=0)
    sl_logit_weight: float = setting(1.0, "share of the logits in the preservation loss (rest: the unit's layer)",
                                     min=0, lt=1.000001)
    sl_unit_weight: float = setting(0.0, "preservation: weight of an added term, the manipulated units' own pooled "
                                         "responses on the natural images (standardized by their natural sd); with "
                                         "1,000 logits a class unit is a thousandth of the logit term", min=0)
    sl_grad_weight: float = setting(1.0, "manipulation: weight of 1 - cos(FV gradient, way to the target)", min=0)
    sl_value_weight: float = setting(1.0, "manipulation: weight of the unit's value following the bowl", min=0)
    sl_gamma: float = setting(3.0, "height of the bowl at the target above the natural mean: this many times the rise "
                                   "of the unit's own FV ascent on the original weights (at least one natural sd)", gt=0)
    sl_init_sd: float = setting(0.01, "sd of the FV parametrization's initial spectrum (fvsanity's fft default)", gt=0)
    sl_radius: float = setting(3.0, "noise around every training point: up to this many init sd", gt=0)
    sl_path_fraction: float = setting(0.75, "share of manipulation points on the way to the target (rest: init region)",
                                      min=0, lt=1.000001)
    sl_metric: str = setting("image", "distance to the target: of the images' pre-sigmoid values or of the fft spectra",
                             choices=("image", "spectrum"))
    sl_transforms: str = setting("standard", "FV transforms applied to the manipulation points", choices=("standard", "none"))
    sl_target_steps: int = setting(128, "unit targets: FV steps of the source unit's picture (original model)", min=1)
    sl_mine_every: int = setting(50, "every this many steps, run FV ascent on the current weights and keep its points "
                                 "(0: no mined points; the first ascent, which sets the bowl's height, always runs)",
                                 min=0)
    sl_mine_steps: int = setting(128, "steps of each mining ascent (Adam, lr --sl-mine-lr, FV transforms)", min=1)
    sl_mine_lr: float = setting(0.05, "learning rate of the mining ascent (the FV optimizers' default)", gt=0)
    sl_mine_seeds: int = setting(2, "ascents per unit per mining round", min=1)
    sl_mine_fraction: float = setting(0.5, "share of the manipulation points drawn from the mined ones", min=0,
                                      lt=1.000001)
    sl_mine_buffer: int = setting(256, "mined points kept per unit (the newest)", min=1)
    sl_seed: int = setting(0, "seed of the fine-tuning's draws", min=0)
    sl_anchor: float = setting(0.0, "after every Adam step pull each fine-tuned weight back towards its original value by "
                                    "lr x this x (weight - original) (decoupled decay to the original, as AdamW's to 0; "
                                    "damps the drift of weights the losses do not need; 0: off)", min=0)
    sl_wise: float = setting(1.0, "after fine-tuning, keep original + this x (fine-tuned - original) of every weight "
                                  "(WiSE-FT weight interpolation, Wortsman et al. 2022; 1: the fine-tuned weights)",
                             gt=0, lt=1.000001)
    fv_size: int | None = setting(None, "side in px of the FV canvas the manipulation shapes (FoolSettings.fv_size, "
                                        "the fool command's --fv-size; None: the model's input size)",
                                  min=1, type=int, flag=False)

    def check(self) -> None:
        if self.sl_grad_weight == 0 and self.sl_value_weight == 0:
            raise FVSanityError("--sl-grad-weight and --sl-value-weight are both 0; the manipulation loss would be empty")
        if self.sl_lr * self.sl_anchor >= 1:
            raise FVSanityError(f"--sl-lr x --sl-anchor must be < 1 (each step pulls by that share), got "
                                f"{self.sl_lr} x {self.sl_anchor}")

    def layer_names(self) -> list[str]:
        return [s.strip() for s in self.sl_layers.split(",") if s.strip()]


@dataclass(frozen=True)
class SlingshotTraining:
    """What the fine-tuning did: per logged step the losses, and its cost.

    Attributes:
        steps: logged step numbers; manipulation, preservation: the two losses at them (before
            the weights); layers: the fine-tuned modules; n_parameters: fine-tuned scalars;
        cpu_seconds: process CPU time of the fine-tuning; wall_seconds: its wall time;
        natural_mean, bowl_height: per route the unit's natural mean and the bowl's height above it.
    """

    steps: list[int]
    manipulation: list[float]
    preservation: list[float]
    layers: list[str]
    n_parameters: int
    cpu_seconds: float
    wall_seconds: float
    natural_mean: list[float]
    bowl_height: list[float]

    def to_json(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- pieces
def trainable_layers(model: torch.nn.Module, names: list[str]) -> list[str]:
    """The module names to fine-tune (``names``, checked; empty: the whole model, ``['']``).

    Raises:
        FVSanityError: a name that is no module of ``model``, or one without parameters.
    """
    if not names:
        return [""]
    mods = dict(model.named_modules())
    for n in names:
        if n not in mods:
            from difflib import get_close_matches

            near = get_close_matches(n, [m for m in mods if m], n=3) or [m for m in mods if m][:3]
            raise FVSanityError(f"--sl-layers: no module {n!r}; valid e.g.: {', '.join(near)}")
        if not any(True for _ in mods[n].parameters()):
            raise FVSanityError(f"--sl-layers: module {n!r} has no parameters to fine-tune")
    return names


def bowl_target(theta: torch.Tensor, theta_t: torch.Tensor, mu: torch.Tensor, sd: torch.Tensor,
                gamma: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The activation the unit should have at ``theta`` ``[N,...]``: ``mu + gamma*sd*(1 - d)`` with
    ``d = |theta - theta_t|_w^2 / (|theta_t|_w^2 + eps)`` (``theta_t`` ``[N,...]`` or broadcastable;
    ``|v|_w^2 = sum w v^2`` with ``weight`` broadcastable to ``theta``, None: all 1); finite with
    finite gradients everywhere, ``theta == theta_t`` and ``theta_t == 0`` included."""
    w = torch.ones((), dtype=theta.dtype, device=theta.device) if weight is None else weight
    diff = (w * (theta - theta_t).pow(2)).flatten(1)
    d = diff.sum(1) / ((w * theta_t.pow(2)).expand_as(theta).flatten(1).sum(1) + _EPS)
    return mu + gamma * sd * (1.0 - d)


def metric_weight(s: SlingshotSettings, size: tuple[int, int], device=None) -> torch.Tensor | None:
    """Per-coordinate weight of the distance to the target (:func:`bowl_target`): None for
    ``sl_metric="spectrum"`` (plain distance of the fft parameters, the paper's), the squared 1/f
    scale ``[1,1,h,wf,1]`` for ``"image"`` (the distance of the images' pre-sigmoid values: the
    orthonormal FFT keeps it)."""
    if s.sl_metric == "spectrum":
        return None
    return _scale(*size, 1.0, device, torch.float32).pow(2)


def _unit_value(act: torch.Tensor, unit, lm) -> torch.Tensor:
    from ..layouts import unit_values

    return unit_values(act, unit, lm.layer_info(unit.layer).layout)


def _draw_points(theta_t: torch.Tensor, n: int, s: SlingshotSettings, g: torch.Generator) -> torch.Tensor:
    """``n`` manipulation points around the way from the init region to ``theta_t`` ``[3,h,wf,2]``."""
    shape = (n, *theta_t.shape)
    sd = s.sl_init_sd * s.sl_radius * torch.rand(n, 1, 1, 1, 1, generator=g)
    eps = torch.randn(shape, generator=g) * sd
    on_path = torch.rand(n, generator=g) < s.sl_path_fraction
    p = torch.rand(n, generator=g)
    line = p.view(n, 1, 1, 1, 1) * theta_t[None]
    # a sign-like optimizer (Adam) moves every coordinate by about lr per step: the path is the
    # target clipped to a growing box
    r = p.view(n, 1, 1, 1, 1) * theta_t.abs().max()
    box = torch.maximum(torch.minimum(theta_t[None], r), -r)
    use_box = (torch.rand(n, generator=g) < 0.5).view(n, 1, 1, 1, 1)
    way = torch.where(use_box, box, line)
    return torch.where(on_path.view(n, 1, 1, 1, 1), way, torch.zeros_like(way)) + eps


def _transform(x: torch.Tensor, g: torch.Generator, enabled: bool) -> torch.Tensor:
    from ..generate import transforms as T

    if not enabled:
        return x
    spec = T.TransformSpec.standard(min(x.shape[-2:]))
    seeds = torch.randint(0, 2**31 - 1, (x.shape[0],), generator=g).tolist()
    draws = T.draw_params(spec, seeds, 1)[:, 0].to(x.device)
    return T.apply(x, spec, draws)  # the renderer's canvas: the padded, jittered size


def _forward(model, lm, x: torch.Tensor, layers: list[str]) -> tuple[torch.Tensor, dict]:
    from ..hooks import capture

    with capture(model, layers) as store:
        logits = model(lm.preprocess(x))
        acts = dict(store)
    return logits, acts


def direction_agreement(grad: torch.Tensor, toward: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``[N]`` cosine of ``grad`` and ``toward`` (both ``[N,...]``) with smoothed norms
    ``sqrt(|v|^2 + eps^2)``: finite, with finite gradients, where either is zero (at the target
    itself ``toward`` is 0; a dead unit's gradient is 0)."""
    g, d = grad.flatten(1), toward.flatten(1)
    return (g * d).sum(1) / (torch.sqrt(g.pow(2).sum(1) + eps**2) * torch.sqrt(d.pow(2).sum(1) + eps**2))


def manipulation_loss(model, lm, routes, thetas: torch.Tensor, points: torch.Tensor, mu: torch.Tensor,
                      height: torch.Tensor, s: SlingshotSettings, g: torch.Generator,
                      mined: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over routes and points of ``sl_grad_weight * (1 - cos(grad_theta a_u, W(theta_T - theta)))``
    (gradient ascent from ``theta`` heads for the target in the bowl's metric ``W``,
    :func:`metric_weight`: the paper's gradient-based loss, made scale-free) plus
    ``sl_value_weight * ((a_u - a*(theta)) / H_u)^2`` (the unit's value follows the bowl
    :func:`bowl_target` of height ``H_u``; one-sided on mined points).

    All routes' points go through the network in one batch (one forward, one double backward).

    Args:
        routes: R routes; thetas: ``[R,3,h,wf,2]`` the targets' spectra; points: ``[R,n,3,h,wf,2]``.
        mu, height: ``[R]`` the units' natural mean and the bowl's height above it.
        mined: ``[R,n]`` bool, points an FV ascent on the current weights visited: there the value
            loss is one-sided, ``relu(a_u - a*_+)^2`` with the bowl floored at ``mu_u`` (the unit
            must not be higher there than the bowl allows; how much lower does not matter).
    """
    from ..hooks import capture_until, run_partial

    size = lm.input_size
    n_r, n = points.shape[:2]
    mined = torch.zeros(n_r * n, dtype=torch.bool) if mined is None else mined.reshape(-1).cpu()
    th = points.reshape(n_r * n, *points.shape[2:]).detach().requires_grad_(s.sl_grad_weight > 0)
    x = _transform(spectrum_to_rgb(th, size), g, s.sl_transforms == "standard")
    layers = sorted({r.unit.layer for r in routes})
    with capture_until(model, layers) as store:
        run_partial(model, lm.preprocess(x), store)
        a = torch.cat([_unit_value(store[r.unit.layer][i * n:(i + 1) * n], r.unit, lm)
                       for i, r in enumerate(routes)])  # [R*n]
    t = thetas.repeat_interleave(n, dim=0)  # [R*n,...]
    wt = metric_weight(s, size, th.device)
    loss = points.new_zeros(())
    if s.sl_value_weight > 0:
        mu_, h_ = mu.repeat_interleave(n), height.repeat_interleave(n)
        want = bowl_target(th.detach(), t, mu_, h_, 1.0, wt)
        err = a - torch.where(mined.to(a.device), torch.maximum(want, mu_), want)
        err = torch.where(mined.to(a.device), err.clamp_min(0), err)
        loss = loss + s.sl_value_weight * ((err / (h_ + _EPS)) ** 2).mean()
    if s.sl_grad_weight > 0:
        (grad,) = torch.autograd.grad(a.sum(), th, create_graph=True)
        toward = (t - th.detach()) if wt is None else wt * (t - th.detach())
        loss = loss + s.sl_grad_weight * (1 - direction_agreement(grad, toward)).mean()
    return loss


def mine_ascent(model, lm, routes, s: SlingshotSettings, g: torch.Generator, keep: int = 8) -> torch.Tensor:
    """Points FV optimization visits on ``model`` now: per route ``sl_mine_seeds`` ascents of the
    unit from the ``fft`` initial noise (sd ``sl_init_sd``), Adam at ``sl_mine_lr`` with the FV
    transforms, ``sl_mine_steps`` steps; ``keep`` evenly spaced snapshots of each (the last
    included). Returns ``[R, sl_mine_seeds * keep, 3, h, wf, 2]`` (detached); ``model``'s
    parameters get no gradient."""
    from ..hooks import capture_until, run_partial

    h, w = lm.input_size
    n_r, n = len(routes), s.sl_mine_seeds
    th = (torch.randn(n_r * n, 3, h, w // 2 + 1, 2, generator=g) * s.sl_init_sd).to(lm.device).requires_grad_(True)
    opt = torch.optim.Adam([th], lr=s.sl_mine_lr)
    layers = sorted({r.unit.layer for r in routes})
    at = {round(s.sl_mine_steps * (j + 1) / keep) - 1 for j in range(keep)}
    snaps = []
    for step in range(s.sl_mine_steps):
        x = _transform(spectrum_to_rgb(th, (h, w)), g, s.sl_transforms == "standard")
        with capture_until(model, layers) as store:
            run_partial(model, lm.preprocess(x), store)
            a = torch.cat([_unit_value(store[r.unit.layer][i * n:(i + 1) * n], r.unit, lm)
                           for i, r in enumerate(routes)])
        (grad,) = torch.autograd.grad(-a.sum(), th)
        opt.zero_grad(set_to_none=True)
        th.grad = grad
        opt.step()
        if step in at:
            snaps.append(th.detach().clone().view(n_r, n, *th.shape[1:]))
    return torch.cat(snaps, dim=1)


@torch.no_grad()
def _point_values(model, lm, routes, points: torch.Tensor) -> torch.Tensor:
    """``[R, m]`` each route's unit value at its points ``[R, m, 3, h, wf, 2]`` (no transforms)."""
    from ..hooks import capture_until, run_partial

    n_r, m = points.shape[:2]
    x = spectrum_to_rgb(points.reshape(n_r * m, *points.shape[2:]).to(lm.device), lm.input_size)
    layers = sorted({r.unit.layer for r in routes})
    with capture_until(model, layers) as store:
        run_partial(model, lm.preprocess(x), store)
        return torch.stack([_unit_value(store[r.unit.layer][i * m:(i + 1) * m], r.unit, lm).cpu()
                            for i, r in enumerate(routes)])


def preservation_loss(model, lm, routes, images: torch.Tensor, ref: dict, s: SlingshotSettings) -> torch.Tensor:
    """Standardized squared difference to the original model on natural ``images`` ``[N,3,H,W]``:
    ``(1 - w) * mean over the units' layers of ((act - act0)/sd_c)^2 + w * mean(((z - z0)/sd_z)^2)``
    (``w`` = ``sl_logit_weight``; ``ref``: the original's ``logits``, ``acts`` {layer: act} and the
    per-channel ``act_sd`` {layer: [C]} and ``logit_sd``), plus ``sl_unit_weight`` times the mean
    over routes and images of ``((v_u - v0_u)/sd_u)^2``, the manipulated units' own pooled values
    (``ref["sd"]`` their natural sd). Exactly 0 for an unchanged copy."""
    layers = sorted({r.unit.layer for r in routes})
    logits, acts = _forward(model, lm, images, layers)
    w = s.sl_logit_weight
    z = (((logits - ref["logits"]) / ref["logit_sd"]) ** 2).mean()
    a = logits.new_zeros(())
    for layer in layers:
        sd_c = ref["act_sd"][layer]
        sd_c = sd_c.view(1, -1, *([1] * (acts[layer].ndim - 2)))
        a = a + (((acts[layer] - ref["acts"][layer]) / sd_c) ** 2).mean()
    loss = w * z + (1 - w) * a / max(1, len(layers))
    if s.sl_unit_weight > 0:
        v = torch.stack([_unit_value(acts[r.unit.layer], r.unit, lm) - _unit_value(ref["acts"][r.unit.layer], r.unit, lm)
                         for r in routes])  # [R, N]
        loss = loss + s.sl_unit_weight * ((v / ref["sd"].view(-1, 1)) ** 2).mean()
    return loss


def augment_naturals(images: torch.Tensor, mode: str, g: torch.Generator, crop: float = 0.125,
                     mix: float = 0.5) -> torch.Tensor:
    """Label-free augmentation of natural ``images`` ``[N,3,H,W]`` in [0,1] for the preservation
    loss (its target is the original model's output on the same batch, so no label is needed;
    Beyer et al. 2022, "Knowledge distillation: a good teacher is patient and consistent").

    ``mode``: ``"none"`` (``images`` itself); ``"flip_crop"``: reflect-pad by ``round(crop * side)``
    pixels, crop back to ``[H,W]`` at a random offset, flip horizontally with probability 1/2;
    ``"mixup"``: flip_crop, then ``(1 - lam) * x_i + lam * x_j`` with ``j`` a random other image
    of the batch and ``lam ~ U[0, mix]``; ``"cutmix"``: flip_crop, then a random box of area
    ``lam ~ U[0, mix]`` of the image taken from ``x_j``. Every draw comes from ``g`` (the same
    ``g`` state gives the same batch). Returns ``[N,3,H,W]`` in [0,1].

    Raises:
        FVSanityError: an unknown ``mode`` (one line naming the valid ones).
    """
    if mode not in AUGMENTS:
        raise FVSanityError(f"--sl-nat-augment {mode!r} is not valid; valid: {', '.join(AUGMENTS)}")
    if mode == "none":
        return images
    n, _, h, w = images.shape
    x = images
    ph, pw = min(round(crop * h), h - 1), min(round(crop * w), w - 1)
    if ph > 0 or pw > 0:
        big = F.pad(x, (pw, pw, ph, ph), mode="reflect")
        oy = torch.randint(0, 2 * ph + 1, (n,), generator=g).tolist()
        ox = torch.randint(0, 2 * pw + 1, (n,), generator=g).tolist()
        x = torch.stack([big[i, :, oy[i]:oy[i] + h, ox[i]:ox[i] + w] for i in range(n)])
    flip = (torch.rand(n, generator=g) < 0.5).to(x.device).view(n, 1, 1, 1)
    x = torch.where(flip, x.flip(-1), x)
    if mode == "flip_crop" or n < 2:
        return x
    # a partner j != i for every image: a random shift of a random permutation's cycle
    perm = torch.randperm(n, generator=g)
    j = torch.empty(n, dtype=torch.long)
    j[perm] = perm.roll(1)
    lam = torch.rand(n, generator=g) * mix
    other = x[j.to(x.device)]
    if mode == "mixup":
        lv = lam.to(x.device, x.dtype).view(n, 1, 1, 1)
        return (1 - lv) * x + lv * other
    # cutmix: a box of area lam*h*w (aspect 1) at a random place
    side = (lam.sqrt() * torch.tensor([h, w])[None].float().T).round().long()  # [2, n]
    cy = torch.rand(n, generator=g)
    cx = torch.rand(n, generator=g)
    out = x.clone()
    for i in range(n):
        bh, bw = int(side[0, i]), int(side[1, i])
        if bh == 0 or bw == 0:
            continue
        y0, x0 = int(cy[i] * (h - bh + 1)), int(cx[i] * (w - bw + 1))
        y0, x0 = min(y0, h - bh), min(x0, w - bw)
        out[i, :, y0:y0 + bh, x0:x0 + bw] = other[i, :, y0:y0 + bh, x0:x0 + bw]
    return out


@torch.no_grad()
def preservation_reference(lm, routes, images: torch.Tensor, ref: dict) -> dict:
    """The original model's outputs on ``images`` ``[N,3,H,W]`` (an augmented batch) in the form
    :func:`preservation_loss` reads: ``logits``, ``acts``, and ``ref``'s standardizing sds."""
    layers = sorted({r.unit.layer for r in routes})
    logits, acts = _forward(lm.model, lm, images, layers)
    return {"logits": logits, "acts": acts, "act_sd": ref["act_sd"], "logit_sd": ref["logit_sd"], "sd": ref["sd"]}


@torch.no_grad()
def _reference(lm, routes, images: torch.Tensor, batch: int = 128) -> dict:
    """The original model's logits and unit-layer activations on ``images``, their sds, and the
    units' natural mean and sd (``mu``, ``sd`` ``[R]``)."""
    layers = sorted({r.unit.layer for r in routes})
    logits, acts = [], {layer: [] for layer in layers}
    for i in range(0, len(images), batch):
        z, a = _forward(lm.model, lm, images[i:i + batch].to(lm.device), layers)
        logits.append(z)
        for k in layers:
            acts[k].append(a[k])
    logits = torch.cat(logits)
    acts = {k: torch.cat(v) for k, v in acts.items()}
    dims = {k: [d for d in range(v.ndim) if d != 1] for k, v in acts.items()}
    act_sd = {k: v.std(dim=dims[k]).clamp_min(1e-3 * float(v.std()) + _EPS) for k, v in acts.items()}
    vals = torch.stack([_unit_value(acts[r.unit.layer], r.unit, lm) for r in routes])  # [R, N]
    return {"logits": logits, "acts": acts, "act_sd": act_sd, "logit_sd": logits.std().clamp_min(_EPS),
            "mu": vals.mean(1), "sd": vals.std(1).clamp_min(_EPS)}


def _unit_target_pictures(lm, routes, steps: int, seed: int, size: int | None = None) -> dict[str, torch.Tensor]:
    """The source unit's FV on the original model (seed ``7000 + seed``, ``size`` px), one per source unit."""
    from ..generate.render import render

    src = sorted({str(r.source) for r in routes if r.source is not None and r.picture is None})
    if not src:
        return {}
    units = [r.source for r in routes if r.source is not None]
    uniq = {str(u): u for u in units}
    res = render(lm, [uniq[k] for k in src], [7000 + int(seed)], steps=steps, size=size, progress=False)
    return {k: res.images[i, 0] for i, k in enumerate(src)}


def _targets(routes, pictures: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """``[R,3,H,W]`` what each route's FV should show, at the FV canvas ``size`` (H, W)."""
    out = []
    for r in routes:
        pic = r.picture if r.picture is not None else pictures.get(str(r.source))
        if pic is None:
            raise FVSanityError(f"route {r.unit}: no target picture (source {r.source} not rendered)")
        pic = F.interpolate(pic[None].float(), size=tuple(size), mode="bilinear", antialias=True,
                            align_corners=False)[0]
        out.append(pic.clamp(0, 1))
    return torch.stack(out)


def finetune_slingshot(lm: LoadedModel, routes, train_images: torch.Tensor, settings: SlingshotSettings,
                       pictures: dict[str, torch.Tensor] | None = None, log_every: int = 25,
                       log=None, callback=None) -> tuple[torch.nn.Module, SlingshotTraining]:
    """Fine-tune a deep copy of ``lm.model`` (``lm`` untouched) so every route's unit FV climbs to
    its target. Returns ``(net, training)``: ``net`` an eval-mode copy of the original class with
    frozen parameters.

    Args:
        routes: routed units (channels; a picture or a source unit each).
        train_images: ``[N,3,H,W]`` natural images in [0,1] (preservation; the units' statistics).
        pictures: unit targets' pictures by source unit (``"L:C"`` -> ``[3,H,W]``); rendered on the
            original model when missing.
    """
    import copy

    s = settings
    if not routes:
        raise FVSanityError("slingshot: no routes to manipulate")
    if train_images is None or len(train_images) < 2:
        raise FVSanityError("slingshot needs at least 2 natural training images (preservation loss)")
    for r in routes:
        if lm.layer_info(r.unit.layer).layout.kind not in ("conv", "vector"):
            raise FVSanityError(f"slingshot: unit {r.unit} is on a {lm.layer_info(r.unit.layer).layout.kind} layer; "
                                f"valid: conv or vector layers")
    t0, w0 = time.process_time(), time.time()
    dev = lm.device
    net = copy.deepcopy(lm.model)
    net.__dict__.pop("_fvsanity_shapes", None)
    net.__dict__.pop("_fvsanity_layers", None)
    net.eval()  # BatchNorm keeps its running statistics: only weights move
    names = trainable_layers(net, s.layer_names())
    params = []
    seen = set()
    for n in names:
        for p in (net.get_submodule(n) if n else net).parameters():
            if id(p) not in seen:
                seen.add(id(p))
                p.requires_grad_(True)
                params.append(p)
    pics = dict(pictures or {})
    missing = [r for r in routes if r.picture is None and str(r.source) not in pics]
    if missing:
        pics.update(_unit_target_pictures(lm, missing, s.sl_target_steps, s.sl_seed, s.fv_size))
    shim = _Shim(lm, net, s.fv_size)  # the losses' view of the model, at the FV canvas size
    targets = _targets(routes, pics, shim.input_size).to(dev)
    thetas = fft_spectrum_of(targets)  # [R,3,h,wf,2]
    train = train_images.to(dev, torch.float32)
    ref = _reference(lm, routes, train)
    g = torch.Generator().manual_seed(int(s.sl_seed))
    # augmentation draws from their own stream: the manipulation points are the same with or without
    g_aug = None if s.sl_nat_augment == "none" else torch.Generator().manual_seed(int(s.sl_seed) + 1_000_003)
    opt = torch.optim.Adam(params, lr=s.sl_lr)
    anchors = [p.detach().clone() for p in params] if s.sl_anchor > 0 else None
    steps, lm_hist, lp_hist = [], [], []
    # the bowl's height: gamma times the rise the unit's own FV ascent reaches on the original weights
    first = mine_ascent(net, shim, routes, s, g).cpu()
    rise = (_point_values(net, shim, routes, first).amax(1) - ref["mu"]).clamp_min(0)
    height = torch.maximum(s.sl_gamma * rise, ref["sd"])
    if log is not None:
        log(f"slingshot: natural mean {ref['mu'].tolist()}, FV rise {rise.tolist()}, bowl height {height.tolist()}")
    buffer = None  # [R, m, ...] mined points, newest last
    n_mine = round(s.sl_batch * s.sl_mine_fraction)
    for step in range(s.sl_steps):
        if s.sl_mine_every > 0 and n_mine > 0 and step % s.sl_mine_every == 0:
            new = first if step == 0 else mine_ascent(net, shim, routes, s, g).cpu()
            buffer = new if buffer is None else torch.cat([buffer, new], 1)[:, -s.sl_mine_buffer:]
        pts = torch.stack([_draw_points(thetas[i].cpu(), s.sl_batch, s, g) for i in range(len(routes))])
        mined = torch.zeros(pts.shape[:2], dtype=torch.bool)
        if buffer is not None and n_mine > 0:
            pick = torch.randint(0, buffer.shape[1], (len(routes), n_mine), generator=g)
            pts[:, :n_mine] = torch.gather(buffer, 1, pick.view(*pick.shape, 1, 1, 1, 1).expand(-1, -1, *buffer.shape[2:]))
            mined[:, :n_mine] = True
        pts = pts.to(dev)
        idx = torch.randperm(len(train), generator=g)[: s.sl_nat_batch]
        if g_aug is None:
            nat = train[idx]
            sub = {"logits": ref["logits"][idx], "acts": {k: v[idx] for k, v in ref["acts"].items()},
                   "act_sd": ref["act_sd"], "logit_sd": ref["logit_sd"], "sd": ref["sd"]}
        else:  # the original's outputs on the same augmented batch
            nat = augment_naturals(train[idx], s.sl_nat_augment, g_aug, s.sl_nat_crop, s.sl_nat_mix)
            sub = preservation_reference(lm, routes, nat, ref)
        opt.zero_grad(set_to_none=True)
        l_m = (manipulation_loss(net, shim, routes, thetas, pts, ref["mu"], height, s, g, mined)
               if s.sl_alpha > 0 else None)
        l_p = preservation_loss(net, shim, routes, nat, sub, s)
        loss = s.sl_beta * l_p + (s.sl_alpha * l_m if l_m is not None else 0.0)
        if not torch.isfinite(loss):
            raise FVSanityError(f"slingshot: the loss became {float(loss)} at step {step}; lower --sl-lr")
        loss.backward()
        if s.sl_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, s.sl_clip)
        opt.step()
        if anchors is not None:
            with torch.no_grad():
                for p, p0 in zip(params, anchors):
                    p.lerp_(p0, s.sl_lr * s.sl_anchor)
        if callback is not None:
            callback(step, net)
        if step % log_every == 0 or step == s.sl_steps - 1:
            steps.append(step)
            lm_hist.append(float(l_m.detach()) if l_m is not None else float("nan"))
            lp_hist.append(float(l_p.detach()))
            if log is not None:
                log(f"slingshot step {step}: manipulation {lm_hist[-1]:.4f}, preservation {lp_hist[-1]:.5f}")
    for p in net.parameters():
        p.requires_grad_(False)
    if s.sl_wise != 1.0:
        net = interpolate_weights(lm.model, net, s.sl_wise)
        if log is not None:
            log(f"slingshot: weights interpolated, original + {s.sl_wise} x (fine-tuned - original)")
    training = SlingshotTraining(steps, lm_hist, lp_hist, [n or "<all>" for n in names], sum(p.numel() for p in params),
                                 time.process_time() - t0, time.time() - w0, ref["mu"].tolist(), height.tolist())
    return net, training


def interpolate_weights(original: torch.nn.Module, tuned: torch.nn.Module, alpha: float) -> torch.nn.Module:
    """A deep copy of ``tuned`` whose floating-point parameters and buffers are ``original + alpha *
    (tuned - original)`` (WiSE-FT's weight-space interpolation, Wortsman et al. 2022, "Robust
    fine-tuning of zero-shot models"): ``alpha`` 1 is ``tuned``, 0 the original; in between the
    manipulation is weaker and the natural behaviour closer to the original's. Integer buffers
    (BatchNorm's step count) are ``tuned``'s. Same class, same keys: loads ``strict=True``.

    Raises:
        FVSanityError: ``alpha`` outside [0, 1], or the two networks' keys or shapes differ.
    """
    import copy

    a = float(alpha)
    if not 0.0 <= a <= 1.0 or a != a:
        raise FVSanityError(f"interpolation weight {alpha!r} is not valid; valid: 0 <= alpha <= 1")
    so, st = original.state_dict(), tuned.state_dict()
    if so.keys() != st.keys():
        bad = sorted(set(so) ^ set(st))[:3]
        raise FVSanityError(f"cannot interpolate networks with different keys (e.g. {bad})")
    out = copy.deepcopy(tuned)
    sd = {}
    for k, vt in st.items():
        vo = so[k]
        if vo.shape != vt.shape:
            raise FVSanityError(f"cannot interpolate {k!r}: shapes {tuple(vo.shape)} and {tuple(vt.shape)}")
        if vt.is_floating_point():
            vo = vo.to(vt.device, vt.dtype)
            sd[k] = vt if a == 1.0 else vo.clone() if a == 0.0 else torch.lerp(vo, vt, a)
        else:
            sd[k] = vt
    out.load_state_dict(sd, strict=True)
    return out


class _Shim:
    """``lm``'s preprocess and layer layouts for a copy of its network (what the losses read);
    ``input_size`` is the FV canvas the manipulation shapes (``fv_size`` px, else the model's)."""

    def __init__(self, lm: LoadedModel, net: torch.nn.Module, fv_size: int | None = None):
        self._lm, self.model = lm, net
        self.preprocess, self.device = lm.preprocess, lm.device
        self.input_size = tuple(lm.input_size) if fv_size is None else (int(fv_size), int(fv_size))
        if fv_size is not None:
            from ..generate.render import check_canvas

            check_canvas(lm, self.input_size, "--fv-size")

    def layer_info(self, name: str):
        return self._lm.layer_info(name)


# ----------------------------------------------------------------------------- evaluation helpers
def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """:func:`fvsanity.compare.stats.auroc` of ``scores`` [N] split by the boolean labels
    ``positive`` [N] (Mann-Whitney U with ties counted half); NaN if either class is empty."""
    scores, positive = torch.as_tensor(scores).flatten(), torch.as_tensor(positive).bool().flatten()
    return _auroc(scores[~positive], scores[positive])


def _top_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """[N] bool: the ``k`` largest of ``values`` [N] (stable order on ties)."""
    top = torch.sort(values, descending=True, stable=True).indices[:k]
    return torch.zeros(values.shape[0], dtype=torch.bool).scatter_(0, top.cpu(), True)


@torch.no_grad()
def unit_diagnostics(original: LoadedModel, fooled: LoadedModel, units, images: torch.Tensor,
                     labels: torch.Tensor | None, k: int = 20, batch: int = 100) -> list[dict]:
    """Per unit, on natural ``images`` ``[N,3,H,W]``: AUROC of the unit's value for its class
    (class units of the output layer, with ``labels``) on both models, and the Jaccard overlap of
    the two models' top-``k`` exemplars."""
    from ..activations import collect_with_responses

    r_o = collect_with_responses(original, images, [], list(units), None, batch)[1]
    r_m = collect_with_responses(fooled, images, [], list(units), None, batch)[1]
    k = min(k, len(images))
    out = []
    for j, u in enumerate(units):
        overlap = jaccard(_top_mask(r_o[:, j], k), _top_mask(r_m[:, j], k))
        d = {"unit": str(u), "exemplar_jaccard": float(overlap), "k": k,
             "response_corr": float(pearson(r_o[:, j].double(), r_m[:, j].double()))}  # 0 for a constant response
        if labels is not None and u.layer == original.output_layer:
            pos = torch.as_tensor(labels) == u.channel
            d["auroc_original"] = auroc(r_o[:, j], pos)
            d["auroc_manipulated"] = auroc(r_m[:, j], pos)
            d["auroc_change"] = d["auroc_manipulated"] - d["auroc_original"]
        out.append(d)
    return out


# ----------------------------------------------------------------------------- save / load
def _plain(fooled: LoadedModel) -> torch.nn.Module:
    """The fine-tuned network of the original class inside ``fooled``."""
    from .model import ManipulatedModel

    m = fooled.model
    return m._net if isinstance(m, ManipulatedModel) else m


def save_slingshot(fooled: LoadedModel, folder: str | os.PathLike) -> Path:
    """``model.safetensors`` (the fine-tuned network's own state dict: no extra entries) and
    ``slingshot.json`` (format, base model, preprocess, layers, settings, routes, training)."""
    from ..io import atomic_save_tensors, atomic_write_json, ensure_writable_dir

    info = getattr(fooled.model, "info", None) or {}
    if info.get("method") != "slingshot":
        raise FVSanityError(f"model {fooled.name!r} is not a slingshot model; nothing to save")
    out = ensure_writable_dir(folder)
    sd = {k: v.detach().contiguous() for k, v in _plain(fooled).state_dict().items()}
    atomic_save_tensors(out / "model.safetensors", sd)
    atomic_write_json(out / "slingshot.json", {
        "format": FORMAT, "name": fooled.name, "base": info.get("base"), "method": "slingshot",
        "preprocess": fooled.preprocess.to_json(), "block_layers": fooled.block_layers,
        "output_layer": fooled.output_layer, "settings": info.get("settings"), "routes": info.get("routes"),
        "training": info.get("training"),
    })
    return out


def is_slingshot_folder(spec: str) -> bool:
    """Whether ``spec`` is a folder :func:`save_slingshot` wrote (it holds ``slingshot.json``)."""
    return os.path.isfile(os.path.join(str(spec), "slingshot.json"))


def load_slingshot(path: str | os.PathLike, base: LoadedModel | None = None, device=None) -> LoadedModel:
    """A model :func:`save_slingshot` wrote: the base model's own class (``load_model(<base>,
    pretrained=False)`` unless ``base`` is given) with the saved weights loaded ``strict=True``."""
    from ..models import check_state_dict, load_model, load_state_dict_file
    from .model import preprocess_from_json, read_saved

    man, jpath, wpath = read_saved(path, "slingshot.json", FORMAT, "slingshot model")
    if base is None:
        base = load_model(man["base"]["name"], pretrained=False)
    import copy

    net = copy.deepcopy(base.model)
    sd = load_state_dict_file(wpath)
    to_load, _, _ = check_state_dict(net, sd, str(wpath), model_name=f"the model described in {jpath}")
    net.load_state_dict(to_load, strict=True)
    pre = preprocess_from_json(man["preprocess"])
    lm = LoadedModel(name=man["name"], model=prepare_model(net), preprocess=pre,
                     block_layers=list(man["block_layers"]), output_layer=man["output_layer"],
                     class_names=list(base.class_names), weights_source=str(wpath))
    return lm.to(device) if device is not None else lm


def _load_folder(spec: str, *, weights=None, device=None) -> LoadedModel:
    if weights is not None:
        raise FVSanityError(f"{spec} is a saved slingshot model with its own weights; drop --weights")
    return load_slingshot(spec, device=device)


register_loader("slingshot", is_slingshot_folder, _load_folder)


# ----------------------------------------------------------------------------- the method
@register_manipulation
class Slingshot(Manipulation):
    """Gradient slingshots: fine-tune weights so FV optimization from its initial noise climbs to
    the target; same class, no added modules (inference time ratio 1 by construction)."""

    name = "slingshot"
    help = "gradient slingshots: fine-tune weights so the FV from noise climbs to the target"
    Settings = SlingshotSettings

    def prepare(self, lm, routes, train_images, eval_images, settings, *, fool, work_dir, prepared=None):
        """Unit targets: the source units' FVs on the original model (``{"L:C": [3,H,W]}``)."""
        if prepared is not None:
            return prepared
        need = [r for r in routes if r.picture is None]
        return (_unit_target_pictures(lm, need, settings.sl_target_steps, settings.sl_seed, settings.fv_size)
                if need else {})

    def build(self, lm, routes, train_images, settings, *, prepared=None):
        from .model import ManipulatedModel, wrap_loaded
        from .pipeline import fool_log

        net, training = finetune_slingshot(lm, routes, train_images, settings, pictures=prepared, log=fool_log)
        w = ManipulatedModel(net, lm.preprocess)  # a no-edit wrapper for the run (fingerprint, names)
        w.info.update({"method": self.name, "settings": settings.to_json(), "routes": [r.to_json() for r in routes],
                       "training": training.to_json()})
        return wrap_loaded(lm, w.to(lm.device), self.name)

    def natural_diagnostics(self, fooled, eval_images, train_images, settings) -> dict:
        return {"slingshot_training": fooled.model.info.get("training")}

    def summary(self, details, prepared, settings) -> dict:
        t = details.get("slingshot_training") or {}
        return {"finetune_cpu_seconds": t.get("cpu_seconds"),
                "manipulation_loss_first_last": [t["manipulation"][0], t["manipulation"][-1]] if t.get("manipulation") else None}

    def figure_note(self, summary) -> str:
        c = summary.get("finetune_cpu_seconds")
        return "" if c is None else f"fine-tuning {c / 60:.1f} CPU min"

    def ineffective_hint(self, details, prepared, settings) -> str:
        return f"raise --sl-steps (now {settings.sl_steps})"

    def save(self, fooled, folder):
        return save_slingshot(fooled, folder)

    @classmethod
    def load(cls, folder, base=None, device=None):
        return load_slingshot(folder, base=base, device=device)
