"""Blending an anomaly source into a normal image under a mask (RealNet paper, Eq. 3).

    I_a = (1 - M) * I + beta * M * A + (1 - beta) * M * I

Outside the mask the normal image is returned bit-for-bit; inside it, the source is mixed in with
opacity ``beta``. Unlike the official code, the result stays in float (no truncation to uint8).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import InputError

OpacityRange = tuple[float, float]


def opacity_range(value: float | Sequence[float], what: str = "opacity") -> OpacityRange:
    """Validate an opacity (a number or a ``(low, high)`` pair) as a range inside [0, 1]."""
    if isinstance(value, (int, float)):
        low = high = float(value)
    else:
        values = [float(v) for v in value]
        if len(values) != 2:
            raise InputError(f"{what}: expected a number or a (low, high) pair in [0, 1], got {value!r}")
        low, high = values
    if not (0.0 <= low <= high <= 1.0):
        raise InputError(f"{what}: expected 0 <= low <= high <= 1, got ({low}, {high})")
    return low, high


def sample_opacity(batch: int, value_range: OpacityRange, generator: torch.Generator | None = None) -> torch.Tensor:
    """One opacity per sample, uniform in ``value_range``; shape (B,)."""
    low, high = value_range
    return torch.rand(batch, generator=generator) * (high - low) + low


def blend(
    image: torch.Tensor,
    source: torch.Tensor,
    mask: torch.Tensor,
    opacity: float | torch.Tensor,
) -> torch.Tensor:
    """Eq. 3 for one image ((3, H, W), mask (1, H, W)) or a batch ((B, 3, H, W), mask (B, 1, H, W)).

    ``opacity`` is a number or one value per sample (shape (B,)); ``mask`` may be float or bool;
    ``source`` may also be uint8 (0..255), which saves converting whole images that are only
    used under the mask.
    Pixels with ``M = 0`` are copied bit-for-bit; the others get ``I + (beta * M) * (A - I)``,
    which is Eq. 3. Only masked pixels are computed (masks cover a few percent of the image).
    """
    for name, value in (("image", image), ("source", source), ("mask", mask)):
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if not image.is_floating_point():
        raise InputError(f"image: expected a floating-point tensor in [0, 1], got {image.dtype}")
    if not (source.is_floating_point() or source.dtype == torch.uint8):
        raise InputError(f"source: expected a floating-point tensor in [0, 1] or uint8, got {source.dtype}")
    if image.shape != source.shape:
        raise InputError(f"source: expected the image's shape {tuple(image.shape)}, got {tuple(source.shape)}")
    if image.ndim not in (3, 4) or mask.ndim != image.ndim:
        raise InputError(f"image/mask: expected (3, H, W) and (1, H, W), or batches of them; got {tuple(image.shape)}, {tuple(mask.shape)}")
    if mask.shape[-2:] != image.shape[-2:] or mask.shape[-3] != 1 or mask.shape[:-3] != image.shape[:-3]:
        raise InputError(f"mask: expected shape (..., 1, {image.shape[-2]}, {image.shape[-1]}), got {tuple(mask.shape)}")
    beta = torch.as_tensor(opacity, dtype=image.dtype, device=image.device)
    if beta.numel() and (beta.min() < 0 or beta.max() > 1):
        raise InputError(f"opacity: expected values in [0, 1], got {beta.tolist()}")
    single = image.ndim == 3
    if single:
        image, source, mask = image[None], source[None], mask[None]
    batch, channels = image.shape[:2]
    if beta.numel() not in (1, batch):
        raise InputError(f"opacity: expected one value or one per sample ({batch}), got {beta.numel()} values")
    beta = beta.reshape(-1).expand(batch) if beta.numel() == 1 else beta.reshape(batch)
    out = image.clone()
    flat_mask = mask.reshape(batch, -1)
    rows, pixels = torch.nonzero(flat_mask, as_tuple=True)
    if rows.numel():
        weight = (flat_mask[rows, pixels].to(image.dtype) * beta[rows])[:, None]
        flat_out = out.view(batch, channels, -1)
        base = flat_out[rows, :, pixels]
        picked = source.reshape(batch, channels, -1)[rows, :, pixels]
        if picked.dtype == torch.uint8:
            picked = picked.to(image.dtype).div_(255.0)
        delta = picked.to(image.dtype) - base
        flat_out[rows, :, pixels] = torch.addcmul(base, weight, delta)
    return out[0] if single else out
