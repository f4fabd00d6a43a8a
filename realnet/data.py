"""Readers for anomaly-detection benchmarks and plain folders, all yielding the same item dicts.

An item is ``{"image": (3,H,W) float in [0,1], "mask": (1,H,W) float in {0,1}, "label": 0|1,
"path": str, "category": str, "defect_type": str}``. Images are resized bilinearly and masks with
nearest neighbour to ``image_size`` without cropping (the official code also evaluates at 256x256
without a centre crop); masks are binarised with ``> mask_threshold`` on the 8-bit scale, by default
``> 0`` for exact masks (VisA masks hold class ids, KolektorSDD masks hold 255). Lossy (JPEG) or
anti-aliased masks carry grey values around their regions that ``> 0`` counts as defect: when a
split holds such masks, a one-line warning says how many, and ``mask_threshold=127`` binarises them
at mid-grey. A mask whose size differs from its image's is an InputError naming both files: it most
likely belongs to another image.

Supported layouts (``dataset=``):

* ``mvtec-ad`` / ``mpdd``: ``<root>/<cat>/{train,test}/<type>/*.png``, masks
  ``<root>/<cat>/ground_truth/<type>/<stem>_mask.png`` or ``<stem>.png``.
* ``btad``: ``<root>/NN/{train,test}/{ok,ko}/*``, masks ``<root>/NN/ground_truth/ko/<stem>.png``.
* ``visa``: the official ``<root>/split_csv/1cls.csv`` (columns object, split, label, image, mask;
  paths relative to ``root``) or the 1-class folder layout ``<cat>/{train,test}/{good|ok,bad|ko}``
  with ``<cat>/ground_truth/...``.
* ``folder``: a folder with ``train/`` and ``test/`` laid out like MVTec AD, or a flat folder with
  ``good/`` plus defect subfolders and optional ``masks/`` or ``ground_truth/`` (matching stems);
  a flat folder has no split, so its normal images are split by ``seed`` (see
  :func:`split_normal_records`).
* ``kolektorsdd``: ``<root>/kosNN/PartK.jpg`` + ``PartK_label.png|bmp``; the label comes from the
  mask being non-empty; defect-free parts are split by ``seed``, every defective part goes to test.

``category`` may be one name, a list of names or ``"all"`` (unified multi-class training: every item
carries its ``category``). ``category=None`` with a ``root`` that itself holds ``train/``/``test/``
reads that folder as one category.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from sia.categories import resolve_dataset
from sia.errors import InputError
from sia.images import (
    IMAGE_EXTENSIONS,
    load_image,
    load_mask,
    pil_to_tensor,
    read_mask_values,
)
from sia.paths import path_component

__all__ = [
    "SampleRecord",
    "AnomalyDataset",
    "load_split",
    "available_categories",
    "split_normal_records",
    "NORMAL_FOLDER_NAMES",
    "graded_masks",
]

logger = logging.getLogger(__name__)

NORMAL_FOLDER_NAMES = ("good", "ok", "normal")
MASK_FOLDER_NAMES = ("ground_truth", "masks")
SPLITS = ("train", "test")
# A mask is "graded" (lossy or anti-aliased) when more than this share of its non-zero pixels lies
# strictly between 0 and full scale; it must also reach above half scale, so that masks of small
# class ids (VisA's 1, 2, ...) are not mistaken for grey edges.
GRADED_MASK_SHARE = 0.05
EXTRA_DATASETS = {
    "folder": "folder", "generic": "folder", "custom": "folder",
    "kolektorsdd": "kolektorsdd", "kolektor": "kolektorsdd", "ksdd": "kolektorsdd", "kolektorsdd1": "kolektorsdd",
}


@dataclass(frozen=True)
class SampleRecord:
    """Where one sample lives on disk and what it is; the image is read only when the item is used."""

    image_path: Path
    label: int
    mask_path: Path | None
    category: str
    defect_type: str


def _normalise_size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) <= 0:
        raise InputError(f"image_size: expected an int or (height, width) of positive ints, got {image_size!r}")
    return size  # type: ignore[return-value]


class AnomalyDataset(Dataset):
    """A torch Dataset over :class:`SampleRecord` s; returns dict items (see module docstring).

    A defective image without a mask is an InputError naming the file, unless
    ``allow_missing_masks=True``, in which case its mask is all ones (the official code's fallback).
    A mask pixel is anomalous when its value exceeds ``mask_threshold`` (8-bit scale).
    """

    def __init__(
        self,
        records: Sequence[SampleRecord],
        image_size: int | Sequence[int] | None = 256,
        allow_missing_masks: bool = False,
        mask_threshold: float = 0,
    ) -> None:
        self.records = list(records)
        self.image_size = _normalise_size(image_size)
        self.allow_missing_masks = allow_missing_masks
        self.mask_threshold = check_mask_threshold(mask_threshold)
        if not allow_missing_masks:
            for record in self.records:
                if record.label == 1 and record.mask_path is None:
                    raise InputError(
                        f"{record.image_path}: defective image has no ground-truth mask "
                        "(add one, or pass allow_missing_masks=True to use an all-ones mask)"
                    )

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> list[int]:
        return [r.label for r in self.records]

    @property
    def categories(self) -> list[str]:
        """Distinct categories, in order of first appearance."""
        return list(dict.fromkeys(r.category for r in self.records))

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        pil = load_image(record.image_path)
        original = (pil.height, pil.width)
        size = self.image_size or original
        if original != size:
            pil = pil.resize((size[1], size[0]), Image.BILINEAR)
        image = pil_to_tensor(pil)
        if record.mask_path is not None:
            mask = load_mask(record.mask_path, threshold=self.mask_threshold)
            if tuple(mask.shape[-2:]) != original:
                raise InputError(
                    f"{record.mask_path}: mask is {mask.shape[-1]}x{mask.shape[-2]} pixels but its image "
                    f"{record.image_path} is {original[1]}x{original[0]} (width x height); masks must match their image"
                )
            if original != size:  # PIL's NEAREST, as the official loader
                binary = Image.fromarray(mask[0].numpy().astype(np.uint8) * 255).resize((size[1], size[0]), Image.NEAREST)
                mask = torch.from_numpy((np.asarray(binary) > 0).astype(np.float32))[None]
            if record.label == 0:
                mask.zero_()  # a normal image has no anomalous pixel, whatever a stray mask file says
        elif record.label == 1:
            mask = torch.ones(1, *size)
        else:
            mask = torch.zeros(1, *size)
        return {
            "image": image,
            "mask": mask,
            "label": record.label,
            "path": str(record.image_path),
            "category": record.category,
            "defect_type": record.defect_type,
        }

    def __repr__(self) -> str:
        normal = sum(1 for r in self.records if r.label == 0)
        return (
            f"AnomalyDataset({len(self)} images: {normal} normal, {len(self) - normal} defective; "
            f"categories={self.categories}, image_size={self.image_size})"
        )


# --------------------------------------------------------------------------------------------------
# helpers


def check_mask_threshold(value: float) -> float:
    """``value`` if it is a number in [0, 255): the 8-bit grey level above which a mask pixel is anomalous."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value < 255:
        raise InputError(f"`mask_threshold`: expected a number from 0 to 254 (8-bit grey level), got {value!r}")
    return value


def graded_masks(records: Iterable[SampleRecord]) -> tuple[int, int]:
    """(graded, total): how many distinct mask files of ``records`` are lossy or anti-aliased, i.e.
    more than ``GRADED_MASK_SHARE`` of their non-zero pixels hold intermediate values (1 to 254 for
    8-bit masks), and how many masks there are."""
    paths = list(dict.fromkeys(r.mask_path for r in records if r.mask_path is not None))
    graded = 0
    for path in paths:
        values, full_scale = read_mask_values(path)
        nonzero = values > 0
        if not nonzero.any() or values.max() <= full_scale / 2:
            continue
        intermediate = nonzero & (values < full_scale)
        graded += int(intermediate.sum() > GRADED_MASK_SHARE * nonzero.sum())
    return graded, len(paths)


def _warn_about_graded_masks(records: Sequence[SampleRecord], where: Path) -> None:
    graded, total = graded_masks(records)
    if graded:
        logger.warning(
            f"warning: {graded} of {total} masks in {where} have intermediate grey values (lossy or anti-aliased) in "
            f"more than {GRADED_MASK_SHARE:.0%} of their non-zero pixels; they are binarised with > 0, which enlarges "
            "their defects: pass `mask_threshold=127` to binarise them at mid-grey"
        )


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _mask_index(folder: Path) -> dict[str, Path]:
    """stem -> mask file for every image file in a folder (empty if the folder does not exist)."""
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in _image_files(folder)}


def _match_mask(index: dict[str, Path], stem: str) -> Path | None:
    """``<stem>_mask.*`` (MVTec AD) or ``<stem>.*`` (BTAD, VisA, many custom sets)."""
    return index.get(f"{stem}_mask") or index.get(stem) or index.get(f"{stem}_label")


def _is_normal_folder(name: str) -> bool:
    return name.lower() in NORMAL_FOLDER_NAMES


def _is_flat_folder(folder: Path) -> bool:
    """A folder of normal images (``good/``) beside defect folders, without train/test split."""
    return any(_is_normal_folder(p.name) for p in _subfolders(folder))


def _looks_like_category(folder: Path) -> bool:
    return any((folder / split).is_dir() for split in SPLITS)


def available_categories(root: str | Path, dataset: str = "mvtec-ad") -> list[str]:
    """Category names found under ``root`` for a dataset layout (for error messages and CLIs)."""
    root = Path(root)
    name = _resolve_dataset_name(dataset)
    if not root.is_dir():
        return []
    if name == "visa" and (root / "split_csv" / "1cls.csv").is_file():
        with open(root / "split_csv" / "1cls.csv", newline="") as handle:
            return sorted({row.get("object", "") for row in csv.DictReader(handle)} - {""})
    if name == "kolektorsdd":
        return ["kolektorsdd"]
    return [p.name for p in _subfolders(root) if _looks_like_category(p)]


def _resolve_dataset_name(dataset: str) -> str:
    key = dataset.strip().lower()
    if key in EXTRA_DATASETS:
        return EXTRA_DATASETS[key]
    try:
        return resolve_dataset(dataset)
    except InputError:
        raise InputError(
            f"unknown dataset {dataset!r}; known: mvtec-ad, visa, mpdd, btad, folder, kolektorsdd"
        ) from None


def _category_folder(root: Path, category: str | None, dataset: str) -> tuple[Path, str]:
    if category is None:
        if _looks_like_category(root):
            return root, root.name
        found = available_categories(root, dataset)
        raise InputError(f"{root}: no train/ or test/ folder; pass a category (available: {', '.join(found) or 'none'})")
    folder = root / category
    if not folder.is_dir():
        if _looks_like_category(root):
            _check_single_category(root, category)
            return root, category
        found = available_categories(root, dataset)
        raise InputError(f"{folder}: no such category folder (available in {root}: {', '.join(found) or 'none'})")
    return folder, category


def _check_single_category(root: Path, category: str) -> None:
    """``root`` is itself one category folder: only its own name may be asked for, never another
    name that would then label its images."""
    if category != root.name:
        raise InputError(
            f"category {category!r}: {root} is itself the single category {root.name!r} and has no "
            f"sub-folder {category!r}; omit the category or pass {root.name!r}"
        )


def split_normal_records(
    records: Iterable[SampleRecord], split: str, seed: int = 0, normal_test_fraction: float = 0.2
) -> list[SampleRecord]:
    """Deterministic train/test split for data without an official one.

    Normal records are shuffled with ``seed`` and ``round(normal_test_fraction * n)`` of them go to
    test (at least one stays in train); every defective record goes to test. The order of the input
    does not matter (records are sorted by path first).
    """
    if not 0.0 <= normal_test_fraction < 1.0:
        raise InputError(f"normal_test_fraction: expected a value in [0, 1), got {normal_test_fraction}")
    records = sorted(records, key=lambda r: str(r.image_path))
    normal = [r for r in records if r.label == 0]
    defective = [r for r in records if r.label == 1]
    order = np.random.default_rng(seed).permutation(len(normal))
    num_test = min(int(round(normal_test_fraction * len(normal))), max(len(normal) - 1, 0))
    test_ids = set(order[:num_test].tolist())
    if split == "train":
        return [r for i, r in enumerate(normal) if i not in test_ids]
    return [r for i, r in enumerate(normal) if i in test_ids] + defective


# --------------------------------------------------------------------------------------------------
# layouts


def _class_folder_records(category_dir: Path, category: str, split: str) -> list[SampleRecord]:
    """MVTec AD / MPDD / BTAD / VisA-1cls layout: ``<cat>/<split>/<type>/*``, ``<cat>/ground_truth/<type>/*``."""
    split_dir = category_dir / split
    if not split_dir.is_dir():
        found = [s for s in SPLITS if (category_dir / s).is_dir()]
        raise InputError(f"{split_dir}: no such split folder (found: {', '.join(found) or 'none'})")
    records = []
    for type_dir in _subfolders(split_dir):
        label = 0 if _is_normal_folder(type_dir.name) else 1
        masks = _mask_index(category_dir / "ground_truth" / type_dir.name) if label else {}
        for image_path in _image_files(type_dir):
            mask = _match_mask(masks, image_path.stem) if label else None
            records.append(SampleRecord(image_path, label, mask, category, type_dir.name))
    return records


def _visa_csv_records(root: Path, category: str, split: str) -> list[SampleRecord]:
    """The official VisA split file ``split_csv/1cls.csv``: object, split, label, image, mask."""
    csv_path = root / "split_csv" / "1cls.csv"
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"object", "split", "label", "image"} - set(reader.fieldnames or [])
        if missing:
            raise InputError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))}")
        rows = list(reader)
    objects = sorted({row["object"] for row in rows})
    if category not in objects:
        raise InputError(f"{csv_path}: no category {category!r} (available: {', '.join(objects)})")
    records = []
    for row in rows:
        if row["object"] != category or row["split"].strip().lower() != split:
            continue
        label = 0 if row["label"].strip().lower() in ("normal", "good", "ok", "0") else 1
        mask_text = (row.get("mask") or "").strip()
        mask = root / mask_text if label and mask_text else None
        if mask is not None and not mask.is_file():
            raise InputError(f"{mask}: mask listed in {csv_path} does not exist")
        records.append(SampleRecord(root / row["image"].strip(), label, mask, category, "anomaly" if label else "normal"))
    return records


def _flat_folder_records(root: Path) -> list[SampleRecord]:
    """``good/`` + defect subfolders, masks in ``masks/`` or ``ground_truth/`` (optionally per type)."""
    if not (root / "good").is_dir() and not any(_is_normal_folder(p.name) for p in _subfolders(root)):
        raise InputError(f"{root}: expected train/ and test/ folders, or a good/ folder of normal images")
    records = []
    for type_dir in _subfolders(root):
        if type_dir.name in MASK_FOLDER_NAMES:
            continue
        label = 0 if _is_normal_folder(type_dir.name) else 1
        masks: dict[str, Path] = {}
        if label:
            for mask_root in MASK_FOLDER_NAMES:  # a per-type subfolder wins over loose files
                masks.update(_mask_index(root / mask_root))
                masks.update(_mask_index(root / mask_root / type_dir.name))
        for image_path in _image_files(type_dir):
            mask = _match_mask(masks, image_path.stem) if label else None
            records.append(SampleRecord(image_path, label, mask, root.name, type_dir.name))
    return records


def _kolektor_records(root: Path, mask_threshold: float = 0) -> list[SampleRecord]:
    """KolektorSDD: ``kosNN/PartK.jpg`` with ``PartK_label.png|bmp``; defective iff the mask is non-empty."""
    records = []
    for part_dir in _subfolders(root):
        files = _image_files(part_dir)
        labels = {p.stem[: -len("_label")]: p for p in files if p.stem.endswith("_label")}
        for image_path in files:
            if image_path.stem.endswith("_label"):
                continue
            mask = labels.get(image_path.stem)
            if mask is None:
                raise InputError(f"{image_path}: no label image {image_path.stem}_label.* next to it")
            defective = bool(load_mask(mask, threshold=mask_threshold).any())
            records.append(SampleRecord(image_path, int(defective), mask if defective else None, "kolektorsdd", part_dir.name))
    if not records:
        raise InputError(f"{root}: no kosNN/PartK.jpg images found (KolektorSDD layout)")
    return records


def _category_records(root: Path, dataset: str, category: str | None, split: str, seed: int, fraction: float,
                      mask_threshold: float = 0) -> list[SampleRecord]:
    if dataset == "kolektorsdd":
        return split_normal_records(_kolektor_records(root, mask_threshold), split, seed, fraction)
    if dataset == "visa" and (root / "split_csv" / "1cls.csv").is_file():
        if category is None:
            raise InputError(f"{root}: pass a VisA category (available: {', '.join(available_categories(root, 'visa'))})")
        return _visa_csv_records(root, category, split)
    if dataset == "folder":
        if category is not None and (root / category).is_dir():
            root = root / category
        elif category is not None and (_looks_like_category(root) or _is_flat_folder(root)):
            _check_single_category(root, category)
        elif category is not None:
            found = available_categories(root, dataset)
            raise InputError(f"{root / category}: no such category folder (available in {root}: {', '.join(found) or 'none'})")
        if _looks_like_category(root):
            return _class_folder_records(root, category or root.name, split)
        return split_normal_records(_flat_folder_records(root), split, seed, fraction)
    category_dir, name = _category_folder(root, category, dataset)
    return _class_folder_records(category_dir, name, split)


def load_split(
    root: str | Path,
    dataset: str = "mvtec-ad",
    category: str | Sequence[str] | None = None,
    split: str = "train",
    image_size: int | Sequence[int] | None = 256,
    allow_missing_masks: bool = False,
    seed: int = 0,
    normal_test_fraction: float = 0.2,
    mask_threshold: float = 0,
) -> AnomalyDataset:
    """Read one split of a dataset (see the module docstring for layouts) as an :class:`AnomalyDataset`.

    ``seed`` and ``normal_test_fraction`` only matter for layouts without an official split
    (flat folders, KolektorSDD). ``image_size`` is an int, ``(height, width)`` or ``None`` (keep
    each image's own size; batches then need equal sizes). ``mask_threshold``: the 8-bit grey level
    above which a mask pixel is anomalous (0: any non-zero pixel; 127 for lossy masks).
    """
    check_mask_threshold(mask_threshold)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise InputError(f"{root}: no such dataset folder")
    split = split.strip().lower()
    if split not in SPLITS:
        raise InputError(f"split: expected 'train' or 'test', got {split!r}")
    name = _resolve_dataset_name(dataset)
    if isinstance(category, str) and category.lower() == "all":
        category = available_categories(root, name)
        if not category:
            raise InputError(f"{root}: no categories found for dataset {name}")
    categories: list[str | None] = [category] if category is None or isinstance(category, str) else list(category)
    for cat in categories:  # a name that becomes a path: never '../x' or an absolute path
        if cat is not None:
            path_component(cat, "category")
    records: list[SampleRecord] = []
    for cat in categories:
        records.extend(_category_records(root, name, cat, split, seed, normal_test_fraction, mask_threshold))
    if not records:
        where = root if len(categories) != 1 or categories[0] is None else root / str(categories[0])
        raise InputError(f"{where}: the {split} split holds no images")
    dataset = AnomalyDataset(records, image_size=image_size, allow_missing_masks=allow_missing_masks,
                             mask_threshold=mask_threshold)
    if mask_threshold == 0:
        _warn_about_graded_masks(dataset.records, root)
    return dataset
