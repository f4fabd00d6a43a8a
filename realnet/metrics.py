"""Anomaly-detection metrics: image AUROC, pixel AUROC and PRO (MVTec AD definition), exact and fast.

Every metric here is exact: each distinct score is a threshold and tied scores enter the curve
together, so the values equal those of the reference formulas, not of a binned approximation.

Speed comes from one idea: only the *normal* pixels (the large majority) need to be sorted, and
``np.sort`` on float32 is an order of magnitude faster than any ``argsort``. The few anomalous pixels
are placed among the sorted normal scores with ``searchsorted``, which gives both the Mann-Whitney
statistic (AUROC) and, with per-region weights, the whole PRO curve.

Differences from the official RealNet evaluator (``utils/eval_helper.py``), on purpose:

* AUROC is never replaced by ``1 - AUROC`` when below 0.5 (the official code silently flips it).
* PRO follows the MVTec AD definition (``pro_curve_util.compute_pro`` + ``trapezoid(x_max=0.3)``):
  every distinct score is a threshold, the curve is cut at FPR 0.3 with linear interpolation and
  the area is divided by 0.3. The official code samples 1000 equally spaced thresholds (never
  reaching the minimum), min-max rescales the kept FPR values instead of dividing by 0.3, and fills
  region holes in the overlap numerator but not in the area denominator (so a region can score
  above 1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage

from sia.errors import InputError

__all__ = [
    "image_auroc",
    "pixel_auroc",
    "pro_score",
    "pro_curve",
    "evaluate_maps",
    "f1_optimal_threshold",
    "quantile_threshold",
]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------------------------------
# input handling


def _to_numpy(values: Any, name: str) -> np.ndarray:
    """numpy array or torch tensor (any device, any float dtype) -> numpy array, without copying numpy."""
    if isinstance(values, torch.Tensor):
        values = values.detach()
        if values.dtype in (torch.float16, torch.bfloat16):
            values = values.float()
        return values.cpu().numpy()
    if isinstance(values, (list, tuple)) and values and all(isinstance(v, (torch.Tensor, np.ndarray)) for v in values):
        shapes = sorted({tuple(v.shape) for v in values})
        if len(shapes) > 1:
            raise InputError(f"{name}: all entries must have the same shape, got shapes {', '.join(map(str, shapes))}")
        return np.stack([_to_numpy(v, name) for v in values])
    try:
        return np.asarray(values)
    except (TypeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{name}: expected a numpy array or torch tensor of equal-shaped entries ({first})") from None


def _require_numeric(array: np.ndarray, name: str) -> None:
    """Labels and masks are compared with `> 0`, which is meaningless (or a numpy error) for strings."""
    if array.dtype != bool and not np.issubdtype(array.dtype, np.number):
        raise InputError(f"{name}: expected numbers or booleans (1/True = anomalous), got dtype {array.dtype}")


def _as_scores(values: Any, name: str) -> np.ndarray:
    array = _to_numpy(values, name)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        if array.dtype != bool:
            raise InputError(f"{name}: expected numeric scores, got dtype {array.dtype}")
        array = array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating) and np.isnan(array).any():
        raise InputError(f"{name}: contains NaN scores")
    return array


def _as_maps(values: Any, name: str) -> np.ndarray:
    """Accept (N,H,W), (N,1,H,W) or a single (H,W) map; return (N,H,W)."""
    array = _as_scores(values, name)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    elif array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise InputError(f"{name}: expected shape (N, H, W) or (N, 1, H, W), got {tuple(array.shape)}")
    if array.size == 0:
        raise InputError(f"{name}: no anomaly maps (got shape {tuple(array.shape)}); need at least one non-empty map")
    return array


def _as_binary_masks(values: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    array = _to_numpy(values, name)
    _require_numeric(array, name)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    elif array.ndim == 2:
        array = array[None]
    if tuple(array.shape) != tuple(shape):
        raise InputError(f"{name}: shape {tuple(array.shape)} does not match the anomaly maps' shape {tuple(shape)}")
    return array > 0


def _as_labels(values: Any, name: str, length: int) -> np.ndarray:
    array = _to_numpy(values, name).reshape(-1)
    _require_numeric(array, name)
    if array.shape[0] != length:
        raise InputError(f"{name}: {array.shape[0]} labels for {length} scores")
    return array > 0


def _require_both_classes(positives: int, negatives: int, what: str) -> None:
    if positives == 0:
        raise InputError(f"{what}: no anomalous samples (label 1 / mask > 0); the metric needs both classes")
    if negatives == 0:
        raise InputError(f"{what}: no normal samples (label 0 / mask == 0); the metric needs both classes")


# --------------------------------------------------------------------------------------------------
# AUROC


def _mann_whitney_auroc(sorted_negatives: np.ndarray, positives: np.ndarray) -> float:
    """P(positive > negative) + 0.5 P(tie), the exact area under the ROC curve with ties."""
    positives = np.sort(positives)  # sorted queries keep the binary searches cache friendly
    below = np.searchsorted(sorted_negatives, positives, side="left").sum(dtype=np.float64)
    below_or_tied = np.searchsorted(sorted_negatives, positives, side="right").sum(dtype=np.float64)
    return float((below + below_or_tied) / (2.0 * positives.size * sorted_negatives.size))


def image_auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve of image scores vs. image labels (1 = anomalous), ties counted half.

    Never flipped: a detector that ranks backwards scores below 0.5 here (the official code reports
    ``1 - AUROC`` in that case).
    """
    scores = _as_scores(scores, "scores").reshape(-1)
    labels = _as_labels(labels, "labels", scores.shape[0])
    positives, negatives = scores[labels], scores[~labels]
    _require_both_classes(positives.size, negatives.size, "image_auroc")
    return _mann_whitney_auroc(np.sort(negatives), positives)


def _split_pixels(maps: np.ndarray, masks: np.ndarray, sort_normal: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(scores of normal pixels, sorted unless ``sort_normal=False``; scores of anomalous pixels in
    raster order)."""
    flat_maps, flat_masks = maps.reshape(-1), masks.reshape(-1)
    normal = flat_maps[~flat_masks]
    if sort_normal:
        normal.sort()
    return normal, flat_maps[flat_masks]


def pixel_auroc(maps: Any, masks: Any) -> float:
    """Area under the ROC curve over all pixels of all images (normal images included), never flipped."""
    maps = _as_maps(maps, "maps")
    masks = _as_binary_masks(masks, "masks", maps.shape)
    normal, anomalous = _split_pixels(maps, masks)
    _require_both_classes(anomalous.size, normal.size, "pixel_auroc")
    return _mann_whitney_auroc(normal, anomalous)


# --------------------------------------------------------------------------------------------------
# PRO


def _region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Weight 1/area of its region for every anomalous pixel (raster order), and the region count.

    Regions are 8-connected components of each image's mask (``scipy.ndimage.label`` with a 3x3
    structure, as in the MVTec AD evaluation code); regions never join across images. Only the
    bounding box of each image's anomalous pixels is labelled, which keeps this cheap.
    """
    rows_any, cols_any = masks.any(axis=2), masks.any(axis=1)
    region_ids, num_regions = [], 0
    for index in np.flatnonzero(rows_any.any(axis=1)):
        rows, cols = np.flatnonzero(rows_any[index]), np.flatnonzero(cols_any[index])
        crop = masks[index, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        labelled, count = ndimage.label(crop, structure=_EIGHT_CONNECTED)
        region_ids.append(labelled[crop] + (num_regions - 1))  # raster order of the image's pixels
        num_regions += count
    pixel_regions = np.concatenate(region_ids)
    areas = np.bincount(pixel_regions, minlength=num_regions).astype(np.float64)
    return 1.0 / areas[pixel_regions], num_regions


def _top_normal_scores(normal: np.ndarray, fpr_limit: float, is_sorted: bool) -> np.ndarray:
    """The highest normal scores, sorted ascending, down to and including the whole tie group
    that crosses ``fpr_limit`` -- all the PRO integral up to the limit depends on."""
    needed = min(normal.size, int(np.ceil(fpr_limit * normal.size)))
    kth = normal.size - needed
    if is_sorted:
        return normal[np.searchsorted(normal, normal[kth], side="left") :]
    if kth == 0:
        return np.sort(normal)
    partitioned = np.partition(normal, kth)
    boundary = partitioned[kth]
    tied_below = np.count_nonzero(partitioned[:kth] == boundary)
    return np.concatenate((np.full(tied_below, boundary, dtype=normal.dtype), np.sort(partitioned[kth:])))


def _pro_segments(
    top_normal: np.ndarray, num_normal: int, anomalous: np.ndarray, weights: np.ndarray, num_regions: int
):
    """The exact PRO curve as one segment per distinct normal score, from the highest score down.

    ``top_normal`` holds the highest normal scores (ascending, complete tie groups) out of
    ``num_normal``. Lowering the threshold past a distinct normal score ``u`` moves the curve from
    ``(FPR before u, PRO over pixels > u)`` to ``(FPR including u, PRO over pixels >= u)``;
    anomalous scores between two normal scores only add vertical steps, which carry no area.
    Returns ``(fpr_start, fpr_end, pro_start, pro_end)`` arrays.
    """
    boundaries = np.flatnonzero(top_normal[1:] != top_normal[:-1]) + 1
    ascending = top_normal[np.concatenate(([0], boundaries))]
    counts = np.diff(np.concatenate(([0], boundaries, [top_normal.size])))
    fpr_end = np.cumsum(counts[::-1], dtype=np.float64) / num_normal  # descending thresholds
    fpr_start = np.concatenate(([0.0], fpr_end[:-1]))
    # Bucket b = number of (descending) thresholds above a pixel's score; the pixel counts for
    # thresholds b..last-1, so a prefix sum over buckets gives PRO at every threshold. Sorted
    # queries keep the binary searches cache friendly.
    order = np.argsort(anomalous)
    anomalous, weights = anomalous[order], weights[order]
    last = ascending.size
    at_or_above = last - np.searchsorted(ascending, anomalous, side="right")
    strictly_above = last - np.searchsorted(ascending, anomalous, side="left")
    pro_end = np.cumsum(np.bincount(at_or_above, weights=weights, minlength=last + 1)[:last]) / num_regions
    pro_start = np.cumsum(np.bincount(strictly_above, weights=weights, minlength=last + 1)[:last]) / num_regions
    return fpr_start, fpr_end, pro_start, pro_end


def _integrate_pro(fpr_start, fpr_end, pro_start, pro_end, fpr_limit: float) -> float:
    """Trapezoid area of the segments up to ``fpr_limit`` (linearly interpolated there) / fpr_limit."""
    full = np.searchsorted(fpr_end, fpr_limit, side="right")  # segments ending at or before the limit
    area = float(np.sum((fpr_end[:full] - fpr_start[:full]) * (pro_start[:full] + pro_end[:full]))) / 2.0
    if full < fpr_end.size and fpr_start[full] < fpr_limit:
        width = fpr_end[full] - fpr_start[full]
        fraction = (fpr_limit - fpr_start[full]) / width
        pro_at_limit = pro_start[full] + fraction * (pro_end[full] - pro_start[full])
        area += (fpr_limit - fpr_start[full]) * (pro_start[full] + pro_at_limit) / 2.0
    return area / fpr_limit


def _pro_from_split(normal, anomalous, masks, fpr_limit: float, normal_is_sorted: bool) -> float:
    weights, num_regions = _region_weights(masks)
    top = _top_normal_scores(normal, fpr_limit, normal_is_sorted)
    return _integrate_pro(*_pro_segments(top, normal.size, anomalous, weights, num_regions), fpr_limit)


def _check_fpr_limit(fpr_limit: float) -> float:
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise InputError(f"fpr_limit: expected a value in (0, 1], got {fpr_limit}")
    return fpr_limit


def pro_curve(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    """The full per-region-overlap curve: ``(fpr, pro)`` arrays starting at (0, 0), one point per
    distinct normal-pixel score (anomalous-only thresholds add vertical steps, omitted)."""
    maps = _as_maps(maps, "maps")
    masks = _as_binary_masks(masks, "masks", maps.shape)
    normal, anomalous = _split_pixels(maps, masks)
    _require_both_classes(anomalous.size, normal.size, "pro_curve")
    weights, num_regions = _region_weights(masks)
    fpr_start, fpr_end, pro_start, pro_end = _pro_segments(normal, normal.size, anomalous, weights, num_regions)
    fpr = np.concatenate(([0.0], np.repeat(fpr_end, 2)))
    fpr[1::2] = fpr_start
    pro = np.concatenate(([0.0], np.stack([pro_start, pro_end], axis=1).reshape(-1)))
    return fpr, pro


def pro_score(maps: Any, masks: Any, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD definition, exact).

    PRO at a threshold is the mean, over all ground-truth regions (8-connected components of every
    image's mask), of the fraction of the region's pixels scoring at or above the threshold. FPR is
    the fraction of normal pixels (every pixel outside all regions, normal images included) at or
    above it. Every distinct score is a threshold; the curve is integrated with the trapezoid rule
    up to ``fpr_limit`` (linearly interpolated there) and divided by ``fpr_limit``, so a perfect map
    scores 1.0.
    """
    fpr_limit = _check_fpr_limit(fpr_limit)
    maps = _as_maps(maps, "maps")
    masks = _as_binary_masks(masks, "masks", maps.shape)
    normal, anomalous = _split_pixels(maps, masks, sort_normal=False)
    _require_both_classes(anomalous.size, normal.size, "pro_score")
    return _pro_from_split(normal, anomalous, masks, fpr_limit, normal_is_sorted=False)


def evaluate_maps(
    maps: Any,
    masks: Any,
    image_scores: Any | None = None,
    labels: Any | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """Image AUROC, pixel AUROC and PRO in one pass (the normal pixels are sorted once).

    ``image_scores`` defaults to each map's maximum; ``labels`` default to "mask has an anomalous
    pixel", as in the official evaluator. Returns ``{"image_auroc", "pixel_auroc", "pro"}``.
    """
    fpr_limit = _check_fpr_limit(fpr_limit)
    maps = _as_maps(maps, "maps")
    masks = _as_binary_masks(masks, "masks", maps.shape)
    if image_scores is None:
        image_scores = maps.reshape(maps.shape[0], -1).max(axis=1)
    if labels is None:
        labels = masks.reshape(masks.shape[0], -1).any(axis=1)
    scores = _as_scores(image_scores, "image_scores").reshape(-1)
    if scores.shape[0] != maps.shape[0]:
        raise InputError(f"image_scores: {scores.shape[0]} scores for {maps.shape[0]} maps")
    result = {"image_auroc": image_auroc(scores, labels)}
    normal, anomalous = _split_pixels(maps, masks)
    _require_both_classes(anomalous.size, normal.size, "evaluate_maps (pixels)")
    result["pixel_auroc"] = _mann_whitney_auroc(normal, anomalous)
    result["pro"] = _pro_from_split(normal, anomalous, masks, fpr_limit, normal_is_sorted=True)
    return result


# --------------------------------------------------------------------------------------------------
# thresholds


def f1_optimal_threshold(scores: Any, labels: Any) -> tuple[float, float]:
    """The threshold ``t`` maximising F1 of the rule ``score >= t``, and that F1.

    Works on image scores with labels, or on anomaly maps with masks (all pixels pooled), which is
    how the official code picks the threshold of its exported overlays.
    """
    scores = _as_scores(scores, "scores").reshape(-1)
    truth = _as_labels(labels, "labels", scores.shape[0])
    positives = int(truth.sum())
    if positives == 0:
        raise InputError("f1_optimal_threshold: no anomalous samples (label 1 / mask > 0)")
    ascending = np.sort(scores)
    boundaries = np.flatnonzero(ascending[1:] != ascending[:-1]) + 1
    thresholds = ascending[np.concatenate(([0], boundaries))]
    predicted = scores.size - np.searchsorted(ascending, thresholds, side="left")
    true_pos = positives - np.searchsorted(np.sort(scores[truth]), thresholds, side="left")
    f1 = 2.0 * true_pos / (predicted + positives)
    best = int(np.argmax(f1))
    return float(thresholds[best]), float(f1[best])


def quantile_threshold(normal_scores: Any, q: float = 0.99) -> float:
    """A threshold from normal data only: the ``q`` quantile of scores of defect-free images/pixels.

    Use it when no defective examples are available to tune on; ``q`` is the fraction of normal
    samples that should stay below the threshold (expected false-positive rate ``1 - q``).
    """
    if not 0.0 <= q <= 1.0:
        raise InputError(f"q: expected a quantile in [0, 1], got {q}")
    values = _as_scores(normal_scores, "normal_scores").reshape(-1)
    if values.size == 0:
        raise InputError("normal_scores: empty; need scores of normal samples")
    return float(np.quantile(values.astype(np.float64), q))
