"""Image sizes as people write them: ``256`` (square) or ``HEIGHTxWIDTH`` (``640x256``).

One parser for every command that takes ``--image-size`` (train, eval, predict, export), one check
against the backbone's stride (every side a multiple of the coarsest feature level's reduction, so
all levels tile the image exactly), and one rule for running a model at a size other than the one
it was trained at: allowed, resized, and said in one line.
"""

from __future__ import annotations

import logging
import numbers
import re
from collections.abc import Sequence
from typing import Any

from sia.errors import InputError

__all__ = ["ACCEPTED_FORMS", "ImageSize", "check_stride", "format_image_size", "inference_size", "parse_image_size"]

logger = logging.getLogger(__name__)

ImageSize = tuple[int, int]
ImageSizeLike = int | str | Sequence[int]
ACCEPTED_FORMS = "N (square, e.g. 256) or HxW (height x width, e.g. 640x256)"
MIN_SIDE = 32  # the smallest image RealNet accepts
_TEXT = re.compile(r"\s*(\d+)\s*(?:[xX×]\s*(\d+)\s*)?")


def _whole(value: Any) -> int | None:
    """``value`` as an int if it is a whole number (256, 256.0, numpy ints); bools are not sizes."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return int(value) if float(value).is_integer() else None


def parse_image_size(value: ImageSizeLike, parameter: str = "`image_size`") -> ImageSize:
    """``256``, ``"256"``, ``"640x256"`` or ``(640, 256)`` -> ``(height, width)``, each side >= 1.

    Anything else (``0``, ``"abc"``, ``"256x"``, three numbers) is a one-line InputError naming
    ``parameter`` and the accepted forms.
    """
    sides: list[int | None]
    if isinstance(value, str):
        match = _TEXT.fullmatch(value)
        sides = [] if match is None else [int(match[1]), int(match[2] or match[1])]
    elif isinstance(value, (list, tuple)):
        sides = [_whole(v) for v in value] if len(value) == 2 else []
    else:
        whole = _whole(value)
        sides = [] if whole is None else [whole, whole]
    if len(sides) != 2 or any(s is None or s < 1 for s in sides):
        raise InputError(f"{parameter} {_show(value)}: expected {ACCEPTED_FORMS}, in pixels")
    return int(sides[0]), int(sides[1])  # type: ignore[arg-type]


def check_stride(size: ImageSize, stride: int, parameter: str = "`image_size`", what: str = "the model") -> ImageSize:
    """``size`` if both sides are multiples of ``stride`` and at least ``MIN_SIDE``; else an
    InputError suggesting the nearest valid size."""
    smallest = -(-MIN_SIDE // stride) * stride
    if any(s % stride or s < smallest for s in size):
        nearest = format_image_size(tuple(max(smallest, round(s / stride) * stride) for s in size))
        raise InputError(
            f"{parameter} {format_image_size(size)}: each side must be a multiple of {stride} (the stride of {what}) "
            f"and at least {MIN_SIDE}, e.g. {nearest}; accepted forms: {ACCEPTED_FORMS}"
        )
    return size


def format_image_size(size: Sequence[int]) -> str:
    """``(256, 256)`` -> ``"256"``, ``(640, 256)`` -> ``"640x256"`` (height x width)."""
    height, width = (int(s) for s in size)
    return str(height) if height == width else f"{height}x{width}"


def model_stride(model: Any) -> int:
    """The coarsest reduction among a RealNet's backbone levels (1 for models without one)."""
    strides = getattr(getattr(model, "backbone", None), "strides", None)
    return int(max(strides)) if strides else 1


def trained_size(model: Any) -> ImageSize:
    """(H, W) a model was trained at (its ``image_size``; 256² when it has none)."""
    size = getattr(model, "image_size", None) or 256
    return parse_image_size(size, "model image_size")


def inference_size(model: Any, image_size: ImageSizeLike | None = None, parameter: str = "`image_size`") -> ImageSize:
    """The size to run ``model`` at: its training size, or ``image_size`` when given.

    A size other than the training size is allowed (the network is fully convolutional), checked
    against the backbone's stride and announced in one line, since the stored thresholds were
    calibrated at the training size.
    """
    trained = trained_size(model)
    if image_size is None:
        return trained
    size = check_stride(parse_image_size(image_size, parameter), model_stride(model), parameter, "the model's backbone")
    if size != trained:
        logger.warning(
            f"notice: the model was trained at {format_image_size(trained)}; running it at {format_image_size(size)} "
            f"({parameter}): images are resized to that size, and its stored thresholds were calibrated at "
            f"{format_image_size(trained)}"
        )
    return size


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)
