"""The `realnet` command line: train, evaluate and run the RealNet anomaly detector; the end-to-end demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sia.errors import report_input_errors

from .image_size import parse_image_size

app = typer.Typer(
    name="realnet",
    help="RealNet anomaly detector: train on normal images with synthetic anomalies, evaluate, predict, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


IMAGE_SIZE_HELP = ("Size the model runs at (default: its training size): N or HxW (height x width); another size than "
                   "the training one is allowed and announced, since the stored thresholds were calibrated at it.")


@app.command("train")
@report_input_errors(flags={"categories": "--category", "model_kwargs": "--model-option",
                           "recipe_overrides": "--recipe-option"})
def train_command(
    data: Annotated[Path, typer.Option("--data", help="Dataset root (e.g. the MVTec AD folder), or one category folder holding train/ and test/.")],
    source: Annotated[str, typer.Option("--source", help="Anomaly source: 'sia:DIR_OR_HUB_ID' (SIA images; DIR may hold one sub-folder per category), 'dtd:DIR' (texture images), 'cutpaste' or 'sdas-inpaint:MODEL' (in-context SDAS defects painted under each mask on the fly by a saved SDAS pipeline).")],
    output: Annotated[Path, typer.Option("--output", help="Run folder: model/, config.json, train_log.jsonl, checkpoints/.")],
    dataset: Annotated[str, typer.Option(help="Layout of --data: mvtec-ad, visa, mpdd, btad, folder or kolektorsdd.")] = "mvtec-ad",
    category: Annotated[Optional[list[str]], typer.Option("--category", help="Category to train on; repeat for one unified multi-class model, or 'all'. Omit when --data is a single category folder.")] = None,
    foreground: Annotated[Optional[str], typer.Option(help="Foreground preset restricting where anomalies go ('mvtec-ad/hazelnut', 'none', 'auto'); default: the category's official preset, else the whole image.")] = None,
    recipe: Annotated[str, typer.Option(help="Training recipe: 'fast' (converges in a small budget) or 'paper' (official settings); 'fast-no-<change>' ablations too.")] = "fast",
    recipe_option: Annotated[Optional[list[str]], typer.Option("--recipe-option", help="Override one recipe field, KEY=VALUE (JSON value), e.g. learning_rate=3e-4; repeatable.")] = None,
    backbone: Annotated[Optional[str], typer.Option(help="timm backbone name (default wide_resnet50_2, as the paper).")] = None,
    backbone_weights: Annotated[Optional[Path], typer.Option(help="Local backbone weights (.safetensors or weights-only torch file), e.g. the offline EfficientNet-Lite0 file.")] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="Download the timm ImageNet weights of the backbone (ignored with --backbone-weights).")] = True,
    model_option: Annotated[Optional[list[str]], typer.Option("--model-option", help="Extra RealNet config, KEY=VALUE (JSON value), e.g. afs_channels=[24,40,112,256]; repeatable.")] = None,
    image_size: Annotated[str, typer.Option(help="Training size, saved with the model (eval and predict default to it): N for "
                                            "N x N or HxW (height x width, e.g. 640x256 for tall images); each side a "
                                            "multiple of the backbone's stride (32 for the default backbones).")] = "256",
    iterations: Annotated[Optional[int], typer.Option(help="Optimiser steps in all (takes precedence over --epochs).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Passes over the training images (default 1000, as the paper, when --iterations is not given).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per batch and process (default: the recipe's, 16).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of data order, synthetic anomalies and initialisation.")] = 100,
    mixed_precision: Annotated[str, typer.Option(help="'no', 'fp16' (CUDA) or 'bf16'.")] = "no",
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --output from its latest checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Delete what a previous run in --output recorded writing (your own files there stay) and start again.")] = False,
    afs_batches: Annotated[int, typer.Option(help="Batches of 100% synthetic anomalies used once by AFS to choose channels (paper: 64).")] = 64,
    validation_fraction: Annotated[float, typer.Option(help="Share of training images held out for validation and threshold calibration (never trained on).")] = 0.15,
    validate_every: Annotated[int, typer.Option(help="Validate on held-out images + fixed synthetic anomalies every N iterations (0: only as needed by --select).")] = 0,
    select: Annotated[str, typer.Option(help="Which weights to save: 'last' or 'best' on the validation split (never on test data).")] = "last",
    checkpoint_every: Annotated[int, typer.Option(help="Save a resumable checkpoint every N iterations (0: never).")] = 500,
    threshold_fpr: Annotated[float, typer.Option(help="Target false-positive rate on normal images for the stored decision thresholds.")] = 0.01,
    num_workers: Annotated[int, typer.Option(help="DataLoader worker processes for anomaly synthesis.")] = 0,
    mask_threshold: Annotated[float, typer.Option(help="8-bit grey level above which a ground-truth mask pixel is anomalous (0: any non-zero pixel, for exact masks; 127 for lossy/JPEG or anti-aliased masks).")] = 0,
    cpu: Annotated[bool, typer.Option(help="Train on the CPU even if a GPU is available.")] = False,
) -> None:
    """Train RealNet on normal images with synthetic anomalies (multi-GPU: `accelerate launch $(which realnet) train ...`)."""
    from .training import TrainingConfig, parse_key_values, train

    config = TrainingConfig(
        data=str(data), output=str(output), source=source, dataset=dataset, categories=list(category or []),
        foreground=foreground, recipe=recipe, recipe_overrides=parse_key_values(recipe_option, "--recipe-option"),
        backbone=backbone, backbone_weights=str(backbone_weights) if backbone_weights else None,
        model_kwargs={"backbone_pretrained": pretrained, **parse_key_values(model_option, "--model-option")},
        image_size=parse_image_size(image_size, "--image-size"), iterations=iterations, epochs=epochs, batch_size=batch_size, seed=seed,
        mixed_precision=mixed_precision, resume=resume, overwrite=overwrite, afs_batches=afs_batches,
        validation_fraction=validation_fraction, validate_every=validate_every, select=select,
        checkpoint_every=checkpoint_every, threshold_fpr=threshold_fpr, num_workers=num_workers, cpu=cpu,
        mask_threshold=mask_threshold,
    )
    model_dir = train(config)
    typer.echo(f"model saved to {model_dir} (thresholds in {model_dir / 'thresholds.json'}); log: {output / 'train_log.jsonl'}")


@app.command("eval")
@report_input_errors(flags={"categories": "--category"})
def eval_command(
    model: Annotated[str, typer.Option("--model", help="Trained model: a model folder, a training output folder or a Hub id.")],
    data: Annotated[Path, typer.Option("--data", help="Dataset root, or one category folder holding train/ and test/.")],
    dataset: Annotated[str, typer.Option(help="Layout of --data: mvtec-ad, visa, mpdd, btad, folder or kolektorsdd.")] = "mvtec-ad",
    category: Annotated[Optional[list[str]], typer.Option("--category", help="Category to evaluate; repeat for several. Omit when --data is a single category folder.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for metrics.json and overlays/ (image | ground truth | heat map).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 16,
    image_size: Annotated[Optional[str], typer.Option(help=IMAGE_SIZE_HELP)] = None,
    overlays: Annotated[bool, typer.Option("--overlays/--no-overlays", help="Write one overlay PNG per test image (needs --out).")] = True,
    device: Annotated[Optional[str], typer.Option(help="Torch device (default: cuda if available, else cpu).")] = None,
    mask_threshold: Annotated[float, typer.Option(help="8-bit grey level above which a ground-truth mask pixel is anomalous (0: any non-zero pixel, for exact masks; 127 for lossy/JPEG or anti-aliased masks).")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace the results of an earlier run in a non-empty --out (only the files realnet wrote there are deleted).")] = False,
) -> None:
    """Evaluate on a test split: image AUROC, pixel AUROC and PRO (FPR <= 0.3) per category."""
    from .evaluation import evaluate, format_table

    results = evaluate(model, data, dataset=dataset, categories=list(category or []) or [None], out=out,
                       batch_size=batch_size, image_size=_size(image_size), overlays=overlays, device=device,
                       overwrite=overwrite, mask_threshold=mask_threshold)
    typer.echo(format_table(results))
    if out is not None:
        typer.echo(f"metrics written to {out / 'metrics.json'}")


@app.command("predict")
@report_input_errors
def predict_command(
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    model: Annotated[str, typer.Option("--model", help="Trained model: a model folder, a training output folder, a Hub id, or a folder written by `realnet export` (runs with ONNX Runtime / OpenVINO, without torch).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for scores.csv, scores.jsonl, maps/, masks/ and overlays/.")],
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 8,
    image_size: Annotated[Optional[str], typer.Option(help=IMAGE_SIZE_HELP)] = None,
    image_threshold: Annotated[Optional[float], typer.Option(help="Image score at or above which an image is anomalous (default: the model's normal-only calibrated value).")] = None,
    pixel_threshold: Annotated[Optional[float], typer.Option(help="Pixel score at or above which a pixel is anomalous in masks/ (default: the model's calibrated value).")] = None,
    overlays: Annotated[bool, typer.Option("--overlays/--no-overlays", help="Write a heat-map overlay PNG per image.")] = True,
    device: Annotated[Optional[str], typer.Option(help="Torch device (default: cuda if available, else cpu); exported models run on the CPU.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace the results of an earlier run in a non-empty --out (only the files realnet wrote there are deleted).")] = False,
) -> None:
    """Score images: anomaly score, map (.npy + 16-bit PNG), binary mask and overlay per image.

    Every image is decoded before anything is written: a corrupt one stops the run with its name
    and --out stays as it was.
    """
    from .deploy import is_export_folder
    from .predict import predict

    if device is None and not is_export_folder(model):  # an exported model must not load torch
        device = _default_device()
    results = predict(model, images, out, batch_size=batch_size, image_size=_size(image_size),
                      image_threshold=image_threshold, pixel_threshold=pixel_threshold, overlays=overlays,
                      device=device, overwrite=overwrite)
    flagged = sum(1 for r in results if r.is_anomalous)
    typer.echo(f"{len(results)} images scored, {flagged} flagged anomalous; results in {out / 'scores.csv'}")


def _size(text: Optional[str]) -> Optional[tuple[int, int]]:
    return None if text is None else parse_image_size(text, "--image-size")


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@app.command("export")
@report_input_errors
def export_command(
    model: Annotated[str, typer.Option("--model", help="Trained model: a model folder, a training output folder or a Hub id.")],
    out: Annotated[Path, typer.Option("--out", help="Export folder to write: the graph and realnet_export.json (thresholds, config).")],
    format: Annotated[str, typer.Option("--format", help="'onnx' (ONNX Runtime) or 'openvino' (OpenVINO IR, float32).")] = "onnx",
    image_size: Annotated[Optional[str], typer.Option("--image-size", help="Input size of the graph, N or HxW (multiples of the backbone stride, 32); default: the model's.")] = None,
    batch: Annotated[str, typer.Option("--batch", help="'dynamic' (any batch size) or a fixed number of images per run.")] = "dynamic",
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Run the export with its runtime and keep it only if it matches the PyTorch model (maps within 1e-4).")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier export in --out.")] = False,
    precision: Annotated[str, typer.Option("--precision", help="'fp32', 'int8' or 'int8-discriminator' (OpenVINO only): post-training quantisation calibrated on --calibration-images (int8: backbone and reconstruction U-Nets; int8-discriminator: also the discriminator, faster, larger pixel-AUROC cost); its accuracy cost is not checked, measure it.")] = "fp32",
    calibration_images: Annotated[Optional[Path], typer.Option("--calibration-images", help="Folder of normal images (e.g. the training images) to calibrate int8 on; at most 300 are used.")] = None,
) -> None:
    """Export the whole inference graph (normalisation to image score) for deployment without torch."""
    from .export import export_model

    folder = export_model(model, out, format=format, image_size=image_size, batch=batch, overwrite=overwrite,
                          verify=verify, precision=precision, calibration_images=calibration_images)
    typer.echo(f"exported to {folder}; run it with: realnet predict IMAGES --model {folder} --out RESULTS")


@app.command("convert-official")
@report_input_errors
def convert_official_command(
    checkpoint: Annotated[Path, typer.Argument(help="Official RealNet checkpoint (ckpt_best.pth.tar of cnulab/RealNet).")],
    output: Annotated[Path, typer.Argument(help="Model folder to write (config.json, model.safetensors, README.md).")],
    backbone: Annotated[Optional[str], typer.Option(help="timm backbone of the checkpoint; default: read from its "
                                                    "arch entry or recognised from the weights.")] = None,
    image_size: Annotated[str, typer.Option("--image-size", help="Image size the model was trained at, N or HxW (official: 256).")] = "256",
    dataset: Annotated[Optional[str], typer.Option(help="Benchmark it was trained on (mvtec-ad, visa, mpdd, btad), "
                                                   "for the model card's licence and citations.")] = None,
    category: Annotated[Optional[str], typer.Option(help="Category it was trained on, for the model card.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
) -> None:
    """Convert an official RealNet checkpoint into a RealNet model folder (from_pretrained-ready)."""
    from sia.paths import separate_output, writable_folder_path

    from .convert import convert_official_realnet

    separate_output(writable_folder_path(output, "OUTPUT"), [checkpoint], "OUTPUT")
    facts = {k: v for k, v in {"dataset": dataset, "category": category}.items() if v}
    convert_official_realnet(checkpoint, output, backbone=backbone, image_size=image_size, overwrite=overwrite,
                             card_facts=facts)
    typer.echo(f"RealNet model: {output} (load with RealNet.from_pretrained)")



@app.command("demo")
@report_input_errors
def demo_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for the pictures, models and summary.json "
                                        "(must be empty or new, unless --overwrite).")] = Path("sia-demo"),
    preset: Annotated[str, typer.Option("--preset", help="quick (about 5 minutes on 2 CPU cores, the README "
                                         "pictures), tiny (about a minute, rough) or test (seconds, smoke test).")] = "quick",
    seed: Annotated[int, typer.Option("--seed", help="Seed of every stage; the same seed gives the same run.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Reuse a non-empty --out folder, replacing an "
                                             "earlier demo's files (other files are left alone).")] = False,
) -> None:
    """Run the whole pipeline offline on bundled hazelnut photos: train SDAS, sweep strengths, generate
    anomalies, train RealNet, evaluate on real defects (image/pixel AUROC, PRO) and draw pictures."""
    from .demo import run_demo

    run_demo(out=out, preset=preset, seed=seed, overwrite=overwrite, echo=typer.echo)

if __name__ == "__main__":  # `python -m realnet.cli ...` runs the same app as the `realnet` script
    app()
