"""Reading and converting images of any mode, bit depth and size into one convention.

Convention used across `sia` and `realnet`: an image tensor is float32, shape (3, H, W), values in
[0, 1]; a mask tensor is float32, shape (1, H, W), values in {0, 1}.

torch is imported only by the functions that make or take tensors, so reading images, listing
folders and numpy conversion work in a torch-free deployment (an exported RealNet).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

ImageLike = Union[Image.Image, np.ndarray, "torch.Tensor", str, Path]


def is_tensor(value: object) -> bool:
    """True for a torch tensor; without importing torch (a tensor exists only once torch is loaded)."""
    torch_module = sys.modules.get("torch")
    return torch_module is not None and isinstance(value, torch_module.Tensor)


def _integer_peak(dtype: np.dtype, what: str, peak: int | None) -> int:
    """Full-scale value of an integer pixel type, chosen from the type, never from the pixel values.

    8-bit types are 0..255 and 16-bit types 0..65535. A wider type says nothing about the bit
    depth, so the caller must know it (PIL's 32-bit ``I`` mode holds 16-bit data); otherwise it
    is an InputError rather than a guess.
    """
    if dtype.itemsize <= 2:
        return 255 if dtype.itemsize == 1 else 65535
    if peak is None:
        raise InputError(f"{what}: expected uint8 or uint16 pixels (or floats in [0, 1]), got {dtype}; cast it first")
    return peak


def _array_to_uint8(array: np.ndarray, what: str, peak: int | None = None) -> np.ndarray:
    """Scale an integer or float array to uint8; ``peak`` is the full scale of a wide integer type."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        peak = _integer_peak(array.dtype, what, peak)
        if array.size and (array.min() < 0 or array.max() > peak):
            raise InputError(
                f"{what}: expected pixel values in [0, {peak}] for {array.dtype}, "
                f"got values in [{array.min()}, {array.max()}]"
            )
        return np.round(array.astype(np.float64) * (255.0 / peak)).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputError(f"{what}: image contains NaN or infinite values")
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(np.round(array * scale), 0, 255).astype(np.uint8)
    raise InputError(f"{what}: unsupported pixel type {array.dtype}")


def _pil_to_rgb(image: Image.Image, what: str) -> Image.Image:
    """Convert any PIL mode (16-bit, float, palette, alpha, CMYK) to 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # Pillow's 32-bit "I" mode is where 16-bit images land after a conversion: read it as 16-bit.
        gray = _array_to_uint8(np.asarray(image), what, peak=65535)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as 8-bit RGB; a missing, corrupt or truncated file is an InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            image.load()
            return _pil_to_rgb(image, str(path))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InputError(f"{path}: cannot read image ({err})") from None


def to_pil_rgb(image: ImageLike) -> Image.Image:
    """Any supported image object or path as an 8-bit RGB PIL image."""
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image, "image")
    if is_tensor(image):
        array = image.detach().cpu()
        if array.ndim == 3 and array.shape[0] in (1, 3, 4):
            array = array.permute(1, 2, 0)
        image = array.numpy()
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)  # channels first (3, H, W) -> (H, W, 3)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim == 3 and array.shape[-1] == 4:
            array = array[..., :3]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
            raise InputError(
                f"image: expected an (H, W), (H, W, C) or (C, H, W) array with C in 1, 3, 4, got {image.shape}"
            )
        array = _array_to_uint8(array, "image")
        return Image.fromarray(array).convert("RGB")
    raise InputError(f"image: expected a path, PIL image, numpy array or tensor, got {type(image).__name__}")


def pil_to_array(image: Image.Image) -> np.ndarray:
    """8-bit RGB PIL image -> float32 array (3, H, W) in [0, 1] (the numpy twin of `pil_to_tensor`)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(array.transpose(2, 0, 1)).astype(np.float32) / np.float32(255.0)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> float32 tensor (3, H, W) in [0, 1]."""
    import torch

    return torch.from_numpy(pil_to_array(image))


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """Float tensor (3, H, W) or (1, H, W) in [0, 1] -> 8-bit PIL image (rounded, not truncated)."""
    import torch

    array = image.detach().cpu().clamp(0, 1).mul(255).round().to(torch.uint8)
    if array.shape[0] == 1:
        return Image.fromarray(array[0].numpy(), mode="L")
    return Image.fromarray(array.permute(1, 2, 0).numpy(), mode="RGB")


def load_image_tensor(image: ImageLike, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Any image -> float tensor (3, H, W) in [0, 1], optionally resized (bilinear, no crop) to (H, W)."""
    pil = to_pil_rgb(image)
    if size is not None and (pil.height, pil.width) != tuple(size):
        pil = pil.resize((size[1], size[0]), Image.BILINEAR)
    return pil_to_tensor(pil)


def _mask_values(mask: Image.Image) -> np.ndarray:
    """Label values of a mask image, (H, W) or (H, W, C), without any alpha channel.

    Alpha says how opaque a pixel is, not whether it is anomalous (an opaque mask would otherwise
    be all ones); palette masks are read through their colours (index 0 need not be black).
    """
    if mask.mode in ("P", "PA"):
        mask = mask.convert("L")
    elif mask.mode == "LA":
        mask = mask.getchannel("L")
    elif mask.mode in ("RGBA", "RGBa", "RGBX"):
        mask = mask.convert("RGB")
    elif mask.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        mask = mask.convert("RGB")
    return np.asarray(mask)


def read_mask_values(path: str | Path) -> tuple[np.ndarray, float]:
    """(H, W) label values of a mask file (colour channels folded by their maximum) and their full
    scale: 255 for 8-bit masks, 65535 for 16-bit ones, 1 for bilevel or [0, 1] float masks."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such mask file")
    try:
        with Image.open(path) as mask:
            mask.load()
            array = _mask_values(mask)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InputError(f"{path}: cannot read mask ({err})") from None
    if array.ndim == 3:
        array = array.max(axis=-1)
    if array.dtype == bool:
        return array.astype(np.uint8), 1.0
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputError(f"{path}: mask contains NaN or infinite values")
        return array, 1.0 if array.max(initial=0.0) <= 1.0 else 255.0
    return array, 255.0 if array.dtype.itemsize == 1 else 65535.0


def load_mask(path: str | Path, size: tuple[int, int] | None = None, threshold: float = 0) -> torch.Tensor:
    """Ground-truth mask file -> float tensor (1, H, W) in {0, 1}.

    A pixel is anomalous when its value exceeds ``threshold``, given on the 8-bit scale (0 to 254;
    a 16-bit mask compares with ``threshold * 257``). The default 0 suits exact masks (any non-zero
    pixel, class-id masks included); lossy or anti-aliased masks want a higher one, e.g. 127.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 255:
        raise InputError(f"mask threshold: expected a number in [0, 255) on the 8-bit scale, got {threshold!r}")
    import torch

    array, full_scale = read_mask_values(path)
    binary = Image.fromarray((array > threshold * full_scale / 255.0).astype(np.uint8) * 255, mode="L")
    if size is not None and (binary.height, binary.width) != tuple(size):
        binary = binary.resize((size[1], size[0]), Image.NEAREST)
    return torch.from_numpy((np.asarray(binary) > 0).astype(np.float32))[None]


def list_images(folder: str | Path, recursive: bool = True, what: str = "folder") -> list[Path]:
    """Sorted image files in a folder; an InputError if the folder is missing or holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{what} {folder}: no such folder")
    pattern = "**/*" if recursive else "*"
    files = sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise InputError(f"{what} {folder}: no images found (expected {', '.join(IMAGE_EXTENSIONS)})")
    return files
