"""Heat maps, overlays and image grids for anomaly maps, written atomically.

The colour maps are small lookup tables interpolated with numpy, so no plotting library is needed.
``viridis`` (perceptually uniform, readable in grey and by colour-blind viewers) is the default;
``jet`` reproduces the look of the official RealNet exports (grad-cam's ``show_cam_on_image``).
Tensors are accepted but torch is never imported here, so torch-free prediction can draw overlays.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from sia.errors import InputError
from sia.images import is_tensor, to_pil_rgb

__all__ = ["COLORMAPS", "heatmap", "overlay", "save_overlay_triptych", "save_overlay_grid", "save_grid", "make_grid"]

# Anchor colours at evenly spaced positions in [0, 1]; the LUT interpolates linearly between them.
_ANCHORS = {
    "viridis": [
        (68, 1, 84), (71, 45, 123), (59, 82, 139), (44, 114, 142), (33, 145, 140),
        (39, 173, 129), (94, 201, 98), (170, 220, 50), (253, 231, 37),
    ],
    "jet": [(0, 0, 128), (0, 0, 255), (0, 128, 255), (0, 255, 255), (128, 255, 128), (255, 255, 0), (255, 128, 0), (255, 0, 0), (128, 0, 0)],
    "gray": [(0, 0, 0), (255, 255, 255)],
}


def _lookup_table(anchors: list[tuple[int, int, int]]) -> np.ndarray:
    positions = np.linspace(0.0, 1.0, len(anchors))
    samples = np.linspace(0.0, 1.0, 256)
    colours = np.asarray(anchors, dtype=np.float64)
    return np.stack([np.interp(samples, positions, colours[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)


COLORMAPS: dict[str, np.ndarray] = {name: _lookup_table(anchors) for name, anchors in _ANCHORS.items()}

GROUND_TRUTH_COLOUR = (0, 255, 0)
PREDICTION_COLOUR = (255, 0, 0)


def _as_2d(values: Any, name: str) -> np.ndarray:
    """(H,W), (1,H,W) or (H,W,1) tensor/array -> float64 numpy (H,W); (1,H,1) is read as (1,H,W)."""
    if isinstance(values, Image.Image):
        values = np.asarray(values.convert("F"))
    if is_tensor(values):
        values = values.detach().float().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    # Drop only a channel axis: squeezing every length-1 axis would turn a 1-pixel-high or -wide
    # map (a 50x1 image) into a vector.
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    elif array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise InputError(f"{name}: expected a single-channel map of shape (H, W) or (1, H, W), got {np.shape(values)}")
    return array


def _resize_2d(array: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    """Resize a float map to (H, W): bilinear for scores, nearest for masks."""
    if array.shape == size:
        return array
    resample = Image.NEAREST if nearest else Image.BILINEAR
    resized = Image.fromarray(array.astype(np.float32), mode="F").resize((size[1], size[0]), resample)
    return np.asarray(resized, dtype=np.float64)


def heatmap(anomaly_map: Any, vmin: float | None = None, vmax: float | None = None, colormap: str = "viridis") -> np.ndarray:
    """Colour an anomaly map: (H,W) uint8 RGB array, ``vmin`` -> first colour, ``vmax`` -> last.

    ``vmin``/``vmax`` default to the map's own range; pass the range over a whole test set to make
    maps of different images comparable (the official exports divide by the test-set maximum).
    """
    if colormap not in COLORMAPS:
        raise InputError(f"colormap: unknown {colormap!r}; choose one of {', '.join(COLORMAPS)}")
    values = _as_2d(anomaly_map, "anomaly_map")
    low = float(values.min()) if vmin is None else float(vmin)
    high = float(values.max()) if vmax is None else float(vmax)
    scale = high - low
    normalised = np.zeros_like(values) if scale <= 0 else np.clip((values - low) / scale, 0.0, 1.0)
    return COLORMAPS[colormap][np.round(normalised * 255).astype(np.intp)]


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Thick contour of a binary mask: pixels inside or outside that touch the other side."""
    return ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)


def overlay(
    image: Any,
    anomaly_map: Any,
    mask: Any | None = None,
    threshold: float | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.5,
    colormap: str = "viridis",
) -> Image.Image:
    """Blend a heat map over an image (``alpha`` heat + ``1 - alpha`` image) and draw contours.

    The anomaly map is resized (bilinear) to the image. The ground-truth ``mask`` contour is drawn
    in green, the contour of the prediction ``anomaly_map >= threshold`` in red.
    """
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha: expected a value in [0, 1], got {alpha}")
    base = np.asarray(to_pil_rgb(image), dtype=np.float64)
    size = base.shape[:2]
    scores = _resize_2d(_as_2d(anomaly_map, "anomaly_map"), size, nearest=False)
    heat = heatmap(scores, vmin, vmax, colormap).astype(np.float64)
    blended = np.round(alpha * heat + (1.0 - alpha) * base).clip(0, 255).astype(np.uint8)
    if mask is not None:
        truth = _resize_2d(_as_2d(mask, "mask"), size, nearest=True) > 0
        blended[_boundary(truth)] = GROUND_TRUTH_COLOUR
    if threshold is not None:
        blended[_boundary(scores >= threshold)] = PREDICTION_COLOUR
    return Image.fromarray(blended, mode="RGB")


def _atomic_save(image: Image.Image, path: str | Path) -> Path:
    """Write to a temporary file next to ``path`` and rename, so a crash never leaves half a file."""
    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise InputError(f"{path}: unknown image file extension (use .png or .jpg)")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(temporary, format=image_format)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def _mask_panel(mask: Any | None, size: tuple[int, int]) -> Image.Image:
    if mask is None:
        return Image.new("RGB", (size[1], size[0]))
    truth = _resize_2d(_as_2d(mask, "mask"), size, nearest=True) > 0
    return Image.fromarray((truth * 255).astype(np.uint8), mode="L").convert("RGB")


def make_grid(images: Sequence[Any], ncols: int = 4, padding: int = 2, background: int = 255) -> Image.Image:
    """Tile images row by row into one picture; every tile is resized to the first image's size."""
    if not len(images):
        raise InputError("images: need at least one image for a grid")
    if ncols < 1:
        raise InputError(f"ncols: expected a positive integer, got {ncols}")
    tiles = [to_pil_rgb(image) for image in images]
    width, height = tiles[0].size
    ncols = min(ncols, len(tiles))
    nrows = -(-len(tiles) // ncols)
    canvas = Image.new(
        "RGB", (ncols * width + (ncols - 1) * padding, nrows * height + (nrows - 1) * padding), (background,) * 3
    )
    for index, tile in enumerate(tiles):
        if tile.size != (width, height):
            tile = tile.resize((width, height), Image.BILINEAR)
        row, col = divmod(index, ncols)
        canvas.paste(tile, (col * (width + padding), row * (height + padding)))
    return canvas


def save_grid(images: Sequence[Any], path: str | Path, ncols: int = 4, padding: int = 2) -> Path:
    """Save :func:`make_grid` of ``images`` to ``path`` (atomically)."""
    return _atomic_save(make_grid(images, ncols=ncols, padding=padding), path)


def save_overlay_triptych(
    path: str | Path,
    image: Any,
    mask: Any | None,
    anomaly_map: Any,
    threshold: float | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    colormap: str = "viridis",
) -> Path:
    """Save ``[image | ground truth | heat-map overlay]`` side by side, like the official eval export.

    A missing ``mask`` gives a black middle panel (a normal image).
    """
    picture = to_pil_rgb(image)
    size = (picture.height, picture.width)
    panels = [
        picture,
        _mask_panel(mask, size),
        overlay(picture, anomaly_map, mask=mask, threshold=threshold, vmin=vmin, vmax=vmax, colormap=colormap),
    ]
    return _atomic_save(make_grid(panels, ncols=3, padding=0), path)


def save_overlay_grid(
    path: str | Path,
    images: Sequence[Any],
    anomaly_maps: Sequence[Any],
    masks: Sequence[Any] | None = None,
    ncols: int = 4,
    threshold: float | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    colormap: str = "viridis",
) -> Path:
    """Save overlays of many images in one grid; ``vmin``/``vmax`` default to the range over all maps."""
    if not len(images):
        raise InputError("images: need at least one image for a grid")
    if len(images) != len(anomaly_maps) or (masks is not None and len(masks) != len(images)):
        raise InputError("images, anomaly_maps and masks: expected the same number of each")
    maps = [_as_2d(m, "anomaly_map") for m in anomaly_maps]
    low = min(float(m.min()) for m in maps) if vmin is None else vmin
    high = max(float(m.max()) for m in maps) if vmax is None else vmax
    tiles = [
        overlay(image, scores, None if masks is None else masks[i], threshold, low, high, colormap=colormap)
        for i, (image, scores) in enumerate(zip(images, maps))
    ]
    return save_grid(tiles, path, ncols=ncols)
