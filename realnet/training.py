"""Train RealNet on normal images with synthetic anomalies, with Accelerate.

One function, :func:`train`, does the whole job described in the paper: build the
synthetic-anomaly data (``sia``), select features once with AFS on 100 % anomalous batches, train the
reconstruction networks and the discriminator, and write a ready-to-use model folder.

Differences from the official loop, on purpose:
- the checkpoint is the last one, or the best on a *validation split of training images* with fixed
  synthetic anomalies (``select="best"``); the test set is never looked at (official: best of 200
  test-set evaluations);
- a normal-only decision threshold is calibrated on held-out normal training images and stored next
  to the weights (``thresholds.json``), so ``realnet predict`` can output masks without ground truth;
- runs resume after a kill (``resume=True``) from the latest ``checkpoints/`` state, with the same
  data order and anomalies as an uninterrupted run;
- every process fits the feature statistics and runs AFS on the same seeded data, then the main
  process's statistics and indices are broadcast to the others, so all processes train the same
  network;
- the model card (``README.md``) states the licence inherited from the training images.

Several processes (``accelerate launch --num_processes N``): each process takes every N-th batch,
so an *epoch* (one pass over the training images) is ``len(loader)`` steps per process, an
*iteration* is one optimiser step (the same count on every process) and the batch size is per
process. A run resumes only with the number of processes it was started with.

Output folder: ``model/`` (``RealNet.save_pretrained`` + ``thresholds.json``), ``config.json`` (the
run's settings and status), ``train_log.jsonl`` (losses and validation), ``checkpoints/`` (the
checkpoints of ``sia.runs``: safetensors and JSON only, so resuming never unpickles anything),
``best/`` (with ``select="best"``) and ``.run-outputs.json``: those entries, recorded before any is
written, which are all that ``overwrite=True`` deletes (the user's own files there stay).

The loop is :func:`train`, top to bottom; the data (``training_data``, ``batching``), the clean-feature
cache, validation, threshold calibration and the model card live in their own modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader
from tqdm.auto import tqdm

from sia import runs
from sia.errors import InputError
from sia.paths import separate_output
from sia.runs import (CHECKPOINT_DIR, RunLayout, append_jsonl, atomic_folder, check_mixed_precision,
                      check_unrecorded_outputs, clear_recorded_outputs, load_checkpoint, make_accelerator,
                      open_run_folder, record_run_outputs, resumable_checkpoint, save_checkpoint, trim_log,
                      write_json_atomic)

from .batching import BalancedBatchSampler, EpochBatchSampler, collate, seeded_batches
from .calibration import calibrate_on_held_out_images, calibrate_thresholds
from .construction import build_model, check_model_kwargs, make_optimizer
from .data import check_mask_threshold
from .feature_cache import CleanFeatureCache
from .image_size import check_stride, parse_image_size
from .losses import realnet_loss
from .options import parse_key_values
from .recipes import DEFAULT_RECIPE, Recipe, get_recipe
from .training_card import write_training_card
from .training_data import CategoryData, build_training_dataset, load_category_data, split_holdout, validation_set
from .validation import predict_tensors, validation_metrics

RUN_CONFIG = "config.json"
TRAIN_LOG = "train_log.jsonl"
MODEL_DIR = "model"
THRESHOLDS_FILE = "thresholds.json"
CHECKPOINTS_KEPT = 2
BEST_DIR = "best"
RUN_LAYOUT = RunLayout(record=RUN_CONFIG, outputs=(MODEL_DIR, CHECKPOINT_DIR, BEST_DIR, TRAIN_LOG, RUN_CONFIG),
                       results=(MODEL_DIR, CHECKPOINT_DIR, BEST_DIR))

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
    image_size: int | str | Sequence[int] = 256  # 256, "640x256" or (height, width)
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
    mask_threshold: float = 0

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["categories"] = list(self.categories)
        data["image_size"] = list(self.size)
        return data

    @property
    def size(self) -> tuple[int, int]:
        """``image_size`` as (height, width)."""
        return parse_image_size(self.image_size, "`image_size`")


# ------------------------------------------------------------------------------------------------
# state that goes into every checkpoint besides model/optimizer/scheduler/EMA


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


class ExponentialMovingAverage(runs.ExponentialMovingAverage):
    """EMA of the weights that training changes (see :func:`changing_state_keys`), with a warm-up
    of the decay; the averaged weights are the ones that get saved."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model, decay, averaged=changing_state_keys(model), warmup=True)


# ------------------------------------------------------------------------------------------------
# settings and the output folder


def total_iterations(config: TrainingConfig, recipe: Recipe, batches_per_epoch: int) -> int:
    """Iterations of the run: ``iterations`` if given, else ``epochs`` (default 1000, the paper's) passes."""
    if config.iterations is not None:
        if config.iterations < 1:
            raise InputError(f"`iterations`: expected a positive number, got {config.iterations}")
        return int(config.iterations)
    epochs = 1000 if config.epochs is None else int(config.epochs)
    if epochs < 1:
        raise InputError(f"`epochs`: expected a positive number, got {epochs}")
    return epochs * batches_per_epoch


def _validate_config(config: TrainingConfig) -> None:
    if config.batch_size is not None and config.batch_size < 1:
        raise InputError(f"`batch_size`: expected a positive number, got {config.batch_size}")
    if config.select not in ("last", "best"):
        raise InputError(f"`select`: expected 'last' or 'best', got {config.select!r}")
    check_mixed_precision(config.mixed_precision, config.cpu)
    if config.afs_batches < 1:
        raise InputError(f"`afs_batches`: expected a positive number, got {config.afs_batches}")
    _check_image_size(config)
    for name, value in (("num_workers", config.num_workers), ("checkpoint_every", config.checkpoint_every),
                        ("validate_every", config.validate_every)):
        if value < 0:  # `it % -1 == 0` would act at every iteration
            raise InputError(f"`{name}`: expected 0 or a positive number, got {value}")
    if not 0.0 <= config.validation_fraction < 1.0:
        raise InputError(f"`validation_fraction`: expected a value in [0, 1), got {config.validation_fraction}")
    if not 0.0 < config.threshold_fpr < 1.0:
        raise InputError(f"`threshold_fpr`: expected a value in (0, 1), got {config.threshold_fpr}")
    if not Path(config.data).is_dir():
        raise InputError(f"`data` {config.data}: no such folder")
    check_mask_threshold(config.mask_threshold)
    separate_output(config.output, _input_paths(config), "`output`")
    check_model_kwargs(config.model_kwargs)


def _check_image_size(config: TrainingConfig) -> None:
    """``--image-size`` parses and fits the backbone's stride (checked on a weightless copy)."""
    from .backbone import DEFAULT_BACKBONE, DEFAULT_LAYERS, feature_strides

    backbone = config.backbone or config.model_kwargs.get("backbone") or DEFAULT_BACKBONE
    layers = config.model_kwargs.get("layers") or DEFAULT_LAYERS
    stride = max(feature_strides(backbone, layers))
    check_stride(config.size, stride, "`image_size`", f"backbone {backbone} at layers {list(layers)}")


def _input_paths(config: TrainingConfig) -> list[Path]:
    """Files and folders a run reads: its output must neither be, hold nor lie inside one of them."""
    kind, sep, rest = config.source.partition(":")
    source = rest if sep and kind.strip().lower() in ("sia", "dtd") else config.source
    candidates = [config.data, source, config.backbone_weights]
    return [Path(c) for c in candidates if c and Path(c).exists()]


def _resolve_recipe(config: TrainingConfig) -> Recipe:
    """The run's recipe with its overrides, checked (bad names and values are InputErrors)."""
    _validate_config(config)
    recipe = get_recipe(config.recipe)
    if config.recipe_overrides:
        recipe = recipe.replace(**config.recipe_overrides)
    if config.batch_size is not None:
        recipe = recipe.replace(batch_size=int(config.batch_size))
    return recipe


def planned_outputs(config: TrainingConfig) -> list[str]:
    """The entries a run writes at the top of its output folder, given its settings."""
    planned = [RUN_CONFIG, TRAIN_LOG, MODEL_DIR]
    if config.checkpoint_every:
        planned.append(CHECKPOINT_DIR)
    if config.select == "best":
        planned.append(BEST_DIR)
    return planned


def _prepare_output(config: TrainingConfig) -> tuple[TrainingConfig, dict | None]:
    """Refuse to clobber results; on resume, continue with the settings stored in the folder (and
    return the recipe the run recorded, None for a new run)."""
    output = Path(config.output)
    stored = open_run_folder(output, RUN_LAYOUT, resume=config.resume, overwrite=config.overwrite, inputs=[config.data])
    if stored is None:
        check_unrecorded_outputs(output, planned_outputs(config))
        return config, None
    if stored.get("status") == "finished":
        raise InputError(f"`output` {output}: this run already finished; pass `overwrite=True` to train again")
    known = {f.name for f in dataclasses.fields(TrainingConfig)}
    settings = stored.get("training")
    if not isinstance(settings, dict) or not {"data", "source"} <= set(settings):
        raise InputError(f"{output / RUN_CONFIG}: holds no training settings to resume; fix or delete it")
    settings = {k: v for k, v in settings.items() if k in known}
    settings.update(resume=True, overwrite=False, progress=config.progress, output=str(output))
    try:
        resumed = TrainingConfig(**settings)
    except TypeError as err:
        raise InputError(f"{output / RUN_CONFIG}: unusable training settings ({err})") from None
    recorded = stored.get("recipe")
    return resumed, recorded if isinstance(recorded, dict) else None


def _recorded_recipe(config: TrainingConfig, recorded: dict) -> Recipe:
    """The recipe a resumed run started with, field by field: a later change of the named recipe's
    defaults must not switch a run half-way. Fields added since it started take their defaults."""
    _validate_config(config)
    known = {f.name for f in dataclasses.fields(Recipe)}
    try:
        return Recipe(**{k: v for k, v in recorded.items() if k in known})
    except TypeError as err:
        raise InputError(f"{Path(config.output) / RUN_CONFIG}: unusable recorded recipe ({err})") from None


def _open_run(config: TrainingConfig) -> tuple[TrainingConfig, Recipe]:
    """The run's settings and recipe (the recorded ones on resume), all checked before anything is written."""
    if not config.resume:
        _resolve_recipe(config)  # bad settings fail before --overwrite deletes anything
    config, recorded = _prepare_output(config)
    if recorded is not None:
        return config, _recorded_recipe(config, recorded)
    return config, _resolve_recipe(config)


def _run_record(config: TrainingConfig, recipe: Recipe, status: str, total: int, num_processes: int = 1) -> dict:
    return {"status": status, "total_iterations": total, "num_processes": num_processes,
            "training": config.to_dict(), "recipe": recipe.to_dict()}


def _start_run_folder(config: TrainingConfig, recipe: Recipe, accelerator, total: int) -> None:
    """Clear an overwritten (or never checkpointed) run, only what it recorded writing, then record
    what this one will write and mark it as running."""
    output = Path(config.output)
    if accelerator.is_main_process:
        if not config.resume:
            clear_recorded_outputs(output)
        output.mkdir(parents=True, exist_ok=True)
        if not config.resume:
            record_run_outputs(output, planned_outputs(config), "realnet train")
        write_json_atomic(output / RUN_CONFIG, _run_record(config, recipe, "running", total, accelerator.num_processes))
    accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------------------
# feature statistics and AFS (once, before training)


def _fit_statistics_and_select(model, categories: list[CategoryData], recipe: Recipe, config: TrainingConfig, accelerator) -> None:
    """Feature statistics (fast recipe) from normal training images, then AFS on 100 % anomalies."""
    device = accelerator.device
    hide = not (config.progress and accelerator.is_main_process)
    train_normals = ConcatDataset([c.train for c in categories])
    if recipe.standardize_features:
        batches = (b["image"].to(device) for b in seeded_batches(train_normals, recipe.batch_size, config.seed))
        with tqdm(desc="feature statistics", disable=hide) as bar:
            model.fit_feature_statistics(batches, on_batch=bar.update)
    anomalous, parts, _ = build_training_dataset(categories, recipe, config.seed + 31, probability=1.0)
    afs_batches = (
        {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        for batch in seeded_batches(anomalous, recipe.batch_size, config.seed + 31, limit=config.afs_batches, parts=parts)
    )
    with tqdm(total=config.afs_batches, desc="AFS", disable=hide) as bar:
        model.select_features(afs_batches, num_batches=config.afs_batches, on_batch=bar.update)
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


# ------------------------------------------------------------------------------------------------
# the training run


@dataclass
class _Run:
    """Everything the loop works with, built once per run (fresh or resumed)."""

    config: TrainingConfig
    recipe: Recipe
    accelerator: Any
    categories: list[CategoryData]
    model: Any
    optimizer: Any
    scheduler: Any
    ema: Optional[ExponentialMovingAverage]
    loader: Any
    samplers: list[Any]
    total: int
    validation: Optional[dict]
    cache: Optional[CleanFeatureCache]
    progress: TrainingProgress = field(default_factory=lambda: TrainingProgress())
    started: float = field(default_factory=time.perf_counter)

    @property
    def output(self) -> Path:
        return Path(self.config.output)

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def checkpoint_objects(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer, "scheduler": self.scheduler, "ema": self.ema, "scaler": self.accelerator.scaler}


def _training_loader(categories: list[CategoryData], recipe: Recipe, config: TrainingConfig, accelerator):
    """The sharded loader of the synthetic-anomaly training set and everything whose epoch it sets."""
    dataset, epoch_parts, balanced_size = build_training_dataset(categories, recipe, config.seed)
    if balanced_size is not None:
        groups = [len(c.train) for c in categories] if recipe.balance_categories else None
        batch_sampler = BalancedBatchSampler(balanced_size, recipe.batch_size, config.seed, groups)
    else:
        batch_sampler = EpochBatchSampler(len(dataset), recipe.batch_size, config.seed)
    loader = DataLoader(dataset, batch_sampler=batch_sampler, num_workers=config.num_workers, collate_fn=collate)
    # Sharded first: with N processes each one gets every N-th batch, so this process's epoch is
    # len(loader) steps, not len(batch_sampler).
    return accelerator.prepare(loader), [*epoch_parts, batch_sampler]


def _build_run(config: TrainingConfig, recipe: Recipe, accelerator, categories: list[CategoryData],
               resume_from: Optional[Path]) -> _Run:
    """Model (fitted or restored), optimiser, schedule, EMA and data of the run."""
    model = build_model(config, recipe)
    loader, samplers = _training_loader(categories, recipe, config, accelerator)
    total = total_iterations(config, recipe, len(loader))
    validation = validation_set(categories, config.seed)
    if config.select == "best" and validation is None:
        raise InputError("`select='best'`: needs held-out training images (raise `validation_fraction` or use `select='last'`)")
    _start_run_folder(config, recipe, accelerator, total)
    model.to(accelerator.device)
    if resume_from is None:
        _fit_statistics_and_select(model, categories, recipe, config, accelerator)
    optimizer = make_optimizer(model, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: recipe.learning_rate_factor(it, total))
    # The scheduler stays unprepared: Accelerate would step it once per process and iteration.
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = ExponentialMovingAverage(accelerator.unwrap_model(model), recipe.ema_decay) if recipe.ema_decay else None
    run = _Run(config, recipe, accelerator, categories, model, optimizer, scheduler, ema, loader, samplers, total,
               validation, cache=None)
    if resume_from is not None:
        run.progress.load_state_dict(load_checkpoint(accelerator, resume_from, model, run.checkpoint_objects()))
        accelerator.print(f"resumed from {resume_from} at iteration {run.progress.iteration}")
    if config.resume and accelerator.is_main_process:
        trim_log(run.output / TRAIN_LOG, run.progress.iteration, key="iteration")
    run.cache = _filled_feature_cache(config, recipe, accelerator, categories, model)  # after AFS or its restore
    accelerator.wait_for_everyone()
    return run


def _filled_feature_cache(config: TrainingConfig, recipe: Recipe, accelerator, categories: list[CategoryData],
                          model) -> Optional[CleanFeatureCache]:
    """The clean-feature cache, filled in a fixed order so that fresh and resumed runs hold the same one."""
    from sia.synthesizer import SyntheticAnomalyDataset

    if config.feature_cache_mb <= 0:
        return None
    cache = CleanFeatureCache(int(config.feature_cache_mb * 2**20))
    # probability 0: exactly the clean images (and keys) the training batches carry, without anomalies
    clean = ConcatDataset([SyntheticAnomalyDataset(c.train, c.synthesizer, probability=0.0, seed=0) for c in categories])
    loader = DataLoader(clean, batch_size=recipe.batch_size, shuffle=False, num_workers=config.num_workers, collate_fn=collate)
    batches = ((b["image_key"], b["clean_image"].to(accelerator.device)) for b in
               tqdm(loader, desc="clean features", leave=False, disable=not (config.progress and accelerator.is_main_process)))
    model.train()
    with accelerator.autocast():
        cache.fill(accelerator.unwrap_model(model), batches)
    return cache


def train(
    config: TrainingConfig,
    evaluate: Optional[EvaluateCallback] = None,
    evaluate_every: int = 0,
) -> Path:
    """Run (or resume) a training run; returns the folder of the saved model.

    ``evaluate(model, iteration)`` is an optional hook for learning curves (e.g. the benchmark's
    test-set curve); its results are logged but never used to choose the saved model.
    """
    from accelerate.utils import set_seed

    config, recipe = _open_run(config)
    accelerator = make_accelerator(config.mixed_precision, config.cpu)
    set_seed(config.seed)
    resume_from = resumable_checkpoint(config.output, accelerator.num_processes) if config.resume else None
    categories = load_category_data(config, recipe)
    if sum(len(c.train) for c in categories) == 0:
        raise InputError(f"`data` {config.data}: the training set is empty")
    run = _build_run(config, recipe, accelerator, categories, resume_from)

    bar = tqdm(total=run.total, initial=run.progress.iteration, desc="train",
               disable=not (config.progress and accelerator.is_main_process))
    run.model.train()
    while run.progress.iteration < run.total:
        epoch, skip = divmod(run.progress.iteration, len(run.loader))
        for part in run.samplers:
            part.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(run.loader, skip) if skip else run.loader
        epoch_loader.set_epoch(epoch)
        start_iteration = run.progress.iteration
        for batch in epoch_loader:
            losses = _training_step(run.model, batch, run.optimizer, run.scheduler, recipe, accelerator, run.cache)
            if run.ema is not None:
                run.ema.update(run.unwrapped)
            run.progress.iteration += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses['loss']:.4f}", seg=f"{losses['segmentation']:.4f}", rec=f"{losses['reconstruction']:.4f}")
            _after_iteration(run, epoch, losses, evaluate, evaluate_every)
            if run.progress.iteration >= run.total:
                break
        if run.progress.iteration == start_iteration:
            raise RuntimeError(f"epoch {epoch}: the data loader yielded no batch (skip {skip} of {len(run.loader)})")
    bar.close()
    accelerator.wait_for_everyone()
    return _finish(run)


def _after_iteration(run: _Run, epoch: int, losses: dict, evaluate: Optional[EvaluateCallback], evaluate_every: int) -> None:
    """Log, validate / evaluate and checkpoint, each when its period says so."""
    config, it, main = run.config, run.progress.iteration, run.accelerator.is_main_process
    if main and (it % max(config.log_every, 1) == 0 or it == run.total):
        append_jsonl(run.output / TRAIN_LOG, {"iteration": it, "epoch": epoch, **losses, "lr": run.scheduler.get_last_lr()[0],
                                              "seconds": round(time.perf_counter() - run.started, 3)})
    want_val = run.validation is not None and (
        (config.validate_every and it % config.validate_every == 0) or (config.select == "best" and it == run.total))
    want_eval = evaluate is not None and evaluate_every and (it % evaluate_every == 0 or it == run.total)
    if want_val or want_eval:
        record = _validate_and_evaluate(run, want_val, evaluate if want_eval else None)
        if main:
            append_jsonl(run.output / TRAIN_LOG, record)
    if config.checkpoint_every and it % config.checkpoint_every == 0 and it < run.total:
        save_checkpoint(run.accelerator, run.output, it, run.model, run.checkpoint_objects(), keep=CHECKPOINTS_KEPT,
                        extra=run.progress.state_dict())


def _validate_and_evaluate(run: _Run, validate: bool, evaluate: Optional[EvaluateCallback]) -> dict:
    """Validation metrics (keeping the best weights with ``select="best"``) and the evaluate hook, on the
    weights that would be saved now."""
    it, main, unwrapped = run.progress.iteration, run.accelerator.is_main_process, run.unwrapped
    record: dict[str, Any] = {"iteration": it}
    with _weights_to_save(unwrapped, run.ema):
        if validate:
            record.update(validation_metrics(unwrapped, run.validation, run.recipe.batch_size))
            if run.config.select == "best" and record["val_score"] >= run.progress.best_score:
                run.progress.best_score, run.progress.best_iteration = record["val_score"], it
                if main:
                    _save_model_atomically(unwrapped, run.output / BEST_DIR)
        if evaluate is not None and main:
            record.update(evaluate(unwrapped, it) or {})
    run.model.train()
    return record


def _finish(run: _Run) -> Path:
    """Save the chosen weights with their thresholds and model card; mark the run finished."""
    config, accelerator, unwrapped = run.config, run.accelerator, run.unwrapped
    model_dir = run.output / MODEL_DIR
    if accelerator.is_main_process:
        with _weights_to_save(unwrapped, run.ema):
            best_dir = run.output / BEST_DIR
            if config.select == "best" and best_dir.is_dir():
                final = type(unwrapped).from_pretrained(str(best_dir)).to(accelerator.device)
            else:
                final = unwrapped
            _save_model_atomically(final, model_dir)
            thresholds = calibrate_on_held_out_images(final, run.categories, config.threshold_fpr, run.recipe.batch_size)
            selected = run.progress.best_iteration if config.select == "best" else run.progress.iteration
            thresholds["selected"] = {"rule": config.select, "iteration": selected}
            write_json_atomic(model_dir / THRESHOLDS_FILE, thresholds)
            write_training_card(model_dir, final, config, run.recipe, run.categories, selected, run.progress,
                                accelerator.num_processes)
        write_json_atomic(run.output / RUN_CONFIG, _run_record(config, run.recipe, "finished", run.total,
                                                               accelerator.num_processes))
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
    with atomic_folder(folder) as tmp:
        model.save_pretrained(str(tmp))


def recipe_loss(output, masks: torch.Tensor, recipe: Recipe, clean_features=None) -> dict:
    """RealNet's training loss for one forward ``output`` with the recipe's loss settings."""
    return realnet_loss(
        output.logits,
        masks,
        output.reconstructions,
        output.clean_features if clean_features is None else clean_features,
        segmentation=recipe.segmentation_loss,
        segmentation_weight=recipe.segmentation_weight,
        reconstruction_weight=recipe.reconstruction_weight,
        focal_gamma=recipe.focal_gamma,
    )


def _training_step(model, batch: dict, optimizer, scheduler, recipe: Recipe, accelerator, cache: Optional[CleanFeatureCache] = None) -> dict:
    images, clean, masks = batch["image"], batch["clean_image"], batch["mask"]
    with accelerator.autocast():
        if cache is not None and "image_key" in batch:
            output = model(images)
            clean_features = cache.features(accelerator.unwrap_model(model), batch["image_key"], clean)
        else:
            output = model(images, clean_images=clean)
            clean_features = output.clean_features
    losses = recipe_loss(output, masks, recipe, clean_features)
    accelerator.backward(losses["loss"])
    if recipe.grad_clip_norm is not None and accelerator.sync_gradients:
        accelerator.clip_grad_norm_(model.parameters(), recipe.grad_clip_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {k: float(v.detach()) for k, v in losses.items()}


__all__ = [
    "CHECKPOINT_DIR", "MODEL_DIR", "RUN_CONFIG", "THRESHOLDS_FILE", "TRAIN_LOG", "BalancedBatchSampler", "CategoryData",
    "CleanFeatureCache", "EpochBatchSampler", "ExponentialMovingAverage", "TrainingConfig", "TrainingProgress",
    "build_model", "build_training_dataset", "calibrate_thresholds", "changing_state_keys", "load_category_data",
    "parse_key_values", "predict_tensors", "split_holdout", "total_iterations", "train", "validation_metrics",
]
