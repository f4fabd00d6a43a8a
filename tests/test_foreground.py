"""Foreground masks: presets pick the object on synthetic object-on-background images."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.filters import threshold_otsu, threshold_triangle

from sia.categories import DATASET_CATEGORIES
from sia.errors import InputError
from sia.foreground import (
    FOREGROUND_PRESETS,
    ForegroundConfig,
    binary_closing,
    binary_opening,
    foreground_config,
    foreground_mask,
    foreground_masks,
    otsu_threshold,
    scaled_footprint,
    triangle_threshold,
)


def object_image(height=96, width=128, object_rgb=(40, 40, 40), background_rgb=(200, 200, 200), seed=0):
    """An ellipse object on a plain background with mild noise; returns (image (3,H,W), object mask)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    inside = ((yy - height / 2) / (height * 0.3)) ** 2 + ((xx - width / 2) / (width * 0.25)) ** 2 < 1
    image = np.where(inside[..., None], np.array(object_rgb, float), np.array(background_rgb, float))
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255) / 255.0
    return torch.from_numpy(image).permute(2, 0, 1).float(), torch.from_numpy(inside)


def iou(mask, truth):
    pred = mask[0] > 0.5
    return (pred & truth).sum().item() / max((pred | truth).sum().item(), 1)


def test_all_36_categories_have_presets_addressable_both_ways():
    assert len(FOREGROUND_PRESETS) == 36
    for dataset, categories in DATASET_CATEGORIES.items():
        for category in categories:
            assert foreground_config(f"{dataset}/{category}") == FOREGROUND_PRESETS[f"{dataset}/{category}"]
    assert foreground_config("bottle") == foreground_config("mvtec-ad/bottle")
    bottle = foreground_config("bottle")
    assert (bottle.method, bottle.channel, bottle.invert, bottle.closing, bottle.opening) == ("otsu", "gray", True, 6, 6)
    pcb = foreground_config("visa/pcb1")
    assert (pcb.method, pcb.channel, pcb.closing, pcb.opening) == ("triangle", "blue", 8, 3)
    assert foreground_config("mpdd/connector").opening == 0
    assert foreground_config("carpet").method == "none"


def test_unknown_category_lists_known_ones():
    with pytest.raises(InputError, match="mvtec-ad/bottle") as err:
        foreground_config("bottel")
    assert "\n" not in str(err.value)
    with pytest.raises(InputError):
        ForegroundConfig(method="sobel")


@pytest.mark.parametrize(
    "category,object_rgb,background_rgb",
    [
        ("bottle", (30, 30, 30), (210, 210, 210)),  # dark object, inverted Otsu
        ("screw", (50, 60, 40), (190, 200, 180)),
        ("pill", (220, 220, 210), (30, 30, 30)),  # bright object, Otsu
        ("hazelnut", (200, 150, 90), (10, 10, 10)),  # bright object, Triangle
        ("candle", (230, 230, 230), (60, 60, 60)),
        ("visa/pcb1", (40, 40, 220), (40, 90, 30)),  # bright in blue, Triangle
        ("mpdd/bracket_black", (40, 30, 40), (150, 200, 150)),  # dark in green, inverted
        ("mpdd/tubes", (200, 200, 230), (60, 60, 40)),  # bright in blue
        ("btad/01", (220, 220, 220), (50, 50, 50)),
        ("auto", (30, 30, 30), (210, 210, 210)),  # auto, dark object
        ("auto", (220, 220, 220), (30, 30, 30)),  # auto, bright object
    ],
)
def test_presets_select_the_object(category, object_rgb, background_rgb):
    image, truth = object_image(object_rgb=object_rgb, background_rgb=background_rgb)
    mask = foreground_mask(image, category)
    assert mask.shape == (1, 96, 128)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert iou(mask, truth) > 0.9


def test_none_is_all_ones_and_batches_work_non_square():
    image, _ = object_image(height=40, width=70)
    assert torch.equal(foreground_mask(image, "none"), torch.ones(1, 40, 70))
    assert torch.equal(foreground_mask(image, "carpet"), torch.ones(1, 40, 70))
    batch = torch.stack([object_image(seed=s)[0] for s in range(3)])
    masks = foreground_masks(batch, "bottle")
    assert masks.shape == (3, 1, 96, 128)
    assert torch.equal(masks[1], foreground_mask(batch[1], "bottle"))


def test_auto_falls_back_to_all_ones_on_a_flat_image():
    flat = torch.full((3, 32, 32), 0.5)
    assert torch.equal(foreground_mask(flat, "auto"), torch.ones(1, 32, 32))


def test_thresholds_equal_scikit_image():
    rng = np.random.default_rng(0)
    for trial in range(60):
        if trial % 2:
            image = np.clip(rng.normal(rng.uniform(40, 200), rng.uniform(3, 40), (30, 40)), 0, 255).astype(np.uint8)
            image[5:15, 5:25] = rng.integers(0, 256)
        else:
            image = (ndimage.gaussian_filter(rng.random((30, 40)), 2) * 255).astype(np.uint8)
        hist = np.bincount(image.ravel(), minlength=256)
        assert otsu_threshold(hist) == threshold_otsu(image)
        assert triangle_threshold(hist) == threshold_triangle(image)


@pytest.mark.parametrize("k", [1, 2, 3, 6, 8, 15])
def test_morphology_matches_scipy_and_is_extensive(k):
    x = np.random.default_rng(k).random((2, 40, 53)) < 0.4
    closed, opened = binary_closing(x, k), binary_opening(x, k)
    expect_closed = np.stack([ndimage.grey_closing(i.astype(np.uint8), size=(k, k)) for i in x]).astype(bool)
    expect_opened = np.stack([ndimage.grey_opening(i.astype(np.uint8), size=(k, k)) for i in x]).astype(bool)
    assert np.array_equal(closed, expect_closed) and np.array_equal(opened, expect_opened)
    assert (closed >= x).all() and (opened <= x).all()


def test_footprints_scale_with_image_size():
    assert scaled_footprint(6, 256, 256) == 6
    assert scaled_footprint(6, 512, 700) == 12
    assert scaled_footprint(6, 128, 128) == 3
    assert scaled_footprint(3, 32, 32) == 1
    assert scaled_footprint(0, 512, 512) == 0
