"""Where the anomalous content comes from: SIA images, DTD textures, or the image itself (CutPaste).

Every source follows one small protocol (:class:`AnomalySource`): it has a ``name``, a default
opacity range, and ``sample(target, generator)`` returning an image of the target's size. All
randomness comes from the given ``torch.Generator`` so a synthesis is reproducible from its seed.
Decoded, resized images are cached (uint8, least-recently-used) because the same few hundred or
thousand source images are read over and over during training.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from .categories import DATASET_ALIASES, resolve_category
from .errors import InputError
from .images import IMAGE_EXTENSIONS, list_images, load_image, to_pil_rgb

SIA_OPACITY = (0.5, 1.0)
DTD_OPACITY = (0.2, 1.0)
CUTPASTE_OPACITY = (0.5, 1.0)


@runtime_checkable
class AnomalySource(Protocol):
    """Anything that can produce anomaly content for a target image."""

    name: str
    default_opacity: tuple[float, float]

    def sample(self, target: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """An image (3, H, W) in [0, 1] of the target's size."""
        ...


def sample_batch(
    source: AnomalySource, targets: torch.Tensor, generator: torch.Generator | None = None, allow_uint8: bool = False
) -> torch.Tensor:
    """(B, 3, H, W) source images for a batch of targets; uses ``source.sample_batch`` when present.

    With ``allow_uint8`` a source may answer in uint8 (0..255), which :func:`sia.blend.blend` accepts.
    """
    if allow_uint8 and hasattr(source, "sample_batch_uint8"):
        return source.sample_batch_uint8(targets, generator)
    batched = getattr(source, "sample_batch", None)
    if batched is not None:
        return batched(targets, generator)
    return torch.stack([source.sample(target, generator) for target in targets])


def _randint(high: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(high, (1,), generator=generator))


def _uniform(low: float, high: float, generator: torch.Generator | None, size: int | None = None):
    value = torch.rand(size or 1, generator=generator) * (high - low) + low
    return value if size else float(value)


class _ImageCache:
    """Least-recently-used cache of decoded, resized images stored as uint8 (3, H, W) tensors."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, int(capacity))
        self._items: OrderedDict[Any, torch.Tensor] = OrderedDict()

    def get(self, key: Any, load) -> torch.Tensor:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = load()
        if self.capacity:
            self._items[key] = value
            if len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value


def _resized_uint8(image: Any, height: int, width: int) -> torch.Tensor:
    """Any image object -> uint8 tensor (3, H, W), bilinear-resized to (H, W)."""
    from PIL import Image

    pil = to_pil_rgb(image)
    if (pil.height, pil.width) != (height, width):
        pil = pil.resize((width, height), Image.BILINEAR)
    import numpy as np

    return torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class _ImageCollection:
    """Random access to a folder's images or a Hugging Face dataset's ``image`` column, cached."""

    def __init__(self, items: Sequence[Any], load, cache_size: int) -> None:
        self._items = items
        self._load = load
        self._cache = _ImageCache(cache_size)

    def __len__(self) -> int:
        return len(self._items)

    def get(self, index: int, height: int, width: int) -> torch.Tensor:
        key = (index, height, width)
        return self._cache.get(key, lambda: _resized_uint8(self._load(self._items[index]), height, width))


def _target_size(target: torch.Tensor) -> tuple[int, int]:
    if target.ndim != 3 or target.shape[0] != 3:
        raise InputError(f"target: expected an image tensor (3, H, W), got {tuple(target.shape)}")
    return int(target.shape[1]), int(target.shape[2])


def _holds_images(folder: Path) -> bool:
    return any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*"))


def _image_subfolders(folder: Path) -> list[str]:
    """Sub-folders that hold images, as category names (``dataset/category`` one level deeper)."""
    names = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir()):
        nested = [g for g in sorted(child.iterdir()) if g.is_dir() and _holds_images(g)]
        if nested and child.name.lower() in DATASET_ALIASES:
            names += [f"{child.name}/{g.name}" for g in nested]
        elif _holds_images(child):
            names.append(child.name)
    return names


def _category_folder(folder: Path, category: str | None) -> Path:
    """``folder/<category>`` (or ``folder/<dataset>/<category>``), or ``folder`` when it is flat.

    A folder laid out per category but without this one is an InputError: mixing in images of
    other categories would break the official recipe (a SIA image of the *same* category).
    """
    if not category or not folder.is_dir():
        return folder
    names = [category]
    try:
        dataset, name = resolve_category(category)
        names = [name, f"{dataset}/{name}", category]
    except InputError:
        pass
    for name in names:
        if (folder / name).is_dir():
            return folder / name
    if folder.name in names:
        return folder  # already the category's own folder
    present = _image_subfolders(folder)
    if present:
        raise InputError(f"category {category!r}: no SIA images of it in {folder}; present: {', '.join(present)}")
    return folder


def _category_matches(value: Any, category: str) -> bool:
    text = str(value)
    if text == category:
        return True
    try:
        wanted = resolve_category(category)
        return resolve_category(text) == wanted
    except InputError:
        return text.rsplit("/", 1)[-1] == category.rsplit("/", 1)[-1]


class SIASource:
    """Synthetic images of the target's category (SDAS output, "SIA"), used as they are.

    ``folder_or_dataset`` is an image folder (its ``<category>`` subfolder is used when present) or
    a Hugging Face ``datasets.Dataset`` with an ``image`` column; if that dataset has a
    ``category`` column, only rows of ``category`` are used. Images are resized to the target
    size (bilinear) and not augmented, as in the paper.
    """

    default_opacity = SIA_OPACITY

    def __init__(self, folder_or_dataset: str | Path | Any, category: str | None = None, cache_size: int = 1024) -> None:
        if isinstance(folder_or_dataset, (str, Path)):
            folder = _category_folder(Path(folder_or_dataset), category)
            files = list_images(folder, what="anomaly source")
            self.name = f"sia:{folder}"
            self._images = _ImageCollection(files, load_image, cache_size)
        else:
            self.name = "sia:dataset" + (f"[{category}]" if category else "")
            self._images = _ImageCollection(*self._dataset_rows(folder_or_dataset, category), cache_size)

    @staticmethod
    def _dataset_rows(dataset: Any, category: str | None):
        columns = getattr(dataset, "column_names", None)
        if columns is None or "image" not in columns:
            raise InputError("anomaly source dataset: expected a datasets.Dataset with an 'image' column")
        rows: list[int] = list(range(len(dataset)))
        if category and "category" in columns:
            values = dataset["category"]
            feature = getattr(dataset, "features", {}).get("category") if hasattr(dataset, "features") else None
            if feature is not None and hasattr(feature, "int2str"):
                values = [feature.int2str(int(v)) for v in values]
            rows = [i for i, value in enumerate(values) if _category_matches(value, category)]
        if not rows:
            raise InputError(
                "anomaly source dataset: no images" + (f" for category {category!r}" if category else "")
            )
        return rows, lambda row: dataset[row]["image"]

    def __len__(self) -> int:
        return len(self._images)

    def sample(self, target: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        height, width = _target_size(target)
        index = _randint(len(self._images), generator)
        return self._images.get(index, height, width).float().div_(255.0)

    def sample_batch(self, targets: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) float images in [0, 1], one per target."""
        return self.sample_batch_uint8(targets, generator).float().div_(255.0)

    def sample_batch_uint8(self, targets: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Like :meth:`sample_batch` but uint8 (0..255): the synthesizer only reads masked pixels."""
        batch, _, height, width = targets.shape
        indices = torch.randint(len(self._images), (batch,), generator=generator).tolist()
        return torch.stack([self._images.get(i, height, width) for i in indices])


# --------------------------------------------------------------------------------------------------
# DTD textures with the 3-of-10 random augmentation of the official code (DRAEM's list), rebuilt on
# torchvision.transforms.v2 with every parameter drawn from the generator.


def _luma(image: torch.Tensor) -> torch.Tensor:
    return (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2])[None]


def _gamma_per_channel(image, g):
    gamma = _uniform(0.5, 2.0, g, size=3)
    return image.clamp(min=0.0).pow(gamma[:, None, None])


def _multiply_add_brightness(image, g):
    mul, add = _uniform(0.8, 1.2, g), _uniform(-30.0, 30.0, g) / 255.0
    # Changing luma Y by dY in YCrCb changes R, G and B by the same dY.
    return (image + (_luma(image) * (mul - 1.0) + add)).clamp(0.0, 1.0)


def _sharpness(image, g):
    return TF.adjust_sharpness(image, _uniform(0.0, 2.0, g))


def _hue_saturation(image, g):
    hue, sat = _uniform(-50.0, 50.0, g) / 255.0, _uniform(-50.0, 50.0, g) / 255.0
    image = TF.adjust_hue(image, hue)
    # Add to HSV saturation keeping hue and value: scale each channel's distance to the max.
    value = image.amax(dim=0, keepdim=True)
    chroma = value - image.amin(dim=0, keepdim=True)
    saturation = torch.where(value > 0, chroma / value.clamp(min=1e-8), torch.zeros_like(value))
    new_saturation = (saturation + sat).clamp(0.0, 1.0)
    scale = torch.where(saturation > 0, new_saturation / saturation.clamp(min=1e-8), torch.ones_like(value))
    return (value - (value - image) * scale).clamp(0.0, 1.0)


def _solarize(image, g):
    apply, threshold = _uniform(0.0, 1.0, g) < 0.5, _uniform(32.0, 128.0, g) / 255.0
    return TF.solarize(image, threshold) if apply else image


def _posterize(image, g):
    bits = 1 + _randint(8, g)
    return TF.posterize(image.mul(255).round_().to(torch.uint8), bits).float().div_(255.0)


def _invert(image, g):
    return TF.invert(image)


def _autocontrast(image, g):
    cutoff = _uniform(0.0, 20.0, g) / 100.0
    flat = image.reshape(3, -1)
    n = flat.shape[1]
    k = int(cutoff * n)
    if k == 0:
        return TF.autocontrast(image)
    low = flat.kthvalue(k + 1, dim=1).values[:, None, None]
    high = flat.kthvalue(max(n - k, 1), dim=1).values[:, None, None]
    span = high - low
    stretched = ((image - low) / span.clamp(min=1e-8)).clamp(0.0, 1.0)
    return torch.where(span > 0, stretched, image)


def _equalize(image, g):
    return TF.equalize(image.mul(255).round_().to(torch.uint8)).float().div_(255.0)


def _rotate(image, g):
    return TF.rotate(image, _uniform(-45.0, 45.0, g), interpolation=InterpolationMode.BILINEAR, fill=[0.0])


DTD_AUGMENTATIONS = (
    ("gamma_contrast", _gamma_per_channel),
    ("multiply_add_brightness", _multiply_add_brightness),
    ("sharpness", _sharpness),
    ("hue_saturation", _hue_saturation),
    ("solarize", _solarize),
    ("posterize", _posterize),
    ("invert", _invert),
    ("autocontrast", _autocontrast),
    ("equalize", _equalize),
    ("rotate", _rotate),
)


def rand_augment(image: torch.Tensor, generator: torch.Generator | None = None, num_ops: int = 3) -> torch.Tensor:
    """Apply ``num_ops`` distinct augmentations of :data:`DTD_AUGMENTATIONS`, in random order."""
    order = torch.randperm(len(DTD_AUGMENTATIONS), generator=generator)[:num_ops].tolist()
    for index in order:
        image = DTD_AUGMENTATIONS[index][1](image, generator)
    return image.clamp(0.0, 1.0)


class DTDSource:
    """Random textures (e.g. the Describable Textures Dataset) of any class, augmented.

    Each draw picks any image of the folder (recursively), resizes it to the target size and
    applies 3 distinct random augmentations out of 10 (official list, see ``DTD_AUGMENTATIONS``).
    """

    default_opacity = DTD_OPACITY

    def __init__(self, folder: str | Path, cache_size: int = 1024) -> None:
        files = list_images(folder, what="anomaly source")
        self.name = f"dtd:{Path(folder)}"
        self._images = _ImageCollection(files, load_image, cache_size)

    def __len__(self) -> int:
        return len(self._images)

    def sample(self, target: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        height, width = _target_size(target)
        index = _randint(len(self._images), generator)
        texture = self._images.get(index, height, width).float().div_(255.0)
        return rand_augment(texture, generator)


class CutPasteSource:
    """The target image itself, shifted (with wrap-around) and colour-jittered: a CutPaste baseline.

    Inside the mask the synthetic anomaly then shows content from another place of the same image.
    Shifts are at least ``min_shift`` of the image size on each axis; brightness and contrast are
    jittered by up to ``jitter``. Default opacity is the SIA range [0.5, 1], so an ablation that
    swaps sources changes only the anomaly content.
    """

    name = "cutpaste"
    default_opacity = CUTPASTE_OPACITY

    def __init__(self, min_shift: float = 0.125, jitter: float = 0.1) -> None:
        if not 0.0 <= min_shift <= 0.5:
            raise InputError(f"min_shift: expected a fraction in [0, 0.5], got {min_shift}")
        if not 0.0 <= jitter < 1.0:
            raise InputError(f"jitter: expected a value in [0, 1), got {jitter}")
        self.min_shift = min_shift
        self.jitter = jitter

    def sample(self, target: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        height, width = _target_size(target)
        shifts = []
        for size in (height, width):
            low = int(round(self.min_shift * size))
            span = max(size - 2 * low, 1)
            shifts.append((low + _randint(span, generator)) % size)
        out = torch.roll(target, shifts=tuple(shifts), dims=(1, 2))
        if self.jitter > 0:
            brightness = _uniform(1.0 - self.jitter, 1.0 + self.jitter, generator)
            contrast = _uniform(1.0 - self.jitter, 1.0 + self.jitter, generator)
            mean = out.mean()
            out = ((out - mean) * contrast + mean) * brightness
        return out.clamp(0.0, 1.0)


def make_source(spec: str | Path | AnomalySource, category: str | None = None, cache_size: int = 1024) -> AnomalySource:
    """Build a source from ``"sia:PATH"``, ``"dtd:PATH"``, ``"cutpaste"``, ``"sdas-inpaint:MODEL[?options]"``,
    ``"sdas-inpaint:SET_FOLDER"`` or a bare folder (SIA)."""
    if not isinstance(spec, (str, Path)):
        if isinstance(spec, AnomalySource):
            return spec
        if hasattr(spec, "column_names"):
            return SIASource(spec, category=category, cache_size=cache_size)
        raise InputError(f"source: expected a spec string or an AnomalySource, got {type(spec).__name__}")
    text = str(spec).strip()
    if text.lower() == "cutpaste":
        return CutPasteSource()
    kind, sep, rest = text.partition(":")
    if sep and kind.lower() == "sia":
        from .hub import open_sia_images  # local folder, parquet folder, Hub id or alias

        return SIASource(open_sia_images(rest, category), category=category, cache_size=cache_size)
    if sep and kind.lower() == "dtd":
        return DTDSource(rest, cache_size=cache_size)
    if sep and kind.lower() == "sdas-inpaint":
        from .inpaint_source import make_inpaint_source  # diffusers loads only for this source

        return make_inpaint_source(rest, category=category)
    if Path(text).is_dir():
        return SIASource(text, category=category, cache_size=cache_size)
    raise InputError(f"source {text!r}: expected 'sia:PATH', 'dtd:PATH', 'cutpaste', 'sdas-inpaint:MODEL' or an existing image folder")
