"""Validation during training: the model's maps and scores on held-out images with fixed synthetic
anomalies (never the test set)."""

from __future__ import annotations

import torch
from torch import nn

from .inference import predict_batches


def predict_tensors(model: nn.Module, images: torch.Tensor, batch_size: int = 16, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly maps (N,H,W) and image scores (N,) of a tensor of images, in eval mode."""
    prediction = predict_batches(model, images, batch_size, device=device)
    return prediction.anomaly_map[:, 0], prediction.image_score


def validation_metrics(model: nn.Module, validation: dict, batch_size: int = 16) -> dict:
    """Image and pixel AUROC on the held-out images with their fixed synthetic anomalies."""
    from .metrics import image_auroc, pixel_auroc

    maps, scores = predict_tensors(model, validation["images"], batch_size)
    masks = validation["masks"][:, 0]
    image = image_auroc(scores.numpy(), validation["labels"].numpy())
    pixel = pixel_auroc(maps.numpy(), masks.numpy())
    return {"val_image_auroc": image, "val_pixel_auroc": pixel, "val_score": 0.5 * (image + pixel)}
