"""Progress pictures of a diffusion run and its final pipeline folder.

A grid has one row per anomaly strength, all rows from the same fixed starting noise, so the
grids of successive steps show how the model and the strength's effect develop.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .diffusion_data import mix_seed
from .runs import atomic_folder, atomic_path


def fixed_sample_plan(sample_images: int, seed: int, categories: list[str], image_size: int):
    """Column -> category and the fixed starting noise, drawn once from the seed."""
    columns = [categories[j % len(categories)] for j in range(sample_images)]
    generator = torch.Generator().manual_seed(mix_seed(seed, 0x5A3F1E))
    noise = torch.randn(sample_images, 3, image_size, image_size, generator=generator)
    return columns, noise


@torch.no_grad()
def render_sample_grid(unet, categories: list[str], columns: list[str], noise: torch.Tensor,
                       strengths: tuple[float, ...], num_inference_steps: int, seed: int) -> torch.Tensor:
    """(3, H', W') grid in [0, 1]: one row per strength, the same starting noise in every row."""
    from torchvision.utils import make_grid

    from .pipeline import SDASPipeline
    from .scheduler import SDASScheduler

    pipe = SDASPipeline(unet=unet, scheduler=SDASScheduler(), categories=list(categories))
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for strength in strengths:
        row = torch.empty_like(noise)
        for category in dict.fromkeys(columns):
            index = [j for j, c in enumerate(columns) if c == category]
            latents = noise[index].to(device=unet.device, dtype=unet.dtype)
            generator = torch.Generator().manual_seed(mix_seed(seed, 0x51, categories.index(category)))
            images = pipe(category=category, num_images=len(index), strength=float(strength),
                          num_inference_steps=num_inference_steps, generator=generator, latents=latents,
                          output_type="pt").images
            row[index] = images.float().cpu()
        rows.append(row)
    return make_grid(torch.cat(rows), nrow=len(columns), padding=2, pad_value=1.0)


def save_grid(grid: torch.Tensor, path: Path) -> None:
    """Write a grid as a PNG, atomically."""
    from .images import tensor_to_pil

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tensor_to_pil(grid).save(tmp)


def save_pipeline(unet, categories: list[str], folder: Path) -> Path:
    """Write an SDASPipeline folder atomically (a finished folder is only ever replaced whole)."""
    from .pipeline import SDASPipeline
    from .scheduler import SDASScheduler

    with atomic_folder(folder) as tmp:
        SDASPipeline(unet=unet, scheduler=SDASScheduler(), categories=list(categories)).save_pretrained(tmp)
    return folder
