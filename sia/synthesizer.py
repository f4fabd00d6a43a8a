"""Turn normal images into synthetic anomalies: Perlin mask x foreground mask x blended source.

:class:`AnomalySynthesizer` is the one object users need: give it a source (SIA folder, DTD
textures, CutPaste) and a category (foreground recipe), then call it on an image. The batched path
:meth:`AnomalySynthesizer.synthesize_batch` does the same for a whole batch in a few tensor
operations, for training loops. :class:`SyntheticAnomalyDataset` wraps any dataset of normal
images so that any detector can train on these anomalies, reproducibly per (seed, index, epoch).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .blend import blend, opacity_range, sample_opacity
from .errors import InputError
from .foreground import ForegroundConfig, foreground_config, foreground_masks_bool
from .images import ImageLike, load_image_tensor
from .perlin import check_mask_shape, crack_choices, shaped_masks_bool
from .sources import AnomalySource, make_source, sample_batch


@dataclass
class SynthesisResult:
    """One synthetic anomaly: the image (3, H, W) in [0, 1], its mask (1, H, W) and how it was made."""

    image: torch.Tensor
    mask: torch.Tensor
    source: str
    opacity: float
    seed: int | None


FLOAT_RANGE_TOLERANCE = 1e-3  # float images may overshoot [0, 1] by rounding, not by a different scale


def as_image_tensor(image: ImageLike, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Any image (path, PIL, ndarray, tensor) -> float (3, H, W) in [0, 1], optionally resized.

    A float tensor already shaped (3, H, W) is used as it is (no 8-bit round trip); it must be
    finite and in [0, 1] (a 0..255 float tensor is an InputError, not silently clamped to white).
    """
    if isinstance(image, torch.Tensor) and image.is_floating_point() and image.ndim == 3 and image.shape[0] == 3:
        tensor = image.detach().float().cpu()
        if tensor.numel() == 0:
            raise InputError(f"image: expected a non-empty (3, H, W) tensor, got {tuple(tensor.shape)}")
        if not torch.isfinite(tensor).all():
            raise InputError("image: expected floats in [0, 1], got NaN or infinite values")
        low, high = float(tensor.min()), float(tensor.max())
        if low < -FLOAT_RANGE_TOLERANCE or high > 1.0 + FLOAT_RANGE_TOLERANCE:
            raise InputError(f"image: expected floats in [0, 1], got values in [{low:g}, {high:g}]")
        if size is not None and tuple(tensor.shape[-2:]) != tuple(size):
            tensor = F.interpolate(tensor[None], size=tuple(size), mode="bilinear", align_corners=False, antialias=True)[0]
        return tensor.clamp(0.0, 1.0)
    return load_image_tensor(image, size=size)


def _image_size(value: tuple[int, int] | int | None) -> tuple[int, int] | None:
    """``image_size`` as (H, W) with positive sides, or None; anything else is an InputError."""
    if value is None:
        return None
    pair = (value, value) if isinstance(value, (int, np.integer)) else value
    if (
        not isinstance(pair, Sequence)
        or len(pair) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in pair)
    ):
        raise InputError(f"image_size: expected a positive int or (H, W) with positive sides, got {value!r}")
    return int(pair[0]), int(pair[1])


def _category_name(category: str | ForegroundConfig | None) -> str | None:
    if isinstance(category, str) and category.strip().lower() not in ("none", "auto"):
        return category
    return None


class AnomalySynthesizer:
    """Synthesise anomalies the RealNet way: ``blend(I, A, perlin * foreground, beta)``.

    Args:
        source: an :class:`~sia.sources.AnomalySource` or a spec (``"sia:PATH"``, ``"dtd:PATH"``,
            ``"cutpaste"``, ``"sdas-inpaint:MODEL"`` (in-context SDAS defects painted under the mask),
            a folder of SIA images, or a ``datasets.Dataset`` with an image column).
        category: foreground recipe: a benchmark category (``"bottle"``, ``"visa/pcb1"``),
            ``"none"`` (whole image), ``"auto"``, or a :class:`ForegroundConfig`. It also picks the
            ``<category>`` subfolder / rows of an SIA source.
        opacity: blending opacity range (or a single value); default: the source's own
            (SIA [0.5, 1], DTD [0.2, 1], CutPaste [0.5, 1]).
        require_nonempty: redraw the Perlin mask (up to ``max_attempts`` times) until the mask
            after the foreground is non-empty. Off by default, as in the official code, where about
            4 % of "anomalous" samples have an empty Perlin mask.
        image_size: resize inputs to (H, W) first; by default the input size is kept.
        perlin_threshold, min_scale_exp, max_scale_exp, rotate: Perlin mask parameters.
        mask_shape: "perlin" (the official blobs), "cracks" (thin crack-shaped masks, for thin
            defects such as cracks, which are not blob-shaped) or "mixed" (each sample a blob or
            a crack with probability 0.5; a redrawn mask keeps its sample's kind).
    """

    def __init__(
        self,
        source: AnomalySource | str | Any,
        category: str | ForegroundConfig | None = "none",
        opacity: float | Sequence[float] | None = None,
        require_nonempty: bool = False,
        max_attempts: int = 100,
        image_size: tuple[int, int] | int | None = None,
        perlin_threshold: float = 0.5,
        min_scale_exp: int = 0,
        max_scale_exp: int = 6,
        rotate: bool = True,
        mask_shape: str = "perlin",
    ) -> None:
        self.foreground = foreground_config(category)
        self.source = make_source(source, category=_category_name(category))
        self.opacity = opacity_range(self.source.default_opacity if opacity is None else opacity, "opacity")
        if max_attempts < 1:
            raise InputError(f"max_attempts: expected >= 1, got {max_attempts}")
        self.require_nonempty = require_nonempty
        self.max_attempts = max_attempts
        self.image_size = _image_size(image_size)
        self.mask_shape = check_mask_shape(mask_shape)
        self.perlin_kwargs = dict(
            threshold=perlin_threshold, min_scale_exp=min_scale_exp, max_scale_exp=max_scale_exp, rotate=rotate
        )

    def __repr__(self) -> str:
        shape = "" if self.mask_shape == "perlin" else f", mask_shape={self.mask_shape!r}"
        return (
            f"AnomalySynthesizer(source={self.source.name!r}, category={self.foreground.name!r}, "
            f"opacity={self.opacity}, require_nonempty={self.require_nonempty}{shape})"
        )

    # ----------------------------------------------------------------------------------------------

    def masks(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Anomaly masks (B, 1, H, W) float for a batch: Perlin (or crack) x foreground (optional redraws)."""
        return self._masks_bool(images, generator).float()

    def _masks_bool(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        batch, _, height, width = images.shape
        foreground = foreground_masks_bool(images, self.foreground)
        cracks = crack_choices(batch, self.mask_shape, generator)
        masks = shaped_masks_bool(cracks, height, width, generator, **self.perlin_kwargs)
        masks &= foreground
        if self.require_nonempty:
            has_foreground = foreground.flatten(1).any(dim=1)
            for _ in range(self.max_attempts - 1):
                redo = torch.nonzero(has_foreground & ~masks.flatten(1).any(dim=1)).flatten()
                if redo.numel() == 0:
                    break
                fresh = shaped_masks_bool(cracks[redo], height, width, generator, **self.perlin_kwargs)
                masks[redo] = fresh & foreground[redo]
        return masks

    def synthesize_batch(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        probability: float = 1.0,
        return_opacity: bool = False,
    ):
        """Synthesise anomalies for a batch (B, 3, H, W) in [0, 1] -> ``(images, masks)``.

        With ``probability < 1`` each sample is made anomalous independently with that probability
        (the others come back unchanged with an empty mask). With ``return_opacity`` the per-sample
        opacities (B,) (0 for untouched samples) are returned as a third element.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"images: expected a (B, 3, H, W) tensor, got {tuple(images.shape)}")
        if not 0.0 <= probability <= 1.0:
            raise InputError(f"probability: expected a value in [0, 1], got {probability}")
        images = images.detach().float().cpu()
        batch = images.shape[0]
        if probability < 1.0:
            chosen = torch.nonzero(torch.rand(batch, generator=generator) < probability).flatten()
            out, masks = images.clone(), torch.zeros(batch, 1, *images.shape[-2:])
            opacities = torch.zeros(batch)
            if chosen.numel():
                sub_out, sub_masks, sub_opacity = self._synthesize(images[chosen], generator)
                out[chosen], masks[chosen], opacities[chosen] = sub_out, sub_masks, sub_opacity
        else:
            out, masks, opacities = self._synthesize(images, generator)
        if return_opacity:
            return out, masks, opacities
        return out, masks

    def _synthesize(self, images: torch.Tensor, generator: torch.Generator | None):
        masks = self._masks_bool(images, generator)
        paint = getattr(self.source, "paint_batch", None)
        if paint is not None:  # in-context sources put the defect into the image under the mask themselves
            sources, masks = paint(images, masks, generator)
        else:
            sources = sample_batch(self.source, images, generator, allow_uint8=True)
        opacities = sample_opacity(images.shape[0], self.opacity, generator)
        out = blend(images, sources, masks, opacities)
        return out, masks.float(), opacities

    def __call__(
        self,
        image: ImageLike,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> SynthesisResult:
        """One synthetic anomaly for any image (path, PIL, ndarray, tensor; any size and mode).

        Reproducible: the same ``seed`` gives the same result. With neither ``seed`` nor
        ``generator``, a seed is drawn from torch's global RNG and reported in the result.
        """
        tensor = as_image_tensor(image, self.image_size)
        if generator is None:
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)))
            generator = torch.Generator().manual_seed(int(seed))
        else:
            seed = None
        out, masks, opacities = self.synthesize_batch(tensor[None], generator, return_opacity=True)
        return SynthesisResult(
            image=out[0], mask=masks[0], source=self.source.name, opacity=float(opacities[0]), seed=seed
        )


def item_seed(seed: int, index: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for one (seed, index, epoch) triple."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch), int(index)]).generate_state(2)
    return (int(state[0]) << 31 ^ int(state[1])) & (2**63 - 1)


class SyntheticAnomalyDataset(torch.utils.data.Dataset):
    """Wrap a dataset of normal images so that items become synthetic anomalies with probability p.

    Items of ``dataset`` may be image-like (path, PIL, array, float tensor (3, H, W) in [0, 1]), a
    ``(image, ...)`` tuple, or a dict with an ``"image"`` key (other keys are passed through).
    Each item is a dict with ``image`` (anomalous or normal), ``clean_image``, ``mask`` (1, H, W),
    ``is_synthetic``, ``opacity`` and ``source``. Item ``i`` depends only on (seed, i, epoch); call
    :meth:`set_epoch` at the start of each epoch (before creating DataLoader iterators, as
    persistent workers keep their own copy).
    """

    def __init__(
        self,
        dataset: Any,
        synthesizer: AnomalySynthesizer,
        probability: float = 0.5,
        seed: int = 0,
        image_size: tuple[int, int] | int | None = None,
    ) -> None:
        if not 0.0 <= probability <= 1.0:
            raise InputError(f"probability: expected a value in [0, 1], got {probability}")
        self.dataset = dataset
        self.synthesizer = synthesizer
        self.probability = float(probability)
        self.seed = int(seed)
        self.image_size = _image_size(image_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a different epoch gives different (but reproducible) anomalies."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Item ``index``; negative indices count from the end, as for a list."""
        size = len(self)
        index = operator.index(index)
        if not -size <= index < size:
            raise IndexError(f"index {index} out of range for a dataset of {size} items")
        index %= size  # item i and item i - len are the same item, with the same anomaly
        item = self.dataset[index]
        extra: dict[str, Any] = {}
        if isinstance(item, dict):
            if "image" not in item:
                raise InputError(f"dataset item {index}: expected a dict with an 'image' key, got keys {sorted(item)}")
            extra = {k: v for k, v in item.items() if k != "image"}
            image = item["image"]
        elif isinstance(item, (tuple, list)):
            image = item[0]
        else:
            image = item
        clean = as_image_tensor(image, self.image_size or self.synthesizer.image_size)
        generator = torch.Generator().manual_seed(item_seed(self.seed, index, self.epoch))
        synthetic = bool(torch.rand((), generator=generator) < self.probability)
        if synthetic:
            out, masks, opacities = self.synthesizer.synthesize_batch(clean[None], generator, return_opacity=True)
            anomalous, mask, opacity, source = out[0], masks[0], float(opacities[0]), self.synthesizer.source.name
        else:
            anomalous, mask, opacity, source = clean, torch.zeros(1, *clean.shape[-2:]), 0.0, "none"
        extra.update(
            image=anomalous, clean_image=clean, mask=mask, is_synthetic=synthetic, opacity=opacity, source=source
        )
        return extra
