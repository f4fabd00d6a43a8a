"""realnet: the RealNet feature-selection anomaly detector (CVPR 2024).

Data flows one way: image -> frozen backbone features -> AFS -> reconstruction U-Nets -> RRS ->
discriminator -> anomaly map. Public names are imported on first use (``import realnet`` stays fast).

Model:      RealNet (Hub save/load), get_recipe, known_recipes
Training:   TrainingConfig, train
Evaluation: evaluate, load_model, evaluate_maps, image_auroc, pixel_auroc, pro_score
Deployment: export_model (ONNX / OpenVINO), ExportedRealNet (runs an export without torch)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "RealNet": "model",
    "RealNetOutput": "model",
    "Recipe": "recipes",
    "get_recipe": "recipes",
    "known_recipes": "recipes",
    "TrainingConfig": "training",
    "train": "training",
    "evaluate": "evaluation",
    "load_model": "evaluation",
    "evaluate_maps": "metrics",
    "image_auroc": "metrics",
    "pixel_auroc": "metrics",
    "pro_score": "metrics",
    "export_model": "export",
    "ExportedRealNet": "deploy",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .deploy import ExportedRealNet
    from .evaluation import evaluate, load_model
    from .export import export_model
    from .metrics import evaluate_maps, image_auroc, pixel_auroc, pro_score
    from .model import RealNet, RealNetOutput
    from .recipes import Recipe, get_recipe, known_recipes
    from .training import TrainingConfig, train


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'realnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
