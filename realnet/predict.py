"""Run a trained RealNet on any images: scores, anomaly maps, binary masks and overlays.

No ground truth is needed: the decision thresholds are the normal-only ones calibrated at training
time on held-out normal images (``thresholds.json`` next to the weights, or the manifest of an
export), or given explicitly. Maps and masks are written at each image's original size (bilinear
for maps, then thresholded), plus the raw map at the model's resolution as ``.npy``.

A folder written by ``realnet export`` runs with ONNX Runtime or OpenVINO and never imports torch;
every other model runs in PyTorch. Both write their results through `realnet.prediction_files`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sia.errors import InputError
from sia.paths import separate_output

from .deploy import ExportedRealNet, is_export_folder
from .image_size import format_image_size, inference_size, parse_image_size
from .outputs import check_batch_size, check_output_folder, finite_threshold
from .prediction_files import (  # noqa: F401 - part of this module's public names
    PREDICT_OUTPUTS,
    SCORES_CSV,
    SCORES_JSONL,
    Prediction,
    ScoreBatch,
    collect_images,
    write_predictions,
)


def predict(
    model: Any,
    inputs: Sequence[str | Path],
    out: str | Path,
    batch_size: int = 8,
    image_size: int | str | Sequence[int] | None = None,
    image_threshold: float | None = None,
    pixel_threshold: float | None = None,
    overlays: bool = True,
    device: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> list[Prediction]:
    """Score every image and write ``scores.csv``, ``scores.jsonl``, ``maps/``, ``masks/``, ``overlays/``.

    ``model``: a RealNet, a model or training output folder, a Hub id, or an export folder.
    Images are resized to ``image_size`` (``256``, ``"640x256"`` or (H, W); default: the model's
    training size, the only size an export runs at) and maps come back at each image's own size.
    Thresholds default to the model's stored normal-only ones; with neither, no decision or mask is
    written (scores and maps still are). A non-empty ``out`` needs ``overwrite``, which first deletes
    the files the earlier run recorded writing there (and nothing else). Every image is decoded
    before anything is written, so a corrupt file stops the run and leaves ``out`` untouched.
    """
    check_batch_size(batch_size)
    image_threshold = finite_threshold(image_threshold, "`image_threshold`")
    pixel_threshold = finite_threshold(pixel_threshold, "`pixel_threshold`")
    folder = check_output_folder(out, overwrite)
    images = collect_images(inputs)
    if is_export_folder(model):
        model_folder = Path(model)
    else:
        from .evaluation import local_model_folder  # torch: never for an exported model

        model_folder = local_model_folder(model)
    separate_output(folder, [*inputs, model_folder], "`out`")
    if is_export_folder(model):
        if device not in (None, "cpu"):
            raise InputError(f"`device` {device}: an exported model runs on the CPU (leave `device` out)")
        deployed = ExportedRealNet(model)
        stored, size, score_batch = deployed.thresholds, deployed.image_size, deployed.score_batch
        if image_size is not None and parse_image_size(image_size) != tuple(size):
            raise InputError(f"`image_size` {format_image_size(parse_image_size(image_size))}: the export in {model} "
                             f"runs at {format_image_size(size)} only (export it again at that `image_size`)")
    else:
        stored, size, score_batch = _torch_model(model, device, image_size)
    image_threshold = stored.get("image_threshold") if image_threshold is None else image_threshold
    pixel_threshold = stored.get("pixel_threshold") if pixel_threshold is None else pixel_threshold
    return write_predictions(
        score_batch, images, folder, size, batch_size, image_threshold, pixel_threshold, overlays, progress,
        overwrite=overwrite,
    )


def _torch_model(model: Any, device: str | None, image_size: Any = None) -> tuple[dict, tuple[int, int], ScoreBatch]:
    """Stored thresholds, input size and scoring function of an eager PyTorch RealNet."""
    import torch

    from .evaluation import load_model, load_thresholds, resolve_device
    from .inference import predict_batches

    device = resolve_device(device)
    stored = load_thresholds(model) or {}
    net = load_model(model, device=device)

    def score_batch(images):
        prediction = predict_batches(net, [torch.from_numpy(images)])
        return prediction.anomaly_map[:, 0].numpy(), prediction.image_score.numpy()

    return stored, inference_size(net, image_size), score_batch
