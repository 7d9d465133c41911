"""The path-similarity figure: layers on x, three similarity curves with bootstrap bands.

Curves (DESIGN.md 4.2, Geirhos et al. 2023 Fig. 5): FV vs the unit's natural images,
natural vs natural (same class / exemplars, upper reference), natural vs other images (lower
reference). ``mode="panels"``: one panel per unit; ``mode="mean"``: the mean over units (band:
95% interval of the mean over units, t-based) with each unit's FV-vs-natural curve as a thin line
and a star where the across-units verdict is "natural-like" (:mod:`fvsanity.compare.verdict`);
in panels mode a cross marks each layer whose outcome is "diverges".
An optional lower row shows the normalized score (0 = like unrelated images, 1 = like natural;
per unit, and in mean mode the median over units, which ratios with small denominators
do not dominate).
Input is a :class:`~fvsanity.compare.path.PathCheck` or its ``to_json()`` dict (check.json), so
figures can be redrawn from files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..compare.verdict import DIVERGES, INCONCLUSIVE, NATURAL_LIKE, OUTCOMES

CURVES = (
    ("fv_vs_natural", "FV vs natural", "tab:red"),
    ("natural_vs_natural", "natural vs natural (same class / exemplars)", "tab:blue"),
    ("natural_vs_other", "natural vs other images", "tab:gray"),
)

__all__ = ["plot_path_similarity", "mean_profile", "path_profiles", "draw_path_similarity", "PathPanel", "PathProfiles"]


def _as_dict(check) -> dict:
    return check.to_json() if hasattr(check, "to_json") else check


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def _layer_order(units: list[dict]) -> list[str]:
    order: list[str] = []
    for u in units:
        for r in u["layers"]:
            if r["name"] not in order:
                order.append(r["name"])
    return order


def mean_profile(check, key: str) -> dict[str, tuple[float, float, int]]:
    """{layer: (mean over units, half-width of the 95% t-interval, n units)} for one curve key."""
    from scipy import stats

    d = _as_dict(check)
    out = {}
    for name in _layer_order(d["units"]):
        vals = [_num(r[key]) for u in d["units"] for r in u["layers"] if r["name"] == name]
        vals = [v for v in vals if math.isfinite(v)]
        n = len(vals)
        if n == 0:
            out[name] = (float("nan"), float("nan"), 0)
            continue
        m = sum(vals) / n
        if n > 1:
            sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1))
            half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        else:
            half = float("nan")
        out[name] = (m, half, n)
    return out


def _short(name: str) -> str:
    return name if len(name) <= 14 else "…" + name[-13:]


FIGURE_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}  # suffix -> matplotlib format


def _clip(v: float) -> float:
    return max(-1.0, min(2.0, v))


@dataclass(frozen=True)
class PathPanel:
    """What one panel of the figure shows (numbers only; x = position in ``names``).

    Attributes:
        title: the panel title; names: layers on x.
        curves: (key, label, colour, y, lo, hi) per curve of :data:`CURVES` (lo/hi: band; NaN: none).
        crosses: (x, y) layers whose outcome is "diverges" (panels mode; mean mode: across units).
        stars: (x, y) layers whose across-units outcome is "natural-like" (mean mode).
        thin: per-unit FV-vs-natural lines (xs, ys) (mean mode).
        norm: (y, lo, hi) of the normalized row, clipped to [-1, 2] (panels mode; lo/hi None in mean mode).
        thin_norm: per-unit normalized lines (xs, ys), clipped (mean mode).
        mean_mode: the panel is the mean over units.
    """

    title: str
    names: tuple[str, ...]
    curves: tuple = ()
    crosses: tuple = ()
    stars: tuple = ()
    thin: tuple = ()
    norm: tuple | None = None
    thin_norm: tuple = ()
    mean_mode: bool = False


@dataclass(frozen=True)
class PathProfiles:
    """The data of the path-similarity figure (:func:`path_profiles`), drawn by :func:`draw_path_similarity`."""

    mode: str
    metric: str
    n_units: int
    panels: tuple[PathPanel, ...]
    title: str = ""
    extra: dict = field(default_factory=dict)


def path_profiles(check, mode: str = "auto", max_panels: int = 12) -> PathProfiles:
    """The numbers the figure draws, from a PathCheck or check.json / audit dict (no matplotlib).

    ``mode``: ``panels`` (one per unit), ``mean`` (mean over units), ``auto`` (panels up to
    ``max_panels`` units, else mean). Raises ValueError on no units or an unknown mode.
    """
    d = _as_dict(check)
    units = d["units"]
    if not units:
        raise ValueError("no units in the check to plot")
    if mode == "auto":
        mode = "panels" if len(units) <= max_panels else "mean"
    if mode not in ("panels", "mean"):
        raise ValueError(f"unknown mode {mode!r}; valid: auto, panels, mean")
    metric = d.get("settings", {}).get("metric", "similarity")
    title = f"{d.get('model', '')}: path similarity ({metric}), {len(units)} unit(s)"
    panels = []
    if mode == "panels":
        for u in units:
            names = [r["name"] for r in u["layers"]]
            x = list(range(len(names)))
            curves = []
            for key, label, color in CURVES:
                y = [_num(r[key]) for r in u["layers"]]
                lo = [_num(r[f"{key}_ci"][0]) if r.get(f"{key}_ci") else float("nan") for r in u["layers"]]
                hi = [_num(r[f"{key}_ci"][1]) if r.get(f"{key}_ci") else float("nan") for r in u["layers"]]
                curves.append((key, label, color, y, lo, hi))
            crosses = tuple((xi, _num(r["fv_vs_natural"])) for xi, r in zip(x, u["layers"])
                            if r.get("outcome") == DIVERGES)
            name = u["unit"] + (f" ({u['class_name']})" if u.get("class_name") else "")
            norm = ([_clip(_num(r["normalized"])) for r in u["layers"]],
                    [_clip(_num(r["ci_low"])) for r in u["layers"]],
                    [_clip(_num(r["ci_high"])) for r in u["layers"]])
            panels.append(PathPanel(f"{name}\n{u['verdict']['label']}", tuple(names), tuple(curves), crosses,
                                    norm=norm))
    else:
        names = _layer_order(units)
        x = list(range(len(names)))
        thin = []
        thin_norm = []
        for u in units:
            pos = {r["name"]: r for r in u["layers"]}
            xs = [x[names.index(n)] for n in pos]
            thin.append((xs, [_num(pos[n]["fv_vs_natural"]) for n in pos]))
            thin_norm.append((xs, [_clip(_num(pos[n]["normalized"])) for n in pos]))
        curves = []
        for key, label, color in CURVES:
            prof = mean_profile(d, key)
            y = [prof[n][0] for n in names]
            half = [prof[n][1] for n in names]
            curves.append((key, f"{label} (mean of {len(units)})", color, y,
                           [a - b for a, b in zip(y, half)], [a + b for a, b in zip(y, half)]))
        fv_mean = mean_profile(d, "fv_vs_natural")
        stars = tuple((names.index(a["name"]), fv_mean[a["name"]][0]) for a in d.get("across_units") or []
                      if a.get("outcome") == NATURAL_LIKE and a["name"] in names)
        across_div = tuple((names.index(a["name"]), fv_mean[a["name"]][0]) for a in d.get("across_units") or []
                           if a.get("outcome") == DIVERGES and a["name"] in names)
        med = []
        for n in names:
            vals = sorted(_num(r["normalized"]) for u in units for r in u["layers"] if r["name"] == n)
            vals = [v for v in vals if math.isfinite(v)]
            med.append(_clip(vals[len(vals) // 2]) if vals else float("nan"))
        counts = {o: sum(r.get("outcome") == o for u in units for r in u["layers"]) for o in OUTCOMES}
        ptitle = (
            f"per unit-layer: {counts[NATURAL_LIKE]} {NATURAL_LIKE}, {counts[DIVERGES]} {DIVERGES}, "
            f"{counts[INCONCLUSIVE]} {INCONCLUSIVE} of {sum(len(u['layers']) for u in units)}"
            + (f"\n* across units: {NATURAL_LIKE}" if stars else "")
            + (f"\nx across units: {DIVERGES}" if across_div else "")
        )
        panels.append(PathPanel(ptitle, tuple(names), tuple(curves), across_div, stars, tuple(thin), (med, None, None),
                                tuple(thin_norm), mean_mode=True))
    return PathProfiles(mode, metric, len(units), tuple(panels), title)


def _name_ticks(ax, names) -> None:
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([_short(n) for n in names], rotation=60, ha="right", fontsize=7)


def _draw_panel(ax, pn, metric: str) -> None:
    """One panel's similarity curves with their bands, crosses and stars."""
    x = list(range(len(pn.names)))
    if pn.mean_mode:
        for xs, ys in pn.thin:
            ax.plot(xs, ys, "-", color="tab:red", lw=0.5, alpha=0.35)
    for _key, label, color, y, lo, hi in pn.curves:
        if pn.mean_mode:
            ax.plot(x, y, "-o", ms=3, lw=2, color=color, label=label)
        else:
            ax.plot(x, y, "-o", ms=3, color=color, label=label)
        ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0)
    for xi, yi in pn.crosses:
        ax.plot([xi], [yi], "x", color="k", ms=6)
    for xi, yi in pn.stars:
        ax.annotate("*", (xi, yi), textcoords="offset points",
                    xytext=(0, -16), ha="center", fontsize=16, color="k", fontweight="bold")
    ax.set_title(pn.title, fontsize=8)
    if pn.mean_mode:
        ax.set_ylabel(metric)
    else:
        ax.set_ylabel(metric, fontsize=8)
    _name_ticks(ax, pn.names)


def _draw_normalized_panel(axn, pn) -> None:
    """One panel's normalized similarity (0 = other images, 1 = natural), clipped to [-1, 2]."""
    x = list(range(len(pn.names)))
    yn, lo, hi = pn.norm
    if pn.mean_mode:
        for xs, ys in pn.thin_norm:
            axn.plot(xs, ys, "-", color="tab:purple", lw=0.5, alpha=0.35)
        axn.plot(x, yn, "-o", ms=3, lw=2, color="tab:purple", label="median over units")
        axn.legend(fontsize=7, loc="upper left")
    else:
        axn.plot(x, yn, "-o", ms=3, color="tab:purple")
        axn.fill_between(x, lo, hi, color="tab:purple", alpha=0.2, linewidth=0)
    axn.axhline(0, color="tab:gray", lw=0.8)
    axn.axhline(1, color="tab:blue", lw=0.8)
    axn.set_ylim(-1.05, 2.05)
    axn.set_ylabel("normalized (clipped to [-1, 2])" if pn.mean_mode else "normalized\n(clipped)", fontsize=8)
    _name_ticks(axn, pn.names)


def draw_path_similarity(
    prof: PathProfiles, path: str | Path, normalized: bool = True, title: str | None = None, dpi: int = 110,
) -> Path:
    """Draw :class:`PathProfiles` to ``path`` (format from its suffix; written atomically)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    fmt = FIGURE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        from ..errors import FVSanityError

        raise FVSanityError(f"figure path {str(path)!r}: unknown suffix {path.suffix!r}; valid: {', '.join(FIGURE_FORMATS)}")
    mode, metric = prof.mode, prof.metric
    n_panels = len(prof.panels)
    ncol = min(4, n_panels)
    nrow_units = math.ceil(n_panels / ncol)
    nrows = nrow_units * (2 if normalized else 1)
    heights = ([3.0, 1.6] * nrow_units) if normalized else [3.0] * nrow_units
    fig, axes = plt.subplots(
        nrows, ncol, figsize=(4.2 * ncol if mode == "panels" else 7.5, sum(heights) + 0.8), squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )

    def place(k):
        r, c = divmod(k, ncol)
        r0 = r * (2 if normalized else 1)
        return axes[r0][c], (axes[r0 + 1][c] if normalized else None)

    for k, pn in enumerate(prof.panels):
        ax, axn = place(k)
        _draw_panel(ax, pn, metric)
        if axn is not None:
            _draw_normalized_panel(axn, pn)
    for k in range(n_panels, nrow_units * ncol):
        ax, axn = place(k)
        ax.axis("off")
        if axn is not None:
            axn.axis("off")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title or prof.title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=dpi, format=fmt)  # the format of path's suffix, not of the temp name
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def plot_path_similarity(
    check,
    path: str | Path,
    mode: str = "auto",
    normalized: bool = True,
    title: str | None = None,
    max_panels: int = 12,
    dpi: int = 110,
) -> Path:
    """Draw the path-similarity figure to ``path`` and return the path.

    :func:`path_profiles` (the numbers) then :func:`draw_path_similarity` (matplotlib). The format
    is the one ``path``'s suffix names (``.png``, ``.pdf``, ``.svg``; matplotlib Agg), written
    atomically (a temporary file beside it, then renamed).

    Args:
        check: PathCheck or check.json dict.
        mode: ``panels`` (one per unit), ``mean`` (mean over units + thin per-unit lines), or
            ``auto`` (panels up to ``max_panels`` units, else mean).
        normalized: add the normalized-score row (clipped to [-1, 2] for display).
        title: figure title (default: model, metric, number of units).
        dpi: resolution of the PNG (raster parts of PDF/SVG).

    Raises:
        FVSanityError: ``path`` has a suffix other than .png, .pdf or .svg.
    """
    if Path(path).suffix.lower() not in FIGURE_FORMATS:  # before any work, as before
        from ..errors import FVSanityError

        raise FVSanityError(f"figure path {str(path)!r}: unknown suffix {Path(path).suffix!r}; valid: {', '.join(FIGURE_FORMATS)}")
    return draw_path_similarity(path_profiles(check, mode, max_panels), path, normalized, title, dpi)
