"""``fvsanity calibrate``: the detector measured on the user's model, for the user's FV settings.

End to end through the CLI on the random-weight toy model (every registered manipulation, a few
steps); resume after an interrupted run; a method that cannot apply is skipped and recorded; and
``check``/``audit --calibration`` refuse a calibration of another model fingerprint or other FV
settings in one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from fvsanity.errors import FVSanityError

TOY = ["--model", "toy-procedural", "--random-weights"]
FV = ["--steps", "3", "--seeds", "2"]
PATH = ["--top-k", "3", "--n-other", "8", "--n-boot", "10", "--n-perm", "10"]
FOOL = {"det_units": 4, "det_heldout_units": 2, "det_epochs": 2, "det_picture_seeds": 1, "det_routed_seeds": 1,
        "det_routed_units": 4, "det_refine_rounds": 0, "sl_steps": 2, "sl_target_steps": 3, "sl_batch": 2}


@pytest.fixture(scope="module")
def toy_images(tmp_path_factory):
    from fvsanity.models import toy

    return toy.write_procedural_folder(tmp_path_factory.mktemp("imgs") / "imgs", per_class=5)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, toy_images):
    """``fvsanity calibrate`` on the toy model: (out folder, calibration.json as a dict)."""
    from fvsanity.cli import main

    out = tmp_path_factory.mktemp("cal") / "cal"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = ["calibrate", *TOY, "--images", str(toy_images), "--out", str(out), "--units", "6", *FV, *PATH,
                "--roc-boot", "20", "--no-progress"]
        for k, v in FOOL.items():
            argv += ["--fool-opt", f"{k}={v}"]
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return out, json.loads((out / "calibration.json").read_text())


def test_calibrate_writes_a_calibration_of_every_registered_manipulation(calibrated):
    from fvsanity.fool import list_manipulations
    from fvsanity.models import load_model

    out, doc = calibrated
    assert doc["format"] == "fvsanity-calibration/1"
    lm = load_model("toy-procedural", pretrained=False, seed=0)
    assert doc["model"]["name"] == "toy-procedural" and doc["model"]["fingerprint"] == lm.fingerprint()
    assert doc["fv"]["steps"] == 3 and doc["fv"]["seeds"] == 2 and doc["fv"]["size"] == list(lm.input_size)
    assert doc["fv"]["param"] == "fft" and doc["fv"]["dtype"] in ("float32", "bfloat16")
    cal, held = doc["units"]["calibration"], doc["units"]["held_out"]
    assert len(cal) == len(held) == 3 and not set(cal) & set(held)
    assert any(u.startswith(f"{lm.output_layer}:") for u in cal + held)  # class units
    assert any(not u.startswith(f"{lm.output_layer}:") for u in cal + held)  # and hidden channels
    assert not set(doc["seeds"]["calibration"]) & set(doc["seeds"]["held_out"])
    want = {f"{m}:{v}" for m in list_manipulations() for v in ("unit", "picture")}
    assert set(doc["methods"]) | {s["condition"] for s in doc["skipped"]} == want
    for m in doc["methods"].values():
        assert 0.0 <= m["auc_ci"][0] <= m["auc"] <= m["auc_ci"][1] <= 1.0
        assert 0.0 <= m["tpr_ci"][0] <= m["tpr_at_5fpr"] <= m["tpr_ci"][1] <= 1.0
        assert m["n"] == len(held)
    thr = doc["thresholds"]["combined"]
    lo, hi = thr["plain"]["fpr_interval"]["interval"]
    assert 0.0 <= lo <= hi <= 1.0 and thr["plain"]["fpr"] == 0.05
    assert thr["confident"]["attainable"] is False and thr["confident"]["n_needed"] == 45  # 3 units are too few
    prov = doc["provenance"]
    assert prov["versions"]["torch"] and prov["versions"]["fvsanity"] and prov["time"] and prov["seconds"] > 0
    assert (out / "roc.png").stat().st_size > 0 and (out / "work").is_dir() and (out / "config.json").is_file()


def _check(tmp_path, toy_images, cal, *extra, cmd="check"):
    from fvsanity.cli import main

    out = tmp_path / cmd
    unit = "--unit" if cmd == "check" else "--units"
    rc = main([cmd, *TOY, unit, "fc:1", "--images", str(toy_images), "--out", str(out), *PATH, "--no-progress",
               "--calibration", str(cal), *extra])
    return rc, out


def test_check_with_the_calibration_of_this_model_and_fv_settings_reports_the_calibrated_score(
        calibrated, tmp_path, toy_images):
    out, _ = calibrated
    rc, res = _check(tmp_path, toy_images, out / "calibration.json", *FV)
    assert rc == 0
    cal = json.loads((res / "check.json").read_text())["units"][0]["calibrated"]
    assert "measured on toy-procedural" in cal["text"] and cal["flagged"] == (cal["score"] > cal["threshold"])


@pytest.mark.parametrize("cmd", ["check", "audit"])
def test_a_calibration_of_another_fingerprint_or_other_fv_settings_is_refused_in_one_line(
        calibrated, tmp_path, toy_images, capsys, cmd):
    out, doc = calibrated
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**doc, "model": {**doc["model"], "fingerprint": "0" * 64}}))
    cases = [(other, FV, "fingerprint 000000000000, not on this 'toy-procedural'"),
             (out / "calibration.json", ["--steps", "4", "--seeds", "2"], "FV settings steps 3, not steps 4"),
             (out / "calibration.json", ["--steps", "3", "--seeds", "3"], "FV settings seeds 2, not seeds 3"),
             (out / "calibration.json", [*FV, "--param", "pixel"], "FV settings param fft, not param pixel")]
    for i, (cal, flags, says) in enumerate(cases):
        capsys.readouterr()
        rc, res = _check(tmp_path / str(i), toy_images, cal, *flags, cmd=cmd)
        err = [ln for ln in capsys.readouterr().err.splitlines() if "--calibration" in ln]
        assert rc == 2 and len(err) == 1 and says in err[0], err
        assert not (res / "check.json").exists() and not (res / "audit.json").exists()


# ----------------------------------------------------------------------------- library: resume and skips
def _tiny_run(tmp_path, methods, **kw):
    from fvsanity.calibration import CalibrationSettings, calibrate
    from fvsanity.data import from_tensor
    from fvsanity.settings import replace_flat
    from fvsanity.testing import tiny_model

    g = torch.Generator().manual_seed(0)
    nat = from_tensor(torch.rand(40, 3, 16, 16, generator=g), torch.arange(40) % 5)
    st = replace_flat(CalibrationSettings(), units=6, steps=2, seeds=2, top_k=2, n_other=5, n_boot=5, n_perm=5,
                      roc_boot=5, progress=False, methods=tuple(methods), fool_options=FOOL, **kw)
    return calibrate(tiny_model(), nat, tmp_path / "cal", st, log=lambda msg: None)


@dataclass(frozen=True)
class _NoSettings:
    pass


def _toy_methods(crash: dict):
    """Two toy manipulations: ``toy-never`` cannot apply (a one-line FVSanityError, as a method
    refuses a model it cannot edit); ``toy-crash`` scales the output layer, or dies mid-run while
    ``crash["on"]`` (a killed run)."""
    import copy

    from fvsanity.fool import ManipulatedModel, Manipulation, wrap_loaded

    class Never(Manipulation):
        name = "toy-never"
        help = "cannot apply"

        def build(self, lm, routes, train_images, settings, *, prepared=None):
            raise FVSanityError(f"toy-never cannot edit {lm.name}: it needs a layer named 'attention'")

    class Crash(Manipulation):
        name = "toy-crash"
        help = "scales the output layer"

        def build(self, lm, routes, train_images, settings, *, prepared=None):
            if crash["on"]:
                raise KeyboardInterrupt  # the run is killed here
            net = copy.deepcopy(lm.model)
            with torch.no_grad():
                for p in net.get_submodule(lm.output_layer).parameters():
                    p.mul_(3.0)
            return wrap_loaded(lm, ManipulatedModel(net, lm.preprocess), self.name)

    return Never, Crash


def _counting(monkeypatch):
    """Counts FV sets rendered (not served from the cache) and manipulated models built."""
    import fvsanity.cache as cache
    import fvsanity.calibration as calibration

    counts = {"rendered": 0, "built": 0}
    render_cached, build = cache.render_cached, calibration.build_condition

    def counted_render(*a, **k):
        res, reused = render_cached(*a, **k)
        counts["rendered"] += not reused
        return res, reused

    def counted_build(*a, **k):
        counts["built"] += 1
        return build(*a, **k)

    monkeypatch.setattr(cache, "render_cached", counted_render)
    monkeypatch.setattr(calibration, "build_condition", counted_build)
    return counts


def test_a_killed_calibration_resumes_with_the_work_it_finished(tmp_path, monkeypatch):
    from fvsanity.fool import MANIPULATIONS

    crash = {"on": True}
    _, Crash = _toy_methods(crash)
    counts = _counting(monkeypatch)
    with MANIPULATIONS.registered("toy-crash", Crash):
        with pytest.raises(KeyboardInterrupt):
            _tiny_run(tmp_path, ["silent", "toy-crash"])
        assert counts == {"rendered": 6, "built": 3}  # healthy, silent:unit, silent:picture x 2 roles; toy-crash died
        assert not (tmp_path / "cal" / "calibration.json").exists()
        crash["on"] = False
        counts.update(rendered=0, built=0)
        first = _tiny_run(tmp_path, ["silent", "toy-crash"]).doc
        # healthy and silent reused, neither rebuilt nor re-rendered; both toy-crash conditions done now
        assert counts == {"rendered": 4, "built": 2}
        counts.update(rendered=0, built=0)
        again = _tiny_run(tmp_path, ["silent", "toy-crash"]).doc
        assert counts == {"rendered": 0, "built": 0}  # everything finished: nothing rebuilt or re-rendered
    assert again["methods"] == first["methods"] and again["combined_score"] == first["combined_score"]


def test_a_method_that_cannot_apply_is_skipped_with_its_reason_recorded(tmp_path, monkeypatch):
    from fvsanity.fool import MANIPULATIONS

    Never, _ = _toy_methods({"on": False})
    with MANIPULATIONS.registered("toy-never", Never):
        doc = _tiny_run(tmp_path, ["silent", "toy-never"]).doc
    assert set(doc["methods"]) == {"silent:unit", "silent:picture"}
    assert [s["condition"] for s in doc["skipped"]] == ["toy-never:unit", "toy-never:picture"]
    for s in doc["skipped"]:
        assert s["method"] == "toy-never" and s["reason"] == "toy-never cannot edit tiny: it needs a layer named 'attention'"
    assert "toy-never:unit" in doc["manipulations"]["requested"] and "toy-never:unit" not in doc["manipulations"]["calibrated"]


def test_bad_calibration_settings_are_refused_in_one_line_before_any_work(tmp_path):
    from fvsanity.calibration import default_unit_plan
    from fvsanity.testing import tiny_model

    with pytest.raises(FVSanityError, match=r"unknown manipulation method 'nope'; valid: circuit"):
        _tiny_run(tmp_path, ["nope"])
    with pytest.raises(FVSanityError, match=r"--units 10000: tiny has only \d+ .*valid: 6\.\.\d+$"):
        default_unit_plan(tiny_model(), 10000, 0)
    assert not (tmp_path / "cal" / "work").exists()
