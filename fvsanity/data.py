"""Natural images from a folder: scanned, checked, labelled, subsampled and streamed in batches.

Three layouts are recognised (``layout="auto"`` detects them):

``classes``
    one subfolder per class (ImageNet-val synset folders ``n01440764/``, CIFAR class folders
    ``cat/``); the label is the position of the folder name among the sorted folder names, except
    that ImageNet WordNet ids (``n01440764``) get their ImageNet-1k index, so a folder holding only
    some synsets still labels them as the model does.
``imagenet-samples``
    one flat folder of ``<wnid>_<name>.JPEG`` files (the shared ImageNet samples); the label is
    the position of the wnid among the sorted ImageNet-1k wnids (= among the sorted wnids of the
    folder when it holds all 1000; among the folder's sorted wnids if they are not ImageNet-1k).
``flat``
    images directly in the folder, unlabelled (label -1) unless a labels file is given (or a
    ``labels.csv`` lies in the folder): CSV rows ``filename,label``, ``label`` an integer class
    index or a class name (names are sorted to indices).

Every file is decoded once at scan time (JPEG in draft mode: cheap) so unreadable files are
counted, reported with a warning and left out instead of crashing a run later; a folder with no
readable image raises :class:`~fvsanity.errors.DataError`. Images are decoded again, batch by
batch, by :meth:`NaturalImages.batches`, with the model's own ``Preprocess.load_pil`` (RGB in
[0, 1] at the model's input size), so thousands of images never sit in memory at once unless
:meth:`NaturalImages.load` is asked for.
"""

from __future__ import annotations

import csv
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
LAYOUTS = ("auto", "classes", "imagenet-samples", "flat")
_WNID_FILE = re.compile(r"^(n\d{8})_(.+)\.[A-Za-z]+$")
_WNID = re.compile(r"^n\d{8}$")

__all__ = ["NaturalImages", "load_images", "from_tensor", "imagenet_wnids", "IMAGE_EXTENSIONS", "LAYOUTS"]


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in sorted (= class index) order, from timm's metadata.

    Returns [] if timm (an fvsanity dependency) does not ship the list.
    """
    try:
        from importlib.resources import files

        text = (files("timm") / "data" / "_info" / "imagenet_synsets.txt").read_text()
    except Exception:  # noqa: BLE001 - optional metadata
        return []
    wnids = [w.strip() for w in text.splitlines() if w.strip()]
    return wnids if len(wnids) == 1000 else []


def _loader_of(lm_or_preprocess):
    pre = getattr(lm_or_preprocess, "preprocess", lm_or_preprocess)
    if not hasattr(pre, "load_pil"):
        raise TypeError("expected a LoadedModel or a Preprocess with .load_pil")
    return pre


@dataclass(frozen=True, eq=False)
class NaturalImages:
    """A labelled set of natural images, decoded lazily.

    Attributes:
        root: the folder they came from (None for in-memory images).
        layout: ``classes`` | ``imagenet-samples`` | ``flat`` | ``tensor``.
        paths: one file path per image (N); empty strings for in-memory images.
        labels: Tensor [N] int64 class index, -1 where unknown.
        class_names: name of each class index (may be empty).
        preprocess: the model's :class:`~fvsanity.models.Preprocess` (decoding and size).
        n_unreadable: files skipped because they could not be decoded.
        unreadable: those files (paths).
        images: Tensor [N, 3, H, W] RGB in [0, 1] if loaded into memory, else None.
    """

    root: Path | None
    layout: str
    paths: tuple[str, ...]
    labels: torch.Tensor
    class_names: tuple[str, ...]
    preprocess: object = field(repr=False)
    n_unreadable: int = 0
    unreadable: tuple[str, ...] = ()
    images: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of every decoded image, in pixels."""
        if self.images is not None:
            return tuple(self.images.shape[-2:])
        return tuple(self.preprocess.size)

    def decode(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Images ``indices`` as a Tensor [len(indices), 3, H, W], RGB in [0, 1]."""
        idx = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
        if self.images is not None:
            return self.images[idx]
        if not idx:
            h, w = self.size
            return torch.empty(0, 3, h, w)
        return torch.stack([self._decode_one(self.paths[i]) for i in idx])

    def _decode_one(self, path: str) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(path) as im:
                return self.preprocess.load_pil(im)
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for bad files
            raise DataError(f"cannot decode image {path!r} (it was readable when scanned): {e}") from e

    def batches(
        self, batch_size: int = 64, indices: Sequence[int] | torch.Tensor | None = None
    ) -> Iterator[torch.Tensor]:
        """Yield Tensors [B, 3, H, W] (B <= ``batch_size``) in order, decoding one batch at a time."""
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        idx = list(range(len(self))) if indices is None else [int(i) for i in indices]
        for s in range(0, len(idx), batch_size):
            yield self.decode(idx[s : s + batch_size])

    def load(self) -> NaturalImages:
        """The same set with every image decoded into memory (``images`` [N, 3, H, W])."""
        if self.images is not None:
            return self
        return replace(self, images=self.decode(range(len(self))))

    def subset(self, indices: Sequence[int] | torch.Tensor) -> NaturalImages:
        """Images ``indices`` (in that order) as a new set; unreadable-file counts are kept."""
        idx = torch.as_tensor([int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)], dtype=torch.long)
        return replace(
            self,
            paths=tuple(self.paths[i] for i in idx.tolist()),
            labels=self.labels[idx],
            images=None if self.images is None else self.images[idx],
        )

    def indices_of_class(self, label: int) -> torch.Tensor:
        """Tensor [n] int64: positions of the images labelled ``label``."""
        return torch.nonzero(self.labels == int(label)).flatten()

    def to_json(self) -> dict:
        labelled = self.labels >= 0
        return {
            "root": None if self.root is None else str(self.root),
            "layout": self.layout,
            "n_images": len(self),
            "n_labelled": int(labelled.sum()),
            "n_classes_present": int(torch.unique(self.labels[labelled]).numel()),
            "n_unreadable": self.n_unreadable,
            "unreadable": list(self.unreadable[:20]),
            "size": list(self.size),
        }


def from_tensor(
    images: torch.Tensor, labels: torch.Tensor | Sequence[int] | None = None, class_names: Sequence[str] = ()
) -> NaturalImages:
    """Wrap in-memory images [N, 3, H, W] (RGB in [0, 1]) as :class:`NaturalImages`."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"expected images of shape [N, 3, H, W], got {tuple(images.shape)}")
    n = images.shape[0]
    lab = torch.full((n,), -1, dtype=torch.long) if labels is None else torch.as_tensor(labels, dtype=torch.long)
    if lab.shape != (n,):
        raise DataError(f"labels must have shape [{n}], got {tuple(lab.shape)}")

    class _Size:  # minimal stand-in so .size works without a model
        size = tuple(images.shape[-2:])

    return NaturalImages(
        root=None, layout="tensor", paths=("",) * n, labels=lab, class_names=tuple(class_names),
        preprocess=_Size(), images=images,
    )


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _readable(path: Path) -> bool:
    """Fully decode ``path`` (JPEGs at reduced scale) to be sure PIL can read it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))
            im.load()
        return True
    except Exception:  # noqa: BLE001 - any decoder failure means unreadable
        return False


def _detect(root: Path) -> str:
    subdirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    files = [p for p in root.iterdir() if _is_image(p)]
    if subdirs and any(any(_is_image(p) for p in d.iterdir()) for d in subdirs):
        return "classes"
    if files and all(_WNID_FILE.match(p.name) for p in files):
        return "imagenet-samples"
    return "flat"


def _wnid_labels(wnids: Sequence[str]) -> dict[str, int]:
    """wnid -> ImageNet-1k index if all are ImageNet-1k ids, else index among the sorted ids."""
    full = imagenet_wnids()
    if full and set(wnids) <= set(full):
        return {w: i for i, w in enumerate(full)}
    return {w: i for i, w in enumerate(sorted(set(wnids)))}


def _read_labels_file(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise DataError(f"labels file not found: {str(path)!r}")
    out: dict[str, str] = {}
    with open(path, newline="") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) < 2:
                raise DataError(f"labels file {str(path)!r} line {i + 1}: expected 'filename,label', got {row!r}")
            name, label = row[0].strip(), row[1].strip()
            if i == 0 and label.lower() in ("label", "class", "target"):
                continue  # header
            out[name] = label
    return out


def _scan(root: Path, layout: str, labels_file: Path | None, class_names: Sequence[str] | None):
    """(paths, labels, class_names) before the readability check."""
    if layout == "classes":
        dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        dirs = [d for d in dirs if any(_is_image(p) for p in d.iterdir())]
        names = [d.name for d in dirs]
        if names and all(_WNID.match(n) for n in names):
            lab_of = _wnid_labels(names)
        else:
            lab_of = {n: i for i, n in enumerate(names)}
        paths, labels = [], []
        for d in dirs:
            for p in sorted(p for p in d.iterdir() if _is_image(p)):
                paths.append(p)
                labels.append(lab_of[d.name])
        if class_names is None:
            inv = {v: k for k, v in lab_of.items()}
            class_names = [inv.get(i, "") for i in range(max(lab_of.values()) + 1)] if lab_of else []
        return paths, labels, list(class_names)
    files = sorted(p for p in root.iterdir() if _is_image(p))
    if layout == "imagenet-samples":
        parsed = [_WNID_FILE.match(p.name) for p in files]
        bad = [p.name for p, m in zip(files, parsed) if m is None]
        if bad:
            raise DataError(f"layout 'imagenet-samples' expects <wnid>_<name>.JPEG files; {bad[0]!r} in {str(root)!r} is not")
        wnids = [m.group(1) for m in parsed]
        lab_of = _wnid_labels(wnids)
        if class_names is None:
            names = {lab_of[m.group(1)]: m.group(2) for m in parsed}
            class_names = [names.get(i, "") for i in range(max(lab_of.values()) + 1)]
        return files, [lab_of[w] for w in wnids], list(class_names)
    # flat
    if labels_file is None and (root / "labels.csv").is_file():
        labels_file = root / "labels.csv"
    if labels_file is None:
        return files, [-1] * len(files), list(class_names or [])
    table = _read_labels_file(labels_file)
    values = set(table.values())
    if all(re.fullmatch(r"-?\d+", v) for v in values):
        to_int = {v: int(v) for v in values}
        names = list(class_names or [])
    else:
        names = sorted(values) if class_names is None else list(class_names)
        unknown = sorted(values - set(names))
        if unknown:
            raise DataError(f"labels file {str(labels_file)!r}: unknown class {unknown[0]!r}; valid: {', '.join(names[:10])}")
        to_int = {n: names.index(n) for n in values}
    return files, [to_int[table[p.name]] if p.name in table else -1 for p in files], names


def _subsample(labels: list[int], max_per_class: int | None, limit: int | None, seed: int) -> list[int]:
    """Positions to keep, sorted; chosen by ``seed`` (torch.Generator), deterministic."""
    g = torch.Generator().manual_seed(int(seed))
    keep = list(range(len(labels)))
    if max_per_class is not None:
        if max_per_class < 1:
            raise DataError(f"max_per_class must be >= 1, got {max_per_class}")
        by_class: dict[int, list[int]] = {}
        for i in keep:
            by_class.setdefault(labels[i], []).append(i)
        keep = []
        for lab in sorted(by_class):
            members = by_class[lab]
            if len(members) > max_per_class:
                perm = torch.randperm(len(members), generator=g)[:max_per_class]
                members = [members[j] for j in sorted(perm.tolist())]
            keep += members
        keep.sort()
    if limit is not None:
        if limit < 1:
            raise DataError(f"limit must be >= 1, got {limit}")
        if len(keep) > limit:
            perm = torch.randperm(len(keep), generator=g)[:limit]
            keep = sorted(keep[j] for j in perm.tolist())
    return keep


def load_images(
    root: str | Path,
    lm_or_preprocess,
    *,
    layout: str = "auto",
    labels: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    max_per_class: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    verify: bool = True,
    into_memory: bool = False,
) -> NaturalImages:
    """Scan an image folder into :class:`NaturalImages` (decoded lazily, batch by batch).

    Args:
        root: the folder.
        lm_or_preprocess: a LoadedModel (its ``preprocess``) or a Preprocess: decides decoding
            (``load_pil``) and the image size.
        layout: ``auto`` (detect), ``classes``, ``imagenet-samples`` or ``flat``.
        labels: CSV ``filename,label`` for a flat folder (default: ``root/labels.csv`` if any).
        class_names: names for the class indices (default: from folders / file names / labels).
        max_per_class: keep at most this many images per label (random, by ``seed``).
        limit: then keep at most this many images overall (random, by ``seed``).
        seed: seed of the subsampling (a ``torch.Generator``; same seed, same images).
        verify: decode every kept file once now and leave out (count, warn about) unreadable
            ones; with False, a bad file raises DataError when its batch is decoded.
        into_memory: decode everything now (``images`` [N, 3, H, W]).

    Raises:
        DataError: the folder is missing, empty, holds no readable image, or is malformed.
    """
    root = Path(root)
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    if not root.is_dir():
        raise DataError(f"image folder not found: {str(root)!r}")
    pre = _loader_of(lm_or_preprocess)
    if layout == "auto":
        layout = _detect(root)
    paths, labs, names = _scan(root, layout, Path(labels) if labels else None, class_names)
    if not paths:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS[:3])}, ...) in {str(root)!r} (layout {layout})")
    keep = _subsample(labs, max_per_class, limit, seed)
    bad: list[str] = []
    if verify:
        ok = []
        for i in keep:
            if _readable(paths[i]):
                ok.append(i)
            else:
                bad.append(str(paths[i]))
        keep = ok
    if not keep:
        raise DataError(f"no readable image in {str(root)!r}: all {len(bad)} image files failed to decode")
    if bad:
        warnings.warn(
            f"{len(bad)} unreadable image file(s) in {root} skipped (first: {bad[0]})", stacklevel=2
        )
    nat = NaturalImages(
        root=root,
        layout=layout,
        paths=tuple(str(paths[i]) for i in keep),
        labels=torch.tensor([labs[i] for i in keep], dtype=torch.long),
        class_names=tuple(names),
        preprocess=pre,
        n_unreadable=len(bad),
        unreadable=tuple(bad),
    )
    return nat.load() if into_memory else nat
