"""Path-level attribution: edge attribution patching (EAP, EAP-IG) on CNN channel edges.

Nodes are channels; an *edge* ``u -> v`` of a chosen module is input channel ``u``'s contribution
to output channel ``v``. Three kinds of module carry edges:

``conv`` (``nn.Conv2d``)
    ``z_v = sum_u W[v, u] * a_u (+ b_v)``; the contribution of ``u`` to ``v`` is the map
    ``W[v, u] * a_u``. With ``delta = a_ref - a_clean`` at the conv's input and ``g = dm/dz`` at its
    output (before BatchNorm and ReLU), the linear estimate of patching the edge is
    ``S[v, u] = <g_v, W[v, u] * delta_u> = sum_k W[v, u, k] * conv2d_weight(delta, g)[v, u, k]``;
    computed per image (batch folded into the conv groups). The scores of a layer sum to
    ``<g, conv(delta)>`` (bias excluded).
``linear`` (``nn.Linear``)
    ``S[v, u] = g_v * W[v, u] * delta_u``.
``skip`` (a parameter-free module that copies channels, e.g. a ResNet shortcut: ``nn.Identity`` or
    CIFAR option-A subsample-and-zero-pad)
    identity edges ``src(v) -> v``; its output is *added* into a block sum, so patching the edge
    adds ``delta_out_v`` to the sum: ``S[v, src(v)] = <g_v, delta_out_v>`` with ``g`` taken at the
    module's output (an identity module's output is cloned inside the forward so its gradient is
    that of the skip branch alone). The channel map ``src`` is found by probing the module with
    constant channel codes; zero-padded channels have no source and no edge.

Concatenations (Inception branches, SqueezeNet Fire ``expand1x1``/``expand3x3``) need no edges of
their own: they stack output channels, so channel ``c`` of a branch *is* channel ``offset + c`` of
the concatenation (used by the graph figure to line the nodes up). BatchNorm, ReLU and pooling
act per channel and are passed through (the node of a conv output ``z_v`` and of the next conv's
input channel ``v`` are the same channel).

Score convention (DESIGN 4.3): ``S ~= m(edge patched to reference) - m(clean)``, so an edge whose
removal *lowers* the unit has a negative score. Node attributions use the opposite, IG,
convention: they sum to ``m(clean) - m(reference)``.

EAP takes ``g`` at the clean input; EAP-IG (Hanna et al. 2024) averages ``g`` over ``steps``
midpoints of the straight line from the reference *image* to the clean image. The metric ``m`` is
the unit's activation (:func:`fvsanity.layouts.unit_values`: channel mean, neuron,
or direction, read from the unit layer's output by a forward hook). Scores are computed in float32
(or float64 if the model is float64), chunked over images; every hook is removed in ``finally``.
:func:`patch_edges` is the ground truth (one real forward per edge), for validation only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FVSanityError
from ..hooks import StopForward, get_module, hooked
from ..layouts import Layout, infer_layout, pool, unit_values
from ..units import Unit, layer_names, parse_unit

__all__ = [
    "METHODS",
    "NODE_METHODS",
    "REFERENCES",
    "SKIP_NAMES",
    "AttributionError",
    "LayerEdges",
    "EdgeAttribution",
    "edge_attribution",
    "AttributionSettings",
    "discover_edges",
    "record_edge_batch",
    "score_edges",
    "check_edge_scores",
    "EdgeBatch",
    "node_attribution",
    "patch_edges",
    "reference_images",
    "edge_layers",
    "conv_edge_scores",
    "linear_edge_scores",
]

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


# ------------------------------------------------------------------------------ edge kernels
def conv_edge_scores(
    delta: torch.Tensor,
    grad: torch.Tensor,
    weight: torch.Tensor,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> torch.Tensor:
    """Per-image edge scores of one convolution.

    Args:
        delta: [N, C_in, H, W] input difference (reference - clean).
        grad: [N, C_out, H', W'] dm/dz at the conv output (no bias involved).
        weight: [C_out, C_in / groups, kh, kw].
    Returns:
        [N, C_out, C_in] with ``S[n, v, u] = <grad[n, v], conv(delta[n, u], weight[v, u])>`` (zero
        for pairs in different groups), so ``S[n].sum() == <grad[n], conv(delta[n], weight)>``.
    """
    n, c_in = delta.shape[:2]
    c_out, cin_g, kh, kw = weight.shape
    # The batch is folded into the groups: conv2d_weight sums over the batch, groups do not.
    gw = torch.nn.grad.conv2d_weight(
        delta.reshape(1, n * c_in, *delta.shape[2:]),
        (n * c_out, cin_g, kh, kw),
        grad.reshape(1, n * c_out, *grad.shape[2:]),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=n * groups,
    )
    local = (gw.view(n, c_out, cin_g, kh * kw) * weight.reshape(1, c_out, cin_g, kh * kw)).sum(-1)
    if groups == 1:
        return local
    out = local.new_zeros(n, c_out, c_in)
    cout_g = c_out // groups
    for gi in range(groups):
        rows = slice(gi * cout_g, (gi + 1) * cout_g)
        out[:, rows, gi * cin_g : (gi + 1) * cin_g] = local[:, rows]
    return out


def linear_edge_scores(delta: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[N, C_out, C_in] scores ``g_v * W[v, u] * delta_u`` of a linear layer (extra middle dims summed).

    delta: [N, ..., C_in]; grad: [N, ..., C_out]; weight: [C_out, C_in].
    """
    d = delta.reshape(delta.shape[0], -1, delta.shape[-1])
    g = grad.reshape(grad.shape[0], -1, grad.shape[-1])
    return torch.einsum("ntv,vu,ntu->nvu", g, weight, d)


def _conv_padding(conv: nn.Conv2d):
    if conv.padding_mode != "zeros":
        raise AttributionError(
            f"conv padding_mode {conv.padding_mode!r} is not supported; valid: 'zeros'"
        )
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation, strict=True):
            total = d * (k - 1)
            if total % 2:
                raise AttributionError("padding='same' with an even effective kernel is not supported")
            pads.append(total // 2)
        return tuple(pads)
    return conv.padding


# ------------------------------------------------------------------------------ layer discovery
@dataclass(frozen=True)
class _Spec:
    name: str
    module: nn.Module
    kind: str  # conv | linear | skip
    rows: tuple[int, ...] | None  # output channels kept (None: all)
    src: tuple[int, ...] | None = None  # skip: source input channel per output channel (-1: none)
    input_from: str | None = None  # earlier layer that reads the very same input tensor


def _kind(name: str, mod: nn.Module) -> str | None:
    if isinstance(mod, nn.Conv2d):
        return "conv"
    if isinstance(mod, nn.Linear):
        return "linear"
    if name.rsplit(".", 1)[-1].lower() in SKIP_NAMES and next(mod.parameters(), None) is None:
        return "skip"
    return None


def _probe_skip(name: str, mod: nn.Module, in_shape: tuple[int, ...], dtype, device) -> tuple[int, ...]:
    """Source channel of every output channel of a channel-copying module (-1: zero channel)."""
    c = in_shape[1]
    codes = []
    with torch.no_grad():
        for scale, shift in ((1.0, 1.0), (3.0, 2.0)):
            vals = torch.arange(c, dtype=dtype, device=device) * scale + shift
            x = vals.view(1, c, *([1] * (len(in_shape) - 2))).expand(1, *in_shape[1:]).contiguous()
            out = mod(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            codes.append((vals, out[0].reshape(out.shape[1], -1)))
    src = []
    for v in range(codes[0][1].shape[0]):
        found = -1
        for (vals, out), first in zip(codes, (True, False), strict=True):
            o = out[v]
            if bool((o == 0).all()):
                s = -1
            elif bool((o == o[0]).all()) and bool((vals == o[0]).any()):
                s = int((vals == o[0]).nonzero()[0, 0])
            else:
                s = -2
            if first:
                found = s
            elif s != found:
                found = -2
        if found == -2:
            raise AttributionError(
                f"layer {name!r} ({type(mod).__name__}) is not a channel-copying skip connection; "
                "edges can be scored on Conv2d, Linear and shortcut/identity modules"
            )
        src.append(found)
    return tuple(src)


def _expand_names(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Resolve names; a container (block) expands to the conv/linear/skip modules inside it."""
    mods = dict(model.named_modules())
    from ..units import resolve_layer

    out: list[str] = []
    for raw in names:
        name = resolve_layer(model, raw)
        if _kind(name, mods[name]) is not None:
            out.append(name)
            continue
        inner = [n for n, m in mods.items() if n.startswith(name + ".") and _kind(n, m) is not None]
        if not inner:
            raise AttributionError(
                f"layer {name!r} ({type(mods[name]).__name__}) holds no Conv2d/Linear/shortcut module; "
                "give conv layer names (see `fvsanity layers MODEL`)"
            )
        out += inner
    return list(dict.fromkeys(out))


def _discover(lm, unit: Unit, layers, image_shape: tuple[int, ...]) -> list[_Spec]:
    """The edge-carrying modules, in forward order, that run up to the unit's layer."""
    model = lm.model
    mods = dict(model.named_modules())
    if layers is None or isinstance(layers, int):
        cand = [n for n, m in mods.items() if n and _kind(n, m) is not None]
    elif isinstance(layers, str):
        cand = _expand_names(model, [layers])
    else:
        cand = _expand_names(model, list(layers))
    seen: list[tuple[str, int, tuple]] = []  # name, id(input), input shape
    inputs: dict[str, torch.Tensor] = {}

    def make(n):
        def hook(_m, inp, _out):
            x = inp[0]
            inputs[n] = x  # keep alive so ids stay unique during the forward
            seen.append((n, id(x), tuple(x.shape)))

        return hook

    def stop(_m, _i, _o):
        raise StopForward

    with hooked(model, [(mods[n], make(n)) for n in cand] + [(unit.layer, stop)]):
        dev, dt = lm.device, next(model.parameters()).dtype
        x = torch.full((1, *image_shape), 0.5, device=dev, dtype=dt)
        with torch.no_grad():
            try:
                model(lm.preprocess(x))
            except StopForward:
                pass
    order = [s[0] for s in seen]
    if len(set(order)) != len(order):
        dup = next(n for n in order if order.count(n) > 1)
        raise AttributionError(f"layer {dup!r} runs more than once per forward; weight-shared modules are not supported")
    if layers is not None and not isinstance(layers, int):
        late = [n for n in cand if n not in order]
        if late:
            raise AttributionError(
                f"layer {late[0]!r} does not run before the unit's layer {unit.layer!r}; "
                f"valid layers run earlier: {', '.join(order[-5:]) or '(none)'}"
            )
    if isinstance(layers, int):
        if layers < 1:
            raise AttributionError(f"layers={layers}: give a positive number of conv layers")
        main = [n for n in order if _kind(n, mods[n]) != "skip"]
        keep_from = order.index(main[-layers]) if len(main) >= layers else 0
        order = order[keep_from:]
    if not order:
        raise AttributionError(f"no Conv2d/Linear layer runs before the unit's layer {unit.layer!r}")
    specs = []
    first_input: dict[int, str] = {}
    shape_of = {s[0]: s[2] for s in seen}
    for name, xid, _ in seen:
        if name not in order:
            continue
        mod = mods[name]
        kind = _kind(name, mod)
        rows = (unit.channel,) if name == unit.layer and unit.channel is not None else None
        src = _probe_skip(name, mod, shape_of[name], dt, dev) if kind == "skip" else None
        specs.append(_Spec(name, mod, kind, rows, src, first_input.get(xid)))
        first_input.setdefault(xid, name)
    return specs


def edge_layers(lm, unit: Unit | str, layers=None, image_size: tuple[int, int] | None = None) -> list[str]:
    """Names of the edge-carrying modules :func:`edge_attribution` would use, in forward order.

    ``layers``: None (every Conv2d/Linear/shortcut on the way to the unit, inclusive), an int k
    (the last k conv/linear layers and the shortcuts among them), or names (blocks expand to the
    modules inside them).
    """
    unit = parse_unit(unit, lm)
    size = image_size or lm.input_size
    return [s.name for s in _discover(lm, unit, layers, (3, *size))]


# ------------------------------------------------------------------------------ recording
@contextlib.contextmanager
def _recording(model: nn.Module, specs: Sequence[_Spec], unit: Unit) -> Iterator[dict]:
    """Hooks that store (input, output) of every spec and the unit metric, then stop the forward."""
    rec: dict = {"io": {}, "m": None}

    def make(name):
        def hook(_m, inp, out):
            x = inp[0]
            if out is x:  # identity module: give the skip branch its own tensor (and gradient)
                out = out.clone()
            rec["io"][name] = (x, out)
            return out

        return hook

    def unit_hook(_m, _i, out):
        if isinstance(out, (tuple, list)):
            out = out[0]
        rec["m"] = unit_values(out, unit)
        raise StopForward

    with hooked(model, [(spec.module, make(spec.name)) for spec in specs] + [(unit.layer, unit_hook)]):
        yield rec


def _forward(lm, rec: dict, x: torch.Tensor) -> torch.Tensor:
    rec["io"].clear()
    rec["m"] = None
    try:
        lm.model(lm.preprocess(x))
    except StopForward:
        pass
    if rec["m"] is None:
        raise AttributionError("the unit's layer did not run in the forward pass")
    return rec["m"]


def _spatial_sum(t: torch.Tensor, layout: Layout | None = None) -> torch.Tensor:
    """[N, C, ...] -> [N, C] summed over space; a token layout [N, T, D] -> [N, D] summed over
    every token (prefix tokens included, so node attributions stay complete)."""
    return pool(t, layout, "sum", prefix=True)


# ------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class LayerEdges:
    """Edge scores of one module for N images.

    Attributes:
        name: module name; kind: "conv" | "linear" | "skip".
        rows: output channels the score rows stand for (the unit's channel alone for the unit's own
            layer, else all).
        in_channels: number of input channels (score columns).
        scores: [N, V, U] per-image edge scores ~= m(edge patched to reference) - m(clean), in
            units of the metric (the unit's activation).
        mask: [V, U] bool, structurally present edges (nonzero weight slice; skip: src(v) -> v).
        node_in: [N, U] node attribution of the input channels, sum over space of
            (a_clean - a_ref) * g (g = dm/d input, averaged over the IG path for EAP-IG).
        node_out: [N, V] the same for the output channels (at the conv output, pre-BN).
        input_from: earlier layer reading the very same input tensor (parallel branches), or None.
    """

    name: str
    kind: str
    rows: tuple[int, ...]
    in_channels: int
    scores: torch.Tensor = field(repr=False)
    mask: torch.Tensor = field(repr=False)
    node_in: torch.Tensor = field(repr=False)
    node_out: torch.Tensor = field(repr=False)
    input_from: str | None = None

    @property
    def n_edges(self) -> int:
        return int(self.mask.sum())

    def mean(self) -> torch.Tensor:
        """[V, U] mean edge score over images."""
        return self.scores.mean(0)

    def to_json(self) -> dict:
        mean = self.mean()
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": [len(self.rows), self.in_channels],
            "n_edges": self.n_edges,
            "n_images": int(self.scores.shape[0]),
            "score_sum": float(mean.sum()),
            "score_abs_max": float(mean.abs().max()),
            "input_from": self.input_from,
        }


@dataclass(frozen=True)
class EdgeAttribution:
    """Edge scores of every chosen module for one unit and one set of images.

    Attributes:
        unit, method ("eap" | "eap-ig"), reference (name or "given"), steps (IG points; 1 for EAP).
        layers: one :class:`LayerEdges` per module, forward order.
        metric_clean, metric_ref: [N] the unit's activation on the images and on their references.
    """

    unit: Unit
    method: str
    reference: str
    steps: int
    layers: tuple[LayerEdges, ...]
    metric_clean: torch.Tensor = field(repr=False)
    metric_ref: torch.Tensor = field(repr=False)

    @property
    def names(self) -> list[str]:
        return [lay.name for lay in self.layers]

    def layer(self, name: str) -> LayerEdges:
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise AttributionError(f"no layer {name!r} in this attribution; valid: {', '.join(self.names)}")

    def to_json(self) -> dict:
        return {
            "unit": str(self.unit),
            "method": self.method,
            "reference": self.reference,
            "steps": self.steps,
            "n_images": int(self.metric_clean.shape[0]),
            "metric_clean_mean": float(self.metric_clean.mean()),
            "metric_ref_mean": float(self.metric_ref.mean()),
            "layers": [lay.to_json() for lay in self.layers],
        }


# ------------------------------------------------------------------------------ main entry
def _check_images(images: torch.Tensor, what: str = "images") -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise AttributionError(f"{what} must be an RGB batch [N, 3, H, W] with N >= 1, got {shape}")


def _alphas(method: str, steps: int) -> list[float]:
    if method not in METHODS:
        raise AttributionError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if method == "eap":
        return [1.0]
    if steps < 1:
        raise AttributionError(f"steps={steps}: EAP-IG needs at least 1 step")
    return [(k + 0.5) / steps for k in range(steps)]


def _mask(spec: _Spec, weight: torch.Tensor | None, c_in: int, c_out: int) -> torch.Tensor:
    rows = list(spec.rows) if spec.rows is not None else list(range(c_out))
    if spec.kind == "skip":
        m = torch.zeros(len(rows), c_in, dtype=torch.bool)
        for i, v in enumerate(rows):
            if spec.src[v] >= 0:
                m[i, spec.src[v]] = True
        return m
    w = weight.detach()
    if spec.kind == "linear":
        return (w[rows] != 0).cpu()
    groups = spec.module.groups
    cin_g = w.shape[1]
    local = (w.flatten(2) != 0).any(-1)  # [C_out, C_in/g]
    m = torch.zeros(c_out, c_in, dtype=torch.bool)
    cout_g = c_out // groups
    for gi in range(groups):
        r = slice(gi * cout_g, (gi + 1) * cout_g)
        m[r, gi * cin_g : (gi + 1) * cin_g] = local[r].cpu()
    return m[rows]


def _scores(spec: _Spec, delta_in, delta_out, g_out, sdt) -> torch.Tensor:
    """[n, V, U] scores of one module from float tensors of the chunk."""
    mod = spec.module
    rows = list(spec.rows) if spec.rows is not None else None
    if spec.kind == "conv":
        w = mod.weight.detach().to(sdt)
        g = g_out.to(sdt)
        if rows is not None and mod.groups == 1:
            w, g, rows = w[rows], g[:, rows], None
        s = conv_edge_scores(
            delta_in.to(sdt), g, w, mod.stride, _conv_padding(mod), mod.dilation, mod.groups
        )
    elif spec.kind == "linear":
        w = mod.weight.detach().to(sdt)
        g = g_out.to(sdt)
        if rows is not None:
            w, g, rows = w[rows], g[..., rows], None
        s = linear_edge_scores(delta_in.to(sdt), g, w)
    else:
        per_out = _spatial_sum(delta_out.to(sdt) * g_out.to(sdt))  # [n, C_out]
        c_in = delta_in.shape[1]
        s = per_out.new_zeros(per_out.shape[0], per_out.shape[1], c_in)
        for v, u in enumerate(spec.src):
            if u >= 0:
                s[:, v, u] = per_out[:, v]
    return s[:, rows] if rows is not None else s


@dataclass(frozen=True)
class AttributionSettings:
    """The settings of :func:`edge_attribution` (one object instead of a long argument list).

    Attributes:
        layers: None (all edge modules up to the unit), an int k (the last k conv/linear layers
            and the shortcuts among them) or module names (blocks expand to their convs).
        method: "eap" (gradient at the clean input) or "eap-ig" (gradient averaged over ``steps``
            midpoints of the straight line from the reference image to the clean image).
        steps: EAP-IG steps. reference: "mean" (dataset-mean grey), "zeros", "blur", or images
            (see :func:`reference_images`). batch_size: images per forward. blur_sigma: for "blur".
        allow_zero: do not raise if every score is exactly zero.
    """

    layers: object = None
    method: str = "eap-ig"
    steps: int = 8
    reference: object = "mean"
    batch_size: int = 16
    blur_sigma: float | None = None
    allow_zero: bool = False


def discover_edges(lm, unit, layers=None, image_shape: tuple[int, ...] | None = None) -> list:
    """Discovery: the edge-carrying modules (specs), in forward order, on the way to ``unit``
    (a resolved Unit) for inputs of ``image_shape`` [3, H, W] (default: the model's input size)."""
    shape = tuple(image_shape) if image_shape is not None else (3, *lm.input_size)
    return _discover(lm, unit, layers, shape)


@dataclass
class EdgeBatch:
    """Recording of one batch: per spec, edge scores [B, c_out', c_in], node scores in [B, c_in]
    and out [B, c_out']; the metric on the clean and reference images [B]; layer shapes."""

    scores: dict[str, torch.Tensor]
    node_in: dict[str, torch.Tensor]
    node_out: dict[str, torch.Tensor]
    m_clean: torch.Tensor
    m_ref: torch.Tensor
    shapes: dict[str, tuple[int, int]]


def record_edge_batch(lm, rec: dict, specs: Sequence, x: torch.Tensor, r: torch.Tensor, alphas: Sequence[float], sdt) -> EdgeBatch:
    """Recording: clean ``x`` and reference ``r`` [B, 3, H, W] (model device/dtype) through the
    model inside :func:`_recording`, gradients averaged over ``alphas``, edge and node scores."""
    with torch.no_grad():
        m_ref = _forward(lm, rec, r).detach().to(sdt).cpu()
        io_ref = {k: (a.detach(), b.detach()) for k, (a, b) in rec["io"].items()}
        m_clean = _forward(lm, rec, x).detach().to(sdt).cpu()
        io_clean = {k: (a.detach(), b.detach()) for k, (a, b) in rec["io"].items()}
    g_in = {s.name: None for s in specs}
    g_out = {s.name: None for s in specs}
    for a in alphas:
        xa = (r + a * (x - r)).detach().requires_grad_(True)
        with torch.enable_grad():
            m = _forward(lm, rec, xa)
            names = [s.name for s in specs]
            tens = [rec["io"][n][0] for n in names] + [rec["io"][n][1] for n in names]
            want = [t for t in tens if t.requires_grad]
            grads = torch.autograd.grad(m.sum(), want, allow_unused=True) if want else []
        gmap = {id(t): gr for t, gr in zip(want, grads, strict=True)}
        for i, n in enumerate(names):
            for store, t in ((g_in, tens[i]), (g_out, tens[len(names) + i])):
                gr = gmap.get(id(t))
                gr = torch.zeros_like(t, dtype=sdt) if gr is None else gr.detach().to(sdt)
                store[n] = gr / len(alphas) if store[n] is None else store[n] + gr / len(alphas)
        del m, tens, want, grads, gmap
    out = EdgeBatch({}, {}, {}, m_clean, m_ref, {})
    for s in specs:
        a_c, z_c = io_clean[s.name]
        a_r, z_r = io_ref[s.name]
        d_in = (a_r - a_c).to(sdt)
        d_out = (z_r - z_c).to(sdt)
        if s.kind == "linear":
            out.shapes[s.name] = (z_c.shape[-1], a_c.shape[-1])
        else:
            out.shapes[s.name] = (z_c.shape[1], a_c.shape[1])
        out.scores[s.name] = _scores(s, d_in, d_out, g_out[s.name], sdt).cpu()
        ni = -d_in * g_in[s.name]
        no = -d_out * g_out[s.name]
        if s.kind == "linear":
            ni = ni.reshape(ni.shape[0], -1, ni.shape[-1]).sum(1)
            no = no.reshape(no.shape[0], -1, no.shape[-1]).sum(1)
        else:
            ni, no = _spatial_sum(ni), _spatial_sum(no)
        if s.rows is not None:
            no = no[:, list(s.rows)]
        out.node_in[s.name] = ni.cpu()
        out.node_out[s.name] = no.cpu()
    return out


def score_edges(unit, specs: Sequence, batches: Sequence[EdgeBatch], method: str, ref_name: str, steps: int) -> EdgeAttribution:
    """Scoring: the recorded batches -> one :class:`EdgeAttribution` (layers in forward order)."""
    out = []
    for s in specs:
        c_out, c_in = batches[0].shapes[s.name]
        weight = getattr(s.module, "weight", None)
        rows = s.rows if s.rows is not None else tuple(range(c_out))
        out.append(
            LayerEdges(
                name=s.name,
                kind=s.kind,
                rows=tuple(rows),
                in_channels=c_in,
                scores=torch.cat([bt.scores[s.name] for bt in batches]),
                mask=_mask(s, weight, c_in, c_out),
                node_in=torch.cat([bt.node_in[s.name] for bt in batches]),
                node_out=torch.cat([bt.node_out[s.name] for bt in batches]),
                input_from=s.input_from,
            )
        )
    return EdgeAttribution(
        unit=unit,
        method=method,
        reference=ref_name,
        steps=steps,
        layers=tuple(out),
        metric_clean=torch.cat([bt.m_clean for bt in batches]),
        metric_ref=torch.cat([bt.m_ref for bt in batches]),
    )


def check_edge_scores(res: EdgeAttribution) -> None:
    """Refuse non-finite scores, or scores that are all exactly zero (a vanished metric gradient)."""
    total = sum(float(lay.scores.abs().sum()) for lay in res.layers)
    if not math.isfinite(total):
        raise AttributionError(f"non-finite edge scores for unit {res.unit} (method {res.method})")
    if total == 0.0:
        raise AttributionError(
            f"all edge scores are zero for unit {res.unit} (method {res.method}, reference {res.reference}): "
            "the metric's gradient vanishes or the images equal their reference"
        )


def edge_attribution(
    lm,
    unit: Unit | str,
    images: torch.Tensor,
    layers=None,
    method: str = "eap-ig",
    steps: int = 8,
    reference: str | torch.Tensor = "mean",
    batch_size: int = 16,
    blur_sigma: float | None = None,
    allow_zero: bool = False,
    *,
    settings: AttributionSettings | None = None,
) -> EdgeAttribution:
    """Edge scores of every conv/linear/shortcut edge on the way to ``unit``, per image.

    Three steps, each public: :func:`discover_edges` (which modules carry edges),
    :func:`record_edge_batch` (per batch: forwards, gradients, edge and node scores) and
    :func:`score_edges` (assembled per layer), then :func:`check_edge_scores`.

    Args:
        lm: a :class:`~fvsanity.models.LoadedModel` (its device and dtype are used).
        unit: the target unit (spec or :class:`Unit`); m = its activation (pre-ReLU if the layer
            is a conv).
        images: [N, 3, H, W] RGB in [0, 1], the clean inputs.
        layers, method, steps, reference, batch_size, blur_sigma, allow_zero: see
            :class:`AttributionSettings`; ``settings`` (keyword) replaces them all.
    Returns:
        :class:`EdgeAttribution` (tensors on CPU, float32, or float64 for a float64 model).
    Raises:
        AttributionError if every score is zero (a vanished metric gradient or clean == reference)
        unless ``allow_zero``.
    """
    st = settings or AttributionSettings(layers, method, steps, reference, batch_size, blur_sigma, allow_zero)
    unit = unit if isinstance(unit, Unit) else parse_unit(unit, lm)
    _check_images(images)
    alphas = _alphas(st.method, st.steps)
    model = lm.model
    dev = lm.device
    mdt = next(model.parameters()).dtype
    sdt = torch.promote_types(mdt, torch.float32)
    specs = discover_edges(lm, unit, st.layers, tuple(images.shape[1:]))
    ref_name = st.reference if isinstance(st.reference, str) else "given"
    refs_all = reference_images(lm, images, st.reference, st.blur_sigma)

    batches = []
    with _recording(model, specs, unit) as rec:
        for start in range(0, images.shape[0], st.batch_size):
            x = images[start : start + st.batch_size].to(dev, mdt)
            r = refs_all[start : start + st.batch_size].to(dev, mdt)
            batches.append(record_edge_batch(lm, rec, specs, x, r, alphas, sdt))
    res = score_edges(unit, specs, batches, st.method, ref_name, len(alphas))
    if not st.allow_zero:
        check_edge_scores(res)
    return res


# ------------------------------------------------------------------------------ nodes
def node_attribution(
    lm,
    unit: Unit | str,
    images: torch.Tensor,
    layers: Sequence[str],
    method: str = "ig",
    steps: int = 32,
    reference: str | torch.Tensor = "mean",
    where: str = "output",
    batch_size: int = 16,
    blur_sigma: float | None = None,
) -> dict[str, torch.Tensor]:
    """Channel (node) attributions of ``layers`` for ``unit``: ``{layer: [N, C]}``.

    ``A[n, c] = sum over space of (a_clean - a_ref)[n, c] * g[n, c]`` (c = channel, or the token
    dimension D of a ViT's ``[N, T, D]`` layer, summed over all T tokens, class token included,
    so that completeness holds; see :mod:`fvsanity.layouts`) with g = dm/da at the clean
    activation (``"grad_x_act"``) or averaged over ``steps`` midpoints of the straight line from
    a_ref to a_clean *in that layer's activation space* (``"ig"``, layer integrated gradients: the
    layer's output, or its input if ``where="input"``, is replaced by the interpolated value).
    When the layer is a cut of the network (every path to the unit passes through it), IG is
    complete: ``A[n].sum() ~= m(clean) - m(ref)`` up to the Riemann error of ``steps`` points.
    Any module may be named (block outputs, ReLUs, convs).
    """
    unit = parse_unit(unit, lm)
    _check_images(images)
    if method not in NODE_METHODS:
        raise AttributionError(f"unknown node method {method!r}; valid: {', '.join(NODE_METHODS)}")
    if where not in ("output", "input"):
        raise AttributionError(f"where={where!r}; valid: output, input")
    if method == "ig" and steps < 1:
        raise AttributionError(f"steps={steps}: IG needs at least 1 step")
    model = lm.model
    from ..units import resolve_layer

    names = [resolve_layer(model, n) for n in layers]
    unknown = [n for n in names if n not in layer_names(model)]
    if unknown:
        raise AttributionError(f"unknown layer {unknown[0]!r}")
    dev = lm.device
    mdt = next(model.parameters()).dtype
    sdt = torch.promote_types(mdt, torch.float32)
    refs_all = reference_images(lm, images, reference, blur_sigma)
    alphas = [(k + 0.5) / steps for k in range(steps)] if method == "ig" else [1.0]
    result: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for name in names:
        mod = get_module(model, name)
        state: dict = {"replace": None, "seen": None}

        def read(t):
            return t[0] if isinstance(t, (tuple, list)) else t

        if where == "output":

            def hook(_m, _inp, out, state=state):
                out = read(out)
                state["seen"] = out
                if state["replace"] is not None:
                    return state["replace"]
                return None

        else:

            def hook(_m, inp, state=state):
                state["seen"] = inp[0]
                if state["replace"] is not None:
                    return (state["replace"],) + tuple(inp[1:])
                return None

        # registered before the unit hook, so a unit on this layer sees the replacement
        try:
            with hooked(model, [(mod, hook)], pre=where == "input"), _recording(model, [], unit) as rec:
                for start in range(0, images.shape[0], batch_size):
                    x = images[start : start + batch_size].to(dev, mdt)
                    r = refs_all[start : start + batch_size].to(dev, mdt)
                    state["replace"] = None
                    with torch.no_grad():
                        _forward(lm, rec, r)
                        a_r = state["seen"].detach()
                        _forward(lm, rec, x)
                        a_c = state["seen"].detach()
                    gbar = torch.zeros_like(a_c, dtype=sdt)
                    for a in alphas:
                        with torch.enable_grad():
                            if method == "ig":
                                leaf = (a_r + a * (a_c - a_r)).requires_grad_(True)
                                state["replace"] = leaf
                                m = _forward(lm, rec, x)
                            else:
                                leaf = None
                                m = _forward(lm, rec, x.detach().requires_grad_(True))
                                leaf = state["seen"]
                            (g,) = torch.autograd.grad(m.sum(), [leaf], allow_unused=True)
                        state["replace"] = None
                        if g is not None:
                            gbar += g.detach().to(sdt) / len(alphas)
                    contrib = (a_c - a_r).to(sdt) * gbar
                    lay = infer_layout(model, name, tuple(contrib.shape[1:]))
                    result[name].append(_spatial_sum(contrib, lay).cpu())
        finally:
            state["replace"] = None
    return {n: torch.cat(v) for n, v in result.items()}


# ------------------------------------------------------------------------------ ground truth
def patch_edges(
    lm,
    unit: Unit | str,
    layer: str,
    edges,
    clean: torch.Tensor,
    ref: str | torch.Tensor = "mean",
    blur_sigma: float | None = None,
) -> torch.Tensor:
    """Real activation patching of single edges (one forward per edge): ground truth for EAP.

    For edge (v, u) of ``layer`` (a Conv2d, Linear or skip module), channel u's contribution to
    output channel v is replaced by its reference value, i.e. ``conv(a_u_ref - a_u_clean, W[v, u])``
    is added to z_v (skip: ``delta_out_v``), everything else stays clean.

    Args:
        edges: [(v, u), ...] or a LongTensor [E, 2] of (output channel, input channel).
        clean: [N, 3, H, W] RGB images; ref: reference (see :func:`reference_images`).
    Returns:
        [E, N] ``m(patched) - m(clean)`` per edge and image (metric units).
    """
    unit = parse_unit(unit, lm)
    _check_images(clean, "clean")
    specs = _discover(lm, unit, [layer], tuple(clean.shape[1:]))
    if len(specs) != 1:
        raise AttributionError(f"layer {layer!r} names a block; give one conv/linear/shortcut module")
    spec = specs[0]
    edges = torch.as_tensor(edges, dtype=torch.long).reshape(-1, 2)
    model, dev = lm.model, lm.device
    mdt = next(model.parameters()).dtype
    x = clean.to(dev, mdt)
    r = reference_images(lm, clean, ref, blur_sigma).to(dev, mdt)
    mod = spec.module
    with torch.no_grad():
        with _recording(model, [spec], unit) as rec:
            _forward(lm, rec, r)
            a_r, z_r = (t.detach() for t in rec["io"][spec.name])
            m0 = _forward(lm, rec, x).detach()
            a_c, z_c = (t.detach() for t in rec["io"][spec.name])
        delta = a_r - a_c
        d_out = z_r - z_c
        if spec.kind == "linear":
            if a_c.ndim != 2:
                raise AttributionError(f"patching {spec.name!r}: linear layers with {a_c.ndim}-D inputs are not supported")
            c_out, c_in = z_c.shape[1], a_c.shape[1]
        else:
            c_out, c_in = z_c.shape[1], a_c.shape[1]
        bad = [(int(v), int(u)) for v, u in edges if not (0 <= v < c_out and 0 <= u < c_in)]
        if bad:
            raise AttributionError(f"edge {bad[0]} out of range for {spec.name!r}: v in 0..{c_out - 1}, u in 0..{c_in - 1}")
        out = torch.empty(len(edges), x.shape[0], dtype=torch.promote_types(mdt, torch.float32))
        patch: dict = {"v": None, "add": None}

        def hook(_m, _i, o):
            if patch["add"] is None:
                return None
            o = o.clone()
            o[:, patch["v"]] += patch["add"]
            return o

        with hooked(model, [(mod, hook)]), _recording(model, [], unit) as rec:
            for i, (v, u) in enumerate(edges.tolist()):
                if spec.kind == "conv":
                    g = mod.groups
                    cin_g, cout_g = mod.weight.shape[1], c_out // g
                    grp = v // cout_g
                    if not grp * cin_g <= u < (grp + 1) * cin_g:
                        add = torch.zeros_like(z_c[:, v])
                    else:
                        w = mod.weight[v : v + 1, u - grp * cin_g : u - grp * cin_g + 1]
                        add = F.conv2d(
                            delta[:, u : u + 1], w, None, mod.stride, _conv_padding(mod), mod.dilation
                        )[:, 0]
                elif spec.kind == "linear":
                    add = delta[..., u] * mod.weight[v, u]
                else:
                    add = d_out[:, v] if spec.src[v] == u else torch.zeros_like(d_out[:, v])
                patch["v"], patch["add"] = v, add
                out[i] = (_forward(lm, rec, x) - m0).to(out.dtype).cpu()
                patch["add"] = None
    return out
