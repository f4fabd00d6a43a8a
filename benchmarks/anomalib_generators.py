"""Does sia's generator make anomalib's own DRAEM better than anomalib's stock generator?

Protocol: anomalib's ``Draem`` (its Engine, its training loop, its optimiser and defaults; only the
budget and the image size are ours) trained on the normal training images of each data set with
one anomaly generator per arm, the same budget and seeds for every arm:

- ``anomalib-perlin-dtd``: the stock ``PerlinAnomalyGenerator`` with DTD textures (DRAEM as shipped);
- ``sia-dtd``: ``sia.anomalib.SiaAnomalyGenerator`` with the same DTD textures and the data set's
  foreground preset;
- ``sia-dtd-whole``: sia with the same DTD textures over the whole image (no foreground preset),
  which separates the effect of the foreground restriction from that of the generator;
- ``sia-dtd-draem-opacity``: as ``sia-dtd-whole`` with DRAEM's blend strength: DRAEM keeps a share
  beta ~ U(0.1, 1) of the image, so the texture's opacity is U(0, 0.9) instead of sia's U(0.2, 1);
- ``sia-dtd-stock-area``: as ``sia-dtd-whole`` with the Perlin threshold lowered to 0.45, so that
  the mean mask area matches the stock generator's (about 0.06 of the image instead of 0.04); it
  tests whether the mask statistics are why the stock generator leads;
- ``sia-cutpaste``: sia with CutPaste (no texture data), same foreground preset;
- ``sia-folder``: sia with an SIA folder (``--sia-folder DIR``: whole SDAS samples, blended by
  Eq. 3 under Perlin masks), when one is given;
- ``sia-incontext``: sia with a pre-generated in-context SDAS set (``--incontext-set DIR``, written
  by ``sia generate --images`` into these very training images at this size), each defect with its
  own mask, when one is given.

Images are resized to ``--image-size`` without cropping. The test maps of the last model (raw
DRAEM softmax maps, before anomalib's normalisation) are scored with ``realnet.metrics``: image
AUROC, pixel AUROC and PRO (FPR up to 0.3). With ``--eval-every N`` the same metrics are also taken
every N optimiser steps during training (the run's ``curve``: accuracy vs steps). Each run is written to
``benchmarks/out/anomalib_generators_runs/<data>__<arm>__seed<N>.json`` as soon as it finishes, so
an interrupted benchmark keeps what it measured and a rerun skips finished runs; ``--report``
gathers them (mean ± sd over seeds) into ``benchmarks/out/anomalib_generators.{json,md}``.

    OMP_NUM_THREADS=1 python benchmarks/anomalib_generators.py --image-size 128 --steps 300 --seeds 0,1
    OMP_NUM_THREADS=1 python benchmarks/anomalib_generators.py --data hazelnut_toy --arms sia-dtd,anomalib-perlin-dtd
    python benchmarks/anomalib_generators.py --mask-stats --image-size 64   # what each generator produces
    python benchmarks/anomalib_generators.py --report
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SHARED = Path(os.environ.get("SIA_SHARED_DATA", HERE.parent.parent / "shared" / "data"))
DTD = SHARED / "dtd" / "images"
OUT = HERE / "out"
RUNS = OUT / "anomalib_generators_runs"
WORK = OUT / "anomalib_generators_work"

DATASETS = {
    # name: (root, realnet.data layout, foreground preset)
    "hazelnut_toy": (SHARED / "hazelnut_toy", "folder", "hazelnut-toy"),
    "kolektorsdd": (SHARED / "kolektorsdd", "kolektorsdd", "none"),
}
ARMS = ("anomalib-perlin-dtd", "sia-dtd", "sia-dtd-whole", "sia-dtd-draem-opacity", "sia-dtd-stock-area",
        "sia-cutpaste", "sia-folder", "sia-incontext")
GIVEN_SETS = {"sia-folder": "sia_folder", "sia-incontext": "incontext_set"}  # arm -> the argument naming its data
DRAEM_OPACITY = (0.0, 0.9)  # 1 - beta for DRAEM's beta ~ U(0.1, 1)
STOCK_AREA_THRESHOLD = 0.45  # sia's Perlin threshold whose mean mask area matches PerlinAnomalyGenerator's


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("expected at least one seed")
    return seeds


def parse_names(known):
    def parse(text: str) -> list[str]:
        names = [s.strip() for s in text.split(",") if s.strip()]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown) or '(none)'}; expected some of {', '.join(known)}")
        return names

    return parse


def _save_png(tensor: torch.Tensor, path: Path) -> None:
    from PIL import Image

    array = (tensor.clamp(0, 1) * 255).round().to(torch.uint8)
    array = array.permute(1, 2, 0).numpy() if array.ndim == 3 else array.numpy()
    Image.fromarray(array).save(path)


def materialise(name: str, size: int) -> tuple[Path, dict]:
    """The data set at ``size``² in anomalib's Folder layout (built once), plus the stacked test split."""
    from realnet.data import load_split

    root, layout, _ = DATASETS[name]
    folder = WORK / "data" / f"{name}_{size}"
    train = load_split(root, dataset=layout, split="train", image_size=size)
    test = load_split(root, dataset=layout, split="test", image_size=size)
    items = [test[i] for i in range(len(test))]
    stacked = {
        "images": torch.stack([x["image"] for x in items]),
        "masks": torch.stack([x["mask"][0] for x in items]).numpy(),
        "labels": np.array([x["label"] for x in items]),
    }
    if not (folder / "done").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        for sub in ("train/good", "test/good", "test/bad", "ground_truth/bad"):
            (folder / sub).mkdir(parents=True)
        for i in range(len(train)):
            _save_png(train[i]["image"], folder / "train" / "good" / f"{i:04d}.png")
        for i, item in enumerate(items):
            kind = "bad" if item["label"] else "good"
            _save_png(item["image"], folder / "test" / kind / f"{i:04d}.png")
            if item["label"]:
                _save_png(item["mask"][0], folder / "ground_truth" / "bad" / f"{i:04d}.png")
        (folder / "done").write_text("ok\n")
    return folder, stacked


def sia_settings(arm: str, name: str, sia_folder: str | None, incontext_set: str | None = None) -> dict:
    """The source, foreground and opacity of a sia arm (keywords of `use_sia` / `SiaAnomalyGenerator`)."""
    from sia.synthesizer import AnomalySynthesizer

    if arm == "sia-dtd-stock-area":  # a ready synthesizer fixes its own category and opacity
        return {"source": AnomalySynthesizer(f"dtd:{DTD}", category="none", require_nonempty=True,
                                             perlin_threshold=STOCK_AREA_THRESHOLD)}
    if arm == "sia-folder":  # every image of the folder, whatever its SIA category; the data set's foreground
        from sia.sources import make_source

        return {"source": make_source(f"sia:{sia_folder}"), "category": DATASETS[name][2]}
    source = {"sia-dtd": f"dtd:{DTD}", "sia-dtd-whole": f"dtd:{DTD}", "sia-dtd-draem-opacity": f"dtd:{DTD}",
              "sia-cutpaste": "cutpaste", "sia-incontext": f"sdas-inpaint:{incontext_set}"}[arm]
    whole = arm in ("sia-dtd-whole", "sia-dtd-draem-opacity", "sia-incontext")
    return {"source": source, "category": "none" if whole else DATASETS[name][2],
            "opacity": DRAEM_OPACITY if arm == "sia-dtd-draem-opacity" else None}


def build_model(arm: str, name: str, seed: int, size: int, sia_folder: str | None, incontext_set: str | None = None):
    from anomalib.models import Draem

    from sia.anomalib import use_sia

    model = Draem(dtd_dir=str(DTD), pre_processor=Draem.configure_pre_processor((size, size)), visualizer=False)
    if arm != "anomalib-perlin-dtd":
        use_sia(model, seed=seed, **sia_settings(arm, name, sia_folder, incontext_set))
    return model


@torch.no_grad()
def raw_maps(model, images: torch.Tensor, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """DRAEM's own anomaly maps and scores (before anomalib's min-max normalisation)."""
    network = model.model.eval()
    maps, scores = [], []
    for start in range(0, len(images), batch_size):
        out = network(model.pre_processor.transform(images[start : start + batch_size]))
        maps.append(out.anomaly_map.reshape(len(out.anomaly_map), *images.shape[-2:]).float())
        scores.append(out.pred_score.reshape(-1).float())
    return torch.cat(maps).numpy(), torch.cat(scores).numpy()


def test_curve_callback(test: dict, every: int, curve: list[dict]):
    """A Lightning callback that scores the test maps every ``every`` optimiser steps into ``curve``."""
    from lightning.pytorch.callbacks import Callback

    from realnet.metrics import evaluate_maps

    class TestCurve(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step
            if step % every or step >= trainer.max_steps:  # the final model is scored after fitting
                return
            start = time.perf_counter()
            maps, scores = raw_maps(pl_module, test["images"])
            pl_module.model.train()
            metrics = evaluate_maps(maps, test["masks"], scores, test["labels"])
            curve.append({"step": step, **{k: float(v) for k, v in metrics.items()},
                          "eval_seconds": round(time.perf_counter() - start, 1)})
            print(f"  step {step}: {curve[-1]}", flush=True)

    return TestCurve()


def run(name: str, arm: str, seed: int, args) -> dict:
    from anomalib.callbacks import ModelCheckpoint
    from anomalib.data import Folder
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from realnet.metrics import evaluate_maps

    folder, test = materialise(name, args.image_size)
    seed_everything(seed, workers=True, verbose=False)
    model = build_model(arm, name, seed, args.image_size, args.sia_folder, args.incontext_set)
    datamodule = Folder(
        name=name, root=folder, normal_dir="train/good", abnormal_dir="test/bad", normal_test_dir="test/good",
        mask_dir="ground_truth/bad", train_batch_size=args.batch_size, eval_batch_size=8, num_workers=0,
        val_split_mode="none", seed=seed,
    )
    run_dir = WORK / "engine" / f"{name}__{arm}__seed{seed}"
    curve: list[dict] = []
    callbacks = [ModelCheckpoint(dirpath=run_dir / "weights", save_top_k=0, save_last=False)]
    if args.eval_every:
        callbacks.append(test_curve_callback(test, args.eval_every, curve))
    engine = Engine(
        accelerator="cpu", devices=1, max_steps=args.steps, logger=False, default_root_dir=run_dir,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
    )
    start = time.perf_counter()
    engine.fit(model, datamodule=datamodule)
    train_seconds = time.perf_counter() - start - sum(point["eval_seconds"] for point in curve)
    maps, scores = raw_maps(model, test["images"])
    metrics = evaluate_maps(maps, test["masks"], scores, test["labels"])
    curve.append({"step": args.steps, **{k: float(v) for k, v in metrics.items()}})
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "data": name, "arm": arm, "seed": seed, "image_size": args.image_size, "steps": args.steps,
        "batch_size": args.batch_size, "train_seconds": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / args.steps, 3),
        "generator": type(model.augmenter).__name__,
        **{k: float(v) for k, v in metrics.items()},
        **({"curve": curve} if args.eval_every else {}),
    }


def generator_of(arm: str, name: str, seed: int, sia_folder: str | None, incontext_set: str | None = None):
    """The anomaly generator an arm's DRAEM trains with (DRAEM's own construction for the stock arm)."""
    from anomalib.data.utils.generators import PerlinAnomalyGenerator

    from sia.anomalib import SiaAnomalyGenerator

    if arm == "anomalib-perlin-dtd":
        return PerlinAnomalyGenerator(anomaly_source_path=str(DTD), blend_factor=(0.1, 1.0))  # Draem's default beta
    return SiaAnomalyGenerator(seed=seed, **sia_settings(arm, name, sia_folder, incontext_set))


def mask_statistics(name: str, size: int, arms: list[str], sia_folder: str | None, incontext_set: str | None = None,
                    draws: int = 8) -> list[dict]:
    """What each generator hands DRAEM: how often an image is anomalous, how much of it, how strongly."""
    from realnet.data import load_split

    root, layout, _ = DATASETS[name]
    train = load_split(root, dataset=layout, split="train", image_size=size)
    images = torch.stack([train[i]["image"] for i in range(min(len(train), 16))])
    rows = []
    for arm in arms:
        torch.manual_seed(0)
        generator = generator_of(arm, name, 0, sia_folder, incontext_set)
        anomalous, areas, changes = 0, [], []
        for _ in range(draws):
            out, masks = generator(images)
            for image, result, mask in zip(images, out, masks[:, 0], strict=True):
                if mask.sum() > 0:
                    anomalous += 1
                    areas.append(float(mask.mean()))
                    changes.append(float((result - image).abs().mean(0)[mask > 0.5].mean()))
        rows.append({"data": name, "arm": arm, "image_size": size, "anomalous_fraction": anomalous / (draws * len(images)),
                     "mean_area": float(np.mean(areas)) if areas else 0.0,
                     "mean_change_inside": float(np.mean(changes)) if changes else 0.0})
    test = load_split(root, dataset=layout, split="test", image_size=size)
    masks = [m for m in (test[i]["mask"] for i in range(len(test))) if m.sum() > 0]
    rows.append({"data": name, "arm": "real test defects", "image_size": size, "anomalous_fraction": None,
                 "mean_area": float(np.mean([float(m.mean()) for m in masks])), "mean_change_inside": None})
    return rows


def environment() -> dict:
    import anomalib
    import lightning

    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores",
        "python": platform.python_version(), "torch": torch.__version__, "anomalib": anomalib.__version__,
        "lightning": lightning.__version__, "threads": torch.get_num_threads(),
    }


def aggregate(runs: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["data"], r["arm"], r["image_size"], r["steps"], r["batch_size"]), []).append(r)
    rows = []
    for (data, arm, size, steps, batch), members in sorted(groups.items(), key=lambda kv: (kv[0][0], ARMS.index(kv[0][1]))):
        row = {"data": data, "arm": arm, "image_size": size, "steps": steps, "batch_size": batch,
               "seeds": sorted(m["seed"] for m in members)}
        for key in ("image_auroc", "pixel_auroc", "pro", "train_seconds"):
            values = np.array([m[key] for m in members], dtype=float)
            row[key] = float(values.mean())
            row[f"{key}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| data | generator | image AUROC | pixel AUROC | PRO | train s | seeds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[k]:.3f} ± {r[k + '_sd']:.3f}" for k in ("image_auroc", "pixel_auroc", "pro")]
        lines.append(f"| {r['data']} | {r['arm']} | {' | '.join(cells)} | {r['train_seconds']:.0f} ± {r['train_seconds_sd']:.0f} | {','.join(map(str, r['seeds']))} |")
    return "\n".join(lines)


def statistics_markdown(rows: list[dict]) -> str:
    lines = ["| data | generator | anomalous images | mean anomalous area | mean abs change inside |", "|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[k]:.3f}" if r[k] is not None else "-" for k in ("anomalous_fraction", "mean_area", "mean_change_inside")]
        lines.append(f"| {r['data']} | {r['arm']} | {' | '.join(cells)} |")
    return "\n".join(lines)


CURVE_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def draw_curves(runs: list[dict], path: Path) -> Path | None:
    """PRO vs optimiser step of every run with a curve, one panel per data set, one colour per arm (PIL)."""
    from PIL import Image, ImageDraw

    runs = [r for r in runs if r.get("curve")]
    if not runs:
        return None
    datasets = sorted({r["data"] for r in runs})
    arms = [a for a in ARMS if any(r["arm"] == a for r in runs)]
    width, height, margin = 520, 300, 44
    image = Image.new("RGB", (width * len(datasets), height + 18 * len(arms) + 10), "white")
    draw = ImageDraw.Draw(image)
    max_step = max(point["step"] for r in runs for point in r["curve"])
    for col, name in enumerate(datasets):
        x0, y0, x1, y1 = col * width + margin, 24, (col + 1) * width - 12, height - margin + 20
        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text((x0, y0 - 18), f"{name}: PRO (FPR 0.3) vs DRAEM step", fill="black")
        for value in (0.0, 0.25, 0.5, 0.75, 1.0):
            y = y1 - value * (y1 - y0)
            draw.line([x0 - 4, y, x0, y], fill="black")
            draw.text((x0 - 34, y - 6), f"{value:.2f}", fill="black")
        for step in range(0, max_step + 1, 10):
            x = x0 + step / max_step * (x1 - x0)
            draw.line([x, y1, x, y1 + 4], fill="black")
            draw.text((x - 6, y1 + 6), str(step), fill="black")
        for r in (r for r in runs if r["data"] == name):
            colour = CURVE_COLOURS[arms.index(r["arm"]) % len(CURVE_COLOURS)]
            points = [(x0 + c["step"] / max_step * (x1 - x0), y1 - c["pro"] * (y1 - y0)) for c in r["curve"]]
            draw.line(points, fill=colour, width=2)
            for x, y in points:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    for i, arm in enumerate(arms):
        y = height + 4 + 18 * i
        draw.line([margin, y + 6, margin + 30, y + 6], fill=CURVE_COLOURS[i % len(CURVE_COLOURS)], width=3)
        draw.text((margin + 38, y), f"{arm} (one line per seed)", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def report() -> None:
    runs = [json.loads(p.read_text()) for p in sorted(RUNS.glob("*.json"))]
    if not runs:
        raise SystemExit(f"no runs in {RUNS}")
    rows = aggregate(runs)
    OUT.mkdir(parents=True, exist_ok=True)
    stats_path = OUT / "anomalib_generators_masks.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else []
    (OUT / "anomalib_generators.json").write_text(json.dumps(
        {"environment": environment(), "rows": rows, "runs": runs, "mask_statistics": stats}, indent=2))
    table = markdown(rows) + ("\n\n" + statistics_markdown(stats) if stats else "")
    (OUT / "anomalib_generators.md").write_text(table + "\n")
    print(table)
    if draw_curves(runs, OUT / "anomalib_curves.png"):
        shutil.copyfile(OUT / "anomalib_curves.png", HERE / "anomalib_curves.png")  # the copy RESULTS.md shows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=parse_names(tuple(DATASETS)), default=list(DATASETS), help="comma-separated data sets")
    parser.add_argument("--arms", type=parse_names(ARMS), default=None, help="comma-separated arms (default: all; sia-folder needs --sia-folder)")
    parser.add_argument("--sia-folder", default=None, help="a folder of SIA images for the sia-folder arm")
    parser.add_argument("--incontext-set", default=None,
                        help="an in-context SDAS set (sia generate --images) of the training images for the sia-incontext arm")
    parser.add_argument("--seeds", type=parse_seeds, default=[0, 1], help="comma-separated seeds")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps per run (the budget)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=0,
                        help="also score the test set every N steps (the accuracy-vs-steps curve; 0: only the final model)")
    parser.add_argument("--report", action="store_true", help="only gather finished runs into the table")
    parser.add_argument("--mask-stats", action="store_true",
                        help="only measure what each generator produces (anomalous share, area, change) on the training images")
    args = parser.parse_args()
    if args.report:
        report()
        return
    arms = args.arms or [a for a in ARMS if a not in GIVEN_SETS or getattr(args, GIVEN_SETS[a])]
    for arm, dest in GIVEN_SETS.items():
        if arm in arms and not getattr(args, dest):
            parser.error(f"--arms {arm}: needs --{dest.replace('_', '-')} DIR")
    if args.mask_stats:
        torch.set_num_threads(args.threads)
        stats = [row for name in args.data for row in mask_statistics(name, args.image_size, arms, args.sia_folder, args.incontext_set)]
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "anomalib_generators_masks.json").write_text(json.dumps(stats, indent=2))
        print(statistics_markdown(stats))
        return
    torch.set_num_threads(args.threads)
    RUNS.mkdir(parents=True, exist_ok=True)
    for name in args.data:
        for seed in args.seeds:
            for arm in arms:
                path = RUNS / f"{name}__{arm}__seed{seed}__{args.image_size}px_{args.steps}steps_b{args.batch_size}.json"
                if path.is_file():
                    continue
                result = run(name, arm, seed, args)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(result, indent=2))
                tmp.replace(path)
                print(json.dumps(result), flush=True)
    report()


if __name__ == "__main__":
    main()
