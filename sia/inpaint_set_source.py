"""An anomaly source that reads defects from a pre-generated in-context SDAS set.

Painting defects on the fly (`InpaintSDASSource`) runs the diffusion model for every training
batch, which a CPU cannot afford; ``sia generate --images TRAIN_DIR --masks perlin`` paints them once.
This source serves that set to the synthesizer: for each target it looks for the samples that were
painted into that very image (a stored sample equals its normal image outside its mask, so the
match is made on the pixels outside the mask, at thumbnail size) and returns one of them with its
exact defect mask, so the anomaly stays in context. A target with no painted sample (the set was
made from other images) receives the defect region of a randomly chosen sample instead, pasted
under that sample's mask: still an exact mask, but no longer in context; `matched_fraction` tells
how often that happened.

Spec for `make_source` / ``realnet train --source``: ``sdas-inpaint:SET_FOLDER`` (a folder holding
the ``metadata.jsonl`` that ``sia generate --images`` writes).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import InputError
from .images import load_image_tensor, load_mask
from .paths import inside

THUMBNAIL = 16  # side of the thumbnails that targets and stored samples are matched on
MATCH_TOLERANCE = 0.03  # root-mean-square difference outside the mask, in [0, 1] pixel units
METADATA = "metadata.jsonl"


def is_inpainted_set(path: str | Path) -> bool:
    """True for a folder written by ``sia generate --images`` (its metadata names a mask per image)."""
    metadata = Path(path) / METADATA
    if not metadata.is_file():
        return False
    with metadata.open() as handle:
        first = handle.readline()
    try:
        return "mask_file_name" in json.loads(first)
    except ValueError:
        return False


def _read_records(folder: Path, category: str | None) -> list[dict]:
    records = []
    for number, line in enumerate((folder / METADATA).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            image, mask = record["file_name"], record["mask_file_name"]
        except (ValueError, KeyError, TypeError):
            raise InputError(f"source sdas-inpaint:{folder}: line {number} of {METADATA} is not a sample record") from None
        for name in (image, mask):
            if not isinstance(name, str):
                raise InputError(f"source sdas-inpaint:{folder}: line {number} of {METADATA} is not a sample record")
            inside(folder, name, f"source sdas-inpaint:{folder}: line {number} of {METADATA}: file")
        records.append(record)
    if category is not None and any(r.get("category") == category for r in records):
        records = [r for r in records if r.get("category") == category]
    if not records:
        raise InputError(f"source sdas-inpaint:{folder}: {METADATA} lists no samples")
    return records


def _thumbnails(images: torch.Tensor) -> torch.Tensor:
    return F.interpolate(images, size=(THUMBNAIL, THUMBNAIL), mode="area")


class InpaintedSetSource:
    """Defects from a pre-generated in-context SDAS set (see the module docstring).

    Args:
        folder: the set folder (``metadata.jsonl``, images and ``masks/``).
        category: keep only the samples of this category when the set holds several.
        match_tolerance: how close (RMS outside the mask, thumbnails) a stored sample must be to a
            target to count as painted into it.
        cache_size: stored samples kept decoded in memory (per target size).
    """

    default_opacity = (1.0, 1.0)  # the defect is already in context; blending would only fade it

    def __init__(self, folder: str | Path, category: str | None = None, match_tolerance: float = MATCH_TOLERANCE,
                 cache_size: int = 1024) -> None:
        self.folder = Path(folder)
        if not is_inpainted_set(self.folder):
            raise InputError(f"source sdas-inpaint:{self.folder}: not a set written by `sia generate --images` "
                             f"(no {METADATA} with mask_file_name)")
        self.records = _read_records(self.folder, category)
        self.name = f"sdas-inpaint:{self.folder.name}"
        self.match_tolerance = float(match_tolerance)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[tuple[int, tuple[int, int]], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.matched = self.painted = 0
        thumbs, keep = [], []
        for index in range(len(self.records)):
            image, mask = self._read(index, None)  # full-size images are not kept: only their thumbnails
            thumbs.append(_thumbnails(image[None])[0])
            keep.append(1.0 - F.adaptive_max_pool2d(mask[None].float(), THUMBNAIL)[0])  # cells the defect never touches
        self._thumbs, self._keep = torch.stack(thumbs), torch.stack(keep)

    @property
    def matched_fraction(self) -> float:
        """Share of painted targets that received a sample painted into that very image."""
        return self.matched / self.painted if self.painted else 0.0

    def _load(self, index: int, size: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        key = (index, size or (0, 0))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        sample = self._cache[key] = self._read(index, size)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return sample

    def _read(self, index: int, size: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        record = self.records[index]
        try:
            image = load_image_tensor(self.folder / record["file_name"], size=size)
            mask = load_mask(self.folder / record["mask_file_name"], size=size) > 0
        except (OSError, ValueError) as err:
            raise InputError(f"source sdas-inpaint:{self.folder}: cannot read sample {record['file_name']} ({err})") from None
        return image, mask

    def _choose(self, target: torch.Tensor, generator: torch.Generator | None) -> tuple[int, bool]:
        """A sample painted into `target` when the set has one, else any sample; and whether it matched."""
        difference = (_thumbnails(target[None]) - self._thumbs).pow(2).mul(self._keep).sum(dim=(1, 2, 3))
        rms = (difference / (self._keep.sum(dim=(1, 2, 3)) * 3).clamp_min(1)).sqrt()
        candidates = torch.nonzero(rms <= self.match_tolerance).flatten()
        matched = candidates.numel() > 0
        pool = candidates if matched else torch.arange(len(self.records))
        return int(pool[int(torch.randint(pool.numel(), (1,), generator=generator))]), matched

    def sample(self, target: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Protocol fallback without a mask: the target itself (this source paints through `paint_batch`)."""
        return target.clone()

    def paint_batch(self, targets: torch.Tensor, masks: torch.Tensor,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets (B, 3, H, W) -> (images with a stored defect, the stored defect masks (B, 1, H, W)).

        The synthesizer's own masks are not used: the set's masks are the defects.
        """
        del masks
        targets = targets.detach().float().cpu()
        size = tuple(targets.shape[-2:])
        out, used = targets.clone(), torch.zeros(targets.shape[0], 1, *size, dtype=torch.bool)
        for row, target in enumerate(targets):
            index, matched = self._choose(target, generator)
            image, mask = self._load(index, size)
            out[row] = torch.where(mask.expand(3, -1, -1), image, target)
            used[row] = mask
            self.painted += 1
            self.matched += int(matched)
        return out, used


__all__ = ["InpaintedSetSource", "is_inpainted_set"]
