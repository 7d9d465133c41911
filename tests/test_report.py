"""report.html and the sanity tables, rendered from a synthetic audit with known content."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser

import pytest
import torch
from PIL import Image

from fvsanity.io import save_png
from fvsanity.report.html import png_data_uri, render_html, write_report
from fvsanity.report.tables import latex_escape, markdown_escape, to_latex, to_markdown, unit_rows

NASTY = "a_b & c % $5 #1 {x} ~y ^z \\w <v>"


OWN_REASON = "needs >= 5 FV seeds (smallest attainable p 0.25 > alpha 0.05)"


def _layer(name, fv, nat, oth, above, p, outcome=None):
    norm = (fv - oth) / (nat - oth)
    if outcome is None:
        outcome = "natural-like" if above else "diverges"
    return {
        "name": name, "outcome": outcome, "reason": OWN_REASON if outcome == "inconclusive" else "",
        "p_natural_like": 0.01, "p_diverges": 0.5, "seed_spread": {"sd": 0.05, "min": 0.4, "max": 0.6},
        "fv_vs_natural": fv, "natural_vs_natural": nat, "natural_vs_other": oth,
        "normalized": norm, "ci_low": norm - 0.1, "ci_high": norm + 0.1, "p_value": p, "p_raw": p / 2,
        "above_baseline": above, "p_exact": True, "fv_vs_natural_ci": [fv - 0.01, fv + 0.01],
        "natural_vs_natural_ci": [nat - 0.01, nat + 0.01], "natural_vs_other_ci": [oth - 0.01, oth + 0.01],
    }


def _unit(root, spec, uid, class_name, outcomes, circuit=None):
    d = root / "units" / uid
    g = torch.Generator().manual_seed(len(uid))
    fv_files, ex_files = [], []
    for s in range(2):
        save_png(d / f"fv_seed{s}.png", torch.rand(3, 16, 16, generator=g))
        fv_files.append(f"units/{uid}/fv_seed{s}.png")
    for k in range(3):
        save_png(d / f"exemplar{k}.png", torch.rand(3, 16, 16, generator=g))
        ex_files.append(f"units/{uid}/exemplar{k}.png")
    save_png(d / "profile.png", torch.rand(3, 40, 60, generator=g))
    names = [f"block{i}" for i in range(len(outcomes))]
    layers = [_layer(n, 0.5 + 0.1 * (o == "natural-like"), 0.8, 0.5, o == "natural-like", 0.01, o)
              for n, o in zip(names, outcomes)]
    counts = {o: outcomes.count(o) for o in ("natural-like", "diverges", "inconclusive")}
    own = outcomes[-1]
    own_s = f"inconclusive at its own layer ({OWN_REASON})" if own == "inconclusive" else f"{own} at its own layer"
    k = 0
    for o in reversed(outcomes):
        if o != "natural-like":
            break
        k += 1
    path_s = f"natural-like from {names[len(names) - k]} on ({k} of {len(names)} layers)" if k else "natural-like at no layer"
    if counts["diverges"]:
        path_s += f", diverges at {counts['diverges']} of {len(names)} layers"
    verdict = {
        "outcome": own, "label": f"{own_s}; {path_s}", "status": "ok", "n_layers": len(names), "counts": counts,
        "natural_like_from": names[len(names) - k] if k else None,
        "own_layer_reason": OWN_REASON if own == "inconclusive" else "", "alpha": 0.05,
    }
    return {
        "unit": spec, "id": uid, "layer": spec.split(":")[0], "channel": int(spec.split(":")[1]), "kind": "channel",
        "class_name": class_name,
        "fv": {"seeds": [0, 1], "final_objective": [3.0, 5.0], "images": fv_files},
        "natural_response": {"max": 2.0, "mean": 0.1, "std": 0.5, "fv_over_max": 2.0},
        "exemplars": {"indices": [4, 2, 9], "values": [2.0, 1.5, 1.25], "paths": [], "images": ex_files},
        "path": {"unit": spec, "layers": layers, "verdict": verdict, "n_natural": 12, "n_class_images": 10,
                 "top_k_indices": [4, 2, 9], "n_other": 30},
        "verdict": verdict,
        "activation_range": {"ratio": [1.5, 2.5], "ratio_median": 2.0, "ratio_max": 2.5, "natural_max": 2.0,
                             "natural_silent": False},
        "circuit": circuit,
        "figures": {"profile": f"units/{uid}/profile.png", "circuit": None},
        "seconds": 1.0,
    }


def synthetic_audit(root):
    """Three units: one natural-like (class name full of LaTeX specials), one inconclusive, one diverging."""
    circuit = {"method": "eap-ig", "steps": 8, "reference": "mean", "alpha": 0.05, "primary": "spearman",
               "summary": {"n_layers": 4, "n_layers_above_other": 1, "mean_calibrated": 0.25},
               "layers": [{"name": "conv1", "n_edges": 48, "primary": "spearman", "spearman": 0.7, "null_same": 0.8,
                           "null_other": 0.6, "calibrated": 0.5, "ci_low": 0.1, "ci_high": 0.9, "p_holm": 0.2}]}
    units = [
        _unit(root, "fc:1", "fc_c1", NASTY, ["natural-like"] * 3),
        _unit(root, "fc:7", "fc_c7", "goldfish", ["diverges", "natural-like", "inconclusive"], circuit=circuit),
        _unit(root, "relu3:5", "relu3_c5", None, ["diverges", "diverges"]),
    ]
    return {
        "format": "fvsanity-audit/1",
        "model": {"name": "tiny_model", "weights": "/w/tiny.pt"},
        "images": {"root": "/data/imgs", "n_images": 40},
        "settings": {"metric": "spearman", "alpha": 0.05, "confidence": 0.95, "top_k": 3, "n_other": 30,
                     "n_boot": 100, "n_perm": 100, "seed": 0, "use_class_images": True},
        "fv_settings": {"steps": 16, "seeds": [0, 1], "size": [16, 16], "lr": 0.05, "param": "fft",
                        "transforms": "standard"},
        "fv_settings_hash": "abc123def456",
        "summary": {"n_units": 3, "n_insufficient": 0,
                    "units": {"natural-like": 1, "diverges": 1, "inconclusive": 1}, "n_unit_layers": 8,
                    "unit_layers": {"natural-like": 4, "diverges": 3, "inconclusive": 1},
                    "layers": {"block0": {"natural-like": 1, "diverges": 2, "inconclusive": 0},
                               "block1": {"natural-like": 2, "diverges": 1, "inconclusive": 0},
                               "block2": {"natural-like": 1, "diverges": 0, "inconclusive": 1}}},
        "paired": {},
        "units": units,
        "timing": {"wall_s_run": 1.5, "unit_seconds_total": 3.0},
        "provenance": {"versions": {"torch": "2.x"}, "python": "3.x", "git_sha": "deadbeef"},
    }


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_escapes():
    assert latex_escape("a_b&c%d$e#f{g}h~i^j\\k") == (
        r"a\_b\&c\%d\$e\#f\{g\}h\textasciitilde{}i\textasciicircum{}j\textbackslash{}k"
    )
    assert markdown_escape("a|b") == "a\\|b"


def test_tables_hold_every_unit_and_verdict(tmp_path):
    audit = synthetic_audit(tmp_path)
    rows = unit_rows(audit)
    assert [r["unit"] for r in rows] == ["fc:1", "fc:7", "relu3:5"]
    # the verdict column: the outcome at the unit's own layer, inconclusive with its reason
    assert [r["verdict"] for r in rows] == ["natural-like", f"inconclusive ({OWN_REASON})", "diverges"]
    assert [r["counts"] for r in rows] == ["3/0/0", "1/1/1", "0/2/0"]  # natural-like/diverges/inconclusive
    assert [r["act_range"] for r in rows] == ["2.00x"] * 3 and rows[0]["spread"] == "0.05"
    assert rows[1]["circuit"] == "0.25 (1/4)" and rows[0]["circuit"] == "-"
    md = to_markdown(audit)
    unit_table = md.split("\n\n")[0]
    lines = [ln for ln in unit_table.splitlines() if ln.startswith("| ")]
    assert len(lines) == 1 + 3  # header + one row per unit
    assert "Of 3 units, at their own layer: 1 natural-like, 1 diverges, 1 inconclusive." in md
    # the per-layer table: units natural-like / diverges / inconclusive per layer
    assert "| Layer | Units | natural-like | diverges | inconclusive | Across units |" in md
    assert "| block0 | 3 | 1 | 2 | 0 | - |" in md and "| block2 | 2 | 1 | 0 | 1 | - |" in md
    for spec, verdict in (("fc:1", "natural-like"), ("fc:7", f"inconclusive ({OWN_REASON})"), ("relu3:5", "diverges")):
        row = next(ln for ln in lines if ln.startswith(f"| {spec} |"))
        assert row.rstrip().endswith(f"| {verdict} |")
    assert "Circuit overlap" in lines[0]
    # every row has as many cells as the header, even with '|' in a name
    assert all(len(re.split(r"(?<!\\)\|", ln)) == len(re.split(r"(?<!\\)\|", lines[0])) for ln in lines)

    tex = to_latex(audit)
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert latex_escape(NASTY) in tex
    unit_tex = tex.split("\\end{table}")[0]
    body = [ln for ln in unit_tex.splitlines() if ln.endswith("\\\\")]
    assert len(body) == 1 + 3
    for ln in body:
        # no unescaped special outside commands: strip escapes, then none of & % $ # _ remain unescaped
        cells = re.split(r"(?<!\\)&", ln[:-2])
        assert len(cells) == 11  # 11 columns (circuit column present)
        assert not re.search(r"(?<!\\)[%$#_]", ln)
    assert "relu3:5" in tex and "goldfish" in tex
    assert "block0 & 3 & 1 & 2 & 0 & - \\\\" in tex  # the per-layer table


def test_table_without_circuits_has_no_circuit_column(tmp_path):
    audit = synthetic_audit(tmp_path)
    for u in audit["units"]:
        u["circuit"] = None
    assert "Circuit" not in to_markdown(audit).splitlines()[0]
    assert "Circuit" not in to_latex(audit)


def test_html_self_contained(tmp_path):
    audit = synthetic_audit(tmp_path)
    path = write_report(audit, tmp_path)
    text = path.read_text()
    assert path == tmp_path / "report.html"
    p = _Tags()
    p.feed(text)
    imgs = [a for t, a in p.tags if t == "img"]
    # 3 units x (2 FVs + 3 exemplars + 1 profile) in the details, plus the first screen's cards
    # (2 FVs + up to 3 exemplars per unit)
    assert len(imgs) == 3 * 6 + 3 * (2 + 3)
    for a in imgs:
        assert a["src"].startswith("data:image/png;base64,")
        png = base64.b64decode(a["src"].split(",", 1)[1])
        Image.open(io.BytesIO(png)).verify()
        assert a.get("alt")
    # no external resources at all: no scripts, stylesheets, remote URLs, CSS url()
    assert not [t for t, _ in p.tags if t in ("script", "link", "iframe", "object", "embed")]
    for t, a in p.tags:
        for k in ("src", "href"):
            v = a.get(k)
            if v is not None:
                assert v.startswith(("data:", "#")), (t, k, v[:40])
    assert not re.search(r"https?://|url\(|@import|//[a-z]", re.sub(r'src="data:[^"]*"', "", text))
    # content: summary rows link to unit sections; every verdict and class name is there, escaped
    hrefs = [a["href"] for t, a in p.tags if t == "a"]
    ids = {a["id"] for t, a in p.tags if "id" in a}
    assert set(hrefs) == {"#u-fc_c1", "#u-fc_c7", "#u-relu3_c5"}
    assert {h[1:] for h in hrefs} <= ids
    alltext = "".join(p.text)
    assert NASTY in alltext  # HTML-escaped in the source, intact when parsed
    assert "<v>" not in text
    for u in audit["units"]:
        assert u["verdict"]["label"] in alltext
    assert "diverges at 1 of 3 layers" in alltext and OWN_REASON in alltext
    assert "not above" not in text and "1 natural-like, 1 diverges, 1 inconclusive" in alltext
    assert "mean calibrated overlap 0.25" in alltext


def test_html_missing_image_is_a_note_not_a_broken_img(tmp_path):
    audit = synthetic_audit(tmp_path)
    (tmp_path / "units" / "fc_c7" / "exemplar1.png").unlink()
    text = render_html(audit, tmp_path)
    assert "[missing image units/fc_c7/exemplar1.png]" in text
    p = _Tags()
    p.feed(text)
    assert all(a["src"].startswith("data:image/png") for t, a in p.tags if t == "img")


def test_png_data_uri_roundtrip(tmp_path):
    img = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0))
    uri = png_data_uri(img)
    back = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert back.size == (7, 5)
    with pytest.raises(ValueError):
        png_data_uri(b"GIF89a....")


def test_circuit_error_is_reported_not_tabulated(tmp_path):
    audit = synthetic_audit(tmp_path)
    audit["units"][1]["circuit"] = {"error": "every edge score is zero for fc:7"}
    text = render_html(audit, tmp_path)
    assert "Circuit comparison failed for this unit: every edge score is zero for fc:7" in text
    assert "Circuit" not in to_markdown(audit).splitlines()[0]


# ---------------------------------------------------------------------------------- path figure
def _check_doc():
    names = ["block0", "block1", "block2"]
    units = []
    for spec, flags in (("fc:1", [True, True, False]), ("fc:7", [False, True, True])):
        u = [_layer(n, 0.5 + 0.1 * a, 0.8, 0.5, a, 0.01 if a else 0.9) for n, a in zip(names, flags)]
        units.append({"unit": spec, "class_name": None, "layers": u,
                      "verdict": {"label": "natural-like at no layer", "outcome": "diverges", "n_layers": 3}})
    return {"model": "tiny_model", "settings": {"metric": "spearman"}, "units": units}


@pytest.mark.parametrize("suffix, magic", [(".pdf", b"%PDF"), (".svg", b"<?xml"), (".png", b"\x89PNG\r\n\x1a\n")])
def test_path_figure_writes_the_format_its_suffix_names(tmp_path, suffix, magic):
    from fvsanity.report.path_figure import plot_path_similarity

    for mode in ("panels", "mean"):
        path = plot_path_similarity(_check_doc(), tmp_path / f"fig_{mode}{suffix}", mode=mode)
        assert path == tmp_path / f"fig_{mode}{suffix}"
        assert path.read_bytes().startswith(magic), path.read_bytes()[:16]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"fig_mean{suffix}", f"fig_panels{suffix}"]  # no temp left


def test_path_figure_unknown_suffix_is_refused_and_nothing_is_written(tmp_path):
    from fvsanity.errors import FVSanityError
    from fvsanity.report.path_figure import plot_path_similarity

    (tmp_path / "fig.jpg").write_bytes(b"keep me")
    with pytest.raises(FVSanityError, match=r"unknown suffix '\.jpg'; valid: \.png, \.pdf, \.svg"):
        plot_path_similarity(_check_doc(), tmp_path / "fig.jpg")
    assert (tmp_path / "fig.jpg").read_bytes() == b"keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["fig.jpg"]
