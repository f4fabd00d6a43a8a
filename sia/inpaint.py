"""`SDASInpaintPipeline`: in-context SDAS, a strength-controlled defect painted into a given mask of a given image.

Plain SDAS samples a whole anomalous image from noise; blending a Perlin-masked piece of it into an
unrelated normal image (paper Eq. 3) leaves seams, and the mask is the Perlin mask rather than the
defect. In-context SDAS instead noises the *normal image itself* to a start step and runs the SDAS
reverse process (variance ``(1 + s) * Sigma_theta``) with the region outside the mask re-anchored to
the noised normal image after every step (RePaint-style, optionally with resampling: each step is
redone after re-noising it, so the inside harmonises with the outside). A final composite copies the
input outside the mask, so there the output equals the input exactly, and the mask is the defect.

It needs no defect images: the diffusion model is the ordinary SDAS model trained on normal images
(any saved `SDASPipeline`, either sampler). Load one with
``SDASInpaintPipeline.from_pretrained(dir_or_hub_id)`` or share an open one's weights with
``SDASInpaintPipeline.from_pipe(sdas_pipe)``.

Sizes: a mask whose size differs from its image is refused (resize it yourself, nearest-neighbour,
so that the defect region is what you mean); images need a side that the UNet can downsample
(a multiple of ``2 ** (levels - 1)``), best the size the model was trained at.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .errors import InputError, whole_number
from .images import ImageLike, _mask_values
from .pipeline import GeneratorLike, SDASPipeline, _strength_range
from .unets import unet_input

__all__ = ["SDASInpaintPipeline", "SDASInpaintPipelineOutput", "feather_weights", "prepare_masks"]

DEFAULT_DENOISING_STRENGTH = 0.8
MaskLike = PIL.Image.Image | np.ndarray | torch.Tensor


@dataclass
class SDASInpaintPipelineOutput(BaseOutput):
    """Images with a defect inside the mask, the mask actually used (after dilation) and each image's s.

    images: PIL images, a (B, H, W, 3) float array or a (B, 3, H, W) float tensor in [0, 1] (``output_type``).
    masks: the region that may differ from the input (the defect), as PIL "L" images (0/255), a
    (B, H, W, 1) float array or a (B, 1, H, W) float tensor in {0, 1}. strengths: one float per image.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    masks: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    strengths: list[float]


def _as_list(value, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if not value:
            raise InputError(f"{what}: expected at least one item, got an empty list")
        return list(value)
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 4:
        return list(value)
    return [value]


def _image_tensor(image: ImageLike, index: int) -> torch.Tensor:
    """One image -> float (3, H, W) in [0, 1]; float (3, H, W) tensors are used as they are (exact copy outside)."""
    from .synthesizer import as_image_tensor

    try:
        return as_image_tensor(image)
    except InputError as err:
        raise InputError(f"image {index}: {str(err).removeprefix('image: ')}") from None


def _mask_tensor(mask: MaskLike, index: int) -> torch.Tensor:
    """One mask -> bool (H, W): PIL and integer masks: any non-zero pixel; float masks: values >= 0.5."""
    what = f"mask_image {index}"
    if isinstance(mask, PIL.Image.Image):
        array = _mask_values(mask)
        if array.ndim == 3:
            array = array.max(axis=-1)
        return torch.from_numpy(np.ascontiguousarray(array) > 0)
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"{what}: expected a PIL image, numpy array or tensor, got {type(mask).__name__}")
    mask = mask.detach().cpu()
    if mask.ndim == 3 and 1 in (mask.shape[0], mask.shape[-1]):
        mask = mask.squeeze(0) if mask.shape[0] == 1 else mask.squeeze(-1)
    if mask.ndim != 2:
        raise InputError(f"{what}: expected an (H, W) or (1, H, W) mask, got shape {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask.clone()
    if mask.is_floating_point():
        if not torch.isfinite(mask).all():
            raise InputError(f"{what}: expected finite values in [0, 1], got NaN or infinite values")
        return mask >= 0.5
    return mask != 0


def _dilate(masks: torch.Tensor, pixels: int) -> torch.Tensor:
    """Grow bool masks (B, 1, H, W) by `pixels` (square neighbourhood)."""
    if pixels == 0:
        return masks
    return F.max_pool2d(masks.float(), 2 * pixels + 1, stride=1, padding=pixels) > 0


def feather_weights(masks: torch.Tensor, pixels: int) -> torch.Tensor:
    """Blend weights (B, 1, H, W) in [0, 1]: 1 deep inside, falling to ``1 / pixels`` at the mask's edge, 0 outside.

    Feathering works inwards, so the weights are zero wherever the mask is: the output never changes
    outside the mask. ``pixels = 0`` gives the mask itself.
    """
    weights = masks.float()
    if pixels == 0:
        return weights
    layer, total = weights, torch.zeros_like(weights)
    for _ in range(pixels):
        total += layer
        layer = -F.max_pool2d(-layer, 3, stride=1, padding=1)  # erode by one pixel (border counts as inside)
    return total / pixels


def prepare_masks(mask_image, images: torch.Tensor, mask_dilation: int = 0) -> torch.Tensor:
    """Masks as bool (B, 1, H, W) matched to `images` (one per image, or one for all), dilated, checked.

    InputError for a size mismatch (refused, not resized), an empty mask, or one covering everything.
    """
    masks = [_mask_tensor(m, i) for i, m in enumerate(_as_list(mask_image, "mask_image"))]
    count = images.shape[0]
    if len(masks) == 1 and count > 1:
        masks = masks * count
    if len(masks) != count:
        raise InputError(f"mask_image: got {len(masks)} masks for {count} images; pass one per image or one for all")
    height, width = images.shape[-2:]
    for i, mask in enumerate(masks):
        if tuple(mask.shape) != (height, width):
            raise InputError(f"mask_image {i}: size {mask.shape[0]}x{mask.shape[1]} differs from the image's "
                             f"{height}x{width}; resize the mask (nearest) to the image size")
    stacked = torch.stack(masks)[:, None]
    for i, mask in enumerate(stacked):
        if not bool(mask.any()):
            raise InputError(f"mask_image {i}: the mask is empty; it must mark the region to put a defect in")
        if bool(mask.all()):
            raise InputError(f"mask_image {i}: the mask covers the whole image; use SDASPipeline for whole-image samples")
    dilated = _dilate(stacked, whole_number(mask_dilation, "mask_dilation", minimum=0))
    full = [i for i, mask in enumerate(dilated) if bool(mask.all())]
    if full:
        raise InputError(f"mask_dilation {mask_dilation}: mask {full[0]} then covers the whole image; dilate less")
    return dilated


def _fraction(value, name: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not (0.0 < float(value) <= 1.0):
        raise InputError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


class SDASInpaintPipeline(SDASPipeline):
    """In-context SDAS: an anomaly of strength s synthesised inside `mask_image` of each normal `image`.

    Same components and config as `SDASPipeline` (a saved SDAS pipeline loads as either). The region
    outside the mask is copied from the input after the last step, so it is unchanged exactly.
    """

    def _labels(self, category, count: int, device) -> torch.Tensor | None:
        """Class labels for `count` images, or None for a UNet without class conditioning."""
        conditioned = getattr(self.unet, "class_embedding", None) is not None
        if not conditioned:
            if category is not None:
                raise InputError(f"category: this model has no class conditioning, so it takes no category "
                                 f"(got {category!r}); leave category unset")
            return None
        if category is None:
            if len(self.categories) != 1:
                raise InputError(f"category: this model knows several categories ({', '.join(self.categories)}); name one")
            category = 0
        return torch.tensor(self._class_ids(category, count), device=device, dtype=torch.long)

    def _schedule(self, num_inference_steps: int, denoising_strength: float, start_timestep) -> torch.Tensor:
        """The timesteps to run: the tail of the respaced schedule that starts at the start step."""
        max_steps = self.scheduler.config.num_train_timesteps
        num_inference_steps = whole_number(num_inference_steps, "num_inference_steps")
        if num_inference_steps > max_steps:
            raise InputError(f"num_inference_steps must be at most the scheduler's num_train_timesteps ({max_steps}), "
                             f"got {num_inference_steps}")
        try:
            self.scheduler.set_timesteps(num_inference_steps)
        except ValueError as err:
            raise InputError(f"num_inference_steps {num_inference_steps}: {str(err).splitlines()[0]}") from None
        timesteps = self.scheduler.timesteps
        if start_timestep is not None:
            start = whole_number(start_timestep, "start_timestep", minimum=0)
            hits = torch.nonzero(timesteps == start).flatten()
            if hits.numel() == 0:
                shown = ", ".join(str(int(t)) for t in timesteps[:4])
                raise InputError(f"start_timestep {start} is not a timestep of the {num_inference_steps}-step schedule "
                                 f"({shown}, ..., {int(timesteps[-1])}); pick one of them or use denoising_strength")
            return timesteps[int(hits[0]):]
        count = round(_fraction(denoising_strength, "denoising_strength") * num_inference_steps)
        if count < 1:
            raise InputError(f"denoising_strength {denoising_strength} leaves no step of {num_inference_steps}; "
                             "raise it or num_inference_steps")
        return timesteps[num_inference_steps - count:]

    def _alpha_bar(self, t: int) -> float:
        if t < 0:
            return float(getattr(self.scheduler, "final_alpha_cumprod", 1.0))
        return float(self.scheduler.alphas_cumprod[t])

    def _noised(self, x0: torch.Tensor, t: int, generator: GeneratorLike) -> torch.Tensor:
        """The normal image diffused to timestep t with fresh noise (the anchor outside the mask); x0 itself for t < 0."""
        if t < 0:
            return x0
        a = self._alpha_bar(t)
        noise = randn_tensor(tuple(x0.shape), generator=generator, device=x0.device, dtype=torch.float32)
        return a ** 0.5 * x0 + (1 - a) ** 0.5 * noise

    @torch.no_grad()
    def __call__(
        self,
        image: ImageLike | Sequence[ImageLike] | torch.Tensor,
        mask_image: MaskLike | Sequence[MaskLike],
        category: str | int | Sequence[str | int] | None = None,
        strength: float | tuple[float, float] = 0.15,
        denoising_strength: float | None = None,
        start_timestep: int | None = None,
        num_inference_steps: int = 20,
        resamples: int = 0,
        mask_dilation: int = 0,
        mask_feather: int = 0,
        generator: GeneratorLike = None,
        batch_size: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> SDASInpaintPipelineOutput | tuple:
        """Paint an SDAS anomaly into each image inside its mask.

        Args:
            image: normal image(s): PIL, path, array, a (3, H, W) / (B, 3, H, W) tensor in [0, 1], or a list.
            mask_image: where the defect goes: one mask per image or one for all (PIL / integer masks:
                any non-zero pixel; float masks: >= 0.5). Same size as the image, not empty, not everything.
            category: the category (or one per image) of a class-conditional model; leave None for a
                model without class conditioning (or with a single category).
            strength: SDAS anomaly strength s, fixed or ``(min, max)`` drawn per image (0 = a normal inpainting).
            denoising_strength: fraction of the schedule to run (default 0.8): the image is noised to that
                depth first (1.0 = from the noisiest step; lower keeps more of the image's own content under
                the mask).
            start_timestep: instead of ``denoising_strength``, the exact timestep of the respaced
                schedule to start from (e.g. 950, 900, ... for 20 steps).
            num_inference_steps: respaced steps of the full schedule.
            resamples: extra RePaint rounds per step (re-noise one step and redo it); 0 = none.
            mask_dilation: grow the masks by this many pixels first (the returned masks include it).
            mask_feather: blend the generated content in over this many pixels inside the mask's edge.
            generator: one generator, or one per image (each image is then reproducible on its own and
                independent of batching: its strength, starting noise and step noise come from it).
            batch_size: images per UNet call (default: all at once).
            output_type: "pil", "np" or "pt" (see `SDASInpaintPipelineOutput`).
        """
        if output_type not in ("pil", "np", "pt"):
            raise InputError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if start_timestep is not None and denoising_strength is not None:
            raise InputError("pass either start_timestep or denoising_strength, not both")
        if denoising_strength is None:
            denoising_strength = DEFAULT_DENOISING_STRENGTH
        clean = self._checked_images(image)
        total = clean.shape[0]
        masks = prepare_masks(mask_image, clean, mask_dilation)
        weights = feather_weights(masks, whole_number(mask_feather, "mask_feather", minimum=0))
        resamples = whole_number(resamples, "resamples", minimum=0)
        if isinstance(generator, list) and len(generator) != total:
            raise InputError(f"got {len(generator)} generators for {total} images; pass one per image or a single one")
        low, high = _strength_range(strength)
        batch_size = total if batch_size is None else whole_number(batch_size, "batch_size")
        device = self._execution_device
        labels = self._labels(category, total, device)
        timesteps = self._schedule(num_inference_steps, denoising_strength, start_timestep)

        outputs, strengths = [], []
        starts = list(range(0, total, batch_size))
        with self.progress_bar(total=len(starts) * len(timesteps) * (resamples + 1)) as progress:
            for start in starts:
                stop = min(start + batch_size, total)
                gen = generator[start:stop] if isinstance(generator, list) else generator
                s = self._strengths(low, high, stop - start, gen)
                x0 = clean[start:stop].to(device) * 2 - 1
                w = weights[start:stop].to(device)
                batch_labels = None if labels is None else labels[start:stop]
                x = self._paint(x0, w, batch_labels, timesteps, resamples, gen,
                                s.to(device=device, dtype=torch.float32), progress)
                generated = (x / 2 + 0.5).clamp(0, 1).cpu()
                original = clean[start:stop]
                w_cpu = w.cpu()
                outputs.append(torch.where(w_cpu > 0, w_cpu * generated + (1 - w_cpu) * original, original))
                strengths.extend(s.tolist())

        images_out, masks_out = self._as_output_type(torch.cat(outputs), masks.float(), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images_out, masks_out, strengths)
        return SDASInpaintPipelineOutput(images=images_out, masks=masks_out, strengths=strengths)

    def _checked_images(self, image) -> torch.Tensor:
        """The images as one (B, 3, H, W) tensor in [0, 1]: all of one size, a multiple of the UNet's down factor."""
        images = [_image_tensor(im, i) for i, im in enumerate(_as_list(image, "image"))]
        if len({tuple(im.shape) for im in images}) != 1:
            raise InputError("image: all images must have the same size; resize them first")
        clean = torch.stack(images)
        height, width = clean.shape[-2:]
        factor = 2 ** (len(getattr(self.unet.config, "block_out_channels", (0,))) - 1)
        if height % factor or width % factor:
            raise InputError(f"image: size {height}x{width} must be a multiple of {factor} on both sides for this UNet "
                             f"(trained at {self.unet.config.sample_size})")
        return clean

    def _paint(self, x0: torch.Tensor, w: torch.Tensor, labels: torch.Tensor | None, timesteps: torch.Tensor,
               resamples: int, generator: GeneratorLike, step_strength: torch.Tensor, progress) -> torch.Tensor:
        """Denoise one batch from ``x0`` noised to the first timestep; after every step the unmasked part
        (weight ``1 - w``) is replaced by ``x0`` noised to the next one. ``resamples`` extra RePaint rounds
        per step diffuse one step forward again and redo it."""
        device, unet_dtype = self._execution_device, self.unet.dtype
        following = [int(t) for t in timesteps[1:]] + [-1]
        shape = tuple(x0.shape)
        x = self._noised(x0, int(timesteps[0]), generator)
        for t, t_prev in zip(timesteps, following, strict=True):
            for round_ in range(resamples + 1):
                model_output = self.unet(unet_input(x, unet_dtype), t.to(device), class_labels=labels).sample
                x_prev = self.scheduler.step(model_output.float(), t, x, generator=generator,
                                             anomaly_strength=step_strength).prev_sample
                if t_prev >= 0 or round_ < resamples:  # the last result is composited once, by the caller
                    x_prev = w * x_prev + (1 - w) * self._noised(x0, t_prev, generator)
                if round_ < resamples:  # RePaint jump: diffuse one step forward again and redo it
                    ratio = self._alpha_bar(int(t)) / self._alpha_bar(t_prev)
                    noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
                    x = ratio ** 0.5 * x_prev + (1 - ratio) ** 0.5 * noise
                else:
                    x = x_prev
                progress.update()
        return x

    def _as_output_type(self, images: torch.Tensor, masks: torch.Tensor, output_type: str) -> tuple:
        """(images, masks) as "pt" tensors, "np" (B, H, W, C) arrays or PIL images (masks: 8-bit L)."""
        if output_type == "pt":
            return images, masks
        images_out = images.permute(0, 2, 3, 1).numpy()
        masks_out = masks.permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            images_out = self.numpy_to_pil(images_out)
            masks_out = [PIL.Image.fromarray((m[..., 0] * 255).astype(np.uint8), mode="L") for m in masks_out]
        return images_out, masks_out
