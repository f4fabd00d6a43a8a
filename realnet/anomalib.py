"""RealNet as an anomalib model: train, test and predict it with anomalib's ``Engine``.

:class:`RealNetModule` is an adapter: it wraps :class:`realnet.RealNet` (the same network), trains
it with the same loss and recipe settings as ``realnet train`` (:mod:`realnet.recipes`), and makes
its synthetic anomalies with :class:`sia.AnomalySynthesizer` from the normal images anomalib
hands it. AFS (and, for the ``fast`` recipe, the feature statistics) runs once when fitting starts,
on 100 % anomalous batches built from the training images, as in our trainer::

    from anomalib.data import Folder
    from anomalib.engine import Engine
    from realnet.anomalib import RealNetModule

    model = RealNetModule(source="dtd:dtd/images", category="bottle", backbone="wide_resnet50_2")
    engine = Engine(max_steps=1000)
    engine.fit(model, datamodule=Folder(name="bottle", root="data/bottle", normal_dir="train/good",
                                        abnormal_dir="test/broken", mask_dir="ground_truth/broken"))
    engine.test(model, datamodule=...)

Predictions carry ``anomaly_map`` (B, H, W) and ``pred_score`` (B,) like anomalib's own models.
``realnet train`` (Accelerate) stays the primary path: it also calibrates thresholds on held-out
normal images and writes a Hub-ready model folder.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from sia.anomalib import missing_anomalib
from sia.errors import InputError

try:
    from anomalib import LearningType
    from anomalib.data import Batch, InferenceBatch
    from anomalib.models.components import AnomalibModule
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Resize
except ImportError as _err:  # pragma: no cover - exercised in environments without the extra
    raise missing_anomalib(_err) from None

from .afs import DEFAULT_AFS_BATCHES
from .construction import check_model_kwargs, make_optimizer
from .model import DEFAULT_BACKBONE, RealNet
from .recipes import DEFAULT_RECIPE, Recipe, get_recipe
from .training import ExponentialMovingAverage, recipe_loss

AFS_SEED_OFFSET = 31  # the trainer's offset: AFS anomalies differ from the training anomalies


class RealNetInference(nn.Module):
    """``RealNet`` with anomalib's inference output: ``InferenceBatch(pred_score, anomaly_map)``.

    anomalib's test, predict and export paths call ``module.model(images)`` and expect that
    output; training uses :attr:`network` (the plain :class:`realnet.RealNet`) directly.
    """

    def __init__(self, network: RealNet) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        output = self.network(images)
        return InferenceBatch(pred_score=output.image_score, anomaly_map=output.anomaly_map[:, 0])


class RealNetModule(AnomalibModule):
    """RealNet (CVPR 2024) for anomalib's Engine.

    Args:
        source: anomaly source for the synthetic anomalies (``"dtd:DIR"``, ``"sia:DIR_OR_HUB_ID"``,
            ``"cutpaste"``) or a ready :class:`sia.AnomalySynthesizer`.
        category: foreground preset (``"bottle"``, ``"hazelnut-toy"``, ``"auto"``, ``"none"``).
        recipe: training recipe name (``"fast"``, ``"paper"``, ``"fast-no-ema"``, ...) or a
            :class:`realnet.Recipe`; its batch size is ignored (the datamodule's is used).
        backbone, backbone_weights, pre_trained: the frozen timm backbone, local weights file,
            and whether to load timm's ImageNet weights (a download) when no file is given.
        image_size: (H, W) or an int: the default pre-processor resizes to it.
        afs_batches: number of 100 % anomalous batches AFS accumulates over (official: 64).
        seed: seeds the synthetic anomalies (AFS and training).
        model_options: further :class:`realnet.RealNet` settings (``layers``, ``afs_channels``, ...).
        pre_processor, post_processor, evaluator, visualizer: anomalib components (True = default).
    """

    def __init__(
        self,
        source: Any = "cutpaste",
        category: Any = "none",
        recipe: str | Recipe = DEFAULT_RECIPE,
        backbone: str = DEFAULT_BACKBONE,
        backbone_weights: str | None = None,
        pre_trained: bool = True,
        image_size: int | tuple[int, int] = 256,
        afs_batches: int = DEFAULT_AFS_BATCHES,
        seed: int = 0,
        model_options: dict[str, Any] | None = None,
        pre_processor: PreProcessor | bool = True,
        post_processor: Any = True,
        evaluator: Any = True,
        visualizer: Any = True,
    ) -> None:
        from sia.synthesizer import AnomalySynthesizer, _image_size

        size = _image_size(image_size)
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(size)
        super().__init__(pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator, visualizer=visualizer)
        self.recipe = get_recipe(recipe)
        if isinstance(afs_batches, bool) or not isinstance(afs_batches, int) or afs_batches < 1:
            raise InputError(f"afs_batches: expected a positive number of batches, got {afs_batches!r}")
        kwargs = {
            "standardize_features": self.recipe.standardize_features,
            "rrs_bn_momentum": self.recipe.rrs_bn_momentum,
            **(model_options or {}),
            "backbone": backbone,
            "backbone_pretrained": pre_trained,
            "backbone_weights": None if backbone_weights is None else str(backbone_weights),
            "image_size": list(size),
        }
        check_model_kwargs(kwargs)
        self.model = RealNetInference(RealNet(**kwargs))
        if isinstance(source, AnomalySynthesizer):
            self.synthesizer = source
        else:
            self.synthesizer = AnomalySynthesizer(source, category=category, require_nonempty=self.recipe.nonempty_masks,
                                                    mask_shape=self.recipe.mask_shape)
        self.afs_batches = afs_batches
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.ema: ExponentialMovingAverage | None = None

    @property
    def network(self) -> RealNet:
        """The wrapped :class:`realnet.RealNet` (``save_pretrained`` it to use it with ``realnet predict``)."""
        return self.model.network

    # ------------------------------------------------------------------ anomalib hooks
    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Gradient clipping from the recipe; no sanity validation (the model has no AFS channels yet)."""
        return {"gradient_clip_val": self.recipe.grad_clip_norm or 0, "num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        return LearningType.ONE_CLASS

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize only: RealNet takes images in [0, 1] and applies the backbone's normalisation itself."""
        return PreProcessor(transform=Compose([Resize(image_size or (256, 256), antialias=True)]))

    def configure_optimizers(self):
        """The recipe's optimiser and per-step learning-rate schedule over the whole fit."""
        optimizer = make_optimizer(self.network, self.recipe)
        total = self.trainer.estimated_stepping_batches
        if not 0 < total < float("inf"):
            raise InputError("Engine: RealNetModule needs a finite budget (max_steps or max_epochs)")
        total = int(total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: self.recipe.learning_rate_factor(it, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """Fit the feature statistics and select the AFS channels once, before the first step."""
        if not self.network.afs_ready:
            loader = self._train_loader()
            if self.recipe.standardize_features:
                self.network.fit_feature_statistics(self._normal_batches(loader, epochs=1))
            generator = torch.Generator().manual_seed(self.seed + AFS_SEED_OFFSET)
            batches = (self._anomalous_batch(images, generator) for images in self._normal_batches(loader, limit=self.afs_batches))
            self.network.select_features(batches, num_batches=self.afs_batches)
        if self.recipe.ema_decay and self.ema is None:
            self.ema = ExponentialMovingAverage(self.network, self.recipe.ema_decay)

    def training_step(self, batch: Batch, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Synthesise anomalies on the normal batch (half of it with ``balanced_batches``), then RealNet's loss."""
        del args, kwargs
        clean = batch.image
        if self.recipe.balanced_batches:
            half = clean.shape[0] // 2
            anomalous, anomalous_masks = self._synthesize(clean[half:], self.generator, probability=1.0)
            images = torch.cat([clean[:half], anomalous])
            masks = torch.cat([anomalous_masks.new_zeros(half, *anomalous_masks.shape[1:]), anomalous_masks])
        else:
            images, masks = self._synthesize(clean, self.generator, probability=self.recipe.anomaly_probability)
        output = self.network(images, clean_images=clean)
        losses = recipe_loss(output, masks, self.recipe)
        self.log("train_loss", losses["loss"].detach(), prog_bar=True, batch_size=clean.shape[0])
        return {"loss": losses["loss"]}

    def on_train_batch_end(self, *args, **kwargs) -> None:
        if self.ema is not None:
            self.ema.update(self.network)

    def on_train_end(self) -> None:
        """Keep the averaged weights, as ``realnet train`` saves them."""
        if self.ema is not None:
            self.network.load_state_dict(self.ema.shadow, strict=False)
            self.ema = None

    def validation_step(self, batch: Batch, *args, **kwargs) -> Batch:
        """Anomaly map (B, H, W) and image score (B,) for anomalib's post-processor and evaluator."""
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())

    # ------------------------------------------------------------------ helpers
    def _train_loader(self):
        datamodule = getattr(self.trainer, "datamodule", None)
        loader = datamodule.train_dataloader() if datamodule is not None else self.trainer.train_dataloader
        if loader is None:
            raise InputError("Engine.fit: RealNetModule needs a training dataloader of normal images")
        return loader

    def _normal_batches(self, loader, epochs: int | None = None, limit: int | None = None) -> Iterator[torch.Tensor]:
        """Pre-processed normal images of the training loader on the model's device."""
        passes = itertools.count() if epochs is None else range(epochs)
        produced = 0
        for _ in passes:
            empty = True
            for batch in loader:
                empty = False
                images = batch.image.to(self.device)
                yield self.pre_processor.transform(images) if self.pre_processor is not None else images
                produced += 1
                if limit is not None and produced >= limit:
                    return
            if empty:
                raise InputError("Engine.fit: the training dataloader yielded no batch")

    def _synthesize(self, images: torch.Tensor, generator: torch.Generator, probability: float):
        out, masks = self.synthesizer.synthesize_batch(images.detach().float().cpu().clamp(0, 1), generator, probability=probability)
        return out.to(images.device, images.dtype), masks.to(images.device, images.dtype)

    def _anomalous_batch(self, images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        anomalous, masks = self._synthesize(images, generator, probability=1.0)
        return {"image": anomalous, "clean_image": images, "mask": masks}


__all__ = ["RealNetModule"]
