"""RRS selection and the segmentation head: alignment, top-k vs direct computation, BN momentum, scores."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from realnet.discriminator import Discriminator, anomaly_probability, image_scores
from realnet.rrs import ResidualSelection, align_residuals, clamp_top_k, default_top_k
from sia.errors import InputError


def _residuals(gen: torch.Generator, batch: int = 3) -> list[torch.Tensor]:
    shapes = [(6, 16, 24), (5, 8, 12), (4, 4, 6), (3, 2, 3)]
    return [torch.rand(batch, c, h, w, generator=gen) * (i + 1) for i, (c, h, w) in enumerate(shapes)]


def test_alignment_equals_official_scale_factor_upsampling():
    residuals = _residuals(torch.Generator().manual_seed(0))
    aligned = align_residuals(residuals)
    assert aligned.shape == (3, 18, 16, 24)
    official = torch.cat([nn.UpsamplingBilinear2d(scale_factor=2**i)(r) for i, r in enumerate(residuals)], 1)
    torch.testing.assert_close(aligned, official)


def test_top_k_matches_direct_per_sample_ranking():
    gen = torch.Generator().manual_seed(1)
    residuals = _residuals(gen)
    rrs = ResidualSelection(18, top_k=(4, 5)).train()
    selected, indices = rrs(residuals)
    stacked = align_residuals(residuals)
    mean = stacked.mean(dim=(0, 2, 3), keepdim=True)
    var = stacked.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    ranking = (stacked - mean) / torch.sqrt(var + rrs.bn.eps)
    assert selected.shape == (3, 9, 16, 24)
    for b in range(3):
        # The ranking is recomputed here by another route (not the BatchNorm kernel): the scores must be
        # far apart compared with float rounding, or the two orders could differ on some CPU.
        for scores in (ranking[b].amax(dim=(1, 2)), ranking[b].mean(dim=(1, 2))):
            ordered = scores.sort(descending=True).values
            assert (ordered[:-1] - ordered[1:]).min() > 1e-5
        by_max = sorted(range(18), key=lambda c: -ranking[b, c].max().item())[:4]
        by_mean = sorted(range(18), key=lambda c: -ranking[b, c].mean().item())[:5]
        assert indices[b].tolist() == by_max + by_mean
        torch.testing.assert_close(selected[b], stacked[b, by_max + by_mean])  # raw, not normalised


def test_gradients_flow_through_the_gather():
    residuals = [r.requires_grad_() for r in _residuals(torch.Generator().manual_seed(2))]
    selected, _ = ResidualSelection(18, top_k=(3, 3))(residuals)
    selected.sum().backward()
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in residuals)


def test_bn_momentum_official_and_cumulative():
    gen = torch.Generator().manual_seed(3)
    first, second = _residuals(gen), _residuals(gen)
    official = ResidualSelection(18, (3, 3), bn_momentum=0.9).train()
    cumulative = ResidualSelection(18, (3, 3), bn_momentum=None).train()
    for batch in (first, second):
        official(batch)
        cumulative(batch)
    m1, m2 = (align_residuals(b).mean(dim=(0, 2, 3)) for b in (first, second))
    torch.testing.assert_close(official.bn.running_mean, 0.1 * (0.9 * m1) + 0.9 * m2)
    torch.testing.assert_close(cumulative.bn.running_mean, (m1 + m2) / 2)


def test_default_and_clamped_top_k():
    assert default_top_k(1536) == (256, 256)  # official WRN50 setting, retention 1/3
    assert default_top_k(432) == (72, 72)
    assert clamp_top_k((256, 256), 100) == (100, 100)
    assert ResidualSelection(100, (256, 8)).out_channels == 108


@pytest.mark.parametrize("top_k", [(0, 8), (8, 0), (-3, 8), (8,), (8, 8, 8), (2.5, 8), (True, 8), "88"])
def test_non_positive_or_malformed_top_k_is_refused_not_clamped(top_k):
    with pytest.raises(InputError, match="rrs_top_k: expected two positive integers"):
        clamp_top_k(top_k, 100)
    with pytest.raises(InputError, match="rrs_top_k"):
        ResidualSelection(100, top_k)


def test_discriminator_shapes_non_square_and_probabilities():
    torch.manual_seed(0)
    head = Discriminator(9)
    logits = head(torch.rand(2, 9, 16, 24), (64, 96))
    assert logits.shape == (2, 2, 64, 96)
    probs = anomaly_probability(logits)
    assert probs.shape == (2, 1, 64, 96) and 0 <= probs.min() and probs.max() <= 1
    torch.testing.assert_close(probs, torch.softmax(logits, 1)[:, 1:2])


def test_image_scores_pool16_and_max():
    maps = torch.zeros(2, 1, 64, 96)
    maps[0, 0, 10:26, 30:46] = 1.0  # a full 16x16 square scores 1 under the official pooling
    maps[1, 0, 5, 7] = 1.0  # a single hot pixel is diluted by the pooling
    assert image_scores(maps, "pool16").tolist() == pytest.approx([1.0, 1 / 256])
    assert image_scores(maps, "max").tolist() == [1.0, 1.0]
    small = torch.rand(1, 1, 8, 8)
    assert image_scores(small, "pool16").item() == pytest.approx(small.mean().item())
