"""OpenVINO int8 post-training quantisation of an exported RealNet graph.

Deployment on CPUs and edge boxes usually runs int8: weights and activations of the convolutions
and matrix products in 8 bits, about 4x less memory traffic. NNCF's post-training quantisation
(``nncf.quantize``) needs no labels and no training, only a few hundred representative inputs to
measure activation ranges: for an anomaly detector those are normal images, which every user has.
With ``int8`` the backbone and the reconstruction U-Nets (most of the compute) run in int8 and
everything else (standardiser, AFS gather, residuals, RRS, discriminator, map and image score)
stays float. ``int8-discriminator`` also quantises the discriminator's convolutions (about a fifth
of the float time, so it is faster still), at a larger cost in pixel AUROC; the map's softmax and
the image score stay float in both.
The int8 graph no longer matches the float model to 1e-4, so its accuracy cost must be measured on
real data with a trained model (``benchmarks/realnet_speed.py --int8-accuracy``); its deviation
from the float graph on the export check images is recorded in the manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sia.errors import InputError, MissingExtraError

PRECISIONS = ("fp32", "int8", "int8-discriminator")
NNCF_HINT = 'pip install "sia[export]"'
DEFAULT_CALIBRATION_IMAGES = 300  # nncf's own default subset size
# Only the backbone and the reconstruction U-Nets run in int8: everything else stays float. The
# residual is a small difference of two large tensors, so 8-bit features or reconstructions leave
# mostly quantisation noise in it; RRS would rank that noise; and the map and image score are
# probabilities whose 8-bit range, calibrated on normal images only, clips every anomaly to the
# same score.
FLOAT_PATTERN = r"^(?!.*/(backbone|recon/unets\.\d+)/).*"
# The discriminator's convolutions see the selected residuals, whose calibrated range clips only
# where anomalies exceed every normal residual: still anomalous, so the map survives (measured).
FLOAT_PATTERNS = {
    "int8": FLOAT_PATTERN,
    "int8-discriminator": r"^(?!.*/(backbone|recon/unets\.\d+|discriminator/decoder[12])/).*",
}


def check_precision(precision: str, fmt: str, what: str = "`precision`") -> str:
    """"fp32", "int8" or "int8-discriminator" (int8 only for OpenVINO, the runtime NNCF quantises for);
    else a one-line InputError."""
    value = str(precision).strip().lower()
    if value not in PRECISIONS:
        raise InputError(f"{what}: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if value != "fp32" and fmt != "openvino":
        raise InputError(f"{what}: {value} is available for format openvino, got format {fmt!r}")
    return value


def import_nncf() -> Any:
    """nncf, or a one-line MissingExtraError naming the extra that installs it."""
    try:
        import nncf
    except ImportError:
        raise MissingExtraError(f"`precision` int8: needs the 'nncf' package, which is not installed ({NNCF_HINT})") from None
    return nncf


def load_calibration_images(images: Any, size: tuple[int, int], limit: int = DEFAULT_CALIBRATION_IMAGES,
                            what: str = "`calibration_images`") -> np.ndarray:
    """Normal images for calibration as float32 (N, 3, H, W) in [0, 1] at the graph's size.

    ``images`` is a folder (its images, sorted, at most ``limit`` of them, resized bilinearly like
    ``realnet predict`` does) or an array already shaped (N, 3, H, W).
    """
    if images is None:
        raise InputError(f"{what}: int8 needs normal images to calibrate on (a folder, e.g. the training images)")
    if isinstance(images, np.ndarray):
        array = images[: max(1, int(limit))]
    else:
        from sia.images import list_images, load_image_tensor

        files = list_images(images, what=what)[: max(1, int(limit))]
        array = np.stack([load_image_tensor(path, size=size).numpy() for path in files])
    if array.ndim != 4 or array.shape[1] != 3 or tuple(array.shape[2:]) != tuple(size) or len(array) == 0:
        raise InputError(f"{what}: expected images (N, 3, {size[0]}, {size[1]}), got shape {tuple(array.shape)}")
    return np.ascontiguousarray(array, dtype=np.float32)


def quantize_openvino_graph(xml_path: Path, calibration: np.ndarray, input_name: str, batch: int | None,
                            precision: str = "int8") -> None:
    """Replace the float OpenVINO IR at ``xml_path`` (and its .bin) by an int8 one calibrated on ``calibration``.

    NNCF's statistics come from the calibration images in their given order, so the same images
    give the same int8 graph.
    """
    nncf = import_nncf()
    import openvino as ov

    step = batch or 1
    batches = [calibration[i : i + step] for i in range(0, len(calibration) - step + 1, step)]
    if not batches:
        raise InputError(f"`calibration_images`: a graph with a fixed batch of {batch} needs at least {batch} images")
    model = ov.Core().read_model(str(xml_path))
    dataset = nncf.Dataset(batches, lambda item: {input_name: item})
    keep_float = nncf.IgnoredScope(patterns=[FLOAT_PATTERNS[precision]], validate=False)
    quantized = nncf.quantize(model, dataset, subset_size=len(batches), preset=nncf.QuantizationPreset.MIXED,
                              ignored_scope=keep_float)
    written = xml_path.with_name("int8-" + xml_path.name)  # the float .bin may still be mapped while saving
    ov.save_model(quantized, str(written), compress_to_fp16=False)
    del model, quantized
    written.with_suffix(".bin").replace(xml_path.with_suffix(".bin"))
    written.replace(xml_path)


__all__ = ["PRECISIONS", "check_precision", "load_calibration_images", "quantize_openvino_graph"]
