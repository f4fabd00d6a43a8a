"""Throughput of the synthetic-anomaly augmentation (Perlin x foreground x blend) on one CPU thread.

Protocol (performance-anchors.md): 256 x 256, bottle foreground preset, SIA-style folder source
(decoded images cached after warm-up), ``torch.set_num_threads(1)``, median of repeated timed runs
after warm-up. Run pinned for comparable figures: ``taskset -c 0 python benchmarks/augment.py``.
Official code: 13.7 ms per sample (foreground 4.9, Perlin + rotation 6.0, blend 0.7); target
>= 365 samples/s (<= 2.7 ms per sample).

Images: ``../shared/data/hazelnut_toy/train/good`` when present (real photographs), otherwise
generated object-on-background images. Writes ``benchmarks/out/augment.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sia.blend import blend, sample_opacity
from sia.foreground import foreground_masks
from sia.images import list_images, load_image_tensor
from sia.perlin import perlin_masks
from sia.sources import sample_batch
from sia.synthesizer import AnomalySynthesizer

ROOT = Path(__file__).resolve().parent
REAL_IMAGES = ROOT.parent.parent / "shared" / "data" / "hazelnut_toy" / "train" / "good"


def _generated_folder(folder: Path, count: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(count):
        cy, cx, r = rng.uniform(0.35, 0.65, 2).tolist() + [rng.uniform(0.2, 0.35)]
        inside = (yy / size - cy) ** 2 + (xx / size - cx) ** 2 < r**2
        image = np.where(inside[..., None], rng.integers(20, 60, 3), rng.integers(170, 230, 3)).astype(np.float64)
        image += rng.normal(0, 8, image.shape)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def _median_rate(fn, samples_per_call: int, calls: int, repeats: int) -> float:
    fn()
    rates = []
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(calls):
            fn()
        rates.append(samples_per_call * calls / (time.process_time() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=8, help="batched calls per timed run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    size, batch = args.size, args.batch

    with tempfile.TemporaryDirectory() as tmp:
        folder = REAL_IMAGES if REAL_IMAGES.is_dir() else _generated_folder(Path(tmp) / "images", 32, size)
        files = list_images(folder)
        images = torch.stack([load_image_tensor(f, size=(size, size)) for f in files])
        images = images[torch.arange(batch) % len(images)]
        synth = AnomalySynthesizer(str(folder), category="bottle")
        generator = torch.Generator().manual_seed(0)
        for _ in range(len(files) * 4):  # fill the source cache, as during training
            synth.source.sample(images[0], generator)

        per_sample_calls = args.calls * batch
        counter = iter(range(10**9))
        rows = {
            "per-sample (synth(image, seed))": _median_rate(
                lambda: [synth(images[i % batch], seed=next(counter)) for i in range(per_sample_calls)],
                per_sample_calls, 1, args.repeats,
            ),
            f"batched (synthesize_batch, B={batch})": _median_rate(
                lambda: synth.synthesize_batch(images, generator), batch, args.calls, args.repeats
            ),
        }
        masks = perlin_masks(batch, size, size, generator)
        sources = sample_batch(synth.source, images, generator)
        opacity = sample_opacity(batch, synth.opacity, generator)
        parts = {
            f"  foreground (bottle, B={batch})": lambda: foreground_masks(images, synth.foreground),
            f"  perlin + rotation (B={batch})": lambda: perlin_masks(batch, size, size, generator),
            f"  source sample (cached, B={batch})": lambda: sample_batch(synth.source, images, generator),
            f"  blend (B={batch})": lambda: blend(images, sources, masks, opacity),
        }
        for name, fn in parts.items():
            rows[name] = _median_rate(fn, batch, args.calls, args.repeats)

    official_ms = 13.7
    print(f"augmentation at {size}x{size}, 1 thread, images: {folder if REAL_IMAGES.is_dir() else 'generated'}")
    print(f"{'what':44s} {'samples/s':>10s} {'ms/sample':>10s} {'vs official':>12s}")
    for name, rate in rows.items():
        speedup = official_ms / (1000.0 / rate)
        print(f"{name:44s} {rate:10.1f} {1000.0 / rate:10.3f} {speedup:11.1f}x")
    result = {
        "size": size,
        "batch": batch,
        "threads": 1,
        "official_ms_per_sample": official_ms,
        "target_samples_per_s": 365,
        "samples_per_s": {name.strip(): round(rate, 1) for name, rate in rows.items()},
        "ms_per_sample": {name.strip(): round(1000.0 / rate, 3) for name, rate in rows.items()},
    }
    out_dir = ROOT / "out"
    out_dir.mkdir(exist_ok=True)
    tmp_path = out_dir / "augment.json.tmp"
    tmp_path.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_path, out_dir / "augment.json")
    print(f"wrote {out_dir / 'augment.json'}")


if __name__ == "__main__":
    main()
