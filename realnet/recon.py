"""Reconstruction U-Nets (RealNet architecture A, official `ReconstructionLayer`).

One U-Net per feature level maps features of a possibly anomalous image to the features of its
normal counterpart. Layout as the official network (GroupNorm, single-conv ResBlocks, attention at
downsample factors 2 and 4 and in the middle, zero-initialised output so the reconstruction starts
at exactly 0), but it accepts any channel count and any spatial size:
- GroupNorm groups follow a policy (`norm_groups`): "adaptive" (default) uses the largest divisor of
  the channel count that is <= 32 and leaves at least two channels per group (32 for every width
  of 64 or more that is a multiple of 32), "official" always uses 32 groups as the official
  GroupNorm32 does (needed to reproduce converted official checkpoints whose layers are 32 wide);
- attention heads are the largest divisor of the width that is <= width/64; the base width is at least 2;
- inputs whose sides are not multiples of 2**(levels-1) are replicate-padded and the output cropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sia.errors import InputError

NORM_GROUP_POLICIES = ("adaptive", "official")
OFFICIAL_GROUPS = 32


def check_norm_groups(policy: str) -> str:
    if policy not in NORM_GROUP_POLICIES:
        raise InputError(f"recon_norm_groups: expected one of {', '.join(NORM_GROUP_POLICIES)}, got {policy!r}")
    return policy


def group_count(channels: int, max_groups: int = OFFICIAL_GROUPS, policy: str = "adaptive") -> int:
    """GroupNorm groups for `channels` under `policy`.

    "adaptive": the largest divisor of `channels` that is at most `max_groups` and leaves >= 2
    channels per group; equals the official 32 for widths that are multiples of 64, and the
    two-channel minimum keeps GroupNorm defined on 1x1 maps (tiny inputs, deepest level).
    "official": always `max_groups` (32), which needs a multiple of 32 channels.
    """
    if check_norm_groups(policy) == "official":
        if channels % max_groups:
            raise InputError(f"recon_norm_groups='official': {channels} channels are not a multiple of {max_groups} "
                             "groups; use 'adaptive' or widths that are multiples of 32")
        return max_groups
    limit = max(1, min(max_groups, channels // 2))
    return next(g for g in range(limit, 0, -1) if channels % g == 0)


def head_count(channels: int, head_width: int = 64) -> int:
    """Official rule heads = channels / 64, made valid for any width (at least 1, divides channels)."""
    wanted = max(1, channels // head_width)
    return next(h for h in range(wanted, 0, -1) if channels % h == 0)


# On CPU, oneDNN convolutions are slow for small maps with many channels (deep U-Net levels at
# batch 1: e.g. 2048->1024 channels at 8x8 runs ~2x faster as one im2col matrix product). The same
# function is computed either way; set to False to always use the default convolution kernels.
# Never while exporting: the choice depends on the batch size, and runtimes pick their own kernels.
GEMM_FOR_SMALL_MAPS = True


def _use_gemm(x: torch.Tensor, in_channels: int) -> bool:
    if not GEMM_FOR_SMALL_MAPS or x.device.type != "cpu" or torch.onnx.is_in_onnx_export():
        return False
    return 4 * x.shape[0] * x.shape[-2] * x.shape[-1] <= in_channels


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` (same parameters) that runs small maps as an explicit matrix product on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            not _use_gemm(x, self.in_channels)
            or self.groups != 1
            or self.dilation != (1, 1)
            or not self.weight.is_contiguous()  # channels-last weights: oneDNN's own kernels
        ):
            return super().forward(x)
        b, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)
        out = torch.matmul(self.weight.view(self.out_channels, -1), cols)
        if self.bias is not None:
            out = out + self.bias[:, None]
        kh, kw = self.kernel_size
        out_h = (h + 2 * self.padding[0] - kh) // self.stride[0] + 1
        out_w = (w + 2 * self.padding[1] - kw) // self.stride[1] + 1
        return out.view(b, self.out_channels, out_h, out_w)


class ConvTranspose2d(nn.ConvTranspose2d):
    """`nn.ConvTranspose2d` (same parameters) that runs small maps as matmul + col2im on CPU."""

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if (
            output_size is not None
            or not _use_gemm(x, self.in_channels)
            or self.groups != 1
            or self.dilation != (1, 1)
            or self.output_padding != (0, 0)
            or not self.weight.is_contiguous()
        ):
            return super().forward(x, output_size)
        b, c, h, w = x.shape
        cols = torch.matmul(self.weight.view(c, -1).t(), x.reshape(b, c, h * w))
        kh, kw = self.kernel_size
        out_h = (h - 1) * self.stride[0] - 2 * self.padding[0] + kh
        out_w = (w - 1) * self.stride[1] - 2 * self.padding[1] + kw
        out = F.fold(cols, (out_h, out_w), self.kernel_size, padding=self.padding, stride=self.stride)
        return out + self.bias[:, None, None] if self.bias is not None else out


class GroupNormFloat(nn.GroupNorm):
    """GroupNorm computed in float32 (as the official GroupNorm32), so mixed precision is safe."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int, norm_groups: str = "adaptive") -> GroupNormFloat:
    return GroupNormFloat(group_count(channels, policy=norm_groups), channels)


class ResBlock(nn.Module):
    """Single-conv residual block: `skip(x) + conv3x3(SiLU(GN(x)))`, optionally resampling by 2."""

    def __init__(self, channels: int, out_channels: int | None = None, down: bool = False, up: bool = False,
                 norm_groups: str = "adaptive") -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.down, self.up = down, up
        self.norm = normalization(channels, norm_groups)
        self.conv = Conv2d(channels, out_channels, 3, padding=1)
        if up:
            self.h_upsample = ConvTranspose2d(channels, channels, 4, stride=2, padding=1)
            self.x_upsample = ConvTranspose2d(channels, channels, 4, stride=2, padding=1)
        self.skip = nn.Identity() if out_channels == channels else Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm(x))
        if self.down:
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        elif self.up:
            h, x = self.h_upsample(h), self.x_upsample(x)
        return self.skip(x) + self.conv(h)


class AttentionBlock(nn.Module):
    """Self-attention over all positions with the legacy per-head q|k|v channel layout."""

    def __init__(self, channels: int, norm_groups: str = "adaptive") -> None:
        super().__init__()
        self.heads = head_count(channels)
        self.norm = normalization(channels, norm_groups)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.reshape(b, c, h * w)
        # 1x1 convolutions as token-major matmuls (same weights as Conv1d), then fused attention.
        normed = self.norm(tokens).transpose(1, 2)
        qkv = F.linear(normed, self.qkv.weight.squeeze(-1), self.qkv.bias)
        head_width = c // self.heads
        # Legacy layout: the 3C qkv channels are grouped per head as [q | k | v].
        q, k, v = qkv.view(b, h * w, self.heads, 3, head_width).permute(3, 0, 2, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        out = F.linear(out, self.proj_out.weight.squeeze(-1), self.proj_out.bias)
        return (tokens + out.transpose(1, 2)).reshape(b, c, h, w)


class _Stage(nn.Sequential):
    """A ResBlock optionally followed by attention and/or an upsampling ResBlock."""


class ReconstructionUNet(nn.Module):
    """Feature-to-feature U-Net of the official architecture A for C input (= output) channels."""

    def __init__(
        self,
        channels: int,
        width_ratio: float = 0.5,
        channel_mult: Sequence[int] = (1, 2, 4),
        num_res_blocks: int = 2,
        attention_mult: Sequence[int] = (2, 4),
        norm_groups: str = "adaptive",
    ) -> None:
        super().__init__()
        check_norm_groups(norm_groups)
        base = max(2, int(width_ratio * channels))
        self.channels = channels
        self.factor = 2 ** (len(channel_mult) - 1)
        self.input_blocks = nn.ModuleList([Conv2d(channels, base, 3, padding=1)])
        skip_channels = [base]
        ch, ds = base, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, mult * base, norm_groups=norm_groups)]
                ch = mult * base
                if ds in attention_mult:
                    layers.append(AttentionBlock(ch, norm_groups))
                self.input_blocks.append(_Stage(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(_Stage(ResBlock(ch, down=True, norm_groups=norm_groups)))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = nn.Sequential(ResBlock(ch, norm_groups=norm_groups), AttentionBlock(ch, norm_groups),
                                          ResBlock(ch, norm_groups=norm_groups))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), mult * base, norm_groups=norm_groups)]
                ch = mult * base
                if ds in attention_mult:
                    layers.append(AttentionBlock(ch, norm_groups))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, up=True, norm_groups=norm_groups))
                    ds //= 2
                self.output_blocks.append(_Stage(*layers))
        self.out = nn.Sequential(normalization(ch, norm_groups), nn.SiLU(), Conv2d(ch, channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        pad_h, pad_w = (-height) % self.factor, (-width) % self.factor
        h = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x
        skips = []
        for block in self.input_blocks:
            h = block(h)
            skips.append(h)
        h = self.middle_block(h)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1))
        return self.out(h)[..., :height, :width]


class ReconstructionNetworks(nn.Module):
    """One independent U-Net per level; returns reconstructions and squared residuals."""

    def __init__(self, channels: Sequence[int], width_ratio: float = 0.5, **unet_kwargs) -> None:
        super().__init__()
        self.unets = nn.ModuleList(ReconstructionUNet(c, width_ratio, **unet_kwargs) for c in channels)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        reconstructions = [unet(f) for unet, f in zip(self.unets, features)]
        residuals = [(f - r).pow(2) for f, r in zip(features, reconstructions)]
        return reconstructions, residuals
