"""Foreground masks: presets pick the object on synthetic object-on-background images."""

import numpy as np
import pytest
import torch
from scipy import ndimage

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


# The official foreground recipes, written out by hand (so a change in the table is caught): category -> (channel, method, inverted, closing, opening).
# Categories without a foreground step are ("gray", "none", False, 0, 0).
_NONE = ("gray", "none", False, 0, 0)
EXPECTED_RECIPES = {
    "mvtec-ad/carpet": _NONE,
    "mvtec-ad/leather": _NONE,
    "mvtec-ad/tile": _NONE,
    "mvtec-ad/wood": _NONE,
    "mvtec-ad/cable": _NONE,
    "mvtec-ad/transistor": _NONE,
    "mvtec-ad/pill": ("gray", "otsu", False, 6, 6),
    "mvtec-ad/hazelnut": ("gray", "triangle", False, 6, 6),
    "mvtec-ad/metal_nut": ("gray", "triangle", False, 6, 6),
    "mvtec-ad/toothbrush": ("gray", "triangle", False, 6, 6),
    "mvtec-ad/bottle": ("gray", "otsu", True, 6, 6),
    "mvtec-ad/capsule": ("gray", "otsu", True, 6, 6),
    "mvtec-ad/grid": ("gray", "otsu", True, 6, 6),
    "mvtec-ad/screw": ("gray", "otsu", True, 6, 6),
    "mvtec-ad/zipper": ("gray", "otsu", True, 6, 6),
    "visa/capsules": _NONE,
    "visa/pcb1": ("blue", "triangle", False, 8, 3),
    "visa/pcb2": ("blue", "triangle", False, 8, 3),
    "visa/pcb3": ("blue", "triangle", False, 8, 3),
    "visa/pcb4": ("blue", "triangle", False, 8, 3),
    "visa/candle": ("gray", "otsu", False, 3, 3),
    "visa/cashew": ("gray", "otsu", False, 3, 3),
    "visa/chewinggum": ("gray", "otsu", False, 3, 3),
    "visa/fryum": ("gray", "otsu", False, 3, 3),
    "visa/macaroni1": ("gray", "otsu", False, 3, 3),
    "visa/macaroni2": ("gray", "otsu", False, 3, 3),
    "visa/pipe_fryum": ("gray", "otsu", False, 3, 3),
    "mpdd/bracket_black": ("green", "otsu", True, 6, 0),
    "mpdd/bracket_brown": ("green", "otsu", True, 6, 0),
    "mpdd/connector": ("green", "otsu", True, 6, 0),
    "mpdd/bracket_white": ("blue", "otsu", False, 6, 0),
    "mpdd/tubes": ("blue", "otsu", False, 6, 0),
    "mpdd/metal_plate": ("gray", "otsu", True, 6, 0),
    "btad/02": _NONE,
    "btad/01": ("gray", "otsu", False, 15, 6),
    "btad/03": ("gray", "otsu", False, 15, 6),
}


def recipe(config):
    return (config.channel, config.method, config.invert, config.closing, config.opening)


@pytest.mark.parametrize("name", sorted(EXPECTED_RECIPES))
def test_each_category_has_the_official_recipe(name):
    assert recipe(foreground_config(name)) == EXPECTED_RECIPES[name]
    assert foreground_config(name).reference_size == 256
    assert foreground_config(name.split("/", 1)[1]) == foreground_config(name)  # short names work too


def test_the_table_covers_exactly_the_36_categories():
    assert len(EXPECTED_RECIPES) == 36
    assert set(FOREGROUND_PRESETS) == set(EXPECTED_RECIPES)


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


def test_flat_images_follow_opencv():
    """OpenCV's Otsu returns 0 on a constant image (so a bright flat image is all foreground)."""
    for value in (0, 1, 7, 128, 255):
        hist = np.bincount(np.full(100, value), minlength=256)
        assert otsu_threshold(hist) == 0
    assert triangle_threshold(np.bincount(np.full(100, 7), minlength=256)) == 6
    assert triangle_threshold(np.bincount(np.zeros(100, dtype=int), minlength=256)) == 1
    flat = torch.full((1, 3, 16, 16), 0.5)
    assert foreground_masks(flat, ForegroundConfig(method="otsu")).all()
    assert not foreground_masks(torch.zeros(1, 3, 16, 16), ForegroundConfig(method="otsu")).any()


def test_empty_images_and_bad_histograms_raise_input_error():
    with pytest.raises(InputError, match="non-empty"):
        otsu_threshold(np.zeros(256, dtype=np.int64))
    with pytest.raises(InputError, match="non-empty"):
        triangle_threshold(np.zeros(256, dtype=np.int64))
    with pytest.raises(InputError, match="256"):
        otsu_threshold(np.ones(10, dtype=np.int64))
    for shape in [(1, 3, 0, 8), (1, 3, 8, 0)]:
        with pytest.raises(InputError, match="non-empty"):
            foreground_masks(torch.zeros(shape), "bottle")


# --------------------------------------------------------------------------------- against OpenCV


def sample_images_8bit(count=600, seed=0):
    """Random and structured 8-bit images of many sizes: noise, blobs, bimodal, few levels, flat."""
    rng = np.random.default_rng(seed)
    images = [np.zeros((64, 64), np.uint8), np.full((64, 64), 255, np.uint8), np.full((5, 7), 3, np.uint8)]
    # Histograms above the triangle's line: thresholds -1 (all foreground) and 256 (none).
    ramp = np.array([0] * 10 + [1] * 10 + [2] * 11, np.uint8).reshape(1, -1)
    images += [ramp, 255 - ramp]
    for trial in range(count):
        height, width = (int(v) for v in rng.integers(1, 90, 2))
        kind = trial % 6
        if kind == 0:
            image = rng.integers(0, 256, (height, width))
        elif kind == 1:
            image = rng.normal(rng.uniform(0, 255), rng.uniform(1, 40), (height, width))
        elif kind == 2:  # two populations: an object on a background
            image = rng.normal(rng.uniform(0, 255), rng.uniform(1, 20), (height, width))
            image[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = rng.normal(
                rng.uniform(0, 255), 5, (3 * height // 4 - height // 4, 3 * width // 4 - width // 4)
            )
        elif kind == 3:
            image = ndimage.gaussian_filter(rng.random((height, width)), 2) * 255 * rng.uniform(0.3, 1.5)
        elif kind == 4:  # a few grey levels with gaps between them (ties across empty bins)
            image = rng.choice(rng.integers(0, 256, int(rng.integers(1, 5))), (height, width))
        else:  # skewed: a long tail on either side
            image = rng.exponential(rng.uniform(5, 60), (height, width))
            image = 255 - image if rng.random() < 0.5 else image
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    images += [rng.integers(0, 256, (256, 256)).astype(np.uint8) for _ in range(5)]
    return images


@pytest.mark.parametrize("method", ["otsu", "triangle"])
def test_thresholds_and_masks_equal_opencv(method):
    cv2 = pytest.importorskip("cv2")
    flag = cv2.THRESH_OTSU if method == "otsu" else cv2.THRESH_TRIANGLE
    ours = otsu_threshold if method == "otsu" else triangle_threshold
    thresholds = set()
    for image in sample_images_8bit():
        expected, binary = cv2.threshold(image, 100, 255, cv2.THRESH_BINARY | flag)
        assert ours(np.bincount(image.ravel(), minlength=256)) == expected, image.shape
        rgb = torch.from_numpy(np.stack([image] * 3)).float().div(255)[None]
        mask = foreground_masks(rgb, ForegroundConfig(method=method, channel="red"))[0, 0].numpy()
        assert np.array_equal(mask > 0, binary > 0)
        thresholds.add(expected)
    assert len(thresholds) > 50  # many different levels were exercised
    if method == "triangle":
        assert {-1, 256} <= thresholds


def test_gray_and_channels_equal_opencv_on_8bit_rgb():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (2, 64, 80, 3), dtype=np.uint8)
    images = torch.from_numpy(rgb).permute(0, 3, 1, 2).float().div(255)
    for name in ("bottle", "pill", "hazelnut", "visa/pcb1", "mpdd/connector"):
        config = foreground_config(name)
        plain = ForegroundConfig(method=config.method, channel=config.channel, invert=config.invert)
        ours = foreground_masks(images, plain)[:, 0].numpy() > 0
        for b in range(2):
            if config.channel == "gray":
                channel = cv2.cvtColor(rgb[b], cv2.COLOR_RGB2GRAY)
            else:
                channel = np.ascontiguousarray(rgb[b][:, :, ("red", "green", "blue").index(config.channel)])
            flag = cv2.THRESH_OTSU if config.method == "otsu" else cv2.THRESH_TRIANGLE
            binary = cv2.threshold(channel, 100, 255, cv2.THRESH_BINARY | flag)[1] > 0
            assert np.array_equal(ours[b], ~binary if config.invert else binary), name


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


def test_hazelnut_toy_preset_finds_a_light_nut_on_a_yellow_card():
    """The bundled demo photos: MVTec's `hazelnut` recipe picks the card, `hazelnut-toy` the nut."""
    image, truth = object_image(object_rgb=(190, 160, 120), background_rgb=(235, 215, 60))  # card brighter in gray
    assert iou(foreground_mask(image, "hazelnut-toy"), truth) > 0.9
    assert iou(foreground_mask(image, "hazelnut"), truth) < 0.5
    assert foreground_config("Hazelnut-Toy").name == "hazelnut-toy"
    with pytest.raises(InputError, match="hazelnut-toy"):
        foreground_config("hazlenut-toy")
