"""Class-conditional diffusion UNet presets for SDAS, expressed as diffusers `UNet2DModel` configs.

`adm-256` is the official SDAS network (guided-diffusion ADM, the same layout as OpenAI's 256x256
ImageNet model), so official and ImageNet checkpoints map onto it key for key. `small-64` is the
network the official code builds for 64 px images at width 64, so its speed compares like for like
with the official figures. `tiny-32` keeps the same
design (learned variance, scale-shift norm, resnet up/down, attention on the coarse levels) at a
size the tests and a CPU demo can train.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DModel

from .errors import InputError


def _adm_config(sample_size: int, widths: tuple[int, ...], attention_levels: tuple[bool, ...],
                layers_per_block: int, head_dim: int, norm_groups: int) -> dict[str, Any]:
    down = tuple("AttnDownBlock2D" if attn else "ResnetDownsampleBlock2D" for attn in attention_levels)
    up = tuple("AttnUpBlock2D" if attn else "ResnetUpsampleBlock2D" for attn in reversed(attention_levels))
    return dict(
        sample_size=sample_size, in_channels=3, out_channels=6, layers_per_block=layers_per_block,
        block_out_channels=widths, down_block_types=down, up_block_types=up,
        attention_head_dim=head_dim, resnet_time_scale_shift="scale_shift",
        downsample_type="resnet", upsample_type="resnet", norm_num_groups=norm_groups,
        attn_norm_num_groups=norm_groups,
    )


UNET_PRESETS: dict[str, dict[str, Any]] = {
    # Official SDAS / guided-diffusion 256x256: width 256, mult 1,1,2,2,4,4, attention at 32/16/8 px.
    "adm-256": _adm_config(256, (256, 256, 512, 512, 1024, 1024), (False,) * 3 + (True,) * 3, 2, 64, 32),
    # 64 px: the official code's network for a 64 px image with width 64, mult 1,2,2,2 (10,738,630
    # parameters with 15 classes): it reads the yaml's attention resolutions [32, 16, 8] as downsample
    # factors, so attention runs only at 8 px (ds 8) and in the middle block, with 64-channel heads.
    "small-64": _adm_config(64, (64, 128, 128, 128), (False, False, False, True), 2, 64, 32),
    # 32 px, for tests and the CPU demo: two levels, attention at 16 px.
    "tiny-32": _adm_config(32, (32, 64), (False, True), 1, 32, 8),
}
# Earlier layouts of a preset, so that a training run started with one still resumes: small-64 had
# attention at 16 and 8 px with 32-channel heads (11,070,150 parameters) before it became the
# official network. Saved pipelines never need these: they rebuild from their own config.json.
EARLIER_PRESET_LAYOUTS: dict[str, tuple[dict[str, Any], ...]] = {
    "small-64": (_adm_config(64, (64, 128, 128, 128), (False, False, True, True), 2, 32, 32),),
}


def unet_config(preset: str, num_classes: int, sample_size: int | None = None) -> dict[str, Any]:
    """The `UNet2DModel` keyword arguments of a preset, class-conditional on `num_classes` labels."""
    if preset not in UNET_PRESETS:
        raise InputError(f"unknown UNet preset {preset!r}; known: {', '.join(UNET_PRESETS)}")
    if num_classes < 1:
        raise InputError(f"num_classes must be at least 1, got {num_classes}")
    config = dict(UNET_PRESETS[preset])
    config["num_class_embeds"] = num_classes
    if sample_size is not None:
        factor = 2 ** (len(config["block_out_channels"]) - 1)
        if sample_size % factor:
            raise InputError(f"image size {sample_size} must be a multiple of {factor} for preset {preset!r}")
        config["sample_size"] = sample_size
    return config


def build_unet(preset: str, num_classes: int, sample_size: int | None = None) -> UNet2DModel:
    """A freshly initialised class-conditional UNet from a preset."""
    return UNet2DModel(**unet_config(preset, num_classes, sample_size))


def unet_input(sample: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`sample` in the UNet's dtype and in the memory layout its sampling forward runs fastest in.

    On CPU that is channels-last: the layout then propagates through the network, oneDNN's 3x3
    convolutions skip reordering every activation and torch's nearest 2x upsampling skips two
    transposing copies (about 1.15x per SDAS sampling forward of small-64, see benchmarks/RESULTS.md).
    The weights stay as they are. Values are the same up to the summation order of the convolutions.
    Training is not sped up by it (its backward is slower in channels-last), so only sampling uses it.
    """
    if sample.device.type == "cpu" and sample.ndim == 4:
        return sample.to(dtype=dtype, memory_format=torch.channels_last)
    return sample.to(dtype)
