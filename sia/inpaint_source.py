"""An anomaly source that paints in-context SDAS defects into the target under the synthesizer's mask.

Unlike the other sources (an image that Eq. 3 blends in), `InpaintSDASSource` needs the mask: the
synthesizer hands it the targets and their Perlin x foreground masks (``paint_batch``), and it
returns the targets with an SDAS defect synthesised inside each mask by `SDASInpaintPipeline`, plus
the masks that really changed. Spec for `make_source` / ``realnet train --source``:
``sdas-inpaint:MODEL`` (a saved SDAS pipeline folder or Hub id).

Targets of another size than the model's are resized to it for the diffusion, the result is
resized back (bilinear) and composited at full resolution under the original mask, so outside the
mask the target is unchanged exactly; inside it the defect has the model's resolution.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .errors import InputError

INPAINT_OPACITY = (1.0, 1.0)  # the defect is already in context; blending it would only fade it


class InpaintSDASSource:
    """In-context SDAS defects (see the module docstring).

    Args:
        model: a saved `SDASPipeline` folder or Hub id, or an open `SDASPipeline` / `SDASInpaintPipeline`.
        category: the model's category for a class-conditional model (None: its only category, or
            none for a model without class conditioning).
        strength: SDAS s, fixed or (min, max) per image. steps, denoising_strength, resamples,
            mask_dilation, mask_feather: as in `SDASInpaintPipeline.__call__`.
        device: where the diffusion runs (default cpu).
    """

    default_opacity = INPAINT_OPACITY

    def __init__(self, model, category: str | None = None, strength: float | Sequence[float] = (0.1, 0.2),
                 steps: int = 20, denoising_strength: float = 0.8, resamples: int = 0, mask_dilation: int = 0,
                 mask_feather: int = 0, device: str | torch.device | None = None) -> None:
        from .inpaint import SDASInpaintPipeline
        from .pipeline import SDASPipeline, _strength_range

        if isinstance(model, SDASPipeline):
            pipe, label = SDASInpaintPipeline.from_pipe(model), type(model).__name__
        else:
            label = os.fspath(model)
            try:
                pipe = SDASInpaintPipeline.from_pretrained(label)
            except InputError as err:
                raise InputError(f"source sdas-inpaint:{label}: {err}") from None
            except Exception as err:  # noqa: BLE001 - a missing folder or unreachable Hub id mean the same here
                raise InputError(f"source sdas-inpaint:{label}: not a saved SDAS pipeline folder or Hub id "
                                 f"({type(err).__name__})") from None
        if device is not None:
            pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        conditioned = getattr(pipe.unet, "class_embedding", None) is not None
        if not conditioned:
            category = None  # the synthesizer's category still picks the foreground recipe; the model takes none
        elif category is not None:
            category = pipe.categories[pipe.category_id(category)]
        elif len(pipe.categories) == 1:
            category = pipe.categories[0]
        else:
            raise InputError(f"source sdas-inpaint:{label}: the model knows several categories "
                             f"({', '.join(pipe.categories)}); pass category")
        self.pipe, self.category = pipe, category
        self.strength = tuple(_strength_range(tuple(strength) if not isinstance(strength, (int, float)) else strength))
        self.settings = dict(num_inference_steps=steps, denoising_strength=denoising_strength, resamples=resamples,
                             mask_dilation=mask_dilation, mask_feather=mask_feather)
        self.name = f"sdas-inpaint:{label}" + (f"[{category}]" if category else "")
        size = pipe.unet.config.sample_size
        self.model_size = (size, size) if isinstance(size, int) else tuple(size)

    def sample(self, target: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Protocol fallback without a mask: the target itself (this source paints through `paint_batch`)."""
        return target.clone()

    def paint_batch(self, targets: torch.Tensor, masks: torch.Tensor,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets (B, 3, H, W) in [0, 1] with a defect inside each bool mask (B, 1, H, W) -> (images, masks used).

        Each image gets its own generator seeded from `generator`, so it does not depend on the batch.
        Targets whose mask is empty, or covers the whole image at the model's size, come back unchanged
        with an empty mask.
        """
        targets = targets.detach().float().cpu()
        masks = masks.detach().cpu().bool()
        seeds = torch.randint(0, 2**62, (targets.shape[0],), generator=generator).tolist()
        out, used = targets.clone(), torch.zeros_like(masks)
        height, width = targets.shape[-2:]
        resize = (height, width) != self.model_size
        small_images = _resize(targets, self.model_size) if resize else targets
        small_masks = F.adaptive_max_pool2d(masks.float(), self.model_size).bool() if resize else masks
        flat = small_masks.flatten(1)
        rows = torch.nonzero(flat.any(dim=1) & ~flat.all(dim=1)).flatten().tolist()
        if not rows:
            return out, used
        result = self.pipe(small_images[rows], small_masks[rows], category=self.category, strength=self.strength,
                           generator=[torch.Generator().manual_seed(seeds[i]) for i in rows], output_type="pt",
                           **self.settings)
        painted, painted_masks = result.images, result.masks.bool()
        if resize:
            painted = _resize(painted, (height, width))
            painted_masks = masks[rows] | (F.interpolate(painted_masks.float(), size=(height, width)) > 0) \
                if self.settings["mask_dilation"] else masks[rows]
        region = painted_masks.expand(-1, 3, -1, -1)
        out[rows] = torch.where(region, painted, targets[rows])
        used[rows] = painted_masks
        return out, used


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
