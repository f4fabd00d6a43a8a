"""sia: Strength-controllable Diffusion Anomaly Synthesis (SDAS) and a reusable anomaly augmentation.

The public names below are imported on first use, so ``import sia`` stays fast (diffusers, datasets
and the Hub client load only when a pipeline or dataset function is touched).

Augmentation (any detector):  AnomalySynthesizer, SyntheticAnomalyDataset, ForegroundConfig,
    perlin_masks, foreground_masks, SIASource, DTDSource, CutPasteSource, make_source
SDAS (diffusers):             SDASPipeline, SDASInpaintPipeline (in-context), SDASScheduler, SDASDDIMScheduler
SIA data sets (datasets/Hub): load_sia, generate_dataset, push_sia_dataset
anomalib (sia[anomalib]):     sia.anomalib.SiaAnomalyGenerator, sia.anomalib.use_sia
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "AnomalySynthesizer": "synthesizer",
    "SyntheticAnomalyDataset": "synthesizer",
    "SynthesisResult": "synthesizer",
    "ForegroundConfig": "foreground",
    "foreground_masks": "foreground",
    "perlin_masks": "perlin",
    "AnomalySource": "sources",
    "SIASource": "sources",
    "DTDSource": "sources",
    "CutPasteSource": "sources",
    "make_source": "sources",
    "SDASPipeline": "pipeline",
    "SDASPipelineOutput": "pipeline",
    "SDASInpaintPipeline": "inpaint",
    "SDASInpaintPipelineOutput": "inpaint",
    "SDASScheduler": "scheduler",
    "SDASDDIMScheduler": "scheduler",
    "load_sia": "hub",
    "push_sia_dataset": "hub",
    "generate_dataset": "generate",
    "InputError": "errors",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .errors import InputError
    from .foreground import ForegroundConfig, foreground_masks
    from .generate import generate_dataset
    from .hub import load_sia, push_sia_dataset
    from .inpaint import SDASInpaintPipeline, SDASInpaintPipelineOutput
    from .perlin import perlin_masks
    from .pipeline import SDASPipeline, SDASPipelineOutput
    from .scheduler import SDASDDIMScheduler, SDASScheduler
    from .sources import AnomalySource, CutPasteSource, DTDSource, SIASource, make_source
    from .synthesizer import AnomalySynthesizer, SynthesisResult, SyntheticAnomalyDataset


_SUBMODULES = ("anomalib",)  # optional integrations, imported on first touch (``sia.anomalib``)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sia' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
