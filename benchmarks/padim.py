"""A small PaDiM (Defard et al., ICPR 2021) baseline for the recipe benchmark.

Not anomalib's ``Padim``: that one builds its own backbone and would need timm weights from the
Hub; this one runs on the same frozen backbone object as the RealNet and PatchCore runs. As in the
paper: the first three stages (for EfficientNet-Lite0 the 24-, 40- and 112-channel ones) concatenated
on the second stage's grid (stride 8 rather than the paper's 4, which keeps the per-position
covariances small at 640x256), a fixed random subset of ``dims`` channels, one Gaussian per
grid position (mean and covariance over the normal training images, covariance + 0.01·I), the
Mahalanobis distance as the patch score, a bilinear upsample to the image size and a Gaussian blur
(sigma 4); the image score is the map's maximum.

This is a reference point only, not part of the library.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


@dataclass
class PaDiMResult:
    maps: np.ndarray  # (N,H,W)
    scores: np.ndarray  # (N,)
    fit_seconds: float
    predict_seconds: float
    dims: int


def embeddings(backbone, images: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w): the chosen channels of all levels on the second level's grid (stride 8 for
    Lite0: the finest level is average-pooled, the coarser ones nearest-upsampled)."""
    with torch.no_grad():
        features = backbone(images)
    grid = features[min(1, len(features) - 1)].shape[-2:]
    aligned = [F.adaptive_avg_pool2d(f, grid) if f.shape[-2] > grid[0] else
               f if f.shape[-2:] == grid else F.interpolate(f, size=grid, mode="nearest") for f in features]
    return torch.cat(aligned, dim=1)[:, channels]


def run_padim(backbone, train_images: torch.Tensor, test_images: torch.Tensor, dims: int = 100, sigma: float = 4.0,
              seed: int = 0, batch_size: int = 8) -> PaDiMResult:
    """Fit on normal ``train_images`` (N,3,H,W) in [0,1] and score ``test_images``."""
    start = time.perf_counter()
    total = sum(backbone.channels)
    channels = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: min(dims, total)].sort().values
    sums = squares = None
    count = 0
    for first in range(0, train_images.shape[0], batch_size):  # running sums: never all embeddings at once
        batch = embeddings(backbone, train_images[first : first + batch_size], channels).double()
        _, d, h, w = batch.shape
        flat = batch.permute(2, 3, 0, 1).reshape(h * w, batch.shape[0], d)  # (P, B, D)
        sums = flat.sum(1) if sums is None else sums + flat.sum(1)
        outer = flat.transpose(1, 2) @ flat
        squares = outer if squares is None else squares + outer
        count += batch.shape[0]
    mean = sums / count
    covariance = (squares - count * mean[:, :, None] * mean[:, None, :]) / max(count - 1, 1)
    covariance += 0.01 * torch.eye(d, dtype=torch.float64)
    precision = torch.linalg.inv(covariance).float()  # (P, D, D)
    mean = mean.float()
    del sums, squares, covariance
    fit_seconds = time.perf_counter() - start

    start = time.perf_counter()
    maps = []
    for first in range(0, test_images.shape[0], batch_size):
        test = embeddings(backbone, test_images[first : first + batch_size], channels)
        diff = test.permute(2, 3, 0, 1).reshape(h * w, test.shape[0], d) - mean[:, None]  # (P, B, D)
        squared = torch.einsum("pbd,pde,pbe->pb", diff, precision, diff).clamp_min(0)
        distance = squared.sqrt().T.reshape(test.shape[0], 1, h, w)
        up = F.interpolate(distance, size=test_images.shape[-2:], mode="bilinear", align_corners=False)[:, 0].numpy()
        maps.extend(ndimage.gaussian_filter(m, sigma=sigma) for m in up)
    maps_array = np.stack(maps).astype(np.float32)
    predict_seconds = time.perf_counter() - start
    return PaDiMResult(maps=maps_array, scores=maps_array.reshape(len(maps_array), -1).max(axis=1),
                       fit_seconds=fit_seconds, predict_seconds=predict_seconds, dims=int(channels.numel()))
