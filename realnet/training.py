"""Train RealNet on normal images with synthetic anomalies, with Accelerate.

One function, :func:`train`, does the whole job described in the paper (reference §7): build the
synthetic-anomaly data (``sia``), select features once with AFS on 100 % anomalous batches, train the
reconstruction networks and the discriminator, and write a ready-to-use model folder.

Differences from the official loop, on purpose:
- the checkpoint is the last one, or the best on a *validation split of training images* with fixed
  synthetic anomalies (``select="best"``); the test set is never looked at (official: best of 200
  test-set evaluations, §11.1);
- a normal-only decision threshold is calibrated on held-out normal training images and stored next
  to the weights (``thresholds.json``), so ``realnet predict`` can output masks without ground truth;
- runs resume after a kill (``resume=True``) from the latest ``checkpoints/`` state, with the same
  data order and anomalies as an uninterrupted run;
- every process fits the feature statistics and runs AFS on the same seeded data, then the main
  process's statistics and indices are broadcast to the others, so all processes train the same
  network (§11.19);
- the model card (``README.md``) states the licence inherited from the training images.

Several processes (``accelerate launch --num_processes N``): each process takes every N-th batch,
so an *epoch* (one pass over the training images) is ``len(loader)`` steps per process, an
*iteration* is one optimiser step (the same count on every process) and the batch size is per
process. A run resumes only with the number of processes it was started with.

Output folder: ``model/`` (``RealNet.save_pretrained`` + ``thresholds.json``), ``config.json`` (the
run's settings and status), ``train_log.jsonl`` (losses and validation), ``checkpoints/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler, Subset
from tqdm.auto import tqdm

from sia.errors import InputError

from .losses import realnet_loss
from .recipes import DEFAULT_RECIPE, Recipe, get_recipe

RUN_CONFIG = "config.json"
TRAIN_LOG = "train_log.jsonl"
MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
THRESHOLDS_FILE = "thresholds.json"
CHECKPOINTS_KEPT = 2

EvaluateCallback = Callable[[nn.Module, int], Optional[dict]]


@dataclass
class TrainingConfig:
    """Everything that defines a training run (saved as ``config.json`` in the output folder)."""

    data: str
    output: str
    source: str
    dataset: str = "mvtec-ad"
    categories: Sequence[str] = ()
    foreground: Optional[str] = None
    recipe: str = DEFAULT_RECIPE
    recipe_overrides: dict = field(default_factory=dict)
    backbone: Optional[str] = None
    backbone_weights: Optional[str] = None
    model_kwargs: dict = field(default_factory=dict)
    image_size: int = 256
    iterations: Optional[int] = None
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    seed: int = 100
    mixed_precision: str = "no"
    resume: bool = False
    overwrite: bool = False
    afs_batches: int = 64
    validation_fraction: float = 0.15
    validate_every: int = 0
    select: str = "last"
    checkpoint_every: int = 500
    threshold_fpr: float = 0.01
    num_workers: int = 0
    log_every: int = 10
    cpu: bool = False
    progress: bool = True
    max_train_images: Optional[int] = None
    feature_cache_mb: float = 1024.0

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["categories"] = list(self.categories)
        return data


def parse_key_values(items: Optional[Sequence[str]], what: str) -> dict:
    """``["a=1", "b=[1,2]", "c=adamw"]`` -> ``{"a": 1, "b": [1, 2], "c": "adamw"}`` (JSON values, else strings)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"{what} {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


# ------------------------------------------------------------------------------------------------
# samplers: deterministic per (seed, epoch), so a resumed run sees the same batches


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffled batches over ``size`` items; the order depends only on (seed, epoch). Keeps the last
    partial batch, like the official loader (drop_last=False)."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        self.size, self.batch_size, self.seed, self.epoch = int(size), int(batch_size), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        for start in range(0, self.size, self.batch_size):
            yield order[start : start + self.batch_size]


class BalancedBatchSampler(Sampler[list[int]]):
    """Batches with exactly ``batch_size // 2`` anomalous items and the rest normal.

    Indexes a dataset laid out as ``[normal_0..normal_{n-1}, anomalous_0..anomalous_{n-1}]``; both
    halves are shuffled independently per epoch; an epoch ends when every image has appeared once as
    an anomaly (and at least once as a normal image).
    """

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        if batch_size < 2:
            raise InputError("batch_size: balanced batches need at least 2 images per batch")
        self.size, self.batch_size, self.seed, self.epoch = int(size), int(batch_size), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.size / (self.batch_size // 2))

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        normal = torch.randperm(self.size, generator=generator).tolist()
        anomalous = (torch.randperm(self.size, generator=generator) + self.size).tolist()
        n_anomalous = self.batch_size // 2
        n_normal = self.batch_size - n_anomalous
        for b in range(len(self)):
            picks_n = [normal[(b * n_normal + i) % self.size] for i in range(n_normal)]
            picks_a = [anomalous[(b * n_anomalous + i) % self.size] for i in range(n_anomalous)]
            yield picks_n + picks_a


# ------------------------------------------------------------------------------------------------
# state that goes into every checkpoint besides model/optimizer/scheduler


class TrainingProgress:
    """Iteration counter and best validation score, checkpointed with ``register_for_checkpointing``."""

    def __init__(self) -> None:
        self.iteration = 0
        self.best_score = -math.inf
        self.best_iteration = -1

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "best_score": self.best_score, "best_iteration": self.best_iteration}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self.best_score = float(state["best_score"])
        self.best_iteration = int(state["best_iteration"])


def changing_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys that training changes: trainable parameters and the running statistics of
    norm layers that are not frozen (the RRS ranking BatchNorm, for instance).

    The frozen backbone, the AFS indices and the feature statistics never change after AFS, so
    averaging them would only cost memory and time.
    """
    keys = {name for name, p in model.named_parameters() if p.requires_grad}
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._NormBase) or not module.track_running_stats:
            continue
        own = list(module.parameters(recurse=False))
        frozen = (own and not any(p.requires_grad for p in own)) or name == "backbone" or name.startswith("backbone.")
        if not frozen:
            keys.update(f"{name}.{b}" for b in ("running_mean", "running_var") if getattr(module, b) is not None)
    return keys


class ExponentialMovingAverage:
    """EMA of the weights that training changes (see :func:`changing_state_keys`); the averaged
    weights are the ones that get saved."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.updates = 0
        keys = changing_state_keys(model)
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if k in keys and v.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        for key, value in model.state_dict().items():
            if key in self.shadow:
                self.shadow[key].lerp_(value.detach().to(self.shadow[key].dtype), 1.0 - decay)

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module):
        """Temporarily load the averaged weights into ``model``."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        model.load_state_dict(self.shadow, strict=False)
        try:
            yield model
        finally:
            model.load_state_dict(backup, strict=False)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        missing = sorted(set(self.shadow) - set(state["shadow"]))
        if missing:
            raise InputError(f"checkpoint EMA state: lacks {', '.join(missing[:3])}; it belongs to another model")
        for key in self.shadow:
            self.shadow[key].copy_(state["shadow"][key])


# ------------------------------------------------------------------------------------------------
# data


def _normal_images_only(dataset: Dataset, key_offset: int = 0) -> Dataset:
    """Wrap a split dataset so its items carry only the normal image (what ``sia`` expects) and a
    run-wide key of that image (for the clean-feature cache)."""
    return _ImageOnly(dataset, key_offset)


class _ImageOnly(Dataset):
    def __init__(self, dataset: Dataset, key_offset: int = 0) -> None:
        self.dataset = dataset
        self.key_offset = key_offset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        return {"image": item["image"] if isinstance(item, dict) else item, "image_key": self.key_offset + index}


class CleanFeatureCache:
    """Selected backbone features of the clean training images, computed once.

    The backbone is frozen and AFS/standardisation are fixed before training, so the reconstruction
    target of a normal training image never changes; caching it saves half of the backbone's work
    per step. Bounded by ``max_bytes``; images beyond the budget are recomputed every time.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.used = 0
        self.store: dict[int, list[torch.Tensor]] = {}

    @torch.no_grad()
    def features(self, model, keys: torch.Tensor, clean_images: torch.Tensor) -> list[torch.Tensor]:
        keys = [int(k) for k in keys]
        missing = [j for j, k in enumerate(keys) if k not in self.store]
        fresh: dict[int, list[torch.Tensor]] = {}
        if missing:
            computed = model.selected_features(clean_images[missing])
            for position, j in enumerate(missing):
                fresh[keys[j]] = [level[position].detach().clone() for level in computed]
                size = sum(t.numel() * t.element_size() for t in fresh[keys[j]])
                if self.used + size <= self.max_bytes:
                    self.store[keys[j]] = fresh[keys[j]]
                    self.used += size
        per_item = [self.store.get(k) or fresh[k] for k in keys]
        return [torch.stack([item[level] for item in per_item]) for level in range(len(per_item[0]))]


@dataclass
class CategoryData:
    """The normal training images of one category, split into training and held-out parts."""

    name: str
    train: Dataset
    holdout: Dataset
    synthesizer: Any


def split_holdout(size: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of ``size`` training images into (train, held-out) index lists.

    Hold out ``round(fraction * size)`` images, at least 2 when ``fraction > 0`` and the set is big
    enough to keep 2 for training; smaller sets are not split.
    """
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"validation_fraction: expected a value in [0, 1), got {fraction}")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    n_holdout = int(round(fraction * size))
    if fraction > 0:
        n_holdout = max(n_holdout, 2)
    if size - n_holdout < 2:
        n_holdout = 0
    return sorted(order[n_holdout:]), sorted(order[:n_holdout])


def load_category_data(config: TrainingConfig, recipe: Recipe) -> list[CategoryData]:
    """Read each category's training split and build its anomaly synthesizer."""
    from sia.sources import make_source
    from sia.synthesizer import AnomalySynthesizer

    from .data import load_split

    from .data import available_categories

    size = (config.image_size, config.image_size)
    names: list[Optional[str]] = list(config.categories) or [None]
    if len(names) == 1 and isinstance(names[0], str) and names[0].lower() == "all":
        names = list(available_categories(config.data, config.dataset))
        if not names:
            raise InputError(f"--data {config.data}: no categories found for dataset {config.dataset}")
    out = []
    for index, category in enumerate(names):
        # Masks are not needed for training; defective images under train/ are skipped below.
        split = load_split(config.data, dataset=config.dataset, category=category, split="train", image_size=size,
                           allow_missing_masks=True)
        indices = [i for i, label in enumerate(split.labels) if label == 0]
        if not indices:
            raise InputError(f"--data {config.data}: category {category!r} has no normal training images")
        category = category or Path(config.data).resolve().name
        if config.max_train_images is not None:
            indices = indices[: config.max_train_images]
        train_idx, holdout_idx = split_holdout(len(indices), config.validation_fraction, config.seed + index)
        base = _normal_images_only(split, key_offset=index * 10_000_000)
        preset = config.foreground or _foreground_preset(config.dataset, category)
        from sia.categories import DATASET_CATEGORIES

        known = any(category in names for names in DATASET_CATEGORIES.values())
        source = make_source(_source_spec_for(config.source, category), category=category if known else None)
        synthesizer = AnomalySynthesizer(source, category=preset, require_nonempty=recipe.nonempty_masks)
        out.append(
            CategoryData(
                name=category,
                train=Subset(base, [indices[i] for i in train_idx]),
                holdout=Subset(base, [indices[i] for i in holdout_idx]),
                synthesizer=synthesizer,
            )
        )
    return out


def _foreground_preset(dataset: str, category: str) -> str:
    """The ``sia`` foreground preset of a known category, ``"none"`` (whole image) otherwise."""
    from sia.foreground import FOREGROUND_PRESETS

    for name in (f"{dataset}/{category}", category):
        if name in FOREGROUND_PRESETS:
            return name
    return "none"


def _source_spec_for(spec: str, category: str) -> str:
    """For SIA folders holding one sub-folder per category, point at the category's sub-folder."""
    kind, _, path = spec.partition(":")
    if kind == "sia" and path and (Path(path) / category).is_dir():
        return f"sia:{Path(path) / category}"
    if not path and Path(spec).is_dir() and (Path(spec) / category).is_dir():
        return f"sia:{Path(spec) / category}"
    return spec


def build_training_dataset(categories: list[CategoryData], recipe: Recipe, seed: int, probability: Optional[float] = None):
    """The synthetic-anomaly training set and the datasets whose epoch must be advanced."""
    from sia.synthesizer import SyntheticAnomalyDataset

    if recipe.balanced_batches and probability is None:
        normal = [SyntheticAnomalyDataset(c.train, c.synthesizer, probability=0.0, seed=seed + i) for i, c in enumerate(categories)]
        anomalous = [
            SyntheticAnomalyDataset(c.train, c.synthesizer, probability=1.0, seed=seed + 7919 + i)
            for i, c in enumerate(categories)
        ]
        parts = normal + anomalous
        dataset = ConcatDataset([ConcatDataset(normal), ConcatDataset(anomalous)])
        return dataset, parts, len(dataset) // 2
    p = recipe.anomaly_probability if probability is None else probability
    parts = [SyntheticAnomalyDataset(c.train, c.synthesizer, probability=p, seed=seed + i) for i, c in enumerate(categories)]
    return ConcatDataset(parts), parts, None


def _collate(items: list[dict]) -> dict:
    """Stack tensors; keep the rest as lists (sources, paths)."""
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], (bool, int, float)):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


def _validation_set(categories: list[CategoryData], seed: int) -> Optional[dict]:
    """Held-out normal images plus one fixed synthetic anomaly of each: images, masks, labels."""
    from sia.synthesizer import SyntheticAnomalyDataset

    images, masks, labels = [], [], []
    for i, category in enumerate(categories):
        if len(category.holdout) == 0:
            continue
        anomalous = SyntheticAnomalyDataset(category.holdout, category.synthesizer, probability=1.0, seed=seed + 104729 + i)
        for j in range(len(category.holdout)):
            normal_image = category.holdout[j]["image"]
            images.append(normal_image)
            masks.append(torch.zeros_like(normal_image[:1]))
            labels.append(0)
            item = anomalous[j]
            images.append(item["image"])
            masks.append(item["mask"])
            labels.append(1 if bool(item["mask"].any()) else 0)
    if not images or len(set(labels)) < 2:
        return None
    return {"images": torch.stack(images), "masks": torch.stack(masks), "labels": torch.tensor(labels)}


# ------------------------------------------------------------------------------------------------
# model


def build_model(config: TrainingConfig, recipe: Recipe):
    """A fresh RealNet from the run's model settings (the recipe sets the training-related ones)."""
    from .model import RealNet

    kwargs = {"standardize_features": recipe.standardize_features, "rrs_bn_momentum": recipe.rrs_bn_momentum}
    kwargs.update(config.model_kwargs)
    if config.backbone is not None:
        kwargs["backbone"] = config.backbone
    if config.backbone_weights is not None:
        kwargs["backbone_weights"] = str(config.backbone_weights)
    kwargs.setdefault("image_size", config.image_size)
    _check_model_kwargs(kwargs)
    try:
        return RealNet(**kwargs)
    except InputError:
        raise
    except (TypeError, ValueError) as err:  # e.g. layers=3: a wrong type deep inside timm/torch
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"--model-option: bad value ({first})") from None


def _check_model_kwargs(kwargs: dict) -> None:
    """Unknown ``--model-option`` keys are an InputError listing the RealNet settings."""
    from .model import RealNet

    known = set(inspect.signature(RealNet.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise InputError(f"--model-option {', '.join(unknown)}: unknown RealNet setting; known: {', '.join(sorted(known))}")


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


def _make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    groups = _trainable_groups(model, recipe)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.learning_rate, betas=recipe.betas, weight_decay=recipe.weight_decay)
    return torch.optim.Adam(groups, lr=recipe.learning_rate, betas=recipe.betas, weight_decay=recipe.weight_decay)


@torch.no_grad()
def predict_tensors(model: nn.Module, images: torch.Tensor, batch_size: int = 16, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly maps (N,H,W) and image scores (N,) of a tensor of images, in eval mode."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    maps, scores = [], []
    try:
        for start in range(0, images.shape[0], batch_size):
            output = model(images[start : start + batch_size].to(device))
            maps.append(output.anomaly_map[:, 0].float().cpu())
            scores.append(output.image_score.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(maps), torch.cat(scores)


def validation_metrics(model: nn.Module, validation: dict, batch_size: int = 16) -> dict:
    """Image and pixel AUROC on the held-out images with their fixed synthetic anomalies."""
    from .metrics import image_auroc, pixel_auroc

    maps, scores = predict_tensors(model, validation["images"], batch_size)
    masks = validation["masks"][:, 0]
    image = image_auroc(scores.numpy(), validation["labels"].numpy())
    pixel = pixel_auroc(maps.numpy(), masks.numpy())
    return {"val_image_auroc": image, "val_pixel_auroc": pixel, "val_score": 0.5 * (image + pixel)}


def calibrate_thresholds(model: nn.Module, normal_images: torch.Tensor, false_positive_rate: float, batch_size: int = 16, what: str = "") -> dict:
    """Normal-only decision thresholds (no defect or ground truth needed).

    - ``image_threshold``: the ``1 - fpr`` quantile of the image scores of normal images, so about
      ``fpr`` of normal images are flagged;
    - ``pixel_threshold``: the ``1 - fpr`` quantile of each normal image's *maximum* pixel score, so
      the predicted mask of about ``1 - fpr`` of normal images is empty.
    With few images the quantile sits at (or interpolates towards) the largest normal score.
    """
    from .metrics import quantile_threshold

    maps, scores = predict_tensors(model, normal_images, batch_size)
    q = 1.0 - false_positive_rate
    return {
        "image_threshold": quantile_threshold(scores.numpy(), q),
        "pixel_threshold": quantile_threshold(maps.flatten(1).max(dim=1).values.numpy(), q),
        "false_positive_rate": false_positive_rate,
        "rule": "1-fpr quantile of normal image scores / of per-image max pixel scores",
        "calibration_images": int(normal_images.shape[0]),
        "calibrated_on": what,
    }


# ------------------------------------------------------------------------------------------------
# output folder handling


def _atomic_write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _prepare_output(config: TrainingConfig) -> TrainingConfig:
    """Refuse to clobber results; on resume, continue with the settings stored in the folder."""
    output = Path(config.output)
    run_file = output / RUN_CONFIG
    if output.exists() and not output.is_dir():
        raise InputError(f"--output {output}: exists and is not a folder")
    if run_file.is_file():
        stored = json.loads(run_file.read_text())
        status = stored.get("status", "running")
        if config.overwrite:
            for name in (MODEL_DIR, CHECKPOINT_DIR, "best"):
                shutil.rmtree(output / name, ignore_errors=True)
            for name in (RUN_CONFIG, TRAIN_LOG):
                (output / name).unlink(missing_ok=True)
        elif config.resume:
            if status == "finished":
                raise InputError(f"--output {output}: this run already finished; pass --overwrite to train again")
            settings = {k: v for k, v in stored["training"].items() if k in {f.name for f in dataclasses.fields(TrainingConfig)}}
            settings.update(resume=True, overwrite=False, progress=config.progress, output=str(output))
            return TrainingConfig(**settings)
        else:
            hint = "--overwrite to start again" if status == "finished" else "--resume to continue it or --overwrite to start again"
            raise InputError(f"--output {output}: holds a {status} training run; pass {hint}")
    elif output.is_dir() and any(output.iterdir()) and not config.overwrite:
        if (output / MODEL_DIR).exists() or (output / CHECKPOINT_DIR).exists():
            raise InputError(f"--output {output}: not empty and not a training run folder; pass --overwrite or choose another folder")
    return config


def _latest_checkpoint(output: Path) -> Optional[Path]:
    folder = output / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("iteration_") and (p / "complete").is_file())
    return done[-1] if done else None


def _save_checkpoint(accelerator, output: Path, iteration: int) -> None:
    """``accelerator.save_state`` into a temporary folder, renamed when complete; keep the last few."""
    folder = output / CHECKPOINT_DIR
    final = folder / f"iteration_{iteration:08d}"
    tmp = folder / f".tmp_iteration_{iteration:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "complete").write_text(str(iteration))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        finished = sorted(p for p in folder.iterdir() if p.name.startswith("iteration_"))
        for old in finished[:-CHECKPOINTS_KEPT]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _append_log(path: Path, record: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------------
# the training run


def total_iterations(config: TrainingConfig, recipe: Recipe, batches_per_epoch: int) -> int:
    """Iterations of the run: ``iterations`` if given, else ``epochs`` (default 1000, the paper's) passes."""
    if config.iterations is not None:
        if config.iterations < 1:
            raise InputError(f"--iterations: expected a positive number, got {config.iterations}")
        return int(config.iterations)
    epochs = 1000 if config.epochs is None else int(config.epochs)
    if epochs < 1:
        raise InputError(f"--epochs: expected a positive number, got {epochs}")
    return epochs * batches_per_epoch


def _validate_config(config: TrainingConfig) -> None:
    if config.batch_size is not None and config.batch_size < 1:
        raise InputError(f"--batch-size: expected a positive number, got {config.batch_size}")
    if config.select not in ("last", "best"):
        raise InputError(f"--select: expected 'last' or 'best', got {config.select!r}")
    if config.mixed_precision not in ("no", "fp16", "bf16"):
        raise InputError(f"--mixed-precision: expected no, fp16 or bf16, got {config.mixed_precision!r}")
    if config.mixed_precision == "fp16" and config.cpu:
        raise InputError("--mixed-precision fp16: needs a GPU; use bf16 or no with --cpu")
    if config.afs_batches < 1:
        raise InputError(f"--afs-batches: expected a positive number, got {config.afs_batches}")
    if config.image_size < 32 or config.image_size % 32:
        raise InputError(f"--image-size: expected a multiple of 32 (>= 32), got {config.image_size}")
    if not 0.0 < config.threshold_fpr < 1.0:
        raise InputError(f"--threshold-fpr: expected a value in (0, 1), got {config.threshold_fpr}")
    if not Path(config.data).is_dir():
        raise InputError(f"--data {config.data}: no such folder")
    _check_model_kwargs(config.model_kwargs)


def _resolve_recipe(config: TrainingConfig) -> Recipe:
    """The run's recipe with its overrides, checked (bad names and values are InputErrors)."""
    _validate_config(config)
    recipe = get_recipe(config.recipe)
    if config.recipe_overrides:
        recipe = recipe.replace(**config.recipe_overrides)
    if config.batch_size is not None:
        recipe = recipe.replace(batch_size=int(config.batch_size))
    return recipe


def train(
    config: TrainingConfig,
    evaluate: Optional[EvaluateCallback] = None,
    evaluate_every: int = 0,
) -> Path:
    """Run (or resume) a training run; returns the folder of the saved model.

    ``evaluate(model, iteration)`` is an optional hook for learning curves (e.g. the benchmark's
    test-set curve); its results are logged but never used to choose the saved model.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if not config.resume:
        _resolve_recipe(config)  # bad settings fail before --overwrite deletes anything
    config = _prepare_output(config)
    recipe = _resolve_recipe(config)
    output = Path(config.output)

    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=config.cpu)
    set_seed(config.seed)
    if config.resume:
        _check_same_processes(output, accelerator.num_processes)

    categories = load_category_data(config, recipe)
    if sum(len(c.train) for c in categories) == 0:
        raise InputError(f"--data {config.data}: the training set is empty")
    model = build_model(config, recipe)

    dataset, epoch_parts, balanced_size = build_training_dataset(categories, recipe, config.seed)
    if balanced_size is not None:
        batch_sampler = BalancedBatchSampler(balanced_size, recipe.batch_size, config.seed)
    else:
        batch_sampler = EpochBatchSampler(len(dataset), recipe.batch_size, config.seed)
    loader = DataLoader(dataset, batch_sampler=batch_sampler, num_workers=config.num_workers, collate_fn=_collate)
    # Sharded first: with N processes each one gets every N-th batch, so this process's epoch is
    # len(loader) steps, not len(batch_sampler).
    loader = accelerator.prepare(loader)
    batches_per_epoch = len(loader)
    total = total_iterations(config, recipe, batches_per_epoch)
    validation = _validation_set(categories, config.seed)
    if config.select == "best" and validation is None:
        raise InputError("--select best: needs held-out training images (raise --validation-fraction or use --select last)")

    resume_from = _latest_checkpoint(output) if config.resume else None
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        if resume_from is None:
            (output / TRAIN_LOG).unlink(missing_ok=True)
        _atomic_write_json(output / RUN_CONFIG, _run_record(config, recipe, "running", total, accelerator.num_processes))
    accelerator.wait_for_everyone()

    model.to(accelerator.device)
    if resume_from is None:
        _fit_statistics_and_select(model, categories, recipe, config, accelerator)

    optimizer = _make_optimizer(model, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: recipe.learning_rate_factor(it, total))
    # The scheduler stays unprepared: Accelerate would step it once per process and iteration.
    model, optimizer = accelerator.prepare(model, optimizer)
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(progress, scheduler)
    unwrapped = accelerator.unwrap_model(model)
    ema = ExponentialMovingAverage(unwrapped, recipe.ema_decay) if recipe.ema_decay else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        accelerator.print(f"resumed from {resume_from} at iteration {progress.iteration}")
        if accelerator.is_main_process:
            _trim_log(output / TRAIN_LOG, progress.iteration)
        accelerator.wait_for_everyone()

    cache = CleanFeatureCache(int(config.feature_cache_mb * 2**20)) if config.feature_cache_mb > 0 else None
    best_dir = output / "best"
    log_path = output / TRAIN_LOG
    bar = tqdm(total=total, initial=progress.iteration, desc="train", disable=not (config.progress and accelerator.is_main_process))
    started = time.perf_counter()
    model.train()
    while progress.iteration < total:
        epoch, skip = divmod(progress.iteration, batches_per_epoch)
        for part in epoch_parts:
            part.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch_loader.set_epoch(epoch)
        batch_sampler.set_epoch(epoch)
        start_iteration = progress.iteration
        for batch in epoch_loader:
            losses = _training_step(model, batch, optimizer, scheduler, recipe, accelerator, cache)
            if ema is not None:
                ema.update(unwrapped)
            progress.iteration += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses['loss']:.4f}", seg=f"{losses['segmentation']:.4f}", rec=f"{losses['reconstruction']:.4f}")
            it = progress.iteration
            if accelerator.is_main_process and (it % max(config.log_every, 1) == 0 or it == total):
                record = {"iteration": it, "epoch": epoch, **losses, "lr": scheduler.get_last_lr()[0], "seconds": round(time.perf_counter() - started, 3)}
                _append_log(log_path, record)
            want_val = validation is not None and ((config.validate_every and it % config.validate_every == 0) or (config.select == "best" and it == total))
            want_eval = evaluate is not None and evaluate_every and (it % evaluate_every == 0 or it == total)
            if want_val or want_eval:
                with _weights_to_save(unwrapped, ema):
                    record = {"iteration": it}
                    if want_val:
                        record.update(validation_metrics(unwrapped, validation, recipe.batch_size))
                        if config.select == "best" and record["val_score"] >= progress.best_score:
                            progress.best_score, progress.best_iteration = record["val_score"], it
                            if accelerator.is_main_process:
                                _save_model_atomically(unwrapped, best_dir)
                    if want_eval and accelerator.is_main_process:
                        record.update(evaluate(unwrapped, it) or {})
                model.train()
                if accelerator.is_main_process:
                    _append_log(log_path, record)
            if config.checkpoint_every and it % config.checkpoint_every == 0 and it < total:
                _save_checkpoint(accelerator, output, it)
            if it >= total:
                break
        if progress.iteration == start_iteration:
            raise RuntimeError(f"epoch {epoch}: the data loader yielded no batch (skip {skip} of {batches_per_epoch})")
    bar.close()
    accelerator.wait_for_everyone()

    model_dir = output / MODEL_DIR
    if accelerator.is_main_process:
        with _weights_to_save(unwrapped, ema):
            if config.select == "best" and best_dir.is_dir():
                final = type(unwrapped).from_pretrained(str(best_dir)).to(accelerator.device)
            else:
                final = unwrapped
            _save_model_atomically(final, model_dir)
            thresholds = _calibrate(final, categories, config, recipe)
            selected = progress.best_iteration if config.select == "best" else progress.iteration
            thresholds["selected"] = {"rule": config.select, "iteration": selected}
            _atomic_write_json(model_dir / THRESHOLDS_FILE, thresholds)
            _write_card(model_dir, final, config, recipe, categories, selected, progress, accelerator.num_processes)
        _atomic_write_json(output / RUN_CONFIG, _run_record(config, recipe, "finished", total, accelerator.num_processes))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return model_dir


@contextlib.contextmanager
def _weights_to_save(model: nn.Module, ema: Optional[ExponentialMovingAverage]):
    if ema is None:
        yield model
    else:
        with ema.applied_to(model):
            yield model


def _save_model_atomically(model: nn.Module, folder: Path) -> None:
    tmp = folder.with_name(f".tmp_{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _calibrate(model: nn.Module, categories: list[CategoryData], config: TrainingConfig, recipe: Recipe) -> dict:
    holdout = [c.holdout[j]["image"] for c in categories for j in range(len(c.holdout))]
    what = "held-out normal training images (never used for training)"
    if not holdout:
        holdout = [c.train[j]["image"] for c in categories for j in range(len(c.train))]
        what = "normal training images (no held-out split; thresholds are optimistic)"
    return calibrate_thresholds(model, torch.stack(holdout), config.threshold_fpr, recipe.batch_size, what)


def _run_record(config: TrainingConfig, recipe: Recipe, status: str, total: int, num_processes: int = 1) -> dict:
    return {"status": status, "total_iterations": total, "num_processes": num_processes,
            "training": config.to_dict(), "recipe": recipe.to_dict()}


def _check_same_processes(output: Path, num_processes: int) -> None:
    """A checkpoint's iteration counts and data shards only make sense with the same process count."""
    stored = json.loads((output / RUN_CONFIG).read_text()).get("num_processes", 1)
    if int(stored) != num_processes:
        raise InputError(f"--resume: the run in {output} was started with {stored} process(es), now {num_processes}; "
                         "launch it with the same number")


def _trim_log(path: Path, iteration: int) -> None:
    """Drop log records written after the checkpoint being resumed (they will be written again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("iteration", 0) <= iteration]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _write_card(model_dir: Path, model: nn.Module, config: TrainingConfig, recipe: Recipe,
                categories: list[CategoryData], selected: int, progress: TrainingProgress, num_processes: int) -> None:
    """Model card with the licence of the training images (the mixin's default says MIT)."""
    from sia.cards import SOURCE_DATASETS, write_model_card
    from sia.categories import DATASET_ALIASES

    dataset = DATASET_ALIASES.get(config.dataset.strip().lower())
    names = [c.name for c in categories]
    training = {
        "recipe": recipe.name, "iterations": progress.iteration, "saved weights": f"{config.select} (iteration {selected})",
        "batch size per process": recipe.batch_size, "processes": num_processes, "image size": config.image_size,
        "anomaly source": config.source, "AFS batches": config.afs_batches, "seed": config.seed,
        "training images": sum(len(c.train) for c in categories),
        "held-out normal images": sum(len(c.holdout) for c in categories),
    }
    if config.select == "best" and math.isfinite(progress.best_score):
        training["validation score (held-out normal images + synthetic anomalies)"] = progress.best_score
    facts: dict[str, Any] = {
        "dataset": dataset if dataset in SOURCE_DATASETS else None,
        "category": names[0] if len(names) == 1 else ", ".join(names),
        "backbone": getattr(getattr(model, "backbone", None), "name", None) or config.backbone or "wide_resnet50_2",
        "image_size": config.image_size, "training": training,
        "source": f"trained with `realnet train` on the normal training images of {', '.join(names)}",
    }
    write_model_card(model_dir, "realnet", **facts)


def _batches(dataset: Dataset, batch_size: int, seed: int, limit: Optional[int] = None,
             parts: Sequence[Any] = ()) -> Iterator[dict]:
    """Shuffled, collated batches of a dataset; ``limit`` batches in all (wrapping around).

    Each wrap is a new epoch: the order changes and so do the synthetic anomalies of ``parts``
    (the datasets whose ``set_epoch`` draws fresh ones).
    """
    produced, epoch = 0, 0
    while True:
        for part in parts:
            part.set_epoch(epoch)
        for indices in EpochBatchSampler(len(dataset), batch_size, seed + epoch):
            if limit is not None and produced >= limit:
                return
            yield _collate([dataset[i] for i in indices])
            produced += 1
        epoch += 1
        if limit is None:
            return


def _fit_statistics_and_select(model, categories: list[CategoryData], recipe: Recipe, config: TrainingConfig, accelerator) -> None:
    """Feature statistics (fast recipe) from normal training images, then AFS on 100 % anomalies."""
    device = accelerator.device
    train_normals = ConcatDataset([c.train for c in categories])
    if recipe.standardize_features:
        batches = (b["image"].to(device) for b in _batches(train_normals, recipe.batch_size, config.seed))
        model.fit_feature_statistics(batches, progress=config.progress and accelerator.is_main_process)
    anomalous, parts, _ = build_training_dataset(categories, recipe, config.seed + 31, probability=1.0)
    afs_batches = (
        {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        for batch in _batches(anomalous, recipe.batch_size, config.seed + 31, limit=config.afs_batches, parts=parts)
    )
    model.select_features(afs_batches, num_batches=config.afs_batches, progress=config.progress and accelerator.is_main_process)
    _broadcast_fitted_buffers(model, accelerator)


def _broadcast_fitted_buffers(model: nn.Module, accelerator) -> None:
    """Make every process use the main process's feature statistics and AFS indices.

    All processes compute them from the same seeded data, but floating-point reductions may differ
    between devices; one tie broken differently would give the processes different networks.
    """
    if accelerator.num_processes < 2:
        return
    import torch.distributed as dist

    state = model.state_dict()  # tensors share the buffers' storage: broadcast fills them in place
    for name in sorted(state):
        if name.startswith(("selector.indices_", "standardizer.mean_", "standardizer.std_")):
            dist.broadcast(state[name], src=0)


def _training_step(model, batch: dict, optimizer, scheduler, recipe: Recipe, accelerator, cache: Optional[CleanFeatureCache] = None) -> dict:
    images, clean, masks = batch["image"], batch["clean_image"], batch["mask"]
    with accelerator.autocast():
        if cache is not None and "image_key" in batch:
            output = model(images)
            clean_features = cache.features(accelerator.unwrap_model(model), batch["image_key"], clean)
        else:
            output = model(images, clean_images=clean)
            clean_features = output.clean_features
    losses = realnet_loss(
        output.logits,
        masks,
        output.reconstructions,
        clean_features,
        segmentation=recipe.segmentation_loss,
        segmentation_weight=recipe.segmentation_weight,
        reconstruction_weight=recipe.reconstruction_weight,
        focal_gamma=recipe.focal_gamma,
    )
    accelerator.backward(losses["loss"])
    if recipe.grad_clip_norm is not None and accelerator.sync_gradients:
        accelerator.clip_grad_norm_(model.parameters(), recipe.grad_clip_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {k: float(v.detach()) for k, v in losses.items()}
