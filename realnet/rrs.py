"""RRS, reconstruction residual selection (the RealNet paper's RRS module, official `models/rrs/rrs.py`).

The residuals of all levels are brought to the finest level's resolution and concatenated. Per
sample, the channels with the largest spatial maximum and the largest spatial mean are kept. The
ranking looks at a BatchNorm-standardised view (so channels of different levels are comparable),
but the *raw* residuals are what is gathered and decoded, as in the official code.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sia.errors import InputError

OFFICIAL_TOP_K = (256, 256)
OFFICIAL_BN_MOMENTUM = 0.9


def default_top_k(total_channels: int) -> tuple[int, int]:
    """Retention 1/3 split evenly between max and mean ranking: 256 + 256 for 1536 WRN50 channels."""
    k = max(1, round(total_channels / 6))
    return k, k


def clamp_top_k(top_k: Sequence[int], total_channels: int) -> tuple[int, int]:
    """Each ranking can pick at most every channel; larger requests are clamped.

    Zero or negative counts are refused rather than raised to 1: they are typos, not requests.
    """
    values = list(top_k) if isinstance(top_k, (list, tuple)) else []
    positive = all(isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 1 for k in values)
    if len(values) != 2 or not positive:
        raise InputError(f"rrs_top_k: expected two positive integers (k_max, k_mean), got {top_k!r}")
    k_max, k_mean = (int(k) for k in values)
    return min(k_max, total_channels), min(k_mean, total_channels)


def align_residuals(residuals: Sequence[torch.Tensor]) -> torch.Tensor:
    """Upsample every level to the first (finest) level's size (bilinear, align_corners) and concat."""
    size = residuals[0].shape[-2:]
    aligned = [
        r if r.shape[-2:] == size else F.interpolate(r, size=size, mode="bilinear", align_corners=True)
        for r in residuals
    ]
    return torch.cat(aligned, dim=1)


def top_channels(ranking: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    """Per-sample indices (B,k) of the channels with the largest spatial max or mean."""
    flat = ranking.flatten(2)
    score = flat.amax(dim=-1) if mode == "max" else flat.mean(dim=-1)
    return torch.topk(score, k, dim=1, largest=True, sorted=True).indices


def gather_channels(residual: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    b, _, h, w = residual.shape
    return torch.gather(residual, 1, indices[:, :, None, None].expand(b, indices.shape[1], h, w))


class ResidualSelection(nn.Module):
    """Concatenate residuals and keep `k_max + k_mean` channels per sample (duplicates possible)."""

    def __init__(
        self,
        total_channels: int,
        top_k: Sequence[int] = OFFICIAL_TOP_K,
        bn_momentum: float | None = OFFICIAL_BN_MOMENTUM,
    ) -> None:
        super().__init__()
        self.top_k = clamp_top_k(top_k, total_channels)
        self.out_channels = sum(self.top_k)
        # Affine-free BN used only for ranking. momentum=None gives a cumulative average of all
        # training batches instead of the official "almost only the last batch" (momentum 0.9).
        self.bn = nn.BatchNorm2d(total_channels, affine=False, momentum=bn_momentum)

    def _ranking_view(self, stacked: torch.Tensor) -> torch.Tensor:
        """The BatchNorm-standardised residuals the channels are ranked by.

        The ONNX exporter cannot tell the channel count of an affine-free BatchNorm here, so while
        exporting the identity scale and shift are passed explicitly (the same computation).
        """
        if not torch.onnx.is_in_onnx_export():
            return self.bn(stacked)
        channels = self.bn.num_features
        scale = torch.ones(channels, dtype=stacked.dtype)
        shift = torch.zeros(channels, dtype=stacked.dtype)
        return F.batch_norm(stacked, self.bn.running_mean, self.bn.running_var, scale, shift, False, 0.0, self.bn.eps)

    def forward(self, residuals: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the selected raw residuals (B, k_max+k_mean, h, w) and the indices (B, k_max+k_mean)."""
        stacked = align_residuals(residuals)
        with torch.no_grad():
            ranking = self._ranking_view(stacked.detach().float())
            indices = torch.cat(
                [top_channels(ranking, self.top_k[0], "max"), top_channels(ranking, self.top_k[1], "mean")], dim=1
            )
        return gather_channels(stacked, indices), indices
