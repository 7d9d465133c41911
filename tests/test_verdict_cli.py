"""The three-way verdict through the CLI: ``fvsanity check`` prints and writes per-layer
outcomes with reasons, ``fvsanity audit`` tables count them per layer."""

from __future__ import annotations

import dataclasses
import json

import torch

from fvsanity.cli import main
from fvsanity.compare.verdict import DIVERGES, INCONCLUSIVE, NATURAL_LIKE, OUTCOMES
from fvsanity.models import list_models, register_model
from fvsanity.testing import tiny_model

TINY = "verdict-cli-tiny"
LAYERS = ["relu1", "relu2", "relu3", "fc"]


def _tiny(pretrained: bool = True):
    return dataclasses.replace(tiny_model(), name=TINY)


if TINY not in list_models():
    register_model(TINY)(_tiny)


def _world(tmp_path):
    """Colour-coded classes class0..class3 (80 natural images each, 16 px) as a class folder, and
    held-out images per class [4, 7, 3, 16, 16] (used as FVs: known to look natural). 80 per class
    and 200 other images: enough for the references' gap over unrelated images to be known to
    within the separation gate's precision at every layer (at ``fc``, 10 logits, the other
    images' scores spread widely: with 15 per class and 40 others it was not)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9], [0.9, 0.9, 0.1]]).view(4, 3, 1, 1)
    labels = torch.arange(4 * 87) % 4
    imgs = (colours[labels] + 0.2 * torch.rand(len(labels), 3, 16, 16, generator=g)).clamp(0, 1)
    root = tmp_path / "imgs"
    for c in range(4):
        (root / f"class{c}").mkdir(parents=True)
        for i, img in enumerate(imgs[labels == c][:80]):
            arr = (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / f"class{c}" / f"{i}.png")
    held = torch.stack([imgs[labels == c][80:] for c in range(4)])  # [4, 7, 3, 16, 16]
    # through PNG as the natural images are (8-bit), so an FV equals what a natural image would be
    held = (held * 255).round() / 255
    return root, held


FAST = ["--n-boot", "20", "--n-perm", "20", "--no-progress", "--top-k", "0", "--n-other", "200"]


def test_cli_check_gives_three_way_outcomes_with_reasons(tmp_path, capsys):
    root, held = _world(tmp_path)
    # 7 FV "seeds" per unit: images of class 0 for both fc:0 (its own class) and fc:2 (another's)
    fv = tmp_path / "fv.pt"
    torch.save({"images": torch.stack([held[0], held[0]])}, fv)
    out = tmp_path / "o"
    rc = main([str(a) for a in ("check", "--model", TINY, "--unit", "fc:0,fc:2", "--fv", fv, "--images", root,
                                "--out", out, *FAST)])
    assert rc == 0
    printed = capsys.readouterr().out
    d = json.loads((out / "check.json").read_text())
    own, other = d["units"]
    assert [r["name"] for r in own["layers"]] == LAYERS and own["n_fv"] == 7
    # the unit's own class images: natural-like at every layer, from the first on
    assert [r["outcome"] for r in own["layers"]] == [NATURAL_LIKE] * 4
    assert own["verdict"]["label"] == "natural-like at its own layer; natural-like from relu1 on (4 of 4 layers)"
    # another class's images: never natural-like; each layer diverges or says why not
    outs = [r["outcome"] for r in other["layers"]]
    assert NATURAL_LIKE not in outs and DIVERGES in outs
    assert all(r["reason"] for r in other["layers"] if r["outcome"] == INCONCLUSIVE)
    assert all(r["reason"] == "" for r in other["layers"] if r["outcome"] != INCONCLUSIVE)
    assert sum(other["verdict"]["counts"].values()) == 4 and other["verdict"]["counts"][NATURAL_LIKE] == 0
    # per unit: the spread over the FV seeds and the activation range
    assert own["layers"][0]["seed_spread"]["sd"] > 0 and len(own["activation_range"]["ratio"]) == 7
    assert d["summary"]["unit_layers"][NATURAL_LIKE] >= 4 and set(d["summary"]["verdicts"]) == set(OUTCOMES)
    # the printed table: the unit sentence and one row per layer with its outcome
    assert own["verdict"]["label"] in printed and other["verdict"]["label"] in printed
    rows = [ln.split() for ln in printed.splitlines() if ln.startswith("  ") and ln.split()[0] in LAYERS]
    assert len(rows) == 2 * 4 + 4 and [r[3] for r in rows[:4]] == [NATURAL_LIKE] * 4  # + across units
    assert "across 2 units (units as replicates):" in printed
    assert "not above" not in printed and "not above" not in (out / "check.json").read_text()


def test_cli_check_with_too_few_seeds_is_inconclusive_with_the_seeds_needed(tmp_path, capsys):
    root, held = _world(tmp_path)
    fv = tmp_path / "fv.pt"
    torch.save({"images": held[2:3, :3]}, fv)  # 3 seeds of another class: it used to read "diverges"
    out = tmp_path / "o"
    assert main([str(a) for a in ("check", "--model", TINY, "--unit", "fc:0", "--fv", fv, "--images", root,
                                  "--out", out, *FAST)]) == 0
    printed = capsys.readouterr().out
    u = json.loads((out / "check.json").read_text())["units"][0]
    assert [r["outcome"] for r in u["layers"]] == [INCONCLUSIVE] * 4
    for r in u["layers"]:
        if r["reason"].startswith("needs"):  # else: the references do not separate at that layer
            assert r["needed"] >= 5 and "smallest attainable p" in r["reason"] and "FV seeds" in r["reason"]
    assert u["layers"][-1]["reason"] == "needs >= 7 FV seeds (smallest attainable p 0.5 > alpha 0.05)"
    assert "fc" in printed and "needs >= 7 FV seeds" in printed


def test_cli_audit_tables_count_the_three_outcomes_per_layer(tmp_path, capsys):
    root, _ = _world(tmp_path)
    out = tmp_path / "a"
    rc = main([str(a) for a in ("audit", "--model", TINY, "--units", "fc:0,fc:2,relu3:1", "--images", root,
                                "--steps", "2", "--seeds", "5", "--paired-metrics", "cka", "--out", out,
                                "--n-boot", "20", "--n-perm", "20", "--no-progress", "--top-k", "3", "--n-other", "40")])
    assert rc == 0
    err = capsys.readouterr().err
    audit = json.loads((out / "audit.json").read_text())
    per = audit["summary"]["layers"]
    assert list(per) == LAYERS
    assert [sum(per[n].values()) for n in LAYERS] == [3, 3, 3, 2]  # relu3:1's path ends at relu3
    assert all(set(c) == set(OUTCOMES) for c in per.values())
    md = (out / "table.md").read_text()
    assert "| Layer | Units | natural-like | diverges | inconclusive | Across units |" in md
    for n in LAYERS:
        c = per[n]
        row = next(ln for ln in md.splitlines() if ln.startswith(f"| {n} | "))
        assert row.startswith(f"| {n} | {sum(c.values())} | {c[NATURAL_LIKE]} | {c[DIVERGES]} | {c[INCONCLUSIVE]} | ")
    tex = (out / "table.tex").read_text()
    assert f"relu1 & 3 & {per['relu1'][NATURAL_LIKE]} & {per['relu1'][DIVERGES]} & {per['relu1'][INCONCLUSIVE]} &" in tex
    html = (out / "report.html").read_text()
    assert "Per layer" in html and "not above" not in html and "not above" not in md
    # across units (3 units): every layer inconclusive, with the units that would be needed
    assert all(a["outcome"] == INCONCLUSIVE and "units" in a["reason"] for a in audit["across_units"])
    # the printed summary uses the same wording
    assert "at their own layer:" in err and audit["fv_settings"]["seeds"] == [0, 1, 2, 3, 4]
    # 5 seeds: natural-like is reachable, "diverges" over 4 layers (Holm) is not: said so
    assert audit["notes"] == ["with 5 FV seed(s) per unit and up to 4 layers the claim 'diverges' is out of reach: "
                              "needs >= 7 FV seeds (smallest attainable p 0.125 > alpha 0.05); such layers read "
                              "'inconclusive'"]
