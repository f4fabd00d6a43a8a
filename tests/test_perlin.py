"""Perlin masks: shape, binarity, determinism, agreement with the element-wise formula, statistics."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from sia.errors import InputError
from sia.perlin import (
    crack_choices,
    crack_masks_bool,
    perlin_masks,
    perlin_masks_bool,
    perlin_noise,
    perlin_noise_reference,
    perlin_resolutions,
    rotate_batch,
    rotation_angles,
    shaped_masks_bool,
)


@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 37, 90), (1, 128, 48)])
def test_masks_are_binary_with_requested_shape(shape):
    batch, height, width = shape
    masks = perlin_masks(batch, height, width, torch.Generator().manual_seed(0))
    assert masks.shape == (batch, 1, height, width)
    assert masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}


def test_same_seed_same_masks_different_seed_different_masks():
    a = perlin_masks(8, 64, 80, torch.Generator().manual_seed(3))
    b = perlin_masks(8, 64, 80, torch.Generator().manual_seed(3))
    c = perlin_masks(8, 64, 80, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("size,res", [((256, 256), (4, 8)), ((100, 70), (32, 1)), ((37, 64), (2, 16)), ((64, 64), (1, 1))])
def test_batched_noise_matches_elementwise_formula(size, res):
    height, width = size
    noise = perlin_noise(1, height, width, torch.tensor([res[0]]), torch.tensor([res[1]]), torch.Generator().manual_seed(1))
    angles = torch.rand(1, res[0] + 1, res[1] + 1, generator=torch.Generator().manual_seed(1))[0] * (2 * math.pi)
    reference = perlin_noise_reference(height, width, res[0], res[1], angles)
    assert torch.allclose(noise[0], reference, atol=1e-5)
    assert noise.abs().max() <= 1.0 + 1e-5


def test_mixed_scales_in_one_batch_match_single_sample_noise():
    res_y, res_x = torch.tensor([1, 32, 4]), torch.tensor([16, 2, 4])
    batch_noise = perlin_noise(3, 64, 96, res_y, res_x, torch.Generator().manual_seed(5))
    angles = torch.rand(3, 33, 17, generator=torch.Generator().manual_seed(5)) * (2 * math.pi)
    for b in range(3):
        ry, rx = int(res_y[b]), int(res_x[b])
        reference = perlin_noise_reference(64, 96, ry, rx, angles[b, : ry + 1, : rx + 1])
        assert torch.allclose(batch_noise[b], reference, atol=1e-5)


def test_rotation_zero_is_identity_and_matches_affine_grid_for_non_square():
    images = torch.rand(2, 1, 30, 50)
    assert torch.allclose(rotate_batch(images, torch.zeros(2)), images, atol=1e-5)
    angles = torch.tensor([35.0, -80.0])
    theta = torch.deg2rad(angles)
    aspect = 50 / 30
    matrix = torch.zeros(2, 2, 3)
    matrix[:, 0, 0], matrix[:, 0, 1] = torch.cos(theta), -torch.sin(theta) / aspect
    matrix[:, 1, 0], matrix[:, 1, 1] = torch.sin(theta) * aspect, torch.cos(theta)
    grid = F.affine_grid(matrix, [2, 1, 30, 50], align_corners=False)
    expected = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    assert torch.allclose(rotate_batch(images, angles), expected, atol=1e-4)


def test_rotation_by_90_degrees_is_a_quarter_turn_and_fills_zeros():
    image = torch.rand(1, 1, 32, 32)
    rotated = rotate_batch(image, torch.tensor([90.0]))
    quarter = [torch.rot90(image, k, dims=(2, 3)) for k in (1, 3)]
    assert min((rotated - q).abs()[..., 1:-1, 1:-1].max().item() for q in quarter) < 1e-4
    wide = torch.ones(1, 1, 20, 60)
    assert rotate_batch(wide, torch.tensor([90.0]))[0, 0, :, :5].abs().max() == 0  # outside the source: zero fill


def test_statistics_over_1000_masks_match_the_official_generator():
    """Official generator at 256 x 256: about 4 % empty masks and about 5 % mean coverage."""
    generator = torch.Generator().manual_seed(0)
    coverage = torch.cat([perlin_masks(125, 256, 256, generator).mean(dim=(1, 2, 3)) for _ in range(8)])
    assert coverage.numel() == 1000
    empty = (coverage == 0).float().mean().item()
    assert 0.02 <= empty <= 0.08, empty
    assert 0.035 <= coverage.mean().item() <= 0.065, coverage.mean().item()
    assert coverage.max().item() < 0.5


def test_scale_and_threshold_options_change_the_masks():
    generator = torch.Generator().manual_seed(0)
    coarse = perlin_masks(64, 64, 64, generator, min_scale_exp=0, max_scale_exp=1, rotate=False)
    fine = perlin_masks(64, 64, 64, generator, min_scale_exp=5, max_scale_exp=6, rotate=False)
    low = perlin_masks(64, 64, 64, torch.Generator().manual_seed(1), threshold=0.1)
    high = perlin_masks(64, 64, 64, torch.Generator().manual_seed(1), threshold=0.6)
    assert torch.all(high <= low) and low.sum() > high.sum()

    def edges(m):
        return (m[..., 1:, :] != m[..., :-1, :]).float().sum()

    assert edges(fine) > 3 * edges(coarse)


def test_invalid_arguments_raise_input_error():
    with pytest.raises(InputError):
        perlin_masks(1, 0, 10)
    with pytest.raises(InputError):
        perlin_masks(1, 10, 10, min_scale_exp=3, max_scale_exp=3)
    assert perlin_masks(0, 8, 8).shape == (0, 1, 8, 8)


def test_official_defaults_scales_1_to_32_per_axis_and_angles_within_90_degrees():
    res_y, res_x = perlin_resolutions(4000, torch.Generator().manual_seed(0))
    for res in (res_y, res_x):
        exps = torch.log2(res.float()).round().long()
        assert torch.equal(2**exps, res)
        counts = torch.bincount(exps, minlength=6)
        assert counts.numel() == 6 and (counts > 550).all()  # {0..5}, each about 1/6 of the draws
    assert (res_y != res_x).float().mean() > 0.7  # the two axes are drawn independently
    angles = rotation_angles(4000, torch.Generator().manual_seed(1))
    assert angles.min() >= -90 and angles.max() <= 90
    assert angles.min() < -89 and angles.max() > 89 and abs(angles.mean()) < 3  # uniform over the range


def test_masks_use_those_draws_in_order():
    """The default masks are exactly: resolutions, gradient angles, rotation, then noise > 0.5."""
    generator = torch.Generator().manual_seed(7)
    res_y, res_x = perlin_resolutions(5, generator)
    noise = perlin_noise(5, 40, 56, res_y, res_x, generator)[:, None]
    expected = rotate_batch(noise, rotation_angles(5, generator)) > 0.5
    assert torch.equal(perlin_masks_bool(5, 40, 56, torch.Generator().manual_seed(7)), expected)


def test_mask_shape_perlin_is_the_default_draw_for_draw():
    for size in [(64, 64), (37, 90)]:
        default = perlin_masks_bool(6, *size, torch.Generator().manual_seed(11))
        assert torch.equal(perlin_masks_bool(6, *size, torch.Generator().manual_seed(11), mask_shape="perlin"), default)
        assert torch.equal(shaped_masks_bool(torch.zeros(6, dtype=torch.bool), *size, torch.Generator().manual_seed(11)), default)


def _eroded_fraction(masks: torch.Tensor) -> float:
    """Share of mask pixels that survive a 3 x 3 erosion (at 128 x 128 thin lines lose nearly all)."""
    kept = sum(int(ndimage.binary_erosion(m[0].numpy(), np.ones((3, 3))).sum()) for m in masks)
    return kept / max(int(masks.sum()), 1)


def test_crack_masks_are_thin_mostly_nonempty_and_seeded():
    cracks = crack_masks_bool(32, 128, 128, torch.Generator().manual_seed(0))
    blobs = perlin_masks_bool(32, 128, 128, torch.Generator().manual_seed(0))
    assert cracks.shape == (32, 1, 128, 128) and cracks.dtype == torch.bool
    assert _eroded_fraction(cracks) < 0.15 and _eroded_fraction(blobs) > 0.25
    assert cracks.flatten(1).any(1).float().mean() >= 0.8
    coverage = cracks.float().mean().item()
    assert 0.003 < coverage < 0.05, coverage  # local lines, not a net over the whole image
    assert torch.equal(crack_masks_bool(32, 128, 128, torch.Generator().manual_seed(0)), cracks)
    assert not torch.equal(crack_masks_bool(32, 128, 128, torch.Generator().manual_seed(1)), cracks)
    assert torch.equal(perlin_masks_bool(32, 128, 128, torch.Generator().manual_seed(0), mask_shape="cracks"), cracks)


def test_crack_half_width_controls_the_band():
    thin = crack_masks_bool(16, 96, 96, torch.Generator().manual_seed(2), half_width=(0.01, 0.01))
    wide = crack_masks_bool(16, 96, 96, torch.Generator().manual_seed(2), half_width=(0.04, 0.04))
    assert torch.all(thin <= wide) and wide.sum() > 2 * thin.sum()
    with pytest.raises(InputError, match="half_width"):
        crack_masks_bool(2, 32, 32, half_width=(0.0, 0.02))


def test_mixed_masks_hold_both_kinds_with_each_kinds_own_draws():
    generator = torch.Generator().manual_seed(5)
    masks = perlin_masks_bool(32, 128, 128, generator, mask_shape="mixed")
    choices = crack_choices(32, "mixed", torch.Generator().manual_seed(5))
    assert 0 < int(choices.sum()) < 32
    nonempty = masks.flatten(1).any(1)
    crack_thin = _eroded_fraction(masks[choices & nonempty])
    blob_thick = _eroded_fraction(masks[~choices & nonempty])
    assert crack_thin < 0.15 and blob_thick > 0.25
    again = shaped_masks_bool(choices, 128, 128, _after_choices(5, 32))
    assert torch.equal(again, masks)


def _after_choices(seed: int, batch: int) -> torch.Generator:
    generator = torch.Generator().manual_seed(seed)
    torch.rand(batch, generator=generator)
    return generator


def test_unknown_mask_shape_is_a_one_line_input_error():
    for bad in ("crack", "", None):
        with pytest.raises(InputError) as info:
            perlin_masks(2, 16, 16, mask_shape=bad)
        message = str(info.value)
        assert "\n" not in message and "mask_shape" in message and "perlin, cracks, mixed" in message
