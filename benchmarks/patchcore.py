"""A small PatchCore (Roth et al., CVPR 2022) baseline for the recipe benchmark.

Same frozen backbone as the RealNet runs; mid-level stages (for EfficientNet-Lite0 the 40- and
112-channel stages), 3x3 neighbourhood averaging, the coarser stage upsampled to the finer one,
a 10 % greedy coreset (on a random 128-d projection), nearest-neighbour patch distances, a bilinear
upsample to the image size and a Gaussian blur (sigma 4). The image score is the max patch score
reweighted with its k = 9 nearest memory-bank neighbours, as in the paper.

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
class PatchCoreResult:
    maps: np.ndarray  # (N,H,W)
    scores: np.ndarray  # (N,)
    fit_seconds: float
    predict_seconds: float
    memory_bank: int


def patch_embeddings(backbone, images: torch.Tensor, batch_size: int = 8) -> tuple[torch.Tensor, tuple[int, int]]:
    """(N*h*w, D) locally aggregated patch features of the backbone's levels, at the finest level's grid."""
    out = []
    grid = None
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            features = backbone(images[start : start + batch_size])
            grid = features[0].shape[-2:]
            pooled = [F.avg_pool2d(f, 3, stride=1, padding=1) for f in features]
            aligned = [p if p.shape[-2:] == grid else F.interpolate(p, size=grid, mode="bilinear", align_corners=False) for p in pooled]
            merged = torch.cat(aligned, dim=1)
            out.append(merged.permute(0, 2, 3, 1).reshape(-1, merged.shape[1]))
    return torch.cat(out), tuple(grid)


def greedy_coreset(bank: torch.Tensor, fraction: float, seed: int = 0, projection_dim: int = 128) -> torch.Tensor:
    """Indices of an approximately minimax-facility-location coreset (iterative farthest point)."""
    count = max(1, round(fraction * bank.shape[0]))
    generator = torch.Generator().manual_seed(seed)
    if bank.shape[1] > projection_dim:
        projection = torch.randn(bank.shape[1], projection_dim, generator=generator) / projection_dim**0.5
        reduced = bank @ projection
    else:
        reduced = bank
    norms = reduced.pow(2).sum(1)

    def squared_distances(index: int) -> torch.Tensor:
        return norms - 2.0 * (reduced @ reduced[index]) + norms[index]

    selected = [int(torch.randint(bank.shape[0], (1,), generator=generator))]
    distances = squared_distances(selected[-1])
    for _ in range(count - 1):
        index = int(torch.argmax(distances))
        selected.append(index)
        torch.minimum(distances, squared_distances(index), out=distances)
    return torch.tensor(selected)


def nearest(queries: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances and indices of the k nearest bank rows for every query (chunked)."""
    dists, idxs = [], []
    for start in range(0, queries.shape[0], chunk):
        d = torch.cdist(queries[start : start + chunk], bank)
        values, indices = d.topk(k, dim=1, largest=False)
        dists.append(values)
        idxs.append(indices)
    return torch.cat(dists), torch.cat(idxs)


def run_patchcore(
    backbone,
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    coreset_fraction: float = 0.1,
    k: int = 9,
    sigma: float = 4.0,
    seed: int = 0,
) -> PatchCoreResult:
    """Fit on normal ``train_images`` (N,3,H,W) in [0,1] and score ``test_images``."""
    start = time.perf_counter()
    bank, _ = patch_embeddings(backbone, train_images)
    coreset = bank[greedy_coreset(bank, coreset_fraction, seed)]
    fit_seconds = time.perf_counter() - start

    start = time.perf_counter()
    queries, grid = patch_embeddings(backbone, test_images)
    distances, indices = nearest(queries, coreset, k=1)
    patch_scores = distances[:, 0].reshape(test_images.shape[0], *grid)
    size = test_images.shape[-2:]
    maps = F.interpolate(patch_scores[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].numpy()
    maps = np.stack([ndimage.gaussian_filter(m, sigma=sigma) for m in maps])
    per_image = queries.reshape(test_images.shape[0], -1, queries.shape[1])
    flat_scores = patch_scores.reshape(test_images.shape[0], -1)
    flat_nn = indices[:, 0].reshape(test_images.shape[0], -1)
    scores = []
    for i in range(test_images.shape[0]):
        j = int(torch.argmax(flat_scores[i]))
        query = per_image[i, j][None]
        anchor = coreset[flat_nn[i, j]][None]
        _, neighbours = nearest(anchor, coreset, k=min(k, coreset.shape[0]))
        neighbour_distances = torch.cdist(query, coreset[neighbours[0]])[0]
        weight = 1.0 - torch.softmax(neighbour_distances, dim=0)[0]
        scores.append(float(weight * flat_scores[i, j]))
    predict_seconds = time.perf_counter() - start
    return PatchCoreResult(maps=maps.astype(np.float32), scores=np.asarray(scores), fit_seconds=fit_seconds,
                           predict_seconds=predict_seconds, memory_bank=int(coreset.shape[0]))
