"""One unified RealNet for hazelnut_toy + KolektorSDD vs one model per data set, at the same total budget.

The ADer benchmark reports the official RealNet collapsing when one model serves many classes
(MVTec multi-class 84.8 / 72.6 / 56.8 vs 99.6 per class). This measures our unified mode
(``realnet train --category A --category B``) on the two shared real sets:

- per-class: one model per data set, ``--iterations`` each;
- unified: one model on both, ``2 x --iterations`` (the same total number of updates), every test
  image scored by that one model.

Both sets at one size (``--image-size``, default 256x128 height x width: a compromise between
hazelnut_toy's square images and KolektorSDD's tall parts, since one model takes one size), fast
recipe, frozen tf_efficientnet_lite0 with the offline ImageNet weights, DTD anomalies, batch 8, the
last model, metrics per data set at that size. The two sets are joined in an MVTec-AD-shaped folder
of symbolic links under ``benchmarks/out/multiclass_data`` (KolektorSDD's seeded normal split is
materialised, so every run sees the same split as ``recipe.py``); no image is copied.

Each run is written to ``benchmarks/out/multiclass_runs/`` as soon as it finishes; ``--report``
prints the table and writes ``benchmarks/out/multiclass.{json,md}``.

    OMP_NUM_THREADS=1 python benchmarks/multiclass.py --iterations 200 --seeds 100,101
    python benchmarks/multiclass.py --report
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from recipe import (  # noqa: E402 - the benchmark's shared protocol
    BACKBONE,
    DATASETS,
    SHARED,
    image_size_argument,
    lite0_weights,
    parse_recipe_spec,
    reset_accelerate,
    seed_list,
    stack_split,
    test_metrics,
)

OUT = HERE / "out"
RUNS = OUT / "multiclass_runs"
UNIFIED_ROOT = OUT / "multiclass_data"
# category folder names in the joined root: "hazelnut-toy" is also the name of its sia foreground
# preset, so the unified run restricts hazelnut anomalies to the nut exactly as the per-class run does
CATEGORIES = {"hazelnut-toy": "hazelnut_toy", "kolektorsdd": "kolektorsdd"}
METRICS = ("image_auroc", "pixel_auroc", "pro")


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target.resolve())


def build_unified_root(root: Path = UNIFIED_ROOT) -> Path:
    """``root/<category>/{train,test,ground_truth}`` of symlinks to the shared images and masks."""
    from realnet.data import load_split

    marker = root / ".complete"
    if marker.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    for category, name in CATEGORIES.items():
        source, layout, subset, _ = DATASETS[name]
        if layout == "folder":  # already train/ + test/ + ground_truth/ in the MVTec layout
            _link(source, root / category)
            continue
        for split in ("train", "test"):
            dataset = load_split(source, dataset=layout, category=subset, split=split, image_size=None)
            for record in dataset.records:
                stem = f"{record.image_path.parent.name}_{record.image_path.stem}"
                kind = "good" if record.label == 0 else "defect"
                _link(record.image_path, root / category / split / kind / f"{stem}{record.image_path.suffix}")
                if record.label == 1 and record.mask_path is not None:
                    _link(record.mask_path, root / category / "ground_truth" / kind / f"{stem}_mask.png")
    marker.write_text("")
    return root


def training_config(categories: list[str], iterations: int, batch_size: int, output: Path, seed: int,
                    size: tuple[int, int], recipe: str = "fast"):
    from realnet.training import TrainingConfig

    recipe_name, overrides, model = parse_recipe_spec(recipe)
    return TrainingConfig(
        data=str(build_unified_root()), output=str(output), source=f"dtd:{SHARED / 'dtd' / 'images'}",
        dataset="mvtec-ad", categories=categories, foreground=None, recipe=recipe_name,
        recipe_overrides=overrides, backbone=BACKBONE,
        backbone_weights=lite0_weights(), model_kwargs={"backbone_pretrained": False, **model}, image_size=size,
        iterations=iterations, batch_size=batch_size, seed=seed, afs_batches=16, validation_fraction=0.15,
        checkpoint_every=50, progress=False, cpu=True, log_every=10, resume=(output / "config.json").is_file(),
    )


def run_name(mode: str, categories: list[str], iterations: int, seed: int, size: tuple[int, int],
             recipe: str = "fast") -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in recipe)
    return f"{size[0]}x{size[1]}__{safe}__{mode}__{'+'.join(categories)}__{iterations}it__seed{seed}"


def run(mode: str, categories: list[str], iterations: int, batch_size: int, seed: int, size: tuple[int, int],
        recipe: str = "fast") -> dict:
    """Train one model on ``categories`` and score it on each category's test split."""
    from realnet.evaluation import load_model
    from realnet.training import CHECKPOINT_DIR, train

    name = run_name(mode, categories, iterations, seed, size, recipe)
    output = OUT / "multiclass_work" / name
    reset_accelerate()
    started = time.perf_counter()
    model_dir = train(training_config(categories, iterations, batch_size, output, seed, size, recipe))
    wall = time.perf_counter() - started
    shutil.rmtree(output / CHECKPOINT_DIR, ignore_errors=True)  # resumable states: GBs, only useful mid-run
    model = load_model(model_dir)
    per_category = {}
    for category in categories:
        images, masks, labels = stack_split(build_unified_root(), "mvtec-ad", category, "test", size)
        per_category[category] = test_metrics(model, images, masks, labels)
        print(f"  {name} {category}: {per_category[category]}", flush=True)
    return {"mode": mode, "categories": categories, "iterations": iterations, "batch_size": batch_size, "seed": seed,
            "image_size": list(size), "recipe_spec": recipe,
            "recipe": json.loads((output / "config.json").read_text())["recipe"], "metrics": per_category,
            "train_wall_seconds": wall}


def save(result: dict) -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    path = RUNS / (run_name(result["mode"], result["categories"], result["iterations"], result["seed"],
                            tuple(result["image_size"]), result["recipe_spec"]) + ".json")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


def comparison(runs: list[dict]) -> list[dict]:
    """Per (size, per-class budget, category): per-class and unified metrics (mean ± sd over seeds) and
    their difference, taken over the seeds both modes have."""
    rows = []
    keys = sorted({(r["recipe_spec"], tuple(r["image_size"]), r["iterations"] // (len(r["categories"])), c)
                   for r in runs for c in r["categories"]})
    for recipe, size, budget, category in keys:
        def values(mode):
            found = {r["seed"]: r["metrics"][category] for r in runs if r["mode"] == mode and tuple(r["image_size"]) == size
                     and r["recipe_spec"] == recipe and r["iterations"] // len(r["categories"]) == budget
                     and category in r["categories"]}
            return found

        single, unified = values("per-class"), values("unified")
        seeds = sorted(set(single) & set(unified))
        if not seeds:
            continue
        a = np.array([[single[s][k] for k in METRICS] for s in seeds])
        b = np.array([[unified[s][k] for k in METRICS] for s in seeds])
        sd = (lambda x: x.std(axis=0, ddof=1).tolist()) if len(seeds) > 1 else (lambda x: [None] * len(METRICS))
        rows.append({"recipe": recipe, "image_size": list(size), "per_class_iterations": budget, "category": category, "seeds": seeds,
                     "per_class": dict(zip(METRICS, a.mean(axis=0).tolist())), "per_class_sd": dict(zip(METRICS, sd(a))),
                     "unified": dict(zip(METRICS, b.mean(axis=0).tolist())), "unified_sd": dict(zip(METRICS, sd(b))),
                     "change": dict(zip(METRICS, (b - a).mean(axis=0).tolist()))})
    return rows


def markdown(rows: list[dict]) -> str:
    def cell(mean, sd):
        return f"{mean:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")

    lines = ["| recipe | size | iterations (per class / unified) | data | seeds | mode | image AUROC | pixel AUROC | PRO |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        size = f"{r['image_size'][0]}x{r['image_size'][1]}"
        budget = f"{r['per_class_iterations']} / {2 * r['per_class_iterations']}"
        seeds = ",".join(map(str, r["seeds"]))
        for mode, key in (("per-class", "per_class"), ("unified", "unified")):
            cells = [cell(r[key][k], r[f"{key}_sd"][k]) for k in METRICS]
            if mode == "unified":
                cells = [f"{c} ({r['change'][k]:+.3f})" for c, k in zip(cells, METRICS)]
            lines.append(f"| `{r['recipe']}` | {size} | {budget} | {CATEGORIES[r['category']]} | {seeds} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report() -> None:
    runs = [json.loads(p.read_text()) for p in sorted(RUNS.glob("*.json"))]
    rows = comparison(runs)
    (OUT / "multiclass.json").write_text(json.dumps({"runs": runs, "comparison": rows}, indent=2) + "\n")
    text = markdown(rows)
    (OUT / "multiclass.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=200, help="per-class budget; the unified model gets twice this")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seeds", type=seed_list, default=[100])
    parser.add_argument("--image-size", type=image_size_argument, default=(256, 128), help="N or HxW for both sets")
    parser.add_argument("--recipe", default="fast",
                        help="recipe name with optional field overrides, as in recipe.py: 'fast:mask_shape=mixed'")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", action="store_true", help="only gather finished runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.report:
        categories = list(CATEGORIES)
        for seed in args.seeds:
            plan = [("per-class", [c], args.iterations) for c in categories]
            plan.append(("unified", categories, 2 * args.iterations))
            for mode, chosen, iterations in plan:
                path = RUNS / (run_name(mode, chosen, iterations, seed, args.image_size, args.recipe) + ".json")
                if path.is_file():
                    print(f"{path.stem}: already measured, skipped")
                    continue
                print(f"{path.stem} ...", flush=True)
                save(run(mode, chosen, iterations, args.batch_size, seed, args.image_size, args.recipe))
    report()


if __name__ == "__main__":
    main()
