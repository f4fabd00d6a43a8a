"""The data of a training run: normal training images per category, split into a training part and
a held-out part, their anomaly synthesizers, the synthetic-anomaly training set and the fixed
validation set. Only ever the training split of a data set is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from sia.errors import InputError

if TYPE_CHECKING:
    from .recipes import Recipe
    from .training import TrainingConfig


class _ImageOnly(Dataset):
    """A split dataset whose items carry only the normal image (what ``sia`` expects) and a
    run-wide key of that image (for the clean-feature cache)."""

    def __init__(self, dataset: Dataset, key_offset: int = 0) -> None:
        self.dataset = dataset
        self.key_offset = key_offset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        return {"image": item["image"] if isinstance(item, dict) else item, "image_key": self.key_offset + index}


@dataclass
class CategoryData:
    """The normal training images of one category, split into training and held-out parts."""

    name: str
    train: Dataset
    holdout: Dataset
    synthesizer: Any


def split_holdout(size: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of ``size`` training images into (train, held-out) index lists.

    Hold out ``round(fraction * size)`` images, at least 2 when ``fraction > 0`` and the set is big
    enough to keep 2 for training; smaller sets are not split.
    """
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"validation_fraction: expected a value in [0, 1), got {fraction}")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    n_holdout = int(round(fraction * size))
    if fraction > 0:
        n_holdout = max(n_holdout, 2)
    if size - n_holdout < 2:
        n_holdout = 0
    return sorted(order[n_holdout:]), sorted(order[:n_holdout])


def load_category_data(config: TrainingConfig, recipe: Recipe) -> list[CategoryData]:
    """Read each category's training split and build its anomaly synthesizer."""
    from sia.sources import make_source
    from sia.synthesizer import AnomalySynthesizer

    from .data import available_categories, load_split

    size = config.size
    names: list[Optional[str]] = list(config.categories) or [None]
    if len(names) == 1 and isinstance(names[0], str) and names[0].lower() == "all":
        names = list(available_categories(config.data, config.dataset))
        if not names:
            raise InputError(f"`data` {config.data}: no categories found for dataset {config.dataset}")
    out = []
    for index, category in enumerate(names):
        # Masks are not needed for training; defective images under train/ are skipped below.
        split = load_split(config.data, dataset=config.dataset, category=category, split="train", image_size=size,
                           allow_missing_masks=True, mask_threshold=config.mask_threshold)
        indices = [i for i, label in enumerate(split.labels) if label == 0]
        if not indices:
            raise InputError(f"`data` {config.data}: category {category!r} has no normal training images")
        category = category or Path(config.data).resolve().name
        if config.max_train_images is not None:
            indices = indices[: config.max_train_images]
        train_idx, holdout_idx = split_holdout(len(indices), config.validation_fraction, config.seed + index)
        base = _ImageOnly(split, key_offset=index * 10_000_000)
        preset = config.foreground or _foreground_preset(config.dataset, category)
        from sia.categories import DATASET_CATEGORIES

        known = any(category in names for names in DATASET_CATEGORIES.values())
        source = make_source(_source_spec_for(config.source, category), category=category if known else None)
        synthesizer = AnomalySynthesizer(source, category=preset, require_nonempty=recipe.nonempty_masks,
                                          mask_shape=recipe.mask_shape)
        out.append(
            CategoryData(
                name=category,
                train=Subset(base, [indices[i] for i in train_idx]),
                holdout=Subset(base, [indices[i] for i in holdout_idx]),
                synthesizer=synthesizer,
            )
        )
    return out


def _foreground_preset(dataset: str, category: str) -> str:
    """The ``sia`` foreground preset of a known category, ``"none"`` (whole image) otherwise."""
    from sia.foreground import FOREGROUND_PRESETS

    for name in (f"{dataset}/{category}", category):
        if name in FOREGROUND_PRESETS:
            return name
    return "none"


def _source_spec_for(spec: str, category: str) -> str:
    """For SIA folders holding one sub-folder per category, point at the category's sub-folder."""
    kind, _, path = spec.partition(":")
    if kind == "sia" and path and (Path(path) / category).is_dir():
        return f"sia:{Path(path) / category}"
    if not path and Path(spec).is_dir() and (Path(spec) / category).is_dir():
        return f"sia:{Path(spec) / category}"
    return spec


def build_training_dataset(categories: list[CategoryData], recipe: Recipe, seed: int, probability: Optional[float] = None):
    """The synthetic-anomaly training set and the datasets whose epoch must be advanced."""
    from sia.synthesizer import SyntheticAnomalyDataset

    if recipe.balanced_batches and probability is None:
        normal = [SyntheticAnomalyDataset(c.train, c.synthesizer, probability=0.0, seed=seed + i) for i, c in enumerate(categories)]
        anomalous = [
            SyntheticAnomalyDataset(c.train, c.synthesizer, probability=1.0, seed=seed + 7919 + i)
            for i, c in enumerate(categories)
        ]
        parts = normal + anomalous
        dataset = ConcatDataset([ConcatDataset(normal), ConcatDataset(anomalous)])
        return dataset, parts, len(dataset) // 2
    p = recipe.anomaly_probability if probability is None else probability
    parts = [SyntheticAnomalyDataset(c.train, c.synthesizer, probability=p, seed=seed + i) for i, c in enumerate(categories)]
    return ConcatDataset(parts), parts, None


def validation_set(categories: list[CategoryData], seed: int) -> Optional[dict]:
    """Held-out normal images plus one fixed synthetic anomaly of each: images, masks, labels."""
    from sia.synthesizer import SyntheticAnomalyDataset

    images, masks, labels = [], [], []
    for i, category in enumerate(categories):
        if len(category.holdout) == 0:
            continue
        anomalous = SyntheticAnomalyDataset(category.holdout, category.synthesizer, probability=1.0, seed=seed + 104729 + i)
        for j in range(len(category.holdout)):
            normal_image = category.holdout[j]["image"]
            images.append(normal_image)
            masks.append(torch.zeros_like(normal_image[:1]))
            labels.append(0)
            item = anomalous[j]
            images.append(item["image"])
            masks.append(item["mask"])
            labels.append(1 if bool(item["mask"].any()) else 0)
    if not images or len(set(labels)) < 2:
        return None
    return {"images": torch.stack(images), "masks": torch.stack(masks), "labels": torch.tensor(labels)}
