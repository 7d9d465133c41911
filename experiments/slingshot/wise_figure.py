"""Figure of a WiSE round (``tune.py --wise ... --out JSON``): per interpolation weight alpha, the
mean SSIM(FV, target) over the FV seeds (with its standard error) and the tuning images'
predictions that changed, with the top-1 change beside them.

    python experiments/slingshot/wise_figure.py figures/slingshot/wise_resnet20_picture.json

Writes ``--out DIR``/<the JSON's name>.png, or the ``--out`` .png file; by default beside the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))  # experiments/_outdir.py


def main(argv=None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from _outdir import add_out_argument

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", help="tune.py --wise --out JSON")
    add_out_argument(ap, None, what="folder of the PNG (or a .png file)", default="beside the JSON")
    args = ap.parse_args(argv)
    d = json.loads(Path(args.json).read_text())
    ev = [e for e in d["evaluations"] if "alpha" in e]
    if not ev:
        raise SystemExit(f"{args.json} holds no WiSE evaluations (run tune.py with --wise and --out)")
    a = [e["alpha"] for e in ev]
    per = [[v for unit in e["ssim"] for v in unit] for e in ev]
    mean = [sum(p) / len(p) for p in per]
    se = [(sum((v - m) ** 2 for v in p) / (len(p) - 1)) ** 0.5 / len(p) ** 0.5 for p, m in zip(per, mean)]
    fig, (ls_, rs_) = plt.subplots(1, 2, figsize=(8.4, 3.2))
    ls_.errorbar(a, mean, yerr=[1.96 * s for s in se], marker="o", ms=3, capsize=2)
    ls_.axhline(0.3, color="grey", ls="--", lw=0.8)
    ls_.text(a[0], 0.31, "issue's bound 0.3", fontsize=7, color="grey")
    ls_.set_xlabel("alpha (0: original weights, 1: fine-tuned)")
    ls_.set_ylabel(f"SSIM(FV, target), {d['fv_seeds']} seeds (95% CI)")
    n = ev[0]["n_images"]
    rs_.plot(a, [e["changed"] for e in ev], marker="o", ms=3, label=f"predictions changed (of {n})")
    rs_.set_xlabel("alpha")
    rs_.set_ylabel("tuning predictions changed")
    r2 = rs_.twinx()
    r2.plot(a, [e["top1_change_points"] for e in ev], marker="s", ms=3, color="tab:red", label="top-1 change (points)")
    r2.axhline(-0.5, color="tab:red", ls=":", lw=0.8)
    r2.set_ylabel("top-1 change (points)", color="tab:red")
    h1, l1 = rs_.get_legend_handles_labels()
    h2, l2 = r2.get_legend_handles_labels()
    rs_.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    fig.suptitle(f"{d['model']} {d['variant']}: weights original + alpha x (slingshot - original), "
                 f"{d['split']} split", fontsize=9)
    fig.tight_layout()
    name = Path(args.json).with_suffix(".png").name
    out = Path(args.json).with_suffix(".png") if args.out is None else \
        Path(args.out) if Path(args.out).suffix else Path(args.out) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
