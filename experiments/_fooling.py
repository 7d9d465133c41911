"""What the fooling experiments (fooling_circuit, silent_units) share: their model and image
split, and a config variant turned into the library's :func:`fvsanity.fool.routes.heldout_routes`
call. Config dicts are read here, never in the library."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    return Path(os.environ.get("FVSANITY_DATA", ROOT.parent / "shared" / "data"))


def setup(run: dict, split_cfg: dict, smoke: bool):
    """(model, all NaturalImages, three-way Split).

    The configs' settings were chosen by looking at results on the second part of
    ``split_indices(n, 0.5, 0)`` (the old "held-out" half): that part is the tuning split. The
    old first part was only used to build (train / calibrate), never to choose a setting, so it
    is divided (seeded) into the new building and evaluation splits.
    """
    import torch

    from fvsanity import load_model
    from fvsanity.data import from_tensor, load_images
    from fvsanity.fool import split_indices
    from fvsanity.splits import split_with_tuning
    from fvsanity.testing import tiny_model

    if smoke:
        lm = tiny_model()
        g = torch.Generator().manual_seed(0)
        nat = from_tensor(torch.rand(40, 3, 16, 16, generator=g), torch.arange(40) % 5)
    else:
        lm = load_model(run["model"])
        nat = load_images(data_root() / run["images"], lm, into_memory=True)
    t = split_cfg["tuned_on"]
    _old_build, old_eval = split_indices(len(nat), t["fraction"], t["seed"])
    split = split_with_tuning(len(nat), old_eval, split_cfg["evaluation_fraction"], split_cfg["seed"])
    return lm, nat, split


def variant_routes(lm, var: dict, units_cfg: dict, n_eval: int, here: Path):
    """(routes, evaluation units, UnitSplit) of one config variant; a picture ``target`` is a
    path relative to the experiment's folder ``here``."""
    from fvsanity.fool.routes import heldout_routes

    target = var.get("target")
    if target is not None and not target.startswith("unit:"):
        target = str(Path(here) / target)
    return heldout_routes(lm, var["units"], target, shift=var.get("shift"), n_eval=n_eval,
                          tuning=units_cfg.get("tuning", []), tuning_sources=units_cfg.get("tuning_sources", []),
                          seed=units_cfg["seed"])
