"""Three-way splits (fvsanity.splits) and their use by the fooling experiments."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fvsanity.errors import FVSanityError
from fvsanity.fool import split_indices
from fvsanity.splits import Split, SplitError, split_with_tuning, three_way_split, unit_split

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("fooling_circuit", "silent_units")


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sets(s: Split) -> tuple[set, set, set]:
    return set(s.tuning.tolist()), set(s.building.tolist()), set(s.evaluation.tolist())


@pytest.mark.parametrize("n,fractions", [(2000, (0.5, 0.25, 0.25)), (1000, (0.6, 0.3, 0.1)), (7, (0.4, 0.3, 0.3))])
def test_three_way_split_disjoint_complete_sized_and_seeded(n, fractions):
    s = three_way_split(n, fractions, seed=3)
    t, b, e = _sets(s)
    assert not (t & b) and not (t & e) and not (b & e)
    assert t | b | e == set(range(n))
    assert len(t) == round(fractions[0] * n) and len(b) == round(fractions[1] * n)
    assert s.sizes() == {"tuning": len(t), "building": len(b), "evaluation": n - len(t) - len(b)}
    for part in (s.tuning, s.building, s.evaluation):
        assert part.dtype == torch.long and torch.equal(part, part.sort().values)
    again = three_way_split(n, fractions, seed=3)
    assert torch.equal(again.evaluation, s.evaluation) and torch.equal(again.tuning, s.tuning)
    other = three_way_split(n, fractions, seed=4)
    assert not torch.equal(other.evaluation, s.evaluation)
    assert s.to_json()["sizes"] == s.sizes() and s.to_json()["seed"] == 3


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.5, 0.3, 0.3), (-0.1, 0.6, 0.5), (1.2, -0.1, -0.1)])
def test_three_way_split_refuses_bad_fractions(fractions):
    with pytest.raises(SplitError, match="fractions") as e:
        three_way_split(10, fractions)
    assert isinstance(e.value, FVSanityError) and "\n" not in str(e.value)


def test_split_with_tuning_keeps_the_seen_half_and_evaluates_only_unseen_images():
    """The experiments' protocol: settings were chosen on split_indices(n, 0.5, 0)[1]."""
    n = 2000
    old_build, old_eval = split_indices(n, 0.5, 0)
    s = split_with_tuning(n, old_eval, 0.5, seed=1)
    t, b, e = _sets(s)
    assert t == set(old_eval.tolist())
    assert e and b and e | b == set(old_build.tolist()) and not (e & b)
    assert not (e & set(old_eval.tolist()))  # nothing evaluated was looked at while tuning
    assert len(e) == 500 and len(b) == 500
    assert torch.equal(split_with_tuning(n, old_eval, 0.5, seed=1).evaluation, s.evaluation)
    assert not torch.equal(split_with_tuning(n, old_eval, 0.5, seed=2).evaluation, s.evaluation)


@pytest.mark.parametrize("tuning,frac,match", [([0, 0, 1], 0.5, "duplicates"), ([0, 10], 0.5, "0..9"),
                                                ([0, 1], 1.0, "evaluation_fraction"), (list(range(9)), 0.5, "untouched")])
def test_split_with_tuning_refuses_bad_input(tuning, frac, match):
    with pytest.raises(SplitError, match=match):
        split_with_tuning(10, tuning, frac)


def test_split_refuses_overlapping_roles():
    with pytest.raises(SplitError, match="overlap"):
        Split(torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([3]), 4, 0, "by hand")


def test_unit_split_avoids_tuning_units_and_is_seeded():
    cands = [f"linear:{c}" for c in range(10)]
    tune = ["linear:0", "linear:1", "linear:2", "linear:4", "linear:5", "linear:6", "other:3"]
    us = unit_split(cands, tune, 4, seed=0)
    assert us.evaluation == ("linear:3", "linear:7", "linear:8", "linear:9")
    big = [f"c:{i}" for i in range(1000)]
    a = unit_split(big, big[:500], 5, seed=0)
    assert len(a.evaluation) == 5 and not set(a.evaluation) & set(big[:500])
    assert a.evaluation == unit_split(big, big[:500], 5, seed=0).evaluation
    assert a.evaluation != unit_split(big, big[:500], 5, seed=1).evaluation
    with pytest.raises(SplitError, match="1..4"):
        unit_split(cands, tune, 5)
    with pytest.raises(SplitError, match="duplicates"):
        unit_split(["a:1", "a:1"], [], 1)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_configs_evaluate_units_and_images_no_setting_was_chosen_on(name):
    """Real configs: the sweep's units are tuning units; the tuning split is the old evaluation half."""
    cfg = json.loads((ROOT / "experiments" / name / "config.json").read_text())
    sweep = _load(ROOT / "experiments" / "silent_units" / "sweep.py", f"sweep_{name}")
    layer = {"cifar10-resnet20": "linear", "imagenet-squeezenet": "classifier.1"}
    for model, run in cfg["runs"].items():
        assert run["split"]["tuned_on"] == {"fraction": 0.5, "seed": 0}
        swept = {f"{layer[model]}:{u}" for u in sweep.SETUPS[model]["units"]}
        assert swept <= set(run["units"]["tuning"])
        n = {"cifar10-resnet20": 2000, "imagenet-squeezenet": 1000}[model]
        s = sweep.image_split(n, run["split"])
        assert torch.equal(s.tuning, split_indices(n, 0.5, 0)[1])
        assert s.sizes() == {"tuning": n // 2, "building": n // 4, "evaluation": n // 4}
        # the routes run_fool will evaluate avoid every tuning unit
        n_cls = {"cifar10-resnet20": 10, "imagenet-squeezenet": 1000}[model]
        classes = [f"{layer[model]}:{c}" for c in range(n_cls)]
        ev = unit_split(classes, run["units"]["tuning"], run["settings"]["eval_units"], run["units"]["seed"])
        assert not set(ev.evaluation) & set(run["units"]["tuning"])


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiments_hand_run_fool_the_evaluation_units(name):
    """The experiments choose their evaluation units and pass them to run_fool (``eval_units=``),
    which evaluates exactly those routes, in that order."""
    from fvsanity.fool import pick_eval_routes
    from fvsanity.splits import SplitError
    from fvsanity.testing import tiny_model

    mod = _load(ROOT / "experiments" / "_fooling.py", "exp_fooling_shared")
    here = ROOT / "experiments" / name
    lm = tiny_model(num_classes=9)
    units_cfg = {"tuning": ["fc:0", "fc:4", "fc:5"], "tuning_sources": ["fc:8"], "seed": 0}
    routes, want, us = mod.variant_routes(lm, {"name": "permute", "units": "all", "shift": 1}, units_cfg, 3, here)
    assert [str(r.unit) for r in routes] == [f"fc:{c}" for c in range(9)]
    assert all(r.source.channel == (r.unit.channel + 1) % 9 for r in routes)
    for seed in (0, 1, 7):  # the seeded pick no longer matters: the units are handed over
        assert [str(r.unit) for r in pick_eval_routes(routes, 3, seed, units=want)] == want
    assert len(want) == 3 and not set(want) & {"fc:0", "fc:4", "fc:5", "fc:7"}  # fc:7 shows fc:8
    assert us.evaluation == tuple(want)
    routes, want, _ = mod.variant_routes(lm, {"name": "picture", "units": "heldout", "target": "target.png"},
                                         units_cfg, 3, here)
    assert len(routes) == 1 and [str(routes[0].unit)] == want and want[0] not in units_cfg["tuning"]
    with pytest.raises(SplitError, match="1..5"):  # 9 requested, 5 units are neither tuning units nor show one
        mod.variant_routes(lm, {"name": "permute", "units": "all", "shift": 1}, units_cfg, 9, here)


def test_silent_smoke_records_splits_and_evaluates_held_out_units(experiment_smoke):
    # --figures: the deprecated alias of --out still puts the outputs there (the fixture checks)
    out = experiment_smoke("silent_units", out_flag="--figures")
    res = json.loads((out / "results.json").read_text())
    for key in ("tiny_permute", "tiny_picture"):
        r = res["runs"][key]
        assert r["split"]["images"]["sizes"] == {"tuning": 20, "building": 10, "evaluation": 10}
        assert r["summary"]["n_eval_images"] == 10
        evaluated = [u["unit"] for u in r["check_units"]]
        assert evaluated == r["split"]["units"]["evaluation"] and "fc:0" not in evaluated
        assert "evaluation images" in json.dumps(r["split"]["numbers_from"])


def test_three_way_split_order_re_deals_the_same_parts():
    base = three_way_split(100, (0.2, 0.4, 0.4), seed=13)
    rot = three_way_split(100, (0.2, 0.4, 0.4), seed=13, order=("tuning", "evaluation", "building"))
    assert torch.equal(rot.tuning, base.tuning)
    assert torch.equal(rot.evaluation, base.building)
    assert torch.equal(rot.building, base.evaluation)
    assert rot.sizes() == {"tuning": 20, "building": 40, "evaluation": 40}
    assert "order" in rot.how and "order" not in base.how
    # unequal fractions: each part keeps its role's size
    r2 = three_way_split(10, (0.2, 0.3, 0.5), seed=1, order=("evaluation", "tuning", "building"))
    assert r2.sizes() == {"tuning": 2, "building": 3, "evaluation": 5}
    with pytest.raises(SplitError, match="order must name each"):
        three_way_split(10, (0.2, 0.3, 0.5), order=("tuning", "tuning", "building"))
