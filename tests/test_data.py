"""fvsanity.data: folder layouts, labels, unreadable files, subsampling, streaming."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image

from fvsanity.data import from_tensor, imagenet_wnids, load_images
from fvsanity.errors import DataError, FVSanityError
from fvsanity.models import Preprocess

PRE = Preprocess(size=(8, 8), mean=(0.5,) * 3, std=(0.25,) * 3)
NAMES = ("cat", "dog", "eel")  # the label space of the class-folder tests (a bare Preprocess has none)


def _img(path, color, size=(10, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _classes(tmp_path, names=("cat", "dog", "eel"), per=4):
    root = tmp_path / "cls"
    for c, name in enumerate(names):
        for i in range(per):
            _img(root / name / f"{i:03d}.png", (40 * c, 10 * i, 200))
    return root


def test_class_folders_labels_and_decoding(tmp_path):
    root = _classes(tmp_path)
    nat = load_images(root, PRE, class_names=NAMES)
    assert nat.layout == "classes"
    assert len(nat) == 12 and nat.class_names == ("cat", "dog", "eel")
    assert nat.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert nat.to_json()["labels_from"] == "class names matched to the given class_names"
    x = nat.decode([0, 5])
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    # decoded with the preprocess' load_pil: the solid colour, in [0, 1]
    assert torch.allclose(x[1, :, 0, 0], torch.tensor([40, 10, 200]) / 255.0, atol=1 / 255)
    assert nat.n_unreadable == 0
    assert nat.to_json()["n_classes_present"] == 3


def test_streaming_batches_cover_everything_in_order(tmp_path):
    nat = load_images(_classes(tmp_path), PRE, class_names=NAMES)
    batches = list(nat.batches(5))
    assert [b.shape[0] for b in batches] == [5, 5, 2]
    assert nat.images is None  # nothing was kept in memory
    full = nat.load()
    assert full.images.shape == (12, 3, 8, 8)
    assert torch.equal(torch.cat(batches), full.images)
    assert torch.equal(torch.cat(list(full.batches(7))), full.images)


def test_corrupt_files_are_counted_not_fatal(tmp_path):
    root = _classes(tmp_path)
    (root / "dog" / "bad.jpg").write_bytes(b"not an image at all")
    good = root / "cat" / "000.png"
    (root / "cat" / "trunc.png").write_bytes(good.read_bytes()[:40])  # truncated PNG
    with pytest.warns(UserWarning, match="2 unreadable"):
        nat = load_images(root, PRE, class_names=NAMES)
    assert len(nat) == 12 and nat.n_unreadable == 2
    assert sorted(p.split("/")[-1] for p in nat.unreadable) == ["bad.jpg", "trunc.png"]
    assert nat.to_json()["n_unreadable"] == 2
    assert len(list(nat.batches(64))) == 1  # decoding the kept files does not raise


def test_empty_and_all_bad_folders_raise_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no image files") as e:
        load_images(empty, PRE)
    assert "\n" not in str(e.value) and str(empty) in str(e.value)
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.jpg").write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="all 3 image files failed") as e:
            load_images(bad, PRE)
    assert "\n" not in str(e.value) and str(bad) in str(e.value)
    with pytest.raises(FVSanityError, match="not found"):
        load_images(tmp_path / "nope", PRE)
    with pytest.raises(DataError, match="unknown layout"):
        load_images(bad, PRE, layout="weird")


def test_flat_folder_with_and_without_labels(tmp_path):
    root = tmp_path / "flat"
    for i in range(6):
        _img(root / f"img{i}.png", (i * 30, 0, 0))
    nat = load_images(root, PRE)
    assert nat.layout == "flat" and (nat.labels == -1).all()
    csv = tmp_path / "labels.csv"
    csv.write_text("filename,label\nimg0.png,dog\nimg1.png,cat\nimg2.png,dog\n")
    nat = load_images(root, PRE, labels=csv, class_names=["cat", "dog"])
    assert nat.class_names == ("cat", "dog")
    assert nat.labels.tolist() == [1, 0, 1, -1, -1, -1]
    (root / "labels.csv").write_text("img3.png,2\nimg4.png,0\n")  # auto-detected, integer labels
    nat = load_images(root, PRE)
    assert nat.labels.tolist() == [-1, -1, -1, 2, 0, -1]
    with pytest.raises(DataError, match="label 'dog' is not a class of the given class_names"):
        load_images(root, PRE, labels=csv, class_names=["cat", "bird"])


def test_imagenet_samples_layout_uses_imagenet_indices(tmp_path):
    wn = imagenet_wnids()
    root = tmp_path / "inet"
    # three classes only: labels must still be their ImageNet-1k indices (0, 1, 999)
    for i, name in ((0, "tench"), (999, "toilet_tissue"), (1, "goldfish")):
        _img(root / f"{wn[i]}_{name}.JPEG", (i % 255, 0, 0))
    nat = load_images(root, PRE)
    assert len(wn) == 1000  # timm (a dependency) ships the ImageNet-1k wnid list
    assert nat.layout == "imagenet-samples"
    assert sorted(nat.labels.tolist()) == [0, 1, 999]
    assert nat.class_names[999] == "toilet_tissue"
    # non-ImageNet wnids: no class index can be verified without a model: unlabelled, with a warning
    # (formerly they got their position among the folder's sorted wnids)
    other = tmp_path / "other"
    for w in ("n99999992", "n99999991"):
        _img(other / f"{w}_thing.jpg", (0, 0, 0))
    with pytest.warns(UserWarning, match="labels need the model's class names"):
        nat = load_images(other, PRE)
    assert nat.layout == "imagenet-samples" and nat.labels.tolist() == [-1, -1]


def test_imagenet_synset_folders_use_imagenet_indices(tmp_path):
    wn = imagenet_wnids()
    if not wn:
        pytest.skip("timm's ImageNet synset list not available")
    root = tmp_path / "val"
    for i in (5, 500):
        _img(root / wn[i] / "a.JPEG", (0, 0, 0))
    nat = load_images(root, PRE)
    assert nat.labels.tolist() == [5, 500]


def test_subsampling_is_deterministic_by_seed(tmp_path):
    root = _classes(tmp_path, per=6)
    a = load_images(root, PRE, max_per_class=2, seed=3, class_names=NAMES)
    b = load_images(root, PRE, max_per_class=2, seed=3, class_names=NAMES)
    c = load_images(root, PRE, max_per_class=2, seed=4, class_names=NAMES)
    assert a.paths == b.paths and len(a) == 6
    assert torch.bincount(a.labels).tolist() == [2, 2, 2]
    assert a.paths != c.paths  # another seed, another draw (6 choose 2 per class: collision unlikely)
    d = load_images(root, PRE, limit=5, seed=1, class_names=NAMES)
    assert len(d) == 5 and d.paths == load_images(root, PRE, limit=5, seed=1, class_names=NAMES).paths
    assert list(d.paths) == sorted(d.paths)  # kept in folder order
    with pytest.raises(DataError, match="max_per_class"):
        load_images(root, PRE, max_per_class=0, class_names=NAMES)


def test_from_tensor_and_subset():
    x = torch.rand(5, 3, 4, 4)
    nat = from_tensor(x, [0, 1, 0, 1, 2])
    sub = nat.subset([4, 0])
    assert torch.equal(sub.images, x[[4, 0]]) and sub.labels.tolist() == [2, 0]
    assert nat.indices_of_class(1).tolist() == [1, 3]
    with pytest.raises(DataError):
        from_tensor(torch.rand(3, 4, 4))


def test_real_cifar_folder(data_root):
    from fvsanity.models import load_model

    nat = load_images(data_root / "cifar10-test", load_model("cifar10-resnet20", pretrained=False), max_per_class=3)
    assert nat.layout == "classes" and len(nat) == 30
    assert nat.class_names[0] == "airplane" and nat.class_names[9] == "truck"
    assert next(nat.batches(4)).shape == (4, 3, 32, 32)


def test_real_imagenet_samples(imagenet_root):
    from fvsanity.models.preprocess import CAFFE_SQUEEZENET

    nat = load_images(imagenet_root / "imagenet-samples", CAFFE_SQUEEZENET, limit=20, seed=0)
    assert nat.layout == "imagenet-samples" and len(nat) == 20
    full = load_images(imagenet_root / "imagenet-samples", CAFFE_SQUEEZENET, verify=False)
    assert len(full) == 1000 and sorted(full.labels.tolist()) == list(range(1000))
    i = full.paths.index(str(imagenet_root / "imagenet-samples" / "n01440764_tench.JPEG"))
    assert full.labels[i] == 0
