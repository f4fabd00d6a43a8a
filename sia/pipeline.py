"""`SDASPipeline`: class-conditional SDAS sampling as a diffusers pipeline.

A class-conditional `UNet2DModel` (6 output channels: ε and the variance interpolation v) and an SDAS
scheduler (`SDASScheduler`, the official 20-step ancestral sampler, or `SDASDDIMScheduler`) turn pure
noise into images of a category; the anomaly strength `s` widens every sampling step's variance to
``(1 + s) * Sigma_theta`` so the images drift away from normal in realistic ways. ``s = 0`` gives
normal images.

The category names (list index = class id of the UNet) live in the pipeline config
(``model_index.json``), so ``SDASPipeline.from_pretrained(dir_or_hub_id)`` restores everything.
Swap the sampler the diffusers way:
``pipe.scheduler = SDASDDIMScheduler.from_config(pipe.scheduler.config)`` or `use_sampler("ddim")`.

PIL (and uint8) output rounds to the nearest grey level (``round(255 * (x + 1) / 2)``, the diffusers
convention); the official sampler truncates (``uint8((x + 1) * 127.5)``), so about half of the pixels
are one level brighter here than in the official release (which is also JPEG, not PNG).
"""

from __future__ import annotations

import inspect
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin, UNet2DModel  # noqa: F401
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .errors import InputError, whole_number
from .paths import path_component
from .scheduler import make_scheduler
from .unets import build_unet, unet_input

__all__ = ["SDASPipeline", "SDASPipelineOutput"]

GeneratorLike = torch.Generator | list[torch.Generator] | None


@dataclass
class SDASPipelineOutput(BaseOutput):
    """Images and the anomaly strength each one was sampled with.

    images: list of PIL images, a (B, H, W, 3) float numpy array in [0, 1], or a (B, 3, H, W) float
    tensor in [0, 1], depending on ``output_type``. strengths: one float per image.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    strengths: list[float]


def _strength_range(strength) -> tuple[float, float]:
    """(min, max) of a strength given as a number or a pair (python, numpy or torch); InputError otherwise."""
    if isinstance(strength, (torch.Tensor, np.ndarray)):
        strength = strength.tolist()
    if isinstance(strength, numbers.Real) and not isinstance(strength, bool):
        values = [strength, strength]
    elif (isinstance(strength, (list, tuple)) and len(strength) == 2
          and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in strength)):
        values = list(strength)
    else:
        raise InputError(f"strength must be a number or a (min, max) pair of numbers, got {strength!r}")
    low, high = float(values[0]), float(values[1])
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high < low:
        raise InputError(f"strength must satisfy 0 <= min <= max (finite), got {strength!r}")
    return low, high


def _draw_uniform(count: int, generator: GeneratorLike) -> torch.Tensor:
    """`count` U(0, 1) numbers: from one generator, or one from each generator of a list (per-image)."""
    if isinstance(generator, list):
        return torch.cat([torch.rand(1, generator=g, device=g.device).cpu() for g in generator])
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(count, generator=generator, device=device).cpu()


#: Weight files that would have to be unpickled; SDASPipeline never loads them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_model_index(folder: Path) -> None:
    """InputError naming `folder/model_index.json` if it is missing, unreadable or lists unsafe categories."""
    from .errors import read_json_object

    path = folder / "model_index.json"
    if not path.is_file():
        raise InputError(f"{folder}: no model_index.json (expected a saved SDASPipeline folder)")
    index = read_json_object(path, "SDASPipeline config")
    categories = index.get("categories", [])
    if not isinstance(categories, list):
        raise InputError(f"{path}: categories must be a list of names, got {categories!r}")
    for name in categories:
        path_component(name, f"{path}: category")
    components = [key for key, value in index.items() if not key.startswith("_") and key != "categories"
                  and isinstance(value, list) and len(value) == 2 and key == Path(key).name]
    for component in components:
        files = list((folder / component).glob("*"))
        pickled = sorted(p.name for p in files if p.suffix in PICKLE_SUFFIXES)
        if pickled and not any(p.suffix == ".safetensors" for p in files):
            raise InputError(f"{folder / component}: weights {', '.join(pickled)} are pickled; only safetensors weights "
                             "are loaded (re-save the pipeline with save_pretrained, which writes safetensors)")


class SDASPipeline(DiffusionPipeline):
    """Strength-controllable Diffusion Anomaly Synthesis (RealNet's SDAS) for any category of the model.

    Args:
        unet: class-conditional `UNet2DModel` with ``out_channels = 2 * in_channels`` (ε and v).
        scheduler: `SDASScheduler` (default sampler) or `SDASDDIMScheduler`.
        categories: category names; the index of a name is its class id in the UNet.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin, categories: list[str] | None = None):
        super().__init__()
        num_classes = getattr(unet.config, "num_class_embeds", None)
        if categories is None:
            categories = [str(i) for i in range(num_classes or 1)]
        categories = [path_component(str(c), "categories") for c in categories]  # each names an output folder
        if len(set(categories)) != len(categories):
            raise InputError(f"categories must be unique, got {categories}")
        if num_classes is not None and num_classes < len(categories):
            raise InputError(f"the UNet has {num_classes} class embeddings but {len(categories)} categories were given")
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(categories=categories)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> SDASPipeline:
        """`DiffusionPipeline.from_pretrained`, reading weights from safetensors only (never unpickling).

        A local folder is checked first, so a damaged ``model_index.json``, a category that is not a
        plain name or pickled ``.bin`` weights are one-line InputErrors naming the folder.
        """
        if kwargs.get("use_safetensors") is False:
            raise InputError("use_safetensors=False: SDASPipeline loads safetensors weights only")
        kwargs["use_safetensors"] = True
        folder = Path(os.fspath(pretrained_model_name_or_path))
        if not folder.is_dir():
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        _check_model_index(folder)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except OSError as err:  # diffusers' word for missing, damaged or mismatched files
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(f"{folder}: cannot load the pipeline ({first_line}); expected a folder written by "
                             "SDASPipeline.save_pretrained (safetensors weights)") from None

    @classmethod
    def from_unet_preset(cls, preset: str, categories: Sequence[str], sample_size: int | None = None,
                         sampler: str = "ddpm") -> "SDASPipeline":
        """A freshly initialised pipeline (untrained UNet from `sia.unets` presets) for training or tests."""
        categories = list(categories)
        if not categories:
            raise InputError("categories must name at least one category")
        unet = build_unet(preset, num_classes=len(categories), sample_size=sample_size)
        return cls(unet=unet, scheduler=make_scheduler(sampler), categories=categories)

    @property
    def categories(self) -> list[str]:
        return list(self.config.categories)

    def use_sampler(self, sampler: str) -> "SDASPipeline":
        """Switch to the "ddpm" (official) or "ddim" SDAS sampler, keeping the noise schedule."""
        self.scheduler = make_scheduler(sampler, self.scheduler.config)
        return self

    def category_id(self, name: str | int) -> int:
        """Class id of a category name (``"bottle"`` or ``"mvtec-ad/bottle"``); InputError lists known ones."""
        categories = self.categories
        if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
            if 0 <= int(name) < len(categories):
                return int(name)
        else:
            text = str(name).strip()
            for candidate in (text, text.split("/", 1)[-1]):
                if candidate in categories:
                    return categories.index(candidate)
        raise InputError(f"unknown category {name!r}; this model knows: {', '.join(categories)}")

    @staticmethod
    def _strengths(low: float, high: float, count: int, generator: GeneratorLike) -> torch.Tensor:
        if low == high:
            return torch.full((count,), low, dtype=torch.float64)
        return low + (high - low) * _draw_uniform(count, generator).double()

    def _class_ids(self, category, num_images: int | None) -> list[int]:
        if num_images is not None:
            num_images = whole_number(num_images, "num_images")
        if isinstance(category, (torch.Tensor, np.ndarray)):
            category = category.tolist()  # numpy / torch integers become python ints
        if isinstance(category, (str, int, np.integer)):
            count = 1 if num_images is None else num_images
            return [self.category_id(category)] * count
        try:
            names = list(category)
        except TypeError:
            raise InputError(f"category must be a name, a class id or a list of them, got {category!r}") from None
        if num_images is not None and num_images != len(names):
            if len(names) != 1:
                raise InputError(f"category lists {len(names)} names but num_images is {num_images}")
            names = names * num_images
        return [self.category_id(n) for n in names]

    @torch.no_grad()
    def __call__(
        self,
        category: str | int | Sequence[str | int],
        num_images: int | None = None,
        strength: float | tuple[float, float] = 0.15,
        num_inference_steps: int = 20,
        generator: GeneratorLike = None,
        latents: torch.Tensor | np.ndarray | None = None,
        batch_size: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> SDASPipelineOutput | tuple:
        """Sample anomalous (``strength > 0``) or normal (``strength = 0``) images.

        Args:
            category: a category name for all images, or one name per image.
            num_images: number of images (default 1, or the length of the category list).
            strength: fixed s, or ``(min, max)``: s ~ U(min, max) drawn per image (the official code
                draws one s per batch of 16). Official default range: (0.1, 0.2).
            num_inference_steps: respaced steps (20 = the official ``ddim20`` timesteps 950, 900, ..., 0).
            generator: one generator (images then depend on batching) or one per image (each image is
                then reproducible on its own: latents, its strength, and its step noise come from it).
            latents: optional (N, 3, H, W) starting noise x_T, a tensor or numpy array (e.g. to compare
                strengths from the same x_T).
            batch_size: images per UNet call (default: all at once). With one generator per image it
                changes only float rounding in batched kernels (about 1e-6, rarely one grey level in PIL output).
            output_type: "pil", "np" ((N, H, W, 3) float in [0, 1]) or "pt" ((N, 3, H, W) float in [0, 1]).
                PIL images are rounded to 8 bits (the official code truncates; see the module docstring).
        """
        if output_type not in ("pil", "np", "pt"):
            raise InputError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        class_ids = self._class_ids(category, num_images)
        total = len(class_ids)
        if total < 1:
            raise InputError("num_images must be at least 1")
        if isinstance(generator, list) and len(generator) != total:
            raise InputError(f"got {len(generator)} generators for {total} images; pass one per image or a single one")
        low, high = _strength_range(strength)
        size = self.unet.config.sample_size
        shape = (total, self.unet.config.in_channels, *((size, size) if isinstance(size, int) else tuple(size)))
        latents = _checked_latents(latents, shape)
        batch_size = total if batch_size is None else whole_number(batch_size, "batch_size")
        timesteps, accepts_strength = self._set_timesteps(num_inference_steps, high)
        device = self._execution_device

        starts = list(range(0, total, batch_size))
        images, strengths = [], []
        with self.progress_bar(total=len(starts) * len(timesteps)) as progress:
            for start in starts:
                stop = min(start + batch_size, total)
                gen = generator[start:stop] if isinstance(generator, list) else generator
                if latents is None:
                    x = randn_tensor((stop - start, *shape[1:]), generator=gen, device=device, dtype=torch.float32)
                else:
                    x = latents[start:stop].to(device=device, dtype=torch.float32)
                s = self._strengths(low, high, stop - start, gen)
                labels = torch.tensor(class_ids[start:stop], device=device, dtype=torch.long)
                step_kwargs = {"anomaly_strength": s.to(device=device, dtype=torch.float32)} if accepts_strength else {}
                x = self._denoise(x, labels, timesteps, gen, step_kwargs, progress)
                images.append((x / 2 + 0.5).clamp(0, 1))
                strengths.extend(s.tolist())

        output = _as_output_type(torch.cat(images), output_type, self.numpy_to_pil)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (output, strengths)
        return SDASPipelineOutput(images=output, strengths=strengths)

    def _set_timesteps(self, num_inference_steps: int, high: float) -> tuple[torch.Tensor, bool]:
        """The scheduler set to ``num_inference_steps`` respaced steps (checked against its training
        timesteps), and whether its step takes an anomaly strength (required when ``high > 0``)."""
        num_inference_steps = whole_number(num_inference_steps, "num_inference_steps")
        max_steps = self.scheduler.config.num_train_timesteps
        if num_inference_steps > max_steps:
            raise InputError(f"num_inference_steps must be at most the scheduler's num_train_timesteps ({max_steps}), "
                             f"got {num_inference_steps}")
        accepts_strength = "anomaly_strength" in inspect.signature(self.scheduler.step).parameters
        if not accepts_strength and high > 0:
            raise InputError(f"scheduler {type(self.scheduler).__name__} has no anomaly_strength; "
                             "use SDASScheduler or SDASDDIMScheduler")
        try:
            self.scheduler.set_timesteps(num_inference_steps)
        except ValueError as err:  # any other schedule diffusers cannot build
            raise InputError(f"num_inference_steps {num_inference_steps}: {str(err).splitlines()[0]}") from None
        return self.scheduler.timesteps, accepts_strength

    def _denoise(self, x: torch.Tensor, labels: torch.Tensor, timesteps: torch.Tensor, generator: GeneratorLike,
                 step_kwargs: dict, progress) -> torch.Tensor:
        """Run one batch from x_T through every timestep (UNet in its dtype, scheduler math in float32)."""
        device, unet_dtype = self._execution_device, self.unet.dtype
        for t in timesteps:
            model_output = self.unet(unet_input(x, unet_dtype), t.to(device), class_labels=labels).sample
            x = self.scheduler.step(model_output.float(), t, x, generator=generator, **step_kwargs).prev_sample
            progress.update()
        return x


def _checked_latents(latents: torch.Tensor | np.ndarray | None, shape: tuple[int, ...]) -> torch.Tensor | None:
    """``latents`` as a tensor of exactly ``shape`` (numpy arrays are wrapped), or None."""
    if latents is None:
        return None
    if isinstance(latents, np.ndarray):
        latents = torch.from_numpy(latents)
    if not isinstance(latents, torch.Tensor):
        raise InputError(f"latents must be a torch tensor or numpy array, got {type(latents).__name__}")
    if tuple(latents.shape) != shape:
        raise InputError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
    return latents


def _as_output_type(images: torch.Tensor, output_type: str, numpy_to_pil):
    """(N, 3, H, W) images in [0, 1] as "pt" (as they are), "np" ((N, H, W, 3) on the CPU) or "pil"."""
    if output_type == "pt":
        return images
    output = images.cpu().permute(0, 2, 3, 1).numpy()
    return numpy_to_pil(output) if output_type == "pil" else output
