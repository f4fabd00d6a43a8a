"""Foreground masks: keep synthetic anomalies on the object, not on the background.

The official RealNet code thresholds one channel of the 256 x 256 image with an adaptive global
threshold (Otsu or Triangle), optionally inverts it (dark objects), then applies a binary closing
followed by an opening with a ``k x k`` square. Each benchmark category has its own recipe; the 36
recipes are in :data:`FOREGROUND_PRESETS` (reference table of the official code).

Conventions and differences from the official code (all documented in the README):

* Thresholds follow OpenCV's ``THRESH_OTSU`` and ``THRESH_TRIANGLE`` (same values, tested against
  ``cv2.threshold``), computed once per image from its 256-bin histogram; pixels strictly
  brighter than the threshold are foreground, as with ``cv2.threshold(..., THRESH_BINARY)``. A
  constant image gets Otsu threshold 0, as in OpenCV.
* ``gray`` is ``cv2.COLOR_RGB2GRAY`` of the 8-bit image: BT.601 luma (0.299 R + 0.587 G + 0.114 B)
  in OpenCV's 15-bit fixed point (checked against OpenCV 4.10 and 5.0; other releases may round
  a few pixels differently). Float images are rounded to 8 bits first.
* Footprint sizes are given for 256-pixel images and scale with the image: a preset size ``k`` is
  used as ``max(1, round(k * min(H, W) / 256))``, so a preset behaves the same at any resolution.
* Morphology treats pixels outside the image as neutral (closing/opening do not erode the border);
  even-sized squares are anchored so that closing only adds and opening only removes pixels.
  This is what ``skimage.morphology.closing`` / ``opening`` with a square footprint do.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .categories import DATASET_CATEGORIES, resolve_category
from .errors import InputError

CHANNELS = ("gray", "red", "green", "blue")
METHODS = ("none", "otsu", "triangle", "auto")
# cv2.COLOR_RGB2GRAY on 8-bit images (OpenCV 4.10+): BT.601 luma in 15-bit fixed point, rounded.
_GRAY_WEIGHTS = (9798, 19235, 3735)
_GRAY_SHIFT = 15


@dataclass(frozen=True)
class ForegroundConfig:
    """How to find the object in a normal image.

    method: ``"none"`` (everything is foreground), ``"otsu"``, ``"triangle"`` or ``"auto"``
        (Otsu on gray, polarity chosen so that the foreground touches the image border least).
    channel: ``"gray"``, ``"red"``, ``"green"`` or ``"blue"``.
    invert: foreground = pixels *darker* than or equal to the threshold (dark objects).
    closing, opening: side of the square footprint at ``reference_size`` pixels (0 = skip).
    """

    method: str = "none"
    channel: str = "gray"
    invert: bool = False
    closing: int = 0
    opening: int = 0
    reference_size: int = 256
    name: str = "none"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"foreground method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.channel not in CHANNELS:
            raise InputError(f"foreground channel {self.channel!r}: expected one of {', '.join(CHANNELS)}")
        if self.closing < 0 or self.opening < 0 or self.reference_size < 1:
            raise InputError(f"foreground config {self.name!r}: footprint sizes must be >= 0")


def _preset(method: str, channel: str = "gray", invert: bool = False, closing: int = 0, opening: int = 0):
    return ForegroundConfig(method=method, channel=channel, invert=invert, closing=closing, opening=opening)


_ALL = _preset("none")
_PRESET_GROUPS: list[tuple[str, tuple[str, ...], ForegroundConfig]] = [
    ("mvtec-ad", ("carpet", "leather", "tile", "wood", "cable", "transistor"), _ALL),
    ("mvtec-ad", ("pill",), _preset("otsu", closing=6, opening=6)),
    ("mvtec-ad", ("hazelnut", "metal_nut", "toothbrush"), _preset("triangle", closing=6, opening=6)),
    ("mvtec-ad", ("bottle", "capsule", "grid", "screw", "zipper"), _preset("otsu", invert=True, closing=6, opening=6)),
    ("visa", ("capsules",), _ALL),
    ("visa", ("pcb1", "pcb2", "pcb3", "pcb4"), _preset("triangle", channel="blue", closing=8, opening=3)),
    (
        "visa",
        ("candle", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pipe_fryum"),
        _preset("otsu", closing=3, opening=3),
    ),
    ("mpdd", ("bracket_black", "bracket_brown", "connector"), _preset("otsu", channel="green", invert=True, closing=6)),
    ("mpdd", ("bracket_white", "tubes"), _preset("otsu", channel="blue", closing=6)),
    ("mpdd", ("metal_plate",), _preset("otsu", invert=True, closing=6)),
    ("btad", ("02",), _ALL),
    ("btad", ("01", "03"), _preset("otsu", closing=15, opening=6)),
]

FOREGROUND_PRESETS: dict[str, ForegroundConfig] = {
    f"{dataset}/{category}": replace(config, name=f"{dataset}/{category}")
    for dataset, categories, config in _PRESET_GROUPS
    for category in categories
}
assert len(FOREGROUND_PRESETS) == sum(len(c) for c in DATASET_CATEGORIES.values())

AUTO_CONFIG = ForegroundConfig(method="auto", closing=6, opening=6, name="auto")
NONE_CONFIG = ForegroundConfig(name="none")
# Named recipes for data sets outside the four benchmarks. Hazelnut Toy (the photos bundled for the
# demo) has light nuts on a yellow card: yellow is dark in the blue channel, so Otsu on blue (polarity
# from the border, holes closed) finds the nut, where MVTec's dark-background `hazelnut` recipe
# selects the card.
EXTRA_PRESETS: dict[str, ForegroundConfig] = {
    "hazelnut-toy": ForegroundConfig(method="auto", channel="blue", closing=12, opening=6, name="hazelnut-toy"),
}


def foreground_config(name: str | ForegroundConfig | None) -> ForegroundConfig:
    """The recipe for ``"bottle"``, ``"mvtec-ad/bottle"``, ``"none"`` (all ones), ``"auto"`` or an extra preset.

    An unknown name raises an InputError that lists every known category.
    """
    if isinstance(name, ForegroundConfig):
        return name
    if name is None or name.strip().lower() == "none":
        return NONE_CONFIG
    if name.strip().lower() == "auto":
        return AUTO_CONFIG
    if name.strip().lower() in EXTRA_PRESETS:
        return EXTRA_PRESETS[name.strip().lower()]
    try:
        dataset, category = resolve_category(name)
    except InputError as err:
        raise InputError(f"category: {err} (or {', '.join(['none', 'auto', *EXTRA_PRESETS])})") from None
    return FOREGROUND_PRESETS[f"{dataset}/{category}"]


def scaled_footprint(size: int, height: int, width: int, reference_size: int = 256) -> int:
    """A footprint side given at ``reference_size`` pixels, scaled to an ``height x width`` image."""
    if size <= 0:
        return 0
    return max(1, int(round(size * min(height, width) / reference_size)))


# --------------------------------------------------------------------------------------------------
# Thresholds from a 256-bin histogram, with OpenCV's semantics (THRESH_OTSU / THRESH_TRIANGLE).


def _histogram(hist: np.ndarray) -> np.ndarray:
    """A 256-bin histogram of a non-empty 8-bit image as int64; anything else is an InputError."""
    hist = np.asarray(hist)
    if hist.shape != (256,) or not np.issubdtype(hist.dtype, np.integer) or (hist < 0).any():
        raise InputError(f"hist: expected 256 non-negative integer counts, got shape {hist.shape} of {hist.dtype}")
    if not hist.any():
        raise InputError("hist: expected the histogram of a non-empty image, got all zeros")
    return hist.astype(np.int64)


def otsu_threshold(hist: np.ndarray) -> int:
    """OpenCV's Otsu threshold of an 8-bit image, from its 256-bin histogram.

    The level maximising the between-class variance, with classes ``<= t`` and ``> t``. It runs
    OpenCV's running-mean recurrence in double precision, so ties (e.g. across empty bins) break
    the same way, and a constant image gives 0 as in OpenCV.
    """
    hist = _histogram(hist)
    nonzero = np.flatnonzero(hist)
    low, high = int(nonzero[0]), int(nonzero[-1])
    scale = 1.0 / float(hist.sum())
    mean = float(np.dot(np.arange(256, dtype=np.float64), hist.astype(np.float64))) * scale
    eps = float(np.finfo(np.float32).eps)
    mean1 = weight1 = best_sigma = 0.0
    best = 0
    # Bins below `low` leave both accumulators at zero and bins above `high` are skipped by the
    # epsilon test, so only [low, high] matters.
    for level in range(low, high + 1):
        p = float(hist[level]) * scale
        mean1 *= weight1
        weight1 += p
        weight2 = 1.0 - weight1
        if min(weight1, weight2) < eps or max(weight1, weight2) > 1.0 - eps:
            continue
        mean1 = (mean1 + level * p) / weight1
        mean2 = (mean - weight1 * mean1) / weight2
        sigma = weight1 * weight2 * (mean1 - mean2) * (mean1 - mean2)
        if sigma > best_sigma:
            best_sigma, best = sigma, level
    return best


def triangle_threshold(hist: np.ndarray) -> int:
    """OpenCV's triangle threshold of an 8-bit image, from its 256-bin histogram.

    The histogram span is widened by one bin on each side where possible; the line runs from the
    peak to the far end of the longer tail (the histogram is mirrored when that tail is on the
    right); the level farthest below the line, minus one, is the threshold, mirrored back. The
    result can be -1 (everything is foreground) or 256 (nothing is), as in ``cv2.threshold``.
    """
    hist = _histogram(hist)
    nonzero = np.flatnonzero(hist)
    left, right = int(nonzero[0]), int(nonzero[-1])
    left = left - 1 if left > 0 else left
    right = right + 1 if right < 255 else right
    peak = int(np.argmax(hist))
    flip = peak - left < right - peak
    if flip:
        hist = hist[::-1]
        left, peak = 255 - right, 255 - peak
    # Distance to the line, up to a positive factor: exact in int64 (OpenCV uses doubles).
    levels = np.arange(left + 1, peak + 1, dtype=np.int64)
    distance = int(hist[peak]) * levels + (left - peak) * hist[left + 1 : peak + 1]
    level = left
    if distance.size and distance.max() > 0:
        level = left + 1 + int(np.argmax(distance))
    level -= 1
    return 255 - level if flip else level


# --------------------------------------------------------------------------------------------------
# Binary morphology with square footprints: separable, O(log k) boolean operations per axis.


def _window_reduce(x: np.ndarray, k: int, axis: int, op) -> np.ndarray:
    """``out[i] = op(x[i], ..., x[i + k - 1])`` along ``axis`` (output shorter by k - 1)."""
    n = x.shape[axis]

    def take(arr, start, stop):
        index = [slice(None)] * arr.ndim
        index[axis] = slice(start, stop)
        return arr[tuple(index)]

    current, length = x, 1
    while length * 2 <= k:
        current = op(take(current, 0, current.shape[axis] - length), take(current, length, None))
        length *= 2
    out_len = n - k + 1
    if length < k:
        current = op(take(current, 0, out_len), take(current, k - length, k - length + out_len))
    return current


def _morph(x: np.ndarray, k: int, dilate: bool, mirrored: bool) -> np.ndarray:
    """Dilation (OR) or erosion (AND) of a (B, H, W) bool array with a k x k square.

    Outside pixels are neutral (False for dilation, True for erosion). ``mirrored`` swaps the
    anchor of even squares, so that erosion after dilation (closing) is extensive.
    """
    if k <= 1:
        return x
    before, after = (k - 1) // 2, k // 2
    if mirrored:
        before, after = after, before
    op = np.logical_or if dilate else np.logical_and
    batch, height, width = x.shape
    padded = np.full((batch, height + k - 1, width + k - 1), not dilate, dtype=bool)
    padded[:, before : before + height, before : before + width] = x
    return _window_reduce(_window_reduce(padded, k, 1, op), k, 2, op)


def binary_closing(x: np.ndarray, k: int) -> np.ndarray:
    """Closing (dilation then erosion) of a (B, H, W) bool array with a k x k square."""
    return _morph(_morph(x, k, True, False), k, False, True)


def binary_opening(x: np.ndarray, k: int) -> np.ndarray:
    """Opening (erosion then dilation) of a (B, H, W) bool array with a k x k square."""
    return _morph(_morph(x, k, False, True), k, True, False)


# --------------------------------------------------------------------------------------------------


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float in [0, 1] -> uint8 (rounded), the 8-bit image the official code thresholds."""
    return x.mul(255.0).clamp_(0.0, 255.0).add_(0.5).to(torch.uint8)


def _channel_uint8(images: torch.Tensor, channel: str) -> np.ndarray:
    """(B, 3, H, W) float [0, 1] -> (B, H, W) uint8 of the requested channel.

    Gray is computed from the 8-bit RGB values with OpenCV's integer formula, so it equals
    ``cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)`` bit for bit.
    """
    if channel != "gray":
        return _to_uint8(images[:, CHANNELS.index(channel) - 1]).numpy()
    rgb = _to_uint8(images).to(torch.int32)
    r, g, b = _GRAY_WEIGHTS
    value = rgb[:, 0] * r + rgb[:, 1] * g + rgb[:, 2] * b + (1 << (_GRAY_SHIFT - 1))
    return (value >> _GRAY_SHIFT).to(torch.uint8).numpy()


def _threshold_batch(values: np.ndarray, method: str) -> np.ndarray:
    """Per-image foreground (B, H, W) bool: pixels brighter than the image's own threshold."""
    threshold_fn = triangle_threshold if method == "triangle" else otsu_threshold
    # int16: the triangle threshold can be -1 or 256, which uint8 would wrap.
    thresholds = np.array([threshold_fn(np.bincount(v.ravel(), minlength=256)) for v in values], dtype=np.int16)
    return values > thresholds[:, None, None]


def _border_fraction(mask: np.ndarray) -> np.ndarray:
    """Fraction of border pixels that are set, per image of a (B, H, W) bool array."""
    border = np.concatenate([mask[:, 0, :], mask[:, -1, :], mask[:, :, 0], mask[:, :, -1]], axis=1)
    return border.mean(axis=1)


def foreground_masks_bool(images: torch.Tensor, config: ForegroundConfig | str | None) -> torch.Tensor:
    """Like :func:`foreground_masks` but returns a bool tensor (B, 1, H, W)."""
    config = foreground_config(config)
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"images: expected a (B, 3, H, W) tensor, got {tuple(images.shape)}")
    batch, _, height, width = images.shape
    if height == 0 or width == 0:
        raise InputError(f"images: expected a non-empty height and width, got {tuple(images.shape)}")
    if config.method == "none":
        return torch.ones(batch, 1, height, width, dtype=torch.bool)
    values = _channel_uint8(images.detach().float().cpu(), config.channel)
    mask = _threshold_batch(values, config.method)
    if config.method == "auto":
        flip = _border_fraction(mask) > _border_fraction(~mask)
        mask = np.where(flip[:, None, None], ~mask, mask)
    elif config.invert:
        mask = ~mask
    closing = scaled_footprint(config.closing, height, width, config.reference_size)
    opening = scaled_footprint(config.opening, height, width, config.reference_size)
    if closing:
        mask = binary_closing(mask, closing)
    if opening:
        mask = binary_opening(mask, opening)
    if config.method == "auto":
        mask = np.ascontiguousarray(mask)
        mask[~mask.any(axis=(1, 2))] = True
    return torch.from_numpy(np.ascontiguousarray(mask))[:, None]


def foreground_masks(images: torch.Tensor, config: ForegroundConfig | str | None) -> torch.Tensor:
    """Foreground of a batch: (B, 3, H, W) float in [0, 1] -> (B, 1, H, W) float in {0, 1}.

    ``auto`` uses Otsu on gray, takes the polarity whose foreground covers less of the image
    border (objects sit inside the frame, backgrounds touch it), closes/opens with 6 px squares
    (at 256 px), and falls back to all ones where the result is empty.
    """
    return foreground_masks_bool(images, config).float()


def foreground_mask(image: torch.Tensor, config: ForegroundConfig | str | None) -> torch.Tensor:
    """Foreground of one image: (3, H, W) float in [0, 1] -> (1, H, W) float in {0, 1}."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise InputError(f"image: expected a (3, H, W) tensor, got {tuple(image.shape)}")
    return foreground_masks(image[None], config)[0]
