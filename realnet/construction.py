"""A run's RealNet and its optimiser, built from the run's settings and recipe."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch
from torch import nn

from sia.errors import InputError

if TYPE_CHECKING:
    from .recipes import Recipe
    from .training import TrainingConfig


def build_model(config: TrainingConfig, recipe: Recipe):
    """A fresh RealNet from the run's model settings (the recipe sets the training-related ones)."""
    from .model import RealNet

    kwargs = {"standardize_features": recipe.standardize_features, "rrs_bn_momentum": recipe.rrs_bn_momentum}
    kwargs.update(config.model_kwargs)
    if config.backbone is not None:
        kwargs["backbone"] = config.backbone
    if config.backbone_weights is not None:
        kwargs["backbone_weights"] = str(config.backbone_weights)
    kwargs.setdefault("image_size", list(config.size))
    check_model_kwargs(kwargs)
    try:
        return RealNet(**kwargs)
    except InputError:
        raise
    except (TypeError, ValueError) as err:  # e.g. layers=3: a wrong type deep inside timm/torch
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"`model_kwargs`: bad value ({first})") from None


def check_model_kwargs(kwargs: dict) -> None:
    """Unknown ``model_kwargs`` keys are an InputError listing the RealNet settings."""
    from .model import RealNet

    known = set(inspect.signature(RealNet.__init__).parameters) - {"self", "weights_from_checkpoint"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise InputError(f"`model_kwargs` {', '.join(unknown)}: unknown RealNet setting; known: {', '.join(sorted(known))}")


def _trainable_groups(model: nn.Module, recipe: Recipe) -> list[dict]:
    """Optimiser parameter groups: the discriminator may get a larger learning rate."""
    discriminator = getattr(model, "discriminator", None)
    if discriminator is None:
        discriminator = getattr(getattr(model, "rrs", None), "discriminator", None)
    disc_ids = {id(p) for p in discriminator.parameters()} if discriminator is not None else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    disc = [p for p in trainable if id(p) in disc_ids]
    rest = [p for p in trainable if id(p) not in disc_ids]
    groups = [{"params": rest, "lr": recipe.learning_rate, "name": "reconstruction"}]
    if disc:
        groups.append({"params": disc, "lr": recipe.learning_rate * recipe.discriminator_lr_scale, "name": "discriminator"})
    return groups


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    groups = _trainable_groups(model, recipe)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.learning_rate, betas=recipe.betas, weight_decay=recipe.weight_decay)
    return torch.optim.Adam(groups, lr=recipe.learning_rate, betas=recipe.betas, weight_decay=recipe.weight_decay)
