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

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..units import Unit, parse_unit
from .attribution_edges import (  # noqa: F401 - re-exported (the module's names before the split)
    _conv_padding,
    _discover,
    _expand_names,
    _forward,
    _kind,
    _mask,
    _probe_skip,
    _recording,
    _scores,
    _spatial_sum,
    _Spec,
    conv_edge_scores,
    edge_layers,
    linear_edge_scores,
)
from .attribution_nodes import node_attribution  # noqa: F401
from .attribution_patching import patch_edges  # noqa: F401
from .attribution_references import (  # noqa: F401
    METHODS,
    NODE_METHODS,
    REFERENCES,
    SKIP_NAMES,
    AttributionError,
    _gaussian_blur,
    reference_images,
)
from .attribution_references import check_images as _check_images
from .attribution_results import EdgeAttribution, LayerEdges  # noqa: F401

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


# Attribution, one job per module: attribution_references (names, the error, reference images),
# attribution_edges (discovery, recording hooks, score kernels), attribution_results (the frozen
# results), attribution_nodes (node attribution), attribution_patching (ground truth by patching),
# and here edge attribution: settings, recording per batch, scoring, checks.


def _alphas(method: str, steps: int) -> list[float]:
    if method not in METHODS:
        raise AttributionError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if method == "eap":
        return [1.0]
    if steps < 1:
        raise AttributionError(f"steps={steps}: EAP-IG needs at least 1 step")
    return [(k + 0.5) / steps for k in range(steps)]



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

    @classmethod
    def from_kwargs(cls, settings: AttributionSettings | None = None, **kw) -> AttributionSettings:
        """``settings`` (default: the defaults) with the given fields replaced; an unknown name is
        a TypeError naming the valid ones (the keyword calls of :func:`edge_attribution`)."""
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(kw) - names)
        if bad:
            raise TypeError(f"unknown attribution setting {bad[0]!r}; valid: {', '.join(sorted(names))}")
        return dataclasses.replace(settings or cls(), **kw)


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
    *,
    settings: AttributionSettings | None = None,
    **options,
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
        settings: :class:`AttributionSettings` (default: its defaults).
        options: fields of :class:`AttributionSettings` (``layers``, ``method``, ``steps``,
            ``reference``, ``batch_size``, ``blur_sigma``, ``allow_zero``) that replace those of
            ``settings``; an unknown name is a TypeError.
    Returns:
        :class:`EdgeAttribution` (tensors on CPU, float32, or float64 for a float64 model).
    Raises:
        AttributionError if every score is zero (a vanished metric gradient or clean == reference)
        unless ``allow_zero``.
    """
    st = AttributionSettings.from_kwargs(settings, **options)
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
