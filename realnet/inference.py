"""The one batched inference loop: a model over many images -> anomaly maps and image scores.

`RealNet.predict`, validation during training, threshold calibration, evaluation on a test split,
`realnet predict` and the check after `realnet export` all run the model through `predict_batches`,
so eval mode, gradients, device placement and output dtype are handled the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sia.errors import InputError

OnBatch = Callable[[Any], object]


@dataclass
class RealNetPrediction:
    anomaly_map: torch.Tensor  # (B,1,H,W) on CPU
    image_score: torch.Tensor  # (B,) on CPU


def _slices(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, images.shape[0], batch_size):
        yield images[start : start + batch_size]


def _to_cpu(values: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return (values if dtype is None else values.to(dtype)).cpu()


def predict_batches(
    model: nn.Module,
    images: torch.Tensor | Iterable[torch.Tensor],
    batch_size: int = 16,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = torch.float32,
    on_batch: OnBatch | None = None,
    what: str = "images",
) -> RealNetPrediction:
    """Anomaly maps (N,1,H,W) and image scores (N,) on the CPU, in eval mode and without gradients.

    Args:
        model: a RealNet, or any module whose output has ``anomaly_map`` and ``image_score``;
            its train/eval mode is restored afterwards.
        images: one tensor (N,3,H,W), cut into batches of `batch_size`, or an iterable of batches
            (e.g. the images of a DataLoader's batches; `batch_size` is then unused).
        device: where each batch is moved before the model sees it (default: the model's).
        dtype: of the returned maps and scores (default float32, what metrics and files expect);
            None keeps the model's own.
        on_batch: called with each batch's model output, e.g. to advance a progress bar or to keep
            further outputs (RRS indices).
        what: names the images in the error for an empty input.
    """
    device = next(model.parameters()).device if device is None else device
    batches = _slices(images, batch_size) if isinstance(images, torch.Tensor) else images
    maps, scores = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                output = model(batch.to(device))
                maps.append(_to_cpu(output.anomaly_map, dtype))
                scores.append(_to_cpu(output.image_score, dtype))
                if on_batch is not None:
                    on_batch(output)
    finally:
        model.train(was_training)
    if not maps:
        raise InputError(f"{what}: no images")
    return RealNetPrediction(anomaly_map=torch.cat(maps), image_score=torch.cat(scores))
