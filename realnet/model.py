"""RealNet: frozen backbone -> AFS -> reconstruction U-Nets -> RRS -> segmentation head.

`RealNet` is a plain `nn.Module` with Hugging Face Hub save/load (`PyTorchModelHubMixin`). Its
config is a handful of JSON-able keyword arguments; the saved `model.safetensors` holds everything,
frozen backbone included, so a saved model runs offline without timm/Hub weight downloads
(loading is `realnet.hub`).
"""

from __future__ import annotations

import copy
import numbers
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from sia.errors import InputError

from . import hub
from .afs import DEFAULT_AFS_BATCHES, FeatureSelector, accumulate_channel_losses, select_channels
from .backbone import DEFAULT_BACKBONE, DEFAULT_LAYERS, Backbone, FeatureStandardizer
from .discriminator import Discriminator, anomaly_probability, image_scores
from .hub import WEIGHTS_NAME, load_weights_file  # noqa: F401 - importable from here, as before
from .inference import RealNetPrediction, predict_batches
from .recon import ReconstructionNetworks
from .rrs import OFFICIAL_BN_MOMENTUM, ResidualSelection, clamp_top_k, default_top_k

REPO_URL = "https://github.com/sia-realnet/sia"
OFFICIAL_AFS_CHANNELS = (256, 512, 512, 256)
IMAGE_SCORE_MODES = ("pool16", "max")


def default_afs_channels(channels: Sequence[int]) -> list[int]:
    """Official 256/512/512/256 per position, capped at each layer's channel count.

    WRN50 (256/512/1024/2048) gives the official 256/512/512/256; resnet18 64/128/256/256;
    tf_efficientnet_lite0 24/40/112/256. Positions beyond the fourth keep up to 512.
    """
    return [min(c, OFFICIAL_AFS_CHANNELS[i] if i < len(OFFICIAL_AFS_CHANNELS) else 512) for i, c in enumerate(channels)]


def _integral(value: Any) -> int | None:
    """`value` as an int if it is a whole number (64, 64.0, numpy ints), else None; bools are not sizes."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return int(value) if float(value).is_integer() else None


def _pair(value: int | Sequence[int], what: str) -> list[int]:
    """One size or (height, width) -> [height, width]; JSON configs may hold 64.0 for 64."""
    items = [value, value] if isinstance(value, numbers.Real) else value
    values = [_integral(v) for v in items] if isinstance(items, (list, tuple)) else []
    if len(values) != 2 or None in values or min(values) < 32:
        raise InputError(f"{what}: expected an int or (height, width), each a whole number >= 32, got {value!r}")
    return values


@dataclass
class RealNetOutput:
    """Everything a forward pass produces. Lists are per feature level (after AFS)."""

    anomaly_map: torch.Tensor  # (B,1,H,W) anomaly probability in [0,1]
    image_score: torch.Tensor  # (B,)
    logits: torch.Tensor  # (B,2,H,W)
    features: list[torch.Tensor]  # selected features of `images`
    reconstructions: list[torch.Tensor]
    residuals: list[torch.Tensor]  # (features - reconstructions) ** 2
    clean_features: list[torch.Tensor] | None  # selected features of `clean_images` (reconstruction targets)
    rrs_indices: torch.Tensor | None = None  # (B, k_max + k_mean) channels chosen by RRS


class RealNet(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="realnet",
    repo_url=REPO_URL,
    paper_url="https://arxiv.org/abs/2403.05897",
    license="mit",
    pipeline_tag="image-segmentation",
    tags=["anomaly-detection", "realnet", "industrial-inspection"],
):
    """RealNet anomaly detector (CVPR 2024), architecture A.

    Args:
        backbone: timm model name with `features_only` support.
        layers: timm feature indices (1..4 = strides 4..32 for ResNets and EfficientNets).
        afs_channels: channels kept by AFS per layer (default: `default_afs_channels`).
        rrs_top_k: (k_max, k_mean) residual channels kept per sample; default keeps 1/3 of all
            selected channels (256 + 256 for WRN50); values above the total are clamped.
        image_size: (H, W) the model is trained and evaluated at (used by `predict`).
        image_score: "pool16" (official: max of the 16x16 mean-filtered map) or "max".
        standardize_features: apply per-channel mean/std (fitted by `fit_feature_statistics`).
        rrs_bn_momentum: momentum of the RRS ranking BatchNorm. 0.9 is official (the test-time
            ranking then reflects mostly the last training batch); None = cumulative average.
        recon_width_ratio, recon_channel_mult, recon_num_res_blocks, recon_attention_mult: U-Net shape.
        recon_norm_groups: GroupNorm groups of the U-Nets: "adaptive" (32 where the width allows it,
            fewer for narrow layers) or "official" (always 32, as the official network; converted
            official checkpoints use it).
        discriminator_residual_layers: residual layers in the segmentation head.
        backbone_pretrained: download timm/Hub ImageNet weights on construction.
        backbone_weights: local weights file for the backbone (safetensors or torch weights-only;
            EfficientNet-PyTorch keys are converted automatically). Overrides `backbone_pretrained`.
        weights_from_checkpoint: every weight will be loaded from a saved checkpoint (as
            `from_pretrained` does), so the backbone is built empty: nothing is downloaded and
            `backbone_weights` is not read. Not a model setting: config.json never records it.
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: list[int] | None = None,
        afs_channels: list[int] | None = None,
        rrs_top_k: list[int] | None = None,
        image_size: list[int] | int = 256,
        image_score: str = "pool16",
        standardize_features: bool = False,
        rrs_bn_momentum: float | None = OFFICIAL_BN_MOMENTUM,
        recon_width_ratio: float = 0.5,
        recon_channel_mult: list[int] | None = None,
        recon_num_res_blocks: int = 2,
        recon_attention_mult: list[int] | None = None,
        discriminator_residual_layers: int = 2,
        backbone_pretrained: bool = True,
        backbone_weights: str | None = None,
        recon_norm_groups: str = "adaptive",
        *,
        weights_from_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if image_score not in IMAGE_SCORE_MODES:
            raise InputError(f"image_score: expected one of {IMAGE_SCORE_MODES}, got {image_score!r}")
        if not 0 < recon_width_ratio:
            raise InputError(f"recon_width_ratio: expected a positive number, got {recon_width_ratio}")
        if rrs_bn_momentum is not None and not 0 < rrs_bn_momentum <= 1:
            raise InputError(f"rrs_bn_momentum: expected a value in (0, 1] or None, got {rrs_bn_momentum}")
        layers = list(layers) if layers is not None else list(DEFAULT_LAYERS)
        self.backbone = Backbone(
            backbone,
            layers,
            pretrained=backbone_pretrained and not weights_from_checkpoint,
            weights=None if weights_from_checkpoint else backbone_weights,
        )
        channels = self.backbone.channels
        afs_channels = list(afs_channels) if afs_channels is not None else default_afs_channels(channels)
        self.standardizer = FeatureStandardizer(channels)
        self.selector = FeatureSelector(channels, afs_channels)
        total = sum(afs_channels)
        top_k = clamp_top_k(rrs_top_k, total) if rrs_top_k is not None else default_top_k(total)
        channel_mult = list(recon_channel_mult) if recon_channel_mult is not None else [1, 2, 4]
        attention_mult = list(recon_attention_mult) if recon_attention_mult is not None else [2, 4]
        self.recon = ReconstructionNetworks(
            afs_channels,
            recon_width_ratio,
            channel_mult=channel_mult,
            num_res_blocks=recon_num_res_blocks,
            attention_mult=attention_mult,
            norm_groups=recon_norm_groups,
        )
        self.rrs = ResidualSelection(total, top_k, rrs_bn_momentum)
        self.discriminator = Discriminator(self.rrs.out_channels, discriminator_residual_layers)

        self.image_size = _pair(image_size, "image_size")
        self.image_score_mode = image_score
        self.standardize_features = bool(standardize_features)
        self.layers = layers
        self.afs_channels = afs_channels
        self.rrs_top_k = list(top_k)
        # The resolved values, so config.json documents the network actually built.
        self._config: dict[str, Any] = {
            "backbone": backbone,
            "layers": list(layers),
            "afs_channels": list(afs_channels),
            "rrs_top_k": list(top_k),
            "image_size": list(self.image_size),
            "image_score": image_score,
            "standardize_features": standardize_features,
            "rrs_bn_momentum": rrs_bn_momentum,
            "recon_width_ratio": recon_width_ratio,
            "recon_channel_mult": channel_mult,
            "recon_num_res_blocks": recon_num_res_blocks,
            "recon_attention_mult": attention_mult,
            "discriminator_residual_layers": discriminator_residual_layers,
            "backbone_pretrained": backbone_pretrained,
            "backbone_weights": None,
            "recon_norm_groups": recon_norm_groups,
        }

    # ------------------------------------------------------------------ state
    @property
    def afs_ready(self) -> bool:
        """True once `select_features` has chosen the AFS channels."""
        return bool(self.selector.ready)

    @property
    def feature_statistics_ready(self) -> bool:
        return bool(self.standardizer.fitted)

    @property
    def device(self) -> torch.device:
        return self.backbone.mean.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the model (follows `.half()` / `.double()`); inputs are cast to it."""
        return self.backbone.mean.dtype

    def train(self, mode: bool = True) -> RealNet:
        """Set train mode on the trainable parts; the backbone always stays in eval mode."""
        super().train(mode)
        self.backbone.train(False)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser should update: reconstruction U-Nets and the segmentation head."""
        return [*self.recon.parameters(), *self.discriminator.parameters()]

    # ------------------------------------------------------------------ features
    def _check_images(self, images: Any, what: str) -> torch.Tensor:
        """(B,3,H,W) float images in [0,1] or uint8 in 0..255 -> float images in [0,1] on the model.

        uint8 is scaled by 1/255 (an image tensor straight from a decoder); other integer dtypes have
        no agreed range and are refused; floats of another precision are cast to the model's dtype.
        """
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise InputError(f"{what}: expected a float tensor (B,3,H,W) with values in [0,1], got {shape}")
        if min(images.shape[-2:]) < 32:
            raise InputError(f"{what}: images must be at least 32x32 pixels, got {tuple(images.shape[-2:])}")
        if images.dtype == torch.uint8:
            return images.to(self.device, self.dtype) / 255
        if not images.is_floating_point():
            raise InputError(
                f"{what}: expected float images in [0,1] or uint8 images in 0..255, got dtype {images.dtype}"
            )
        return images.to(self.device, self.dtype)

    def backbone_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """All channels of the backbone levels (standardised when enabled); no gradients."""
        features = self.backbone(images)
        return self.standardizer(features) if self.standardize_features else features

    def selected_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """AFS-selected features, the input of the reconstruction networks."""
        return self.selector(self.backbone_features(images))

    # ------------------------------------------------------------------ fitting
    @torch.no_grad()
    def fit_feature_statistics(
        self, batches: Iterable[Any], num_batches: int | None = None, on_batch: Callable[[], object] | None = None
    ) -> None:
        """Fit the per-channel standardisation on NORMAL images (tensors, tuples or dicts with 'image').

        Call before `select_features`, since AFS then sees standardised features. Statistics are
        stored even when `standardize_features` is False (they are only applied when it is True).
        `on_batch` is called after each batch (a progress bar's ``update``; the module shows none).
        """

        def feature_batches():
            for n, batch in enumerate(batches):
                if num_batches is not None and n >= num_batches:
                    return
                images = batch["image"] if isinstance(batch, dict) else batch[0] if isinstance(batch, (list, tuple)) else batch
                yield self.backbone(self._check_images(images, "feature statistics batch"))
                if on_batch is not None:
                    on_batch()

        self.standardizer.fit(feature_batches())

    @torch.no_grad()
    def select_features(
        self,
        batches: Iterable[Any],
        num_batches: int = DEFAULT_AFS_BATCHES,
        *,
        force: bool = False,
        on_batch: Callable[[], object] | None = None,
    ) -> list[torch.Tensor]:
        """Run AFS once on batches of (anomalous images, clean images, masks) and store the indices.

        Feed 100 % synthetic anomalies (official: 64 batches of 16). Returns the accumulated
        per-channel losses of every layer (lower = more anomaly-aware). `on_batch` is called after
        each batch (a progress bar's ``update``; the module shows none).
        """
        if self.afs_ready and not force:
            raise RuntimeError("AFS channels are already selected; pass force=True to select them again")

        def features(images: torch.Tensor) -> list[torch.Tensor]:
            return self.backbone_features(self._check_images(images, "AFS batch"))

        losses = accumulate_channel_losses(batches, features, num_batches=num_batches, on_batch=on_batch)
        self.selector.set_indices(select_channels(losses, self.afs_channels))
        return losses

    # ------------------------------------------------------------------ inference
    def forward(self, images: torch.Tensor, clean_images: torch.Tensor | None = None) -> RealNetOutput:
        """Images (B,3,H,W) in [0,1] -> anomaly map, image score and all intermediate tensors.

        With `clean_images` (the normal images the anomalies were synthesised on) the selected clean
        features, i.e. the reconstruction targets, are returned too.
        """
        images = self._check_images(images, "images")
        if clean_images is not None:
            clean_images = self._check_images(clean_images, "clean_images")
            if clean_images.shape != images.shape:
                raise InputError(
                    f"clean_images: expected the shape of images {tuple(images.shape)}, got {tuple(clean_images.shape)}"
                )
            both = self.selected_features(torch.cat([images, clean_images]))
            batch = images.shape[0]
            features = [f[:batch] for f in both]
            clean_features = [f[batch:] for f in both]
        else:
            features = self.selected_features(images)
            clean_features = None
        reconstructions, residuals = self.recon(features)
        selected, rrs_indices = self.rrs(residuals)
        logits = self.discriminator(selected, images.shape[-2:])
        anomaly_map = anomaly_probability(logits)
        score = image_scores(anomaly_map, self.image_score_mode)
        return RealNetOutput(
            anomaly_map=anomaly_map,
            image_score=score,
            logits=logits,
            features=features,
            reconstructions=reconstructions,
            residuals=residuals,
            clean_features=clean_features,
            rrs_indices=rrs_indices,
        )

    @torch.no_grad()
    def predict(
        self, images: torch.Tensor, batch_size: int = 8, resize: bool = True, image_size: Any = None
    ) -> RealNetPrediction:
        """Anomaly maps and image scores in eval mode, without gradients, batch by batch.

        `images`: (B,3,H,W) or (3,H,W) in [0,1]. With `resize`, images are resized to `image_size`
        (bilinear, antialiased) and the maps are returned at that size, as in the official evaluation.
        `image_size` (256, "640x256" or (H, W)) defaults to the training size; another size is
        allowed (a one-line notice says so).
        """
        from .image_size import inference_size

        size = list(inference_size(self, image_size))
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size: expected a positive integer, got {batch_size!r}")
        if isinstance(images, torch.Tensor) and images.ndim == 3:
            images = images.unsqueeze(0)
        images = self._check_images(images, "images")
        if resize and list(images.shape[-2:]) != size:
            images = F.interpolate(images, size=tuple(size), mode="bilinear", antialias=True).clamp(0, 1)
        return predict_batches(self, images, batch_size, device=self.device, dtype=None)

    # ------------------------------------------------------------------ hub saving and loading
    @property
    def config(self) -> dict[str, Any]:
        """The settings this network was built with, resolved (channels, sizes), as saved in config.json.

        `backbone_weights` is None: the backbone's weights are saved in model.safetensors, so a
        saved model never needs the file it was first built from.
        """
        return copy.deepcopy(self._config)

    def save_pretrained(self, save_directory: str | Path, *, config: dict | None = None, **kwargs: Any) -> str | None:
        """Save config.json (`config`, default `self.config`), model.safetensors and a model card
        (`PyTorchModelHubMixin.save_pretrained` arguments)."""
        return super().save_pretrained(save_directory, config=self.config if config is None else config, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> RealNet:
        """Load from a model folder or a Hub repo id (`PyTorchModelHubMixin.from_pretrained` arguments).

        A folder that does not exist, an invalid repo id, or a repo/revision/file that cannot be
        found (offline: not in the cache) is a one-line InputError naming it, not a Hub traceback.
        """
        name = str(pretrained_model_name_or_path)
        hub.check_location(name)
        with hub.hub_errors_as_input_errors(name, kwargs.get("revision"), hub.CONFIG_NAME):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | os.PathLike | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        config: dict | None = None,
        **model_kwargs,
    ) -> RealNet:
        """The mixin's loading hook: `realnet.hub.load_checkpoint` (strict safetensors, never unpickles,
        never downloads backbone weights)."""
        return hub.load_checkpoint(
            cls,
            model_id=model_id,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            map_location=map_location,
            strict=strict,
            config=config,
            settings=model_kwargs,
        )
