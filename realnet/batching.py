"""Batches of the training run: deterministic per (seed, epoch), so a resumed run sees the same ones."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
from torch.utils.data import Dataset, Sampler

from sia.errors import InputError


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffled batches over ``size`` items; the order depends only on (seed, epoch). Keeps the last
    partial batch, like the official loader (drop_last=False)."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        self.size, self.batch_size, self.seed, self.epoch = int(size), int(batch_size), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        for start in range(0, self.size, self.batch_size):
            yield order[start : start + self.batch_size]


class BalancedBatchSampler(Sampler[list[int]]):
    """Batches with exactly ``batch_size // 2`` anomalous items and the rest normal.

    Indexes a dataset laid out as ``[normal_0..normal_{n-1}, anomalous_0..anomalous_{n-1}]``; both
    halves are shuffled independently per epoch; an epoch ends when every image has appeared once as
    an anomaly (and at least once as a normal image).
    """

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        if batch_size < 2:
            raise InputError("batch_size: balanced batches need at least 2 images per batch")
        self.size, self.batch_size, self.seed, self.epoch = int(size), int(batch_size), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.size / (self.batch_size // 2))

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        normal = torch.randperm(self.size, generator=generator).tolist()
        anomalous = (torch.randperm(self.size, generator=generator) + self.size).tolist()
        n_anomalous = self.batch_size // 2
        n_normal = self.batch_size - n_anomalous
        for b in range(len(self)):
            picks_n = [normal[(b * n_normal + i) % self.size] for i in range(n_normal)]
            picks_a = [anomalous[(b * n_anomalous + i) % self.size] for i in range(n_anomalous)]
            yield picks_n + picks_a


def collate(items: list[dict]) -> dict:
    """Stack tensors; keep the rest as lists (sources, paths)."""
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], (bool, int, float)):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


def seeded_batches(dataset: Dataset, batch_size: int, seed: int, limit: Optional[int] = None,
             parts: Sequence[Any] = ()) -> Iterator[dict]:
    """Shuffled, collated batches of a dataset; ``limit`` batches in all (wrapping around).

    Each wrap is a new epoch: the order changes and so do the synthetic anomalies of ``parts``
    (the datasets whose ``set_epoch`` draws fresh ones).
    """
    produced, epoch = 0, 0
    while True:
        for part in parts:
            part.set_epoch(epoch)
        for indices in EpochBatchSampler(len(dataset), batch_size, seed + epoch):
            if limit is not None and produced >= limit:
                return
            yield collate([dataset[i] for i in indices])
            produced += 1
        epoch += 1
        if limit is None:
            return
