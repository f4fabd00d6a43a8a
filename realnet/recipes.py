"""Named training recipes: how RealNet is trained, never what it is.

Every recipe trains the same architecture (AFS, reconstruction networks, RRS, discriminator). The
``paper`` recipe reproduces the official code's settings, so its results compare with the paper's.
The ``fast`` recipe changes only optimisation details so that the model converges within a CPU-sized budget; every change is a
separate field, and :func:`ablations` switches each one back to the paper value so its effect can
be measured (``benchmarks/recipe.py``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Optional

from sia.errors import InputError
from sia.perlin import MASK_SHAPES

from .losses import SEGMENTATION_LOSSES


@dataclass(frozen=True)
class Recipe:
    """Optimisation settings of one RealNet training run."""

    name: str
    description: str = ""
    # optimiser
    optimizer: Literal["adam", "adamw"] = "adam"
    learning_rate: float = 1e-4
    discriminator_lr_scale: float = 1.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    # learning-rate schedule
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_fraction: float = 0.0
    min_lr_ratio: float = 0.0
    grad_clip_norm: Optional[float] = None
    ema_decay: Optional[float] = None
    # features (applied through the model config)
    standardize_features: bool = False
    rrs_bn_momentum: Optional[float] = 0.9
    # losses
    segmentation_loss: str = "ce"
    focal_gamma: float = 2.0
    segmentation_weight: float = 1.0
    reconstruction_weight: float = 1.0
    # synthetic anomalies
    anomaly_probability: float = 0.5
    balanced_batches: bool = False
    nonempty_masks: bool = False
    mask_shape: str = "perlin"  # "cracks"/"mixed": thin crack masks, for thin defects (sia.perlin.MASK_SHAPES)
    # multi-class runs: batches take the categories in turn, not in proportion to their image counts
    balance_categories: bool = False
    # batching
    batch_size: int = 16

    def __post_init__(self) -> None:
        self._check_types()
        if self.optimizer not in ("adam", "adamw"):
            raise InputError(f"recipe {self.name}: optimizer {self.optimizer!r}; expected adam or adamw")
        if self.lr_schedule not in ("constant", "cosine"):
            raise InputError(f"recipe {self.name}: lr_schedule {self.lr_schedule!r}; expected constant or cosine")
        if self.segmentation_loss not in SEGMENTATION_LOSSES:
            raise InputError(
                f"recipe {self.name}: segmentation_loss {self.segmentation_loss!r}; known: {', '.join(SEGMENTATION_LOSSES)}"
            )
        if self.balance_categories and not self.balanced_batches:
            raise InputError(f"recipe {self.name}: balance_categories needs balanced_batches=true")
        if self.mask_shape not in MASK_SHAPES:
            raise InputError(f"recipe {self.name}: mask_shape {self.mask_shape!r}; expected one of {', '.join(MASK_SHAPES)}")
        if not 0.0 <= self.anomaly_probability <= 1.0:
            raise InputError(f"recipe {self.name}: anomaly_probability must lie in [0, 1], got {self.anomaly_probability}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise InputError(f"recipe {self.name}: warmup_fraction must lie in [0, 1), got {self.warmup_fraction}")
        if self.learning_rate <= 0 or self.batch_size < 1:
            raise InputError(f"recipe {self.name}: learning_rate must be > 0 and batch_size >= 1")
        if self.rrs_bn_momentum is not None and not 0.0 < self.rrs_bn_momentum <= 1.0:
            raise InputError(f"recipe {self.name}: rrs_bn_momentum must lie in (0, 1] or be None, got {self.rrs_bn_momentum}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise InputError(f"recipe {self.name}: ema_decay must lie in (0, 1) or be None, got {self.ema_decay}")
        for name in ("weight_decay", "focal_gamma", "segmentation_weight", "reconstruction_weight"):
            if getattr(self, name) < 0:
                raise InputError(f"recipe {self.name}: {name} must be >= 0, got {getattr(self, name)}")
        if self.discriminator_lr_scale <= 0:
            raise InputError(f"recipe {self.name}: discriminator_lr_scale must be > 0, got {self.discriminator_lr_scale}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise InputError(f"recipe {self.name}: min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise InputError(f"recipe {self.name}: grad_clip_norm must be > 0 or None, got {self.grad_clip_norm}")
        if not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise InputError(f"recipe {self.name}: betas must lie in [0, 1), got {list(self.betas)}")

    def _check_types(self) -> None:
        """Values from ``--recipe-option`` are JSON of any type: a wrong one is an InputError, not a
        TypeError in the range checks below. Ints are accepted for floats; betas become a tuple."""
        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), _FIELD_KINDS.get(f.name, "str")
            values = value if kind == "pair" and isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):  # NaN passes every `<=` check
                raise InputError(f"recipe {self.name}: {f.name} must be a finite number, got {value!r}")
            if kind == "float" and number(value) or kind == "bool" and isinstance(value, bool):
                continue
            if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
                continue
            if kind == "float?" and (value is None or number(value)):
                continue
            if kind == "str" and isinstance(value, str):
                continue
            if kind == "pair" and isinstance(value, (list, tuple)) and len(value) == 2 and all(map(number, value)):
                object.__setattr__(self, f.name, (float(value[0]), float(value[1])))
                continue
            expected = {"float": "a number", "float?": "a number or null", "int": "an integer", "bool": "true or false",
                        "str": "a string", "pair": "two numbers, e.g. [0.9,0.999]"}[kind]
            raise InputError(f"recipe {self.name}: {f.name} must be {expected}, got {value!r}")

    def replace(self, **changes) -> "Recipe":
        """A copy with some fields changed (unknown field names are an InputError)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise InputError(f"recipe fields {', '.join(unknown)}: unknown; known: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    def learning_rate_factor(self, iteration: int, total_iterations: int) -> float:
        """Multiplier of the base learning rate at ``iteration`` (0-based) of ``total_iterations``."""
        total = max(int(total_iterations), 1)
        warmup = int(round(self.warmup_fraction * total))
        if warmup > 0 and iteration < warmup:
            return (iteration + 1) / warmup
        if self.lr_schedule == "constant":
            return 1.0
        progress = min(max((iteration - warmup) / max(total - warmup, 1), 0.0), 1.0)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


# The type of every field, checked by Recipe._check_types ("float?" = a number or None).
_FIELD_KINDS: dict[str, str] = {
    "learning_rate": "float", "discriminator_lr_scale": "float", "weight_decay": "float", "betas": "pair",
    "warmup_fraction": "float", "min_lr_ratio": "float", "grad_clip_norm": "float?", "ema_decay": "float?",
    "standardize_features": "bool", "rrs_bn_momentum": "float?", "focal_gamma": "float", "segmentation_weight": "float",
    "reconstruction_weight": "float", "anomaly_probability": "float", "balanced_batches": "bool",
    "nonempty_masks": "bool", "mask_shape": "str", "balance_categories": "bool", "batch_size": "int",
}

PAPER = Recipe(
    name="paper",
    description="Official settings: Adam 1e-4 constant, raw features, CE + sum of MSEs, "
    "independent p=0.5 anomalies, empty masks allowed, batch 16.",
)

FAST = Recipe(
    name="fast",
    description="Same architecture, trained to converge in a CPU-sized budget: class-balanced CE, "
    "AdamW 1e-3 with warm-up and cosine decay, "
    "gradient clipping, EMA weights, RRS ranking statistics averaged over ~10 batches (momentum 0.1) "
    "instead of ~the last one, half of every batch anomalous with non-empty masks, "
    "and in a multi-class run the categories in turn.",
    optimizer="adamw",
    learning_rate=1e-3,
    discriminator_lr_scale=1.0,
    weight_decay=1e-4,
    lr_schedule="cosine",
    warmup_fraction=0.05,
    min_lr_ratio=0.01,
    grad_clip_norm=1.0,
    ema_decay=0.99,
    # Raw features, as the paper: standardising them with normal-image statistics converges faster
    # in the first 100-200 iterations but then drifts (PRO falls on both shared sets), while raw
    # features keep improving and end level or ahead at 400 and 1,200 iterations
    # (benchmarks/RESULTS.md); `standardize_features=true` remains a recipe option for short runs.
    standardize_features=False,
    rrs_bn_momentum=0.1,
    segmentation_loss="balanced_ce",
    segmentation_weight=1.0,
    reconstruction_weight=1.0,
    anomaly_probability=0.5,
    balanced_batches=True,
    nonempty_masks=True,
    # One model for several categories: without it the small category gets few updates (hazelnut_toy
    # with 28 training images beside KolektorSDD's 120: unified PRO -0.012 against per-class; in turn:
    # +0.006, KolektorSDD +0.036; benchmarks/RESULTS.md). No effect on a single-category run.
    balance_categories=True,
)

RECIPES: dict[str, Recipe] = {PAPER.name: PAPER, FAST.name: FAST}
DEFAULT_RECIPE = "fast"

# Each change of the fast recipe, as the fields that switch it back to the paper setting.
FAST_CHANGES: dict[str, tuple[str, ...]] = {
    "standardize_features": ("standardize_features",),
    "rrs_bn_momentum": ("rrs_bn_momentum",),
    "segmentation_loss": ("segmentation_loss",),
    "loss_weights": ("segmentation_weight", "reconstruction_weight"),
    "optimizer": ("optimizer", "weight_decay"),
    "learning_rate": ("learning_rate", "discriminator_lr_scale"),
    "lr_schedule": ("lr_schedule", "warmup_fraction", "min_lr_ratio"),
    "grad_clip": ("grad_clip_norm",),
    "ema": ("ema_decay",),
    "balanced_batches": ("balanced_batches", "anomaly_probability", "balance_categories"),
    "balance_categories": ("balance_categories",),
    "nonempty_masks": ("nonempty_masks",),
}


def get_recipe(name: "str | Recipe") -> Recipe:
    """The recipe called ``name``; an unknown name is a one-line InputError listing the known ones."""
    if isinstance(name, Recipe):
        return name
    key = str(name).strip().lower()
    if key in RECIPES:
        return RECIPES[key]
    variants = ablations()  # only the changes fast really makes (e.g. no fast-no-loss-weights)
    if key in variants:
        return variants[key]
    raise InputError(f"unknown recipe {name!r}; known: {', '.join(known_recipes())}")


def ablations(base: Recipe = FAST, reference: Recipe = PAPER) -> dict[str, Recipe]:
    """``fast-no-<change>`` recipes: ``base`` with one change switched back to the ``reference`` value.

    Changes whose fields already equal the reference are skipped (nothing to ablate).
    """
    out: dict[str, Recipe] = {}
    for change, fields in FAST_CHANGES.items():
        values = {f: getattr(reference, f) for f in fields}
        if all(getattr(base, f) == v for f, v in values.items()):
            continue
        name = f"{base.name}-no-{change.replace('_', '-')}"
        out[name] = base.replace(name=name, description=f"{base.name} without its change to {change}", **values)
    return out


def known_recipes() -> list[str]:
    """Names accepted by :func:`get_recipe`: the named recipes, then the ablations of ``fast``."""
    return list(RECIPES) + list(ablations())
