"""Speed and agreement of realnet.metrics on a bottle-test-sized set: 83 maps of 256x256, 63 with defects.

Run pinned to one core, as in docs/performance-anchors.md:

    taskset -c 0 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/metrics.py

Times are medians of 5 runs after a warm-up (the official PRO loop is timed once: it takes tens of
seconds). Two algorithms are reimplemented HERE ONLY, as yardsticks:

* "official RealNet PRO": the 1000-threshold loop of RealNet's ``utils/eval_helper.py``
  (thresholds from max down to one step above min, ``filled_image`` overlap over ``area``, FPR
  min-max rescaled, no interpolation at 0.3), to show its cost and how far its value is from the
  exact definition;
* "MVTec reference PRO": the argsort + cumulative-sum algorithm of MVTec AD's evaluation code,
  exact like ours, to check agreement at full scale (brute force is too slow here).

Writes ``benchmarks/out/metrics.json``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from skimage import measure
from sklearn import metrics as skm

from realnet.metrics import evaluate_maps, image_auroc, pixel_auroc, pro_score

NUM_IMAGES, NUM_DEFECTIVE, SIZE = 83, 63, 256


def make_maps(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Smooth noisy float32 maps whose blobs (1-3 per defective image, some touching) score higher."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    masks = np.zeros((NUM_IMAGES, SIZE, SIZE), dtype=np.uint8)
    for index in range(NUM_DEFECTIVE):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(30, SIZE - 30, 2)
            ry, rx = rng.uniform(3, 28, 2)
            angle = rng.uniform(0, np.pi)
            u = (yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)
            v = -(yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
            masks[index] |= ((u / ry) ** 2 + (v / rx) ** 2 <= 1).astype(np.uint8)
    noise = ndimage.gaussian_filter(rng.normal(size=(NUM_IMAGES, SIZE, SIZE)), sigma=(0, 4, 4))
    signal = ndimage.gaussian_filter(masks.astype(np.float64), sigma=(0, 3, 3))
    maps = (0.5 + noise * 2.0 + 0.8 * signal * rng.uniform(0.2, 1.0, (NUM_IMAGES, 1, 1))).astype(np.float32)
    scores = np.stack([ndimage.uniform_filter(m, 16).max() for m in maps]).astype(np.float32)
    labels = masks.reshape(NUM_IMAGES, -1).any(1).astype(np.int64)
    return maps, masks, scores, labels


# ---- yardsticks, reimplemented for this benchmark only -------------------------------------------


def official_realnet_pro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3, steps: int = 1000) -> float:
    """RealNet's 1000-threshold PRO (utils/eval_helper.py), for timing and value comparison only."""
    binary_masks = masks > 0
    regions = [measure.regionprops(measure.label(m, connectivity=2)) for m in binary_masks]
    normal = ~binary_masks
    max_th, min_th = maps.max(), maps.min()
    delta = (max_th - min_th) / steps
    pros, fprs = [], []
    for step in range(steps):
        predicted = maps > max_th - step * delta
        overlaps = []
        for image_predicted, image_regions in zip(predicted, regions):
            for region in image_regions:
                r0, c0, r1, c1 = region.bbox
                hit = image_predicted[r0:r1, c0:c1][region.image_filled].sum()
                overlaps.append(hit / region.area)
        pros.append(np.mean(overlaps))
        fprs.append((predicted & normal).sum() / normal.sum())
    pros, fprs = np.asarray(pros), np.asarray(fprs)
    keep = fprs <= fpr_limit
    fprs, pros = fprs[keep], pros[keep]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return float(skm.auc(fprs, pros))


def mvtec_reference_pro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """The MVTec AD evaluation algorithm (argsort + cumulative sums + trapezoid to x_max)."""
    structure = np.ones((3, 3), dtype=int)
    fp_changes = np.zeros(maps.shape, dtype=np.uint32)
    pro_changes = np.zeros(maps.shape, dtype=np.float64)
    num_ok, num_regions = 0, 0
    for index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure)
        num_regions += count
        ok = labelled == 0
        num_ok += ok.sum()
        fp_changes[index, ok] = 1
        for region in range(1, count + 1):
            region_mask = labelled == region
            pro_changes[index, region_mask] = 1.0 / region_mask.sum()
    flat = maps.ravel()
    order = np.argsort(flat)[::-1]
    sorted_scores = flat[order]
    fprs = np.cumsum(fp_changes.ravel()[order]) / num_ok
    pros = np.cumsum(pro_changes.ravel()[order]) / num_regions
    keep = np.append(np.diff(sorted_scores) != 0, True)
    fprs = np.concatenate(([0.0], fprs[keep]))
    pros = np.concatenate(([0.0], pros[keep]))
    inside = np.searchsorted(fprs, fpr_limit, side="right")
    area = np.trapezoid(pros[:inside], fprs[:inside])
    if fprs[inside - 1] < fpr_limit:
        y = pros[inside - 1] + (pros[inside] - pros[inside - 1]) * (fpr_limit - fprs[inside - 1]) / (fprs[inside] - fprs[inside - 1])
        area += (fpr_limit - fprs[inside - 1]) * (y + pros[inside - 1]) / 2
    return float(area / fpr_limit)


def official_auroc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """sklearn roc_curve + auc with the official ``auc < 0.5 -> 1 - auc`` flip."""
    fpr, tpr, _ = skm.roc_curve(y_true, y_score)
    value = skm.auc(fpr, tpr)
    return float(1 - value if value < 0.5 else value)


# ---- timing --------------------------------------------------------------------------------------


def timed(function, repeats: int = 5) -> tuple[float, float, object]:
    """Median wall time and median CPU time of this process (robust when the core is shared)."""
    function()  # warm-up
    wall, cpu, result = [], [], None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = function()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu), result


def main() -> None:
    torch.set_num_threads(1)
    maps, masks, scores, labels = make_maps()
    flat_maps, flat_masks = maps.ravel(), masks.ravel()
    rows = []

    def add(name, seconds, cpu_seconds, value, note=""):
        rows.append({"what": name, "seconds": seconds, "cpu_seconds": cpu_seconds, "value": value, "note": note})

    for name, function in [
        ("image AUROC (ours)", lambda: image_auroc(scores, labels)),
        ("pixel AUROC (ours)", lambda: pixel_auroc(maps, masks)),
        ("PRO, exact MVTec definition (ours)", lambda: pro_score(maps, masks)),
        ("evaluate_maps: all three, one pass (ours)", lambda: evaluate_maps(maps, masks, scores, labels)),
        ("image AUROC, sklearn roc_curve+auc (official)", lambda: official_auroc(labels, scores)),
        ("pixel AUROC, sklearn roc_curve+auc (official)", lambda: official_auroc(flat_masks, flat_maps)),
        ("pixel AUROC, sklearn roc_auc_score", lambda: skm.roc_auc_score(flat_masks, flat_maps)),
        ("PRO, MVTec reference algorithm (argsort)", lambda: mvtec_reference_pro(maps, masks)),
        ("np.sort of all pixels (float32)", lambda: np.sort(flat_maps) is None),
        ("np.argsort of all pixels", lambda: np.argsort(flat_maps) is None),
        ("torch.sort of all pixels", lambda: torch.sort(torch.from_numpy(flat_maps)) is None),
    ]:
        seconds, cpu_seconds, value = timed(function)
        add(name, seconds, cpu_seconds, value if not isinstance(value, bool) else None)

    start, start_cpu = time.perf_counter(), time.process_time()
    official = official_realnet_pro(maps, masks)
    add("PRO, official RealNet 1000-threshold loop", time.perf_counter() - start, time.process_time() - start_cpu,
        official, "(1 run)")

    ours = rows[3]["value"]
    mvtec = rows[7]["value"]
    print(f"{'what':48s} {'wall s':>8s} {'cpu s':>8s}  value")
    for row in rows:
        value = row["value"]
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v:.6f}" for k, v in value.items())
        elif value is not None:
            value = f"{value:.6f}"
        print(f"{row['what']:48s} {row['seconds']:8.4f} {row['cpu_seconds']:8.4f}  {value or ''} {row['note']}")
    difference = {
        "pro_ours_minus_mvtec_reference": ours["pro"] - mvtec,
        "pro_official_minus_ours": official - ours["pro"],
        "pixel_auroc_ours_minus_sklearn": ours["pixel_auroc"] - rows[6]["value"],
        "image_auroc_ours_minus_sklearn": ours["image_auroc"] - rows[4]["value"],
    }
    print()
    for key, value in difference.items():
        print(f"{key:40s} {value:+.3e}")
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    payload = {
        "setup": {"maps": NUM_IMAGES, "defective": NUM_DEFECTIVE, "size": SIZE, "dtype": "float32",
                  "threads": 1, "repeats": 5, "statistic": "median (wall and process CPU time)",
                  "load_average_at_start": os.getloadavg()[0], "machine": platform.processor() or platform.machine(),
                  "numpy": np.__version__, "torch": torch.__version__},
        "rows": rows,
        "differences": difference,
    }
    temporary = out / "metrics.json.tmp"
    temporary.write_text(json.dumps(payload, indent=2, default=float))
    temporary.replace(out / "metrics.json")
    print(f"\nwrote {out / 'metrics.json'}")


if __name__ == "__main__":
    main()
