"""Bad input to ``fvsanity audit`` as a new user would try it: one line on stderr, exit != 0,
and nothing already written is lost. In-process through ``fvsanity.cli.main``."""

from __future__ import annotations

import json

import pytest

from fvsanity import audit as A
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
        ([*TOY, "--units", "fc:1", "--steps", "0"], r"--steps must be >= 1, got 0"),
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
    for c in ("cat", "dog"):
        (bad / c).mkdir(parents=True)
        for i in range(3):
            (bad / c / f"{i}.jpg").write_bytes(b"\xff\xd8 this is not a jpeg " + bytes([i]) * 50)
    line = _run_error(capsys, ["audit", *TOY, "--units", "fc:1", "--images", str(bad), "--out", str(out), *FAST])
    assert "no readable image" in line and "6 image files failed to decode" in line
    assert _snapshot(out) == snap


def test_missing_weights_offline(tmp_path, monkeypatch, previous, images, capsys):
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
    # 2 FVs vs 25 other images: a design that can reach significance (no power warning on stderr)
    argv = ["audit", *TOY, "--units", "fc:1,fc:2,block4:3", "--images", str(images), "--out", str(out), *FAST,
            "--seeds", "2", "--n-other", "25"]
    real = A._unit_step
    calls = []

    def step_then_ctrl_c(ctx, i, *a):
        if calls:
            raise KeyboardInterrupt
        calls.append(i)
        return real(ctx, i, *a)

    monkeypatch.setattr(A, "_unit_step", step_then_ctrl_c)
    line = _run_error(capsys, argv, code=130)
    assert "interrupted" in line and "run again to resume" in line
    done = [p.name for p in (out / "units").iterdir() if not p.name.startswith(".")]
    assert done == ["fc_c1"]
    first = _snapshot(out / "units" / "fc_c1")

    monkeypatch.setattr(A, "_unit_step", real)
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
    (["visualize", *R20, "--steps", "-1", *U], r"--steps must be >= 1, got -1"),
    (["visualize", *R20, "--seeds", "0", *U], r"--seeds must be >= 1, got 0"),
    (["visualize", *R20, "--size", "0", *U], r"--size must be >= 1, got 0"),
    (["visualize", *R20, "--lr", "-1", *U], r"--lr must be > 0, got -1.0"),
    (["visualize", *R20, "--batch-size", "0", *U], r"--batch-size must be >= 1, got 0"),
    (["visualize", *R20, "--checkpoints", "abc", *U], r"--checkpoints must be comma-separated step numbers, got 'abc'"),
    (["visualize", *R20, "--checkpoints", "-3", *U], r"--checkpoints -3 out of range; valid: 1\.\.512"),
    (["visualize", *R20, "--out", "{file}/out", *U], r"is not writable"),
    (["visualize", *R20, "--unit", "linear:99"], r"channel 99 out of range for 'linear': valid 0\.\.9"),
    (["visualize", *R20, "--unit", "bogus"], r"bad unit 'bogus'; expected LAYER:CHANNEL"),
    (["visualize", *R20, "--param", "png", *U], r"visualize: argument --param: invalid choice: 'png'"),
    (["visualize", *R20], r"visualize: the following arguments are required: --unit"),
    (["visualize", *R20, "--steps", "many", *U], r"visualize: argument --steps: invalid int value: 'many'"),
    # check
    (["check", "--model", "nope", *U], r"unknown model 'nope'"),
    (["check", *R20, "--steps", "-1", *U], r"--steps must be >= 1, got -1"),
    (["check", *R20, "--seeds", "0", *U], r"--seeds must be >= 1, got 0"),
    (["check", *R20, "--alpha", "2", *U], r"--alpha must be in \(0, 1\), got 2\.0"),
    (["check", *R20, "--n-perm", "0", *U], r"--n-perm must be >= 1, got 0"),
    (["check", *R20, "--n-boot", "-1", *U], r"--n-boot must be >= 0, got -1"),
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
    (["fool", *R20, "--fv-size", "0", *S3], r"--fv-size must be >= 1, got 0"),
    (["fool", *R20, "--k", "-1", *S3], r"--k must be > 0, got -1\.0"),
    (["fool", *R20, "--margin-sd", "-1", *S3], r"--margin-sd must be >= 0, got -1\.0"),
    (["fool", *R20, "--out", "{file}/out", *S3], r"is not writable"),
    (["fool", *R20, "--train-images", "{tmp}/nope", *S3], r"image folder not found"),
    (["fool", *R20, "--method", "magic"], r"fool: argument --method: invalid choice: 'magic'"),
    # audit
    (["audit", "--model", "nope", "--units", "linear:1"], r"unknown model 'nope'"),
    (["audit", *R20, "--steps", "-1", "--units", "linear:1"], r"--steps must be >= 1, got -1"),
    (["audit", *R20, "--seeds", "0", "--units", "linear:1"], r"--seeds must be >= 1, got 0"),
    (["audit", *R20, "--size", "0", "--units", "linear:1"], r"--size must be >= 1, got 0"),
    (["audit", *R20, "--alpha", "2", "--units", "linear:1"], r"--alpha must be in \(0, 1\), got 2\.0"),
    (["audit", *R20, "--n-perm", "0", "--units", "linear:1"], r"--n-perm must be >= 1, got 0"),
    (["audit", *R20, "--n-boot", "-1", "--units", "linear:1"], r"--n-boot must be >= 0, got -1"),
    (["audit", *R20, "--n-other", "0", "--units", "linear:1"], r"--n-other must be >= 1, got 0"),
    (["audit", *R20, "--out", "{file}/out", "--units", "linear:1"], r"is not writable"),
    (["audit", *R20, "--images", "{tmp}/nope", "--units", "linear:1"], r"image folder not found"),
    (["audit", *R20, "--units", "linear:x"], r"bad unit 'linear:x'"),
    # demo
    (["demo", "--steps", "-1"], r"--steps must be >= 1, got -1"),
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
