"""AFS: per-channel loss formula, selection of mask-responsive channels, batching, NaN and size errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from realnet.afs import (
    FeatureSelector,
    accumulate_channel_losses,
    channel_losses,
    select_channels,
    select_lowest,
)
from sia.errors import InputError

RESPONSIVE = [3, 7, 12, 18]
CHANNELS = 24


def _masks(batch: int, size: int, gen: torch.Generator) -> torch.Tensor:
    masks = torch.zeros(batch, 1, size, size)
    for b in range(batch):
        y, x = torch.randint(0, size - 16, (2,), generator=gen).tolist()
        masks[b, :, y : y + 16, x : x + 16] = 1
    return masks


def _features(images: torch.Tensor, pattern: torch.Tensor) -> list[torch.Tensor]:
    """Toy 'backbone': some channels follow local intensity, the others a fixed or global signal."""
    local = F.avg_pool2d(images.mean(1, keepdim=True), 4)  # (B,1,h,w) responds where pixels change
    feats = pattern.expand(images.shape[0], -1, -1, -1).clone()
    feats[:, RESPONSIVE] = feats[:, RESPONSIVE] + local * 5.0
    feats[:, 0] = feats[:, 0] + images.mean(dim=(1, 2, 3))[:, None, None]  # global brightness only
    return [feats]


def _batches(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        clean = torch.rand(4, 3, 64, 64, generator=gen) * 0.5
        masks = _masks(4, 64, gen)
        anomalous = clean * (1 - masks) + masks * torch.rand(4, 3, 1, 1, generator=gen).clamp_min(0.6)
        yield anomalous, clean, masks


def test_channel_loss_matches_direct_formula():
    gen = torch.Generator().manual_seed(0)
    a, n = torch.rand(3, 5, 8, 6, generator=gen), torch.rand(3, 5, 8, 6, generator=gen)
    mask = (torch.rand(3, 1, 32, 24, generator=gen) > 0.7).float()
    got = channel_losses(a, n, mask).numpy()
    label = mask.numpy()[:, :, ::4, ::4]  # nearest downsampling by an integer factor picks the top-left pixel
    for c in range(5):
        r = (a[:, c].numpy() - n[:, c].numpy()) ** 2
        r = (r - r.min()) / (r.max() - r.min() + 1e-4)
        assert got[c] == pytest.approx(float(np.mean((r - label[:, 0]) ** 2)), rel=1e-5)


def test_afs_picks_the_channels_that_carry_the_anomaly():
    pattern = torch.randn(1, CHANNELS, 16, 16, generator=torch.Generator().manual_seed(1))
    losses = accumulate_channel_losses(_batches(6), lambda x: _features(x, pattern), num_batches=6, progress=False)
    chosen = select_channels(losses, [len(RESPONSIVE)])[0]
    assert chosen.tolist() == sorted(RESPONSIVE)
    assert losses[0][RESPONSIVE].max() < losses[0][[c for c in range(CHANNELS) if c not in RESPONSIVE]].min()


def test_dict_batches_and_wrap_around_of_reiterable_sources():
    pattern = torch.randn(1, CHANNELS, 16, 16, generator=torch.Generator().manual_seed(1))
    data = [dict(image=a, clean_image=c, mask=m) for a, c, m in _batches(2)]

    def fn(x):
        return _features(x, pattern)

    once = accumulate_channel_losses(data, fn, num_batches=2, progress=False)[0]
    twice = accumulate_channel_losses(data, fn, num_batches=4, progress=False)[0]  # a list starts over
    torch.testing.assert_close(twice, 2 * once)
    exhausted = accumulate_channel_losses(iter(data), fn, num_batches=4, progress=False)[0]  # an iterator stops
    torch.testing.assert_close(exhausted, once)
    with pytest.raises(InputError, match="no batches"):
        accumulate_channel_losses([], fn, num_batches=3, progress=False)
    with pytest.raises(InputError, match="clean_image"):
        accumulate_channel_losses([dict(image=data[0]["image"])], fn, num_batches=1, progress=False)


def test_select_lowest_sorted_and_nan_counts_as_worst():
    losses = torch.tensor([0.5, float("nan"), 0.1, 0.9, 0.2, float("nan")])
    assert select_lowest(losses, 3).tolist() == [0, 2, 4]
    assert select_lowest(losses, 5).tolist()[:4] == [0, 2, 3, 4]
    with pytest.raises(InputError, match="cannot keep 7"):
        select_lowest(losses, 7)


def test_feature_selector_buffers_and_size_errors():
    selector = FeatureSelector([8, 16], [8, 4])
    assert not bool(selector.ready)
    assert {"indices_0", "indices_1", "ready"} <= set(selector.state_dict())
    feats = [torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2)]
    selector.set_indices([torch.arange(8), torch.tensor([1, 5, 6, 15])])
    out = selector(feats)
    assert bool(selector.ready)
    torch.testing.assert_close(out[1], feats[1][:, [1, 5, 6, 15]])
    with pytest.raises(InputError, match=r"afs_channels\[1\]"):
        FeatureSelector([8, 16], [8, 17])
    with pytest.raises(InputError, match="one per layer"):
        FeatureSelector([8, 16], [8])
