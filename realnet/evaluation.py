"""Evaluate a trained RealNet on a test split: image AUROC, pixel AUROC, PRO, and overlays.

Maps and ground truth are compared at the model's input size (256² for the paper's models), as
the official evaluator does (so numbers stay comparable with the paper's), but AUROCs are never flipped and PRO follows the MVTec
definition (see ``realnet.metrics``). Overlays use the model's normal-only pixel threshold, never a
threshold tuned on the test masks (the official code picks the F1-optimal one on the test set).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from sia.devices import parse_device
from sia.errors import InputError, read_json_object
from sia.paths import inside, path_component, separate_output

from .image_size import inference_size
from .outputs import check_batch_size, check_output_folder, finite_threshold, prepare_output_folder

MODEL_SUBDIR = "model"
THRESHOLDS_FILE = "thresholds.json"
METRICS_FILE = "metrics.json"
OVERLAYS_DIR = "overlays"


def resolve_device(device: Optional[str | torch.device] = None) -> torch.device:
    """``device`` checked against this machine (a one-line InputError naming `device`, not a traceback
    from the first ``.to(device)``); default: cuda if available, else cpu."""
    return parse_device(device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")


def local_model_folder(model: Any) -> Optional[Path]:
    """The model folder on disk (None for a Hub id or a model object): an input outputs must not touch."""
    if isinstance(model, torch.nn.Module):
        return None
    location = Path(resolve_model_path(model))
    return location if location.is_dir() else None


def resolve_model_path(model: str | Path) -> str:
    """A training output folder (holding ``model/``), a model folder, or a Hub id."""
    path = Path(model)
    if (path / MODEL_SUBDIR / "config.json").is_file():
        return str(path / MODEL_SUBDIR)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"`model` {model}: folder has no config.json (expected a saved RealNet or a training output)")
        return str(path)
    if path.exists() or str(model).startswith((".", "/")) or str(model).count("/") != 1:
        raise InputError(f"`model` {model}: no such model folder (expected a folder or a Hub id 'org/name')")
    return str(model)


def load_model(model: Any, device: Optional[str | torch.device] = None):
    """A ready RealNet in eval mode from a folder, a training output or a Hub id (or pass one through)."""
    from .model import RealNet

    if isinstance(model, torch.nn.Module):
        loaded = model
    else:
        location = resolve_model_path(model)
        try:
            loaded = RealNet.from_pretrained(location)
        except InputError:
            raise
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(f"`model` {model}: cannot load a RealNet ({first})") from None
    if device is not None:
        loaded = loaded.to(device)
    return loaded.eval()


def load_thresholds(model: Any) -> Optional[dict]:
    """The normal-only thresholds saved with a model (``thresholds.json``), or None."""
    if isinstance(model, torch.nn.Module):
        return getattr(model, "thresholds", None)
    location = resolve_model_path(model)
    path = Path(location) / THRESHOLDS_FILE
    if not Path(location).is_dir():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(location, THRESHOLDS_FILE))
        except Exception:  # noqa: BLE001 - a Hub model without thresholds is still usable
            return None
    if not path.is_file():
        return None
    thresholds = read_json_object(path, "thresholds file")
    for key in ("image_threshold", "pixel_threshold"):
        finite_threshold(thresholds.get(key), f"{path}: {key}")
    return thresholds


def _collate(items: list[dict]) -> dict:
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


def predict_split(model, split, batch_size: int = 16, progress: bool = True, desc: str = "eval") -> dict[str, Any]:
    """Run the model over a test split: maps (N,H,W), scores (N,), masks (N,H,W), labels, images, paths."""
    from .inference import predict_batches

    loader = DataLoader(split, batch_size=batch_size, shuffle=False, collate_fn=_collate)
    masks, labels, images, paths = [], [], [], []

    def batch_images():
        """The images of each batch, keeping its masks, labels, images and paths on the way."""
        for batch in tqdm(loader, desc=desc, disable=not progress):
            masks.append(batch["mask"][:, 0].float())
            labels.append(torch.as_tensor(batch["label"]).reshape(-1))
            images.append(batch["image"])
            paths.extend(str(p) for p in batch.get("path", [""] * len(batch["image"])))
            yield batch["image"]

    prediction = predict_batches(model, batch_images(), what="test split")
    return {
        "maps": prediction.anomaly_map[:, 0].numpy(),
        "scores": prediction.image_score.numpy(),
        "masks": torch.cat(masks).numpy(),
        "labels": torch.cat(labels).numpy(),
        "images": torch.cat(images),
        "paths": paths,
    }


def save_overlays(predictions: dict, folder: Path, pixel_threshold: Optional[float] = None) -> list[Path]:
    """One PNG per test image: image | ground truth | heat map (with the predicted mask's outline)."""
    from sia.images import tensor_to_pil

    from .visualize import save_overlay_triptych

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, name in enumerate(overlay_names(predictions["paths"])):
        target = folder / name
        mask = predictions["masks"][i]
        save_overlay_triptych(
            target,
            tensor_to_pil(predictions["images"][i]),
            mask if mask.any() else None,
            predictions["maps"][i],
            threshold=pixel_threshold,
            vmin=0.0,
            vmax=1.0,
        )
        written.append(target)
    return written


def overlay_names(paths: Sequence[str]) -> list[str]:
    """The overlay file name of each test image, in order (``colour_03.png``; made unique)."""
    used: set[str] = set()
    return [f"{_unique_name(path, i, used)}.png" for i, path in enumerate(paths)]


def _unique_name(path: str, index: int, used: set[str]) -> str:
    """A file name from the last two path parts (``colour_03``), made unique."""
    parts = Path(path).with_suffix("").parts[-2:] if path else (f"{index:05d}",)
    name = "_".join(parts) or f"{index:05d}"
    base, n = name, 1
    while name in used:
        n += 1
        name = f"{base}_{n}"
    used.add(name)
    return name


def evaluate(
    model: Any,
    data: str | Path,
    dataset: str = "mvtec-ad",
    categories: Sequence[Optional[str]] = (),
    out: Optional[str | Path] = None,
    batch_size: int = 16,
    overlays: bool = True,
    device: Optional[str] = None,
    progress: bool = True,
    fpr_limit: float = 0.3,
    overwrite: bool = False,
    mask_threshold: float = 0,
    image_size: Optional[int | str | Sequence[int]] = None,
) -> dict[str, dict[str, float]]:
    """Metrics per category (and their mean when there are several); writes ``metrics.json`` and
    overlays under ``out`` when given (a non-empty ``out`` needs ``overwrite``, which deletes only
    the files an earlier run recorded writing there). ``mask_threshold``: see
    :func:`realnet.data.load_split`.

    Images, masks and maps are compared at ``image_size`` (``256``, ``"640x256"`` or (H, W)),
    by default the size the model was trained at."""
    from .data import available_categories, load_split
    from .metrics import evaluate_maps

    check_batch_size(batch_size)
    folder = check_output_folder(out, overwrite) if out is not None else None
    if not Path(data).is_dir():
        raise InputError(f"`data` {data}: no such folder")
    if folder is not None:
        separate_output(folder, [data, local_model_folder(model)], "`out`")
    names = list(dict.fromkeys(categories)) or [None]
    if len(names) == 1 and isinstance(names[0], str) and names[0].lower() == "all":
        names = available_categories(data, dataset)
    for name in names:
        if name is not None:
            path_component(name, "`categories`")
    device = resolve_device(device)
    thresholds = load_thresholds(model)
    net = load_model(model, device=device)
    size = inference_size(net, image_size)
    # Every split is read (and checked) before anything is written.
    splits = {}
    for category in names:
        split = load_split(data, dataset=dataset, category=category, split="test", image_size=size,
                           mask_threshold=mask_threshold)
        splits[path_component(category or Path(data).resolve().name, "category")] = split
    if folder is not None:
        planned = [METRICS_FILE, f"{METRICS_FILE}.tmp"]
        if overlays:
            planned += [f"{OVERLAYS_DIR}/{category}/{name}" for category, split in splits.items()
                        for name in overlay_names([str(r.image_path) for r in split.records])]
        prepare_output_folder(folder, planned, "realnet eval", overwrite)
    results: dict[str, dict[str, float]] = {}
    for category, split in splits.items():
        predictions = predict_split(net, split, batch_size=batch_size, progress=progress, desc=f"eval {category}")
        metrics = evaluate_maps(predictions["maps"], predictions["masks"], predictions["scores"], predictions["labels"], fpr_limit=fpr_limit)
        metrics["num_images"] = int(len(predictions["scores"]))
        metrics["num_anomalous"] = int(np.asarray(predictions["labels"]).astype(bool).sum())
        results[category] = metrics
        if folder is not None and overlays:
            pixel_threshold = thresholds.get("pixel_threshold") if thresholds else None
            save_overlays(predictions, inside(folder, f"{OVERLAYS_DIR}/{category}", "`categories`"), pixel_threshold)
    if len(results) > 1:
        keys = ("image_auroc", "pixel_auroc", "pro")
        results["mean"] = {k: float(np.mean([r[k] for r in results.values()])) for k in keys}
    if folder is not None:
        record = {"model": str(model) if not isinstance(model, torch.nn.Module) else type(model).__name__,
                  "data": str(data), "dataset": dataset, "image_size": list(size), "mask_threshold": mask_threshold,
                  "metrics": results}
        tmp = folder / (METRICS_FILE + ".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, folder / METRICS_FILE)
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table: category | image AUROC | pixel AUROC | PRO."""
    lines = ["| category | image AUROC | pixel AUROC | PRO |", "|---|---|---|---|"]
    for name, metrics in results.items():
        lines.append(f"| {name} | {metrics['image_auroc']:.4f} | {metrics['pixel_auroc']:.4f} | {metrics['pro']:.4f} |")
    return "\n".join(lines)
