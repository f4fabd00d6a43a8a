"""Dataset readers on fabricated folder trees of every supported layout, and their error messages."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from realnet.data import (
    AnomalyDataset,
    SampleRecord,
    available_categories,
    load_split,
    split_normal_records,
)
from sia.errors import InputError

SIZE = 16


def write_image(path: Path, value: int = 128, size: tuple[int, int] = (SIZE, SIZE)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((size[0], size[1], 3), value, dtype=np.uint8)
    array[0, 0] = (255 - value, 0, 0)
    Image.fromarray(array).save(path)
    return path


def write_mask(path: Path, box=(2, 6, 3, 9), size: tuple[int, int] = (SIZE, SIZE), value: int = 255) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros(size, dtype=np.uint8)
    top, bottom, left, right = box
    array[top:bottom, left:right] = value
    Image.fromarray(array).save(path)
    return path


def make_mvtec(root: Path, category: str = "bottle", mask_suffix: str = "_mask", normal="good", defect="broken",
               ext: str = ".png") -> Path:
    cat = root / category
    for i in range(3):
        write_image(cat / "train" / normal / f"{i:03d}{ext}", 100 + i)
    for i in range(2):
        write_image(cat / "test" / normal / f"{i:03d}{ext}", 90 + i)
        write_image(cat / "test" / defect / f"{i:03d}{ext}", 200 + i)
        write_mask(cat / "ground_truth" / defect / f"{i:03d}{mask_suffix}.png")
    return cat


def check_test_items(dataset: AnomalyDataset, category: str):
    assert len(dataset) == 4
    assert sorted(dataset.labels) == [0, 0, 1, 1]
    for item in (dataset[i] for i in range(len(dataset))):
        assert item["image"].shape == (3, SIZE, SIZE) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, SIZE, SIZE)
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert item["category"] == category
        assert Path(item["path"]).is_file()
        if item["label"] == 1:
            assert item["mask"].sum() == 4 * 6
        else:
            assert item["mask"].sum() == 0


@pytest.mark.parametrize("suffix", ["_mask", ""])
def test_mvtec_layout_with_and_without_mask_suffix(tmp_path, suffix):
    make_mvtec(tmp_path, mask_suffix=suffix)
    train = load_split(tmp_path, "MVTec-AD", "bottle", "train", image_size=SIZE)
    assert len(train) == 3 and train.labels == [0, 0, 0]
    check_test_items(load_split(tmp_path, "mvtec", "bottle", "test", image_size=SIZE), "bottle")


def test_category_folder_as_root_and_resize_without_crop(tmp_path):
    cat = make_mvtec(tmp_path, category="toy")
    dataset = load_split(cat, "mvtec-ad", None, "test", image_size=(8, 12))
    item = next(dataset[i] for i in range(len(dataset)) if dataset[i]["label"] == 1)
    assert item["image"].shape == (3, 8, 12) and item["mask"].shape == (1, 8, 12)
    assert item["category"] == "toy"
    # nearest-resized box rows 2..5 of 16 -> rows 1..2 of 8; cols 3..8 of 16 -> about 2..6 of 12
    assert item["mask"][0, :, 0].sum() == 0 and item["mask"][0].sum() > 0


def test_mpdd_layout(tmp_path):
    make_mvtec(tmp_path, category="tubes", defect="anomalous")
    check_test_items(load_split(tmp_path, "mpdd", "tubes", "test", image_size=SIZE), "tubes")


def test_btad_layout(tmp_path):
    make_mvtec(tmp_path, category="01", mask_suffix="", normal="ok", defect="ko", ext=".bmp")
    assert len(load_split(tmp_path, "btad", "01", "train", image_size=SIZE)) == 3
    dataset = load_split(tmp_path, "BTAD", "01", "test", image_size=SIZE)
    check_test_items(dataset, "01")
    assert {dataset[i]["defect_type"] for i in range(4)} == {"ok", "ko"}


def test_visa_folder_layout(tmp_path):
    make_mvtec(tmp_path, category="candle", mask_suffix="", normal="ok", defect="ko", ext=".JPG")
    check_test_items(load_split(tmp_path, "visa", "candle", "test", image_size=SIZE), "candle")


def test_visa_csv_layout(tmp_path):
    rows = []
    for cat in ("candle", "pcb1"):
        for i in range(3):
            rows.append([cat, "train", "normal", f"{cat}/Data/Images/Normal/{i:03d}.JPG", ""])
            write_image(tmp_path / rows[-1][3])
        for i in range(2):
            rows.append([cat, "test", "normal", f"{cat}/Data/Images/Normal/1{i:02d}.JPG", ""])
            write_image(tmp_path / rows[-1][3])
            rows.append([cat, "test", "anomaly", f"{cat}/Data/Images/Anomaly/{i:03d}.JPG", f"{cat}/Data/Masks/Anomaly/{i:03d}.png"])
            write_image(tmp_path / rows[-1][3], 220)
            write_mask(tmp_path / rows[-1][4], value=3)  # VisA masks hold class ids, not 255
    (tmp_path / "split_csv").mkdir()
    with open(tmp_path / "split_csv" / "1cls.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    assert available_categories(tmp_path, "visa") == ["candle", "pcb1"]
    assert len(load_split(tmp_path, "visa", "pcb1", "train", image_size=SIZE)) == 3
    check_test_items(load_split(tmp_path, "visa", "candle", "test", image_size=SIZE), "candle")
    unified = load_split(tmp_path, "visa", "all", "test", image_size=SIZE)
    assert unified.categories == ["candle", "pcb1"] and len(unified) == 8
    with pytest.raises(InputError, match="available: candle, pcb1"):
        load_split(tmp_path, "visa", "cashew", "test")


def test_generic_folder_with_train_and_test(tmp_path):
    cat = make_mvtec(tmp_path, category="widgets", defect="scratch")
    check_test_items(load_split(cat, "folder", None, "test", image_size=SIZE), "widgets")


def test_generic_flat_folder_is_split_deterministically(tmp_path):
    for i in range(10):
        write_image(tmp_path / "parts" / "good" / f"g{i}.png", 50 + i)
    for i in range(3):
        write_image(tmp_path / "parts" / "dent" / f"d{i}.png", 200)
        write_mask(tmp_path / "parts" / "masks" / f"d{i}.png")
    root = tmp_path / "parts"
    train = load_split(root, "folder", split="train", image_size=SIZE, seed=1)
    test = load_split(root, "folder", split="test", image_size=SIZE, seed=1)
    assert len(train) == 8 and len(test) == 5
    assert not {r.image_path for r in train.records} & {r.image_path for r in test.records}
    assert sum(test.labels) == 3 and all(test[i]["mask"].sum() == 24 for i in range(5) if test[i]["label"])
    again = load_split(root, "folder", split="test", image_size=SIZE, seed=1)
    assert [r.image_path for r in again.records] == [r.image_path for r in test.records]
    other = load_split(root, "folder", split="test", image_size=SIZE, seed=2)
    assert {r.image_path for r in other.records} != {r.image_path for r in test.records}


def test_kolektor_layout_and_split(tmp_path):
    for folder in range(4):
        for part in range(3):
            base = tmp_path / f"kos{folder:02d}" / f"Part{part}"
            write_image(base.with_suffix(".jpg"), 120, size=(24, 10))
            defective = folder == 0 and part == 1
            write_mask(base.parent / f"Part{part}_label.png", size=(24, 10), box=(3, 9, 2, 5) if defective else (0, 0, 0, 0))
    train = load_split(tmp_path, "kolektorsdd", split="train", image_size=(24, 10), normal_test_fraction=0.25)
    test = load_split(tmp_path, "kolektorsdd", split="test", image_size=(24, 10), normal_test_fraction=0.25)
    assert len(train) + len(test) == 12 and sum(test.labels) == 1 and sum(train.labels) == 0
    assert len(test) == 1 + round(0.25 * 11)
    item = next(test[i] for i in range(len(test)) if test[i]["label"] == 1)
    assert item["mask"].sum() == 6 * 3 and item["category"] == "kolektorsdd"


def test_split_normal_records_ignores_input_order():
    records = [SampleRecord(Path(f"/x/{i}.png"), int(i % 4 == 0), None, "c", "t") for i in range(20)]
    forward = split_normal_records(records, "test", seed=3, normal_test_fraction=0.5)
    backward = split_normal_records(records[::-1], "test", seed=3, normal_test_fraction=0.5)
    assert forward == backward
    assert all(r.label == 0 for r in split_normal_records(records, "train", seed=3))


def test_unified_mode_over_several_categories(tmp_path):
    make_mvtec(tmp_path, "bottle")
    make_mvtec(tmp_path, "cable")
    dataset = load_split(tmp_path, "mvtec-ad", ["bottle", "cable"], "train", image_size=SIZE)
    assert len(dataset) == 6 and {dataset[i]["category"] for i in range(6)} == {"bottle", "cable"}
    assert len(load_split(tmp_path, "mvtec-ad", "all", "test", image_size=SIZE)) == 8


def test_missing_category_lists_available(tmp_path):
    make_mvtec(tmp_path, "bottle")
    make_mvtec(tmp_path, "cable")
    with pytest.raises(InputError, match=r"screw.*available.*bottle, cable"):
        load_split(tmp_path, "mvtec-ad", "screw", "train")
    with pytest.raises(InputError, match="no such dataset folder"):
        load_split(tmp_path / "nope", "mvtec-ad", "bottle")
    with pytest.raises(InputError, match="unknown dataset"):
        load_split(tmp_path, "imagenet", "bottle")
    with pytest.raises(InputError, match="split"):
        load_split(tmp_path, "mvtec-ad", "bottle", "val")


def test_missing_mask_is_an_error_unless_allowed(tmp_path):
    make_mvtec(tmp_path)
    missing = tmp_path / "bottle" / "ground_truth" / "broken" / "001_mask.png"
    missing.unlink()
    with pytest.raises(InputError, match=r"001\.png.*no ground-truth mask"):
        load_split(tmp_path, "mvtec-ad", "bottle", "test")
    dataset = load_split(tmp_path, "mvtec-ad", "bottle", "test", image_size=SIZE, allow_missing_masks=True)
    item = next(dataset[i] for i in range(4) if dataset[i]["path"].endswith("broken/001.png"))
    assert item["mask"].sum() == SIZE * SIZE


def test_mask_of_another_size_than_its_image_is_an_error(tmp_path):
    make_mvtec(tmp_path)
    mask = write_mask(tmp_path / "bottle" / "ground_truth" / "broken" / "000_mask.png", box=(4, 12, 6, 18), size=(32, 24))
    dataset = load_split(tmp_path, "mvtec-ad", "bottle", "test", image_size=SIZE)
    index = next(i for i, r in enumerate(dataset.records) if r.image_path.name == "000.png" and r.label == 1)
    with pytest.raises(InputError) as info:
        dataset[index]
    message = str(info.value)
    assert "\n" not in message and str(mask) in message and str(dataset.records[index].image_path) in message
    assert "24x32" in message and f"{SIZE}x{SIZE}" in message


def test_mask_of_the_image_size_is_resized_with_the_image(tmp_path):
    make_mvtec(tmp_path)
    write_image(tmp_path / "bottle" / "test" / "broken" / "000.png", 200, size=(32, 32))
    write_mask(tmp_path / "bottle" / "ground_truth" / "broken" / "000_mask.png", box=(4, 12, 6, 18), size=(32, 32))
    dataset = load_split(tmp_path, "mvtec-ad", "bottle", "test", image_size=SIZE)
    item = next(dataset[i] for i in range(4) if dataset[i]["path"].endswith("broken/000.png"))
    assert item["mask"].shape == (1, SIZE, SIZE) and item["mask"].sum() == 4 * 6


def test_corrupt_image_is_an_input_error(tmp_path):
    make_mvtec(tmp_path)
    bad = tmp_path / "bottle" / "train" / "good" / "001.png"
    bad.write_bytes(b"not a png at all")
    dataset = load_split(tmp_path, "mvtec-ad", "bottle", "train", image_size=SIZE)
    with pytest.raises(InputError, match="001.png"):
        dataset[1]


def test_empty_train_set_is_an_error(tmp_path):
    make_mvtec(tmp_path)
    for path in (tmp_path / "bottle" / "train" / "good").iterdir():
        path.unlink()
    with pytest.raises(InputError, match=r"bottle.*train split holds no images"):
        load_split(tmp_path, "mvtec-ad", "bottle", "train")
    (tmp_path / "bottle" / "train" / "good").rmdir()
    (tmp_path / "bottle" / "train").rmdir()
    with pytest.raises(InputError, match=r"train: no such split folder \(found: test\)"):
        load_split(tmp_path, "mvtec-ad", "bottle", "train")


def test_batches_collate_with_default_loader(tmp_path):
    make_mvtec(tmp_path)
    dataset = load_split(tmp_path, "mvtec-ad", "bottle", "test", image_size=SIZE)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["mask"].shape == (4, 1, SIZE, SIZE)
    assert batch["label"].tolist() == dataset.labels
    assert list(batch["category"]) == ["bottle"] * 4


def write_graded_mask(path: Path, size: tuple[int, int] = (SIZE, SIZE), dtype=np.uint8) -> Path:
    """A lossy-looking mask: a full-scale 2x2 core inside a 6x6 ring of grey values 40..120."""
    path.parent.mkdir(parents=True, exist_ok=True)
    peak = np.iinfo(dtype).max
    array = np.zeros(size, dtype=dtype)
    array[5:11, 5:11] = np.linspace(40, 120, 36).reshape(6, 6) * (peak / 255)
    array[7:9, 7:9] = peak
    Image.fromarray(array).save(path)
    return path


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_mask_threshold_binarises_lossy_masks_at_the_given_grey_level(tmp_path, dtype):
    make_mvtec(tmp_path)
    for mask in (tmp_path / "bottle" / "ground_truth" / "broken").glob("*.png"):
        write_graded_mask(mask, dtype=dtype)
    default = load_split(tmp_path, "mvtec-ad", "bottle", "test", image_size=None)
    strict = load_split(tmp_path, "mvtec-ad", "bottle", "test", image_size=None, mask_threshold=127)
    defective = [i for i in range(len(default)) if default[i]["label"] == 1]
    assert [default[i]["mask"].sum().item() for i in defective] == [36.0, 36.0]  # > 0: the whole grey ring
    assert [strict[i]["mask"].sum().item() for i in defective] == [4.0, 4.0]  # > 127: the core only
    ring = load_split(tmp_path, "mvtec-ad", "bottle", "test", image_size=None, mask_threshold=80)
    assert 4 < ring[defective[0]]["mask"].sum().item() < 36


def test_graded_masks_are_counted_in_a_one_line_warning(tmp_path, caplog):
    make_mvtec(tmp_path)
    masks = sorted((tmp_path / "bottle" / "ground_truth" / "broken").glob("*.png"))
    write_graded_mask(masks[0])
    with caplog.at_level(logging.WARNING, logger="realnet.data"):
        load_split(tmp_path, "mvtec-ad", "bottle", "test")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "1 of 2 masks" in warnings[0] and "`mask_threshold=127`" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="realnet.data"):
        load_split(tmp_path, "mvtec-ad", "bottle", "test", mask_threshold=127)  # the user chose a threshold
        load_split(tmp_path, "mvtec-ad", "bottle", "train")  # no masks read for normal images
    assert not caplog.records


def test_exact_and_class_id_masks_raise_no_warning(tmp_path, caplog):
    make_mvtec(tmp_path)
    masks = sorted((tmp_path / "bottle" / "ground_truth" / "broken").glob("*.png"))
    write_mask(masks[0], value=2)  # VisA-style class ids: small values, never near full scale
    with caplog.at_level(logging.WARNING, logger="realnet.data"):
        dataset = load_split(tmp_path, "mvtec-ad", "bottle", "test", image_size=SIZE)
    assert not caplog.records
    assert all(dataset[i]["mask"].sum() == 24 for i in range(len(dataset)) if dataset[i]["label"])


def test_kolektor_labels_follow_the_mask_threshold(tmp_path):
    for part in range(4):
        base = tmp_path / "kos00" / f"Part{part}"
        write_image(base.with_suffix(".jpg"), 120)
        write_mask(base.parent / f"Part{part}_label.png", value=255 if part == 0 else 60 if part == 1 else 0,
                   box=(2, 6, 3, 9) if part < 2 else (0, 0, 0, 0))
    default = load_split(tmp_path, "kolektorsdd", split="test", image_size=SIZE)
    strict = load_split(tmp_path, "kolektorsdd", split="test", image_size=SIZE, mask_threshold=127)
    assert sum(default.labels) == 2 and sum(strict.labels) == 1  # a faint-only mask is no defect at > 127


@pytest.mark.parametrize("value", [-1, 255, float("nan"), "127", True])
def test_mask_threshold_out_of_range_is_an_error(tmp_path, value):
    make_mvtec(tmp_path)
    with pytest.raises(InputError, match="`mask_threshold`"):
        load_split(tmp_path, "mvtec-ad", "bottle", "test", mask_threshold=value)


@pytest.mark.parametrize("category", ["../bottle", "/etc", "bottle/../bottle", "..", ""])
def test_category_names_must_be_plain_names(tmp_path, category):
    make_mvtec(tmp_path / "root")
    with pytest.raises(InputError, match="category"):
        load_split(tmp_path / "root", "mvtec-ad", category, "test")


@pytest.mark.parametrize("dataset", ["folder", "mvtec-ad"])
def test_a_single_category_folder_accepts_only_its_own_name(tmp_path, dataset):
    cat = make_mvtec(tmp_path, category="widget")
    with pytest.raises(InputError, match=r"category 'nope'.*single category 'widget'"):
        load_split(cat, dataset, "nope", "test")
    own = load_split(cat, dataset, "widget", "test", image_size=SIZE)
    assert own.categories == ["widget"] and len(own) == 4


def test_a_flat_folder_refuses_another_category_name(tmp_path):
    write_image(tmp_path / "parts" / "good" / "g0.png")
    write_image(tmp_path / "parts" / "good" / "g1.png")
    with pytest.raises(InputError, match=r"category 'nope'.*single category 'parts'"):
        load_split(tmp_path / "parts", "folder", "nope", "train")
