"""Run an exported RealNet with ONNX Runtime or OpenVINO, without torch.

An export folder (written by ``realnet export`` / `realnet.export.export_model`) holds one graph
file and ``realnet_export.json``: the format version, the runtime format, the input size and batch,
the graph's input/output names, the model's config and its normal-only calibrated thresholds. The
graph takes images (B, 3, H, W), float32 RGB in [0, 1], and does everything else itself
(normalisation, backbone, AFS, reconstruction, RRS, discriminator, softmax, image score).

Only numpy and the runtime are imported here; the runtimes are imported on first use and a missing
one is a one-line error saying which extra to install.
"""

from __future__ import annotations

import importlib
import json
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sia.errors import InputError

MANIFEST_NAME = "realnet_export.json"
FORMAT_VERSION = 1
EXPORT_FORMATS = ("onnx", "openvino")
ONNX_FILE = "model.onnx"
ONNX_DATA_FILE = "model.onnx.data"  # the weights of graphs over protobuf's 2 GB limit
GRAPH_FILES = {"onnx": (ONNX_FILE,), "openvino": ("model.xml", "model.bin")}
INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "image_score", "rrs_indices")
RUNTIME_MODULES = {"onnx": "onnxruntime", "openvino": "openvino"}
INSTALL_HINT = 'pip install "sia[export]"'


def import_runtime(module: str, what: str) -> Any:
    """Import an optional runtime (onnx, onnxruntime, openvino) or fail with a one-line install hint."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise InputError(f"{what}: needs the {module!r} package, which is not installed ({INSTALL_HINT})") from None


def is_export_folder(model: Any) -> bool:
    """True when `model` names a folder written by ``realnet export``."""
    return isinstance(model, (str, Path)) and (Path(model) / MANIFEST_NAME).is_file()


def read_manifest(folder: str | Path, what: str = "`model`") -> dict:
    """The checked manifest of an export folder; refuses other format versions and missing graph files."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{what} {folder}: cannot read {MANIFEST_NAME} ({err})") from None
    if not isinstance(manifest, dict):
        raise InputError(f"{what} {folder}: {MANIFEST_NAME} is not a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(
            f"{what} {folder}: export format version {version!r}, but this realnet reads version {FORMAT_VERSION}; "
            "export the model again with this version"
        )
    fmt = manifest.get("format")
    if fmt not in EXPORT_FORMATS:
        raise InputError(f"{what} {folder}: unknown export format {fmt!r} (expected one of {', '.join(EXPORT_FORMATS)})")
    files = manifest.get("files") if isinstance(manifest.get("files"), list) else []
    for name in dict.fromkeys([*GRAPH_FILES[fmt], *map(str, files)]):
        if not (folder / name).is_file():
            raise InputError(f"{what} {folder}: the {fmt} export lacks {name}")
    size = manifest.get("image_size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise InputError(f"{what} {folder}: {MANIFEST_NAME} has no valid image_size, got {size!r}")
    batch = manifest.get("batch")
    if batch is not None and not (isinstance(batch, int) and batch >= 1):
        raise InputError(f"{what} {folder}: {MANIFEST_NAME} batch must be null (dynamic) or a positive integer, got {batch!r}")
    return manifest


@dataclass
class DeployedOutput:
    """What the exported graph computes for a batch (numpy arrays)."""

    anomaly_map: np.ndarray  # (B, 1, H, W) float32 in [0, 1]
    image_score: np.ndarray  # (B,) float32
    rrs_indices: np.ndarray  # (B, k_max + k_mean) int64, the residual channels RRS kept


class ExportedRealNet:
    """An exported RealNet ready to run: ``ExportedRealNet.load(folder)(images)``.

    Args:
        folder: export folder.
        num_threads: intra-op threads of the runtime (None: the runtime's default, all cores).
    """

    def __init__(self, folder: str | Path, num_threads: int | None = None) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.format: str = self.manifest["format"]
        self.image_size: tuple[int, int] = tuple(self.manifest["image_size"])
        self.batch: int | None = self.manifest.get("batch")
        self.thresholds: dict = dict(self.manifest.get("thresholds") or {})
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral) or num_threads < 1):
            raise InputError(f"num_threads: expected a positive integer or None, got {num_threads!r}")
        self._run = self._onnxruntime(num_threads) if self.format == "onnx" else self._openvino(num_threads)

    @classmethod
    def load(cls, folder: str | Path, num_threads: int | None = None) -> ExportedRealNet:
        return cls(folder, num_threads=num_threads)

    def _onnxruntime(self, num_threads: int | None):
        ort = import_runtime("onnxruntime", f"`model` {self.folder} (onnx)")
        options = ort.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = int(num_threads)
            options.inter_op_num_threads = 1
        session = ort.InferenceSession(
            str(self.folder / GRAPH_FILES["onnx"][0]), sess_options=options, providers=["CPUExecutionProvider"]
        )

        def run(images: np.ndarray) -> list[np.ndarray]:
            return session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})

        return run

    def _openvino(self, num_threads: int | None):
        ov = import_runtime("openvino", f"`model` {self.folder} (openvino)")
        core = ov.Core()
        # f32 on every CPU: OpenVINO would otherwise run in bf16 where the CPU has it, which breaks parity.
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
        if num_threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(num_threads)
        compiled = core.compile_model(core.read_model(str(self.folder / GRAPH_FILES["openvino"][0])), "CPU", config)
        request = compiled.create_infer_request()
        outputs = [compiled.output(name) for name in OUTPUT_NAMES]

        def run(images: np.ndarray) -> list[np.ndarray]:
            result = request.infer({INPUT_NAME: images})
            return [np.array(result[output]) for output in outputs]

        return run

    def __call__(self, images: np.ndarray) -> DeployedOutput:
        """Images (B, 3, H, W) float32 RGB in [0, 1] at `image_size`; any B, also for a fixed-batch export."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != self.image_size:
            raise InputError(
                f"images: expected (B, 3, {self.image_size[0]}, {self.image_size[1]}) for this export, got {images.shape}"
            )
        step = self.batch or images.shape[0]
        parts = []
        for start in range(0, images.shape[0], step):
            chunk = images[start : start + step]
            missing = step - chunk.shape[0]
            if missing:  # a fixed-batch graph: fill the last batch with copies and drop their results
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], missing, axis=0)])
            outputs = self._run(chunk)
            parts.append([o[: step - missing] for o in outputs])
        maps, scores, indices = (np.concatenate([p[i] for p in parts]) for i in range(3))
        return DeployedOutput(anomaly_map=maps, image_score=scores, rrs_indices=indices)

    def score_batch(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, H, W) maps and (B,) scores: the scoring function of `realnet.prediction_files`."""
        out = self(images)
        return out.anomaly_map[:, 0], out.image_score
