"""What SIA buys a detector: RealNet trained with DTD vs SDAS + Eq. 3 vs in-context SDAS anomalies.

The paper's central claim (SIA makes a better detector than textures) measured at a CPU budget.
Per data set (hazelnut_toy, kolektorsdd):

1. Train the tiny SDAS model of `benchmarks/incontext.py` (tiny-32 + third level, 64², batch 4,
   ``--sdas-steps`` updates) on the set's normal training images (kept in ``--out``; checkpoints
   deleted when training ends).
2. Generate two anomaly sets from it, s ~ U(0.1, 0.2), 20-step ddpm sampler: ``--sia-images``
   whole SDAS samples (the paper's SIA, blended into training images under Perlin masks by
   Eq. 3) and ``--incontext-per-image`` in-context defects painted into each normal training image
   under Perlin (x foreground) masks (``sia generate --images``; denoising strength 0.8).
3. Train RealNet (recipe ``--recipe``, Lite0 with the offline ImageNet weights, batch 8,
   ``--iterations``) per source and seed at the data set's size (``--size``), through
   `benchmarks/recipe.py` (its data, backbone, metrics and protocol: the LAST model, test metrics
   image AUROC, pixel AUROC, PRO up to FPR 0.3).

Each RealNet run is written to ``<out>/runs/<data>__<source>__seed<N>.json`` when it finishes (a
rerun skips it; resumable states are deleted); the table is printed and written to
``benchmarks/out/sia_detector.{json,md}``.

    OMP_NUM_THREADS=1 SIA_SHARED_DATA=DATA python benchmarks/sia_detector.py --seeds 100,101
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import anomalib_generators as folders  # noqa: E402  (the data sets as plain 64² folders)
import incontext  # noqa: E402  (the tiny SDAS model and its training)
import recipe as bench  # noqa: E402

SOURCES = ("dtd", "sdas-eq3", "sdas-incontext")
SIZES = {"hazelnut_toy": (128, 128), "kolektorsdd": (224, 96)}  # KolektorSDD keeps about its tall aspect (2.3 vs 2.5)


def parse_list(kind):
    def parse(text: str) -> list:
        values = [kind(v) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return values

    return parse


def anomaly_sets(name: str, args) -> dict[str, str]:
    """Train the SDAS model of a data set and generate its two sets (each step skipped when done)."""
    from sia.generate import generate_dataset
    from sia.generate_inpaint import generate_inpainted_dataset
    from sia.pipeline import SDASPipeline

    folder, _ = folders.materialise(name, incontext.SIZE)
    normal = folder / "train" / "good"
    work = args.out / name
    start = time.perf_counter()
    model = incontext.train_model(folder, work, args.sdas_steps, seed=0)
    timings = {"sdas_train_s": time.perf_counter() - start}
    category = SDASPipeline.from_pretrained(model).categories[0]
    start = time.perf_counter()
    generate_dataset(model, work / "sia", categories=[category], num_images=args.sia_images, strength=(0.1, 0.2),
                     seed=0, batch_size=8, steps=20, device="cpu", progress=False)
    timings["sia_generate_s"] = time.perf_counter() - start
    start = time.perf_counter()
    count = args.incontext_per_image * len(list(normal.iterdir()))
    generate_inpainted_dataset(model, work / "incontext", images=normal, masks="perlin", num_images=count,
                               strength=(0.1, 0.2), seed=0, batch_size=8, steps=20,
                               foreground=folders.DATASETS[name][2], device="cpu", progress=False)
    timings["incontext_generate_s"] = time.perf_counter() - start
    (work / "timings.json").write_text(json.dumps(timings, indent=2))
    print(f"{name}: anomaly sets ready ({timings})", flush=True)
    return {"dtd": None, "sdas-eq3": f"sia:{work / 'sia' / category}", "sdas-incontext": f"sdas-inpaint:{work / 'incontext'}"}


def run_detector(name: str, source: str, spec: str | None, seed: int, args) -> dict:
    from realnet.evaluation import load_model
    from realnet.training import CHECKPOINT_DIR, train

    size = SIZES[name]
    output = args.out / "realnet" / f"{name}__{source}__seed{seed}"
    config = bench.training_config(name, args.recipe, args.iterations, 8, output, seed, size=size)
    if spec is not None:
        config = dataclasses.replace(config, source=spec)
    bench.reset_accelerate()
    start = time.perf_counter()
    model_dir = train(config)
    wall = time.perf_counter() - start
    shutil.rmtree(output / CHECKPOINT_DIR, ignore_errors=True)
    images, masks, labels = bench.stack_split(*bench.DATASETS[name][:3], "test", size)
    metrics = bench.test_metrics(load_model(model_dir), images, masks, labels)
    return {"data": name, "source": source, "seed": seed, "image_size": list(size), "recipe": args.recipe,
            "iterations": args.iterations, "train_seconds": round(wall, 1), **{k: float(v) for k, v in metrics.items()}}


def table(runs: list[dict]) -> str:
    lines = ["| data | size (H x W) | source | seeds | image AUROC | pixel AUROC | PRO | train wall (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["data"] for r in runs):
        for source in SOURCES:
            rows = [r for r in runs if r["data"] == name and r["source"] == source]
            if not rows:
                continue

            def cell(key: str) -> str:
                values = [r[key] for r in rows]
                return f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")

            size = "x".join(map(str, rows[0]["image_size"]))
            seeds = ",".join(str(r["seed"]) for r in rows)
            wall = statistics.mean(r["train_seconds"] for r in rows)
            lines.append(f"| {name} | {size} | {source} | {seeds} | {cell('image_auroc')} | {cell('pixel_auroc')} | "
                         f"{cell('pro')} | {wall:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=parse_list(str), default=list(SIZES), help="comma-separated data sets")
    parser.add_argument("--sources", type=parse_list(str), default=list(SOURCES), help="comma-separated: " + ", ".join(SOURCES))
    parser.add_argument("--seeds", type=parse_list(int), default=[100, 101])
    parser.add_argument("--recipe", default="fast")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--sdas-steps", type=int, default=300, help="SDAS training updates per data set")
    parser.add_argument("--sia-images", type=int, default=200)
    parser.add_argument("--incontext-per-image", type=int, default=4)
    parser.add_argument("--out", type=Path, default=HERE / "out" / "sia_detector")
    args = parser.parse_args()
    unknown = [s for s in args.sources if s not in SOURCES] + [d for d in args.data if d not in SIZES]
    if unknown:
        parser.error(f"unknown data set or source: {', '.join(unknown)}")
    torch.set_num_threads(1)
    runs_dir = args.out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    for name in args.data:
        specs = anomaly_sets(name, args)
        for seed in args.seeds:
            for source in args.sources:
                path = runs_dir / f"{name}__{source}__seed{seed}__{args.recipe}_{args.iterations}it.json"
                if path.is_file():
                    continue
                result = run_detector(name, source, specs[source], seed, args)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(result, indent=2))
                tmp.replace(path)
                print(json.dumps(result), flush=True)
    runs = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]
    text = table(runs)
    print(text)
    out = HERE / "out"
    (out / "sia_detector.json").write_text(json.dumps({"runs": runs}, indent=2))
    (out / "sia_detector.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
