"""Bring your own model: :func:`wrap` an ``nn.Module``, or name a factory as a model spec.

``wrap(module, input_size=..., mean=..., std=...)`` returns a
:class:`~fvsanity.models.LoadedModel` like the registered models', inferring what one probe
forward can tell (each inferred fact can be given by keyword instead):

- layer layouts (conv ``[B,C,H,W]``, tokens, vector) of every layer, as for every model
  (:func:`fvsanity.layouts.infer_layout`); ``layouts={"layer": "vector" | Layout}`` overrides one;
- ``output_layer``: the last module, in forward order, whose output has the model output's
  shape ``[N, n_classes]`` (pass-through modules such as ``Identity``, ``Dropout``, ``Flatten``,
  ``Softmax`` only if nothing else does);
- ``blocks`` (the default comparison path): the top-level children in forward order, a
  container child (``Sequential``, ``ModuleList``, ``ModuleDict``) expanded one level,
  ``Identity``/``Dropout``/``Flatten`` left out, cut after the output layer, which ends it.

Example::

    import torch.nn as nn
    from fvsanity.models import wrap
    from fvsanity.generate import render

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 10))
    lm = wrap(net, input_size=32, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26),
              class_names=[f"c{i}" for i in range(10)], name="my-cnn")
    lm.output_layer, lm.block_layers    # ('4', ['0', '1', '2', '4'])
    fv = render(lm, ["1:3", "4:7"], seeds=2, steps=64)

A **factory spec** names a callable in a module or file: ``--model my_pkg.models:build`` or
``--model path/to/file.py:build`` (``load_model("path/to/file.py:build")``). The factory is called
with no arguments, or with ``pretrained=`` (False under ``--random-weights``) when it takes a
parameter of that name, under the seed of ``load_model``, and returns one of:

- a :class:`LoadedModel` (e.g. from :func:`wrap`): used as is;
- ``(module, options)``: ``wrap(module, name=SPEC, **options)``; ``options`` holds
  :func:`wrap`'s keywords (``input_size``, ``mean``, ``std``, ``class_names``, ``blocks``, ...);
- an ``nn.Module``: ``wrap(module, name=SPEC)`` with wrap's defaults (224 px, ImageNet
  mean/std, as torchvision's models).

``--weights FILE`` is then loaded into the model as for every other model (strictly; a state dict
via ``torch.load(weights_only=True)`` or ``.safetensors``; ``--allow-partial-weights`` opts into a
recorded partial load). A file's folder is on ``sys.path`` while it is imported and its factory
runs, so it can import the modules beside it.

This module does not import :mod:`fvsanity.models` (which imports it): the package hands it
``LoadedModel`` and ``prepare_model`` once, through :func:`bind`.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import FVSanityError, SettingError, UnitError, show_value
from ..hooks import hooked
from ..layouts import KINDS, LayerInfo, Layout
from ..names import resolve_layer
from .preprocess import _INTERPOLATIONS, Preprocess

__all__ = ["wrap", "is_factory_spec", "load_factory", "WRAP_OPTIONS", "bind"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Modules that pass a tensor through (or only reshape / normalise it): never a block, the output
#: layer only when no other module has the output's shape.
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Flatten, nn.Softmax, nn.LogSoftmax)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

_BOUND: dict[str, Any] = {}


def bind(loaded_model_cls: type, prepare: Callable[[nn.Module], nn.Module]) -> None:
    """Called once by :mod:`fvsanity.models`: the ``LoadedModel`` class and ``prepare_model``.

    (Handed over instead of imported, because ``fvsanity.models`` imports this module to offer
    :func:`wrap` and factory specs.)
    """
    _BOUND["prepare"] = prepare
    _BOUND["cls"] = loaded_model_cls

    @dataclass
    class WrappedModel(loaded_model_cls):  # type: ignore[misc, valid-type]
        """A LoadedModel whose layer layouts were given in part (``wrap(..., layouts=...)``)."""

        layout_overrides: dict[str, Layout] = field(default_factory=dict)

        @property
        def layers(self) -> dict[str, LayerInfo]:
            base = super().layers
            return {n: (LayerInfo(i.name, i.module_type, i.shape, self.layout_overrides[n])
                        if n in self.layout_overrides else i) for n, i in base.items()}

        def fingerprint(self) -> str:
            """The model's fingerprint, with the given layouts (they change how units are read)."""
            h = hashlib.sha256(super().fingerprint().encode())
            for n in sorted(self.layout_overrides):
                h.update(f"\0layout\0{n}\0{sorted(self.layout_overrides[n].to_json().items())}".encode())
            return h.hexdigest()

    _BOUND["wrapped_cls"] = WrappedModel


def _bound(key: str):
    if key not in _BOUND:  # importing this module imports fvsanity.models first, which binds
        raise FVSanityError("fvsanity.models.custom is not bound; import it as fvsanity.models.wrap")
    return _BOUND[key]


# ------------------------------------------------------------------------------ validation
def _size(value) -> tuple[int, int]:
    """``input_size`` as (H, W): an int S -> (S, S), or a pair of ints, each in 1..8192."""
    pair = (value, value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
    ok = (isinstance(pair, (tuple, list)) and len(pair) == 2
          and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and 1 <= v <= 8192 for v in pair))
    if not ok:
        raise SettingError("input_size", f"must be an int S or (H, W) of ints in 1..8192 px, got {show_value(value)}")
    return int(pair[0]), int(pair[1])


def _triple(name: str, value, positive: bool = False) -> tuple[float, float, float]:
    """``mean`` / ``std``: 3 finite numbers (RGB order, the [0, 1] scale), std > 0."""
    if isinstance(value, torch.Tensor):
        value = value.detach().flatten().tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise SettingError(name, f"must be 3 numbers (one per RGB channel, images in [0, 1]), got {show_value(value)}")
    if len(value) != 3:
        raise SettingError(name, f"must have 3 values (one per RGB channel), got {len(value)}: {show_value(value)}")
    for v in value:
        if (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)
                or (positive and not v > 0)):
            what = "3 finite numbers > 0" if positive else "3 finite numbers"
            raise SettingError(name, f"must be {what}, got {show_value(v)} in {show_value(tuple(value))}")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def _layer_name(module: nn.Module, what: str, value) -> str:
    if not isinstance(value, str) or not value:
        raise SettingError(what, f"must be a layer name (a named_modules() name), got {show_value(value)}")
    return resolve_layer(module, value)


# ------------------------------------------------------------------------------ probe
@dataclass(frozen=True)
class _Probe:
    """One forward of a grey image: each module's first firing index and output shape, the output."""

    order: dict[str, int]  # name -> index of its first firing with a tensor output
    last: dict[str, int]  # name -> index of its last firing with a tensor output
    shapes: dict[str, tuple[int, ...]]
    output: torch.Tensor


def _probe(module: nn.Module, pre: Preprocess) -> _Probe:
    order: dict[str, int] = {}
    last: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    count = [0]

    def make(name):
        def hook(_m, _i, out):
            if isinstance(out, (tuple, list)) and out:
                out = out[0]
            if isinstance(out, torch.Tensor):
                order.setdefault(name, count[0])
                last[name] = count[0]
                shapes[name] = tuple(out.shape)
                count[0] += 1

        return hook

    p0 = next(module.parameters(), None)
    dev = p0.device if p0 is not None else torch.device("cpu")
    dtype = p0.dtype if p0 is not None and p0.is_floating_point() else torch.float32
    x = pre(torch.full((1, 3, *pre.size), 0.5, device=dev, dtype=dtype))
    mods = [(n, m) for n, m in module.named_modules() if n]
    try:
        with hooked(module, [(m, make(n)) for n, m in mods]), torch.no_grad():
            out = module(x)
    except Exception as e:  # noqa: BLE001 - the user's model: one line naming the input it got
        raise FVSanityError(
            f"wrap: {type(module).__name__} failed on a [1, 3, {pre.size[0]}, {pre.size[1]}] input "
            f"({type(e).__name__}: {_one_line(e)}); check input_size"
        ) from e
    if not isinstance(out, torch.Tensor):
        raise FVSanityError(
            f"wrap: {type(module).__name__}(x) returned a {type(out).__name__}; fvsanity needs a tensor of "
            "logits [N, n_classes] (wrap the module in one whose forward returns them)"
        )
    return _Probe(order, last, shapes, out)


def _one_line(text, limit: int = 160) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _infer_output(module: nn.Module, probe: _Probe) -> str:
    """The last module (forward order) whose output has the model output's shape [1, K]."""
    shape = tuple(probe.output.shape)
    if len(shape) != 2:
        raise FVSanityError(
            f"wrap: the model's output has shape {list(shape)}, not [N, n_classes]; pass output_layer=NAME "
            "(the module whose output channels are the class units)"
        )
    mods = dict(module.named_modules())
    cands = sorted((n for n, s in probe.shapes.items() if s == shape), key=lambda n: probe.last[n])
    real = [n for n in cands if not isinstance(mods[n], _PASS_THROUGH)]
    if cands:
        return (real or cands)[-1]
    vectors = [n for n, s in probe.shapes.items() if len(s) == 2]
    raise FVSanityError(
        f"wrap: no module outputs [N, {shape[1]}] like the model's output (it is computed outside any module); "
        f"pass output_layer=NAME (layers with a vector output: {', '.join(vectors[-5:]) or 'none'})"
    )


def _infer_blocks(module: nn.Module, probe: _Probe, output_layer: str) -> list[str]:
    """Top-level children (a container expanded one level) in forward order, up to the output layer."""
    names = []
    for name, child in module.named_children():
        kids = list(child.named_children()) if isinstance(child, _CONTAINERS) else []
        names += [f"{name}.{k}" for k, _ in kids] if kids else [name]
    mods = dict(module.named_modules())
    stop = probe.order[output_layer]
    fired = [n for n in names if n in probe.order and not isinstance(mods[n], _PASS_THROUGH)
             and probe.order[n] < stop and len(probe.shapes[n]) >= 2]
    fired.sort(key=lambda n: probe.order[n])
    return [n for n in fired if n != output_layer] + [output_layer]


def _as_layout(name: str, value, shape: tuple[int, ...]) -> Layout:
    """A layout override: a :class:`Layout`, or a kind (``"conv"``, ``"vector"``, ``"tokens"``:
    no prefix tokens, square grid) read from the layer's output ``shape`` (no batch)."""
    if isinstance(value, Layout):
        lay = value
    elif value in KINDS:
        if value == "vector":
            lay = Layout("vector", channels=shape[0]) if len(shape) == 1 else None
        elif value == "conv":
            lay = Layout("conv", channels=shape[0], grid=tuple(shape[1:3]) if len(shape) == 3 else None)
        else:
            side = math.isqrt(shape[0]) if len(shape) == 2 else 0
            lay = Layout("tokens", channels=shape[1], grid=(side, side)) if side * side == shape[0] > 0 else None
        if lay is None:
            raise SettingError(f"layouts[{name!r}]", f"{value!r} does not fit its output shape {list(shape)}")
    else:
        raise SettingError(f"layouts[{name!r}]", f"must be a Layout or one of {', '.join(KINDS)}, got {show_value(value)}")
    ch = {"conv": shape[0], "vector": shape[0], "tokens": shape[-1]}[lay.kind]
    if lay.channels != ch:
        raise SettingError(f"layouts[{name!r}]", f"has {lay.channels} channels but the output {list(shape)} has {ch}")
    return lay


# ------------------------------------------------------------------------------ wrap
def wrap(
    module: nn.Module,
    input_size: int | tuple[int, int] = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    class_names: Sequence[str] | None = None,
    name: str | None = None,
    *,
    blocks: Sequence[str] | None = None,
    output_layer: str | None = None,
    layouts: dict[str, Layout | str] | None = None,
    resize: int | None = None,
    interpolation: str = "bilinear",
    weights_source: str | None = None,
):
    """Your own ``nn.Module`` as a :class:`~fvsanity.models.LoadedModel`.

    The module is prepared in place as every fvsanity model is (eval mode, in-place activations
    off, parameters without gradients) and probed by one forward of a grey
    ``[1, 3, *input_size]`` image. The wrapped model computes ``module((rgb - mean) / std)`` for
    RGB images in [0, 1].

    Args:
        module: the classifier; ``module(x)`` for ``x`` [N, 3, H, W] returns logits [N, K].
        input_size: S or (H, W) in px: the images it was trained on (natural images are
            resized to it, FVs rendered at it).
        mean, std: 3 values each, RGB, on the [0, 1] scale: the model sees ``(rgb - mean) / std``.
            Default: ImageNet's (torchvision's).
        class_names: K names, one per output class, or None (none).
        name: the model's name in outputs (default ``"wrapped:<class name>"``).
        blocks: the comparison path (layer names in forward order); default: inferred (module doc).
        output_layer: the module whose output channels are the K class units; default: inferred.
        layouts: ``{layer: Layout | "conv" | "vector" | "tokens"}``: layouts that the output
            shape cannot tell (a token model that is not a timm ViT); they enter the fingerprint.
        resize: natural images are resized so their short side is ``resize`` px, then center
            cropped to ``input_size`` (None: resized straight to ``input_size``).
        interpolation: how natural images are resized: bilinear, bicubic or nearest.
        weights_source: what ``lm.provenance()`` records for the weights
            (default ``"module given to wrap (<class name>)"``).

    Returns:
        A LoadedModel; its ``fingerprint()`` hashes every weight, so caches never mix models.

    Raises:
        FVSanityError / SettingError / UnitError: one line naming the bad value: ``module`` not an
            ``nn.Module``, a bad ``input_size``, ``mean``/``std`` not 3 numbers (std > 0), a forward
            that fails or returns no tensor, an unknown layer in ``blocks``/``output_layer``/
            ``layouts`` (with the closest names), ``class_names`` of another length than K.
    """
    if not isinstance(module, nn.Module):
        raise FVSanityError(f"wrap: module must be a torch.nn.Module, got {type(module).__name__} {show_value(module)}")
    size = _size(input_size)
    mean_t, std_t = _triple("mean", mean), _triple("std", std, positive=True)
    if interpolation not in _INTERPOLATIONS:
        raise SettingError("interpolation", f"must be one of {', '.join(_INTERPOLATIONS)}, got {show_value(interpolation)}")
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, numbers.Integral)
                               or resize < max(size)):
        raise SettingError("resize", f"must be None or an int >= the input side {max(size)} px, got {show_value(resize)}")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise SettingError("name", f"must be a non-empty string, got {show_value(name)}")
    pre = Preprocess(size=size, mean=mean_t, std=std_t, resize=None if resize is None else int(resize),
                     interpolation=interpolation)
    net = _bound("prepare")(module)
    probe = _probe(net, pre)

    out_name = _infer_output(net, probe) if output_layer is None else _layer_name(net, "output_layer", output_layer)
    if out_name not in probe.shapes:
        raise UnitError(f"output_layer {out_name!r} produced no tensor output in a forward pass")
    out_shape = probe.shapes[out_name][1:]
    overrides = {}
    for lname, lay in (layouts or {}).items():
        full = _layer_name(net, "layouts", lname)
        if full not in probe.shapes:
            raise UnitError(f"layouts: layer {full!r} produced no tensor output in a forward pass")
        overrides[full] = _as_layout(full, lay, probe.shapes[full][1:])
    if out_name in overrides:
        lay = overrides[out_name]
        n_classes = lay.channels
    else:
        n_classes = out_shape[0] if out_shape else 0

    if blocks is None:
        block_names = _infer_blocks(net, probe, out_name)
    else:
        if isinstance(blocks, str) or not isinstance(blocks, Sequence) or not blocks:
            raise SettingError("blocks", f"must be a non-empty list of layer names, got {show_value(blocks)}")
        block_names = []
        for b in blocks:
            full = _layer_name(net, "blocks", b)
            if full not in probe.shapes:
                raise UnitError(f"blocks: layer {full!r} produced no tensor output in a forward pass")
            block_names.append(full)

    names: list[str] = []
    if class_names is not None:
        if isinstance(class_names, str) or not isinstance(class_names, Sequence):
            raise SettingError("class_names", f"must be a list of {n_classes} strings, got {show_value(class_names)}")
        names = [str(c) for c in class_names]
        if len(names) != n_classes:
            raise SettingError(
                "class_names", f"has {len(names)} names but output layer {out_name!r} {list(probe.shapes[out_name])} "
                f"has {n_classes} classes"
            )
    kw = dict(
        name=name or f"wrapped:{type(module).__name__}",
        model=net,
        preprocess=pre,
        block_layers=block_names,
        output_layer=out_name,
        class_names=names,
        weights_source=weights_source or f"module given to wrap ({type(module).__name__})",
    )
    if overrides:
        return _bound("wrapped_cls")(**kw, layout_overrides=overrides)
    return _bound("cls")(**kw)


#: The keywords of :func:`wrap` that a factory's ``(module, options)`` may set.
WRAP_OPTIONS = tuple(p for p in inspect.signature(wrap).parameters if p != "module")


# ------------------------------------------------------------------------------ factory specs
def is_factory_spec(spec: str) -> bool:
    """Whether ``spec`` names a factory: ``path/to/file.py:NAME`` or ``dotted.module:NAME``.

    ``timm:NAME`` is timm's, not a factory.
    """
    left, sep, attr = str(spec).rpartition(":")
    if not sep or not left or not attr.isidentifier() or left == "timm":
        return False
    return left.endswith(".py") or all(part.isidentifier() for part in left.split("."))


def _where(e: BaseException, path: Path | None) -> str:
    """`` (at FILE:LINE)`` of the innermost frame of ``e`` in ``path`` (or in any file)."""
    frames = traceback.extract_tb(e.__traceback__)
    if path is not None:
        mine = [f for f in frames if Path(f.filename).resolve() == path]
        frames = mine or frames
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


@contextlib.contextmanager
def _on_path(folder: Path | None) -> Iterator[None]:
    """``folder`` first on ``sys.path`` for the block (removed again after)."""
    if folder is None:
        yield
        return
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def _import_source(spec: str, left: str) -> tuple[Any, Path | None]:
    """The module named by the left part of a factory spec, and its file when it is a file."""
    if left.endswith(".py"):
        path = Path(left).expanduser().resolve()
        if not path.is_file():
            raise FVSanityError(f"model spec {spec!r}: file {left!r} not found (as {path})")
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
        mod_name = f"_fvsanity_factory_{path.stem if path.stem.isidentifier() else 'file'}_{digest}"
        ispec = importlib.util.spec_from_file_location(mod_name, path)
        if ispec is None or ispec.loader is None:
            raise FVSanityError(f"model spec {spec!r}: cannot import {left!r} as Python source")
        mod = importlib.util.module_from_spec(ispec)
        sys.modules[mod_name] = mod  # dataclasses and pickling look classes up there
        try:
            with _on_path(path.parent):
                ispec.loader.exec_module(mod)
        except Exception as e:  # noqa: BLE001 - the user's file: one line, the traceback is chained
            sys.modules.pop(mod_name, None)
            raise FVSanityError(
                f"model spec {spec!r}: importing {left!r} failed: {type(e).__name__}: {_one_line(e)}{_where(e, path)}"
            ) from e
        return mod, path
    try:
        mod = importlib.import_module(left)
    except ModuleNotFoundError as e:
        if e.name and left.split(".")[0] == e.name.split(".")[0] and left.startswith(e.name):
            raise FVSanityError(
                f"model spec {spec!r}: no module named {e.name!r} (install it or put its folder on PYTHONPATH, "
                "or give path/to/file.py:NAME)"
            ) from e
        raise FVSanityError(f"model spec {spec!r}: importing {left!r} failed: ModuleNotFoundError: {_one_line(e)}") from e
    except Exception as e:  # noqa: BLE001
        raise FVSanityError(
            f"model spec {spec!r}: importing {left!r} failed: {type(e).__name__}: {_one_line(e)}{_where(e, None)}"
        ) from e
    file = getattr(mod, "__file__", None)
    return mod, (Path(file).resolve() if file else None)


def _factory(spec: str) -> tuple[Callable, Path | None]:
    left, _, attr = spec.rpartition(":")
    mod, path = _import_source(spec, left)
    if not hasattr(mod, attr):
        public = sorted(n for n, v in vars(mod).items() if callable(v) and not n.startswith("_")
                        and getattr(v, "__module__", None) == mod.__name__)
        close = difflib.get_close_matches(attr, public, n=3, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise FVSanityError(
            f"model spec {spec!r}: {left!r} has no {attr!r}{hint}; callables defined there: {', '.join(public) or 'none'}"
        )
    fn = getattr(mod, attr)
    if not callable(fn):
        raise FVSanityError(
            f"model spec {spec!r}: {attr!r} is a {type(fn).__name__}, not a factory (a callable returning an "
            "nn.Module, (module, options) or a LoadedModel)"
        )
    return fn, path


def _takes_pretrained(fn: Callable) -> bool:
    try:
        return "pretrained" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


def load_factory(spec: str, *, pretrained: bool = True):
    """The :class:`~fvsanity.models.LoadedModel` a factory spec builds (the module doc's convention).

    Called by :func:`fvsanity.models.load_model`, which seeds it and then loads ``--weights``.

    Args:
        spec: ``path/to/file.py:NAME`` or ``dotted.module:NAME``.
        pretrained: passed to the factory when it takes a ``pretrained`` parameter (False: the
            weights are recorded as ``"random"``).

    Raises:
        FVSanityError: one line: the file or module cannot be found or imported, it has no such
            attribute (with the closest names), the attribute is not callable, the factory
            raised, or it returned something else than an nn.Module, (module, options) or a
            LoadedModel, or options that are not wrap's keywords.
    """
    fn, path = _factory(spec)
    takes = _takes_pretrained(fn)
    try:
        with _on_path(path.parent if path is not None and spec.rpartition(":")[0].endswith(".py") else None):
            made = fn(pretrained=pretrained) if takes else fn()
    except FVSanityError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's factory: one line, the traceback is chained
        raise FVSanityError(
            f"model spec {spec!r}: the factory raised {type(e).__name__}: {_one_line(e)}{_where(e, path)}"
        ) from e
    if not pretrained and takes:
        source = "random"
    elif not pretrained:
        source = f"{spec} (as the factory built them; it takes no pretrained argument)"
    else:
        source = f"{spec} (as the factory built them)"
    cls = _bound("cls")
    if isinstance(made, cls):
        if made.weights_source.startswith("module given to wrap"):
            made.weights_source = source
        return made
    if isinstance(made, nn.Module):
        return wrap(made, name=spec, weights_source=source)
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module) and isinstance(made[1], dict):
        module, options = made
        bad = [k for k in options if k not in WRAP_OPTIONS]
        if bad:
            close = difflib.get_close_matches(str(bad[0]), WRAP_OPTIONS, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise FVSanityError(
                f"model spec {spec!r}: the factory's options hold {bad[0]!r}{hint}; valid: {', '.join(WRAP_OPTIONS)}"
            )
        options = {"name": spec, "weights_source": source, **options}
        return wrap(module, **options)
    what = type(made).__name__
    if isinstance(made, tuple):
        what = f"tuple of {', '.join(type(v).__name__ for v in made)}"
    raise FVSanityError(
        f"model spec {spec!r}: the factory returned a {what}; expected an nn.Module, (module, options dict) "
        "or a LoadedModel (fvsanity.models.wrap)"
    )
