"""Training losses of RealNet: segmentation of the synthetic defects + reconstruction of clean features.

The official code uses plain pixel-wise cross-entropy plus an unweighted sum of per-level MSEs
(what the official training script computes). Synthetic defects cover about 5 % of an anomalous image and half the images are
normal, so under plain CE the discriminator first learns to say "normal" everywhere; the
class-balanced and focal variants here counter that imbalance and are what the `fast` recipe uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sia.errors import InputError

SEGMENTATION_LOSSES = ("ce", "balanced_ce", "focal")


def _pixel_targets(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Masks (B,1,H,W) or (B,H,W) in {0,1} -> long targets (B,H,W) at the logits' resolution."""
    if masks.ndim == 4:
        masks = masks[:, 0]
    if masks.shape[-2:] != logits.shape[-2:]:
        masks = F.interpolate(masks[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0]
    return (masks > 0.5).long()


def segmentation_loss(
    logits: torch.Tensor,
    masks: torch.Tensor,
    kind: str = "ce",
    focal_gamma: float = 2.0,
) -> torch.Tensor:
    """Pixel-wise loss of 2-class logits (B,2,H,W) against binary masks.

    - ``"ce"``: mean cross-entropy over all pixels (the official loss).
    - ``"balanced_ce"``: mean CE over anomalous pixels and mean CE over normal pixels, averaged, so
      each class weighs half whatever its area (normal part only when a batch holds no defect).
    - ``"focal"``: focal loss (Lin et al.) ``(1 - p_t)^gamma * CE``, averaged over pixels, which
      down-weights the many easy normal pixels.
    """
    targets = _pixel_targets(logits, masks)
    logits = logits.float()
    per_pixel = F.cross_entropy(logits, targets, reduction="none")
    if kind == "ce":
        return per_pixel.mean()
    if kind == "balanced_ce":
        positive = targets.bool()
        negative_loss = per_pixel[~positive].mean() if (~positive).any() else per_pixel.sum() * 0
        if not positive.any():
            return negative_loss
        return 0.5 * (per_pixel[positive].mean() + negative_loss)
    if kind == "focal":
        p_true = torch.exp(-per_pixel)
        return ((1.0 - p_true).pow(focal_gamma) * per_pixel).mean()
    raise InputError(f"segmentation loss {kind!r}: unknown; known: {', '.join(SEGMENTATION_LOSSES)}")


def reconstruction_loss(
    reconstructions: Sequence[torch.Tensor], clean_features: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Sum over feature levels of the MSE between reconstructed and clean (selected) features."""
    if len(reconstructions) != len(clean_features):
        raise InputError(
            f"reconstruction_loss: {len(reconstructions)} reconstructions for {len(clean_features)} feature levels"
        )
    total = reconstructions[0].new_zeros((), dtype=torch.float32)
    for recon, clean in zip(reconstructions, clean_features):
        total = total + F.mse_loss(recon.float(), clean.float().detach())
    return total


def realnet_loss(
    logits: torch.Tensor,
    masks: torch.Tensor,
    reconstructions: Sequence[torch.Tensor],
    clean_features: Sequence[torch.Tensor],
    *,
    segmentation: str = "ce",
    segmentation_weight: float = 1.0,
    reconstruction_weight: float = 1.0,
    focal_gamma: float = 2.0,
) -> dict[str, torch.Tensor]:
    """Weighted total (paper Eq. 6: ``L = L_recon + L_seg`` with unit weights) and its two parts."""
    seg = segmentation_loss(logits, masks, segmentation, focal_gamma=focal_gamma)
    rec = reconstruction_loss(reconstructions, clean_features)
    total = segmentation_weight * seg + reconstruction_weight * rec
    return {"loss": total, "segmentation": seg, "reconstruction": rec}
