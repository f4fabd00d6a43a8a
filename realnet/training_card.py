"""The model card of a trained RealNet: what it was trained on, how, and under which licence."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from .image_size import format_image_size

if TYPE_CHECKING:
    from .recipes import Recipe
    from .training import TrainingConfig, TrainingProgress
    from .training_data import CategoryData


def write_training_card(model_dir: Path, model: nn.Module, config: TrainingConfig, recipe: Recipe,
                categories: list[CategoryData], selected: int, progress: TrainingProgress, num_processes: int) -> None:
    """Model card with the licence of the training images (the mixin's default says MIT)."""
    from sia.cards import SOURCE_DATASETS
    from sia.categories import DATASET_ALIASES

    from .cards import write_realnet_card

    dataset = DATASET_ALIASES.get(config.dataset.strip().lower())
    names = [c.name for c in categories]
    training = {
        "recipe": recipe.name, "iterations": progress.iteration, "saved weights": f"{config.select} (iteration {selected})",
        "batch size per process": recipe.batch_size, "processes": num_processes, "image size": format_image_size(config.size),
        "anomaly source": config.source, "AFS batches": config.afs_batches, "seed": config.seed,
        "training images": sum(len(c.train) for c in categories),
        "held-out normal images": sum(len(c.holdout) for c in categories),
    }
    if config.select == "best" and math.isfinite(progress.best_score):
        training["validation score (held-out normal images + synthetic anomalies)"] = progress.best_score
    facts: dict[str, Any] = {
        "dataset": dataset if dataset in SOURCE_DATASETS else None,
        "category": names[0] if len(names) == 1 else ", ".join(names),
        "backbone": getattr(getattr(model, "backbone", None), "name", None) or config.backbone or "wide_resnet50_2",
        "image_size": list(config.size), "training": training,
        "source": f"trained with `realnet train` on the normal training images of {', '.join(names)}",
    }
    write_realnet_card(model_dir, **facts)
