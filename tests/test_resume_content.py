"""A resumed audit and the natural-pass cache are keyed on the images' content, not their names:
pictures replaced in place (same names, sizes and modification times) are refused, never reused."""

from __future__ import annotations

import os
import shutil

import pytest

from fvsanity.cache import image_set_identity
from fvsanity.data import load_images


def _copy_images(src, dst, names=("cat", "dog"), per_class: int = 4):
    """Copy a few CIFAR cats and dogs into ``dst/<names[0]>`` and ``dst/<names[1]>``."""
    for cls, name in zip(("cat", "dog"), names):
        (dst / name).mkdir(parents=True)
        for f in sorted((src / cls).iterdir())[:per_class]:
            shutil.copy2(f, dst / name / f.name)
    return dst


TINY = ("class0", "class1")  # the tiny model's class names


def _swap_in_place(a, b):
    """Exchange the bytes of files a and b, keeping each file's size-independent name and mtime."""
    sa, sb = os.stat(a), os.stat(b)
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    os.utime(a, ns=(sa.st_atime_ns, sa.st_mtime_ns))
    os.utime(b, ns=(sb.st_atime_ns, sb.st_mtime_ns))


def test_image_identity_follows_content(tmp_path, data_root):
    from fvsanity.testing import tiny_model

    lm = tiny_model(size=32)
    root = _copy_images(data_root / "cifar10-test", tmp_path / "imgs", TINY)
    before = image_set_identity(load_images(root, lm))
    assert image_set_identity(load_images(root, lm)) == before  # deterministic
    cats = sorted((root / "class0").iterdir())
    _swap_in_place(cats[0], cats[1])
    assert image_set_identity(load_images(root, lm)) != before


def test_audit_resume_refuses_images_changed_in_place(tmp_path, data_root, capsys):
    from fvsanity import cli

    root = _copy_images(data_root / "cifar10-test", tmp_path / "imgs")
    out = tmp_path / "audit"
    args = ["audit", "--model", "cifar10-resnet20", "--units", "linear:3", "--images", str(root), "--steps", "2",
            "--seeds", "2", "--top-k", "2", "--n-other", "3", "--n-boot", "5", "--n-perm", "5", "--no-progress",
            "--device", "cpu", "--out", str(out)]
    assert cli.main(args) == 0
    unit_json = next((out / "units").glob("*/unit.json")).read_bytes()
    cats = sorted((root / "cat").iterdir())
    _swap_in_place(cats[0], cats[-1])
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other images" in err[0], err
    assert next((out / "units").glob("*/unit.json")).read_bytes() == unit_json  # nothing overwritten


@pytest.mark.parametrize("change", ["content", "labels"])
def test_natural_pass_cache_recomputes_for_changed_images(tmp_path, data_root, change):
    from fvsanity.compare.pipeline import natural_pass
    from fvsanity.testing import tiny_model

    lm = tiny_model(size=32)
    root = _copy_images(data_root / "cifar10-test", tmp_path / "imgs", TINY)
    first = natural_pass(lm, load_images(root, lm), ["relu1"], cache_dir=tmp_path / "cache")
    assert not first.reused
    assert natural_pass(lm, load_images(root, lm), ["relu1"], cache_dir=tmp_path / "cache").reused
    if change == "content":
        cats = sorted((root / "class0").iterdir())
        _swap_in_place(cats[0], cats[1])
    else:  # the same files under swapped class folders: other labels
        (root / "class0").rename(root / "tmp")
        (root / "class1").rename(root / "class0")
        (root / "tmp").rename(root / "class1")
    again = natural_pass(lm, load_images(root, lm), ["relu1"], cache_dir=tmp_path / "cache")
    assert not again.reused
