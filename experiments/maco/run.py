"""MACO next to FFT: phase-only FVs (fixed magnitude spectrum) vs the default Fourier FVs.

Fel et al. (2023), "Unlocking feature visualization for deeper networks with magnitude
constrained optimization", optimize only the Fourier phase of the image and keep its magnitude
fixed to a natural-image spectrum. In fvsanity that is one registered parametrization
(``render(param="maco")``), so this script renders the same units (config.json: six channels of
ResNet-20's last block ``layer3.2`` and six class logits ``linear``), with the same seeds, steps,
optimizer (Adam, lr 0.05), transforms and image size, once per parametrization:

- ``fft``: the default (1/f-scaled spectrum, magnitude and phase free);
- ``maco``: phase only, magnitude = fft's 1/f shape at a fixed contrast (the default);
- ``maco (CIFAR-10 spectrum)``: phase only, magnitude = the mean amplitude spectrum of 500
  CIFAR-10 test images (``fvsanity.generate.param.magnitude_spectrum``).

Reported per unit and parametrization: the objective of the final, untransformed FV after N
steps (and at the checkpoints), and the share of the FV's power above ``hf_cutoff`` cycles/px
(natural images: for comparison). Writes to ``--out DIR`` (a full run without it: figures/maco/,
said in one line before it starts; ``--smoke`` without it: a fresh temporary folder): fft_vs_maco.png
(rows = units, columns = parametrizations, objective under each image) and results.json. The
last line printed is one JSON object of the headline numbers.

    python experiments/maco/run.py            # ResNet-20 from FVSANITY_DATA, a few CPU minutes
    python experiments/maco/run.py --smoke    # tiny model, seconds, a temporary folder
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))  # experiments/_outdir.py


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def hf_share(images: torch.Tensor, cutoff: float) -> torch.Tensor:
    """[N] share of each RGB image's power (mean removed per channel) above ``cutoff`` cycles/px.

    ``images`` is [N, 3, H, W]; the radius of frequency (fy, fx) is sqrt(fy^2 + fx^2) with
    Nyquist = 0.5.
    """
    x = images.double() - images.double().mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(x).abs().pow(2).sum(1)  # [N, H, W]
    h, w = images.shape[-2:]
    r = torch.sqrt(torch.fft.fftfreq(h)[:, None] ** 2 + torch.fft.fftfreq(w)[None, :] ** 2)
    total = power.flatten(1).sum(1)
    return (power[:, r > cutoff].sum(1) / torch.where(total > 0, total, torch.ones_like(total))).float()


def plot(path: Path, images: dict, finals: dict, units: list[str], seed_idx: int, dpi: int, title: str) -> None:
    """Rows = units, columns = parametrizations; each cell the FV of seed ``seed_idx`` with its objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(images)
    fig, axes = plt.subplots(len(units), len(names), figsize=(1.9 * len(names), 1.75 * len(units)), squeeze=False)
    for i, u in enumerate(units):
        for j, n in enumerate(names):
            ax = axes[i, j]
            ax.imshow(images[n][i, seed_idx].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"{finals[n][i, seed_idx]:.2f}", fontsize=8, labelpad=2)
            if i == 0:
                ax.set_title(n, fontsize=9)
            if j == 0:
                ax.set_ylabel(u, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / (1.75 * len(units))))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    from _outdir import add_out_argument, output_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=HERE / "config.json")
    add_out_argument(ap, "maco")
    ap.add_argument("--smoke", action="store_true", help="tiny model and random 'natural' images, seconds")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from fvsanity.generate import RenderSettings, render, score_images
    from fvsanity.generate.param import magnitude_spectrum
    from fvsanity.io import atomic_write_json, provenance

    cfg = json.loads(args.config.read_text())
    if args.smoke:
        cfg = {**cfg, **cfg["smoke"]}
    cfg.pop("smoke", None)
    out = output_dir("maco", args.out, args.smoke)  # a full run: figures/maco (cfg["out"])

    if args.smoke:
        from fvsanity.testing import tiny_model

        lm = tiny_model()
        g = torch.Generator().manual_seed(cfg["spectrum_seed"])
        natural = torch.rand(cfg["spectrum_images"], 3, *lm.input_size, generator=g)
    else:
        from fvsanity.data import load_images
        from fvsanity.models import load_model
        from fvsanity.testing import data_root

        root = data_root()
        if root is None:
            raise SystemExit("set FVSANITY_DATA to the shared data folder (see README)")
        lm = load_model(cfg["model"])
        spectrum_dirs = {p.get("spectrum_from") for p in cfg["params"]} - {None}
        if len(spectrum_dirs) > 1:
            raise SystemExit(f"one spectrum folder at a time, config names {sorted(spectrum_dirs)}")
        folder = root / (spectrum_dirs.pop() if spectrum_dirs else "cifar10-test")
        natural = load_images(folder, lm, limit=cfg["spectrum_images"], seed=cfg["spectrum_seed"], into_memory=True).images
    spectrum = magnitude_spectrum(natural)  # [3, H, W//2+1]
    log(f"natural spectrum from {len(natural)} images; rendering {len(cfg['units'])} units x {len(cfg['seeds'])} seeds "
        f"x {cfg['steps']} steps per parametrization")

    base = RenderSettings(steps=cfg["steps"], lr=cfg["lr"], optimizer=cfg["optimizer"],
                          checkpoints=tuple(cfg["checkpoints"]), progress=False)
    images, finals, at_steps, hf, seconds, settings = {}, {}, {}, {}, {}, {}
    for p in cfg["params"]:
        name = p["name"]
        opts = dict(p.get("options") or {})
        if p.get("spectrum_from"):
            opts["magnitude"] = spectrum
        t0 = time.perf_counter()
        res = render(lm, cfg["units"], cfg["seeds"], base, param=p["param"], param_options=opts)
        seconds[name] = round(time.perf_counter() - t0, 1)
        images[name], finals[name], settings[name] = res.images, res.final, res.settings
        at_steps[name] = {int(k): score_images(lm, v, res.units)[0] for k, v in sorted(res.checkpoints.items())}
        hf[name] = hf_share(res.images.flatten(0, 1), cfg["hf_cutoff"]).view(res.images.shape[:2])
        log(f"{name}: {seconds[name]}s, mean objective {res.final.mean():.3f}, high-frequency share {hf[name].mean():.3f}")
    hf_natural = float(hf_share(natural, cfg["hf_cutoff"]).mean())

    names = [p["name"] for p in cfg["params"]]
    ref = names[0]
    units_out = []
    for i, u in enumerate(cfg["units"]):
        units_out.append({
            "unit": u,
            "objective": {n: [round(float(v), 4) for v in finals[n][i]] for n in names},
            "objective_mean": {n: round(float(finals[n][i].mean()), 4) for n in names},
            "objective_at_steps": {n: {str(k): round(float(v[i].mean()), 4) for k, v in at_steps[n].items()} for n in names},
            "hf_share": {n: round(float(hf[n][i].mean()), 4) for n in names},
        })
    layers = sorted({u.split(":")[0] for u in cfg["units"]})
    summary = {}
    for n in names:
        s = {"objective_mean": round(float(finals[n].mean()), 4), "hf_share_mean": round(float(hf[n].mean()), 4),
             "seconds": seconds[n]}
        for layer in layers:
            idx = [i for i, u in enumerate(cfg["units"]) if u.split(":")[0] == layer]
            s[f"objective_mean_{layer}"] = round(float(finals[n][idx].mean()), 4)
            if n != ref:
                mine, theirs = float(finals[n][idx].mean()), float(finals[ref][idx].mean())
                s[f"minus_{ref}_{layer}"] = round(mine - theirs, 4)
                s[f"ratio_to_{ref}_{layer}"] = round(mine / theirs, 4) if mine > 0 and theirs > 0 else None
        if n != ref:
            s[f"units_at_least_{ref}"] = int((finals[n].mean(1) >= finals[ref].mean(1)).sum())
        summary[n] = s
    results = {
        "claim": cfg.get("claim"),
        "smoke": bool(args.smoke),
        "model": lm.name,
        "model_fingerprint": lm.fingerprint(),
        "config": cfg,
        "units": units_out,
        "summary": summary,
        "hf_share_natural_images": round(hf_natural, 4),
        "settings": settings,
        "provenance": provenance(),
    }
    atomic_write_json(out / "results.json", results)
    plot(out / "fft_vs_maco.png", images, finals, cfg["units"], cfg["seeds"].index(cfg["figure_seed"])
         if cfg["figure_seed"] in cfg["seeds"] else 0, cfg["dpi"],
         f"{lm.name}: objective after {cfg['steps']} steps\n({cfg['optimizer']} lr {cfg['lr']}, seed {cfg['figure_seed']})")
    log(f"wrote {out / 'fft_vs_maco.png'} and {out / 'results.json'}")
    head = {"smoke": bool(args.smoke), "steps": cfg["steps"], "hf_share_natural": round(hf_natural, 3)}
    for n in names:
        head[n] = {"objective": summary[n]["objective_mean"], "hf_share": summary[n]["hf_share_mean"]}
    print(json.dumps(head))
    return 0


if __name__ == "__main__":
    sys.exit(main())
