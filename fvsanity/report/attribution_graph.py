"""Attribution-graph figure (after Anthropic's 2025 attribution graphs) and the overlap profile.

:func:`plot_attribution_graph` draws the top edges of a unit's circuit as a layered graph, FV
circuit and natural circuit side by side on the same node layout: columns are channel layers in
forward order, node area ~ |node attribution|, edge width ~ |edge score|, colour = sign of the
*contribution* (red: the node/edge supports the unit, i.e. replacing it by the reference lowers the
unit; blue: it opposes the unit). Edges in the top set of both circuits are drawn over a gold halo.
Widths and areas are scaled per panel (the FV panel usually has larger absolute scores).

Columns come from the layer structure recorded by the attribution: a module's output column is the
next module's input column when the channel counts match (BatchNorm/ReLU/pooling pass channels
through); parallel branches reading the same tensor share an input column and stack their outputs
(a concatenation); a skip (shortcut) module adds into the latest output column of its width (a
residual sum). matplotlib only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

__all__ = ["graph_columns", "plot_attribution_graph", "plot_overlap_profile", "save_figure"]

_POS, _NEG, _SHARED = "#c0392b", "#2e6fbd", "#f5b700"


def graph_columns(layers) -> tuple[list[dict], list[dict]]:
    """Lay out channel columns for a sequence of :class:`LayerEdges` (forward order).

    Returns (columns, placement): columns ``[{"size", "label"}]``; placement per layer
    ``{"in": (col, offset), "out": (col, offset)}`` so input channel u sits at node
    ``(in_col, in_offset + u)`` and output channel v at ``(out_col, out_offset + v)``.
    """
    cols: list[dict] = []
    place: list[dict] = []
    by_name: dict[str, int] = {}
    last_out: int | None = None
    for i, lay in enumerate(layers):
        if lay.input_from is not None and lay.input_from in by_name:
            in_pos = place[by_name[lay.input_from]]["in"]
        elif last_out is not None and cols[last_out]["size"] == lay.in_channels:
            in_pos = (last_out, 0)
        else:
            cols.append({"size": lay.in_channels, "label": f"in: {lay.name}"})
            in_pos = (len(cols) - 1, 0)
        width = max(lay.rows) + 1
        prev = layers[i - 1] if i else None
        out_pos = None
        if lay.kind == "skip":
            for j in range(i - 1, -1, -1):
                if layers[j].kind != "skip" and cols[place[j]["out"][0]]["size"] == width:
                    out_pos = (place[j]["out"][0], 0)
                    break
        elif (
            prev is not None
            and lay.kind == prev.kind == "conv"
            and lay.input_from == prev.name
        ):
            pcol, poff = place[i - 1]["out"]
            out_pos = (pcol, poff + max(prev.rows) + 1)
            cols[pcol]["size"] = out_pos[1] + width
            cols[pcol]["label"] = _concat_label(cols[pcol]["label"], lay.name)
        if out_pos is None:
            cols.append({"size": width, "label": lay.name})
            out_pos = (len(cols) - 1, 0)
        place.append({"in": in_pos, "out": out_pos})
        by_name[lay.name] = i
        last_out = out_pos[0]
    return cols, place


def _concat_label(a: str, b: str) -> str:
    """``features.12.expand1x1`` + ``features.12.expand3x3`` -> ``features.12.[expand1x1|expand3x3]``."""
    pa = a.split(".")
    pb = b.split(".")
    n = 0
    while n < min(len(pa), len(pb)) - 1 and pa[n] == pb[n]:
        n += 1
    head = ".".join(pa[:n])
    tail_a = ".".join(pa[n:])
    if tail_a.startswith("[") and tail_a.endswith("]"):
        tail_a = tail_a[1:-1]
    return (head + "." if head else "") + f"[{tail_a}|{'.'.join(pb[n:])}]"


def _top_edges(lay, top: int) -> list[tuple[int, int, float]]:
    """[(v_row, u, mean score)] of the ``top`` largest |mean score| present edges."""
    mean = lay.scores.mean(0).double().numpy()
    mag = np.where(lay.mask.numpy(), np.abs(mean), 0.0)
    flat = np.argsort(-mag, axis=None, kind="stable")[:top]
    out = []
    for f in flat:
        r, u = np.unravel_index(f, mag.shape)
        if mag[r, u] > 0:
            out.append((int(r), int(u), float(mean[r, u])))
    return out


def _panel_data(attr, names: list[str], top: int):
    lays = [attr.layer(n) for n in names]
    cols, place = graph_columns(lays)
    edges = []  # (node_a, node_b, contribution, layer name, (v, u))
    nodes: dict[tuple[int, int], float] = {}
    # node values: a column's input-side attribution (the activation passed on, after BN/ReLU/sum)
    # where a module reads it, else the producing module's output-side one
    for lay, pl in zip(lays, place, strict=True):
        (ic, io) = pl["in"]
        ni = lay.node_in.mean(0).double().numpy()
        for u in range(ni.shape[0]):
            nodes.setdefault((ic, io + u), float(ni[u]))
    for lay, pl in zip(lays, place, strict=True):
        (ic, io), (oc, oo) = pl["in"], pl["out"]
        no = lay.node_out.mean(0).double().numpy()
        for r, v in enumerate(lay.rows):
            nodes.setdefault((oc, oo + v), float(no[r]))
        for r, u, s in _top_edges(lay, top):
            edges.append(((ic, io + u), (oc, oo + lay.rows[r]), -s, lay.name, (lay.rows[r], u)))
    return cols, edges, nodes


def plot_attribution_graph(
    fv,
    natural,
    layers: Sequence[str] | None = None,
    top: int = 8,
    titles: tuple[str, str] = ("FV circuit", "natural circuit"),
    suptitle: str | None = None,
    path: str | Path | None = None,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Layered graph of the top edges of two circuits of the same unit, side by side.

    Args:
        fv, natural: :class:`~fvsanity.compare.attribution.EdgeAttribution` with the same layers.
        layers: module names to draw (default: the last 3 edge modules and the skips among them).
        top: edges drawn per module and panel (largest |mean score|).
        path: also save as PNG there.
    Returns:
        the matplotlib Figure (two axes).
    """
    if layers is None:
        names = fv.names
        main = [i for i, n in enumerate(names) if fv.layer(n).kind != "skip"]
        layers = names[main[-3] if len(main) >= 3 else 0 :]
    layers = list(layers)
    panels = [_panel_data(a, layers, top) for a in (fv, natural)]
    cols = panels[0][0]
    key = [{(e[3], e[4]) for e in p[1]} for p in panels]
    shared = key[0] & key[1]
    # one node layout for both panels: nodes touched by any drawn edge, sorted by channel
    used: dict[int, set[int]] = {}
    for p in panels:
        for a, b, *_ in p[1]:
            used.setdefault(a[0], set()).add(a[1])
            used.setdefault(b[0], set()).add(b[1])
    ypos = {}
    for c, chans in used.items():
        ch = sorted(chans)
        for k, n in enumerate(ch):
            ypos[(c, n)] = 1.0 - (k + 0.5) / len(ch) if len(ch) > 1 else 0.5
    n_cols = len(cols)
    if figsize is None:
        figsize = (max(7.0, 3.2 * n_cols), 4.6)
    fig = Figure(figsize=figsize)
    axes = fig.subplots(1, 2)
    for ax, (_, edges, nodes), title, mine in zip(axes, panels, titles, key, strict=True):
        wmax = max((abs(e[2]) for e in edges), default=1.0) or 1.0
        for a, b, s, name, vu in sorted(edges, key=lambda e: abs(e[2])):
            xs, ys = _edge_path(a[0], ypos[a], b[0], ypos[b])
            lw = 0.4 + 5.0 * abs(s) / wmax
            if (name, vu) in shared:
                ax.plot(xs, ys, color=_SHARED, lw=lw + 4, alpha=0.55, solid_capstyle="round", zorder=1)
            ax.plot(xs, ys, color=_POS if s > 0 else _NEG, lw=lw, alpha=0.85, zorder=2)
        drawn = [n for n in ypos]
        nmax = max((abs(nodes.get(n, 0.0)) for n in drawn), default=1.0) or 1.0
        for n in drawn:
            val = nodes.get(n, 0.0)
            size = 20 + 280 * abs(val) / nmax
            ax.scatter([n[0]], [ypos[n]], s=size, color=_POS if val > 0 else _NEG, edgecolor="k", linewidth=0.5, zorder=3)
            ax.annotate(str(n[1]), (n[0], ypos[n]), xytext=(4, 3), textcoords="offset points", fontsize=6, zorder=4)
        ax.set_xlim(-0.5, n_cols - 0.5)
        ax.set_ylim(-0.05, 1.25)
        ax.set_xticks(range(n_cols))
        ax.set_xticklabels([_short(c["label"]) for c in cols], fontsize=7, rotation=15)
        ax.set_yticks([])
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
        ax.set_title(f"{title}  ({len(mine & shared)}/{len(mine)} top edges shared)", fontsize=9)
    handles = [
        Line2D([], [], color=_POS, lw=2, label="supports unit"),
        Line2D([], [], color=_NEG, lw=2, label="opposes unit"),
        Line2D([], [], color=_SHARED, lw=6, alpha=0.55, label="shared top edge"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(suptitle or f"attribution graph of {fv.unit} ({fv.method}, reference {fv.reference})", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    if path is not None:
        save_figure(fig, path)
    return fig


def _edge_path(xa: float, ya: float, xb: float, yb: float) -> tuple[np.ndarray, np.ndarray]:
    """A straight segment between neighbouring columns; an arc over the columns it skips."""
    if abs(xb - xa) <= 1:
        return np.array([xa, xb]), np.array([ya, yb])
    t = np.linspace(0, 1, 30)
    cx, cy = (xa + xb) / 2, max(ya, yb) + 0.12 * abs(xb - xa)
    xs = (1 - t) ** 2 * xa + 2 * (1 - t) * t * cx + t**2 * xb
    ys = (1 - t) ** 2 * ya + 2 * (1 - t) * t * cy + t**2 * yb
    return xs, ys


def _short(label: str, n: int = 28) -> str:
    return label if len(label) <= n else "…" + label[-(n - 1) :]


def plot_overlap_profile(
    overlaps,
    stat: str | None = None,
    path: str | Path | None = None,
    title: str | None = None,
) -> Figure:
    """Per-layer FV-vs-natural circuit overlap against the nulls, for one or more units.

    Left: the statistic (default: the primary one) for FV vs natural, natural vs natural (same
    class) and other-class vs natural, mean over units with the per-unit spread (min-max band).
    Right: the calibrated score per unit (thin lines) and its median (thick), 0 = unrelated
    images, 1 = the unit's own images.
    """
    if not isinstance(overlaps, (list, tuple)):
        overlaps = [overlaps]
    stat = stat or overlaps[0].primary
    names = [la.name for la in overlaps[0].layers]
    x = np.arange(len(names))

    def arr(get):
        return np.array([[get(la) for la in ov.layers] for ov in overlaps], dtype=float)

    fvv = arr(lambda la: la.fv_vs_natural[stat])
    same = arr(lambda la: la.null_same[stat])
    other = arr(lambda la: la.null_other[stat])
    cal = arr(lambda la: la.calibrated) if stat == overlaps[0].primary else None
    fig = Figure(figsize=(12, 4.2))
    axes = fig.subplots(1, 2 if cal is not None else 1, squeeze=False)
    ax = axes[0, 0]
    for data, label, color in ((same, "natural vs natural (same class)", "#2a9d4a"), (other, "other class vs natural", "#888888"), (fvv, "FV vs natural", "#c0392b")):
        m = np.nanmean(data, 0)
        ax.plot(x, m, "-o", ms=3, color=color, label=label)
        if data.shape[0] > 1:
            ax.fill_between(x, np.nanmin(data, 0), np.nanmax(data, 0), color=color, alpha=0.15, lw=0)
    ax.set_ylabel(stat)
    ax.legend(fontsize=7)
    ax.set_title(f"{stat} of edge scores ({len(overlaps)} unit{'s' if len(overlaps) > 1 else ''})", fontsize=9)
    if cal is not None:
        ax2 = axes[0, 1]
        for row in cal:
            ax2.plot(x, row, color="#c0392b", alpha=0.25, lw=0.8)
        ax2.plot(x, np.nanmedian(cal, 0), "-o", ms=3, color="#c0392b", lw=2, label="median over units")
        ax2.axhline(0, color="#888888", lw=1, ls="--", label="other class (0)")
        ax2.axhline(1, color="#2a9d4a", lw=1, ls="--", label="same class (1)")
        lo, hi = np.nanpercentile(cal, [5, 95]) if np.isfinite(cal).any() else (-1, 2)
        ax2.set_ylim(min(-1.0, lo - 0.2), max(2.0, hi + 0.2))
        ax2.set_ylabel("calibrated (s - other) / (same - other)")
        ax2.legend(fontsize=7)
        ax2.set_title("calibrated FV-vs-natural circuit overlap", fontsize=9)
    for a in axes[0]:
        a.set_xticks(x)
        a.set_xticklabels(names, rotation=75, fontsize=6)
    fig.suptitle(title or f"circuit overlap per layer ({overlaps[0].method}, reference {overlaps[0].reference})", fontsize=10)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Save ``fig`` as PNG atomically (temp file + rename)."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path

