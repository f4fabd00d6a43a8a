"""The torch-free half of ``realnet predict``: read and resize images, write maps, masks, overlays, tables.

A scoring function turns a batch of images (B, 3, H, W), float32 in [0, 1] at the model's size,
into anomaly maps (B, H, W) and image scores (B,). The eager PyTorch model and an exported
(ONNX Runtime / OpenVINO) model plug in here alike, so both write byte-for-byte the same kind of
results through the same code, and the deployed path never imports torch.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from sia.errors import InputError
from sia.images import IMAGE_EXTENSIONS, list_images, load_image, pil_to_array

from .outputs import check_planned_outputs, prepare_output_folder

SCORES_CSV = "scores.csv"
SCORES_JSONL = "scores.jsonl"
PREDICT_OUTPUTS = (SCORES_CSV, SCORES_JSONL, "maps", "masks", "overlays")

# (B, 3, H, W) float32 images in [0, 1] -> ((B, H, W) anomaly maps in [0, 1], (B,) image scores)
ScoreBatch = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class Prediction:
    """Result for one image (paths are relative to the output folder)."""

    image: str
    score: float
    is_anomalous: bool | None
    anomalous_pixels: int | None
    map: str
    map_png: str
    mask: str | None
    overlay: str | None


def collect_images(inputs: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """(file, output name) for every image given directly or found (recursively) in a folder."""
    if not inputs:
        raise InputError("IMAGES: give at least one image file or folder")
    found: list[tuple[Path, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for file in list_images(path, what="IMAGES folder"):
                found.append((file, "__".join(file.relative_to(path).with_suffix("").parts)))
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise InputError(f"{path}: not an image file (expected {', '.join(IMAGE_EXTENSIONS)})")
            found.append((path, path.stem))
        else:
            raise InputError(f"{path}: no such image file or folder")
    used: set[str] = set()
    unique = []
    for file, name in found:
        base, n = name, 1
        while name in used:
            n += 1
            name = f"{base}_{n}"
        used.add(name)
        unique.append((file, name))
    return unique


def resize_map(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a (h, w) map to (H, W), half-pixel centres, no antialiasing.

    The same sampling as ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``,
    written in numpy so that torch-free prediction writes the maps the PyTorch path always wrote.
    """
    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        source = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        low = np.minimum(np.floor(source).astype(np.intp), n_in - 1)
        high = np.minimum(low + 1, n_in - 1)
        return low, high, source - low

    values = np.asarray(array, dtype=np.float64)
    if values.shape == tuple(size):
        return values.astype(np.float32)
    top, bottom, dy = axis(values.shape[0], size[0])
    left, right, dx = axis(values.shape[1], size[1])
    rows = values[top] * (1.0 - dy)[:, None] + values[bottom] * dy[:, None]
    return (rows[:, left] * (1.0 - dx) + rows[:, right] * dx).astype(np.float32)


def load_batch(files: Sequence[Path], size: tuple[int, int]) -> tuple[list[Image.Image], np.ndarray]:
    """The original RGB pictures and the model's input: (B, 3, H, W) float32 in [0, 1] at `size`."""
    pictures = [load_image(file) for file in files]
    height, width = size
    batch = np.stack([pil_to_array(p.resize((width, height), Image.BILINEAR)) for p in pictures])
    return pictures, batch


def save_png16(array: np.ndarray, path: Path) -> None:
    """A [0,1] map as a 16-bit grayscale PNG (value = round(map * 65535))."""
    values = np.clip(np.round(array * 65535.0), 0, 65535).astype(np.uint16)
    Image.fromarray(values).save(path)


def write_predictions(
    score_batch: ScoreBatch,
    images: Sequence[tuple[Path, str]],
    folder: Path,
    size: tuple[int, int],
    batch_size: int,
    image_threshold: float | None,
    pixel_threshold: float | None,
    overlays: bool = True,
    progress: bool = True,
    overwrite: bool = False,
) -> list[Prediction]:
    """Score `images` batch by batch with `score_batch` and write every result into `folder`.

    Maps and masks are written at each image's original size (bilinear for maps, then
    thresholded), plus the raw map at the model's resolution as ``.npy``.
    """
    from .visualize import overlay as make_overlay

    planned = planned_files([name for _, name in images], pixel_threshold is not None, overlays)
    check_planned_outputs(folder, planned, overwrite)
    for file, _ in tqdm(images, desc="check images", disable=not progress):
        load_image(file)  # a corrupt image stops the run before anything is written
    prepare_output_folder(folder, planned, "realnet predict", overwrite)
    results: list[Prediction] = []
    for start in tqdm(range(0, len(images), batch_size), desc="predict", disable=not progress):
        chunk = images[start : start + batch_size]
        pictures, batch = load_batch([file for file, _ in chunk], size)
        maps, scores = score_batch(batch)
        for (file, name), picture, amap, score in zip(chunk, pictures, maps, scores):
            amap = np.asarray(amap, dtype=np.float32)
            full = np.clip(resize_map(amap, (picture.height, picture.width)), 0.0, 1.0)
            np.save(folder / "maps" / f"{name}.npy", amap)
            save_png16(full, folder / "maps" / f"{name}.png")
            mask_rel = None
            anomalous_pixels = None
            if pixel_threshold is not None:
                binary = full >= pixel_threshold
                anomalous_pixels = int(binary.sum())
                Image.fromarray(binary.astype(np.uint8) * 255).save(folder / "masks" / f"{name}.png")
                mask_rel = f"masks/{name}.png"
            overlay_rel = None
            if overlays:
                picture = make_overlay(picture, full, threshold=pixel_threshold, vmin=0.0, vmax=1.0)
                picture.save(folder / "overlays" / f"{name}.png")
                overlay_rel = f"overlays/{name}.png"
            results.append(
                Prediction(
                    image=str(file),
                    score=float(score),
                    is_anomalous=None if image_threshold is None else bool(float(score) >= image_threshold),
                    anomalous_pixels=anomalous_pixels,
                    map=f"maps/{name}.npy",
                    map_png=f"maps/{name}.png",
                    mask=mask_rel,
                    overlay=overlay_rel,
                )
            )
    write_tables(folder, results, image_threshold, pixel_threshold)
    return results


def planned_files(names: Sequence[str], masks: bool, overlays: bool) -> list[str]:
    """Every file a prediction run writes (relative to ``out``), temporary ones included."""
    planned = [SCORES_CSV, f"{SCORES_CSV}.tmp", SCORES_JSONL, f"{SCORES_JSONL}.tmp"]
    for name in names:
        planned += [f"maps/{name}.npy", f"maps/{name}.png"]
        planned += [f"masks/{name}.png"] if masks else []
        planned += [f"overlays/{name}.png"] if overlays else []
    return planned


def write_tables(folder: Path, results: list[Prediction], image_threshold, pixel_threshold) -> None:
    """``scores.csv`` and ``scores.jsonl`` (with the thresholds used), each written atomically."""
    fields = list(asdict(results[0]).keys()) if results else [f for f in Prediction.__dataclass_fields__]
    tmp_csv = folder / (SCORES_CSV + ".tmp")
    with tmp_csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for result in results:
            writer.writerow(asdict(result))
    os.replace(tmp_csv, folder / SCORES_CSV)
    tmp_jsonl = folder / (SCORES_JSONL + ".tmp")
    with tmp_jsonl.open("w") as handle:
        for result in results:
            record = asdict(result)
            record.update(image_threshold=image_threshold, pixel_threshold=pixel_threshold)
            handle.write(json.dumps(record) + "\n")
    os.replace(tmp_jsonl, folder / SCORES_JSONL)
