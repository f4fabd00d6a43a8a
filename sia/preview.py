"""A quick visual check of a synthesis setup: a PNG grid of normal | anomalous | mask outline rows."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

from .errors import InputError
from .images import list_images, load_image_tensor, tensor_to_pil
from .paths import separate_output, writable_file_path
from .synthesizer import AnomalySynthesizer

HEADER_HEIGHT = 20
COLUMNS = ("normal", "anomalous", "mask outline")
OUTLINE_COLOR = (255, 0, 0)


def outline(mask: torch.Tensor, width: int = 1) -> np.ndarray:
    """Boundary pixels of a (1, H, W) mask as an (H, W) bool array, about ``2 * width`` px thick."""
    binary = mask[0].numpy() > 0.5
    structure = np.ones((3, 3), dtype=bool)
    grown = ndimage.binary_dilation(binary, structure, iterations=width)
    shrunk = ndimage.binary_erosion(binary, structure, iterations=width, border_value=1)
    return grown & ~shrunk


def render_preview(
    images: str | Path,
    source: str,
    category: str = "none",
    n: int = 16,
    seed: int = 0,
    size: int = 256,
) -> Image.Image:
    """Synthesise ``n`` anomalies from the images of a folder and lay them out one per row.

    Row ``i`` uses image ``i`` of the sorted folder (cycling if there are fewer) and seed
    ``seed + i``. Masks are redrawn until non-empty so every row shows an anomaly.
    """
    if n < 1:
        raise InputError(f"`n`: expected at least 1 row, got {n}")
    if size < 16:
        raise InputError(f"`size`: expected at least 16 pixels, got {size}")
    files = list_images(images, what="`images`")
    synthesizer = AnomalySynthesizer(source, category=category, require_nonempty=True)
    grid = Image.new("RGB", (3 * size, HEADER_HEIGHT + n * size), "white")
    draw = ImageDraw.Draw(grid)
    for column, title in enumerate(COLUMNS):
        draw.text((column * size + 4, 4), title, fill="black")
    for row in range(n):
        normal = load_image_tensor(files[row % len(files)], size=(size, size))
        result = synthesizer(normal, seed=seed + row)
        anomalous = tensor_to_pil(result.image)
        marked = np.array(anomalous)
        marked[outline(result.mask)] = OUTLINE_COLOR
        top = HEADER_HEIGHT + row * size
        grid.paste(tensor_to_pil(normal), (0, top))
        grid.paste(anomalous, (size, top))
        grid.paste(Image.fromarray(marked), (2 * size, top))
    return grid


def _source_folder(source: str) -> Path | None:
    """The local folder an anomaly source spec reads (``sia:PATH``, ``dtd:PATH`` or a folder), if any."""
    text = str(source)
    for prefix in ("sia:", "dtd:"):
        if text.lower().startswith(prefix):
            text = text[len(prefix):]
    path = Path(text).expanduser()
    return path if path.exists() else None


def save_preview(out: str | Path, overwrite: bool = False, **kwargs) -> Path:
    """Render a preview grid (see :func:`render_preview`) and write it atomically as PNG.

    An existing ``out`` is an InputError unless ``overwrite`` is set; an ``out`` that is a folder,
    lies under a file, or lies inside the images or source folder is refused before rendering.
    """
    out = writable_file_path(out, "`out`")
    if out.suffix.lower() != ".png":
        raise InputError(f"`out` {out}: expected a .png file name")
    separate_output(out, [kwargs.get("images"), _source_folder(kwargs.get("source", ""))], "`out`")
    if out.exists() and not overwrite:
        raise InputError(f"`out` {out}: file exists (pass `overwrite=True` to replace it)")
    image = render_preview(**kwargs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
