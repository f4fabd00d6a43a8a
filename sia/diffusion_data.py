"""Normal (defect-free) training images for the class-conditional SDAS diffusion model.

Supported layouts under `root` (checked in this order):

* MVTec-style benchmark folders: `<root>/<category>/train/good/*` (MVTec AD, MPDD, VisA in
  MVTec layout) or `<root>/<category>/train/ok/*` (BTAD);
* generic folders: `<root>/<category>/**/*.png|jpg|...`, one sub-folder per category (a folder
  with `test/` or `ground_truth/` but no `train/good|ok` is refused: its defects and masks would
  otherwise become "normal" training images);
* a single folder of images: one category (named by `categories` if one name is given, else by
  the folder's name).

Class ids are positions in the category list. Without an explicit list, categories that all
belong to one known benchmark keep that benchmark's official order (so converted official
checkpoints keep their labels); other names are sorted.

Batches are a pure function of (seed, micro-step): the stream is a concatenation of per-epoch
permutations, so a resumed run draws exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .categories import DATASET_CATEGORIES
from .errors import InputError
from .images import IMAGE_EXTENSIONS, list_images, load_image_tensor
from .paths import path_component

NORMAL_TRAIN_SUBFOLDERS = (("train", "good"), ("train", "ok"))
#: Sub-folders of a benchmark category that hold defects or masks, never normal training images.
ANOMALY_SUBFOLDERS = ("test", "ground_truth")


@dataclass(frozen=True)
class TrainingImage:
    path: Path
    class_id: int


def _has_images(folder: Path, recursive: bool) -> bool:
    pattern = "**/*" if recursive else "*"
    return any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.glob(pattern))


def _refuse_benchmark_without_normal_split(folder: Path) -> None:
    """A benchmark-like folder (test/ or ground_truth/) without train/good|ok must not be read whole.

    Reading it recursively would make defect images and their masks "normal" training data.
    """
    found = [name for name in ANOMALY_SUBFOLDERS if (folder / name).is_dir()]
    if found:
        raise InputError(f"`data_dir` {folder}: has {' and '.join(n + '/' for n in found)} but no train/good or train/ok; "
                         "expected the normal images in train/good (or train/ok), or a folder of normal images only")


def _category_images(folder: Path) -> list[Path]:
    """Normal training images of one category folder (benchmark split first, else every image)."""
    for parts in NORMAL_TRAIN_SUBFOLDERS:
        split = folder.joinpath(*parts)
        if split.is_dir():
            return list_images(split, what=f"category folder {folder.name} ({'/'.join(parts)})")
    _refuse_benchmark_without_normal_split(folder)
    return list_images(folder, what=f"category folder {folder.name}")


def _official_order(names: list[str]) -> list[str]:
    for ordered in DATASET_CATEGORIES.values():
        if set(names) <= set(ordered):
            return [name for name in ordered if name in names]
    return sorted(names)


def discover_training_images(root: str | Path, categories: list[str] | None = None) -> tuple[list[str], list[TrainingImage]]:
    """Find the normal training images under `root`; returns (category names, images with class ids)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"`data_dir` {root}: no such folder")
    # every name becomes a folder of `sia generate` and a class of the saved pipeline
    categories = [path_component(c.strip(), "`categories`") for c in categories or [] if c.strip()]
    if len(set(categories)) != len(categories):
        raise InputError(f"`categories`: duplicate names in {','.join(categories)}")
    own_split = any(root.joinpath(*parts).is_dir() for parts in NORMAL_TRAIN_SUBFOLDERS)
    if not own_split:  # else test/ and ground_truth/ would be taken for two categories
        _refuse_benchmark_without_normal_split(root)
    subfolders = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and _has_images(p, recursive=True)}
    named_subfolders = bool(categories) and all(c in subfolders for c in categories)
    is_category_root = not own_split and subfolders and (named_subfolders or not _has_images(root, recursive=False))

    if is_category_root:
        if categories:
            missing = [c for c in categories if c not in subfolders]
            if missing:
                raise InputError(f"`categories`: no image folder for {', '.join(missing)} under {root} "
                                 f"(found: {', '.join(subfolders)})")
            names = categories
        else:
            names = _official_order(list(subfolders))
        items = [TrainingImage(path, class_id) for class_id, name in enumerate(names)
                 for path in _category_images(subfolders[name])]
        return names, items

    if len(categories) > 1:
        raise InputError(f"`data_dir` {root}: a single image folder holds one category, but `categories` names {len(categories)}")
    name = categories[0] if categories else root.name
    return [name], [TrainingImage(path, 0) for path in _category_images(root)]


class NormalImageDataset(Dataset):
    """Images resized (bilinear, no crop) to `image_size` and scaled to [-1, 1], with class ids.

    An item key is an index, or `(index, flip)` to mirror the image horizontally.
    """

    def __init__(self, items: list[TrainingImage], image_size: int):
        if not items:
            raise InputError("training data: no images found")
        self.items = list(items)
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, bool]) -> tuple[torch.Tensor, int]:
        index, flip = key if isinstance(key, tuple) else (key, False)
        item = self.items[index]
        image = load_image_tensor(item.path, size=(self.image_size, self.image_size)) * 2.0 - 1.0
        if flip:
            image = image.flip(-1)
        return image, item.class_id


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from several integers (seed, step, rank, ...)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def batch_keys(num_items: int, global_batch: int, micro_step: int, rank: int, world_size: int,
               seed: int, horizontal_flip: bool = False) -> list[tuple[int, bool]]:
    """Dataset keys of this process's share of global micro-batch `micro_step`.

    Global position p maps to epoch p // num_items and slot p % num_items of that epoch's
    permutation, so every image is seen once per epoch and no batch is ever short.
    """
    start = micro_step * global_batch
    positions = range(start + rank, start + global_batch, world_size)
    keys: list[tuple[int, bool]] = []
    permutations: dict[int, torch.Tensor] = {}
    for position in positions:
        epoch, slot = divmod(position, num_items)
        if epoch not in permutations:
            generator = torch.Generator().manual_seed(mix_seed(seed, epoch, 0x5EED))
            permutations[epoch] = torch.randperm(num_items, generator=generator)
        flip = False
        if horizontal_flip:
            flip = bool(torch.rand((), generator=torch.Generator().manual_seed(mix_seed(seed, position, 0xF11F))) < 0.5)
        keys.append((int(permutations[epoch][slot]), flip))
    return keys
