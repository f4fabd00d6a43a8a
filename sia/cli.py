"""The `sia` command line: synthesise anomalies (preview), train SDAS, generate, publish, convert, demo."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand

from .errors import report_input_errors

app = typer.Typer(
    name="sia",
    help="Synthesise realistic anomalies: SDAS diffusion (train, generate) and Perlin x foreground blending (preview).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _looks_like_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class _StrengthRangeCommand(TyperCommand):
    """Lets ``--strength 0.1 0.2`` (two values after one flag) reach the option as ``"0.1,0.2"``."""

    def parse_args(self, ctx, args):
        joined, i = [], 0
        while i < len(args):
            token = args[i]
            if token == "--strength" and i + 2 < len(args) and _looks_like_number(args[i + 1]) \
                    and _looks_like_number(args[i + 2]):
                joined += [token, f"{args[i + 1]},{args[i + 2]}"]
                i += 3
                continue
            if token.startswith("--strength=") and i + 1 < len(args) and _looks_like_number(args[i + 1]):
                joined.append(f"{token},{args[i + 1]}")
                i += 2
                continue
            joined.append(token)
            i += 1
        return super().parse_args(ctx, joined)


@app.command("generate", cls=_StrengthRangeCommand)
@report_input_errors(flags={"categories": "--category"})
def generate_command(
    category: Annotated[Optional[list[str]], typer.Option(
        help="Category to generate (a name the model knows, e.g. bottle or mvtec-ad/bottle); repeat or comma-separate for several. "
             "With --images: the one category of the normal images (optional for a one-category model).")] = None,
    model: Annotated[str | None, typer.Option(
        help="Saved SDASPipeline folder, Hugging Face Hub id, or a benchmark name (mvtec-ad, visa, mpdd, btad). Default: "
             "the benchmark's SDAS pipeline on the Hub (sia-realnet/sdas-<benchmark>; override with SIA_SDAS_REPO_<BENCHMARK>).")] = None,
    output: Annotated[Path, typer.Option(help="Dataset folder (imagefolder layout: OUTPUT/<category>/*.png + metadata.jsonl). Re-running resumes.")] = Path("sia-images"),
    strength: Annotated[str, typer.Option(
        help="Anomaly strength s: one number (fixed, e.g. 0.15; 0 = normal images) or two numbers 'MIN MAX' "
             "(s ~ U(MIN, MAX) per image; official: 0.1 0.2). The ddpm sampler is meant for s up to about 0.5, "
             "ddim for 0.01-0.03 (warned above 0.1); larger values run but leave the product behind.")] = "0.1,0.2",
    num_images: Annotated[Optional[int], typer.Option(help="Images per category (default 10000, the released SIA's size; "
                                                       "with --images: one per normal image).")] = None,
    seed: Annotated[int, typer.Option(help="Image i of each category uses seed + i, so any subset can be regenerated exactly; to add new images to a set, use a far-away seed (e.g. 1000000), since seed 1 repeats images 1.. of seed 0.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per UNet call (memory vs speed). Every image keeps its own seed, "
                                            "strength and noise at any batch size; only the float rounding of batched "
                                            "kernels changes, which can move a few pixels by one grey level (the same "
                                            "batch size on the same machine reproduces the files exactly).")] = 16,
    steps: Annotated[int, typer.Option(help="Respaced sampling steps (20 = official timesteps 950, 900, ..., 0).")] = 20,
    sampler: Annotated[str, typer.Option(help="ddpm (official ancestral SDAS sampler) or ddim (deterministic DDIM + s*Sigma noise; use small s, e.g. 0.01-0.03).")] = "ddpm",
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit) of --model; recorded as a commit hash.")] = None,
    device: Annotated[str | None, typer.Option(help="Device, e.g. cpu, cuda, cuda:1 (default: this process's accelerator, or cpu).")] = None,
    dtype: Annotated[str, typer.Option(help="UNet weights dtype: float32, float16 or bfloat16 (half precision on GPU; scheduler math stays float32).")] = "float32",
    images: Annotated[Optional[Path], typer.Option(help="In-context SDAS: a folder of normal images to paint defects into "
                                                   "(sample i uses image i mod N and seed + i); writes each image, its mask "
                                                   "(the defect) under OUTPUT/masks/ and metadata.jsonl. Needs --model.")] = None,
    masks: Annotated[str, typer.Option(help="With --images: 'perlin' (a Perlin x --foreground mask per sample) or a folder "
                                       "of masks named like the images (NAME.png or NAME_mask.png).")] = "perlin",
    foreground: Annotated[str, typer.Option(help="With --masks perlin: where masks may go: none (anywhere), auto, a "
                                            "category recipe (bottle, visa/pcb1, hazelnut-toy, ...).")] = "none",
    denoising_strength: Annotated[float, typer.Option(help="With --images: fraction of the schedule run from the noised "
                                                      "normal image (1 = from the noisiest step).")] = 0.8,
    resamples: Annotated[int, typer.Option(help="With --images: extra RePaint rounds per step (0 = none).")] = 0,
    mask_dilation: Annotated[int, typer.Option(help="With --images: grow masks by this many pixels first.")] = 0,
    mask_feather: Annotated[int, typer.Option(help="With --images: fade the defect in over this many pixels inside the mask edge.")] = 0,
) -> None:
    """Sample SDAS anomaly images into a resumable imagefolder dataset (shard with torchrun/accelerate launch).

    With --images, paint in-context SDAS defects into given normal images instead (masks are the defects).
    """
    if images is not None:
        from .errors import InputError
        from .generate_inpaint import generate_inpainted_dataset

        if model is None:
            raise InputError("--model is needed with --images (a saved SDASPipeline folder or Hub id)")
        if category and len(category) > 1:
            raise InputError("--category: --images takes one category (the normal images' own)")
        summary = generate_inpainted_dataset(
            model=model, output=output, images=images, masks=masks, category=category[0] if category else None,
            num_images=num_images, strength=strength, seed=seed, batch_size=batch_size, steps=steps, sampler=sampler,
            denoising_strength=denoising_strength, resamples=resamples, mask_dilation=mask_dilation,
            mask_feather=mask_feather, foreground=foreground, revision=revision, device=device, dtype=dtype)
    else:
        from .generate import generate_dataset

        summary = generate_dataset(model=model, output=output, categories=category or [],
                                   num_images=10000 if num_images is None else num_images, strength=strength, seed=seed,
                                   batch_size=batch_size, steps=steps, sampler=sampler, revision=revision, device=device,
                                   dtype=dtype)
    if summary.metadata is not None:
        typer.echo(f"{summary.generated} generated, {summary.skipped} already present, {summary.total} images in {summary.output}")


@app.command("train")
@report_input_errors(flags={"data_dir": "--data", "output_dir": "--output", "max_steps": "--steps",
                           "gradient_accumulation_steps": "--gradient-accumulation",
                           "sample_inference_steps": "--sample-steps"})
def train_command(
    data: Annotated[str, typer.Option("--data", help="Folder of normal images: <root>/<category>/train/good/* (MVTec style), "
                                      "<root>/<category>/* (one sub-folder per category) or one folder of images (one category).")],
    output: Annotated[str, typer.Option("--output", help="Run folder: training_config.json, checkpoints/, samples/, train_log.jsonl "
                                        "and the final SDASPipeline in <output>/pipeline (pass that to `sia generate --model`).")],
    categories: Annotated[Optional[str], typer.Option("--categories", help="Comma-separated category sub-folders to train on, in "
                                                      "class-id order (default: all; known benchmark categories keep the official order).")] = None,
    preset: Annotated[str, typer.Option("--preset", help="UNet preset: adm-256 (official SDAS, GPU), small-64 (the official 64 px "
                                        "network, 10.7 M parameters, trains on a CPU in hours) or tiny-32 (CPU demos and tests).")] = "adm-256",
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="Training resolution (bilinear resize, no crop); any "
                                                      "multiple of the preset's down factor. Default: the preset's size (256 for adm-256).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer updates to train for (default 10000 unless --epochs).")] = None,
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="Passes over the images instead of --steps.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per process and micro-batch (official: 5 per GPU).")] = 8,
    gradient_accumulation: Annotated[int, typer.Option("--gradient-accumulation", help="Micro-batches averaged per update "
                                                       "(official: 3, with 4 GPUs x 5 = effective batch 60).")] = 1,
    learning_rate: Annotated[float, typer.Option("--lr", help="Adam learning rate (official 1e-4, no schedule).")] = 1e-4,
    ema_decay: Annotated[float, typer.Option("--ema-decay", help="EMA decay of the weights that are saved and sampled.")] = 0.9999,
    mixed_precision: Annotated[str, typer.Option("--mixed-precision", help="no, fp16 (CUDA) or bf16.")] = "no",
    init_from: Annotated[Optional[str], typer.Option("--init-from", help="Initialise from a diffusers UNet2DModel or pipeline "
                                                     "folder, a Hub id, a .safetensors file or an ADM .pt checkpoint (e.g. OpenAI's "
                                                     "ImageNet 256x256 model); tensors with matching key and shape are copied, the rest "
                                                     "is reported.")] = None,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Save a resumable checkpoint every N steps "
                                                  "(the last 2 are kept).")] = 1000,
    sample_every: Annotated[int, typer.Option("--sample-every", help="Write samples/step_N.png (rows s = 0, 0.1, 0.2 from one "
                                              "fixed noise, EMA weights) every N steps; 0 disables.")] = 1000,
    sample_steps: Annotated[int, typer.Option("--sample-steps", help="Sampling steps for the preview grids.")] = 20,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the initialisation, batches, timesteps and noise.")] = 100,
    horizontal_flip: Annotated[bool, typer.Option("--horizontal-flip/--no-horizontal-flip", help="Random horizontal flips "
                                                  "(the official recipe uses none).")] = False,
    num_workers: Annotated[int, typer.Option("--num-workers", help="Data-loading worker processes.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output from its latest checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete an earlier run in --output and start again.")] = False,
    cpu: Annotated[bool, typer.Option("--cpu", help="Train on the CPU even if a GPU is available.")] = False,
) -> None:
    """Train the class-conditional SDAS diffusion model on normal images (IDDPM hybrid loss, EMA).

    Multi-GPU: `accelerate launch --multi_gpu --num_processes 4 $(which sia) train ...` or
    `torchrun --nproc_per_node 4 $(which sia) train ...` (--batch-size is per process).
    """
    from .training import DiffusionTrainingConfig, train_diffusion

    names = [c.strip() for c in (categories or "").split(",") if c.strip()] or None
    config = DiffusionTrainingConfig(
        data_dir=data, output_dir=output, categories=names, preset=preset, image_size=image_size,
        max_steps=steps, epochs=epochs, batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation,
        learning_rate=learning_rate, ema_decay=ema_decay, mixed_precision=mixed_precision, init_from=init_from,
        checkpoint_every=checkpoint_every, sample_every=sample_every, sample_inference_steps=sample_steps,
        seed=seed, horizontal_flip=horizontal_flip, num_workers=num_workers, resume=resume,
        overwrite=overwrite, cpu=cpu,
    )
    pipeline = train_diffusion(config)
    if os.environ.get("RANK", "0") == "0":  # one line, not one per process under torchrun / accelerate launch
        typer.echo(f"pipeline: {pipeline}")


@app.command("preview")
@report_input_errors
def preview_command(
    images: Annotated[str, typer.Option("--images", help="Folder of normal images to turn into anomalies (any size or mode; "
                                        "sorted, row i uses image i, cycling).")],
    source: Annotated[str, typer.Option("--source", help="Anomaly source: an SIA image folder (or sia:PATH; its <category> "
                                        "sub-folder is used when present), dtd:PATH (texture folder, 3 random augmentations) "
                                        "or cutpaste (content from elsewhere in the same image).")],
    out: Annotated[str, typer.Option("--out", help="PNG file to write: one row per sample, columns normal | anomalous | "
                                     "mask outline (red).")],
    category: Annotated[str, typer.Option("--category", help="Foreground recipe: a benchmark category (bottle, "
                                          "mvtec-ad/bottle, visa/pcb1, ...), none (whole image) or auto (Otsu, polarity "
                                          "chosen by the image border).")] = "none",
    n: Annotated[int, typer.Option("--n", help="Number of rows (samples).")] = 16,
    seed: Annotated[int, typer.Option("--seed", help="Row i uses seed + i; the same seed gives the same grid.")] = 0,
    size: Annotated[int, typer.Option("--size", help="Side of each square panel in pixels (images are resized, no crop).")] = 256,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it already exists.")] = False,
) -> None:
    """Preview synthetic anomalies (Perlin mask x foreground x blended source) as a PNG grid."""
    from .preview import save_preview

    path = save_preview(out, overwrite=overwrite, images=images, source=source, category=category, n=n, seed=seed,
                        size=size)
    typer.echo(f"preview: {path}")


@app.command("push")
@report_input_errors(flags={"staging_dir": "--stage-only", "stage_sia_dataset": "--stage-only"})
def push_command(
    folder: Annotated[Path, typer.Argument(help="SIA folder to publish: the output of `sia generate` or of "
                                             "`sia convert-official` (<category>/* images + metadata.jsonl).")],
    repo_id: Annotated[str, typer.Option("--repo-id", help="Hub dataset repo ORG/NAME (created if missing).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private.")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch to upload to (created if missing); "
                                                      "default: main.")] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="Source benchmark (mvtec-ad, visa, mpdd, btad) "
                                                     "for the card's licence and citations; default: guessed from "
                                                     "the category names.")] = None,
    license: Annotated[Optional[str], typer.Option("--license", help="Licence id for sets made from custom data "
                                                     "(benchmark sets always inherit cc-by-nc-sa-4.0).")] = None,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest parquet shard, e.g. 500MB.")] = "500MB",
    stage_only: Annotated[Optional[Path], typer.Option("--stage-only", help="Only build the upload (parquet "
                                                          "shards + README.md card) in this folder; no network.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="With --stage-only: replace a non-empty folder.")] = False,
) -> None:
    """Publish an SIA folder as a Hub dataset: data/<category>/train-*.parquet + a dataset card."""
    from .hub import push_sia_dataset, stage_sia_dataset

    if stage_only is not None:
        staged = stage_sia_dataset(folder, stage_only, dataset=dataset, repo_id=repo_id, revision=revision,
                                   max_shard_size=max_shard_size, license=license, overwrite=overwrite)
        # `hf` is the CLI of huggingface_hub >= 1.0 (`huggingface-cli` is gone); --delete drops stale shards.
        command = f"hf upload {repo_id} {shlex.quote(str(staged))} --repo-type dataset --delete 'data/**'"
        if revision:
            command += f" --revision {revision}"
        if private:
            command += " --private"
        typer.echo(f"staged: {staged} (upload with `{command}`)")
        return
    url = push_sia_dataset(folder, repo_id, private=private, revision=revision, dataset=dataset,
                           max_shard_size=max_shard_size, license=license)
    typer.echo(f"pushed: {url}")


@app.command("convert-official")
@report_input_errors(flags={"output_dir": "OUTPUT", "sample_size": "--image-size",
                           "num_head_channels": "--head-channels"})
def convert_official_command(
    source: Annotated[Path, typer.Argument(help="An official SDAS diffusion checkpoint (.pt / .pth.tar, e.g. the "
                                             "MVTec-AD epoch-240 EMA weights) or an official SIA folder "
                                             "(<DS>/sdas with one sub-folder of .jpg per category).")],
    output: Annotated[Path, typer.Argument(help="Folder to write: an SDASPipeline (checkpoint) or an SIA set "
                                             "(folder).")],
    dataset: Annotated[str, typer.Option("--dataset", help="Benchmark the source belongs to (mvtec-ad, visa, mpdd, "
                                          "btad): fixes the category order = class ids, licence and citations.")] = "mvtec-ad",
    image_size: Annotated[int | None, typer.Option("--image-size", help="Image size the diffusion model was "
                                                       "trained at. Not stored in the weights: read from the "
                                                       "checkpoint's arch, or 256 for the released layout; "
                                                       "otherwise required.")] = None,
    head_channels: Annotated[int | None, typer.Option("--head-channels", help="Attention head width of the "
                                                          "UNet. Not stored in the weights: read from the "
                                                          "checkpoint's arch, or 64 for the released layout; "
                                                          "otherwise required (or --num-heads).")] = None,
    num_heads: Annotated[int | None, typer.Option("--num-heads", help="Attention heads per layer, instead of "
                                                      "--head-channels (guided-diffusion's num_heads).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output folder.")] = False,
) -> None:
    """Convert official RealNet releases: diffusion checkpoint -> SDASPipeline, SIA images -> SIA set."""
    from .convert import convert_official_sdas, convert_official_sia

    if source.is_dir():
        out = convert_official_sia(source, output, dataset=dataset, overwrite=overwrite)
        typer.echo(f"SIA set: {out} (load with sia.load_sia, publish with `sia push`)")
    else:
        out = convert_official_sdas(source, output, dataset=dataset, sample_size=image_size,
                                    num_head_channels=head_channels, num_heads=num_heads, overwrite=overwrite)
        typer.echo(f"SDAS pipeline: {out} (load with SDASPipeline.from_pretrained)")


@app.command("demo", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def demo_command(ctx: typer.Context) -> None:
    """Run `realnet demo` with the same options (see `realnet demo --help`): the whole pipeline, SDAS
    and RealNet, offline on bundled photos."""
    import importlib.util
    import subprocess
    import sys

    # The demo runs realnet, which sia never imports: it is started as its own process.
    if importlib.util.find_spec("realnet") is None:
        typer.echo("Error: sia demo runs `realnet demo`, but the realnet package is not installed "
                   "(pip install sia installs both)", err=True)
        raise typer.Exit(2)
    try:
        code = subprocess.call([sys.executable, "-m", "realnet.cli", "demo", *ctx.args])
    except OSError as err:
        typer.echo(f"Error: sia demo could not start `realnet demo` ({err})", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:  # the demo got the same Ctrl-C and has stopped
        raise typer.Exit(130) from None
    raise typer.Exit(code)


if __name__ == "__main__":
    app()
