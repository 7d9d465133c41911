"""``fvsanity demo``: a complete audit on the embedded default, offline, in a few CPU minutes.

Model: CIFAR-10 ResNet-20 when its weights are found ($FVSANITY_DATA, the user cache, the copy
packaged with fvsanity, or a checksummed download when online), else the toy model fvsanity
trains itself on procedural images. Images: the CIFAR-10 test images (same lookup; 100 per class
are packaged), else procedural images. Units: four class units of the
output layer and two channels of the last block before it. Ends by printing the report's path.
"""

from __future__ import annotations

import argparse
import sys
import time


def demo_settings():
    """The demo's audit settings: the audit defaults with 256 FV steps (a few CPU minutes)."""
    from ..auditing import AuditSettings

    return AuditSettings.of(steps=256)


#: the settings a user may change in the demo; the rest are the audit's defaults
DEMO_FLAGS = ("steps", "seeds")


def register(sub) -> None:
    from ..auditing import AuditSettings
    from ..settings import add_flags, flag_specs

    p = sub.add_parser("demo", help="audit the embedded default model (offline, a few minutes)", description=__doc__)
    p.add_argument("--out", default="runs/demo", help="output folder [%(default)s]")
    demo = demo_settings()
    add_flags(p, AuditSettings, demo, exclude=[".".join(s.path) for s in flag_specs(AuditSettings, demo)
                                                if s.dest not in DEMO_FLAGS])
    p.add_argument("--class-units", type=int, default=4, help="class units of the output layer [%(default)s]")
    p.add_argument("--block-units", type=int, default=2, help="channels of the last block [%(default)s]")
    p.add_argument("--device", default=None, help="cpu, cuda, ... [cuda if available, else cpu]")
    p.add_argument("--seed", type=int, default=0, help="base random seed [%(default)s]")
    p.add_argument("--config", default=None, help="JSON/YAML file of defaults; flags override it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def demo_units(lm, n_class: int = 4, n_block: int = 2, seed: int = 0) -> list[str]:
    """``n_class`` evenly spaced class units of the output layer + ``n_block`` channels (drawn
    by ``seed``) of the last block before it."""
    import torch

    infos = lm.layers
    n_out = infos[lm.output_layer].layout.channels
    k = max(0, min(n_class, n_out))
    specs = [f"{lm.output_layer}:{round(i * (n_out - 1) / max(1, k - 1))}" for i in range(k)] if k > 1 else (
        [f"{lm.output_layer}:0"] if k == 1 else [])
    blocks = [b for b in lm.block_layers if b != lm.output_layer and b in infos and infos[b].layout.spatial]
    if blocks and n_block > 0:
        last = blocks[-1]
        g = torch.Generator().manual_seed(int(seed))
        chans = sorted(torch.randperm(infos[last].layout.channels, generator=g)[:n_block].tolist())
        specs += [f"{last}:{c}" for c in chans]
    return list(dict.fromkeys(specs))


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    from .._paths import describe_location
    from ..auditing import run_audit
    from ..cli import check_ints, resolve_device, save_config
    from ..defaults import default_images, default_model
    from ..errors import FVSanityError
    from ..io import ensure_writable_dir
    from ..settings import flag_specs, from_args

    check_ints(args, {"class_units": (0, None), "block_units": (0, None)})
    demo = demo_settings()
    cfg = from_args(type(demo), args, demo, exclude=[".".join(s.path) for s in flag_specs(type(demo), demo)
                                                      if s.dest not in DEMO_FLAGS])
    if args.class_units + args.block_units < 1:
        raise FVSanityError("--class-units and --block-units are both 0: no units to audit")
    out = ensure_writable_dir(args.out)
    device = resolve_device(args.device)
    lm = default_model(device=device)
    images = default_images(lm)
    units = demo_units(lm, args.class_units, args.block_units, args.seed)
    weights = describe_location(lm.weights_source) if lm.weights_source != "random" else "random"
    print(
        f"fvsanity demo: model {lm.name} (weights: {weights}), images: {describe_location(images)}, "
        f"units {', '.join(units)}",
        file=sys.stderr,
    )
    res = run_audit(lm, units, images, out, cfg, device=device, progress=not args.no_progress)
    save_config(args, out)
    from ..report.tables import summary_sentence

    s = res.audit["summary"]
    print(
        f"audited {s['n_units']} units of {lm.name} (weights: {weights}). {summary_sentence(s)} "
        f"Table: {res.table_md}; wall time {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    print(f"report: {res.report}")
    return 0
