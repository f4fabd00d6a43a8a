"""Metrics must equal their textbook definitions exactly, ties included, and never flip an AUROC."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.measure import label as skimage_label
from sklearn.metrics import roc_auc_score

from realnet.metrics import (
    evaluate_maps,
    f1_optimal_threshold,
    image_auroc,
    pixel_auroc,
    pro_curve,
    pro_score,
    quantile_threshold,
)
from sia.errors import InputError


def brute_force_pro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """Independent reference: loop over every distinct score, measure each region's overlap directly."""
    regions = []
    for image_index, mask in enumerate(masks):
        labelled = skimage_label(mask.astype(int), connectivity=2)  # 8-connectivity
        for region_id in range(1, labelled.max() + 1):
            regions.append((image_index, labelled == region_id))
    normal = masks == 0
    points = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        fpr = (predicted & normal).sum() / normal.sum()
        overlaps = [predicted[i][region].sum() / region.sum() for i, region in regions]
        points.append((fpr, float(np.mean(overlaps))))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:  # cut the segment at the limit, interpolating linearly
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def random_case(seed: int, levels: int | None):
    """Small maps with blob masks (several regions, holes, a normal image); `levels` forces ties."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 12, 10), dtype=np.uint8)
    masks[0, 1:5, 1:5] = 1
    masks[0, 2:4, 2:4] = 0  # a region with a hole
    masks[0, 8:11, 6:9] = 1  # a second region in the same image
    masks[1, 0:3, 7:10] = 1
    masks[1, 3, 6] = 1  # diagonal neighbour: joins the region under 8-connectivity only
    masks[2] = rng.random((12, 10)) > 0.8  # many small scattered regions
    # masks[3] stays empty: a normal image
    if levels is None:
        maps = rng.random(masks.shape).astype(np.float32)
    else:
        maps = rng.integers(0, levels, masks.shape).astype(np.float32)
    maps = maps + 0.6 * masks * rng.random(masks.shape)  # anomalies score higher on average
    if levels is not None:
        maps = np.round(maps * 2) / 2
    return maps.astype(np.float32), masks


def test_pro_is_one_for_a_perfect_map():
    masks = np.zeros((3, 32, 32), dtype=np.uint8)
    masks[0, 4:10, 4:12] = 1
    masks[1, 20:30, 3:6] = 1
    maps = masks.astype(np.float32) * 0.5 + 0.25
    assert pro_score(maps, masks) == pytest.approx(1.0, abs=1e-12)


def test_pro_of_an_inverted_map_is_zero():
    masks = np.zeros((2, 16, 16), dtype=np.uint8)
    masks[0, 2:6, 2:6] = 1
    maps = 1.0 - masks.astype(np.float32)
    assert pro_score(maps, masks) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [None, 3, 6])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_pro_matches_brute_force_reference(seed, levels, fpr_limit):
    maps, masks = random_case(seed, levels)
    assert pro_score(maps, masks, fpr_limit=fpr_limit) == pytest.approx(
        brute_force_pro(maps, masks, fpr_limit), abs=1e-10
    )


@pytest.mark.parametrize("fpr_limit", [0.01, 0.1, 0.3, 0.77, 1.0])
def test_pro_paths_agree_on_tied_scores(fpr_limit):
    # pro_score partitions the unsorted normal scores; evaluate_maps reuses a full sort.
    maps, masks = random_case(4, 3)
    expected = brute_force_pro(maps, masks, fpr_limit)
    assert pro_score(maps, masks, fpr_limit) == pytest.approx(expected, abs=1e-10)
    assert evaluate_maps(maps, masks, fpr_limit=fpr_limit)["pro"] == pytest.approx(expected, abs=1e-10)


def test_pro_counts_diagonal_neighbours_as_one_region():
    # An L of 3 pixels plus one pixel touching it only at a corner: ONE region of 4 pixels.
    masks = np.zeros((1, 6, 6), dtype=np.uint8)
    masks[0, 1, 1:3] = 1
    masks[0, 2, 1] = 1
    masks[0, 3, 2] = 1  # touches (2, 1) diagonally
    maps = np.zeros((1, 6, 6), dtype=np.float32)
    maps[0, 3, 2] = 1.0  # only the diagonal pixel is detected, with no false positive
    # One region: PRO is 1/4 at FPR 0, then rises linearly to 1 at FPR 1: area (1/4 + 1)/2 = 0.625.
    # Under 4-connectivity (two regions) PRO at FPR 0 would be (0 + 1)/2 and the area 0.75.
    assert pro_score(maps, masks, fpr_limit=1.0) == pytest.approx(0.625)


def test_pro_analytic_stripe_case():
    # A 400x7 image whose column 3 is one vertical anomalous stripe; scores rise in raster order
    # (score of pixel (r, c) = (7r + c) / 2800), the layout of anomalib's AUPRO golden test.
    # Derivation: going down from the highest score, each row r (from the bottom) adds 3 normal
    # pixels, then its stripe pixel, then 3 normal pixels. After k full rows FPR = 6k/2400 = k/400
    # and PRO = k/400. Within a row the curve runs horizontally 1/800 at height k/400, steps up
    # 1/400, and runs 1/800 at height (k+1)/400, so the area of row k is (2k+1)/320000 and after K
    # rows the area is K^2/320000 = FPR^2/2: the normalised AUPRO at limit L is L/2 wherever L is a
    # row boundary. L = 0.3 is one (K = 120): exactly 0.15. L = 1/3 falls inside row 133's first
    # horizontal run: area = 133^2/320000 + (133/400)(1/3 - 133/400) = 53333/960000, so
    # AUPRO = 159999/960000 = 1/6 - 1/960000.
    masks = np.zeros((1, 400, 7), dtype=np.uint8)
    masks[..., 3] = 1
    preds = torch.arange(2800, dtype=torch.float64).reshape(1, 1, 400, 7) / 2800
    assert pro_score(preds, torch.from_numpy(masks), fpr_limit=0.3) == pytest.approx(0.15, abs=1e-12)
    assert pro_score(preds, masks, fpr_limit=1 / 3) == pytest.approx(159999 / 960000, abs=1e-12)
    assert pro_score(preds, masks, fpr_limit=1 / 3) == pytest.approx(1 / 6, abs=2e-6)
    # Three stripes (columns 1, 3, 5) give three regions and the same curve per row.
    masks3 = np.zeros((1, 400, 7), dtype=np.uint8)
    masks3[..., [1, 3, 5]] = 1
    assert pro_score(preds, masks3, fpr_limit=0.3) == pytest.approx(0.15, abs=1e-12)
    assert pro_score(preds, masks3, fpr_limit=1 / 3) == pytest.approx(1 / 6, abs=2e-6)


def test_pro_curve_is_monotone_and_ends_at_one():
    maps, masks = random_case(0, 4)
    fpr, pro = pro_curve(maps, masks)
    assert fpr[0] == 0 and pro[0] == 0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-12)
    assert fpr[-1] == pytest.approx(1.0) and pro[-1] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(300) > 0.6
    scores = rng.integers(0, 7, 300) + labels * rng.integers(0, 3, 300)  # heavy ties
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    maps = rng.integers(0, 5, (5, 9, 11)).astype(np.float32)
    masks = rng.random((5, 9, 11)) > 0.85
    maps += masks * rng.integers(0, 2, masks.shape)
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)


def test_auroc_is_not_flipped_below_one_half():
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    assert image_auroc(scores, labels) == pytest.approx(0.0)
    masks = np.zeros((1, 4, 4)); masks[0, :2] = 1
    maps = 1.0 - masks + 0.01 * np.arange(16).reshape(1, 4, 4)
    assert pixel_auroc(maps, masks) < 0.5


def test_inputs_accept_torch_and_channel_dimension():
    maps, masks = random_case(1, None)
    reference = evaluate_maps(maps, masks)
    as_torch = evaluate_maps(torch.from_numpy(maps)[:, None], torch.from_numpy(masks)[:, None])
    assert as_torch == pytest.approx(reference)
    assert reference["pro"] == pytest.approx(pro_score(maps, masks))
    assert reference["pixel_auroc"] == pytest.approx(pixel_auroc(maps, masks))
    labels = masks.reshape(4, -1).any(1)
    assert reference["image_auroc"] == pytest.approx(image_auroc(maps.reshape(4, -1).max(1), labels))


def test_evaluate_maps_with_explicit_scores():
    maps, masks = random_case(2, None)
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    result = evaluate_maps(maps, masks, image_scores=scores, labels=[1, 1, 1, 0])
    assert result["image_auroc"] == pytest.approx(1.0)
    assert set(result) == {"image_auroc", "pixel_auroc", "pro"}


def test_bad_inputs_raise_clear_errors():
    maps = np.random.default_rng(0).random((2, 8, 8))
    with pytest.raises(InputError, match="does not match"):
        pro_score(maps, np.zeros((2, 8, 9)))
    with pytest.raises(InputError, match="no anomalous"):
        pro_score(maps, np.zeros((2, 8, 8)))
    with pytest.raises(InputError, match="no normal"):
        pixel_auroc(maps, np.ones((2, 8, 8)))
    with pytest.raises(InputError, match="no normal"):
        image_auroc([0.1, 0.2], [1, 1])
    with pytest.raises(InputError, match="labels"):
        image_auroc([0.1, 0.2, 0.3], [1, 0])
    with pytest.raises(InputError, match="NaN"):
        pixel_auroc(np.full((1, 2, 2), np.nan), np.eye(2)[None])
    with pytest.raises(InputError, match="fpr_limit"):
        pro_score(maps, np.eye(8)[None].repeat(2, 0), fpr_limit=0)
    with pytest.raises(InputError, match="shape"):
        pixel_auroc(np.zeros((2, 3, 4, 5, 6)), np.zeros((2, 3, 4, 5, 6)))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, k: evaluate_maps(np.zeros((0, 8, 8)), np.zeros((0, 8, 8))), "maps: no anomaly maps"),
        (lambda m, k: evaluate_maps(np.zeros((2, 0, 8)), np.zeros((2, 0, 8))), "maps: no anomaly maps"),
        (lambda m, k: pixel_auroc([], []), "maps"),
        (lambda m, k: evaluate_maps(m, k, labels=["ok", "bad"]), "labels: expected numbers or booleans"),
        (lambda m, k: evaluate_maps(m, k, labels=np.array(["0", "1"])), "labels: expected numbers or booleans"),
        (lambda m, k: image_auroc([0.1, 0.9], ["0", "1"]), "labels: expected numbers or booleans"),
        (lambda m, k: f1_optimal_threshold([0.1, 0.9], ["a", "b"]), "labels: expected numbers or booleans"),
        (lambda m, k: pixel_auroc(m, k.astype(str)), "masks: expected numbers or booleans"),
        (lambda m, k: evaluate_maps([m[0], m[1, :4]], k), r"maps: all entries .* same shape, got shapes \(4, 8\), \(8, 8\)"),
        (lambda m, k: evaluate_maps([torch.tensor(m[0]), torch.zeros(8, 9)], k), "maps: all entries .* same shape"),
        (lambda m, k: evaluate_maps(m, [k[0], k[1, :, :4]]), "masks: all entries must have the same shape"),
        (lambda m, k: evaluate_maps([[0.1, 0.2], [0.3]], k), "maps: expected a numpy array or torch tensor"),
    ],
)
def test_evaluate_maps_bad_inputs_are_one_line_input_errors(call, message):
    maps = np.random.default_rng(0).random((2, 8, 8))
    masks = np.zeros((2, 8, 8))
    masks[0, 2:4, 2:4] = 1
    with pytest.raises(InputError, match=message) as err:
        call(maps, masks)
    assert "\n" not in str(err.value)


def test_f1_optimal_threshold_matches_exhaustive_search():
    rng = np.random.default_rng(3)
    labels = rng.random(200) > 0.7
    scores = np.round(rng.random(200) + labels * 0.4, 1)
    threshold, f1 = f1_optimal_threshold(scores, labels)
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = (pred & labels).sum()
        best = max(best, 2 * tp / (pred.sum() + labels.sum()))
    assert f1 == pytest.approx(best)
    pred = scores >= threshold
    assert 2 * (pred & labels).sum() / (pred.sum() + labels.sum()) == pytest.approx(f1)


def test_quantile_threshold():
    scores = np.arange(101, dtype=np.float32)
    assert quantile_threshold(scores, q=0.99) == pytest.approx(99.0)
    assert quantile_threshold(torch.arange(11.0), q=0.5) == pytest.approx(5.0)
    with pytest.raises(InputError):
        quantile_threshold(scores, q=1.5)
    with pytest.raises(InputError):
        quantile_threshold([], q=0.5)
