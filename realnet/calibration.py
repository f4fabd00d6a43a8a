"""Normal-only decision thresholds, stored with a trained model so predictions need no ground truth."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .validation import predict_tensors

if TYPE_CHECKING:
    from .training_data import CategoryData


def calibrate_thresholds(model: nn.Module, normal_images: torch.Tensor, false_positive_rate: float, batch_size: int = 16, what: str = "") -> dict:
    """Normal-only decision thresholds (no defect or ground truth needed).

    - ``image_threshold``: the ``1 - fpr`` quantile of the image scores of normal images, so about
      ``fpr`` of normal images are flagged;
    - ``pixel_threshold``: the ``1 - fpr`` quantile of each normal image's *maximum* pixel score, so
      the predicted mask of about ``1 - fpr`` of normal images is empty.
    With few images the quantile sits at (or interpolates towards) the largest normal score.
    """
    from .metrics import quantile_threshold

    maps, scores = predict_tensors(model, normal_images, batch_size)
    q = 1.0 - false_positive_rate
    return {
        "image_threshold": quantile_threshold(scores.numpy(), q),
        "pixel_threshold": quantile_threshold(maps.flatten(1).max(dim=1).values.numpy(), q),
        "false_positive_rate": false_positive_rate,
        "rule": "1-fpr quantile of normal image scores / of per-image max pixel scores",
        "calibration_images": int(normal_images.shape[0]),
        "calibrated_on": what,
    }


def calibrate_on_held_out_images(model: nn.Module, categories: list[CategoryData], false_positive_rate: float,
                                 batch_size: int) -> dict:
    """Thresholds from the held-out normal training images (all training images if none are held out)."""
    holdout = [c.holdout[j]["image"] for c in categories for j in range(len(c.holdout))]
    what = "held-out normal training images (never used for training)"
    if not holdout:
        holdout = [c.train[j]["image"] for c in categories for j in range(len(c.train))]
        what = "normal training images (no held-out split; thresholds are optimistic)"
    return calibrate_thresholds(model, torch.stack(holdout), false_positive_rate, batch_size, what)
