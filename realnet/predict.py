"""Run a trained RealNet on any images: scores, anomaly maps, binary masks and overlays.

No ground truth is needed: the decision thresholds are the normal-only ones calibrated at training
time on held-out normal images (``thresholds.json`` next to the weights), or given explicitly.
Maps and masks are written at each image's original size (bilinear for maps, then thresholded),
plus the raw map at the model's resolution as ``.npy``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from sia.errors import InputError
from sia.images import IMAGE_EXTENSIONS, list_images, load_image, pil_to_tensor

from .evaluation import _model_size, check_batch_size, check_out_folder, load_model, load_thresholds, remove_previous_results

SCORES_CSV = "scores.csv"
SCORES_JSONL = "scores.jsonl"
PREDICT_OUTPUTS = (SCORES_CSV, SCORES_JSONL, "maps", "masks", "overlays")


@dataclass
class Prediction:
    """Result for one image (paths are relative to the output folder)."""

    image: str
    score: float
    is_anomalous: Optional[bool]
    anomalous_pixels: Optional[int]
    map: str
    map_png: str
    mask: Optional[str]
    overlay: Optional[str]


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


def _save_png16(array: np.ndarray, path: Path) -> None:
    """A [0,1] map as a 16-bit grayscale PNG (value = round(map * 65535))."""
    values = np.clip(np.round(array * 65535.0), 0, 65535).astype(np.uint16)
    Image.fromarray(values).save(path)


def predict(
    model: Any,
    inputs: Sequence[str | Path],
    out: str | Path,
    batch_size: int = 8,
    image_threshold: Optional[float] = None,
    pixel_threshold: Optional[float] = None,
    overlays: bool = True,
    device: Optional[str] = None,
    progress: bool = True,
    overwrite: bool = False,
) -> list[Prediction]:
    """Score every image and write ``scores.csv``, ``scores.jsonl``, ``maps/``, ``masks/``, ``overlays/``.

    Thresholds default to the model's stored normal-only ones; with neither, no decision or mask is
    written (scores and maps still are). A non-empty ``out`` needs ``overwrite``, which first deletes
    the results of the earlier run.
    """
    from .visualize import overlay as make_overlay

    check_batch_size(batch_size)
    folder = check_out_folder(out, overwrite)
    images = collect_images(inputs)
    stored = load_thresholds(model) or {}
    image_threshold = stored.get("image_threshold") if image_threshold is None else image_threshold
    pixel_threshold = stored.get("pixel_threshold") if pixel_threshold is None else pixel_threshold
    net = load_model(model, device=device)
    height, width = _model_size(net)
    net_device = next(net.parameters()).device
    remove_previous_results(folder, PREDICT_OUTPUTS)
    for sub in ("maps", "masks", "overlays"):
        if sub == "masks" and pixel_threshold is None or sub == "overlays" and not overlays:
            continue
        (folder / sub).mkdir(parents=True, exist_ok=True)
    results: list[Prediction] = []
    for start in tqdm(range(0, len(images), batch_size), desc="predict", disable=not progress):
        chunk = images[start : start + batch_size]
        pils = [load_image(file) for file, _ in chunk]
        batch = torch.stack([pil_to_tensor(p.resize((width, height), Image.BILINEAR)) for p in pils])
        with torch.no_grad():
            output = net(batch.to(net_device))
        maps = output.anomaly_map[:, 0].float().cpu()
        scores = output.image_score.float().cpu()
        for (file, name), pil, amap, score in zip(chunk, pils, maps, scores):
            full = F.interpolate(amap[None, None], size=(pil.height, pil.width), mode="bilinear", align_corners=False)[0, 0]
            full = full.clamp(0, 1)
            np.save(folder / "maps" / f"{name}.npy", amap.numpy().astype(np.float32))
            _save_png16(full.numpy(), folder / "maps" / f"{name}.png")
            mask_rel = None
            anomalous_pixels = None
            binary = None
            if pixel_threshold is not None:
                binary = full >= pixel_threshold
                anomalous_pixels = int(binary.sum())
                Image.fromarray(binary.numpy().astype(np.uint8) * 255).save(folder / "masks" / f"{name}.png")
                mask_rel = f"masks/{name}.png"
            overlay_rel = None
            if overlays:
                picture = make_overlay(pil, full.numpy(), threshold=pixel_threshold, vmin=0.0, vmax=1.0)
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
    _write_tables(folder, results, image_threshold, pixel_threshold)
    return results


def _write_tables(folder: Path, results: list[Prediction], image_threshold, pixel_threshold) -> None:
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
