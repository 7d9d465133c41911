"""``report.html``: one self-contained file per audit (no external resource, no JavaScript).

Every image is embedded as a ``data:image/png;base64`` URI, the CSS is inline, links are
in-page anchors only, so the file can be mailed, archived or opened offline. Layout: a header
with the model, images and settings; a summary table (one row per unit, linked to its
section); the paired design across units if computed; then per unit its FVs next to its top
natural exemplars, the layer-profile figure, the circuit figure if present, the per-layer
numbers and the verdict with its test level and intervals.

Input is an audit dict (``audit.json``, :mod:`fvsanity.auditing`) and the folder its relative
image paths point into.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path

from ..compare.verdict import (
    DIVERGE_MARGIN,
    DIVERGES,
    INCONCLUSIVE,
    NATURAL_LIKE,
    NATURAL_LIKE_MARGIN,
    OUTCOMES,
)
from .tables import columns, layer_columns, layer_rows, short_verdict, summary_sentence, unit_rows

__all__ = ["render_html", "write_report", "png_data_uri", "THUMB"]

#: FVs and exemplars are shown 112 px high; they are embedded at most this large (the full-size
#: PNGs stay in the unit folders), which keeps the report small. Figures are embedded with a 256-colour palette (plots
#: have few colours, so this loses nothing visible and saves about two thirds).
THUMB = 112

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;
color:#1d1d1f;line-height:1.4;padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px}h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{margin:0 0 8px 0}
.meta{color:#555;font-size:.9em;overflow-wrap:anywhere}.meta code{background:#f4f4f4;padding:1px 4px;border-radius:3px}
table{border-collapse:collapse;font-size:.88em;margin:8px 0}
th,td{border-bottom:1px solid #e3e3e3;padding:4px 8px;text-align:right;white-space:nowrap}
th{background:#f6f6f6;position:sticky;top:0}
td:first-child,th:first-child,td.l,th.l{text-align:left}
.badge{display:inline-block;padding:2px 8px;border-radius:10px;font-size:.8em;font-weight:600;
vertical-align:middle}
.badge.diverges{background:#fde2e1;color:#9b1c1c}.badge.natural-like{background:#def7e5;color:#14532d}
.badge.inconclusive{background:#eee;color:#555}
.unit{border:1px solid #e2e2e2;border-radius:8px;padding:14px 16px;margin:18px 0;background:#fff}
.row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.gallery{display:flex;flex-wrap:wrap;gap:6px}
.gallery figure{margin:0;text-align:center;font-size:.75em;color:#444}
.gallery img{height:112px;width:auto;display:block;border:1px solid #ccc}
img.px{image-rendering:pixelated}
.fig img{max-width:100%;height:auto;border:1px solid #eee}
.note{color:#666;font-size:.85em}.no{color:#9b1c1c}.yes{color:#14532d}
a{color:#0b57d0;text-decoration:none}
.tw{overflow-x:auto;max-width:100%}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(270px,1fr));gap:12px;margin:14px 0}
.card{border:1px solid #e2e2e2;border-radius:8px;padding:10px 12px;background:#fff;min-width:0}
.card h3{font-size:1em;margin:0 0 6px 0;overflow-wrap:anywhere}
.card .thumbs{display:flex;flex-wrap:wrap;gap:3px;margin:4px 0}
.card .thumbs img{height:56px;width:auto;border:1px solid #ccc}
.card .why{color:#666;font-size:.78em;overflow-wrap:anywhere}
.flag{display:inline-block;padding:1px 6px;border-radius:8px;font-size:.75em;font-weight:600}
.flag.on{background:#fde2e1;color:#9b1c1c}.flag.off{background:#eef;color:#334}
details.prov summary{cursor:pointer;color:#555}
"""

#: per unit on the report's first screen: this many top natural exemplars beside all FV seeds
CARD_EXEMPLARS = 3
CARD_THUMB = 56


def png_data_uri(source) -> str:
    """``data:image/png;base64,...`` for a PNG file path, PNG bytes, or a [3,H,W] tensor in [0,1]."""
    if isinstance(source, (str, os.PathLike)):
        data = Path(source).read_bytes()
    elif isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        from PIL import Image

        from ..io import to_uint8

        buf = io.BytesIO()
        Image.fromarray(to_uint8(source)).save(buf, format="PNG")
        data = buf.getvalue()
    if not data.startswith(b"\x89PNG"):
        raise ValueError("not a PNG image")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def _f(v, d: int = 3) -> str:
    x = _num(v)
    return f"{x:.{d}f}" if math.isfinite(x) else "n/a"


def _img(root: Path, rel: str | None, alt: str, cls: str = "", max_side: int | None = None, palette: bool = False) -> str:
    """An <img> with the file embedded (downscaled to ``max_side`` px if larger; a 256-colour
    palette if ``palette``), or a note if the file is missing or unreadable."""
    if not rel:
        return ""
    p = root / rel
    try:
        from PIL import Image

        with Image.open(p) as im:
            size = im.size
            shrink = max_side is not None and max(size) > max_side
            if shrink or palette:
                out = im.convert("RGB")
                if shrink:
                    s = max_side / max(size)
                    out = out.resize((max(1, round(size[0] * s)), max(1, round(size[1] * s))), Image.LANCZOS)
                if palette:
                    out = out.quantize(256)
                buf = io.BytesIO()
                out.save(buf, format="PNG", optimize=True)
                uri = png_data_uri(buf.getvalue())
            else:
                uri = png_data_uri(p)
    except (OSError, ValueError):
        return f'<span class="note">[missing image {_e(rel)}]</span>'
    c = (cls + (" px" if max(size) <= 64 else "")).strip()
    return f'<img src="{uri}" alt="{_e(alt)}"' + (f' class="{c}"' if c else "") + ">"


def _cards(audit: dict, root: Path) -> str:
    """The first screen: one card per unit with its FVs (every seed), its top natural exemplars,
    the verdict badge, and the calibrated flag when the unit has one; each links to its details."""
    cards = []
    for rec in audit.get("units", []):
        v = rec["verdict"]
        own = v.get("outcome", INCONCLUSIVE)
        name = rec["unit"] + (f" ({rec['class_name']})" if rec.get("class_name") else "")
        fvs = "".join(_img(root, p, f"FV seed {sd} of {rec['unit']}", max_side=CARD_THUMB)
                      for p, sd in zip(rec["fv"]["images"], rec["fv"]["seeds"]))
        ex = rec.get("exemplars", {}).get("images", [])[:CARD_EXEMPLARS]
        exs = "".join(_img(root, p, f"natural exemplar {k + 1} of {rec['unit']}", max_side=CARD_THUMB)
                      for k, p in enumerate(ex))
        cal = rec.get("calibrated")
        flag = ""
        if cal:
            on = bool(cal.get("flagged"))
            flag = f' <span class="flag {"on" if on else "off"}">{"flagged as manipulated" if on else "not flagged"}</span>'
        why = short_verdict(rec)[len(own):].strip(" ()")
        cards.append(
            f'<div class="card"><h3><a href="#u-{_e(rec["id"])}">{_e(name)}</a></h3>'
            f'<span class="badge {_e(own)}">{_e(own)}</span>{flag}'
            f'<div class="note">FVs</div><div class="thumbs">{fvs}</div>'
            f'<div class="note">top natural exemplars</div><div class="thumbs">{exs or "<span class=note>none</span>"}</div>'
            + (f'<div class="why">{_e(why)}</div>' if why else "") + "</div>"
        )
    return f'<div class="cards">{"".join(cards)}</div>'


def _header(audit: dict) -> str:
    m = audit.get("model", {})
    imgs = audit.get("images", {})
    fvs = audit.get("fv_settings", {})
    s = audit.get("settings", {})
    prov = audit.get("provenance", {})
    vers = prov.get("versions", {})
    vtxt = ", ".join(f"{k} {v}" for k, v in vers.items() if v)
    t = audit.get("timing", {})
    n_unread = imgs.get("n_unreadable")
    return f"""
<details class="prov"><summary>Provenance and settings</summary>
<p class="meta">Weights: <code>{_e(m.get('weights', '?'))}</code><br>
Natural images: <code>{_e(imgs.get('root', '?'))}</code> ({_e(imgs.get('n_images', imgs.get('n', '?')))} images{
        f', {int(n_unread)} unreadable skipped' if n_unread else ''})<br>
FVs per unit: {_e(len(fvs.get('seeds', [])))} (seeds {_e(fvs.get('seeds', []))}), {_e(fvs.get('steps', '?'))} steps,
size {_e(fvs.get('size', '?'))}, lr {_e(fvs.get('lr', '?'))}, {_e(fvs.get('param', '?'))} parametrization,
{_e(fvs.get('transforms', '?') + ' transforms' if isinstance(fvs.get('transforms'), str) else 'transforms as in audit.json')}{
        f", reused from <code>{_e(fvs['source'])}</code>" if fvs.get('source') else ''};
settings hash <code>{_e(audit.get('fv_settings_hash', '?'))}</code><br>
Check: {_e(s.get('metric', '?'))} similarity of mean-pooled activations, top-{_e(s.get('top_k', '?'))} exemplars
{'+ class images ' if s.get('use_class_images') else ''}as natural references, {_e(s.get('n_other', '?'))} other images,
{_e(s.get('n_boot', '?'))} bootstrap resamples, {_e(s.get('n_perm', '?'))} permutations (descriptive), verdict at alpha = {_e(s.get('alpha', '?'))},
{_e(int(100 * float(s.get('confidence', 0.95))))}% intervals; seed {_e(s.get('seed', '?'))}<br>
Versions: {_e(vtxt)}; python {_e(prov.get('python', '?'))}; git <code>{_e((prov.get('git_sha') or '-')[:12])}</code><br>
Written {_e(audit.get('written_at', '?'))}. Wall time of the audit: {_e(t.get('wall_s_all_calls', t.get('wall_s_run', '?')))} s
over {_e(len(t.get('calls', [])) or 1)} call(s) (this call {_e(t.get('wall_s_run', '?'))} s; model loading and report
writing excluded); per-unit compute summed: {_e(t.get('unit_seconds_total', '?'))} s</p></details>
""" + "".join(f'<p class="note no">Note: {_e(n)}</p>' for n in audit.get("notes", []))


def _summary(audit: dict) -> str:
    cols = columns(audit)
    rows = unit_rows(audit)
    s = audit.get("summary", {})
    head = "".join(f'<th class="{"l" if k in ("unit", "class", "verdict") else ""}">{_e(h)}</th>' for k, h in cols)
    body = []
    for rec, r in zip(audit.get("units", []), rows):
        cells = []
        for k, _ in cols:
            if k == "unit":
                cells.append(f'<td><a href="#u-{_e(rec["id"])}">{_e(r[k])}</a></td>')
            elif k == "verdict":
                o = rec["verdict"].get("outcome", INCONCLUSIVE)
                cells.append(f'<td class="l"><span class="badge {_e(o)}">{_e(o)}</span>{_e(r[k][len(o):])}</td>')
            elif k == "class":
                cells.append(f'<td class="l">{_e(r[k])}</td>')
            else:
                cells.append(f"<td>{_e(r[k])}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"""
<h2>Summary</h2>
<p><b>{_e(summary_sentence(s))}</b> <span class="note">{_e(VERDICT_NOTE)} Norm. sim. = (FV vs natural - natural vs other) /
(natural vs natural - natural vs other): 0 = the FVs are as similar to the unit's natural images as unrelated
images are, 1 = as similar as the natural images among themselves.</span></p>
<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>
{_layer_counts(audit)}"""


#: how the per-layer outcomes are decided (one paragraph, the report's)
VERDICT_NOTE = (
    f"Per layer: {NATURAL_LIKE} when the normalized similarity is significantly above a margin "
    f"({NATURAL_LIKE_MARGIN:g} by default), {DIVERGES} when significantly below another ({DIVERGE_MARGIN:g}), each by a sign-flip test over the unit's FV seeds "
    f"({NATURAL_LIKE}: fixed sequence from the unit's own layer backward; {DIVERGES}: Holm over the layers); "
    f"otherwise {INCONCLUSIVE}, with the reason (e.g. the FV seeds needed to reach alpha)."
)


def _layer_counts(audit: dict) -> str:
    """Per layer: how many units are natural-like, diverge, are inconclusive; across-units outcome."""
    rows = layer_rows(audit)
    if not rows:
        return ""
    cols = layer_columns()
    head = "".join(f'<th class="{"l" if k in ("layer", "across") else ""}">{_e(h)}</th>' for k, h in cols)
    body = "".join(
        "<tr>" + "".join(f'<td class="{"l" if k in ("layer", "across") else ""}">{_e(r[k])}</td>' for k, _ in cols) + "</tr>"
        for r in rows
    )
    return f"<h3>Per layer</h3><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _across(audit: dict, root: Path) -> str:
    rows = audit.get("across_units") or []
    fig = (audit.get("figures") or {}).get("path_similarity")
    if not rows and not fig:
        return ""
    trs = "".join(
        f"<tr><td>{_e(r['name'])}</td><td>{_e(r['n_units'])}</td><td>{_f(r.get('estimate'), 2)} "
        f"[{_f(r.get('ci_low'), 2)}, {_f(r.get('ci_high'), 2)}]</td><td>{_f(r.get('median_normalized'), 2)}</td>"
        f"<td class=\"l\"><span class=\"badge {_e(r.get('outcome', INCONCLUSIVE))}\">{_e(r.get('outcome', INCONCLUSIVE))}"
        f"</span> {_e(r.get('reason', ''))}</td></tr>"
        for r in rows
    )
    return (
        "<h2>Across units</h2><p class=\"note\">Per layer, each unit is one observation (its normalized "
        "similarity): the same outcomes and tests as within a unit, with units as replicates (sign-flip test "
        f"against the margins; {NATURAL_LIKE}: fixed sequence, {DIVERGES}: Holm across layers).</p>"
        + (f'<div class="fig">{_img(root, fig, "layer profile, mean over units", palette=True)}</div>' if fig else "")
        + ("<table><thead><tr><th>layer</th><th>units</th><th>mean normalized [bounds]</th><th>median normalized</th>"
           "<th class=\"l\">outcome</th></tr></thead><tbody>" + trs + "</tbody></table>" if rows else "")
    )


def _paired(audit: dict) -> str:
    paired = audit.get("paired") or {}
    parts = []
    for metric, rows in paired.items():
        if isinstance(rows, dict):  # an error message
            parts.append(f'<p class="note">{_e(metric)}: {_e(rows.get("error", ""))}</p>')
            continue
        trs = "".join(
            f"<tr><td>{_e(r['name'])}</td><td>{_f(r['value'])}</td><td>{_f(r['null_mean'])}</td>"
            f"<td>{_f(r['null_high'])}</td><td>{_f(r['p_value'])}</td><td>{_f(r['natural_split_half'])}</td></tr>"
            for r in rows
        )
        parts.append(
            f"<h3>{_e(metric)}</h3><table><thead><tr><th>layer</th><th>FV vs natural</th><th>null mean</th>"
            f"<th>null 95%</th><th>p</th><th>natural split-half</th></tr></thead><tbody>{trs}</tbody></table>"
        )
    if not parts:
        return ""
    return (
        "<h2>Across units (paired design)</h2><p class=\"note\">Rows = units; A = each unit's mean FV "
        "activation, B = the mean activation of its natural references; the null shuffles which natural row "
        "belongs to which unit; the split-half value compares two halves of the natural references.</p>"
        + "".join(parts)
    )


def _layer_table(rec: dict) -> str:
    trs = []
    for r in rec["path"]["layers"]:
        o = r.get("outcome", INCONCLUSIVE)
        sp = r.get("seed_spread") or {}
        trs.append(
            f"<tr><td>{_e(r['name'])}</td><td>{_f(r['fv_vs_natural'])}</td><td>{_f(r['natural_vs_natural'])}</td>"
            f"<td>{_f(r['natural_vs_other'])}</td><td>{_f(r['normalized'], 2)} [{_f(r['ci_low'], 2)}, "
            f"{_f(r['ci_high'], 2)}]</td><td>{_f(sp.get('sd'), 2)}</td><td>{_f(r.get('p_natural_like'), 4)}</td>"
            f"<td>{_f(r.get('p_diverges'), 4)}</td><td class=\"l\"><span class=\"badge {_e(o)}\">{_e(o)}</span> "
            f"{_e(r.get('reason', ''))}</td></tr>"
        )
    return (
        "<table><thead><tr><th>layer</th><th>FV vs natural</th><th>natural vs natural</th><th>natural vs other</th>"
        "<th>normalized [CI]</th><th>seed SD</th><th>p natural-like</th><th>p diverges</th>"
        "<th class=\"l\">outcome</th></tr></thead><tbody>" + "".join(trs) + "</tbody></table>"
    )


def _circuit_block(rec: dict, root: Path) -> str:
    c = rec.get("circuit")
    figs = rec.get("figures", {})
    if not c and not figs.get("circuit"):
        return ""
    parts = ["<h4>Circuits: FV vs natural (edge attribution)</h4>"]
    if isinstance(c, dict) and c.get("error"):
        parts.append(f'<p class="note no">Circuit comparison failed for this unit: {_e(c["error"])}</p>')
    elif isinstance(c, dict):
        s = c.get("summary") or {}
        parts.append(
            f"<p>Method {_e(c.get('method', '?'))} ({_e(c.get('steps', '?'))} steps, reference "
            f"{_e(c.get('reference', '?'))}); {_e(c.get('n_fv', '?'))} FVs, {_e(c.get('n_natural', '?'))} natural, "
            f"{_e(c.get('n_other', '?'))} other images. The FV circuit overlaps the natural circuit significantly "
            f"more than unrelated images' circuits do on <b>{_e(s.get('n_layers_above_other', '?'))} of "
            f"{_e(s.get('n_layers', '?'))}</b> layers (Holm, alpha = {_e(c.get('alpha', '?'))}); mean calibrated "
            f"overlap {_f(s.get('mean_calibrated'), 2)} (0 = like unrelated images, 1 = like the unit's own "
            f"images; primary statistic {_e(c.get('primary', '?'))}).</p>"
        )
    for key, alt in (("circuit", "attribution graph"), ("circuit_profile", "circuit overlap per layer")):
        if figs.get(key):
            parts.append(f'<div class="fig">{_img(root, figs[key], alt + " of " + rec["unit"], palette=True)}</div>')
    if isinstance(c, dict) and c.get("layers"):
        trs = "".join(
            f"<tr><td>{_e(la.get('name'))}</td><td>{_e(la.get('n_edges'))}</td>"
            f"<td>{_f(la.get(la.get('primary', 'spearman')))}</td><td>{_f(la.get('null_same'))}</td>"
            f"<td>{_f(la.get('null_other'))}</td><td>{_f(la.get('calibrated'), 2)} [{_f(la.get('ci_low'), 2)}, "
            f"{_f(la.get('ci_high'), 2)}]</td><td>{_f(la.get('p_holm'), 4)}</td></tr>"
            for la in c["layers"]
        )
        parts.append(
            "<table><thead><tr><th>layer</th><th>edges</th><th>FV vs natural</th><th>natural vs natural</th>"
            "<th>other vs natural</th><th>calibrated [CI]</th><th>p (Holm)</th></tr></thead><tbody>"
            + trs + "</tbody></table>"
        )
    return "".join(parts)


def _unit_section(rec: dict, root: Path, audit: dict) -> str:
    v = rec["verdict"]
    sv = short_verdict(rec)
    name = rec["unit"] + (f" ({rec['class_name']})" if rec.get("class_name") else "")
    fv = rec["fv"]
    uname = rec["unit"]
    fv_imgs = "".join(
        f"<figure>{_img(root, p, f'FV seed {s} of {uname}', max_side=THUMB)}<figcaption>seed {_e(s)}: {_f(a, 2)}</figcaption></figure>"
        for p, s, a in zip(fv["images"], fv["seeds"], fv["final_objective"])
    )
    ex = rec.get("exemplars", {})
    ex_imgs = "".join(
        f"<figure>{_img(root, p, f'natural exemplar {k + 1} of {uname}', max_side=THUMB)}<figcaption>{_f(val, 2)}</figcaption></figure>"
        for k, (p, val) in enumerate(zip(ex.get("images", []), ex.get("values", [])))
    )
    nr = rec.get("natural_response", {})
    path = rec["path"]
    s = audit.get("settings", {})
    alpha = v.get("alpha", s.get("alpha"))
    conf = int(100 * float(s.get("confidence", 0.95)))
    ar = rec.get("activation_range") or path.get("activation_range")
    own = v.get("outcome", INCONCLUSIVE)
    return f"""
<section class="unit" id="u-{_e(rec['id'])}">
<h3>{_e(name)} <span class="badge {_e(own)}">{_e(sv)}</span></h3>
{f'<p class="note no"><b>Insufficient references:</b> {_e(v.get("status"))}; every layer is {INCONCLUSIVE}.</p>' if v.get("status", "ok") != "ok" else ""}
{f'<p class="note{" no" if (v.get("seed_stability") or {}).get("fragile") else ""}"><b>Seed stability:</b> {_e(v["seed_stability"]["note"])}</p>' if (v.get("seed_stability") or {}).get("n_subsets") else ""}
<p><b>Verdict:</b> {_e(v['label'])}. Layers: {_e(", ".join(f"{(v.get('counts') or {}).get(o, 0)} {o}" for o in OUTCOMES))}
of {_e(v['n_layers'])} (alpha = {_e(alpha)} per kind of claim). {_e(VERDICT_NOTE)}
Activation range (FV response / largest natural response, per seed):
{_e(", ".join(_f(x, 2) for x in ar["ratio"]) + f" (median {_f(ar['ratio_median'], 2)})" if ar else "n/a")}.
Normalized similarities below carry {conf}% bootstrap intervals over images; seed SD = spread over the FV seeds.</p>
<div class="row">
<div><div class="note">Feature visualizations (unit activation)</div><div class="gallery">{fv_imgs}</div></div>
<div><div class="note">Top natural exemplars (unit activation)</div><div class="gallery">{ex_imgs or '<span class="note">none</span>'}</div></div>
</div>
<p class="note">Unit activation: FVs {_e(', '.join(_f(a, 2) for a in fv['final_objective']))}; natural images max
{_f(nr.get('max'), 2)}, mean {_f(nr.get('mean'), 2)} (sd {_f(nr.get('std'), 2)}).
Natural references: {_e(path.get('n_natural', '?'))} images ({_e(path.get('n_class_images', 0))} of the unit's class,
top-{_e(len(path.get('top_k_indices', [])))} exemplars); {_e(path.get('n_other', '?'))} other images.</p>
<div class="fig">{_img(root, rec.get('figures', {}).get('profile'), 'layer profile of ' + rec['unit'], palette=True)}</div>
{_layer_table(rec)}
{_circuit_block(rec, root)}
</section>
"""


def render_html(audit: dict, root: str | os.PathLike, title: str | None = None) -> str:
    """The report as one HTML string; image paths in ``audit`` are relative to ``root``."""
    root = Path(root)
    model = audit.get("model", {}).get("name", "?")
    units = "".join(_unit_section(rec, root, audit) for rec in audit.get("units", []))
    first = (f"<h1>fvsanity audit: {_e(model)}</h1>"
             f"<p><b>{_e(summary_sentence(audit.get('summary', {})))}</b></p>" + _cards(audit, root))
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_e(title or f'fvsanity audit: {model}')}</title><style>{CSS}</style></head><body>"
        + first + _header(audit) + _summary(audit) + _across(audit, root) + _paired(audit) + "<h2>Units</h2>" + units
        + "<p class=\"note\">Method: Geirhos, Zimmermann, Bilodeau, Brendel, Kim (2023), Don't trust your eyes: "
        "on the (un)reliability of feature visualizations, arXiv 2306.04719. Generated by fvsanity.</p>"
        + "</body></html>\n"
    )
    return page.replace("<table>", '<div class="tw"><table>').replace("</table>", "</table></div>")  # scroll in place


def write_report(audit: dict, root: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """Render and atomically write ``root/report.html`` (or ``path``); returns the path."""
    from ..io import atomic_write_text

    root = Path(root)
    return atomic_write_text(Path(path) if path else root / "report.html", render_html(audit, root))
