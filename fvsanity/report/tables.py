"""The per-unit sanity table of an audit, as Markdown and as LaTeX (booktabs), for papers.

Input is an audit dict (``audit.json``, see :mod:`fvsanity.audit`). One row per unit:

========================  ==========================================================
Unit                      ``layer:channel`` as fvsanity names it
Class                     class name for class units, else ``-``
FV act.                   the unit's activation for its FVs (mean over seeds)
Top nat. act.             its highest activation over the natural images
Layers not above          layers where FV-vs-natural similarity is not significantly
                          above the unrelated-natural baseline (Holm, level alpha) / layers
Norm. sim. (path)         mean over the path of (FV - other) / (natural - other): 0 = like
                          unrelated images, 1 = like the unit's own natural images
Norm. sim. (unit layer)   the same at the unit's own layer, with its bootstrap interval
Circuit overlap           FV vs natural circuit overlap (only if computed): mean over layers of
                          the calibrated overlap (0 = like unrelated images, 1 = like the
                          unit's own images) and, in parentheses, layers significantly above
                          the unrelated null (Holm) / layers
Verdict                   ``consistent`` (every layer above baseline) or ``diverges``, or
                          ``insufficient`` when the unit has too few natural references
========================  ==========================================================
"""

from __future__ import annotations

import math

__all__ = ["unit_rows", "columns", "to_markdown", "to_latex", "latex_escape", "markdown_escape", "short_verdict"]

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
    """``consistent``, ``diverges``, or ``insufficient`` (too few natural references: no verdict)."""
    if rec["verdict"].get("status", "ok") != "ok":
        return "insufficient"
    return "consistent" if rec["verdict"]["n_not_above"] == 0 else "diverges"


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
        ("not_above", "Layers not above"),
        ("norm_path", "Norm. sim. (path)"),
        ("norm_unit", "Norm. sim. (unit layer) [CI]"),
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
        v = rec["verdict"]
        rows.append(
            {
                "unit": rec["unit"],
                "class": rec.get("class_name") or "-",
                "fv_act": _fmt(sum(fv) / len(fv)) if fv else "n/a",
                "nat_act": _fmt(nat_max),
                "not_above": f"{v['n_not_above']}/{v['n_layers']}",
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
        f"similarity of pooled activations along each unit's path; layers tested with a permutation test, "
        f"Holm-corrected, alpha = {s.get('alpha', '?')}; intervals: {int(100 * s.get('confidence', 0.95))}% bootstrap). "
        "Norm. sim.: 0 = FVs as similar to the unit's natural images as unrelated images are, "
        "1 = as similar as its natural images among themselves."
    )


def to_markdown(audit: dict) -> str:
    """The table as GitHub Markdown, with a one-paragraph caption below it."""
    cols = columns(audit)
    rows = unit_rows(audit)
    out = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join(markdown_escape(r[k]) for k, _ in cols) + " |")
    s = audit.get("summary", {})
    out.append("")
    out.append(
        f"{s.get('n_diverging', '?')} of {s.get('n_units', len(rows))} units diverge from their natural images "
        f"on at least one layer; {s.get('n_unit_layers_not_above', '?')} of {s.get('n_unit_layers', '?')} "
        "unit-layers are not above the unrelated-image baseline."
        + (f" {s['n_insufficient']} unit(s) have too few natural references for a verdict (insufficient)."
           if s.get("n_insufficient") else "")
    )
    out.append("")
    out.append(markdown_escape(_caption(audit)))
    return "\n".join(out) + "\n"


def to_latex(audit: dict, caption: str | None = None, label: str = "tab:fv-sanity") -> str:
    """The table as a LaTeX ``table`` with booktabs rules (``\\usepackage{booktabs}``).

    Every cell and the caption are escaped with :func:`latex_escape`.
    """
    cols = columns(audit)
    rows = unit_rows(audit)
    align = "ll" + "r" * (len(cols) - 3) + "l"
    lines = [
        "% generated by fvsanity audit; needs \\usepackage{booktabs}",
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
    lines += [
        "\\bottomrule",
        "\\end{tabular}",
        f"\\caption{{{latex_escape(caption if caption is not None else _caption(audit))}}}",
        f"\\label{{{latex_escape(label)}}}",
        "\\end{table}",
    ]
    return "\n".join(lines) + "\n"
