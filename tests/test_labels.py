"""Labels through the model: folder and CSV class names are matched to the
model's ``class_names`` (WordNet lemmas for ImageNet-1k), never labelled by folder position."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
from PIL import Image

from fvsanity.data import imagenet_lemmas, imagenet_wnids, load_images, normalize_class_name
from fvsanity.errors import DataError
from fvsanity.testing import tiny_model


def _img(path, color=(10, 20, 30), size=(6, 5)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _folders(root, names, per=2):
    for k, name in enumerate(names):
        for i in range(per):
            _img(root / name / f"{i}.png", (20 * k, 10 * i, 50))
    return root


@pytest.fixture(scope="module")
def squeeze():
    """imagenet-squeezenet with random weights: the real 1000 ImageNet class names, no weight file."""
    from fvsanity.models import load_model

    lm = load_model("imagenet-squeezenet", pretrained=False)
    assert len(lm.class_names) == 1000
    return lm


@pytest.fixture(scope="module")
def cifar():
    from fvsanity.models import load_model

    return load_model("cifar10-resnet20", pretrained=False)


def test_imagenet_class_name_folders_get_the_models_indices(tmp_path, squeeze):
    from torchvision.models import SqueezeNet1_0_Weights

    cats = SqueezeNet1_0_Weights.IMAGENET1K_V1.meta["categories"]
    want = {"beagle": cats.index("beagle"), "koala": cats.index("koala"), "tractor": cats.index("tractor")}
    assert want == {"beagle": 162, "koala": 105, "tractor": 866}  # torchvision's category list
    nat = load_images(_folders(tmp_path / "imgs", ["beagle", "koala", "tractor"]), squeeze)
    # formerly: 0, 0, 1, 1, 2, 2 (position among the sorted folder names)
    assert nat.labels.tolist() == [162, 162, 105, 105, 866, 866]
    assert nat.indices_of_class(162).tolist() == [0, 1]
    assert nat.class_names == tuple(squeeze.class_names) and nat.class_names[162] == "beagle"
    d = nat.to_json()
    assert d["labels_from"] == "class names matched to the model's classes"
    assert d["n_names_matched"] == 3 and d["names_matched"] == {"beagle": 162, "koala": 105, "tractor": 866}


def test_wordnet_lemmas_and_spelling_variants_map(tmp_path, squeeze):
    assert imagenet_lemmas()[0] == ("tench", "Tinca tinca")
    assert normalize_class_name("Great_White-Shark") == normalize_class_name("great white shark")
    names = ["Tinca_tinca", "great-white-shark", "White Shark", "KOALA", "Carcharodon carcharias"]
    nat = load_images(_folders(tmp_path / "imgs", names, per=1), squeeze)
    got = dict(zip((p.split("/")[-2] for p in nat.paths), nat.labels.tolist()))
    assert got == {"Tinca_tinca": 0, "great-white-shark": 2, "White Shark": 2, "KOALA": 105, "Carcharodon carcharias": 2}
    # a lemma shared by two synsets is refused, naming both classes
    with pytest.raises(DataError, match=r"'panda' is ambiguous .* 387 'lesser panda', 388 'giant panda'"):
        load_images(_folders(tmp_path / "amb", ["panda"]), squeeze)
    # the model's own name wins over a shared lemma: 'crane' is class 517 ('crane bird' is 134)
    assert load_images(_folders(tmp_path / "crane", ["crane"]), squeeze).labels.tolist() == [517, 517]


def test_unknown_name_is_one_line_error_naming_closest_classes(tmp_path, squeeze):
    root = _folders(tmp_path / "imgs", ["beagle", "doggo"])
    with pytest.raises(DataError) as e:
        load_images(root, squeeze)
    msg = str(e.value)
    assert "\n" not in msg
    assert "class folder 'doggo'" in msg and "not a class of model 'imagenet-squeezenet'" in msg
    assert "closest classes:" in msg and "273 'dingo'" in msg


def test_cifar_folders_refused_for_the_imagenet_model(tmp_path, squeeze, cifar):
    cifar_names = list(cifar.class_names)
    root = _folders(tmp_path / "cifar", cifar_names, per=1)
    with pytest.raises(DataError, match=r"class folder 'airplane' .* is not a class of model 'imagenet-squeezenet' "
                                        r"\(10 of 10 names unknown\); closest classes: .*'warplane'"):
        load_images(root, squeeze)
    # the same folder is fine for the CIFAR model, and a subset keeps CIFAR's own indices
    nat = load_images(_folders(tmp_path / "sub", ["truck", "Cat"], per=1), cifar)
    assert nat.labels.tolist() == [3, 9]  # Cat, truck (before: 0, 1)


def test_wordnet_folders_need_an_imagenet_label_space(tmp_path, squeeze, cifar):
    wn = imagenet_wnids()
    root = _folders(tmp_path / "val", [wn[5], wn[500]], per=1)
    nat = load_images(root, squeeze)
    assert nat.labels.tolist() == [5, 500] and nat.to_json()["labels_from"] == "wordnet ids"
    with pytest.raises(DataError, match=rf"class folder '{wn[5]}' is a WordNet id \(ImageNet-1k class 5\), but model "
                                        r"'cifar10-resnet20' has 10 classes"):
        load_images(root, cifar)
    with pytest.raises(DataError, match="'n99999999' is not an ImageNet-1k WordNet id"):
        load_images(_folders(tmp_path / "odd", ["n99999999"], per=1), squeeze)


def test_csv_class_names_go_through_the_model(tmp_path, squeeze):
    root = tmp_path / "flat"
    for f in ("a.png", "b.png", "c.png", "d.png"):
        _img(root / f)
    wn = imagenet_wnids()
    (root / "labels.csv").write_text(f"filename,label\na.png,koala\nb.png,Tinca tinca\nc.png,{wn[1]}\n")
    nat = load_images(root, squeeze)
    assert nat.labels.tolist() == [105, 0, 1, -1]  # before: names sorted to 0, 1, 2
    assert nat.to_json()["labels_from"] == "csv class names matched to the model's classes + csv wordnet ids"
    (root / "labels.csv").write_text("a.png,koala\nb.png,doggo\n")
    with pytest.raises(DataError, match=r"labels file .*: label 'doggo' is not a class of model 'imagenet-squeezenet'; "
                                        r"closest classes: .*'dingo'"):
        load_images(root, squeeze)


def test_csv_integers_must_fit_the_models_classes(tmp_path, cifar):
    root = tmp_path / "flat"
    for f in ("a.png", "b.png"):
        _img(root / f)
    (root / "labels.csv").write_text("a.png,9\nb.png,0\n")
    nat = load_images(root, cifar)
    assert nat.labels.tolist() == [9, 0] and nat.to_json()["labels_from"] == "csv integers"
    (root / "labels.csv").write_text("a.png,12\nb.png,0\n")
    with pytest.raises(DataError, match=r"class index 12 is out of range; valid: 0..9 \(model 'cifar10-resnet20' has "
                                        r"10 classes\)") as e:
        load_images(root, cifar)
    assert "\n" not in str(e.value)
    (root / "labels.csv").write_text("a.png,-2\n")
    with pytest.raises(DataError, match="class index -2 is out of range"):
        load_images(root, cifar)


def test_labels_file_with_class_folders_is_refused(tmp_path, cifar):
    root = _folders(tmp_path / "imgs", ["cat"], per=1)
    (tmp_path / "l.csv").write_text("0.png,dog\n")
    with pytest.raises(DataError, match="a labels file applies to a flat folder"):
        load_images(root, cifar, labels=tmp_path / "l.csv")


def test_model_without_class_names_leaves_names_unlabelled(tmp_path):
    lm = dataclasses.replace(tiny_model(), class_names=[])
    root = _folders(tmp_path / "imgs", ["class0", "class1"])
    with pytest.warns(UserWarning, match=r"labels need the model's class names \(model 'tiny' has no class names\)"):
        nat = load_images(root, lm)
    assert nat.labels.tolist() == [-1] * 4 and nat.to_json()["labels_from"] == "none"
    wn = imagenet_wnids()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # wnids need no class names: no warning
        nat = load_images(_folders(tmp_path / "val", [wn[7]], per=1), lm)
    assert nat.labels.tolist() == [7]
    # the tiny model with its names: folder names match them, in any order
    nat = load_images(_folders(tmp_path / "named", ["class4", "class1"], per=1), tiny_model())
    assert nat.labels.tolist() == [1, 4]


def test_real_cifar_folder_matches_the_model(data_root, cifar):
    nat = load_images(data_root / "cifar10-test", cifar, max_per_class=1)
    assert nat.to_json()["names_matched"] == {n: i for i, n in enumerate(cifar.class_names)}
    assert nat.labels.tolist() == list(range(10))
    assert [p.split("/")[-2] for p in nat.paths] == list(cifar.class_names)


def test_cli_check_refuses_cifar_images_for_squeezenet(tmp_path, capsys, cifar):
    from fvsanity.cli import main

    root = _folders(tmp_path / "cifar", list(cifar.class_names)[:3], per=1)
    capsys.readouterr()
    rc = main(["check", "--model", "imagenet-squeezenet", "--random-weights", "--unit", "classifier.1:162",
               "--images", str(root), "--out", str(tmp_path / "out"), "--no-progress", "--steps", "1", "--seeds", "1",
               "--top-k", "1", "--n-other", "1", "--n-boot", "10", "--n-perm", "10"])  # quick if not refused
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("fvsanity: error: class folder 'airplane'") and "imagenet-squeezenet" in err[0]
