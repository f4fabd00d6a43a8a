"""Blending obeys the paper's Eq. 3 exactly where the mask is 0 and 1."""

import pytest
import torch

from sia.blend import blend, opacity_range, sample_opacity
from sia.errors import InputError


def random_case(batch=3, height=20, width=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, height, width, generator=g)
    source = torch.rand(batch, 3, height, width, generator=g)
    mask = (torch.rand(batch, 1, height, width, generator=g) > 0.7).float()
    return image, source, mask


def test_eq3_holds_where_mask_is_zero_and_one_batched_per_sample_opacity():
    image, source, mask = random_case()
    opacity = torch.tensor([0.2, 0.6, 1.0])
    out = blend(image, source, mask, opacity)
    outside = (mask == 0).expand_as(image)
    assert torch.equal(out[outside], image[outside])  # bit-for-bit
    beta = opacity.view(-1, 1, 1, 1)
    expected = (1 - mask) * image + beta * mask * source + (1 - beta) * mask * image
    inside = (mask == 1).expand_as(image)
    assert torch.allclose(out[inside], expected[inside], atol=1e-6)
    assert torch.allclose(out[2][inside[2]], source[2][inside[2]], atol=1e-6)  # opacity 1: the source


def test_single_image_bool_mask_and_uint8_source_agree():
    image, source, mask = random_case(batch=1)
    source_u8 = (source * 255).round().to(torch.uint8)
    as_float = source_u8.float() / 255
    a = blend(image[0], as_float[0], mask[0], 0.7)
    b = blend(image[0], source_u8[0], mask[0].bool(), 0.7)
    assert a.shape == (3, 20, 30)
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.equal(blend(image, source, torch.zeros_like(mask), 0.9), image)


def test_opacity_zero_leaves_image_unchanged():
    image, source, mask = random_case()
    assert torch.allclose(blend(image, source, mask, 0.0), image)


def test_bad_opacity_and_shapes_raise_input_error():
    image, source, mask = random_case()
    with pytest.raises(InputError, match="opacity"):
        blend(image, source, mask, 1.5)
    with pytest.raises(InputError, match="source"):
        blend(image, source[:, :, :10], mask, 0.5)
    with pytest.raises(InputError, match="mask"):
        blend(image, source, mask[:, :, :10], 0.5)
    for bad in [(0.5, 1.2), (0.8, 0.2), (-0.1, 0.5), (0.1, 0.2, 0.3)]:
        with pytest.raises(InputError, match="opacity"):
            opacity_range(bad)
    assert opacity_range(0.3) == (0.3, 0.3)
    assert opacity_range([0.2, 1]) == (0.2, 1.0)


def test_sample_opacity_is_in_range_and_seeded():
    a = sample_opacity(500, (0.5, 1.0), torch.Generator().manual_seed(1))
    b = sample_opacity(500, (0.5, 1.0), torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert a.min() >= 0.5 and a.max() <= 1.0 and a.std() > 0.1


def test_opacity_count_and_image_dtype_are_checked():
    image, source, mask = random_case(batch=3)
    with pytest.raises(InputError, match="one per sample"):
        blend(image, source, mask, torch.tensor([0.5, 0.6]))
    with pytest.raises(InputError, match="one per sample"):
        blend(image[0], source[0], mask[0], torch.tensor([0.5, 0.6]))
    with pytest.raises(InputError, match="floating-point"):
        blend((image * 255).to(torch.uint8), source, mask, 0.5)
    with pytest.raises(InputError, match="source"):
        blend(image, source.to(torch.int32), mask, 0.5)
    with pytest.raises(InputError, match="torch.Tensor"):
        blend(image.numpy(), source, mask, 0.5)
    assert blend(image, source, mask, torch.tensor([0.5])).shape == image.shape  # one value for all
