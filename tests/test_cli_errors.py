"""Bad input to ``fvsanity audit`` as a new user would try it: one line on stderr, exit != 0,
and nothing already written is lost. In-process through ``fvsanity.cli.main``."""

from __future__ import annotations

import json

import pytest

from fvsanity import auditing as A
from fvsanity.cli import main
from fvsanity.models import toy

FAST = ["--steps", "3", "--seeds", "1", "--top-k", "3", "--n-other", "8", "--n-boot", "10", "--n-perm", "10",
        "--no-progress"]
TOY = ["--model", "toy-procedural", "--random-weights"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return toy.write_procedural_folder(tmp_path_factory.mktemp("imgs") / "imgs", per_class=3)


@pytest.fixture
def previous(tmp_path, images):
    """An --out folder holding a finished audit, and a snapshot of its files."""
    out = tmp_path / "prev"
    assert main(["audit", *TOY, "--units", "fc:1", "--images", str(images), "--out", str(out), *FAST]) == 0
    return out, _snapshot(out)


def _snapshot(out):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.rglob("*")) if p.is_file()}


def _run_error(capsys, argv, code=2):
    capsys.readouterr()
    rc = main(argv)
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert rc == code, (rc, cap.err)
    assert len(lines) == 1, cap.err
    assert lines[0].startswith("fvsanity: ")
    return lines[0]


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["--model", "resnet5O", "--units", "fc:1"], r"unknown model 'resnet5O'.*closest: resnet50"),
        ([*TOY, "--units", "blok4:1"], r"unknown layer 'blok4'; closest valid layers: block4"),
        ([*TOY, "--units", "fc:10"], r"channel 10 out of range for 'fc': valid 0\.\.9"),
        ([*TOY, "--units", "fc"], r"bad unit 'fc'; expected LAYER:CHANNEL"),
        ([*TOY, "--layer", "block4", "--sample", "100"], r"--sample 100 out of range for 'block4': valid 1\.\.64"),
        ([*TOY], r"no units: pass --units"),
        ([*TOY, "--units", "fc:1", "--steps", "0"], r"--steps must be in 1\.\.1000000, got 0"),
    ],
)
def test_bad_model_or_unit(argv, expect, previous, images, capsys):
    out, snap = previous
    line = _run_error(capsys, ["audit", *argv, "--images", str(images), "--out", str(out), *FAST[2:]])
    import re

    assert re.search(expect, line), line
    assert _snapshot(out) == snap


def test_empty_image_folder(tmp_path, previous, capsys):
    out, snap = previous
    (tmp_path / "empty").mkdir()
    line = _run_error(capsys, ["audit", *TOY, "--units", "fc:1", "--images", str(tmp_path / "empty"), "--out", str(out), *FAST])
    assert "no image files" in line and str(tmp_path / "empty") in line
    assert _snapshot(out) == snap


def test_missing_image_folder(tmp_path, capsys):
    line = _run_error(capsys, ["audit", *TOY, "--units", "fc:1", "--images", str(tmp_path / "nope"),
                               "--out", str(tmp_path / "o"), *FAST])
    assert "image folder not found" in line


def test_folder_of_corrupt_images(tmp_path, previous, capsys):
    out, snap = previous
    bad = tmp_path / "corrupt"
    for c in ("disc", "ring"):  # toy class names: class folders are matched to the model's classes
        (bad / c).mkdir(parents=True)
        for i in range(3):
            (bad / c / f"{i}.jpg").write_bytes(b"\xff\xd8 this is not a jpeg " + bytes([i]) * 50)
    line = _run_error(capsys, ["audit", *TOY, "--units", "fc:1", "--images", str(bad), "--out", str(out), *FAST])
    assert "no readable image" in line and "6 image files failed to decode" in line
    assert _snapshot(out) == snap


def test_missing_weights_offline(tmp_path, monkeypatch, previous, images, capsys, no_packaged_data):
    out, snap = previous
    for d in ("data", "cache"):
        (tmp_path / d).mkdir()
    monkeypatch.setenv("FVSANITY_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("FVSANITY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FVSANITY_OFFLINE", "1")
    line = _run_error(capsys, ["audit", "--model", "cifar10-resnet20", "--units", "linear:1", "--images", str(images),
                               "--out", str(out), *FAST])
    assert "no weights for cifar10-resnet20" in line and "--weights FILE" in line and str(tmp_path / "data") in line
    assert _snapshot(out) == snap
    line = _run_error(capsys, ["audit", "--model", "cifar10-resnet20", "--weights", str(tmp_path / "w.th"),
                               "--units", "linear:1", "--images", str(images), "--out", str(out), *FAST])
    assert "weights file not found" in line


def test_out_not_writable(tmp_path, images, capsys):
    f = tmp_path / "a_file.txt"
    f.write_text("keep me")
    line = _run_error(capsys, ["audit", *TOY, "--units", "fc:1", "--images", str(images), "--out", str(f / "out"), *FAST])
    assert "is not writable" in line and str(f / "out") in line
    assert f.read_text() == "keep me"


def test_mixed_settings_refused(previous, images, capsys):
    out, snap = previous
    line = _run_error(capsys, ["audit", *TOY, "--units", "fc:1", "--images", str(images), "--out", str(out),
                               *FAST[:1], "4", *FAST[2:]])
    assert "other FV settings" in line and "steps" in line
    assert _snapshot(out) == snap


def test_interrupted_run_resumes(tmp_path, images, monkeypatch, capsys):
    out = tmp_path / "run"
    # 8 FV seeds: a design where both claims of the verdict can reach significance over the toy
    # model's paths (no design note on stderr; the seeds are the replicates)
    argv = ["audit", *TOY, "--units", "fc:1,fc:2,block4:3", "--images", str(images), "--out", str(out), *FAST,
            "--seeds", "8", "--n-other", "25"]
    real = A.audit_unit
    calls = []

    def step_then_ctrl_c(ctx, i, *a):
        if calls:
            raise KeyboardInterrupt
        calls.append(i)
        return real(ctx, i, *a)

    monkeypatch.setattr(A, "audit_unit", step_then_ctrl_c)
    line = _run_error(capsys, argv, code=130)
    assert "interrupted" in line and "run again to resume" in line
    done = [p.name for p in (out / "units").iterdir() if not p.name.startswith(".")]
    assert done == ["fc_c1"]
    first = _snapshot(out / "units" / "fc_c1")

    monkeypatch.setattr(A, "audit_unit", real)
    assert main(argv) == 0
    assert _snapshot(out / "units" / "fc_c1") == first  # the finished unit was not redone
    audit = json.loads((out / "audit.json").read_text())
    assert [u["unit"] for u in audit["units"]] == ["fc:1", "fc:2", "block4:3"]
    assert audit["timing"]["units_computed_this_call"] == ["fc_c2", "block4_c3"]
    assert not [p for p in (out / "units").iterdir() if p.name.startswith(".")]  # no half-written unit


# ------------------------------------------------------------------------------ every command
def _one_error_line(capsys, argv) -> str:
    """Run ``main(argv)``: exit 2, exactly one non-empty stderr line ``fvsanity: error: ...``."""
    capsys.readouterr()
    rc = main(argv)
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert rc == 2, (rc, cap.err)
    assert len(lines) == 1 and lines[0].startswith("fvsanity: error: "), cap.err
    assert "Traceback" not in cap.err + cap.out
    return lines[0]


R20 = ["--model", "cifar10-resnet20"]
U = ["--unit", "linear:1"]
S3 = ["--shift", "3"]  # fool: the default --shift 100 is an identity on 10 classes

BAD_INPUTS = [
    # layers
    (["layers", "resnet5O"], r"unknown model 'resnet5O'.*closest: resnet50"),
    (["layers", "--weights", "{tmp}/nope.th"], r"weights file not found"),
    (["layers", "--frobnicate"], r"unrecognized arguments: --frobnicate"),
    # visualize
    (["visualize", "--model", "nope", *U], r"unknown model 'nope'"),
    (["visualize", *R20, "--device", "tpu", *U], r"unknown --device 'tpu'; valid: cpu, cuda, cuda:N"),
    (["visualize", *R20, "--steps", "-1", *U], r"--steps must be in 1\.\.1000000, got -1"),
    (["visualize", *R20, "--seeds", "0", *U], r"--seeds must be >= 1, got 0"),
    (["visualize", *R20, "--size", "0", *U], r"--size must be in 1\.\.4096, got 0"),
    (["visualize", *R20, "--lr", "-1", *U], r"--lr must be > 0, got -1.0"),
    (["visualize", *R20, "--fv-width", "0", *U], r"--fv-width must be >= 1, got 0"),
    (["visualize", *R20, "--checkpoints", "abc", *U], r"--checkpoints must be comma-separated integers \(e.g. 32,128\), got 'abc'"),
    (["visualize", *R20, "--checkpoints", "-3", *U], r"--checkpoints must be >= 1, got -3"),
    (["visualize", *R20, "--out", "{file}/out", *U], r"is not writable"),
    (["visualize", *R20, "--unit", "linear:99"], r"channel 99 out of range for 'linear': valid 0\.\.9"),
    (["visualize", *R20, "--unit", "bogus"], r"bad unit 'bogus'; expected LAYER:CHANNEL"),
    (["visualize", *R20, "--param", "png", *U], r"visualize: argument --param: invalid choice: 'png'"),
    (["visualize", *R20], r"visualize: the following arguments are required: --unit"),
    (["visualize", *R20, "--steps", "many", *U], r"visualize: argument --steps: invalid int value: 'many'"),
    # check
    (["check", "--model", "nope", *U], r"unknown model 'nope'"),
    (["check", *R20, "--steps", "-1", *U], r"--steps must be in 1\.\.1000000, got -1"),
    (["check", *R20, "--seeds", "0", *U], r"--seeds must be >= 1, got 0"),
    (["check", *R20, "--alpha", "2", *U], r"--alpha must be in \(0, 0\.5\), got 2\.0"),
    (["check", *R20, "--alpha", "0.6", *U], r"--alpha must be in \(0, 0\.5\), got 0\.6"),
    (["check", *R20, "--n-perm", "0", *U], r"--n-perm must be in 1\.\.1000000, got 0"),
    (["check", *R20, "--n-boot", "-1", *U], r"--n-boot must be in 0\.\.1000000, got -1"),
    (["check", *R20, "--out", "{file}/out", *U], r"is not writable"),
    (["check", *R20, "--images", "{tmp}/nope", *U], r"image folder not found"),
    (["check", *R20, "--labels", "{tmp}/nope.csv", *U], r"--labels file not found"),
    (["check", *R20, "--metric", "spearmann", *U], r"check: argument --metric: invalid choice: 'spearmann'"),
    (["check", *R20, "--unit", "linear:x"], r"bad unit 'linear:x'"),
    (["check", *R20, "--layers", "layer9", *U], r"unknown layer 'layer9'"),
    (["check", *R20], r"pass at least one --unit"),
    # fool
    (["fool", "--model", "nope"], r"unknown model 'nope'"),
    (["fool", *R20, "--split", "2"], r"--split must be in \(0, 1\), got 2\.0"),
    (["fool", *R20, "--det-steps", "-1", *S3], r"--det-steps must be >= 1, got -1"),
    (["fool", *R20, "--eval-seeds", "0", *S3], r"--eval-seeds must be >= 1, got 0"),
    (["fool", *R20, "--fv-size", "0", *S3], r"--fv-size must be in 1\.\.4096, got 0"),
    (["fool", *R20, "--k", "-1", *S3], r"--k must be > 0, got -1\.0"),
    (["fool", *R20, "--margin-sd", "-1", *S3], r"--margin-sd must be >= 0, got -1\.0"),
    (["fool", *R20, "--out", "{file}/out", *S3], r"is not writable"),
    (["fool", *R20, "--train-images", "{tmp}/nope", *S3], r"image folder not found"),
    (["fool", *R20, "--method", "magic"], r"fool: argument --method: invalid choice: 'magic'"),
    # audit
    (["audit", "--model", "nope", "--units", "linear:1"], r"unknown model 'nope'"),
    (["audit", *R20, "--steps", "-1", "--units", "linear:1"], r"--steps must be in 1\.\.1000000, got -1"),
    (["audit", *R20, "--seeds", "0", "--units", "linear:1"], r"--seeds must be >= 1, got 0"),
    (["audit", *R20, "--size", "0", "--units", "linear:1"], r"--size must be in 1\.\.4096, got 0"),
    (["audit", *R20, "--alpha", "2", "--units", "linear:1"], r"--alpha must be in \(0, 0\.5\), got 2\.0"),
    (["audit", *R20, "--n-perm", "0", "--units", "linear:1"], r"--n-perm must be in 1\.\.1000000, got 0"),
    (["audit", *R20, "--n-boot", "-1", "--units", "linear:1"], r"--n-boot must be in 0\.\.1000000, got -1"),
    (["audit", *R20, "--n-other", "0", "--units", "linear:1"], r"--n-other must be >= 1, got 0"),
    (["audit", *R20, "--out", "{file}/out", "--units", "linear:1"], r"is not writable"),
    (["audit", *R20, "--images", "{tmp}/nope", "--units", "linear:1"], r"image folder not found"),
    (["audit", *R20, "--units", "linear:x"], r"bad unit 'linear:x'"),
    # demo
    (["demo", "--steps", "-1"], r"--steps must be in 1\.\.1000000, got -1"),
    (["demo", "--seeds", "0"], r"--seeds must be >= 1, got 0"),
    (["demo", "--class-units", "-1"], r"--class-units must be >= 0, got -1"),
    (["demo", "--class-units", "0", "--block-units", "0"], r"no units to audit"),
    (["demo", "--out", "{file}/out"], r"is not writable"),
    # the command itself
    (["bench"], r"argument COMMAND: invalid choice: 'bench' \(choose from .*'audit'"),
]


@pytest.mark.parametrize("argv, expect", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_every_command_bad_input_is_one_line_exit_2(argv, expect, tmp_path, data_root, capsys):
    import re

    f = tmp_path / "a_file.txt"
    f.write_text("keep me")
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{file}", str(f)) for a in argv]
    if argv[0] not in ("layers", "bench") and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    line = _one_error_line(capsys, argv)
    assert re.search(expect, line), line
    assert f.read_text() == "keep me"


@pytest.mark.parametrize("command", ["visualize", "check", "fool", "audit", "demo"])
def test_device_cuda_without_cuda_is_one_line(command, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [command, "--device", "cuda", "--out", str(tmp_path / "o")]
    argv += {"visualize": U, "check": U, "audit": ["--units", "linear:1"], "fool": S3}.get(command, [])
    line = _one_error_line(capsys, argv)
    assert "--device 'cuda' requested but CUDA is not available; valid here: cpu" in line


# ------------------------------------------------------------------------------ --config
def _cfg(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "name, text, expect",
    [
        ("bad.json", '{"steps": 3,\n "seeds": }', r"invalid JSON at line 2, column 11: Expecting value"),
        ("bad.yaml", "steps: 3\n seeds: [1\n", r"invalid YAML at line 2, column 7: mapping values are not allowed"),
        ("list.json", "[1, 2]", r"the JSON must be a mapping of flag names to values, got list"),
        ("scalar.yml", "42\n", r"the YAML must be a mapping of flag names to values, got int"),
        ("typo.json", '{"stpes": 3}', r"unknown key 'stpes'; closest: steps; valid: allow-partial-weights, alpha, batch-size, .*top-k, transforms, unit, weights"),
        ("type.json", '{"steps": "abc"}', r"'steps' \(--steps\) must be an integer, got \"abc\""),
        ("type2.json", '{"alpha": [0.1]}', r"'alpha' \(--alpha\) must be a number, got \[0\.1\]"),
        ("flag.yaml", "no-progress: 1\n", r"'no-progress' \(--no-progress\) must be true or false, got 1"),
        ("choice.json", '{"metric": "spearmann"}', r"'metric' \(--metric\) \"spearmann\" is not valid; valid: .*spearman"),
        ("other.json", '{"command": "audit", "steps": 3}', r"is a config of 'fvsanity audit', not of 'fvsanity check'"),
        ("binary.json", None, r"not UTF-8 text"),
    ],
)
def test_config_errors_are_one_line(name, text, expect, tmp_path, capsys):
    import re

    path = tmp_path / name
    if text is None:
        path.write_bytes(b"\xff\xfe\x00garbage")
    else:
        path.write_text(text)
    for form in (["--config", str(path)], [f"--config={path}"]):
        line = _one_error_line(capsys, ["check", *U, *form, "--out", str(tmp_path / "o")])
        assert re.search(expect, line), line
        assert str(path) in line
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_config_missing_file_and_folder(tmp_path, capsys):
    line = _one_error_line(capsys, ["check", *U, "--config", str(tmp_path / "nope.json")])
    assert "file not found" in line and "nope.json" in line
    line = _one_error_line(capsys, ["check", *U, f"--config={tmp_path}"])
    assert "is not a file" in line


def test_config_equals_form_is_applied_and_flags_override(tmp_path, monkeypatch):
    """``--config=FILE`` sets defaults like ``--config FILE`` (it was ignored); flags win."""
    from fvsanity import cli
    from fvsanity.commands import visualize

    seen = []
    monkeypatch.setattr(visualize, "run", lambda args: seen.append(vars(args).copy()) or 0)
    cfg = _cfg(tmp_path, "c.yaml", "steps: 7\nseeds: 3\nlr: 0.5\nunit: linear:2\nno-progress: true\n")
    assert cli.main(["visualize", f"--config={cfg}", "--seeds", "2"]) == 0
    assert cli.main(["visualize", "--config", str(cfg), "--unit", "linear:5"]) == 0
    assert [(s["steps"], s["seeds"], s["lr"], s["unit"], s["no_progress"]) for s in seen] == [
        (7, 2, 0.5, ["linear:2"], True), (7, 3, 0.5, ["linear:5"], True)]


def test_saved_config_roundtrips_as_config(tmp_path, monkeypatch):
    """The config.json a run saves is a valid --config for the same command (its ``command`` and
    ``config`` keys, and what a command records, are accepted and not applied)."""
    from fvsanity import cli
    from fvsanity.commands import fool

    seen = []

    def fake_run(args):
        args.model_provenance = {"weights": "random"}  # as fool.run records it
        cli.save_config(args, tmp_path)
        seen.append(args)
        return 0

    monkeypatch.setattr(fool, "run", fake_run)
    assert cli.main(["fool", "--shift", "3", "--det-steps", "9", "--k", "50"]) == 0
    assert cli.main(["fool", "--config", str(tmp_path / "config.json")]) == 0
    a, b = seen
    assert (b.shift, b.det_steps, b.k, b.config) == (3, 9, 50.0, str(tmp_path / "config.json"))
    assert {k: v for k, v in vars(a).items() if k not in ("config", "func")} == {
        k: v for k, v in vars(b).items() if k not in ("config", "func")}


@pytest.mark.parametrize("command, argv", [("check", []), ("audit", []), ("fool", []),
                                           ("visualize", ["--unit", "linear:1"])])
def test_saved_config_with_model_provenance_roundtrips(command, argv, tmp_path, monkeypatch):
    """Every command's saved config.json is a valid --config: ``model_provenance`` is a record,
    not a flag (it was an 'unknown key' error for check/audit/fool), and a flag saved as null
    (``--unit`` not given) means "not given" (it was "must be a string or a list of strings")."""
    import importlib

    from fvsanity import cli

    mod = importlib.import_module(f"fvsanity.commands.{command}")
    seen = []

    def fake_run(args):
        args.model_provenance = {"name": "m", "weights": "random", "random_parameters": []}
        cli.save_config(args, tmp_path)
        seen.append(args)
        return 0

    monkeypatch.setattr(mod, "run", fake_run)
    assert cli.main([command, *argv]) == 0
    assert "model_provenance" in json.loads((tmp_path / "config.json").read_text())
    assert cli.main([command, "--config", str(tmp_path / "config.json")]) == 0
    assert len(seen) == 2


def test_config_sets_a_boolean_optional_flag(tmp_path):
    """A ``--x/--no-x`` flag (what a manipulation's bool setting becomes) is set by true/false in a
    config (it was refused as "must be a string, got true"); anything else is a one-line error."""
    import argparse

    from fvsanity.cli import ConfigError, load_config_defaults

    def parser():
        p = argparse.ArgumentParser()
        p.add_argument("--config")
        p.add_argument("--smooth", action=argparse.BooleanOptionalAction, default=True)
        return p

    cfg = _cfg(tmp_path, "c.json", '{"smooth": false}')
    p = parser()
    load_config_defaults(p, ["--config", str(cfg)])
    assert p.parse_args([]).smooth is False and p.parse_args(["--smooth"]).smooth is True
    bad = _cfg(tmp_path, "b.json", '{"smooth": "yes"}')
    with pytest.raises(ConfigError, match=r"'smooth' \(--no-smooth\) must be true or false"):
        load_config_defaults(parser(), ["--config", str(bad)])


def test_commands_are_the_modules_that_exist():
    """The command list comes from fvsanity/commands/*.py: no phantom 'bench', each one registered."""
    from fvsanity import cli

    names = cli.list_commands()
    assert names == ["audit", "calibrate", "check", "demo", "fool", "layers", "visualize"]
    sub = cli.build_parser()._subparsers._group_actions[0].choices
    assert sorted(sub) == names
    assert not hasattr(cli, "COMMANDS")


def test_a_broken_command_module_is_not_silently_skipped(monkeypatch):
    import sys
    import types

    from fvsanity import cli

    monkeypatch.setattr(cli, "list_commands", lambda: ["layers", "ghost"])
    broken = types.ModuleType("fvsanity.commands.ghost")  # no register()
    monkeypatch.setitem(sys.modules, "fvsanity.commands.ghost", broken)
    with pytest.raises(AttributeError, match="register"):
        cli.build_parser()


# ------------------------------------------------------------------------------ --n-boot 0
@pytest.mark.parametrize("command", ["check", "audit"])
def test_n_boot_zero_is_valid_no_intervals(command, tmp_path, data_root, capsys):
    """--n-boot 0 = no bootstrap intervals (null CIs); the verdict still comes from the test."""
    out = tmp_path / "out"
    unit = ["--unit" if command == "check" else "--units", "linear:1"]
    argv = [command, *R20, *unit, "--images", str(data_root / "cifar10-test"), "--limit", "40", "--steps", "2",
            "--seeds", "2", "--top-k", "3", "--n-other", "10", "--n-boot", "0", "--n-perm", "20", "--no-progress",
            "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    doc = json.loads((out / ("check.json" if command == "check" else "audit.json")).read_text())
    unit_doc = doc["units"][0]
    layers = unit_doc["layers"] if command == "check" else unit_doc["path"]["layers"]
    assert layers and all(r["ci_low"] is None and r["ci_high"] is None for r in layers)
    assert all(r["p_value"] is not None for r in layers)


# ------------------------------------------------------------------------------ refused before work starts
# Every bad value is refused before any work: exit 2, one line naming the value and the valid
# range or choices, no traceback, and an --out that already holds FVs is left byte for byte.
@pytest.fixture(scope="module")
def finished_fvs(tmp_path_factory):
    """An --out folder holding a finished `fvsanity visualize` run (good FVs to be kept)."""
    out = tmp_path_factory.mktemp("fvs") / "fvs"
    assert main(["visualize", *R20, "--unit", "linear:1", "--steps", "1", "--no-progress", "--out", str(out)]) == 0
    return out


def _md5s(folder) -> dict:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _flat_images(root, names=("a.png", "b.png", "c.png", "d.png")):
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        Image.new("RGB", (32, 32), (40 * i, 90, 160)).save(root / n)
    return root


def _alias_bomb(key: str = "unit", depth: int = 9) -> str:
    """Billion laughs: 9**9 strings from a few hundred bytes, under a valid key."""
    lines = ['l0: &l0 ["linear:1", "linear:1", "linear:1", "linear:1", "linear:1", "linear:1", "linear:1", "linear:1", "linear:1"]']
    for i in range(1, depth):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]")
    return "\n".join(lines) + f"\n{key}: [{', '.join([f'*l{depth - 1}'] * 9)}]\n"


V1 = ["visualize", *R20, *U, "--steps", "2", "--no-progress"]
FLAT = ["--images", "{flat}", "--steps", "2", "--seeds", "2", "--no-progress"]
CHK = ["check", *R20, *U, *FLAT]
WEIGHTS = "{data}/weights/cifar10_resnet20-12fca82f.th"

# (argv, environment, files to write {name: text}, regex the one line must match)
REFUSED = {
    # non-finite or out-of-range numbers (they wrote NaN FVs over good ones, exit 0)
    "lr inf": ([*V1, "--lr", "inf"], {}, {}, r"--lr must be a finite number > 0, got inf"),
    "lr nan": ([*V1, "--lr", "nan"], {}, {}, r"--lr must be a finite number > 0, got nan"),
    "diversity nan": ([*V1, "--seeds", "2", "--diversity", "nan"], {}, {},
                      r"--diversity must be a finite number >= 0, got nan"),
    "diversity -inf": ([*V1, "--diversity=-inf"], {}, {}, r"--diversity must be a finite number >= 0, got -inf"),
    "diversity < 0": ([*V1, "--diversity", "-0.5"], {}, {}, r"--diversity must be >= 0, got -0\.5"),
    "steps 0": ([*V1, "--steps", "0"], {}, {}, r"--steps must be in 1\.\.1000000, got 0"),
    "fool k inf": (["fool", *R20, *S3, "--k", "inf"], {}, {}, r"--k must be a finite number > 0, got inf"),
    # ignored input: labels.csv
    "labels conflicting rows": (CHK, {}, {"flat/labels.csv": "a.png,1\nb.png,2\na.png,3\n"},
                                r"labels file '.*labels\.csv' line 3: 'a\.png' labelled '3' but '1' at line 1"),
    "labels empty": (CHK, {}, {"flat/labels.csv": ""}, r"labels file '.*labels\.csv' has no 'filename,label' rows"),
    "labels header only": (CHK, {}, {"flat/labels.csv": "filename,label\n"},
                           r"labels file '.*labels\.csv' has no 'filename,label' rows"),
    "labels missing file": (CHK, {}, {"flat/labels.csv": "a.png,1\nnope.png,2\n"},
                            r"labels file '.*labels\.csv' line 2: 'nope\.png' is not an image file in '.*flat'"),
    "labels extra column": (CHK, {}, {"flat/labels.csv": "a.png,1\nb.png,2,cat\n"},
                            r"labels file '.*labels\.csv' line 2: expected 2 columns 'filename,label', got 3"),
    "labels flag conflicting rows": ([*CHK, "--labels", "{tmp}/l.csv"], {}, {"l.csv": "a.png,cat\na.png,dog\n"},
                                     r"labels file '.*l\.csv' line 2: 'a\.png' labelled 'dog' but 'cat'"),
    # ignored input: flags and environment
    "random and file weights visualize": ([*V1, "--random-weights", "--weights", WEIGHTS], {}, {},
                                          r"--random-weights and --weights '.*' conflict"),
    "random and file weights audit": (["audit", *R20, "--units", "linear:1", "--random-weights", "--weights", WEIGHTS],
                                      {}, {}, r"--random-weights and --weights '.*' conflict"),
    "random weights in config": ([*V1, "--weights", WEIGHTS, "--config", "{tmp}/c.json"], {},
                                 {"c.json": '{"random_weights": true}'}, r"--random-weights and --weights '.*' conflict"),
    "threads abc": (V1, {"FVSANITY_THREADS": "abc"}, {}, r"FVSANITY_THREADS='abc' is not valid; valid: a whole number >= 1"),
    "threads 0": (["check", *R20, *U], {"FVSANITY_THREADS": "0"}, {}, r"FVSANITY_THREADS='0' is not valid; valid: a whole"),
    "timeout abc": (["audit", *R20, "--units", "linear:1"], {"FVSANITY_DIST_TIMEOUT_S": "soon"}, {},
                    r"FVSANITY_DIST_TIMEOUT_S='soon' is not valid; valid: a whole number >= 1"),
    "offline yes": (V1, {"FVSANITY_OFFLINE": "yes"}, {}, r"FVSANITY_OFFLINE='yes' is not valid; valid: 1 \(no network\) or 0"),
    "amp fast": (V1, {"FVSANITY_AMP": "fast"}, {}, r"FVSANITY_AMP='fast' is not valid; valid: on, off, auto"),
    "unit twice visualize": ([*V1, "--unit", "linear:1"], {}, {}, r"unit 'linear:1' given twice in --unit"),
    "unit twice comma": (["visualize", *R20, "--unit", "layer3.2:4,layer3_2:4", "--steps", "2"], {}, {},
                         r"unit 'layer3\.2:4' given twice in --unit"),
    "unit twice check": (["check", *R20, "--unit", "linear:1,linear:2", "--unit", "linear:2", *FLAT], {}, {},
                         r"unit 'linear:2' given twice in --unit"),
    "unit twice audit": (["audit", *R20, "--units", "linear:1,linear:1"], {}, {}, r"unit 'linear:1' given twice in --units"),
    "unit twice fool": (["fool", *R20, *S3, "--unit", "linear:1,linear:1"], {}, {}, r"unit 'linear:1' given twice in --unit"),
    "config duplicate yaml key": ([*V1, "--config", "{tmp}/c.yaml"], {}, {"c.yaml": "lr: 0.1\nseeds: 2\nlr: 0.2\n"},
                                  r"duplicate key 'lr' at line 3 \(first at line 1"),
    "config duplicate json key": ([*V1, "--config", "{tmp}/c.json"], {}, {"c.json": '{"lr": 0.1, "lr": 0.2}'},
                                  r"duplicate key 'lr'"),
    "config yaml merge alias": ([*V1, "--config", "{tmp}/c.yaml"], {}, {"c.yaml": "base: &b {lr: 0.1}\n<<: *b\n"},
                                r"YAML alias \*b at line 2 is not allowed"),
    # a hang (100% CPU): billion laughs under a valid key, timed in the test below
    "config yaml alias bomb": (["visualize", *R20, "--steps", "2", "--config", "{tmp}/bomb.yaml"], {},
                               {"bomb.yaml": _alias_bomb()}, r"YAML alias \*l0 at line 2 is not allowed"),
    # tracebacks
    "device mps visualize": ([*V1, "--device", "mps"], {}, {}, r"--device 'mps' is not available .*; valid here: cpu"),
    "device mps check": (["check", *R20, *U, "--device", "mps"], {}, {}, r"--device 'mps' is not available .*valid here: cpu"),
    "device mps audit": (["audit", *R20, "--units", "linear:1", "--device", "mps"], {}, {},
                         r"--device 'mps' is not available .*valid here: cpu"),
    "device mps fool": (["fool", *R20, *S3, "--device", "mps"], {}, {}, r"--device 'mps' is not available .*valid here: cpu"),
    "steps beyond int64": ([*V1, "--steps", "99999999999999999999"], {}, {},
                           r"--steps must be in 1\.\.1000000, got 99999999999999999999"),
    "check steps beyond int64": (["check", *R20, *U, "--steps", "99999999999999999999"], {}, {},
                                 r"--steps must be in 1\.\.1000000, got 9999"),
    "n-other beyond int64": (["check", *R20, *U, "--n-other", "99999999999999999999"], {}, {},
                             r"--n-other must be in 1\.\.9223372036854775807, got 9999"),
    "seed beyond torch": ([*V1, "--seed", "99999999999999999999999"], {}, {},
                          r"--seed must be in 0\.\.9223372036854775807, got 99999999999999999999999"),
    "seed negative": (["audit", *R20, "--units", "linear:1", "--seed", "-1"], {}, {}, r"--seed must be in 0\.\.922"),
    "size 100000": ([*V1, "--size", "100000"], {}, {}, r"--size must be in 1\.\.4096, got 100000"),
    "seeds beyond memory": ([*V1, "--seeds", "100000000000"], {}, {},
                            r"--seeds 100000000000 for 1 unit\(s\) is too many: size 32x32 px is too large .* GiB available"),
    "param-opt not a number": ([*V1, "--param-opt", "decay_power=abc"], {}, {},
                               r"parametrization 'fft' option decay_power='abc' must be a finite number"),
    "param-opt inf": ([*V1, "--param-opt", "sd=Infinity"], {}, {}, r"parametrization 'fft' option sd=inf must be a finite"),
    "optimizer-opt torch refuses": ([*V1, "--optimizer", "sgd", "--optimizer-opt", "momentum=-5"], {}, {},
                                    r"optimizer 'sgd' refuses lr=0\.05, momentum=-5: Invalid momentum value: -5"),
    "optimizer-opt bool": ([*V1, "--optimizer", "sgd", "--optimizer-opt", "nesterov=1"], {}, {},
                           r"optimizer 'sgd' option nesterov=1 must be true or false"),
    "optimizer-opt pair": ([*V1, "--optimizer-opt", "betas=[0.9]"], {}, {},
                           r"optimizer 'adam' option betas=\[0\.9\] must be a list of 2 values, each a finite number"),
    "config null": (["visualize", *R20, *U, "--config", "{tmp}/c.json"], {}, {"c.json": '{"steps": null}'},
                    r"'steps' \(--steps\) must not be null; leave the key out for its default \(512\)"),
    "check fv pickle": (["check", *R20, *U, "--fv", "{tmp}/pk", *FLAT], {}, {"pk/fv.pt": "PICKLE", "pk/fv.json": "{fvjson}"},
                        r"--fv '.*pk': '.*fv\.pt' is not a tensor file fvsanity reads safely .*other objects than tensors"),
    "check fv garbage": (["check", *R20, *U, "--fv", "{tmp}/pk", *FLAT], {}, {"pk/fv.pt": "garbage", "pk/fv.json": "{fvjson}"},
                         r"--fv '.*pk': '.*fv\.pt' is not a tensor file fvsanity reads safely"),
    "check fv bad json": (["check", *R20, *U, "--fv", "{tmp}/pk", *FLAT], {}, {"pk/fv.pt": "FVPT", "pk/fv.json": "{nope"},
                          r"--fv '.*pk': fv\.json is not valid JSON \(line 1, column 2"),
    "audit fv pickle": (["audit", *R20, "--fv", "{tmp}/pk"], {}, {"pk/fv.pt": "PICKLE", "pk/fv.json": "{fvjson}"},
                        r"--fv '.*pk': '.*fv\.pt' is not a tensor file fvsanity reads safely"),
}


def _write_case_files(tmp_path, files, fvs):
    import argparse
    import shutil

    import torch

    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if text == "PICKLE":  # what torch.load(weights_only=True) refuses: an object other than tensors
            torch.save({"images": torch.zeros(1, 1, 3, 32, 32), "args": argparse.Namespace(steps=2)}, path)
        elif text == "FVPT":
            shutil.copy(fvs / "fv.pt", path)
        elif text == "{fvjson}":
            shutil.copy(fvs / "fv.json", path)
        else:
            path.write_text(text)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_bad_value_is_refused_before_work(case, finished_fvs, tmp_path, data_root, capsys, monkeypatch):
    """Exit 2, one line naming the value and the valid range or choices, and an --out holding
    finished FVs unchanged by md5 (nothing written, nothing overwritten with NaN FVs)."""
    import re
    import shutil

    import torch

    argv, env, files, expect = REFUSED[case]
    if hasattr(torch.backends, "mps"):  # the same answer on a machine with MPS
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    shutil.copytree(finished_fvs, out)
    _flat_images(tmp_path / "flat")
    _write_case_files(tmp_path, files, finished_fvs)
    before = _md5s(out)
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{flat}", str(tmp_path / "flat")).replace("{data}", str(data_root))
            for a in argv] + ["--out", str(out)]
    line = _one_error_line(capsys, argv)
    assert re.search(expect, line), line
    assert _md5s(out) == before


def test_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    """Billion laughs under a valid key spun at 100% CPU; refused in well under 2 s."""
    import time

    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(_alias_bomb())
    t0 = time.perf_counter()
    line = _one_error_line(capsys, ["visualize", *R20, "--config", str(cfg), "--out", str(tmp_path / "o")])
    assert time.perf_counter() - t0 < 2.0
    assert "YAML alias *l0 at line 2 is not allowed" in line
    assert not (tmp_path / "o").exists()


def test_layers_refuses_random_and_file_weights(data_root, capsys):
    line = _one_error_line(capsys, ["layers", "--random-weights", "--weights",
                                    str(data_root / "weights" / "cifar10_resnet20-12fca82f.th")])
    assert "--random-weights and --weights" in line and "conflict" in line


def test_valid_values_next_to_the_refused_ones_still_run(tmp_path, capsys):
    """The checks refuse only what is bad: YAML anchors without aliases, labels with a header and
    a file listed twice with one label, finite options of the right type."""
    from fvsanity.generate import RenderSettings
    from fvsanity.generate import param as P
    from fvsanity.settings import parse_options

    cfg = _cfg(tmp_path, "ok.yaml", "steps: &s 3\nlr: 0.1\n")
    from fvsanity.cli import read_config

    assert read_config(cfg) == {"steps": 3, "lr": 0.1}
    s = RenderSettings(steps=3, lr=0.1, diversity=0.5, optimizer="sgd", optimizer_options={"momentum": 0.5, "nesterov": True},
                       param_options=parse_options("--param-opt", ["decay_power=2"]), size=(16, 24))
    assert s.check_memory(4, (16, 24)) > 0
    P.check_options("maco", {"magnitude": str(tmp_path / "spec.pt"), "contrast": 2})
    from fvsanity.data import load_images
    from fvsanity.models import Preprocess

    root = _flat_images(tmp_path / "flat")
    (root / "labels.csv").write_text("filename,label\na.png,3\na.png,3\n# note\nb.png,1\n")
    nat = load_images(root, Preprocess(size=(8, 8), mean=(0.5,) * 3, std=(0.25,) * 3))
    assert nat.labels.tolist() == [3, 1, -1, -1]
