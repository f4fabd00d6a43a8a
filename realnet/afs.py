"""AFS, anomaly-aware feature selection (the RealNet paper's AFS step, official `init_idxs`).

A channel is worth reconstructing if its residual between anomalous and clean features looks like
the anomaly mask. For every channel the score is the mean squared difference between the
min-max-normalised squared residual and the mask (nearest-downsampled to the feature size),
accumulated over many batches of synthetic anomalies; the channels with the *lowest* loss are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from sia.errors import InputError

DEFAULT_AFS_BATCHES = 64
MINMAX_EPS = 1e-4

FeatureFn = Callable[[torch.Tensor], Sequence[torch.Tensor]]


def unpack_afs_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accept `(images, clean_images, masks)` tuples or dicts with `image`, `clean_image`, `mask`."""
    if isinstance(batch, dict):
        try:
            return batch["image"], batch["clean_image"], batch["mask"]
        except KeyError as err:
            raise InputError(f"AFS batch: dict batches need keys 'image', 'clean_image', 'mask' (missing {err})") from None
    if isinstance(batch, (tuple, list)) and len(batch) >= 3:
        return batch[0], batch[1], batch[2]
    raise InputError("AFS batch: expected (anomalous images, clean images, masks) or a dict with those keys")


def check_afs_batch(images: Any, clean_images: Any, masks: Any) -> torch.Tensor:
    """Check one AFS batch's shapes and return its masks as (B,1,H,W) floats in {0,1}.

    Masks are binarised with `> 0`, so 0/255 and soft masks give the loss of a {0,1} label instead
    of a meaningless one; wrong shapes are refused here rather than inside `F.interpolate`.
    """
    for what, value in (("images", images), ("clean images", clean_images)):
        if not isinstance(value, torch.Tensor) or value.ndim != 4:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise InputError(f"AFS batch: expected {what} as a tensor (B,3,H,W), got {shape}")
    if clean_images.shape != images.shape:
        raise InputError(
            f"AFS batch: clean images {tuple(clean_images.shape)} must have the shape of the anomalous images "
            f"{tuple(images.shape)}"
        )
    if not isinstance(masks, torch.Tensor) or masks.ndim not in (3, 4) or (masks.ndim == 4 and masks.shape[1] != 1):
        shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise InputError(f"AFS batch: expected masks as a tensor (B,H,W) or (B,1,H,W), got {shape}")
    masks = masks[:, None] if masks.ndim == 3 else masks
    expected = (images.shape[0], 1, *images.shape[-2:])
    if tuple(masks.shape) != expected:
        raise InputError(f"AFS batch: masks {tuple(masks.shape)} do not match the images; expected {expected}")
    return (masks > 0).float()


def channel_losses(anomalous: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-channel AFS loss of one batch for one layer: (B,C,h,w) features, (B,1,H,W) mask -> (C,)."""
    b, c, h, w = anomalous.shape
    residual = (anomalous.float() - clean.float()).pow(2).transpose(0, 1).reshape(c, b * h * w)
    low = residual.min(dim=1, keepdim=True).values
    high = residual.max(dim=1, keepdim=True).values
    normalised = (residual - low) / (high - low + MINMAX_EPS)
    label = F.interpolate(mask.float(), size=(h, w), mode="nearest").transpose(0, 1).reshape(1, b * h * w)
    return (normalised - label).pow(2).mean(dim=1)


def _cycle(batches: Iterable[Any], limit: int):
    """Yield `limit` batches, starting over when a re-iterable source runs out (as the official loop)."""
    produced = 0
    while produced < limit:
        started = produced
        for batch in batches:
            yield batch
            produced += 1
            if produced >= limit:
                return
        if produced == started or iter(batches) is batches:
            return


@torch.no_grad()
def accumulate_channel_losses(
    batches: Iterable[Any],
    feature_fn: FeatureFn,
    num_batches: int = DEFAULT_AFS_BATCHES,
    on_batch: Callable[[], object] | None = None,
) -> list[torch.Tensor]:
    """Sum the per-channel AFS losses of every layer over `num_batches` batches.

    `feature_fn` maps images (B,3,H,W) in [0,1] to the list of full backbone feature maps. All layers
    share the same batches (the official code draws fresh anomalies per layer group; the expected
    loss is the same). `on_batch` is called after each batch, e.g. a progress bar's ``update``
    (the caller decides whether and how progress is shown).
    """
    if num_batches < 1:
        raise InputError(f"num_batches: expected a positive number of AFS batches, got {num_batches}")
    totals: list[torch.Tensor] | None = None
    for batch in _cycle(batches, num_batches):
        images, clean_images, masks = unpack_afs_batch(batch)
        masks = check_afs_batch(images, clean_images, masks)
        anomalous_feats = feature_fn(images)
        clean_feats = feature_fn(clean_images)
        masks = masks.to(anomalous_feats[0].device)
        losses = [channel_losses(a, n, masks) for a, n in zip(anomalous_feats, clean_feats)]
        totals = losses if totals is None else [t + l for t, l in zip(totals, losses)]
        if on_batch is not None:
            on_batch()
    if totals is None:
        raise InputError("AFS batches: the iterable yielded no batches")
    return totals


def select_lowest(losses: torch.Tensor, k: int, what: str = "afs_channels") -> torch.Tensor:
    """Indices of the k lowest-loss channels, returned sorted ascending by channel index.

    As in the official code, NaN losses are first replaced by the largest non-NaN loss (0 if all are
    NaN), so a NaN channel ties with the worst real channel. Ties are broken by the lower channel
    index (stable sort by loss, then index), so the choice never depends on `torch.topk` internals.
    """
    if k > losses.numel() or k < 1:
        raise InputError(f"{what}: cannot keep {k} channels of a layer with {losses.numel()} channels")
    losses = losses.detach().clone()
    nan = torch.isnan(losses)
    if nan.any():
        finite = losses[~nan]
        losses[nan] = finite.max() if finite.numel() else 0.0
    order = torch.sort(losses, stable=True).indices  # equal losses keep ascending channel order
    return order[:k].sort().values


def select_channels(losses: Sequence[torch.Tensor], sizes: Sequence[int]) -> list[torch.Tensor]:
    """Apply `select_lowest` per layer."""
    return [select_lowest(l, k, what=f"afs_channels[{i}]") for i, (l, k) in enumerate(zip(losses, sizes))]


class FeatureSelector(torch.nn.Module):
    """Holds the AFS channel indices per level as buffers (saved with the model)."""

    def __init__(self, channels: Sequence[int], sizes: Sequence[int]) -> None:
        super().__init__()
        if len(sizes) != len(channels):
            raise InputError(f"afs_channels: expected {len(channels)} sizes (one per layer), got {list(sizes)}")
        for i, (c, k) in enumerate(zip(channels, sizes)):
            if not 1 <= int(k) <= c:
                raise InputError(f"afs_channels[{i}]: {k} channels requested but the layer has only {c}")
            # Until AFS has run, the first k channels stand in (all of them when k == C).
            self.register_buffer(f"indices_{i}", torch.arange(int(k)))
        self.channels = [int(c) for c in channels]
        self.sizes = [int(k) for k in sizes]
        self.register_buffer("ready", torch.tensor(False))

    def indices(self) -> list[torch.Tensor]:
        return [getattr(self, f"indices_{i}") for i in range(len(self.sizes))]

    def check_indices(self, indices: Sequence[torch.Tensor], source: str = "AFS indices") -> None:
        """Refuse indices that `index_select` would reject late or, if unsorted/duplicated, use silently."""
        if len(indices) != len(self.sizes):
            raise InputError(f"{source}: expected {len(self.sizes)} index tensors (one per layer), got {len(indices)}")
        for i, (idx, c, k) in enumerate(zip(indices, self.channels, self.sizes)):
            idx = torch.as_tensor(idx)
            if idx.ndim != 1 or idx.numel() != k or idx.is_floating_point() or idx.is_complex():
                raise InputError(f"{source}: layer {i} needs {k} integer channel indices, got shape {tuple(idx.shape)} "
                                 f"of dtype {idx.dtype}")
            if int(idx.min()) < 0 or int(idx.max()) >= c:
                raise InputError(f"{source}: layer {i} has channel indices in [{int(idx.min())}, {int(idx.max())}] "
                                 f"but the layer has channels 0..{c - 1}")
            if k > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise InputError(f"{source}: layer {i} channel indices must be sorted ascending and unique")

    def set_indices(self, indices: Sequence[torch.Tensor]) -> None:
        self.check_indices(indices)
        for i, idx in enumerate(indices):
            getattr(self, f"indices_{i}").copy_(idx)
        self.ready.fill_(True)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.index_select(f, 1, idx) for f, idx in zip(features, self.indices())]
