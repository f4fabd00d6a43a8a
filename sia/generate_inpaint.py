"""Generate an in-context SDAS set: defects painted into given normal images, with their exact masks.

`sia generate --images DIR --masks perlin|DIR` writes, for sample ``i`` (normal image
``i % len(images)``, seed ``seed + i``)::

    OUT/<category>/000000.png          the normal image with an SDAS defect inside the mask
    OUT/masks/<category>/000000.png    the mask used (after dilation): here it *is* the defect
    OUT/metadata.jsonl                 file_name, mask_file_name, source_image, category, index,
                                       strength, seed, mask_source and the sampling settings
    OUT/.sia/settings.json, OUT/.sia/records/<category>/*.json   (resume; as `sia generate`)

Masks: ``perlin`` draws a Perlin x foreground mask per sample from its seed (non-empty); a folder
gives one mask per normal image, matched by file name stem (``name.png`` or ``name_mask.png``).
Images and masks are resized to the model's resolution (bilinear / nearest). Each sample has its
own generator (mask, strength and noise), so the set does not depend on batch size or process count;
an interrupted run resumes, and files are written atomically. ``datasets.load_dataset("imagefolder",
data_dir=OUT)`` reads it with an ``image`` and a ``mask`` column.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError, whole_number
from .generate import (
    MAX_SEED,
    GenerationSummary,
    _claim_folder,
    _rebuild_metadata,
    _write_atomic,
    _write_text_atomic,
    load_generation_pipeline,
    saving_progress,
    logger,
    parse_device,
    parse_strength,
    strength_warning,
)
from .images import list_images, load_image_tensor, load_mask, tensor_to_pil
from .paths import path_component, separate_output, writable_folder_path

__all__ = ["generate_inpainted_dataset"]

SETTINGS_KEYS = ("model", "revision", "sampler", "steps", "strength", "seed", "dtype", "images", "masks", "foreground",
                 "denoising_strength", "resamples", "mask_dilation", "mask_feather", "num_images")


def _mask_files(folder: Path, images: list[Path], root: Path) -> list[Path]:
    """The mask of each normal image: same stem (or stem + ``_mask``) in `folder`; InputError naming a missing one."""
    by_stem: dict[str, Path] = {}
    for path in list_images(folder, what="`masks`"):
        by_stem.setdefault(path.stem, path)
    found = []
    for image in images:
        mask = by_stem.get(image.stem) or by_stem.get(f"{image.stem}_mask")
        if mask is None:
            raise InputError(f"`masks` {folder}: no mask for image {image.relative_to(root)} "
                             f"(expected {image.stem}.png or {image.stem}_mask.png)")
        found.append(mask)
    return found


def _perlin_mask(image: torch.Tensor, foreground, generator: torch.Generator, attempts: int = 100) -> torch.Tensor:
    """A Perlin x foreground mask (1, H, W) bool that is neither empty nor everything (redrawn up to `attempts`)."""
    from .foreground import foreground_masks_bool
    from .perlin import perlin_masks_bool

    height, width = image.shape[-2:]
    region = foreground_masks_bool(image[None], foreground)[0]
    if not bool(region.any()):
        region = torch.ones_like(region)  # no foreground found: anywhere in the image
    for _ in range(attempts):
        mask = perlin_masks_bool(1, height, width, generator)[0] & region
        if bool(mask.any()) and not bool(mask.all()):
            return mask
    raise InputError("`masks='perlin'`: could not draw a non-empty mask inside the foreground; try `foreground='none'`")


def generate_inpainted_dataset(
    model: str | os.PathLike,
    output: str | os.PathLike,
    images: str | os.PathLike,
    masks: str | os.PathLike = "perlin",
    category: str | None = None,
    num_images: int | None = None,
    strength: float | str | Sequence[float] = (0.1, 0.2),
    seed: int = 0,
    batch_size: int = 16,
    steps: int = 20,
    sampler: str = "ddpm",
    denoising_strength: float = 0.8,
    resamples: int = 0,
    mask_dilation: int = 0,
    mask_feather: int = 0,
    foreground: str = "none",
    revision: str | None = None,
    device: str | torch.device | None = None,
    dtype: str = "float32",
    progress: bool = True,
    on_image_saved: Callable[[dict], None] | None = None,
) -> GenerationSummary:
    """Paint in-context SDAS defects into the normal images of `images` (resumable; see the module docstring).

    Args:
        model: saved `SDASPipeline` folder or Hub id.
        images: folder of normal images (sorted, recursive); sample i uses image ``i % len``.
        masks: ``"perlin"`` or a folder of masks matched by file stem.
        category: the model's category (None: its only one, or none for an unconditioned model).
        num_images: samples to write (default: one per normal image).
        foreground: foreground recipe restricting Perlin masks (``none``, ``auto``, a category, ``hazelnut-toy``).
        Other arguments: as `sia generate` and `SDASInpaintPipeline.__call__`.
    """
    from accelerate import PartialState

    from .foreground import foreground_config

    batch_size, steps, seed, num_images, sources = _checked_request(images, masks, num_images, batch_size, steps, seed)
    output = writable_folder_path(output, "`output`")
    separate_output(output, [sources.image_dir, sources.mask_dir, model if Path(model).is_dir() else None], "`output`")
    fg, strengths, device = foreground_config(foreground), parse_strength(strength), parse_device(device)
    state = PartialState()
    pipe, model_id, resolved_revision = _inpaint_pipeline(model, revision, device or state.device, dtype, sampler,
                                                          strengths, state)
    category = _model_category(pipe, category)
    slots = _Slots(output, path_component(category or "images", "`category`"), num_images)
    pipe._schedule(steps, denoising_strength, None)  # bad steps / denoising strength fail before anything is written

    settings = {"model": model_id, "revision": resolved_revision, "sampler": sampler.lower(), "steps": steps,
                "strength": list(strengths), "seed": seed, "dtype": dtype, **sources.settings(), "foreground": fg.name,
                "denoising_strength": denoising_strength, "resamples": resamples, "mask_dilation": mask_dilation,
                "mask_feather": mask_feather, "num_images": num_images}
    _claim_folder(output / ".sia" / "settings.json", settings, state, SETTINGS_KEYS)

    mine = list(range(num_images))[state.process_index::state.num_processes]
    todo = [i for i in mine if not slots.done(i)]
    slots.make_folders()
    with saving_progress(len(todo), "sia generate --images", progress and state.is_main_process,
                         on_image_saved) as saved:
        painter = _Painter(pipe, sources, fg, category, strengths, settings)
        generated = sum(painter.paint(slots, todo[start:start + batch_size], saved)
                        for start in range(0, len(todo), batch_size))

    state.wait_for_everyone()
    metadata = _rebuild_metadata(output) if state.is_main_process else None
    state.wait_for_everyone()
    return GenerationSummary(output=output, generated=generated, skipped=len(mine) - len(todo), total=num_images,
                             metadata=metadata)


@dataclass
class _Sources:
    """The normal images of a run and where each sample's mask comes from (a folder, or Perlin noise)."""

    image_dir: Path
    normal_files: list[Path]
    mask_dir: Path | None  # None: a Perlin x foreground mask per sample
    mask_files: list[Path] | None

    @property
    def perlin(self) -> bool:
        return self.mask_dir is None

    def image(self, index: int) -> Path:
        return self.normal_files[index % len(self.normal_files)]

    def settings(self) -> dict[str, str]:
        return {"images": str(self.image_dir.resolve()),
                "masks": "perlin" if self.perlin else str(self.mask_dir.resolve())}

    def mask(self, index: int) -> Path:
        return self.mask_files[index % len(self.normal_files)]


def _checked_request(images: str | os.PathLike, masks: str | os.PathLike, num_images: int | None, batch_size: int,
                     steps: int, seed: int) -> tuple[int, int, int, int, _Sources]:
    """(batch_size, steps, seed, num_images, sources), checked: whole numbers, every ``seed + i`` fits a
    torch generator, and a mask folder holds a mask for every normal image."""
    batch_size, steps = (whole_number(v, n) for n, v in (("batch_size", batch_size), ("steps", steps)))
    seed = whole_number(seed, "seed", minimum=0)
    image_dir = Path(images)
    normal_files = list_images(image_dir, what="`images`")
    num_images = len(normal_files) if num_images is None else whole_number(num_images, "num_images")
    if seed + num_images - 1 > MAX_SEED:
        raise InputError(f"`seed` must be at most 2**64 - `num_images`, got {seed}")
    perlin = str(masks).strip().lower() == "perlin"
    mask_dir = None if perlin else Path(masks)
    if mask_dir is not None and not mask_dir.is_dir():
        raise InputError(f"`masks` {masks}: expected 'perlin' or a folder of masks")
    mask_files = None if perlin else _mask_files(mask_dir, normal_files, image_dir)
    return batch_size, steps, seed, num_images, _Sources(image_dir, normal_files, mask_dir, mask_files)


def _inpaint_pipeline(model: str | os.PathLike, revision: str | None, device, dtype: str, sampler: str,
                      strengths: Sequence[float], state):
    """(in-context pipeline with its sampler set, model id, resolved revision); warns about a large strength."""
    from .inpaint import SDASInpaintPipeline

    pipe, model_id, resolved_revision = load_generation_pipeline(model, revision, device, dtype)
    pipe = SDASInpaintPipeline.from_pipe(pipe)
    pipe.use_sampler(sampler)
    pipe.set_progress_bar_config(disable=True)
    warning = strength_warning(strengths, sampler)
    if warning and state.is_main_process:
        logger.warning(warning)
    return pipe, model_id, resolved_revision


def _model_category(pipe, category: str | None) -> str | None:
    """The category as the model names it: needed for a class-conditioned model with several,
    refused for an unconditioned one (None stays None)."""
    conditioned = getattr(pipe.unet, "class_embedding", None) is not None
    if category is not None and not conditioned:
        raise InputError(f"`category` {category}: this model has no class conditioning; leave `category` out")
    if conditioned:
        if category is None and len(pipe.categories) != 1:
            raise InputError(f"`category` is needed: the model knows {', '.join(pipe.categories)}")
        category = pipe.categories[pipe.category_id(category if category is not None else 0)]
    return category


class _Slots:
    """Where sample ``index`` goes (image, mask, record); a sample is done when all three exist."""

    def __init__(self, output: Path, folder_name: str, num_images: int) -> None:
        self.output, self.folder_name = output, folder_name
        self.width = max(6, len(str(num_images - 1)))

    def folders(self) -> tuple[Path, Path, Path]:
        name = self.folder_name
        return self.output / name, self.output / "masks" / name, self.output / ".sia" / "records" / name

    def paths(self, index: int) -> tuple[Path, Path, Path]:
        stem = f"{index:0{self.width}d}"
        images, masks, records = self.folders()
        return images / f"{stem}.png", masks / f"{stem}.png", records / f"{stem}.json"

    def done(self, index: int) -> bool:
        return all(p.is_file() for p in self.paths(index))

    def make_folders(self) -> None:
        for part in self.folders():
            part.mkdir(parents=True, exist_ok=True)


class _Painter:
    """Paints one batch of samples, each from its own generator seeded ``seed + index`` (mask, strength
    and noise), and writes its image, mask and record atomically."""

    def __init__(self, pipe, sources: _Sources, fg, category: str | None, strengths: Sequence[float],
                 settings: dict) -> None:
        self.pipe, self.sources, self.fg, self.category, self.settings = pipe, sources, fg, category, settings
        self.strength = strengths[0] if len(strengths) == 1 else strengths
        size = pipe.unet.config.sample_size
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    def paint(self, slots: _Slots, batch: Sequence[int], saved: Callable[[dict], None]) -> int:
        seed, sources, size = self.settings["seed"], self.sources, self.size
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in batch]
        clean = torch.stack([load_image_tensor(sources.image(i), size=size) for i in batch])
        if sources.perlin:
            batch_masks = torch.stack([_perlin_mask(im, self.fg, g) for im, g in zip(clean, generators, strict=True)])
        else:
            batch_masks = torch.stack([load_mask(sources.mask(i), size=size) for i in batch]) > 0
        s = self.settings
        result = self.pipe(clean, batch_masks, category=self.category, strength=self.strength,
                           num_inference_steps=s["steps"], denoising_strength=s["denoising_strength"],
                           resamples=s["resamples"], mask_dilation=s["mask_dilation"],
                           mask_feather=s["mask_feather"], generator=generators, output_type="pt")
        for j, index in enumerate(batch):
            saved(self._write(slots, index, result.images[j], result.masks[j], result.strengths[j]))
        return len(batch)

    def _write(self, slots: _Slots, index: int, image: torch.Tensor, mask: torch.Tensor, strength: float) -> dict:
        image_path, mask_path, record_path = slots.paths(index)
        image, mask = tensor_to_pil(image), tensor_to_pil(mask)
        _write_atomic(image_path, lambda tmp, im=image: im.save(tmp, format="PNG"))
        _write_atomic(mask_path, lambda tmp, im=mask: im.save(tmp, format="PNG"))
        name, settings = slots.folder_name, self.settings
        record = {"file_name": f"{name}/{image_path.name}", "mask_file_name": f"masks/{name}/{mask_path.name}",
                  "source_image": self.sources.image(index).relative_to(self.sources.image_dir).as_posix(),
                  "category": self.category, "index": index, "strength": strength, "seed": settings["seed"] + index,
                  **{k: settings[k] for k in ("model", "revision", "sampler", "steps", "dtype", "denoising_strength",
                                              "resamples", "mask_dilation", "mask_feather")},
                  "mask_source": "perlin" if self.sources.perlin else "folder"}
        _write_text_atomic(record_path, json.dumps(record, sort_keys=True))
        return record
