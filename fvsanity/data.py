"""Natural images from a folder: scanned, checked, labelled, subsampled and streamed in batches.

Three layouts are recognised (``layout="auto"`` detects them):

``classes``
    one subfolder per class (ImageNet-val synset folders ``n01440764/``, class-name folders
    ``beagle/``, ``cat/``).
``imagenet-samples``
    one flat folder of ``<wnid>_<name>.JPEG`` files (the shared ImageNet samples).
``flat``
    images directly in the folder, unlabelled (label -1) unless a labels file is given (or a
    ``labels.csv`` lies in the folder): CSV rows ``filename,label``, ``label`` an integer class
    index, a class name or a WordNet id.

Labels go through the model (``labels_from`` in :meth:`NaturalImages.to_json` records how):

- The *label space* is the model's ``class_names`` (a LoadedModel passed as
  ``lm_or_preprocess``), or the ``class_names`` argument when given. A label is always an index
  into it, never a folder's position among the sorted folder names.
- Class names (folder names, CSV values) are matched to the label space: first verbatim, then
  case-, space-, ``_``- and ``-``-insensitively (:func:`normalize_class_name`), and, for a
  1000-class (ImageNet-1k) label space, to every WordNet lemma of each class's synset
  (:func:`imagenet_lemmas`: ``Tinca_tinca/`` is ``tench``, ``great-white-shark/`` is
  ``great white shark``). An unknown or ambiguous name raises a one-line
  :class:`~fvsanity.errors.DataError` naming it and the closest classes: a folder whose labels
  do not fit the model's classes (CIFAR-10 folders for an ImageNet model) is refused.
- WordNet ids (``n01440764/`` folders, ``<wnid>_<name>.JPEG`` files, wnid CSV values) get their
  ImageNet-1k index (timm's sorted synset list). With a label space of another size they are
  refused; a wnid outside ImageNet-1k is refused too.
- CSV integers are class indices; they must lie in ``0..len(class_names)-1`` (``>= 0`` when the
  label space is unknown).
- Without a label space (a bare Preprocess, or a model without class names such as a
  random-weight torchvision model) class names cannot be verified: they give label -1
  (unlabelled) with one warning; ImageNet-1k wnids keep their index, CSV integers are kept.

Every file is decoded once at scan time (JPEG in draft mode: cheap) so unreadable files (empty,
truncated, not an image, a broken or looping symlink, no read permission, a decompression bomb:
more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels, where PIL itself would only warn up to twice
that) are counted, listed with their reason and a warning, and left out instead of crashing a
run later; a folder with no readable image raises :class:`~fvsanity.errors.DataError`. Images are
decoded again, batch by batch, by :meth:`NaturalImages.batches`: :func:`to_rgb` (any PIL mode to
8-bit RGB: alpha dropped as torchvision's loaders do, 16-bit scaled, palette, grayscale and CMYK
converted), then the model's own ``Preprocess.load_pil`` (RGB in [0, 1] at the model's input
size), so thousands of images never sit in memory at once unless :meth:`NaturalImages.load` is
asked for.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import functools
import os
import re
import stat
import unicodedata
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
LAYOUTS = ("auto", "classes", "imagenet-samples", "flat")
_WNID_FILE = re.compile(r"^(n\d{8})_(.+)\.[A-Za-z]+$")
_WNID = re.compile(r"^n\d{8}$")
_SEPARATORS = re.compile(r"[\s_\-]+")

__all__ = [
    "NaturalImages",
    "load_images",
    "from_tensor",
    "imagenet_wnids",
    "imagenet_lemmas",
    "normalize_class_name",
    "to_rgb",
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
]


def _timm_info(name: str) -> str:
    from importlib.resources import files

    return (files("timm") / "data" / "_info" / name).read_text()


@functools.lru_cache(maxsize=1)
def _imagenet_wnids() -> tuple[str, ...]:
    try:
        text = _timm_info("imagenet_synsets.txt")
    except Exception:  # noqa: BLE001 - optional metadata
        return ()
    wnids = tuple(w.strip() for w in text.splitlines() if w.strip())
    return wnids if len(wnids) == 1000 else ()


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in sorted (= class index) order, from timm's metadata.

    Returns [] if timm (an fvsanity dependency) does not ship the list.
    """
    return list(_imagenet_wnids())


@functools.lru_cache(maxsize=1)
def imagenet_lemmas() -> tuple[tuple[str, ...], ...]:
    """WordNet lemmas of each ImageNet-1k class, in class index order (1000 tuples).

    From timm's ``imagenet_synset_to_lemma.txt`` (``wnid<TAB>lemma1, lemma2, ...``), e.g. class 0
    is ``("tench", "Tinca tinca")``. Returns () if timm does not ship the metadata.
    """
    wnids = _imagenet_wnids()
    if not wnids:
        return ()
    try:
        text = _timm_info("imagenet_synset_to_lemma.txt")
    except Exception:  # noqa: BLE001 - optional metadata
        return ()
    want = set(wnids)
    lemmas: dict[str, tuple[str, ...]] = {}
    for line in text.splitlines():
        wnid, _, rest = line.partition("\t")
        if wnid in want:
            lemmas[wnid] = tuple(x.strip() for x in rest.split(",") if x.strip())
    if len(lemmas) != len(wnids):
        return ()
    return tuple(lemmas[w] for w in wnids)


def normalize_class_name(name: str) -> str:
    """``name`` compared case-, space-, ``_``- and ``-``-insensitively (Unicode NFKC, casefolded).

    ``"Great_White-Shark"`` and ``"great white shark"`` both give ``"greatwhiteshark"``.
    """
    return _SEPARATORS.sub("", unicodedata.normalize("NFKC", str(name)).casefold())


class _LabelSpace:
    """The classes labels index (a model's ``class_names`` or given names); maps names to indices.

    Args:
        names: one name per class index (may be empty: unknown label space).
        owner: how messages name it ("model 'cifar10-resnet20'", "the given class_names"; for an
            empty label space, why it is empty: "model 'resnet18' has no class names").
        matched_source: ``labels_from`` entry for names matched to it.
    """

    def __init__(self, names: Sequence[str], owner: str, matched_source: str):
        self.names = tuple(str(n) for n in names)
        self.owner = owner
        self.matched_source = matched_source
        wnids = _imagenet_wnids()
        self.imagenet = len(self.names) == 1000 and bool(wnids)
        self._wnid_index = {w: i for i, w in enumerate(wnids)}
        exact: dict[str, set[int]] = {}
        norm: dict[str, set[int]] = {}
        lemma: dict[str, set[int]] = {}
        for i, n in enumerate(self.names):
            exact.setdefault(n, set()).add(i)
            norm.setdefault(normalize_class_name(n), set()).add(i)
        if self.imagenet:
            for i, lems in enumerate(imagenet_lemmas()):
                for lem in lems:
                    lemma.setdefault(normalize_class_name(lem), set()).add(i)
        self._tiers = (exact, norm, lemma)

    def __bool__(self) -> bool:
        return bool(self.names)

    def is_class_name(self, name: str) -> bool:
        return name in self._tiers[0]

    def is_imagenet_wnid(self, name: str) -> bool:
        return name in self._wnid_index

    def _describe(self, idx: Iterable[int]) -> str:
        return ", ".join(f"{i} {self.names[i]!r}" for i in sorted(idx))

    def wnid(self, wnid: str, where: str) -> int:
        """ImageNet-1k index of ``wnid``; DataError if it does not fit this label space."""
        i = self._wnid_index.get(wnid)
        if self.names and not self.imagenet:
            known = f" (ImageNet-1k class {i})" if i is not None else ""
            raise DataError(
                f"{where} {wnid!r} is a WordNet id{known}, but {self.owner} has {len(self.names)} classes "
                f"({', '.join(self.names[:5])}{', ...' if len(self.names) > 5 else ''}): these images do not "
                "belong to its label space"
            )
        if i is None:
            raise DataError(
                f"{where} {wnid!r} is not an ImageNet-1k WordNet id (timm's imagenet_synsets.txt); "
                f"valid: {next(iter(self._wnid_index), 'n01440764')} ... (1000 ids)"
            )
        return i

    def lookup(self, name: str) -> tuple[int | None, str]:
        """(index, how) of a class name, or (None, "unknown"); DataError if it is ambiguous."""
        keys = (name, normalize_class_name(name), normalize_class_name(name))
        for tier, key, how in zip(self._tiers, keys, ("exact", "normalized", "wordnet lemma")):
            hits = tier.get(key)
            if hits is None:
                continue
            if len(hits) > 1:
                raise DataError(
                    f"class name {name!r} is ambiguous for {self.owner}: it names classes "
                    f"{self._describe(hits)}; use one of these names"
                )
            return next(iter(hits)), how
        return None, "unknown"

    def closest(self, name: str, n: int = 5) -> str:
        """Up to ``n`` classes nearest to ``name`` (difflib on normalized names), for messages."""
        key = normalize_class_name(name)
        cands: dict[str, set[int]] = {}
        for tier in self._tiers[1:]:
            for k, v in tier.items():
                cands.setdefault(k, set()).update(v)
        out: list[int] = []
        for cutoff in (0.6, 0.3):
            for k in difflib.get_close_matches(key, list(cands), n=3 * n, cutoff=cutoff):
                out += [i for i in sorted(cands[k]) if i not in out]
            if out:
                break
        if not out:
            return f"valid: {', '.join(map(repr, self.names[:8]))}{', ...' if len(self.names) > 8 else ''}"
        return "closest classes: " + ", ".join(f"{i} {self.names[i]!r}" for i in out[:n])


@dataclass(frozen=True)
class _Labelled:
    """How names were turned into labels (internal)."""

    index: dict[str, int]  # name -> class index, -1 for unlabelled
    sources: tuple[str, ...]  # labels_from entries


def _label_names(names: Sequence[str], space: _LabelSpace, where: str, context: str) -> _Labelled:
    """Map folder names / CSV values to label indices (-1: unlabelled), see the module docstring.

    Raises DataError for a name that does not fit ``space`` (unknown, ambiguous, a wnid for a
    non-ImageNet label space). Warns once when names cannot be verified (no label space).
    """
    index: dict[str, int] = {}
    sources: set[str] = set()
    unknown: list[str] = []
    unverifiable: list[str] = []
    for name in names:
        if _WNID.match(name) and not space.is_class_name(name):
            if not space and not space.is_imagenet_wnid(name):
                index[name] = -1
                unverifiable.append(name)
                continue
            index[name] = space.wnid(name, where)
            sources.add("wordnet ids")
            continue
        if not space:
            index[name] = -1
            unverifiable.append(name)
            continue
        i, _how = space.lookup(name)
        if i is None:
            unknown.append(name)
            continue
        index[name] = i
        sources.add(space.matched_source)
    if unknown:
        more = f" ({len(unknown)} of {len(names)} names unknown)" if len(unknown) > 1 else ""
        raise DataError(
            f"{where} {unknown[0]!r}{' in ' + context if context else ''} is not a class of {space.owner}{more}; "
            f"{space.closest(unknown[0])}"
        )
    if unverifiable:
        warnings.warn(
            f"labels need the model's class names ({space.owner}): {len(unverifiable)} label name(s) in {context or 'the labels file'} "
            f"(first: {unverifiable[0]!r}) cannot be matched to class indices; their images are treated as "
            "unlabelled",
            stacklevel=4,
        )
    return _Labelled(index=index, sources=tuple(sorted(sources)))


def to_rgb(im):
    """A PIL image in any mode as 8-bit ``RGB`` (what ``Preprocess.load_pil`` expects).

    Alpha (``RGBA``, ``LA``, ``PA``, palette transparency) is dropped, keeping the stored colour,
    as torchvision's and timm's image loaders do; 16-bit grayscale (``I;16*``, and ``I`` as PIL
    opens 16-bit files) is scaled by 255/65535 (PIL's own conversion would clip it at 255);
    palette, grayscale, bilevel and CMYK images go through PIL's conversion.
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode == "I":
        import numpy as np
        from PIL import Image

        a = np.asarray(im).astype(np.float64)
        return Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if (mode == "P" and "transparency" in im.info) or mode == "PA":
        return im.convert("RGBA").convert("RGB")
    return im.convert("RGB")


@contextlib.contextmanager
def _open_checked(path: str | os.PathLike) -> Iterator:
    """``PIL.Image.open`` that refuses decompression bombs already at PIL's warning limit.

    PIL warns (``DecompressionBombWarning``) above ``Image.MAX_IMAGE_PIXELS`` pixels and only
    raises above twice that; both are an error here, so a huge image is never decoded. PIL's
    per-file warnings (EXIF, palette) are silenced inside the block.
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            yield im


def _reason(e: BaseException) -> str:
    """A one-line, short reason for a decoding failure."""
    from PIL import Image

    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"decompression bomb refused (more than PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} pixels)"
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}"[:160]


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
        unreadable_reasons: why each of ``unreadable`` could not be decoded (same order).
        labels_from: how labels were obtained: ``"class names matched to the model's classes"``,
            ``"class names matched to the given class_names"``, ``"wordnet ids"``,
            ``"csv integers"``, ``"given"`` (in-memory labels) or ``"none"``; several joined
            by ``" + "``.
        names_matched: (label name, class index) for every folder / CSV class name matched to
            the label space (WordNet ids not included).
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
    unreadable_reasons: tuple[str, ...] = ()
    labels_from: str = "none"
    names_matched: tuple[tuple[str, int], ...] = ()

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
        try:
            with _open_checked(path) as im:
                return self.preprocess.load_pil(to_rgb(im))
        except Exception as e:  # noqa: BLE001 - decoders raise many types for bad files
            raise DataError(f"cannot decode image {path!r}: {_reason(e)}") from e

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
            "unreadable_reasons": list(self.unreadable_reasons[:20]),
            "size": list(self.size),
            "labels_from": self.labels_from,
            "n_names_matched": len(self.names_matched),
            "names_matched": {n: i for n, i in self.names_matched[:100]},
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
        preprocess=_Size(), images=images, labels_from="none" if labels is None else "given",
    )


def _listdir(d: Path) -> list[Path]:
    """Entries of folder ``d``, sorted; DataError (one line) if it cannot be listed."""
    try:
        return sorted(d.iterdir())
    except OSError as e:
        raise DataError(f"cannot list folder {str(d)!r}: {e.strerror or type(e).__name__}") from e


def _is_dir(p: Path) -> bool:
    return not p.name.startswith(".") and p.is_dir()


def _is_image(p: Path) -> bool:
    """An image file by name: a regular file, or an entry that cannot be stat'ed (a broken or
    looping symlink, no permission), which is then counted unreadable instead of silently
    skipped. Directories, FIFOs and devices with an image extension are not images."""
    if p.name.startswith(".") or p.suffix.lower() not in IMAGE_EXTENSIONS:
        return False
    try:
        return stat.S_ISREG(p.stat().st_mode)
    except OSError:
        return True


def _readable(path: Path) -> str | None:
    """None if PIL decodes ``path`` (JPEGs at reduced scale) into RGB, else the reason it cannot."""
    try:
        with _open_checked(path) as im:
            im.draft("RGB", (64, 64))
            im.load()
            to_rgb(im)
        return None
    except Exception as e:  # noqa: BLE001 - any decoder failure means unreadable
        return _reason(e)


def _detect(root: Path) -> str:
    entries = _listdir(root)
    subdirs = [d for d in entries if _is_dir(d)]
    files = [p for p in entries if _is_image(p)]
    if subdirs and any(any(_is_image(p) for p in _listdir(d)) for d in subdirs):
        return "classes"
    if files and all(_WNID_FILE.match(p.name) for p in files):
        return "imagenet-samples"
    return "flat"


def _read_labels_file(path: Path) -> tuple[dict[str, str], dict[str, int]]:
    """``({filename: label}, {filename: line})`` from a CSV of ``filename,label`` rows (an
    optional header row first; blank and ``#`` comment lines allowed; a file listed twice with the
    same label counts once).

    Raises:
        DataError: one line naming the file and the line: a row with other than two columns or an
            empty cell, a file listed twice with different labels, or no rows at all.
    """
    if not path.is_file():
        raise DataError(f"labels file not found: {str(path)!r}")
    out: dict[str, str] = {}
    line_of: dict[str, int] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read labels file {str(path)!r}: {_reason(e)}") from e
    where = f"labels file {str(path)!r}"
    first = True
    for i, row in enumerate(rows):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) != 2:
            what = "extra column" if len(row) > 2 else "one column"
            raise DataError(f"{where} line {i + 1}: expected 2 columns 'filename,label', got {len(row)} ({what}): "
                            f"{row!r}")
        name, label = row[0].strip(), row[1].strip()
        if first and label.lower() in ("label", "class", "target"):
            first = False
            continue  # header
        first = False
        if not name or not label:
            raise DataError(f"{where} line {i + 1}: empty {'filename' if not name else 'label'} in {row!r}")
        if name in out and out[name] != label:
            raise DataError(f"{where} line {i + 1}: {name!r} labelled {label!r} but {out[name]!r} at line "
                            f"{line_of[name]}; give each file one label")
        out.setdefault(name, label)
        line_of.setdefault(name, i + 1)
    if not out:
        raise DataError(f"{where} has no 'filename,label' rows; add rows or remove the file")
    return out, line_of


def _default_names(labels: dict[str, int], names_of: dict[str, str]) -> list[str]:
    """Class names when the label space is unknown: ``names_of[key]`` at each key's label."""
    valid = {v: names_of[k] for k, v in labels.items() if v >= 0}
    return [valid.get(i, "") for i in range(max(valid) + 1)] if valid else []


def _scan(root: Path, layout: str, labels_file: Path | None, space: _LabelSpace):
    """(paths, labels, class_names, labels_from, names_matched) before the readability check."""
    if labels_file is not None and layout != "flat":
        raise DataError(
            f"a labels file applies to a flat folder; {str(root)!r} has layout {layout!r} (labels come from "
            "its folder / file names)"
        )
    if layout == "classes":
        dirs = [d for d in _listdir(root) if _is_dir(d)]
        members = {d.name: [p for p in _listdir(d) if _is_image(p)] for d in dirs}
        dirs = [d for d in dirs if members[d.name]]
        lab = _label_names([d.name for d in dirs], space, "class folder", repr(str(root)))
        paths, labels = [], []
        for d in dirs:
            paths += members[d.name]
            labels += [lab.index[d.name]] * len(members[d.name])
        names = list(space.names) or _default_names(lab.index, {d.name: d.name for d in dirs})
        matched = tuple((d.name, lab.index[d.name]) for d in dirs if not _WNID.match(d.name) and lab.index[d.name] >= 0)
        return paths, labels, names, lab.sources, matched
    files = [p for p in _listdir(root) if _is_image(p)]
    if layout == "imagenet-samples":
        parsed = [_WNID_FILE.match(p.name) for p in files]
        bad = [p.name for p, m in zip(files, parsed) if m is None]
        if bad:
            raise DataError(f"layout 'imagenet-samples' expects <wnid>_<name>.JPEG files; {bad[0]!r} in {str(root)!r} is not")
        wnids = sorted({m.group(1) for m in parsed})
        lab = _label_names(wnids, space, "WordNet id", repr(str(root)))
        names = list(space.names) or _default_names(lab.index, {m.group(1): m.group(2) for m in parsed})
        return files, [lab.index[m.group(1)] for m in parsed], names, lab.sources, ()
    # flat
    if labels_file is None and (root / "labels.csv").is_file():
        labels_file = root / "labels.csv"
    if labels_file is None:
        return files, [-1] * len(files), list(space.names), (), ()
    table, line_of = _read_labels_file(labels_file)
    where = f"labels file {str(labels_file)!r}:"
    present = {p.name for p in files}
    missing = [name for name in table if name not in present]
    if missing:
        more = f" (and {len(missing) - 1} more listed files)" if len(missing) > 1 else ""
        raise DataError(f"labels file {str(labels_file)!r} line {line_of[missing[0]]}: {missing[0]!r} is not an image "
                        f"file in {str(root)!r}"
                        f"{more}; list only the folder's images")
    values = sorted(set(table.values()))
    if values and all(re.fullmatch(r"-?\d+", v) for v in values):
        n = len(space.names)
        for v in values:
            if int(v) < 0 or (n and int(v) >= n):
                valid = f"0..{n - 1} ({space.owner} has {n} classes)" if n else ">= 0"
                raise DataError(f"{where} class index {v} is out of range; valid: {valid}")
        to_int = {v: int(v) for v in values}
        sources: tuple[str, ...] = ("csv integers",)
        matched: tuple[tuple[str, int], ...] = ()
        names = list(space.names)
    else:
        lab = _label_names(values, space, f"{where} label", "")
        to_int = lab.index
        sources = tuple(f"csv {s}" for s in lab.sources)
        matched = tuple((v, i) for v, i in lab.index.items() if not _WNID.match(v) and i >= 0)
        names = list(space.names) or _default_names(lab.index, {v: v for v in values})
    return files, [to_int[table[p.name]] if p.name in table else -1 for p in files], names, sources, matched


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
            (``load_pil``) and the image size; a LoadedModel's ``class_names`` are the label
            space that folder and CSV class names are matched to (see the module docstring).
        layout: ``auto`` (detect), ``classes``, ``imagenet-samples`` or ``flat``.
        labels: CSV ``filename,label`` for a flat folder (default: ``root/labels.csv`` if any).
        class_names: the label space (one name per class index) instead of the model's
            ``class_names``; needed to label class-name folders when only a Preprocess is given.
        max_per_class: keep at most this many images per label (random, by ``seed``).
        limit: then keep at most this many images overall (random, by ``seed``).
        seed: seed of the subsampling (a ``torch.Generator``; same seed, same images).
        verify: decode every kept file once now and leave out (count, warn about) unreadable
            ones; with False, a bad file raises DataError when its batch is decoded.
        into_memory: decode everything now (``images`` [N, 3, H, W]).

    Raises:
        DataError: the folder is missing, empty, holds no readable image, or is malformed; a
            label name is unknown or ambiguous for the label space; a CSV index is out of range.
    """
    root = Path(root)
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    if not root.is_dir():
        raise DataError(f"image folder not found: {str(root)!r}")
    pre = _loader_of(lm_or_preprocess)
    space = _label_space(lm_or_preprocess, class_names)
    if layout == "auto":
        layout = _detect(root)
    paths, labs, names, sources, matched = _scan(root, layout, Path(labels) if labels else None, space)
    if not paths:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS[:3])}, ...) in {str(root)!r} (layout {layout})")
    keep = _subsample(labs, max_per_class, limit, seed)
    bad: list[str] = []
    reasons: list[str] = []
    if verify:
        keep, bad, reasons = _readable_subset(paths, keep)
    if not keep:
        first = f" (first: {bad[0]}: {reasons[0]})" if bad else ""
        raise DataError(f"no readable image in {str(root)!r}: all {len(bad)} image files failed to decode{first}")
    if bad:
        warnings.warn(
            f"{len(bad)} unreadable image file(s) in {root} skipped (first: {bad[0]}: {reasons[0]})", stacklevel=2
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
        unreadable_reasons=tuple(reasons),
        labels_from=" + ".join(sources) or "none",
        names_matched=matched,
    )
    return nat.load() if into_memory else nat


def _readable_subset(paths: Sequence[Path], keep: Sequence[int]) -> tuple[list[int], list[str], list[str]]:
    """Decode each kept file once: ``(readable indices, unreadable paths, why each failed)``."""
    ok: list[int] = []
    bad: list[str] = []
    reasons: list[str] = []
    for i in keep:
        why = _readable(paths[i])
        if why is None:
            ok.append(i)
        else:
            bad.append(str(paths[i]))
            reasons.append(why)
    return ok, bad, reasons


def _label_space(lm_or_preprocess, class_names: Sequence[str] | None) -> _LabelSpace:
    """The class names labels must index: ``class_names`` if given, else the model's."""
    if class_names is not None:
        owner = "the given class_names" if len(class_names) else "the given class_names are empty"
        return _LabelSpace(class_names, owner, "class names matched to the given class_names")
    names = getattr(lm_or_preprocess, "class_names", None) or ()
    model = getattr(lm_or_preprocess, "name", None)
    if names:
        return _LabelSpace(names, f"model {model!r}", "class names matched to the model's classes")
    why = f"model {model!r} has no class names" if model else "no model was given, only a Preprocess"
    return _LabelSpace((), why, "")
