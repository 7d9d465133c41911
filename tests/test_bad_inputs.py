"""A bad-input corpus for image folders and unit strings, made by the tests:
every file is generated in tmp_path (no committed binaries). Each bad input is either decoded
correctly, counted and listed as unreadable with a warning, or refused with a one-line error;
never a traceback."""

from __future__ import annotations

import builtins
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fvsanity
from fvsanity.data import load_images
from fvsanity.errors import DataError, UnitError
from fvsanity.models import Preprocess
from fvsanity.units import parse_unit, parse_units

PRE = Preprocess(size=(8, 8), mean=(0.5,) * 3, std=(0.25,) * 3)
REPO = Path(fvsanity.__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the corpus
def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says ``width`` x ``height`` (8-bit gray) with a few bytes of pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def _good(root: Path, n: int = 3) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        out.append(root / f"good{i}.png")
        Image.new("RGB", (8, 8), (30 * i, 60, 90)).save(out[-1])
    return out


def _truncated_jpeg(path: Path) -> Path:
    g = np.random.default_rng(0)
    full = path.with_name("full_tmp.jpg")
    Image.fromarray(g.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full, quality=90)
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    full.unlink()
    return path


def _bad_files(root: Path) -> dict[str, str]:
    """Write every unreadable case into ``root``; {file name: expected reason fragment}."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty.jpg").write_bytes(b"")
    _truncated_jpeg(root / "truncated.jpg")
    (root / "text.jpg").write_text("this is a text file, not a JPEG\n")
    os.symlink("loop.jpg", root / "loop.jpg")  # a symlink to itself
    os.symlink("missing.png", root / "dangling.png")
    _png_header_only(root / "bomb.png", 20000, 20000)  # above PIL's error limit (2 x MAX_IMAGE_PIXELS)
    _png_header_only(root / "bomb_warn.png", 10000, 10000)  # between PIL's warning and error limits
    return {
        "empty.jpg": "UnidentifiedImageError",
        "truncated.jpg": "truncated",
        "text.jpg": "UnidentifiedImageError",
        "loop.jpg": "Too many levels of symbolic links",
        "dangling.png": "No such file",
        "bomb.png": "decompression bomb",
        "bomb_warn.png": "decompression bomb",
    }


def test_unreadable_files_are_counted_listed_and_never_decoded(tmp_path):
    root = tmp_path / "mixed"
    good = _good(root)
    expect = _bad_files(root)
    os.mkfifo(root / "pipe.jpg")  # not a regular file: ignored (opening it would block forever)
    (root / "folder.png").mkdir()  # a directory with an image name: ignored
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nat = load_images(root, PRE)
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and msgs[0].startswith(f"{len(expect)} unreadable image file(s) in {root} skipped")
    assert not any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught)
    assert nat.paths == tuple(str(p) for p in good)
    assert nat.n_unreadable == len(expect)  # loop.jpg and dangling.png were silently skipped before
    got = {Path(p).name: r for p, r in zip(nat.unreadable, nat.unreadable_reasons)}
    assert set(got) == set(expect)
    for name, fragment in expect.items():
        assert fragment in got[name], (name, got[name])
    d = nat.to_json()
    assert d["n_unreadable"] == len(expect) and len(d["unreadable_reasons"]) == len(expect)
    x = torch.cat(list(nat.batches(2)))
    assert x.shape == (3, 3, 8, 8)
    assert torch.allclose(x[2, :, 0, 0], torch.tensor([60, 60, 90]) / 255.0, atol=1e-6)


def test_decompression_bomb_is_refused_at_pils_warning_limit(tmp_path):
    """Image.open itself only warns between MAX_IMAGE_PIXELS and twice that, and then decodes."""
    path = _png_header_only(tmp_path / "bomb_warn.png", 10000, 10000)
    assert 10000 * 10000 > Image.MAX_IMAGE_PIXELS and 10000 * 10000 < 2 * Image.MAX_IMAGE_PIXELS
    with pytest.warns(Image.DecompressionBombWarning):
        Image.open(path).close()
    with pytest.raises(Image.DecompressionBombError):
        Image.open(_png_header_only(tmp_path / "bomb.png", 20000, 20000))
    _good(tmp_path)
    with pytest.warns(UserWarning, match="2 unreadable .*decompression bomb refused"):
        nat = load_images(tmp_path, PRE)
    assert nat.n_unreadable == 2 and len(nat) == 3


def test_unreadable_file_permission_denied(tmp_path, monkeypatch):
    """chmod 000 only bites a non-root user (tests here run as root, where it is skipped); the same
    failure is also simulated for root by making open() raise PermissionError for that file."""
    _good(tmp_path)
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(secret)
    if os.geteuid() != 0:
        secret.chmod(0)
        try:
            with pytest.warns(UserWarning, match="1 unreadable"):
                nat = load_images(tmp_path, PRE)
            assert [Path(p).name for p in nat.unreadable] == ["secret.png"]
            assert "Permission denied" in nat.unreadable_reasons[0]
        finally:
            secret.chmod(0o644)
    real_open = builtins.open

    def deny(file, *a, **k):
        if str(file) == str(secret):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", deny)
    with pytest.warns(UserWarning, match="1 unreadable .*secret.png: PermissionError"):
        nat = load_images(tmp_path, PRE)
    assert [Path(p).name for p in nat.unreadable] == ["secret.png"] and len(nat) == 3


def _decoded(tmp_path, name, make):
    """Write one odd-mode image (8x8, the PRE size: no resampling) beside good ones; decode it."""
    root = tmp_path / name.split(".")[0]
    _good(root)
    make(root / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decoded without any warning
        nat = load_images(root, PRE)
    assert nat.n_unreadable == 0 and len(nat) == 4
    x = nat.decode([nat.paths.index(str(root / name))])[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    return x


def test_png_with_alpha_keeps_the_stored_colour(tmp_path):
    def make(p):
        a = np.zeros((8, 8, 4), dtype=np.uint8)
        a[:, :4] = (255, 0, 0, 0)  # fully transparent red
        a[:, 4:] = (0, 0, 255, 128)  # half transparent blue
        Image.fromarray(a, "RGBA").save(p)

    x = _decoded(tmp_path, "alpha.png", make)
    assert torch.equal(x[:, :, :4], torch.tensor([1.0, 0, 0]).view(3, 1, 1).expand(3, 8, 4))
    assert torch.equal(x[:, :, 4:], torch.tensor([0, 0, 1.0]).view(3, 1, 1).expand(3, 8, 4))


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    vals = np.array([0, 257 * 64, 257 * 128, 65535], dtype=np.uint16)

    def make(p):
        Image.fromarray(np.repeat(vals, 2)[None, :].repeat(8, 0).astype(np.uint16)).save(p)
        assert Image.open(p).mode == "I;16"

    x = _decoded(tmp_path, "deep.png", make)
    # PIL's own I;16 -> RGB conversion clips everything above 255: all but the first column white
    want = torch.tensor([0, 64, 128, 255], dtype=torch.float32).repeat_interleave(2) / 255
    assert torch.allclose(x, want.view(1, 1, 8).expand(3, 8, 8), atol=1e-6)


def test_palette_png_with_and_without_transparency(tmp_path):
    def make(p, transparent=False):
        im = Image.new("P", (8, 8), 0)
        im.putpalette([10, 200, 30, 250, 5, 100] + [0] * 762)
        im.paste(1, (0, 0, 8, 4))
        if transparent:
            im.info["transparency"] = bytes([255, 0] + [255] * 254)
            im.save(p, transparency=im.info["transparency"])
        else:
            im.save(p)

    want = torch.empty(3, 8, 8)
    want[:, :4] = torch.tensor([250, 5, 100]).view(3, 1, 1) / 255
    want[:, 4:] = torch.tensor([10, 200, 30]).view(3, 1, 1) / 255
    assert torch.allclose(_decoded(tmp_path, "pal.png", make), want, atol=1e-6)
    assert torch.allclose(_decoded(tmp_path, "palt.png", lambda p: make(p, True)), want, atol=1e-6)


def test_grayscale_and_gray_alpha(tmp_path):
    x = _decoded(tmp_path, "gray.png", lambda p: Image.new("L", (8, 8), 77).save(p))
    assert torch.allclose(x, torch.full((3, 8, 8), 77 / 255), atol=1e-6)
    x = _decoded(tmp_path, "grayalpha.png", lambda p: Image.new("LA", (8, 8), (200, 10)).save(p))
    assert torch.allclose(x, torch.full((3, 8, 8), 200 / 255), atol=1e-6)
    x = _decoded(tmp_path, "bilevel.png", lambda p: Image.new("1", (8, 8), 1).save(p))
    assert torch.allclose(x, torch.ones(3, 8, 8))


def test_cmyk_jpeg(tmp_path):
    def make(p):
        Image.new("RGB", (8, 8), (200, 50, 30)).convert("CMYK").save(p, quality=100)
        assert Image.open(p).mode == "CMYK"

    x = _decoded(tmp_path, "cmyk.jpg", make)
    assert torch.allclose(x, (torch.tensor([200, 50, 30]) / 255).view(3, 1, 1).expand(3, 8, 8), atol=3 / 255)


def test_all_bad_and_empty_folders_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad"
    n = len(_bad_files(bad))
    with pytest.raises(DataError) as e:
        load_images(bad, PRE)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"no readable image in {str(bad)!r}: all {n} image files failed")
    assert "(first: " in msg
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "README.txt").write_text("no images here")
    with pytest.raises(DataError, match="no image files") as e:
        load_images(empty, PRE)
    assert "\n" not in str(e.value)


def test_cli_check_on_an_all_bad_folder_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad"
    _bad_files(bad)
    env = {**os.environ, "FVSANITY_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "fvsanity.cli", "check", "--model", "cifar10-resnet20", "--random-weights",
         "--unit", "linear:1", "--images", str(bad), "--out", str(tmp_path / "out"), "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"fvsanity: error: no readable image in {str(bad)!r}")
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- unit strings
@pytest.fixture(scope="module")
def resnet():
    from fvsanity.models import load_model

    return load_model("cifar10-resnet20", pretrained=False)


BAD_UNITS = [
    (" linear : 3 ", r"bad unit 'linear : 3'; expected LAYER:CHANNEL .*\(no spaces inside a unit spec: write 'linear:3'\)"),
    ("linear:-1", r"channel -1 out of range for 'linear': valid 0\.\.9"),
    (f"linear:{10**30}", r"channel 100000000\.\.\. \(31 digits\) out of range for 'linear': valid 0\.\.9"),
    ("linear:" + "7" * 5000, r"bad unit 'linear:7777.*\(5007 chars\); expected .*\(a number with 5000 digits\)"),
    ("lïnear:3", r"unknown layer 'lïnear'; closest valid layers: linear"),
    ("", r"empty unit spec"),
    ("   ", r"empty unit spec"),
    ("linear:", r"bad unit 'linear:'; expected .*\(missing the channel after ':'\)"),
    (":3", r"bad unit ':3'; expected .*\(missing the layer name before ':'\)"),
    ("linear", r"bad unit 'linear'; expected .*\(missing ':CHANNEL'\)"),
    ("linear:x", r"bad unit 'linear:x'; expected .*\(channel 'x' is not a whole number\)"),
    ("linear:３", r"bad unit 'linear:３'; expected .*\(channel '３' is not a whole number\)"),
    ("linear:3@1", r"bad unit 'linear:3@1'; expected .*\(position '@1' must be @Y,X"),
    ("linear:3@-1,0", r"layer 'linear' has no spatial dims \(shape \(10,\)\); drop the @y,x"),
    ("layer3.2:3@-1,0", r"position @-1,0 out of range for 'layer3\.2': valid y 0\.\.7, x 0\.\.7"),
    ("layer3.2:1,,linear:2", r"empty unit in 'layer3\.2:1,,linear:2' \(a doubled, leading or trailing comma\)"),
]


@pytest.mark.parametrize("spec,message", BAD_UNITS, ids=[repr(s[:20]) for s, _ in BAD_UNITS])
def test_bad_unit_strings_are_one_line_errors(resnet, spec, message):
    with pytest.raises(UnitError, match=message) as e:
        parse_units(spec, resnet)
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


def test_spaces_around_a_unit_are_forgiven(resnet):
    assert str(parse_unit("  layer3.2:5 ", resnet)) == "layer3.2:5"
    assert [str(u) for u in parse_units(" linear:1, layer3.2:4@1,2 ", resnet)] == ["linear:1", "layer3.2:4@1,2"]


@pytest.mark.parametrize("spec", ["linear : 3", "linear:-1", f"linear:{10**30}", "lïnear:3", "", "linear:", ":3",
                                  "linear:3@1", "linear:3@-1,0"])
def test_cli_bad_unit_exits_2_with_one_line(tmp_path, capsys, resnet, spec):
    from fvsanity.cli import main

    with pytest.raises(UnitError) as e:
        parse_units([spec], resnet)
    capsys.readouterr()
    rc = main(["check", "--model", "cifar10-resnet20", "--random-weights", f"--unit={spec}",
               "--images", str(tmp_path), "--out", str(tmp_path / "out"), "--no-progress"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and err == [f"fvsanity: error: {e.value}"]


# ----------------------------------------------------------------------------- settings, labels, configs
BAD_RENDER_SETTINGS = [
    ({"lr": float("inf")}, r"^lr must be a finite number > 0, got inf$"),
    ({"lr": float("nan")}, r"^lr must be a finite number > 0, got nan$"),
    ({"lr": 0}, r"^lr must be > 0, got 0$"),
    ({"diversity": float("nan")}, r"^diversity must be a finite number >= 0, got nan$"),
    ({"diversity": -1.0}, r"^diversity must be >= 0, got -1\.0$"),
    ({"steps": 0}, r"^steps must be in 1\.\.1000000, got 0$"),
    ({"steps": 10**20}, r"^steps must be in 1\.\.1000000, got 100000000000000000000$"),
    ({"steps": 2.5}, r"^steps must be an integer in 1\.\.1000000, got 2\.5$"),
    ({"size": 100000}, r"^size must be in 1\.\.4096, got 100000$"),
    ({"size": (32, 0)}, r"^size must be in 1\.\.4096, got 0$"),
    ({"batch_size": 0}, r"^batch_size must be >= 1, got 0$"),
    ({"checkpoints": (0,)}, r"^checkpoints must be >= 1, got 0$"),
    ({"transforms": "fancy"}, r"^unknown transforms 'fancy'; valid: standard, lucent, none"),
    ({"amp": "on"}, r"^amp must be None \(automatic\), True or False, got 'on'$"),
    ({"param_options": {"decay_power": "abc"}}, r"^parametrization 'fft' option decay_power='abc' must be a finite number$"),
    ({"optimizer": "sgd", "optimizer_options": {"momentum": -5}}, r"^optimizer 'sgd' refuses lr=0\.05, momentum=-5: "),
    ({"optimizer_options": {"eps": "tiny"}}, r"^optimizer 'adam' option eps='tiny' must be a finite number$"),
]


@pytest.mark.parametrize("kw,message", BAD_RENDER_SETTINGS, ids=[str(k) for k, _ in BAD_RENDER_SETTINGS])
def test_render_settings_refuse_bad_values_when_made(kw, message):
    from fvsanity.errors import FVSanityError
    from fvsanity.generate import RenderSettings

    with pytest.raises(FVSanityError, match=message):
        RenderSettings(**kw)
    with pytest.raises(FVSanityError, match=message):
        RenderSettings().replace(**kw)  # and through render(**overrides)


def test_render_settings_memory_estimate_refuses_what_does_not_fit():
    from fvsanity.errors import SettingError
    from fvsanity.generate import RenderSettings

    s = RenderSettings(steps=10)
    # results of 2 FVs + one batch of the fixed FV compute width (8 on the CPU) x 8 canvases
    assert s.check_memory(2, (32, 32), available=10**9) == 2 * 12288 + 2 * 40 + 8 * 12288 * 8
    with pytest.raises(SettingError, match=r"^size 4096x4096 px is too large for 100 FV\(s\) x 1 image\(s\) each: "
                                           r"about 30\.8 GiB of memory needed, 1\.0 GiB available"):
        s.check_memory(100, (4096, 4096), available=2**30)


BAD_LABELS = [
    ("a.png,1\nb.png,2\na.png,3\n", r"line 3: 'a\.png' labelled '3' but '1' at line 1; give each file one label"),
    ("", r"has no 'filename,label' rows"),
    ("filename,label\n# nothing yet\n", r"has no 'filename,label' rows"),
    ("a.png,1\ngone.png,2\nalso-gone.png,2\n", r"line 2: 'gone\.png' is not an image file in '.*' \(and 1 more listed files\)"),
    ("a.png,1,dog\n", r"line 1: expected 2 columns 'filename,label', got 3 \(extra column\)"),
    ("a.png\n", r"line 1: expected 2 columns 'filename,label', got 1 \(one column\)"),
    ("a.png,\n", r"line 1: empty label in \['a\.png', ''\]"),
]


@pytest.mark.parametrize("text,message", BAD_LABELS, ids=[t[:18] or "empty" for t, _ in BAD_LABELS])
def test_labels_file_is_refused_naming_file_and_row(tmp_path, text, message):
    root = tmp_path / "flat"
    _good(root, 2)
    (root / "a.png").write_bytes((root / "good0.png").read_bytes())
    (root / "labels.csv").write_text(text)
    with pytest.raises(DataError, match=rf"^labels file '{root}/labels\.csv'[: ].*{message}") as e:
        load_images(root, PRE)
    assert "\n" not in str(e.value)


def test_yaml_config_refuses_aliases_and_duplicate_keys_at_once(tmp_path):
    import time

    from fvsanity.cli import ConfigError, read_config

    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nunit: [" + ", ".join(["*l8"] * 9) + "]\n")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"YAML alias \*l0 at line 2 is not allowed in a config"):
        read_config(bomb)
    assert time.perf_counter() - t0 < 2.0
    dup = tmp_path / "dup.yml"
    dup.write_text("steps: 2\nnested: {a: 1, a: 2}\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'a' at line 2 \(first at line 2"):
        read_config(dup)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ConfigError, match="nested too deeply|invalid JSON"):
        read_config(deep)


def test_plugin_options_are_checked_against_the_signature_types():
    from fvsanity.errors import FVSanityError
    from fvsanity.registry import check_option_types

    def plugin(size, seeds, device, *, level: float = 0.0, n: int = 2, on: bool = False, pair: tuple[int, int] = (1, 2),
               path: str | Path | None = None, free=None, scale=1.0):
        raise AssertionError("never called")

    check_option_types(plugin, {"level": 1, "n": 3, "on": True, "pair": [3, 4], "path": "x.pt", "free": object(),
                                "scale": 2}, what="toy")
    for opts, message in [({"level": "abc"}, r"level='abc' must be a finite number"),
                          ({"n": 2.5}, r"n=2\.5 must be an integer"), ({"on": 1}, r"on=1 must be true or false"),
                          ({"pair": [1, 2, 3]}, r"pair=\[1, 2, 3\] must be a list of 2 values, each an integer"),
                          ({"path": 3}, r"path=3 must be a string or a path or null"),
                          ({"scale": float("nan")}, r"scale=nan must be a finite number")]:
        with pytest.raises(FVSanityError, match=rf"^toy option {message}$"):
            check_option_types(plugin, opts, what="toy")
