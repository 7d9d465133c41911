"""The edges of attribution: which modules carry edges on the way to a unit (discovery), the
hooks that record their inputs and outputs, and the per-edge score kernels (see
:mod:`fvsanity.compare.attribution`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..hooks import StopForward, hooked
from ..layouts import Layout, pool, unit_values
from ..units import Unit, parse_unit
from .attribution_references import SKIP_NAMES, AttributionError

__all__ = ["conv_edge_scores", "linear_edge_scores", "edge_layers"]


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
