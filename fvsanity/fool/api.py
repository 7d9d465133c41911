"""``fvsanity.fool(...)``: build, evaluate and save a manipulated model in one call, as
``fvsanity fool`` does (the command parses its flags into this call and prints the result).

    import fvsanity
    res = fvsanity.fool("cifar10-resnet20", "linear:3", target="unit:linear:5", out="runs/fool")
    res.summary["effective_fraction"], res.summary["check_flags_manipulation"]
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import FVSanityError

__all__ = ["FoolPlan", "fool_settings", "manipulate", "prepare_fool"]


def fool_settings(method: str = "circuit", settings=None, method_settings=None, **kw):
    """The :class:`~fvsanity.fool.pipeline.FoolSettings` of a run: ``settings`` (default: the
    defaults) with ``kw`` (its fields by name) replaced, and the method's own settings object
    (``method_settings``, e.g. from its flags) spread into the flat fields FoolSettings has and
    ``method_options`` for the others."""
    from .pipeline import FoolSettings

    base = settings or FoolSettings()
    names = {f.name for f in dataclasses.fields(FoolSettings)}
    bad = sorted(set(kw) - names)
    if bad:
        raise FVSanityError(f"unknown fool setting {bad[0]!r}; valid: {', '.join(sorted(names))}")
    ms = {}
    if method_settings is not None:
        # only what the method's flags set: a field without a flag (e.g. slingshot's fv_size, read
        # from FoolSettings) keeps its default there and must not override the run's own value
        ms = {f.name: getattr(method_settings, f.name) for f in dataclasses.fields(method_settings)
              if f.metadata.get("flag", True)}
    return dataclasses.replace(base, method=method, **kw, **{k: v for k, v in ms.items() if k in names},
                               method_options={**base.method_options,
                                               **{k: v for k, v in ms.items() if k not in names}})


@dataclasses.dataclass(frozen=True)
class FoolPlan:
    """Everything a fooling run needs, checked and loaded (:func:`prepare_fool`): the model, its
    routes, the building images, the held-out images, the settings, the output and cache folders."""

    lm: object
    routes: list
    train_images: object
    eval_natural: object
    settings: object
    out: Path
    work: object = None

    def run(self):
        """Build, evaluate and save (:func:`fvsanity.fool.pipeline.run_fool`)."""
        import torch

        from .pipeline import run_fool

        torch.manual_seed(self.settings.seed)  # nothing below draws from it; set for any third-party code
        return run_fool(self.lm, self.routes, self.train_images, self.eval_natural, self.settings, self.out,
                        work_dir=self.work)


def prepare_fool(model, units="all", target=None, *, method: str = "circuit", shift: int | None = None,
                 images: dict | None = None, out="runs/fool", work=None, settings=None, **kw) -> FoolPlan:
    """Check every input and load the images of a fooling run (nothing is built yet); arguments
    as :func:`manipulate`, with ``images`` = {"train", "eval", "split", "limit"}."""
    from ..data import load_images
    from ..facade import as_model
    from ..io import ensure_writable_dir
    from .manipulation import get_manipulation
    from .pipeline import split_indices
    from .routes import make_routes

    im = {"train": None, "eval": None, "split": 0.5, "limit": None, **(images or {})}
    if not 0 < im["split"] < 1:
        raise FVSanityError(f"--split must be in (0, 1), got {im['split']}")
    get_manipulation(method)  # an unknown method, refused before anything loads
    cfg = fool_settings(method, settings, **kw)
    out = ensure_writable_dir(out)
    lm = as_model(model)
    out_c = lm.layer_info(lm.output_layer).layout.channels
    if target is not None and shift is not None:
        raise FVSanityError("give either --target or --shift, not both")
    if target is None and shift is None:
        shift = max(1, out_c // 10)  # 100 of ImageNet's 1000 classes, 1 of CIFAR-10's 10
    if shift is not None and shift % out_c == 0 and units in ("all", f"{lm.output_layer}:all"):
        raise FVSanityError(f"--shift {shift} is a multiple of the {out_c} class units (identity); valid: 1..{out_c - 1}")
    routes = make_routes(lm, units, target, shift=shift, picture_size=lm.input_size)  # before the images
    train_dir = im["train"]
    if train_dir is None:
        from ..defaults import default_images

        train_dir = default_images(lm)
    train = load_images(train_dir, lm, limit=im["limit"], seed=cfg.seed, into_memory=True)
    if im["eval"] is None or Path(im["eval"]).resolve() == Path(train_dir).resolve():
        tr, ev = split_indices(len(train), im["split"], cfg.seed)
        eval_nat, train_imgs = train.subset(ev), train.images[tr]
    else:
        eval_nat = load_images(im["eval"], lm, limit=im["limit"], seed=cfg.seed, into_memory=True)
        train_imgs = train.images
    return FoolPlan(lm, routes, train_imgs, eval_nat, cfg, out, work)


def manipulate(model, units="all", target=None, *, method: str = "circuit", shift: int | None = None,
               images: dict | None = None, out="runs/fool", work=None, settings=None, **kw):
    """A model whose FVs of ``units`` show ``target`` while natural-image predictions stay the same.

    Args:
        model: a LoadedModel (on the device to run on) or a model name / spec
            (:func:`~fvsanity.models.load_model`).
        units: what to manipulate: ``"LAYER:C[,LAYER:C]"``, ``"LAYER:a-b"``, ``"LAYER:all"`` or
            ``"all"`` (every class unit of the output layer).
        target: ``"unit:LAYER:CHANNEL"`` or a picture file; None: a permutation, unit c shows
            channel (c + ``shift``) mod C (default shift C // 10).
        method: a registered manipulation (:func:`~fvsanity.fool.list_manipulations`).
        images: {"train": natural images to build from (default: the model's default images),
            "eval": held-out images (default: a seeded "split", 0.5, of "train"), "limit": at
            most this many images per folder}.
        out, work: where ``model/``, ``fool.json``, ``fool.png`` go, and the cache (``out/work``).
        settings, kw: :class:`~fvsanity.fool.pipeline.FoolSettings` and its fields by name
            (``eval_units``, ``eval_seeds``, ``eval_steps``, ``check``, ``seed``, method knobs ...).

    Returns:
        :class:`~fvsanity.fool.pipeline.FoolResult`: ``summary`` (identical top-1 fraction,
        effective_fraction, took_effect, check_flags_manipulation, ...) and ``details``.
    """
    return prepare_fool(model, units, target, method=method, shift=shift, images=images, out=out, work=work,
                        settings=settings, **kw).run()
