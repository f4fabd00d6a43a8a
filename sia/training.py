"""Train the class-conditional SDAS diffusion model on normal images (IDDPM hybrid loss, EMA, accelerate).

One call, `train_diffusion(DiffusionTrainingConfig(...))`, does what the official
`train_diffusion.py` does, on one CPU, one GPU or many (`accelerate launch` / `torchrun`):
Adam 1e-4, gradient-norm clipping at 1.0, EMA 0.9999 of the weights, L_simple + L_vlb with a
stop-gradient mean, optional initialisation from any diffusers UNet (or an ADM `.pt` checkpoint such
as OpenAI's ImageNet model) by shape-matched copying.

Output folder layout:

    training_config.json      the config of the run (checked again on --resume, which also needs the
                              same number of processes and the same mixed precision)
    init_report.json          keys loaded / skipped by --init-from (only with --init-from)
    train_log.jsonl           step, loss, mse, vb (bits), lr, every `log_every` steps
    samples/step_XXXXXX.png   rows s = 0, 0.1, 0.2 from one fixed noise (like the paper's Fig. 3a)
    checkpoints/step_XXXXXX/  weights, optimizer, EMA, random states, trainer_state.json (`sia.runs`; resume)
    pipeline/                 the final SDASPipeline with the EMA weights (`sia generate --model`)

Differences from the official code (deliberate):

* Gradient accumulation averages the micro-batch losses (accelerate) and clips the accumulated
  gradient once per update. The official loop sums k un-normalised losses, clips every partial
  gradient and makes its first update after a single batch; with Adam the summing mostly cancels,
  the partial clipping does not.
* The EMA starts as a copy of the (initialised) weights and uses the constant decay, like the
  official code, but it is updated only after real optimizer steps.
* Batches are drawn from per-epoch permutations as a pure function of (seed, step), with every
  batch full; the official DataLoader drops nothing and reshuffles with the global RNG.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .diffusion_data import NormalImageDataset, batch_keys, discover_training_images, mix_seed
from .diffusion_loss import DiffusionCoefficients, add_noise, hybrid_loss
from .errors import InputError
from .runs import (
    CHECKPOINT_PREFIX,
    MIXED_PRECISION_MODES,
    ExponentialMovingAverage,
    RunLayout,
    append_jsonl,
    check_mixed_precision,
    check_unrecorded_outputs,
    checkpoint_step,
    clear_recorded_outputs,
    latest_checkpoint,
    load_checkpoint,
    make_accelerator,
    open_run_folder,
    record_run_outputs,
    resumable_checkpoint,
    save_checkpoint,
    trim_log,
    write_json_atomic,
)
from .sample_grids import fixed_sample_plan, render_sample_grid, save_grid, save_pipeline
from .unets import EARLIER_PRESET_LAYOUTS, UNET_PRESETS, unet_config
from .warm_start import describe_init_report, load_init_state_dict, load_matching_weights

DEFAULT_MAX_STEPS = 10_000
# Fields that may change between an interrupted run and its --resume. Not mixed_precision: a switch to
# fp16 needs a grad-scaler state that a "no"/"bf16" checkpoint never wrote. Not the output folder
# either: a run that was moved or renamed is still the same run.
RESUMABLE_CHANGES = {
    "max_steps", "epochs", "checkpoint_every", "checkpoints_total_limit", "sample_every", "sample_images",
    "sample_inference_steps", "log_every", "num_workers", "resume", "overwrite", "progress", "cpu", "output_dir",
}
#: Training timesteps of the (default) SDASScheduler the run trains and samples with.
NUM_TRAIN_TIMESTEPS = 1000
RUN_LAYOUT = RunLayout(
    record="training_config.json",
    outputs=("pipeline", "checkpoints", "samples", "train_log.jsonl", "init_report.json", "training_config.json"),
    results=("pipeline", "checkpoints"),
)


@dataclass
class DiffusionTrainingConfig:
    """Everything that defines a diffusion training run; saved as `training_config.json`.

    Steps count optimizer updates. Give `max_steps` or `epochs` (one epoch = one pass over the
    images at the global batch size `batch_size x processes x gradient_accumulation_steps`);
    neither means 10,000 steps. `image_size=None` uses the preset's native size (256 for adm-256).
    `unet_overrides` replaces entries of the preset's `UNet2DModel` config (e.g. narrower widths).
    """

    data_dir: str
    output_dir: str
    categories: list[str] | None = None
    preset: str = "adm-256"
    image_size: int | None = None
    unet_overrides: dict[str, Any] | None = None
    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    ema_decay: float = 0.9999
    vb_weight: float = 1.0
    horizontal_flip: bool = False
    checkpoint_every: int = 1000
    checkpoints_total_limit: int = 2
    sample_every: int = 1000
    sample_images: int = 8
    sample_strengths: tuple[float, ...] = (0.0, 0.1, 0.2)
    sample_inference_steps: int = 20
    log_every: int = 10
    seed: int = 100
    mixed_precision: str = "no"
    init_from: str | None = None
    num_workers: int = 0
    resume: bool = False
    overwrite: bool = False
    cpu: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.preset not in UNET_PRESETS:
            raise InputError(f"`preset`: unknown UNet preset {self.preset!r}; known: {', '.join(UNET_PRESETS)}")
        check_mixed_precision(self.mixed_precision, self.cpu)
        if self.max_steps is not None and self.epochs is not None:
            raise InputError("`max_steps` and `epochs`: give one of them, not both")
        positive = {"batch_size": self.batch_size, "gradient_accumulation_steps": self.gradient_accumulation_steps,
                    "learning_rate": self.learning_rate, "checkpoint_every": self.checkpoint_every,
                    "checkpoints_total_limit": self.checkpoints_total_limit, "log_every": self.log_every,
                    "sample_images": self.sample_images, "sample_inference_steps": self.sample_inference_steps}
        if self.max_steps is not None:
            positive["max_steps"] = self.max_steps
        if self.epochs is not None:
            positive["epochs"] = self.epochs
        if self.image_size is not None:
            positive["image_size"] = self.image_size
        for name, value in positive.items():
            if not value > 0:
                raise InputError(f"`{name}`: expected a positive number, got {value}")
        if self.sample_inference_steps > NUM_TRAIN_TIMESTEPS:
            # Checked here so a run does not fail at its first sample grid, hours in.
            raise InputError(f"`sample_inference_steps`: expected at most {NUM_TRAIN_TIMESTEPS} (the training timesteps), "
                             f"got {self.sample_inference_steps}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise InputError(f"`ema_decay`: expected a value in [0, 1), got {self.ema_decay}")
        if self.max_grad_norm < 0 or self.vb_weight < 0 or self.sample_every < 0 or self.num_workers < 0:
            raise InputError("`max_grad_norm`, `vb_weight`, `sample_every` and `num_workers` must be >= 0")
        if any(s < 0 for s in self.sample_strengths):
            raise InputError(f"`sample_strengths`: expected values >= 0, got {list(self.sample_strengths)}")
        if self.resume and self.overwrite:
            raise InputError("`resume` and `overwrite`: give one of them, not both")

    def resolved_image_size(self) -> int:
        return int(self.image_size or UNET_PRESETS[self.preset]["sample_size"])

    def total_steps(self, num_images: int, num_processes: int) -> int:
        """Optimizer updates of the whole run."""
        if self.epochs is not None:
            per_update = self.batch_size * num_processes * self.gradient_accumulation_steps
            return max(1, math.ceil(self.epochs * num_images / per_update))
        return int(self.max_steps or DEFAULT_MAX_STEPS)

    def to_json_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["adam_betas"] = list(self.adam_betas)
        data["sample_strengths"] = list(self.sample_strengths)
        return data


def build_training_unet(config: DiffusionTrainingConfig, num_classes: int, checkpoint: Path | None = None):
    """The freshly initialised class-conditional UNet of a run (preset plus overrides).

    When resuming from `checkpoint`, a run started with an earlier layout of its preset gets that
    layout back (its weights say which), so a preset's update never strands an interrupted run.
    """
    from diffusers import UNet2DModel

    kwargs = unet_config(config.preset, num_classes, config.resolved_image_size())
    if checkpoint is not None and not config.unet_overrides:
        kwargs = _layout_of_checkpoint(config.preset, kwargs, checkpoint / "model.safetensors")
    overrides = dict(config.unet_overrides or {})
    fixed = {"num_class_embeds", "sample_size", "in_channels", "out_channels"} & set(overrides)
    if fixed:
        raise InputError(f"unet_overrides: {', '.join(sorted(fixed))} are set by the data and the loss; remove them")
    try:
        return UNet2DModel(**{**kwargs, **overrides})
    except (TypeError, ValueError) as err:
        raise InputError(f"unet_overrides: not a valid UNet2DModel config ({err})") from None


def _layout_of_checkpoint(preset: str, kwargs: dict[str, Any], weights: Path) -> dict[str, Any]:
    """`kwargs` itself, or the earlier layout of `preset` whose tensor shapes are those in `weights`."""
    from diffusers import UNet2DModel
    from safetensors import safe_open

    if preset not in EARLIER_PRESET_LAYOUTS or not weights.is_file():
        return kwargs
    with safe_open(str(weights), framework="pt") as handle:
        saved = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}

    def shapes(candidate: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in UNet2DModel(**candidate).state_dict().items()}

    if shapes(kwargs) == saved:
        return kwargs
    fixed = {k: kwargs[k] for k in ("num_class_embeds", "sample_size")}
    for layout in EARLIER_PRESET_LAYOUTS[preset]:
        candidate = {**layout, **fixed}
        if shapes(candidate) == saved:
            print(f"notice: {weights.parent} was started with the earlier layout of preset {preset!r}; resuming with it")
            return candidate
    return kwargs  # no known layout fits: loading the checkpoint says so in one line


def make_adam(params, device: torch.device | str, lr: float, betas: tuple[float, float] = (0.9, 0.999),
              weight_decay: float = 0.0) -> torch.optim.Adam:
    """The training loop's Adam: torch's fused kernel on CPU, torch's default elsewhere.

    On CPU torch would pick the per-tensor loop; the fused kernel does the whole update in one pass
    per tensor (3.4x faster per step for small-64's 377 tensors) and agrees with the loop to float rounding.
    """
    fused = torch.device(device).type == "cpu"
    return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True if fused else None)


class EMAWeights(ExponentialMovingAverage):
    """EMA of a model's parameters, kept as a full eval-mode copy of the model (`.model`).

    A whole module (not a list of tensors) so it can sample and be saved with `save_pretrained`
    directly, without swapping weights in and out of the trained model. Parameters are averaged
    with a constant decay, buffers copied.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        import copy

        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        super().__init__(model, decay, averaged=[name for name, _ in model.named_parameters()],
                         copied=[name for name, _ in model.named_buffers()], shadow=self.model.state_dict())


# ---------------------------------------------------------------------------------------------
# the output folder


def _prepare_output(config: DiffusionTrainingConfig, out: Path, num_processes: int = 1) -> Path | None:
    """Refuse to clobber earlier results; return the checkpoint to resume from, if any.

    A resume must use the same settings (where the folder lives is not a setting) and the same
    number of processes as the checkpoint: the global batch and the data order (`batch_keys`)
    depend on it, so another world size would silently train differently.
    """
    init_folder = [config.init_from] if config.init_from and Path(config.init_from).exists() else []
    old = open_run_folder(out, RUN_LAYOUT, resume=config.resume, overwrite=config.overwrite,
                          inputs=[config.data_dir, *init_folder])
    if old is None:
        check_unrecorded_outputs(out, RUN_LAYOUT.outputs, "`output_dir`")
        return None
    new = json.loads(json.dumps(config.to_json_dict()))
    changed = sorted(k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k])
    if changed:
        raise InputError(f"`resume` {out}: settings differ from the interrupted run: "
                         + ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed))
    return resumable_checkpoint(out, num_processes)


def _start_run_folder(config: DiffusionTrainingConfig, accelerator, out: Path, resolved: dict[str, Any]) -> None:
    """Clear an overwritten (or never checkpointed) run, only what it recorded writing; record this run's
    outputs and write its settings."""
    if accelerator.is_main_process:
        if not config.resume:
            clear_recorded_outputs(out)
        out.mkdir(parents=True, exist_ok=True)
        if not config.resume:
            record_run_outputs(out, RUN_LAYOUT.outputs, "sia train")
        write_json_atomic(out / RUN_LAYOUT.record, {**config.to_json_dict(), "resolved": resolved})
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------
# training


class _MicroBatchSampler:
    """Yields this process's dataset keys for micro-steps [start, stop) (see `batch_keys`)."""

    def __init__(self, num_items: int, config: DiffusionTrainingConfig, start: int, stop: int, rank: int, world: int):
        self.num_items, self.config, self.start, self.stop, self.rank, self.world = num_items, config, start, stop, rank, world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        global_batch = self.config.batch_size * self.world
        for micro in range(self.start, self.stop):
            yield batch_keys(self.num_items, global_batch, micro, self.rank, self.world,
                             self.config.seed, self.config.horizontal_flip)


@dataclass
class _Run:
    """What the training loop works with, built once per run (fresh or resumed)."""

    config: DiffusionTrainingConfig
    accelerator: Any
    out: Path
    categories: list[str]
    unet: Any
    ema: EMAWeights
    optimizer: Any
    coefficients: DiffusionCoefficients
    total_steps: int
    step: int = 0

    def checkpoint_objects(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer, "ema": self.ema, "scaler": self.accelerator.scaler}


def _build_run(config: DiffusionTrainingConfig, accelerator, out: Path, categories: list[str], total_steps: int,
               resume_from: Path | None) -> _Run:
    """The UNet (warm-started with --init-from on a fresh run), its EMA and optimizer, resumed if asked."""
    from accelerate.utils import set_seed

    from .scheduler import SDASScheduler

    set_seed(config.seed)
    unet = build_training_unet(config, len(categories), resume_from)
    if config.init_from and resume_from is None:
        report = load_matching_weights(unet, load_init_state_dict(config.init_from, dict(unet.config)), config.init_from)
        if accelerator.is_main_process:
            write_json_atomic(out / "init_report.json", report)
            accelerator.print(describe_init_report(report))
    ema = EMAWeights(unet, config.ema_decay)
    optimizer = make_adam(unet.parameters(), accelerator.device, lr=config.learning_rate,
                          betas=tuple(config.adam_betas), weight_decay=config.weight_decay)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    ema.model.to(accelerator.device)
    run = _Run(config, accelerator, out, categories, unet, ema, optimizer,
               DiffusionCoefficients.from_scheduler(SDASScheduler()), total_steps)
    if resume_from is not None:
        run.step = int(load_checkpoint(accelerator, resume_from, unet, run.checkpoint_objects())["step"])
        accelerator.print(f"resumed from {resume_from} at step {run.step}")
    if config.resume and accelerator.is_main_process:
        trim_log(out / "train_log.jsonl", run.step, key="step")
    return run


def _micro_step(run: _Run, micro: int, x0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Forward and backward of one micro-batch (an optimizer update when accumulation is complete).

    Timesteps and noise are a pure function of (seed, micro-step, process), so a resumed run draws
    the same ones. Returns the detached (loss, mse, vb) for the log.
    """
    accelerator, config = run.accelerator, run.config
    x0 = x0.to(accelerator.device, non_blocking=True)
    labels = labels.to(accelerator.device, non_blocking=True)
    generator = torch.Generator().manual_seed(mix_seed(config.seed, micro, accelerator.process_index, 0xD1FF))
    timesteps = torch.randint(0, len(run.coefficients.betas), (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator).to(accelerator.device)
    x_t = add_noise(x0, noise, timesteps, run.coefficients)
    with accelerator.accumulate(run.unet):
        output = run.unet(x_t, timesteps.to(accelerator.device), class_labels=labels).sample
        losses = hybrid_loss(output.float(), x0, x_t, noise, timesteps, coefficients=run.coefficients,
                             vb_weight=config.vb_weight)
        accelerator.backward(losses["loss"])
        if accelerator.sync_gradients and config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(run.unet.parameters(), config.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return torch.stack([losses["loss"].detach(), losses["mse"].detach().mean(), losses["vb"].detach().mean()]).float()


def _log_record(run: _Run, means: list[float]) -> None:
    record = {"step": run.step, "loss": means[0], "mse": means[1], "vb": means[2], "lr": run.config.learning_rate}
    if run.accelerator.is_main_process:
        append_jsonl(run.out / "train_log.jsonl", record)


def _sample(run: _Run, plan) -> None:
    """The sample grid of this step, from the EMA weights (main process only)."""
    config = run.config
    if run.accelerator.is_main_process:
        grid = render_sample_grid(run.ema.model, run.categories, *plan, tuple(config.sample_strengths),
                                  config.sample_inference_steps, config.seed)
        save_grid(grid, run.out / "samples" / f"step_{run.step:06d}.png")
    run.accelerator.wait_for_everyone()


def _every(step: int, period: int, last: int) -> bool:
    return bool(period) and (step % period == 0 or step == last)


def train_diffusion(config: DiffusionTrainingConfig) -> Path:
    """Train (or resume) a class-conditional SDAS diffusion model; returns the SDASPipeline folder."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    config.validate()
    out = Path(config.output_dir)
    accelerator = make_accelerator(config.mixed_precision, config.cpu,
                                   gradient_accumulation_steps=config.gradient_accumulation_steps)
    resume_from = _prepare_output(config, out, accelerator.num_processes)
    categories, items = discover_training_images(config.data_dir, config.categories)
    image_size = config.resolved_image_size()
    dataset = NormalImageDataset(items, image_size)
    total_steps = config.total_steps(len(dataset), accelerator.num_processes)
    _start_run_folder(config, accelerator, out, {"categories": categories, "image_size": image_size,
                                                 "num_images": len(dataset), "total_steps": total_steps,
                                                 "num_processes": accelerator.num_processes})
    run = _build_run(config, accelerator, out, categories, total_steps, resume_from)
    if run.step >= total_steps and (out / "pipeline").is_dir():
        accelerator.print(f"training already finished at step {run.step}; pipeline: {out / 'pipeline'}")
        accelerator.end_training()
        return out / "pipeline"

    accum = config.gradient_accumulation_steps
    sampler = _MicroBatchSampler(len(dataset), config, run.step * accum, total_steps * accum,
                                 accelerator.process_index, accelerator.num_processes)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers,
                        pin_memory=accelerator.device.type == "cuda", persistent_workers=False)
    plan = fixed_sample_plan(config.sample_images, config.seed, categories, image_size)
    log_sums = torch.zeros(3, device=accelerator.device, dtype=torch.float32)  # float32: MPS has no float64
    log_count = 0
    progress = tqdm(total=total_steps, initial=run.step, desc="train", unit="step",
                    disable=not (config.progress and accelerator.is_local_main_process))
    run.unet.train()
    for micro, (x0, labels) in enumerate(loader, start=run.step * accum):
        log_sums += _micro_step(run, micro, x0, labels)
        log_count += 1
        if not accelerator.sync_gradients:
            continue
        run.ema.update(accelerator.unwrap_model(run.unet))
        run.step += 1
        progress.update(1)
        if _every(run.step, config.log_every, total_steps):
            means = accelerator.reduce(log_sums / log_count, reduction="mean").tolist()
            progress.set_postfix(loss=f"{means[0]:.4f}", mse=f"{means[1]:.4f}", vb=f"{means[2]:.3f}")
            _log_record(run, means)
            log_sums.zero_()
            log_count = 0
        if _every(run.step, config.checkpoint_every, total_steps):
            save_checkpoint(accelerator, out, run.step, run.unet, run.checkpoint_objects(),
                            keep=config.checkpoints_total_limit)
        if _every(run.step, config.sample_every, total_steps):
            _sample(run, plan)
    progress.close()

    if accelerator.is_main_process:
        save_pipeline(run.ema.model, categories, out / "pipeline")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out / "pipeline"


__all__ = [
    "CHECKPOINT_PREFIX", "DEFAULT_MAX_STEPS", "MIXED_PRECISION_MODES", "NUM_TRAIN_TIMESTEPS", "DiffusionTrainingConfig",
    "EMAWeights", "build_training_unet", "checkpoint_step", "describe_init_report", "latest_checkpoint",
    "load_init_state_dict", "load_matching_weights", "make_adam", "render_sample_grid", "save_pipeline", "train_diffusion",
]
