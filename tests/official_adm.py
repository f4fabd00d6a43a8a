"""A compact, independent ADM (guided-diffusion) UNet used only as a reference in tests.

It reproduces the module names and the arithmetic of the official SDAS UNet (scale-shift norm,
residual up/down blocks, legacy QKV attention ordered head by head, sinusoidal time embedding
plus label embedding), so a random instance yields a state dict in the official key layout and
the output the official model would compute for it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, ch: int, emb: int, out: int | None = None, up: bool = False, down: bool = False,
                 scale_shift: bool = True):
        super().__init__()
        out = out or ch
        self.up, self.down, self.scale_shift = up, down, scale_shift
        self.in_layers = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, 2 * out if scale_shift else out))
        self.out_layers = nn.Sequential(_norm(out), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out, out, 3, padding=1))
        self.skip_connection = nn.Identity() if out == ch else nn.Conv2d(ch, out, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers[1](self.in_layers[0](x))
        h = self.in_layers[2](self._resample(h))
        x = self._resample(x)
        e = self.emb_layers(emb)[..., None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[3](self.out_layers[1](h))
        else:
            h = self.out_layers[3](self.out_layers[1](self.out_layers[0](h + e)))
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    def __init__(self, ch: int, head_channels: int):
        super().__init__()
        self.heads = ch // head_channels
        self.norm = _norm(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, hh, ww = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))
        d = c // self.heads
        # legacy order: per head, q rows then k rows then v rows
        q, k, v = qkv.reshape(b * self.heads, 3 * d, -1).split(d, dim=1)
        s = 1 / math.sqrt(math.sqrt(d))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s), dim=-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
        return (flat + self.proj_out(a)).reshape(b, c, hh, ww)


class Seq(nn.Sequential):
    def forward(self, x, emb):  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, (ResBlock, AttentionBlock)) else layer(x)
        return x


class OfficialADM(nn.Module):
    """ADM UNet with guided-diffusion module names (`input_blocks`, `middle_block`, ...)."""

    def __init__(self, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                 attention_ds=(2,), channel_mult=(1, 2), num_classes=3, head_channels=32,
                 scale_shift=True):
        super().__init__()
        emb = 4 * model_channels
        self.model_channels = model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Embedding(num_classes, emb) if num_classes else None
        ch = model_channels * channel_mult[0]
        self.input_blocks = nn.ModuleList([Seq(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skips, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb, model_channels * mult, scale_shift=scale_shift)]
                ch = model_channels * mult
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, head_channels))
                self.input_blocks.append(Seq(*layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(Seq(ResBlock(ch, emb, ch, down=True, scale_shift=scale_shift)))
                skips.append(ch)
                ds *= 2
        self.middle_block = Seq(ResBlock(ch, emb, scale_shift=scale_shift), AttentionBlock(ch, head_channels),
                                ResBlock(ch, emb, scale_shift=scale_shift))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), emb, model_channels * mult, scale_shift=scale_shift)]
                ch = model_channels * mult
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, head_channels))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, emb, ch, up=True, scale_shift=scale_shift))
                    ds //= 2
                self.output_blocks.append(Seq(*layers))
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


def randomize_(model: nn.Module, generator: torch.Generator, scale: float = 0.2) -> nn.Module:
    """Give every parameter random values (the official init zeroes output convs, hiding mistakes)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.ndim == 1:  # norm gains around 1
                param.copy_(1 + scale * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(scale * torch.randn(param.shape, generator=generator))
    return model
