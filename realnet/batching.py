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

    ``groups`` (the sizes of consecutive categories in each half) balances a multi-class run: each
    half then takes its images from the categories in turn, so a small category is trained as often
    as a large one instead of in proportion to its size; an epoch keeps its length.
    """

    def __init__(self, size: int, batch_size: int, seed: int, groups: Optional[Sequence[int]] = None) -> None:
        if batch_size < 2:
            raise InputError("batch_size: balanced batches need at least 2 images per batch")
        self.size, self.batch_size, self.seed, self.epoch = int(size), int(batch_size), int(seed), 0
        self.groups = [int(g) for g in groups] if groups is not None else None
        if self.groups is not None and (sum(self.groups) != self.size or min(self.groups, default=0) < 1):
            raise InputError(f"groups: expected positive category sizes summing to {self.size}, got {self.groups}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.size / (self.batch_size // 2))

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.groups is None or len(self.groups) < 2:
            normal = torch.randperm(self.size, generator=generator).tolist()
            anomalous = (torch.randperm(self.size, generator=generator) + self.size).tolist()
        else:
            normal = self._categories_in_turn(generator)
            anomalous = [i + self.size for i in self._categories_in_turn(generator)]
        n_anomalous = self.batch_size // 2
        n_normal = self.batch_size - n_anomalous
        for b in range(len(self)):
            picks_n = [normal[(b * n_normal + i) % self.size] for i in range(n_normal)]
            picks_a = [anomalous[(b * n_anomalous + i) % self.size] for i in range(n_anomalous)]
            yield picks_n + picks_a

    def _categories_in_turn(self, generator: torch.Generator) -> list[int]:
        """``size`` indexes, the k-th from category ``k mod C`` (which category starts is drawn), each
        category's images in a fresh shuffled order, cycled when a small category runs out."""
        offsets = [sum(self.groups[:c]) for c in range(len(self.groups))]
        orders = [(torch.randperm(n, generator=generator) + offset).tolist() for n, offset in zip(self.groups, offsets)]
        first = int(torch.randint(len(self.groups), (1,), generator=generator))
        taken = [0] * len(self.groups)
        picks = []
        for k in range(self.size):
            c = (first + k) % len(self.groups)
            picks.append(orders[c][taken[c] % self.groups[c]])
            taken[c] += 1
        return picks


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
