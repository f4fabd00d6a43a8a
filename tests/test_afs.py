"""AFS: per-channel loss formula, selection of mask-responsive channels, batching, masks, ties, NaN and size errors."""

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
    losses = accumulate_channel_losses(_batches(6), lambda x: _features(x, pattern), num_batches=6)
    chosen = select_channels(losses, [len(RESPONSIVE)])[0]
    assert chosen.tolist() == sorted(RESPONSIVE)
    assert losses[0][RESPONSIVE].max() < losses[0][[c for c in range(CHANNELS) if c not in RESPONSIVE]].min()


def test_dict_batches_and_wrap_around_of_reiterable_sources():
    pattern = torch.randn(1, CHANNELS, 16, 16, generator=torch.Generator().manual_seed(1))
    data = [dict(image=a, clean_image=c, mask=m) for a, c, m in _batches(2)]

    def fn(x):
        return _features(x, pattern)

    once = accumulate_channel_losses(data, fn, num_batches=2)[0]
    twice = accumulate_channel_losses(data, fn, num_batches=4)[0]  # a list starts over
    torch.testing.assert_close(twice, 2 * once)
    exhausted = accumulate_channel_losses(iter(data), fn, num_batches=4)[0]  # an iterator stops
    torch.testing.assert_close(exhausted, once)
    with pytest.raises(InputError, match="no batches"):
        accumulate_channel_losses([], fn, num_batches=3)
    with pytest.raises(InputError, match="clean_image"):
        accumulate_channel_losses([dict(image=data[0]["image"])], fn, num_batches=1)


def test_select_lowest_nan_ties_with_the_worst_and_ties_go_to_the_lower_index():
    losses = torch.tensor([0.5, float("nan"), 0.1, 0.9, 0.2, float("nan")])
    assert select_lowest(losses, 3).tolist() == [0, 2, 4]
    # NaN becomes 0.9, so channels 1 (NaN), 3 (real 0.9) and 5 (NaN) tie: the lower index wins.
    assert select_lowest(losses, 4).tolist() == [0, 1, 2, 4]
    assert select_lowest(losses, 5).tolist() == [0, 1, 2, 3, 4]
    assert select_lowest(torch.full((6,), float("nan")), 2).tolist() == [0, 1]
    with pytest.raises(InputError, match="cannot keep 7"):
        select_lowest(losses, 7)


def test_select_lowest_ties_are_deterministic_on_large_layers():
    """Many exact ties (as from dead channels): the kept ones are the lowest indices, not topk's pick."""
    losses = torch.ones(2048)
    losses[1500:1510] = 0.5
    chosen = select_lowest(losses, 256)
    assert chosen.tolist() == list(range(246)) + list(range(1500, 1510))
    shuffled = torch.randperm(2048, generator=torch.Generator().manual_seed(0))
    values = (shuffled % 7).float()  # 7 loss levels, ~293 channels each, spread over the layer
    expected = sorted(sorted(range(2048), key=lambda c: (values[c].item(), c))[:400])
    assert select_lowest(values, 400).tolist() == expected


def test_afs_masks_are_binarised_and_accept_both_layouts():
    pattern = torch.randn(1, CHANNELS, 16, 16, generator=torch.Generator().manual_seed(1))
    batches = list(_batches(2))

    def fn(x):
        return _features(x, pattern)

    reference = accumulate_channel_losses(batches, fn, num_batches=2)[0]
    for convert in (lambda m: m[:, 0], lambda m: m * 255, lambda m: (m[:, 0] * 255).to(torch.uint8), lambda m: m.bool()):
        variant = [(a, c, convert(m)) for a, c, m in batches]
        torch.testing.assert_close(accumulate_channel_losses(variant, fn, num_batches=2)[0], reference)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a, c, m: (a, c, m[:2]), "masks .* do not match"),
        (lambda a, c, m: (a, c, m[..., :32]), "masks .* do not match"),
        (lambda a, c, m: (a, c, m.repeat(1, 3, 1, 1)), r"\(B,H,W\) or \(B,1,H,W\)"),
        (lambda a, c, m: (a, c, m[0, 0]), r"\(B,H,W\) or \(B,1,H,W\)"),
        (lambda a, c, m: (a, c[:2], m), "clean images .* shape of the anomalous"),
        (lambda a, c, m: (a, c[..., :32, :32], m), "clean images .* shape of the anomalous"),
        (lambda a, c, m: (a[0], c, m), "expected images"),
    ],
)
def test_bad_afs_batches_are_one_line_input_errors(change, message):
    pattern = torch.randn(1, CHANNELS, 16, 16)
    batch = change(*next(_batches(1)))
    with pytest.raises(InputError, match=message) as err:
        accumulate_channel_losses([batch], lambda x: _features(x, pattern), num_batches=1)
    assert "\n" not in str(err.value)


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


@pytest.mark.parametrize(
    "indices, message",
    [
        ([torch.arange(4), torch.tensor([0, 1, 16])], r"layer 1 .* channels 0\.\.15"),
        ([torch.tensor([-1, 0, 1, 2]), torch.tensor([0, 1, 2])], "layer 0 .* channels 0..7"),
        ([torch.arange(4), torch.tensor([0, 5, 3])], "sorted ascending and unique"),
        ([torch.arange(4), torch.tensor([0, 3, 3])], "sorted ascending and unique"),
        ([torch.arange(3), torch.tensor([0, 1, 2])], "layer 0 needs 4 integer"),
        ([torch.arange(4.0), torch.tensor([0, 1, 2])], "layer 0 needs 4 integer"),
        ([torch.arange(4)], "one per layer"),
    ],
)
def test_bad_afs_indices_are_refused_before_use(indices, message):
    selector = FeatureSelector([8, 16], [4, 3])
    with pytest.raises(InputError, match=message):
        selector.set_indices(indices)
    assert not bool(selector.ready)


def test_progress_is_the_callers_business(capfd):
    """No bar of its own: the caller counts batches through ``on_batch`` (a list is cycled to 5)."""
    pattern = torch.rand(1, CHANNELS, 16, 16, generator=torch.Generator().manual_seed(0))
    data, calls = list(_batches(2)), []
    accumulate_channel_losses(data, lambda x: _features(x, pattern), num_batches=5, on_batch=lambda: calls.append(1))
    accumulate_channel_losses(data, lambda x: _features(x, pattern), num_batches=2)
    assert len(calls) == 5 and capfd.readouterr().err == ""
