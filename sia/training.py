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
    checkpoints/step_XXXXXX/  accelerate state + ema.safetensors + trainer_state.json (resume)
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
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .diffusion_data import NormalImageDataset, batch_keys, discover_training_images, mix_seed
from .diffusion_loss import DiffusionCoefficients, add_noise, hybrid_loss
from .errors import InputError
from .paths import separate_output, writable_folder_path
from .unets import UNET_PRESETS, unet_config

DEFAULT_MAX_STEPS = 10_000
MIXED_PRECISION_MODES = ("no", "fp16", "bf16")
# Fields that may change between an interrupted run and its --resume. Not mixed_precision: a switch to
# fp16 makes accelerate load a grad-scaler state that a "no"/"bf16" checkpoint never wrote.
RESUMABLE_CHANGES = {
    "max_steps", "epochs", "checkpoint_every", "checkpoints_total_limit", "sample_every", "sample_images",
    "sample_inference_steps", "log_every", "num_workers", "resume", "overwrite", "progress", "cpu",
}
#: Training timesteps of the (default) SDASScheduler the run trains and samples with.
NUM_TRAIN_TIMESTEPS = 1000
CHECKPOINT_PREFIX = "step_"


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
            raise InputError(f"--preset: unknown UNet preset {self.preset!r}; known: {', '.join(UNET_PRESETS)}")
        if self.mixed_precision not in MIXED_PRECISION_MODES:
            raise InputError(f"--mixed-precision: expected one of {', '.join(MIXED_PRECISION_MODES)}, got {self.mixed_precision!r}")
        if self.max_steps is not None and self.epochs is not None:
            raise InputError("--steps and --epochs: give one of them, not both")
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
                raise InputError(f"{name}: expected a positive number, got {value}")
        if self.sample_inference_steps > NUM_TRAIN_TIMESTEPS:
            # Checked here so a run does not fail at its first sample grid, hours in.
            raise InputError(f"sample_inference_steps: expected at most {NUM_TRAIN_TIMESTEPS} (the training timesteps), "
                             f"got {self.sample_inference_steps}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise InputError(f"ema_decay: expected a value in [0, 1), got {self.ema_decay}")
        if self.max_grad_norm < 0 or self.vb_weight < 0 or self.sample_every < 0 or self.num_workers < 0:
            raise InputError("max_grad_norm, vb_weight, sample_every and num_workers must be >= 0")
        if any(s < 0 for s in self.sample_strengths):
            raise InputError(f"sample_strengths: expected values >= 0, got {list(self.sample_strengths)}")
        if self.resume and self.overwrite:
            raise InputError("--resume and --overwrite: give one of them, not both")

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


def build_training_unet(config: DiffusionTrainingConfig, num_classes: int):
    """The freshly initialised class-conditional UNet of a run (preset plus overrides)."""
    from diffusers import UNet2DModel

    kwargs = unet_config(config.preset, num_classes, config.resolved_image_size())
    overrides = dict(config.unet_overrides or {})
    fixed = {"num_class_embeds", "sample_size", "in_channels", "out_channels"} & set(overrides)
    if fixed:
        raise InputError(f"unet_overrides: {', '.join(sorted(fixed))} are set by the data and the loss; remove them")
    try:
        return UNet2DModel(**{**kwargs, **overrides})
    except (TypeError, ValueError) as err:
        raise InputError(f"unet_overrides: not a valid UNet2DModel config ({err})") from None


# ---------------------------------------------------------------------------------------------
# EMA


class EMAWeights:
    """Exponential moving average of a model's parameters, kept as a full eval-mode copy of the model.

    A whole module (not a list of tensors) so it can sample and be saved with `save_pretrained`
    directly, without swapping weights in and out of the trained model.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        import copy

        self.decay = float(decay)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        ema_params = list(self.model.parameters())
        params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params)]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------
# initialisation from another UNet


def _hub_state_dict(repo_id: str) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DModel

    errors = []
    for subfolder in ("unet", None):
        try:
            return UNet2DModel.from_pretrained(repo_id, subfolder=subfolder).state_dict()
        except Exception as err:  # not found / offline / wrong layout: try the next place
            errors.append(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
    raise InputError(f"--init-from {repo_id}: not a UNet2DModel folder, pipeline folder, weights file or "
                     f"reachable Hub repo ({errors[-1]})")


def _folder_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    for base in (folder / "unet", folder):
        for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
            if (base / name).is_file():
                return load_file(str(base / name))
        if (base / "config.json").is_file():
            from diffusers import UNet2DModel

            return UNet2DModel.from_pretrained(base).state_dict()
    raise InputError(f"--init-from {folder}: expected a UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors) "
                     "or a pipeline folder with unet/")


def _file_state_dict(path: Path, target_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from .convert import adm_to_diffusers_state_dict, adm_unet_config, load_official_checkpoint, strip_prefix

    state, _ = load_official_checkpoint(path)
    if "input_blocks.0.0.weight" in state:  # guided-diffusion / official SDAS layout: convert the names
        config = adm_unet_config(state, sample_size=target_config["sample_size"], source=str(path))
        return adm_to_diffusers_state_dict(state, config, source=str(path))
    return strip_prefix(state, "module.")


def load_init_state_dict(source: str, target_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Weights named like `UNet2DModel` keys from a folder, Hub id, .safetensors or ADM .pt file."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _folder_state_dict(path)
    if path.is_file():
        return _file_state_dict(path, target_config)
    if path.suffix in (".pt", ".pth", ".tar", ".safetensors", ".bin") or source.startswith((".", "/", "~")):
        raise InputError(f"--init-from {source}: no such file or folder")
    return _hub_state_dict(source)


def load_matching_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str = "") -> dict[str, Any]:
    """Copy every tensor whose key and shape match; return a report of what was skipped and why."""
    target = model.state_dict()
    matched = {k: v for k, v in state_dict.items() if k in target and tuple(v.shape) == tuple(target[k].shape)}
    shape_mismatch = {k: {"source": list(state_dict[k].shape), "target": list(target[k].shape)}
                      for k in sorted(set(state_dict) & set(target)) if k not in matched}
    missing = sorted(set(target) - set(state_dict))
    unused = sorted(set(state_dict) - set(target))
    model.load_state_dict({k: v.to(target[k].dtype) for k, v in matched.items()}, strict=False)
    return {
        "source": source,
        "loaded": len(matched),
        "target_keys": len(target),
        "skipped_shape_mismatch": shape_mismatch,
        "missing_in_source": missing,
        "unused_source_keys": unused,
    }


def describe_init_report(report: dict[str, Any]) -> str:
    lines = [f"init from {report['source']}: loaded {report['loaded']}/{report['target_keys']} tensors"]
    for key, shapes in report["skipped_shape_mismatch"].items():
        lines.append(f"  skipped (shape {tuple(shapes['source'])} vs {tuple(shapes['target'])}): {key}")
    if report["missing_in_source"]:
        lines.append(f"  kept random (not in source, {len(report['missing_in_source'])}): "
                     + ", ".join(report["missing_in_source"][:8]) + (" ..." if len(report["missing_in_source"]) > 8 else ""))
    if report["unused_source_keys"]:
        lines.append(f"  unused source tensors ({len(report['unused_source_keys'])}): "
                     + ", ".join(report["unused_source_keys"][:8]) + (" ..." if len(report["unused_source_keys"]) > 8 else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# files


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def checkpoint_step(folder: Path) -> int | None:
    """Step of a complete checkpoint folder (it has trainer_state.json), else None."""
    if not folder.name.startswith(CHECKPOINT_PREFIX) or not (folder / "trainer_state.json").is_file():
        return None
    try:
        return int(folder.name[len(CHECKPOINT_PREFIX):])
    except ValueError:
        return None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under `output_dir/checkpoints`, if any."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    found = [(step, p) for p in root.iterdir() if p.is_dir() and (step := checkpoint_step(p)) is not None]
    return max(found)[1] if found else None


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from a run file; a damaged one is a one-line InputError naming it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: unreadable ({type(err).__name__}); fix or delete it") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _prepare_output(config: DiffusionTrainingConfig, out: Path, num_processes: int = 1) -> Path | None:
    """Refuse to clobber earlier results; return the checkpoint to resume from, if any.

    A resume must use the same number of processes as the checkpoint: the global batch and the
    data order (`batch_keys`) depend on it, so another world size would silently train differently.
    """
    previous = [out / name for name in ("pipeline", "checkpoints", "training_config.json") if (out / name).exists()]
    if config.resume:
        saved = out / "training_config.json"
        if saved.is_file():
            old = _read_json_object(saved)
            new = json.loads(json.dumps(config.to_json_dict()))
            changed = sorted(k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k])
            if changed:
                raise InputError(f"--resume {out}: settings differ from the interrupted run: "
                                 + ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed))
        checkpoint = latest_checkpoint(out)
        if checkpoint is not None:
            stored = _read_json_object(checkpoint / "trainer_state.json").get("num_processes")
            if stored is not None and stored != num_processes:
                raise InputError(f"--resume {out}: checkpoint {checkpoint.name} was trained with {stored} processes but "
                                 f"this launch has {num_processes}; relaunch with {stored} (global batch and data "
                                 "order depend on it) or start a new run")
        return checkpoint
    if previous and not config.overwrite:
        raise InputError(f"--output {out}: already holds a training run ({', '.join(p.name for p in previous)}); "
                         "pass --resume to continue it or --overwrite to start again")
    return None


# ---------------------------------------------------------------------------------------------
# sample grids


def _fixed_sample_plan(config: DiffusionTrainingConfig, categories: list[str], image_size: int):
    """Column -> category and the fixed starting noise, drawn once from the seed."""
    columns = [categories[j % len(categories)] for j in range(config.sample_images)]
    generator = torch.Generator().manual_seed(mix_seed(config.seed, 0x5A3F1E))
    noise = torch.randn(config.sample_images, 3, image_size, image_size, generator=generator)
    return columns, noise


@torch.no_grad()
def render_sample_grid(unet, categories: list[str], columns: list[str], noise: torch.Tensor,
                       strengths: tuple[float, ...], num_inference_steps: int, seed: int) -> torch.Tensor:
    """(3, H', W') grid in [0, 1]: one row per strength, the same starting noise in every row."""
    from torchvision.utils import make_grid

    from .pipeline import SDASPipeline
    from .scheduler import SDASScheduler

    pipe = SDASPipeline(unet=unet, scheduler=SDASScheduler(), categories=list(categories))
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for strength in strengths:
        row = torch.empty_like(noise)
        for category in dict.fromkeys(columns):
            index = [j for j, c in enumerate(columns) if c == category]
            latents = noise[index].to(device=unet.device, dtype=unet.dtype)
            generator = torch.Generator().manual_seed(mix_seed(seed, 0x51, categories.index(category)))
            images = pipe(category=category, num_images=len(index), strength=float(strength),
                          num_inference_steps=num_inference_steps, generator=generator, latents=latents,
                          output_type="pt").images
            row[index] = images.float().cpu()
        rows.append(row)
    return make_grid(torch.cat(rows), nrow=len(columns), padding=2, pad_value=1.0)


def _save_grid(grid: torch.Tensor, path: Path) -> None:
    from .images import tensor_to_pil

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    tensor_to_pil(grid).save(tmp)
    os.replace(tmp, path)


def save_pipeline(unet, categories: list[str], folder: Path) -> Path:
    """Write an SDASPipeline folder atomically (a finished folder is only ever replaced whole)."""
    from .pipeline import SDASPipeline
    from .scheduler import SDASScheduler

    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    SDASPipeline(unet=unet, scheduler=SDASScheduler(), categories=list(categories)).save_pretrained(tmp)
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    return folder


# ---------------------------------------------------------------------------------------------
# training


def _make_accelerator(config: DiffusionTrainingConfig):
    from accelerate import Accelerator

    try:
        return Accelerator(mixed_precision=config.mixed_precision, cpu=config.cpu,
                           gradient_accumulation_steps=config.gradient_accumulation_steps)
    except ValueError as err:  # e.g. fp16 without a GPU
        raise InputError(f"--mixed-precision {config.mixed_precision}: {str(err).splitlines()[0]}") from None


def _save_checkpoint(accelerator, out: Path, step: int, ema: EMAWeights, config: DiffusionTrainingConfig) -> None:
    from safetensors.torch import save_file

    root = out / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = root / f".tmp_{CHECKPOINT_PREFIX}{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file({k: v.cpu() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
        _write_json_atomic(tmp / "trainer_state.json", {"step": step, "num_processes": accelerator.num_processes})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        complete = sorted((s, p) for p in root.iterdir() if p.is_dir() and (s := checkpoint_step(p)) is not None)
        for _, stale in complete[:-config.checkpoints_total_limit]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_checkpoint(accelerator, folder: Path, ema: EMAWeights) -> int:
    from safetensors.torch import load_file

    accelerator.load_state(str(folder))
    ema.load_state_dict({k: v.to(accelerator.device) for k, v in load_file(str(folder / "ema.safetensors")).items()})
    return int(_read_json_object(folder / "trainer_state.json")["step"])


def _log_step(line: str) -> int | None:
    """Step of one train_log.jsonl line, or None for a line that is not a complete record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop log records written after the checkpoint a run resumes from (they will be redone).

    Lines that do not parse (a record half-written when the run was killed) are dropped too.
    """
    if not path.is_file():
        return
    kept = [line for line in path.read_text(errors="replace").splitlines()
            if (step := _log_step(line)) is not None and step <= last_step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


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


def train_diffusion(config: DiffusionTrainingConfig) -> Path:
    """Train (or resume) a class-conditional SDAS diffusion model; returns the SDASPipeline folder."""
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from .scheduler import SDASScheduler

    config.validate()
    out = writable_folder_path(config.output_dir, "--output")
    init_folder = [config.init_from] if config.init_from and Path(config.init_from).exists() else []
    separate_output(out, [config.data_dir, *init_folder], "--output")  # --overwrite must never delete an input
    accelerator = _make_accelerator(config)
    resume_from = _prepare_output(config, out, accelerator.num_processes)
    categories, items = discover_training_images(config.data_dir, config.categories)
    image_size = config.resolved_image_size()
    dataset = NormalImageDataset(items, image_size)
    total_steps = config.total_steps(len(dataset), accelerator.num_processes)

    if accelerator.is_main_process:
        if config.overwrite and not config.resume:
            for name in ("pipeline", "checkpoints", "samples", "train_log.jsonl", "init_report.json"):
                target = out / name
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        saved = config.to_json_dict()
        saved["resolved"] = {"categories": categories, "image_size": image_size, "num_images": len(dataset),
                             "total_steps": total_steps, "num_processes": accelerator.num_processes}
        _write_json_atomic(out / "training_config.json", saved)
    accelerator.wait_for_everyone()

    set_seed(config.seed)
    unet = build_training_unet(config, len(categories))
    if config.init_from and resume_from is None:
        state = load_init_state_dict(config.init_from, dict(unet.config))
        report = load_matching_weights(unet, state, config.init_from)
        if accelerator.is_main_process:
            _write_json_atomic(out / "init_report.json", report)
            accelerator.print(describe_init_report(report))
        del state
    ema = EMAWeights(unet, config.ema_decay)
    # torch picks the slow per-tensor Adam on CPU by default; the multi-tensor one gives identical results.
    optimizer = torch.optim.Adam(unet.parameters(), lr=config.learning_rate, betas=tuple(config.adam_betas),
                                 weight_decay=config.weight_decay,
                                 foreach=True if accelerator.device.type == "cpu" else None)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    ema.model.to(accelerator.device)
    coefficients = DiffusionCoefficients.from_scheduler(SDASScheduler())
    num_timesteps = len(coefficients.betas)

    start_step = 0
    if resume_from is not None:
        start_step = _load_checkpoint(accelerator, resume_from, ema)
        accelerator.print(f"resumed from {resume_from} at step {start_step}")
    if config.resume and accelerator.is_main_process:
        _truncate_log(out / "train_log.jsonl", start_step)
    if start_step >= total_steps and (out / "pipeline").is_dir():
        accelerator.print(f"training already finished at step {start_step}; pipeline: {out / 'pipeline'}")
        accelerator.end_training()
        return out / "pipeline"

    accum = config.gradient_accumulation_steps
    sampler = _MicroBatchSampler(len(dataset), config, start_step * accum, total_steps * accum,
                                 accelerator.process_index, accelerator.num_processes)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers,
                        pin_memory=accelerator.device.type == "cuda", persistent_workers=False)
    columns, sample_noise = _fixed_sample_plan(config, categories, image_size)

    log_sums = torch.zeros(3, device=accelerator.device, dtype=torch.float32)  # float32: MPS has no float64
    log_count = 0
    step = start_step
    progress = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                    disable=not (config.progress and accelerator.is_local_main_process))
    unet.train()
    for micro, (x0, labels) in enumerate(loader, start=start_step * accum):
        x0 = x0.to(accelerator.device, non_blocking=True)
        labels = labels.to(accelerator.device, non_blocking=True)
        generator = torch.Generator().manual_seed(mix_seed(config.seed, micro, accelerator.process_index, 0xD1FF))
        timesteps = torch.randint(0, num_timesteps, (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator).to(accelerator.device)
        x_t = add_noise(x0, noise, timesteps, coefficients)
        with accelerator.accumulate(unet):
            output = unet(x_t, timesteps.to(accelerator.device), class_labels=labels).sample
            losses = hybrid_loss(output.float(), x0, x_t, noise, timesteps, coefficients=coefficients,
                                 vb_weight=config.vb_weight)
            accelerator.backward(losses["loss"])
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(unet.parameters(), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        log_sums += torch.stack([losses["loss"].detach(), losses["mse"].detach().mean(), losses["vb"].detach().mean()]).float()
        log_count += 1
        if not accelerator.sync_gradients:
            continue

        ema.update(accelerator.unwrap_model(unet))
        step += 1
        progress.update(1)
        if step % config.log_every == 0 or step == total_steps:
            means = accelerator.reduce(log_sums / log_count, reduction="mean").tolist()
            record = {"step": step, "loss": means[0], "mse": means[1], "vb": means[2], "lr": config.learning_rate}
            progress.set_postfix(loss=f"{means[0]:.4f}", mse=f"{means[1]:.4f}", vb=f"{means[2]:.3f}")
            if accelerator.is_main_process:
                with open(out / "train_log.jsonl", "a") as log_file:
                    log_file.write(json.dumps(record) + "\n")
            log_sums.zero_()
            log_count = 0
        if step % config.checkpoint_every == 0 or step == total_steps:
            _save_checkpoint(accelerator, out, step, ema, config)
        if config.sample_every and (step % config.sample_every == 0 or step == total_steps):
            if accelerator.is_main_process:
                grid = render_sample_grid(ema.model, categories, columns, sample_noise, tuple(config.sample_strengths),
                                          config.sample_inference_steps, config.seed)
                _save_grid(grid, out / "samples" / f"step_{step:06d}.png")
            accelerator.wait_for_everyone()
    progress.close()

    if accelerator.is_main_process:
        save_pipeline(ema.model, categories, out / "pipeline")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out / "pipeline"
