"""Path similarity: do a unit's FVs travel through the network like its natural images?

The sanity check of Geirhos et al. (2023, Fig. 5), layer by layer along the unit's path
(default ``lm.path_to(unit.layer)``). Every image is represented at layer l by its spatially
mean-pooled activation vector [C_l]; ``sim`` is a vector metric (default Spearman, the paper's).
For a unit with FVs F (its seeds), natural references R (the images of its class if it is a
class unit and labels exist, plus its top-k exemplars) and other natural images O (other
classes, or random other images):

* ``fv_vs_natural``      mean of sim(f, r) over f in F, r in R
* ``natural_vs_natural`` mean of sim(r, r') over r != r' in R (leave-one-out: never an image
  with itself; the upper reference)
* ``natural_vs_other``   mean of sim(o, r) over o in O, r in R (the lower reference)
* ``normalized``         (fv - other) / (natural - other): 0 = like unrelated images, 1 = like
  the unit's own natural images; NaN (null in JSON, "n/a" in tables) where it has no scale: the
  references do not separate from unrelated images at that layer by a meaningful, precisely
  known gap (:func:`fvsanity.compare.verdict.separation`), or the unit has too few references
  of its own (``status``).

All three are means of single-image-vs-single-image similarities, so they share one scale.
Uncertainty: a bootstrap over images (F, R and O resampled with replacement; self-pairs of R
excluded by original index) gives percentile intervals. Test: a one-sided permutation test
of "FVs are no more similar to R than other images are": items F and O, score of an item = its
mean similarity to R, statistic = mean score of F - mean score of O, labels permuted (exactly,
over all relabellings, when there are at most ``max(n_perm, stats.EXACT_LIMIT = 200 000)``,
e.g. up to 2 FVs among ~600 items; else Monte Carlo, p = (1 + k) / (1 + n_perm)). The permutation p
(Holm across the layers of a unit) is descriptive only: it is not the verdict.

Verdict (:mod:`fvsanity.compare.verdict`): per layer one of three outcomes,
"natural-like", "diverges" or "inconclusive" (with its reason: the smallest attainable p and the
FV seeds needed, references that do not separate, an estimate between the margins, or a test
that is not significant), each claim with its own sign-flip test over the FV seeds (the unit of
replication) against a margin of the normalized similarity; the unit's verdict summarizes its
layers (the outcome at its own layer, the first layer from which its FVs are natural-like).
Across units, per layer, the same test with units as replicates
(:func:`fvsanity.compare.verdict.across_units_verdict`, via :func:`across_units`).

The paired design across units (DESIGN.md 4.2): with >= 4 units, per layer, rows = units,
A = each unit's mean FV activation, B = the mean activation of the same unit's natural
references (rows in the order of the unit names); a metric of the ``paired`` design (debiased
CKA, RSA; not MMD, a set metric that row permutations leave unchanged) compares A and B, a
permutation of B's rows gives the null (chance pairing; every pairing when U! <= n_perm), and
split halves of the natural references (A' = one half,
B' = the other) give the natural-vs-natural reference.

Reference selection (:func:`select_references`, the one function ``fvsanity check`` and
``fvsanity audit`` both use): R = the images of the unit's class (class units of the model's
output layer, labelled images, ``use_class_images``) plus its top-k exemplars; O = up to
``n_other`` images outside R (and, for a class unit, outside its class), drawn at random.
Seeds: every random choice of a unit (its O, bootstrap, permutations, split halves) is seeded by
:func:`unit_seed` from the base seed and the unit's NAME, never its position in the unit list,
so a unit gets the same numbers alone, in any order, and in ``check`` or ``audit``.

Too few references (the rule; :data:`MIN_REFERENCES`, :data:`MIN_OTHER`): a unit's curves
are reported, its normalized similarity is not (NaN / null: it has no scale of the unit's own),
and every layer's outcome is "inconclusive" with the reason ``status`` (which says
why (``"insufficient references: ..."``; else ``"ok"``) when
  * it is a class unit checked with its class images and the natural images hold fewer than 2
    images of its class (its references would be top-k exemplars of other classes),
  * it has fewer than 2 natural references (natural_vs_natural is undefined), or
  * fewer than 2 other images remain (no usable lower reference / permutation pool)).
Such units are left out of the across-units population test.

Statistics (ranks, bootstrap counts and percentile intervals, permutation p, Holm) come from
:mod:`fvsanity.compare.stats`.

The natural images run through the model once for all units (one streamed, batched pass).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from ..errors import FVSanityError
from .path_common import (  # noqa: F401 - re-exported (the path check's names before the split)
    MAX_RESAMPLES,
    _f,
    _holm,
    _interval,
    _jf,
    _metric,
    _metric_choices,
    pairwise,
    safe_ratio,
    unit_seed,
)
from .path_references import (  # noqa: F401
    MIN_OTHER,
    MIN_REFERENCES,
    References,
    _fv_tensor,
    _order_layers,
    order_layers,
    select_references,
    validate_metrics,
)
from .path_results import AcrossUnitsLayer, LayerResult, PairedLayer, PathCheck, UnitPath, Verdict  # noqa: F401
from .path_settings import PathCheckSettings
from .path_stats import (  # noqa: F401
    _outcome_fields,
    _withheld,
    across_units,
    compare_path,
    layer_stats,
    paired_similarity,
)
from .verdict import (
    INCONCLUSIVE,
    activation_range,
)

__all__ = [
    "LayerResult",
    "Verdict",
    "UnitPath",
    "PairedLayer",
    "PathCheck",
    "AcrossUnitsLayer",
    "across_units",
    "pairwise",
    "layer_stats",
    "compare_path",
    "paired_similarity",
    "path_check",
    "PathCheckSettings",
    "unit_layers",
    "fv_activations",
    "unit_path",
    "paired_across_units",
    "order_layers",
    "safe_ratio",
    "References",
    "select_references",
    "unit_seed",
    "split_halves",
    "validate_metrics",
    "MIN_REFERENCES",
    "MIN_OTHER",
]

# The path check, one job per module: path_settings (PathCheckSettings), path_references (what a
# unit is compared with), path_common (seeds, pairwise similarity, small numerics), path_stats
# (a unit's curve, paired similarity, units as replicates), path_results (the frozen results),
# and here the orchestration: activations of the FVs, one unit's path, the whole check.


def unit_layers(lm, units, settings: PathCheckSettings) -> tuple[list[list[str]], list[str]]:
    """(each unit's comparison path, their union in forward order)."""
    paths = [list(settings.layers) if settings.layers else lm.path_to(u.layer) for u in units]
    return paths, order_layers(lm, [name for p in paths for name in p])


def fv_activations(lm, fv: torch.Tensor, layers: Sequence[str], batch_size: int = 64, device=None) -> dict[str, torch.Tensor]:
    """Pooled activations of FVs ``fv`` [U, S, 3, H, W] -> {layer: [U, S, C]}.

    One unit at a time (its S FVs in padded batches of ``batch_size``), so a unit's numbers are
    the same whether it is checked alone or beside other units."""
    from ..activations import collect

    per_unit = [collect(lm, fv[u], list(layers), "mean", batch_size, device) for u in range(fv.shape[0])]
    return {k: torch.stack([a[k] for a in per_unit]) for k in per_unit[0]}


def unit_path(
    lm,
    unit,
    fv_acts: dict[str, torch.Tensor],
    nat_acts: dict[str, torch.Tensor],
    responses: torch.Tensor,
    natural,
    layers: Sequence[str],
    settings: PathCheckSettings,
) -> UnitPath:
    """One unit's check: reference selection, per-layer statistics, verdict.

    Args:
        unit: a resolved Unit. fv_acts: {layer: [S, C]} its FVs. nat_acts: {layer: [N, C]} every
        natural image (the natural pass). responses: [N] the unit's responses. layers: its path.
    """
    st = settings
    sel = select_references(lm, unit, natural, responses, top_k=st.top_k, n_other=st.n_other,
                            use_class_images=st.use_class_images, seed=st.seed)
    ref, pool_idx = sel.natural, sel.other
    if sel.status != "ok":
        warnings.warn(f"unit {unit}: {sel.status}; its verdict reads {INCONCLUSIVE!r} at every layer", stacklevel=3)
    res, verdict = compare_path(
        {name: fv_acts[name] for name in layers},
        {name: nat_acts[name][ref] for name in layers},
        {name: nat_acts[name][pool_idx] for name in layers},
        layers, settings=st, seed=unit_seed(st.seed, unit), status=sel.status,
    )
    S = next(iter(fv_acts.values())).shape[0] if fv_acts else 0
    act = None
    if S and responses.numel():
        from .pipeline import response_from_pooled

        fv_resp = response_from_pooled(fv_acts, unit)  # None: not readable from pooled activations
        if fv_resp is not None:
            act = activation_range(fv_resp, responses)
    return UnitPath(
        unit=str(unit), class_index=sel.class_index, class_name=sel.class_name, n_fv=S,
        natural_indices=tuple(ref.tolist()), n_class_images=int(sel.class_indices.numel()),
        top_k_indices=tuple(sel.top_k_indices.tolist()),
        top_k_values=tuple(float(v) for v in sel.top_k_values),
        n_other=int(pool_idx.numel()), layers=res, verdict=verdict,
        natural_paths=tuple(natural.paths[j] for j in ref.tolist()) if natural.paths else (),
        activation=act,
    )


def paired_across_units(
    units, unit_results: Sequence[UnitPath], fv_acts: dict[str, torch.Tensor], nat_acts: dict[str, torch.Tensor],
    common: Sequence[str], settings: PathCheckSettings,
) -> dict[str, tuple[PairedLayer, ...]]:
    """The paired design across >= 4 units at their ``common`` layers (rows in unit-name order).

    fv_acts: {layer: [U, S, C]}; nat_acts: {layer: [N, C]}. Empty if fewer than 4 units."""
    paired: dict[str, tuple[PairedLayer, ...]] = {}
    if len(units) < 4 or not common:
        return paired
    refs = [torch.tensor(up.natural_indices, dtype=torch.long) for up in unit_results]
    order = sorted(range(len(units)), key=lambda k: str(units[k]))
    fv_means = {name: fv_acts[name][order].mean(1) for name in common}
    nat_means = {name: torch.stack([nat_acts[name][refs[k]].mean(0) for k in order]) for name in common}
    halves = _split_halves(nat_acts, [refs[k] for k in order], common, settings.seed, [units[k] for k in order])
    for pm in settings.paired_metrics:
        paired[pm] = paired_similarity(fv_means, nat_means, halves, common, metric=pm, n_perm=settings.n_perm,
                                       seed=settings.seed)
    return paired


def _natural_activations(lm, natural, union, units, st: PathCheckSettings, natural_pass, device, progress):
    """``({layer: [N, C]}, responses [N, U])`` of the natural images: ``natural_pass`` checked
    against these layers and units (narrowed to them), or a new pass."""
    from .pipeline import NaturalPass
    from .pipeline import natural_pass as make_pass

    if natural_pass is None:
        natural_pass = make_pass(lm, natural, union, units, batch_size=st.batch_size, device=device, progress=progress)
    if isinstance(natural_pass, NaturalPass):
        natural_pass.require(union, len(natural))
        if natural_pass.units and [str(u) for u in natural_pass.units] != [str(u) for u in units]:
            natural_pass = natural_pass.for_units(units)
    return natural_pass


def _settings_json(st: PathCheckSettings, union, paired, fv_images, n_seeds: int) -> dict:
    """What a :class:`PathCheck` records of its settings and of the FVs it was given."""
    return {
        "metric": st.metric, "layers": union, "top_k": int(st.top_k), "n_other": int(st.n_other),
        "use_class_images": st.use_class_images, "n_boot": st.n_boot, "n_perm": st.n_perm, "alpha": st.alpha,
        "confidence": st.confidence, "paired_metrics": list(paired), "seed": int(st.seed),
        "fv_seeds": list(getattr(fv_images, "seeds", range(n_seeds))), "pool": "mean",
        "fv_settings": getattr(fv_images, "settings", None),
    }


def path_check(
    lm,
    units,
    fv_images,
    natural,
    settings: PathCheckSettings | None = None,
    *,
    device=None,
    progress: bool = False,
    natural_pass=None,
    fv_acts: dict[str, torch.Tensor] | None = None,
    **kwargs,
) -> PathCheck:
    """Run the path-similarity sanity check for several units at once.

    Args:
        lm: a LoadedModel.
        units: Unit objects or spec strings (``"classifier.1:7"``), U of them (strings are
            resolved here, once; Units are used as they are).
        fv_images: Tensor [U, S, 3, H, W] RGB in [0, 1] (S seeds per unit) or an FVResult.
        natural: :class:`~fvsanity.data.NaturalImages` (labels used for class units).
        settings: :class:`PathCheckSettings`; the old keyword arguments (``metric=``, ``top_k=``,
            ``layers=``, ``seed=``, ...) still work and replace its fields.
        device, progress: where to run the forward passes; progress bars.
        natural_pass: a :class:`~fvsanity.compare.pipeline.NaturalPass` made for ``natural`` with
            these units (or the older tuple ({layer: [N, C]}, responses [N, U])); computed here
            if None.
        fv_acts: precomputed {layer: [U, S, C]} pooled FV activations (skips the FV pass).

    Returns:
        :class:`PathCheck`.

    Raises:
        DesignError: a metric outside its design (checked before any forward pass).
    """
    from ..io import provenance
    from .pipeline import resolve_units

    st = PathCheckSettings.from_kwargs(settings, **kwargs)
    validate_metrics(st.metric, st.paired_metrics)
    units = resolve_units(units, lm)
    if not units:
        raise FVSanityError("no units to check; pass at least one --unit LAYER:CHANNEL")
    fv = _fv_tensor(fv_images)
    if fv.shape[0] != len(units):
        raise FVSanityError(f"got FVs for {fv.shape[0]} units but {len(units)} units to check")
    paths, union = unit_layers(lm, units, st)
    n_nat = len(natural)
    if n_nat < 2:
        raise FVSanityError(f"need >= 2 natural images, got {n_nat}")

    nat_acts, resp = _natural_activations(lm, natural, union, units, st, natural_pass, device, progress)
    U, S = fv.shape[:2]
    if fv_acts is None:
        fv_acts = fv_activations(lm, fv, union, st.batch_size, device)

    unit_results = []
    for i, u in enumerate(units):  # a loop, not a comprehension: warnings point at path_check's caller
        unit_results.append(
            unit_path(lm, u, {name: fv_acts[name][i] for name in paths[i]}, nat_acts, resp[:, i], natural, paths[i], st))
    common = [name for name in union if all(name in p for p in paths)]
    paired = paired_across_units(units, unit_results, fv_acts, nat_acts, common, st)

    return PathCheck(
        model=lm.name, units=tuple(unit_results), paired=paired, settings=_settings_json(st, union, paired, fv_images, S),
        across_units=across_units(unit_results, st.alpha) if len(unit_results) >= 2 else (),
        data=natural.to_json(), provenance=provenance(),
    )


def split_halves(ref: torch.Tensor, seed: int, unit) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random disjoint halves of one unit's references ``ref`` [m] (sizes m // 2, m - m // 2),
    drawn with ``unit_seed(seed, unit) + 12345``: the same in ``check`` and ``audit``."""
    gen = torch.Generator().manual_seed(unit_seed(seed, unit) + 12345)
    perm = ref[torch.randperm(ref.numel(), generator=gen)]
    return perm[: perm.numel() // 2], perm[perm.numel() // 2 :]


def _split_halves(nat_acts, refs, layers, seed, units):
    """Means of two random disjoint halves of each unit's natural references ({layer: [U, C]} x 2)."""
    h1 = {name: [] for name in layers}
    h2 = {name: [] for name in layers}
    for ref, u in zip(refs, units):
        a, b = split_halves(ref, seed, u)
        for name in layers:
            c = nat_acts[name].shape[1]
            nan = torch.full((c,), float("nan"))
            h1[name].append(nat_acts[name][a].mean(0) if a.numel() else nan)
            h2[name].append(nat_acts[name][b].mean(0) if b.numel() else nan)
    return {n: torch.stack(v) for n, v in h1.items()}, {n: torch.stack(v) for n, v in h2.items()}
