"""The short way in: one call per job, in the spirit of lucent's ``render_vis`` and timm's
``create_model``.

    import fvsanity
    lm = fvsanity.load_model("cifar10-resnet20")
    fvs = fvsanity.visualize(lm, ["layer3.2:5", "linear:3"], steps=256)
    report = fvsanity.check(lm, fvs=fvs, images="path/to/images")
    print(report.trusted(), report.flagged())

Every keyword setting is a field of the job's settings dataclass, by its plain name
(:class:`~fvsanity.checking.FVSettings`, :class:`~fvsanity.checking.CheckSettings`,
:class:`~fvsanity.auditing.AuditSettings`); the defaults are the command line's.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["as_model", "audit", "visualize"]


def as_model(model, device=None):
    """A :class:`~fvsanity.models.LoadedModel` from a LoadedModel, a model name or spec
    (:func:`~fvsanity.models.load_model`), or your own ``nn.Module`` (:func:`~fvsanity.models.wrap`
    with its defaults: 224 px, ImageNet mean and std; call ``wrap`` yourself for others)."""
    import torch

    from .models import LoadedModel, load_model, wrap

    if isinstance(model, LoadedModel):
        return model if device is None else model.to(torch.device(device))
    if isinstance(model, torch.nn.Module):
        lm = wrap(model)
        return lm if device is None else lm.to(torch.device(device))
    if isinstance(model, (str, Path)):
        return load_model(str(model), device=device)
    from .errors import FVSanityError

    raise FVSanityError(f"model must be a LoadedModel, a model name or an nn.Module, got {type(model).__name__}")


def visualize(model, units, *, device=None, progress: bool = True, objective=None, settings=None, **kw):
    """Feature visualizations of ``units``: ``seeds`` FVs per unit (default: as many as a check
    of these units needs to reach either claim, :func:`~fvsanity.checking.seeds_needed`),
    batched, reproducible by ``seed``.

    Args:
        model: a LoadedModel, a model name, or an ``nn.Module`` (:func:`as_model`).
        units: a spec (``"layer3.2:5"``, ``"linear:3,linear:4"``) or a list of specs / Units.
        settings: :class:`~fvsanity.checking.FVSettings`; ``kw`` replace its fields by plain
            name (``seeds``, ``seed``, ``steps``, ``size``, ``lr``, ``param``, ``transforms``,
            ``diversity``, ``optimizer``, ...).
        objective: how each unit becomes an objective (default: the unit's own).

    Returns:
        :class:`~fvsanity.generate.FVResult` (``.images`` [U, S, 3, H, W], ``.save(folder)``).
    """
    import dataclasses

    from .checking import FVSettings
    from .generate import render
    from .units import parse_units

    fvs = FVSettings.of(settings, **kw) if kw else (settings or FVSettings())
    lm = as_model(model, device)
    units = parse_units(units, lm)
    fvs = fvs.resolved(lm, units)  # automatic seeds: as many as a check of these units needs
    return render(lm, units, fvs.fv_seeds, dataclasses.replace(fvs.render, progress=progress), device=device,
                  objective=objective)


def audit(model, units, images=None, out="runs/audit", *, device=None, progress: bool = True, settings=None,
          image_options: dict | None = None, **kw):
    """Audit ``units``: FVs, natural exemplars, the path check (and circuits) per unit, written
    to ``out`` one finished unit at a time (``report.html``, ``audit.json``, tables; a rerun
    resumes). ``settings``: :class:`~fvsanity.auditing.AuditSettings`; ``kw`` replace its fields
    by plain name. ``images``: a folder, NaturalImages, or None (the model's default images).
    Returns :class:`~fvsanity.auditing.AuditResult`."""
    from .auditing import AuditSettings, run_audit

    cfg = AuditSettings.of(settings, **kw) if kw else (settings or AuditSettings())
    lm = as_model(model, device)
    if images is None:
        from .defaults import default_images

        images = default_images(lm)
    return run_audit(lm, units, images, out, cfg, device=device, progress=progress, image_options=image_options)
