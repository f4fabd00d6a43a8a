"""Segmentation head of RealNet (official RRS decoder; "MLP + upsampling" in the paper).

Convolutional as in the official code: a residual stack and a few 3x3 convolutions on the selected
residuals at the finest feature level, a x2 bilinear upsampling, two more convolutions, then
bilinear resizing to the input image size. Each axis is upsampled by 2 on its own, so non-square
inputs work (the official code doubles the last axis for both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Residual(nn.Module):
    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResidualStack(nn.Module):
    def __init__(self, channels: int, hidden: int, num_layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Residual(channels, hidden) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return F.relu(x)


class Discriminator(nn.Module):
    """Selected residuals (B, K, h, w) -> two-class logits (B, 2, H, W) at the image size."""

    def __init__(self, in_channels: int, num_residual_layers: int = 2) -> None:
        super().__init__()
        self.decoder1 = nn.Sequential(
            ResidualStack(in_channels, in_channels, num_residual_layers),
            nn.Conv2d(in_channels, 128, 3, padding=1),
            nn.BatchNorm2d(128),
            nn.ReLU(),
        )
        self.decoder2 = nn.Sequential(
            nn.Conv2d(128, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 8, 3, padding=1), nn.ReLU()
        )
        self.decoder3 = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))

    def forward(self, selected: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        x = self.decoder2(self.decoder1(selected))
        x = F.interpolate(x, size=(x.shape[-2] * 2, x.shape[-1] * 2), mode="bilinear", align_corners=True)
        x = self.decoder3(x)
        return F.interpolate(x, size=tuple(image_size), mode="bilinear", align_corners=True)


def anomaly_probability(logits: torch.Tensor) -> torch.Tensor:
    """Foreground (anomaly) probability map (B, 1, H, W) from two-class logits."""
    return torch.softmax(logits.float(), dim=1)[:, 1:2]


def image_scores(anomaly_map: torch.Tensor, mode: str = "pool16", pool_size: int = 16) -> torch.Tensor:
    """Image score (B,): max of the `pool_size` mean-filtered map (official) or the plain max."""
    if mode == "max":
        return anomaly_map.flatten(1).amax(dim=1)
    kernel = (min(pool_size, anomaly_map.shape[-2]), min(pool_size, anomaly_map.shape[-1]))
    return F.avg_pool2d(anomaly_map, kernel, stride=1).flatten(1).amax(dim=1)
