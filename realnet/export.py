"""Export a trained RealNet to ONNX or OpenVINO as one inference graph, with its thresholds.

The graph takes images (B, 3, H, W), float32 RGB in [0, 1], and computes all of inference:
ImageNet normalisation, backbone, AFS channel gather, reconstruction U-Nets, RRS top-k channel
gather, discriminator, softmax and image score. Next to it, ``realnet_export.json`` records the
format version, input size, batch, the model config and the normal-only calibrated thresholds, so
a deployed model (see `realnet.deploy`) takes the same decisions as ``realnet predict``.

The folder is built in a temporary folder beside ``out`` and renamed into place only once the
exported graph has been run by its runtime and matched the eager model, so ``out`` never holds a
half-written or unverified export.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sia.errors import InputError
from sia.paths import writable_folder_path

from .deploy import (
    EXPORT_FORMATS,
    FORMAT_VERSION,
    GRAPH_FILES,
    INPUT_NAME,
    MANIFEST_NAME,
    ONNX_DATA_FILE,
    ONNX_FILE,
    OUTPUT_NAMES,
    RUNTIME_MODULES,
    ExportedRealNet,
    import_runtime,
    is_export_folder,
)
from .image_size import check_stride, model_stride, parse_image_size, trained_size
from .inference import predict_batches
from .quantize import check_precision, load_calibration_images, quantize_openvino_graph

DEFAULT_OPSET = 17
# Largest deviation of the exported graph from the eager model accepted by the check after export.
MAP_TOLERANCE = 1e-4
SCORE_TOLERANCE = 1e-5


class InferenceGraph(nn.Module):
    """The exported computation: images (B, 3, H, W) in [0, 1] -> anomaly map, image score, RRS indices.

    It calls `RealNet.forward` itself, so the exported graph is the eager model's computation.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model(images)
        return out.anomaly_map, out.image_score, out.rrs_indices


def parse_batch(batch: str | int | None, what: str = "`batch`") -> int | None:
    """'dynamic' (or None) -> None; a positive whole number -> that fixed batch size."""
    if batch is None or (isinstance(batch, str) and batch.strip().lower() == "dynamic"):
        return None
    text = str(batch).strip()
    if isinstance(batch, bool) or not text.isdigit() or int(text) < 1:
        raise InputError(f"{what}: expected 'dynamic' or a positive whole number of images, got {batch!r}")
    return int(text)


def check_format(format: str, what: str = "`format`") -> str:
    if not isinstance(format, str) or format.lower() not in EXPORT_FORMATS:
        raise InputError(f"{what}: unknown export format {format!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    return format.lower()


def _load(model: Any, what: str) -> tuple[nn.Module, dict | None, str | None]:
    """The RealNet, its stored thresholds and where it came from (None for an in-memory model)."""
    from .evaluation import load_model, load_thresholds, resolve_model_path
    from .model import WEIGHTS_NAME

    if isinstance(model, nn.Module):
        return model, getattr(model, "thresholds", None), None
    if is_export_folder(model):
        raise InputError(f"{what} {model}: is already an exported model; export from the trained model folder")
    location = resolve_model_path(model)
    if Path(location).is_dir() and not (Path(location) / WEIGHTS_NAME).is_file():
        raise InputError(f"{what} {model}: the model folder has no {WEIGHTS_NAME} (expected a saved RealNet)")
    return load_model(location), load_thresholds(model), str(model)


def _check_out(out: str | Path, overwrite: bool, what: str) -> Path:
    """`out` may be new, an empty folder, or (with `overwrite`) an earlier export, nothing else."""
    folder = writable_folder_path(out, what)
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise InputError(f"{what} {folder}: folder is not empty; pass `overwrite=True` to replace an earlier export")
        if not is_export_folder(folder):
            raise InputError(f"{what} {folder}: not an export folder (no {MANIFEST_NAME}); refusing to replace it")
    return folder


def _write_onnx(traced: Path, folder: Path) -> None:
    """Move a traced ``model.onnx`` into `folder`; models over protobuf's 2 GB limit (WRN50 arch A),
    which the tracer writes with one file per tensor, get all weights in one ``model.onnx.data``."""
    if [p.name for p in traced.parent.iterdir()] == [traced.name]:
        os.replace(traced, folder / ONNX_FILE)
        return
    import onnx

    proto = onnx.load(str(traced))  # reads the per-tensor files
    onnx.save_model(proto, str(folder / ONNX_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=ONNX_DATA_FILE)


def _trace_onnx(graph: InferenceGraph, path: Path, size: tuple[int, int], batch: int | None, opset: int) -> None:
    example = torch.rand(batch or 2, 3, *size, generator=torch.Generator().manual_seed(0))
    dynamic = None if batch else {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    with warnings.catch_warnings(), torch.no_grad():
        # The tracer warns about shapes read as Python numbers: they are fixed by design (one size per export).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic,
            opset_version=opset,
            do_constant_folding=True,
            training=torch.onnx.TrainingMode.EVAL,
            dynamo=False,
        )


def _write_openvino(onnx_path: Path, folder: Path) -> None:
    ov = import_runtime("openvino", "`format` openvino")
    # The runtime's ONNX reader gives the same graph as `convert_model`, many times faster.
    converted = ov.Core().read_model(str(onnx_path))
    # Keep float32 weights: OpenVINO would store them as float16 by default, which breaks parity.
    ov.save_model(converted, str(folder / GRAPH_FILES["openvino"][0]), compress_to_fp16=False)


def _verify(graph: InferenceGraph, folder: Path, size: tuple[int, int], batch: int | None, strict: bool = True) -> dict:
    """Run the export with its runtime on fixed random and smooth images; compare with the eager model.

    ``strict``: refuse an export outside the tolerances (float graphs); an int8 graph only records
    how far it is.
    """
    generator = np.random.default_rng(0)
    count = batch or 3
    noise = generator.random((count, 3, *size), dtype=np.float32)
    ys, xs = np.meshgrid(np.linspace(0, 1, size[0]), np.linspace(0, 1, size[1]), indexing="ij")
    smooth = np.stack([np.stack([ys, xs, (ys + xs) / 2]) * (0.5 + 0.5 * i / count) for i in range(count)])
    images = np.concatenate([noise, smooth.astype(np.float32)])
    deployed = ExportedRealNet(folder)(images)
    indices: list[torch.Tensor] = []
    prediction = predict_batches(graph.model, torch.from_numpy(images), batch_size=len(images), dtype=None,
                                 on_batch=lambda output: indices.append(output.rrs_indices))
    eager = [prediction.anomaly_map.numpy(), prediction.image_score.numpy(), torch.cat(indices).numpy()]
    report = {
        "images": int(images.shape[0]),
        "max_abs_anomaly_map": float(np.abs(deployed.anomaly_map - eager[0]).max()),
        "max_abs_image_score": float(np.abs(deployed.image_score - eager[1]).max()),
        "rrs_indices_equal": bool(np.array_equal(deployed.rrs_indices, eager[2])),
    }
    report["mean_abs_anomaly_map"] = float(np.abs(deployed.anomaly_map - eager[0]).mean())
    if strict and (report["max_abs_anomaly_map"] > MAP_TOLERANCE or report["max_abs_image_score"] > SCORE_TOLERANCE):
        raise RuntimeError(f"the exported graph does not reproduce the eager model: {report}")
    return report


def export_model(
    model: Any,
    out: str | Path,
    format: str = "onnx",
    image_size: int | tuple[int, int] | str | None = None,
    batch: int | str | None = "dynamic",
    overwrite: bool = False,
    verify: bool = True,
    opset: int = DEFAULT_OPSET,
    precision: str = "fp32",
    calibration_images: str | Path | np.ndarray | None = None,
) -> Path:
    """Export `model` (a RealNet, a model or training output folder, or a Hub id) into the folder `out`.

    Args:
        format: "onnx" (ONNX Runtime) or "openvino" (OpenVINO IR, float32).
        image_size: input size N or (H, W) / "HxW"; default the model's own. Multiples of the
            backbone stride (32 for the default backbones).
        batch: "dynamic" (any batch size) or a fixed number of images per run.
        overwrite: replace an earlier export in `out` (never any other folder).
        verify: run the export with its runtime and refuse it unless maps match the eager model
            within 1e-4 and image scores within 1e-5 (recorded in the manifest; an int8 graph's
            deviation is recorded, not refused).
        precision: "fp32", or "int8" / "int8-discriminator" (OpenVINO only, see realnet.quantize):
            post-training quantisation with NNCF,
            calibrated on `calibration_images` (a folder of normal images or an array
            (N, 3, H, W) in [0, 1]; at most 300 are used).

    Returns the export folder, holding the graph (``model.onnx``, or ``model.xml`` + ``model.bin``)
    and ``realnet_export.json``.
    """
    fmt = check_format(format)
    precision = check_precision(precision, fmt)
    fixed_batch = parse_batch(batch)
    folder = _check_out(out, overwrite, "`out`")
    import_runtime("onnx", f"`format` {fmt}")  # the exporter writes ONNX protobufs
    if verify or fmt == "openvino":
        import_runtime(RUNTIME_MODULES[fmt], f"`format` {fmt}")
    net, thresholds, source = _load(model, "`model`")
    size = trained_size(net) if image_size is None else parse_image_size(image_size, "`image_size`")
    size = check_stride(size, model_stride(net), "`image_size`", "the model's backbone")  # a graph has one fixed size
    calibration = load_calibration_images(calibration_images, size) if precision != "fp32" else None
    graph = InferenceGraph(copy.deepcopy(net).float().cpu().eval()).eval()

    folder.parent.mkdir(parents=True, exist_ok=True)
    building = folder.parent / f".{folder.name}.export-{os.getpid()}.tmp"
    previous = folder.parent / f".{folder.name}.previous-{os.getpid()}.tmp"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    try:
        _write_graph(graph, building, fmt, size, fixed_batch, opset, calibration, precision)
        manifest = _manifest(net, fmt, sorted(p.name for p in building.iterdir()), size, fixed_batch, thresholds,
                             source, opset, precision, None if calibration is None else len(calibration))
        _write_json(building / MANIFEST_NAME, manifest)
        if verify:
            manifest["verification"] = _verify(graph, building, size, fixed_batch, strict=precision == "fp32")
            _write_json(building / MANIFEST_NAME, manifest)
        if folder.exists():
            os.replace(folder, previous)
        os.replace(building, folder)
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return folder


def _write_graph(graph: InferenceGraph, folder: Path, fmt: str, size: tuple[int, int], batch: int | None,
                 opset: int, calibration=None, precision: str = "fp32") -> None:
    """Trace the graph to ONNX in a scratch sub-folder, then write it into `folder` in format `fmt`
    (an OpenVINO graph quantised to ``precision`` on the `calibration` images when given)."""
    trace_folder = folder / "trace"
    trace_folder.mkdir()
    traced = trace_folder / ONNX_FILE
    _trace_onnx(graph, traced, size, batch, opset)
    if fmt == "onnx":
        _write_onnx(traced, folder)
    else:
        _write_openvino(traced, folder)
        if calibration is not None:
            quantize_openvino_graph(folder / GRAPH_FILES["openvino"][0], calibration, INPUT_NAME, batch, precision)
    shutil.rmtree(trace_folder)


def _manifest(net: nn.Module, fmt: str, files: list[str], size: tuple[int, int], batch: int | None,
              thresholds: dict | None, source: str | None, opset: int, precision: str,
              calibration_images: int | None) -> dict:
    """What ``realnet_export.json`` records: the graph files, its input and outputs, thresholds and origin."""
    config = getattr(net, "config", None)
    return {
        "format_version": FORMAT_VERSION,
        "format": fmt,
        "files": files,
        "image_size": [int(size[0]), int(size[1])],
        "batch": batch,
        "input": {
            "name": INPUT_NAME,
            "shape": [batch or "batch", 3, int(size[0]), int(size[1])],
            "dtype": "float32",
            "channels": "RGB",
            "range": [0.0, 1.0],
            "resize": "bilinear from the original image to image_size",
        },
        "outputs": {
            "anomaly_map": "(B, 1, H, W) float32 anomaly probability in [0, 1]",
            "image_score": f"(B,) float32 image score ({getattr(net, 'image_score_mode', 'pool16')})",
            "rrs_indices": "(B, k_max + k_mean) int64 residual channels kept by RRS",
        },
        "thresholds": thresholds,
        "model_config": json.loads(json.dumps(config, default=str)) if isinstance(config, dict) else None,
        "source": source,
        "opset": opset,
        "precision": precision,
        "calibration_images": calibration_images,
        "producer": {"realnet": _realnet_version(), "torch": torch.__version__},
        "verification": None,
    }


def _write_json(path: Path, data: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


def _realnet_version() -> str:
    from . import __version__

    return __version__
