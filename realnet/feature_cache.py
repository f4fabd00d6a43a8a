"""Cache of the clean images' selected features, the reconstruction targets of training."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class CleanFeatureCache:
    """Selected backbone features of the clean training images, computed once.

    The backbone is frozen and AFS/standardisation are fixed before training, so the reconstruction
    target of a normal training image never changes; caching it saves half of the backbone's work
    per step. Bounded by ``max_bytes``; images beyond the budget are recomputed every time.

    Fill it with :meth:`fill` before training: a cache filled lazily holds whatever the first
    batches after the start computed, and a resumed run starts at another batch than the
    uninterrupted one, so it would cache other images (beyond the budget) and values computed in
    other batch compositions, whose last bits some CPU kernels change. Filled in a fixed order and
    fixed batches, the cache is the same for a run and every resume of it.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.used = 0
        self.store: dict[int, list[torch.Tensor]] = {}

    @torch.no_grad()
    def features(self, model, keys: torch.Tensor, clean_images: torch.Tensor) -> list[torch.Tensor]:
        keys = [int(k) for k in keys]
        missing = [j for j, k in enumerate(keys) if k not in self.store]
        fresh: dict[int, list[torch.Tensor]] = {}
        if missing:
            computed = model.selected_features(clean_images[missing])
            for position, j in enumerate(missing):
                fresh[keys[j]] = [level[position].detach().clone() for level in computed]
                size = sum(t.numel() * t.element_size() for t in fresh[keys[j]])
                if self.used + size <= self.max_bytes:
                    self.store[keys[j]] = fresh[keys[j]]
                    self.used += size
        per_item = [self.store.get(k) or fresh[k] for k in keys]
        return [torch.stack([item[level] for item in per_item]) for level in range(len(per_item[0]))]

    @torch.no_grad()
    def fill(self, model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Cache ``(keys, clean_images)`` batches in the order given, until the budget is spent."""
        for keys, clean_images in batches:
            self.features(model, keys, clean_images)
            if any(int(k) not in self.store for k in keys):
                return
