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
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import InputError, whole_number
from .generate import (
    MAX_SEED,
    GenerationSummary,
    _check_settings,
    _rebuild_metadata,
    _write_atomic,
    _write_text_atomic,
    load_generation_pipeline,
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
    for path in list_images(folder, what="--masks"):
        by_stem.setdefault(path.stem, path)
    found = []
    for image in images:
        mask = by_stem.get(image.stem) or by_stem.get(f"{image.stem}_mask")
        if mask is None:
            raise InputError(f"--masks {folder}: no mask for image {image.relative_to(root)} "
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
    raise InputError("--masks perlin: could not draw a non-empty mask inside the foreground; try --foreground none")


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
    from .inpaint import SDASInpaintPipeline

    batch_size, steps = (whole_number(v, n) for n, v in (("--batch-size", batch_size), ("--steps", steps)))
    seed = whole_number(seed, "--seed", minimum=0)
    image_dir = Path(images)
    normal_files = list_images(image_dir, what="--images")
    num_images = len(normal_files) if num_images is None else whole_number(num_images, "--num-images")
    if seed + num_images - 1 > MAX_SEED:
        raise InputError(f"--seed must be at most 2**64 - num_images, got {seed}")
    perlin = str(masks).strip().lower() == "perlin"
    mask_dir = None if perlin else Path(masks)
    if mask_dir is not None and not mask_dir.is_dir():
        raise InputError(f"--masks {masks}: expected 'perlin' or a folder of masks")
    mask_files = None if perlin else _mask_files(mask_dir, normal_files, image_dir)
    output = writable_folder_path(output, "--output")
    separate_output(output, [image_dir, mask_dir, model if Path(model).is_dir() else None], "--output")
    fg = foreground_config(foreground)
    strengths = parse_strength(strength)
    device = parse_device(device)

    state = PartialState()
    pipe, model_id, resolved_revision = load_generation_pipeline(model, revision, device or state.device, dtype)
    pipe = SDASInpaintPipeline.from_pipe(pipe)
    pipe.use_sampler(sampler)
    pipe.set_progress_bar_config(disable=True)
    warning = strength_warning(strengths, sampler)
    if warning and state.is_main_process:
        logger.warning(warning)
    conditioned = getattr(pipe.unet, "class_embedding", None) is not None
    if category is not None and not conditioned:
        raise InputError(f"--category {category}: this model has no class conditioning; leave --category out")
    if conditioned:
        if category is None and len(pipe.categories) != 1:
            raise InputError(f"--category is needed: the model knows {', '.join(pipe.categories)}")
        category = pipe.categories[pipe.category_id(category if category is not None else 0)]
    folder_name = path_component(category or "images", "--category")
    size = pipe.unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    pipe._schedule(steps, denoising_strength, None)  # bad steps / denoising strength fail before anything is written

    settings = {"model": model_id, "revision": resolved_revision, "sampler": sampler.lower(), "steps": steps,
                "strength": list(strengths), "seed": seed, "dtype": dtype, "images": str(image_dir.resolve()),
                "masks": "perlin" if perlin else str(mask_dir.resolve()), "foreground": fg.name,
                "denoising_strength": denoising_strength, "resamples": resamples, "mask_dilation": mask_dilation,
                "mask_feather": mask_feather, "num_images": num_images}
    settings_path = output / ".sia" / "settings.json"
    known = _check_settings(settings_path, settings, SETTINGS_KEYS)
    if state.is_main_process and not known:
        settings_path.parent.mkdir(parents=True, exist_ok=True)
        _write_text_atomic(settings_path, json.dumps(settings, indent=2, sort_keys=True) + "\n")
    state.wait_for_everyone()
    _check_settings(settings_path, settings, SETTINGS_KEYS)

    width = max(6, len(str(num_images - 1)))
    mine = list(range(num_images))[state.process_index::state.num_processes]

    def paths(index: int) -> tuple[Path, Path, Path]:
        stem = f"{index:0{width}d}"
        return (output / folder_name / f"{stem}.png", output / "masks" / folder_name / f"{stem}.png",
                output / ".sia" / "records" / folder_name / f"{stem}.json")

    todo = [i for i in mine if not all(p.is_file() for p in paths(i))]
    for part in (output / folder_name, output / "masks" / folder_name, output / ".sia" / "records" / folder_name):
        part.mkdir(parents=True, exist_ok=True)
    strength_arg = strengths[0] if len(strengths) == 1 else strengths
    generated = 0
    with tqdm(total=len(todo), desc="sia generate --images", unit="img",
              disable=not (progress and state.is_main_process)) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            generators = [torch.Generator("cpu").manual_seed(seed + i) for i in batch]
            clean = torch.stack([load_image_tensor(normal_files[i % len(normal_files)], size=size) for i in batch])
            if perlin:
                batch_masks = torch.stack([_perlin_mask(im, fg, g) for im, g in zip(clean, generators, strict=True)])
            else:
                batch_masks = torch.stack([load_mask(mask_files[i % len(normal_files)], size=size) for i in batch]) > 0
            result = pipe(clean, batch_masks, category=category, strength=strength_arg, num_inference_steps=steps,
                          denoising_strength=denoising_strength, resamples=resamples, mask_dilation=mask_dilation,
                          mask_feather=mask_feather, generator=generators, output_type="pt")
            for j, index in enumerate(batch):
                image_path, mask_path, record_path = paths(index)
                image, mask = tensor_to_pil(result.images[j]), tensor_to_pil(result.masks[j])
                _write_atomic(image_path, lambda tmp, im=image: im.save(tmp, format="PNG"))
                _write_atomic(mask_path, lambda tmp, im=mask: im.save(tmp, format="PNG"))
                source = normal_files[index % len(normal_files)]
                record = {"file_name": f"{folder_name}/{image_path.name}",
                          "mask_file_name": f"masks/{folder_name}/{mask_path.name}",
                          "source_image": source.relative_to(image_dir).as_posix(), "category": category,
                          "index": index, "strength": result.strengths[j], "seed": seed + index,
                          **{k: settings[k] for k in ("model", "revision", "sampler", "steps", "dtype", "denoising_strength",
                                                      "resamples", "mask_dilation", "mask_feather")},
                          "mask_source": "perlin" if perlin else "folder"}
                _write_text_atomic(record_path, json.dumps(record, sort_keys=True))
                generated += 1
                bar.update()
                if on_image_saved is not None:
                    on_image_saved(record)

    state.wait_for_everyone()
    metadata = _rebuild_metadata(output) if state.is_main_process else None
    state.wait_for_everyone()
    return GenerationSummary(output=output, generated=generated, skipped=len(mine) - len(todo), total=num_images,
                             metadata=metadata)
