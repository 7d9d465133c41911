"""The path-similarity figure: layers on x, three similarity curves with bootstrap bands.

Curves (DESIGN.md 4.2, Geirhos et al. 2023 Fig. 5): FV vs the unit's natural images,
natural vs natural (same class / exemplars, upper reference), natural vs other images (lower
reference). ``mode="panels"``: one panel per unit; ``mode="mean"``: the mean over units (band:
95% interval of the mean over units, t-based) with each unit's FV-vs-natural curve as a thin line
and a star where the across-units test finds FV vs natural above the other-image baseline.
An optional lower row shows the normalized score (0 = like unrelated images, 1 = like natural;
per unit, and in mean mode the median over units, which ratios with small denominators
do not dominate).
Input is a :class:`~fvsanity.compare.path.PathCheck` or its ``to_json()`` dict (check.json), so
figures can be redrawn from files.
"""

from __future__ import annotations

import math
from pathlib import Path

CURVES = (
    ("fv_vs_natural", "FV vs natural", "tab:red"),
    ("natural_vs_natural", "natural vs natural (same class / exemplars)", "tab:blue"),
    ("natural_vs_other", "natural vs other images", "tab:gray"),
)

__all__ = ["plot_path_similarity", "mean_profile"]


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

    The format is the one ``path``'s suffix names (``.png``, ``.pdf``, ``.svg``; matplotlib Agg),
    written atomically (a temporary file beside it, then renamed).

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
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    fmt = FIGURE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        from ..errors import FVSanityError

        raise FVSanityError(f"figure path {str(path)!r}: unknown suffix {path.suffix!r}; valid: {', '.join(FIGURE_FORMATS)}")
    d = _as_dict(check)
    units = d["units"]
    if not units:
        raise ValueError("no units in the check to plot")
    if mode == "auto":
        mode = "panels" if len(units) <= max_panels else "mean"
    if mode not in ("panels", "mean"):
        raise ValueError(f"unknown mode {mode!r}; valid: auto, panels, mean")
    metric = d.get("settings", {}).get("metric", "similarity")
    n_panels = len(units) if mode == "panels" else 1
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

    def ticks(ax, names):
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([_short(n) for n in names], rotation=60, ha="right", fontsize=7)

    if mode == "panels":
        for k, u in enumerate(units):
            ax, axn = place(k)
            names = [r["name"] for r in u["layers"]]
            x = list(range(len(names)))
            for key, label, color in CURVES:
                y = [_num(r[key]) for r in u["layers"]]
                lo = [_num(r[f"{key}_ci"][0]) if r.get(f"{key}_ci") else float("nan") for r in u["layers"]]
                hi = [_num(r[f"{key}_ci"][1]) if r.get(f"{key}_ci") else float("nan") for r in u["layers"]]
                ax.plot(x, y, "-o", ms=3, color=color, label=label)
                ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0)
            for xi, r in zip(x, u["layers"]):
                if r.get("above_baseline") is False:
                    ax.plot([xi], [_num(r["fv_vs_natural"])], "x", color="k", ms=6)
            name = u["unit"] + (f" ({u['class_name']})" if u.get("class_name") else "")
            ax.set_title(f"{name}\n{u['verdict']['label']}", fontsize=8)
            ax.set_ylabel(metric, fontsize=8)
            ticks(ax, names)
            if axn is not None:
                yn = [max(-1.0, min(2.0, _num(r["normalized"]))) for r in u["layers"]]
                lo = [max(-1.0, min(2.0, _num(r["ci_low"]))) for r in u["layers"]]
                hi = [max(-1.0, min(2.0, _num(r["ci_high"]))) for r in u["layers"]]
                axn.plot(x, yn, "-o", ms=3, color="tab:purple")
                axn.fill_between(x, lo, hi, color="tab:purple", alpha=0.2, linewidth=0)
                axn.axhline(0, color="tab:gray", lw=0.8)
                axn.axhline(1, color="tab:blue", lw=0.8)
                axn.set_ylim(-1.05, 2.05)
                axn.set_ylabel("normalized\n(clipped)", fontsize=8)
                ticks(axn, names)
        for k in range(len(units), nrow_units * ncol):
            ax, axn = place(k)
            ax.axis("off")
            if axn is not None:
                axn.axis("off")
    else:
        ax, axn = place(0)
        names = _layer_order(units)
        x = list(range(len(names)))
        for u in units:
            pos = {r["name"]: r for r in u["layers"]}
            ax.plot(
                [x[names.index(n)] for n in pos], [_num(pos[n]["fv_vs_natural"]) for n in pos],
                "-", color="tab:red", lw=0.5, alpha=0.35,
            )
        for key, label, color in CURVES:
            prof = mean_profile(d, key)
            y = [prof[n][0] for n in names]
            half = [prof[n][1] for n in names]
            ax.plot(x, y, "-o", ms=3, lw=2, color=color, label=f"{label} (mean of {len(units)})")
            ax.fill_between(x, [a - b for a, b in zip(y, half)], [a + b for a, b in zip(y, half)], color=color, alpha=0.2, linewidth=0)
        fv_mean = mean_profile(d, "fv_vs_natural")
        for a in d.get("across_units") or []:
            if a.get("above_baseline") and a["name"] in names:
                ax.annotate("*", (names.index(a["name"]), fv_mean[a["name"]][0]), textcoords="offset points",
                            xytext=(0, -16), ha="center", fontsize=16, color="k", fontweight="bold")
        ax.set_title(
            "per unit: FV vs natural not above the other-image baseline in "
            f"{sum(u['verdict']['n_not_above'] for u in units)} of {sum(u['verdict']['n_layers'] for u in units)} unit-layers"
            + ("\n* across units: FV vs natural above the baseline (Wilcoxon, Holm)" if d.get("across_units") else ""),
            fontsize=8,
        )
        ax.set_ylabel(metric)
        ticks(ax, names)
        if axn is not None:
            for u in units:
                pos = {r["name"]: r for r in u["layers"]}
                axn.plot(
                    [x[names.index(n)] for n in pos],
                    [max(-1.0, min(2.0, _num(pos[n]["normalized"]))) for n in pos],
                    "-", color="tab:purple", lw=0.5, alpha=0.35,
                )
            med = []
            for n in names:
                vals = sorted(_num(r["normalized"]) for u in units for r in u["layers"] if r["name"] == n)
                vals = [v for v in vals if math.isfinite(v)]
                med.append(max(-1.0, min(2.0, vals[len(vals) // 2])) if vals else float("nan"))
            axn.plot(x, med, "-o", ms=3, lw=2, color="tab:purple", label="median over units")
            axn.legend(fontsize=7, loc="upper left")
            axn.axhline(0, color="tab:gray", lw=0.8)
            axn.axhline(1, color="tab:blue", lw=0.8)
            axn.set_ylim(-1.05, 2.05)
            axn.set_ylabel("normalized (clipped to [-1, 2])", fontsize=8)
            ticks(axn, names)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title or f"{d.get('model', '')}: path similarity ({metric}), {len(units)} unit(s)", fontsize=10)
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
