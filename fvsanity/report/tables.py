"""The per-unit sanity table of an audit, as Markdown and as LaTeX (booktabs), for papers.

Input is an audit dict (``audit.json``, see :mod:`fvsanity.auditing`). The verdict's wording is
:mod:`fvsanity.compare.verdict`'s (three outcomes per layer: natural-like, diverges,
inconclusive). One row per unit:

========================  ==========================================================
Unit                      ``layer:channel`` as fvsanity names it
Class                     class name for class units, else ``-``
FV act.                   the unit's activation for its FVs (mean over seeds)
Top nat. act.             its highest activation over the natural images
Act. range                FV response / largest natural response (median over the FV seeds)
Layers N/D/I              layers natural-like / diverges / inconclusive (of the unit's path)
Norm. sim. (path)         mean over the path of (FV - other) / (natural - other): 0 = like
                          unrelated images, 1 = like the unit's own natural images
Norm. sim. (unit layer)   the same at the unit's own layer, with its bootstrap interval
Seed spread               SD over the FV seeds of the normalized similarity at the unit's layer
Circuit overlap           FV vs natural circuit overlap (only if computed): mean over layers of
                          the calibrated overlap (0 = like unrelated images, 1 = like the
                          unit's own images) and, in parentheses, layers significantly above
                          the unrelated null (Holm) / layers
Verdict                   the outcome at the unit's own layer (inconclusive: with its reason,
                          e.g. the FV seeds needed, or too few natural references)
========================  ==========================================================

A second table (:func:`layer_rows`): per layer, how many units are natural-like, diverge, are
inconclusive, and the across-units outcome (units as replicates).
"""

from __future__ import annotations

import math

from ..compare.verdict import (
    DIVERGE_MARGIN,
    DIVERGES,
    INCONCLUSIVE,
    NATURAL_LIKE,
    NATURAL_LIKE_MARGIN,
    OUTCOMES,
)

__all__ = [
    "unit_rows", "columns", "layer_rows", "layer_columns", "to_markdown", "to_latex", "latex_escape",
    "markdown_escape", "short_verdict", "summary_sentence", "check_lines", "layer_counts",
]

_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
}


def latex_escape(s) -> str:
    """Escape LaTeX's special characters (``\\ & % $ # _ { } ~ ^ < >``) in plain text."""
    return "".join(_LATEX_SPECIALS.get(c, c) for c in str(s))


def markdown_escape(s) -> str:
    """Escape characters that would break a Markdown table cell (``|``, backslash, newlines)."""
    return str(s).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def _fmt(v, digits: int = 2) -> str:
    x = _num(v)
    if not math.isfinite(x):
        return "n/a"
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 10 ** (-digits)):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.3g}"
    return f"{x:.{digits}f}"


def short_verdict(rec: dict) -> str:
    """The outcome at the unit's own layer; "inconclusive (<reason>)" with its reason."""
    v = rec["verdict"]
    out = v.get("outcome", INCONCLUSIVE)
    why = v.get("own_layer_reason") or (v.get("status") if v.get("status", "ok") != "ok" else "")
    return f"{out} ({why})" if out == INCONCLUSIVE and why else out


def summary_sentence(summary: dict) -> str:
    """The audit's summary in the verdict's wording, e.g. "Of 24 units, at their own layer: 20
    natural-like, 0 diverges, 4 inconclusive. Of 288 unit-layers: ..."."""
    u = summary.get("units") or {}
    ul = summary.get("unit_layers") or {}
    out = (
        f"Of {summary.get('n_units', '?')} units, at their own layer: "
        + ", ".join(f"{u.get(o, 0)} {o}" for o in OUTCOMES)
        + f". Of {summary.get('n_unit_layers', '?')} unit-layers: "
        + ", ".join(f"{ul.get(o, 0)} {o}" for o in OUTCOMES) + "."
    )
    if summary.get("n_insufficient"):
        out += f" {summary['n_insufficient']} unit(s) have too few natural references: {INCONCLUSIVE} at every layer."
    return out


def _circuit_value(rec: dict) -> str | None:
    """``mean calibrated overlap (layers above the unrelated null / layers)`` or None."""
    c = rec.get("circuit")
    if not c or not isinstance(c, dict):
        return None
    s = c.get("summary") or {}
    if "mean_calibrated" not in s:
        return None
    return f"{_fmt(s.get('mean_calibrated'))} ({s.get('n_layers_above_other', '?')}/{s.get('n_layers', '?')})"


def columns(audit: dict) -> list[tuple[str, str]]:
    """(key, header) of the table's columns; the circuit column only if any unit has one."""
    cols = [
        ("unit", "Unit"),
        ("class", "Class"),
        ("fv_act", "FV act."),
        ("nat_act", "Top nat. act."),
        ("act_range", "Act. range"),
        ("counts", "Layers N/D/I"),
        ("norm_path", "Norm. sim. (path)"),
        ("norm_unit", "Norm. sim. (unit layer) [CI]"),
        ("spread", "Seed spread"),
    ]
    if any(_circuit_value(r) is not None for r in audit.get("units", [])):
        cols.append(("circuit", "Circuit overlap (layers above)"))
    cols.append(("verdict", "Verdict"))
    return cols


def unit_rows(audit: dict) -> list[dict[str, str]]:
    """One dict of display strings per unit (keys as in :func:`columns`)."""
    rows = []
    for rec in audit.get("units", []):
        layers = rec["path"]["layers"]
        norms = [_num(x["normalized"]) for x in layers]
        norms = [x for x in norms if math.isfinite(x)]
        last = layers[-1] if layers else {}
        fv = rec["fv"]["final_objective"]
        ex = rec.get("exemplars", {}).get("values") or []
        nat_max = ex[0] if ex else rec.get("natural_response", {}).get("max")
        c = rec["verdict"].get("counts") or {}
        ar = rec.get("activation_range") or rec["path"].get("activation_range")
        sp = (last.get("seed_spread") or {}).get("sd") if last else None
        rows.append(
            {
                "unit": rec["unit"],
                "class": rec.get("class_name") or "-",
                "fv_act": _fmt(sum(fv) / len(fv)) if fv else "n/a",
                "nat_act": _fmt(nat_max),
                "act_range": f"{_fmt(ar['ratio_median'])}x" if ar else "n/a",
                "counts": "/".join(str(c.get(o, 0)) for o in OUTCOMES),
                "spread": _fmt(sp),
                "norm_path": _fmt(sum(norms) / len(norms)) if norms else "n/a",
                "norm_unit": (
                    f"{_fmt(last.get('normalized'))} [{_fmt(last.get('ci_low'))}, {_fmt(last.get('ci_high'))}]"
                    if last else "n/a"
                ),
                "circuit": _circuit_value(rec) or "-",
                "verdict": short_verdict(rec),
            }
        )
    return rows


def _caption(audit: dict) -> str:
    s = audit.get("settings", {})
    fvs = audit.get("fv_settings", {})
    model = audit.get("model", {}).get("name", "?")
    return (
        f"Sanity check of feature visualizations for {len(audit.get('units', []))} units of {model} "
        f"({len(fvs.get('seeds', []))} FV(s) per unit, {fvs.get('steps', '?')} steps; {s.get('metric', '?')} "
        f"similarity of pooled activations along each unit's path; intervals: "
        f"{int(100 * s.get('confidence', 0.95))}% bootstrap). "
        "Norm. sim.: 0 = FVs as similar to the unit's natural images as unrelated images are, "
        "1 = as similar as its natural images among themselves. Layers N/D/I: layers natural-like / diverges / "
        "inconclusive. Act. range: FV response / largest natural response. "
        f"Per layer: {NATURAL_LIKE} = norm. sim. significantly above {_margin(audit, 'natural_like_margin', NATURAL_LIKE_MARGIN)}, "
        f"{DIVERGES} = significantly below {_margin(audit, 'diverge_margin', DIVERGE_MARGIN)} (sign-flip tests over the FV "
        f"seeds, alpha = {s.get('alpha', '?')}; {NATURAL_LIKE}: fixed sequence from the unit's layer backward, "
        f"{DIVERGES}: Holm over the layers), else {INCONCLUSIVE}."
    )


def _margin(audit: dict, key: str, default: float) -> str:
    for rec in audit.get("units", []):
        st = ((rec.get("path") or {}).get("unit_verdict") or {}).get("settings") or {}
        if key in st:
            return f"{st[key]:g}"
    return f"{default:g}"


def layer_counts(records: list[dict]) -> dict[str, dict[str, int]]:
    """Per layer (first-seen path order) of audit unit records: how many units are natural-like,
    diverge, are inconclusive there."""
    out: dict[str, dict[str, int]] = {}
    for r in records:
        for x in r["path"]["layers"]:
            c = out.setdefault(x["name"], {o: 0 for o in OUTCOMES})
            if x.get("outcome") in c:
                c[x["outcome"]] += 1
    return out


def layer_columns() -> list[tuple[str, str]]:
    """(key, header) of the per-layer table."""
    return [("layer", "Layer"), ("units", "Units")] + [(o, o) for o in OUTCOMES] + [("across", "Across units")]


def layer_rows(audit: dict) -> list[dict[str, str]]:
    """Per layer (path order): units natural-like / diverges / inconclusive, and the across-units
    outcome (units as replicates; "inconclusive (<reason>)")."""
    per = (audit.get("summary") or {}).get("layers")
    if per is None:
        per = layer_counts(audit.get("units", []))
    across = {a["name"]: a for a in audit.get("across_units") or []}
    rows = []
    for name, c in per.items():
        a = across.get(name)
        if a is None or "outcome" not in a:
            acr = "-"
        else:
            acr = a["outcome"] + (f" ({a['reason']})" if a["outcome"] == INCONCLUSIVE and a.get("reason") else "")
        rows.append({"layer": name, "units": str(sum(c.values()))} | {o: str(c.get(o, 0)) for o in OUTCOMES}
                    | {"across": acr})
    return rows


def to_markdown(audit: dict) -> str:
    """The table as GitHub Markdown, with a one-paragraph caption below it."""
    cols = columns(audit)
    rows = unit_rows(audit)
    out = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join(markdown_escape(r[k]) for k, _ in cols) + " |")
    s = audit.get("summary", {})
    out.append("")
    out.append(summary_sentence(s))
    out.append("")
    out.append(markdown_escape(_caption(audit)))
    lrows = layer_rows(audit)
    if lrows:
        lcols = layer_columns()
        out += ["", "Per layer: units " + ", ".join(OUTCOMES) + "; the across-units outcome.", ""]
        out.append("| " + " | ".join(h for _, h in lcols) + " |")
        out.append("|" + "|".join("---" for _ in lcols) + "|")
        for r in lrows:
            out.append("| " + " | ".join(markdown_escape(r[k]) for k, _ in lcols) + " |")
    return "\n".join(out) + "\n"


def _latex_table(align: str, cols: list, rows: list[dict], caption: str, label: str) -> list[str]:
    """One booktabs ``table``: header from ``cols`` [(key, heading)], a row per dict of ``rows``;
    every cell, the caption and the label escaped with :func:`latex_escape`."""
    lines = [
        "\\begin{table}[t]",
        "\\centering",
        "\\small",
        f"\\begin{{tabular}}{{{align}}}",
        "\\toprule",
        " & ".join(latex_escape(h) for _, h in cols) + " \\\\",
        "\\midrule",
    ]
    for r in rows:
        lines.append(" & ".join(latex_escape(r[k]) for k, _ in cols) + " \\\\")
    return lines + [
        "\\bottomrule",
        "\\end{tabular}",
        f"\\caption{{{latex_escape(caption)}}}",
        f"\\label{{{latex_escape(label)}}}",
        "\\end{table}",
    ]


def to_latex(audit: dict, caption: str | None = None, label: str = "tab:fv-sanity") -> str:
    """The table as a LaTeX ``table`` with booktabs rules (``\\usepackage{booktabs}``).

    Every cell and the caption are escaped with :func:`latex_escape`.
    """
    cols = columns(audit)
    align = "ll" + "r" * (len(cols) - 3) + "l"
    lines = ["% generated by fvsanity audit; needs \\usepackage{booktabs}"]
    lines += _latex_table(align, cols, unit_rows(audit), caption if caption is not None else _caption(audit), label)
    lrows = layer_rows(audit)
    if lrows:
        lcols = layer_columns()
        layer_caption = ("Per layer: units " + ", ".join(OUTCOMES) + "; the across-units outcome (units as replicates). "
                         + summary_sentence(audit.get("summary", {})))
        lines += [""] + _latex_table(f"l{'r' * (len(lcols) - 2)}l", lcols, lrows, layer_caption, label + "-layers")
    return "\n".join(lines) + "\n"


def check_lines(doc: dict) -> list[str]:
    """The printed table of ``fvsanity check`` from check.json's dict: per unit its verdict
    sentence, activation range and FV seeds, then per layer the normalized similarity, the spread
    over the FV seeds, the outcome and, for "inconclusive", its reason."""
    units = doc.get("units", [])
    lines = []
    for u in units:
        ar = u.get("activation_range")
        n_fv = u.get("n_fv", "?")
        head = (f"{u['unit']}: {u['verdict']['label']}  (FV seeds {n_fv}, natural refs {u.get('n_natural', '?')}, "
                f"other {u.get('n_other', '?')}; activation range "
                + (f"{_fmt(ar['ratio_median'])}x [{_fmt(min(ar['ratio']))}, {_fmt(ar['ratio_max'])}]" if ar else "n/a") + ")")
        lines.append(head)
        stab = (u.get("verdict") or {}).get("seed_stability")
        if stab and stab.get("n_subsets"):  # leave-one-seed-out: is the verdict carried by one seed?
            lines.append(f"  seed stability: {stab['note']}")
        if u.get("calibrated"):  # --calibration: the detection benchmark's score and operating point
            lines.append(f"  {u['calibrated']['text']}")
        width = max((len(r["name"]) for r in u.get("layers", [])), default=5)
        lines.append(f"  {'layer':<{width}}  {'norm. sim.':>10}  {'seed SD':>7}  outcome")
        for r in u.get("layers", []):
            sd = (r.get("seed_spread") or {}).get("sd")
            o = r.get("outcome", INCONCLUSIVE)
            why = f" ({r['reason']})" if o == INCONCLUSIVE and r.get("reason") else ""
            lines.append(f"  {r['name']:<{width}}  {_fmt(r.get('normalized')):>10}  {_fmt(sd):>7}  {o}{why}")
    across = doc.get("across_units") or []
    if across:
        lines.append(f"across {len(units)} units (units as replicates):")
        width = max(len(a["name"]) for a in across)
        for a in across:
            o = a.get("outcome", INCONCLUSIVE)
            why = f" ({a['reason']})" if o == INCONCLUSIVE and a.get("reason") else ""
            lines.append(f"  {a['name']:<{width}}  {_fmt(a.get('estimate')):>10}  {o}{why}")
    return lines
