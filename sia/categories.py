"""Category names of the four industrial anomaly-detection benchmarks RealNet was evaluated on.

The order of each list is the class id used by the official diffusion model and classifier, so it
must never be changed: converted checkpoints rely on it.
"""

from __future__ import annotations

from .errors import InputError

DATASET_CATEGORIES: dict[str, tuple[str, ...]] = {
    "mvtec-ad": (
        "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
        "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
    ),
    "visa": (
        "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
        "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
    ),
    "mpdd": ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes"),
    "btad": ("01", "02", "03"),
}

DATASET_ALIASES: dict[str, str] = {
    "mvtec-ad": "mvtec-ad", "mvtec": "mvtec-ad", "mvtec_ad": "mvtec-ad", "mvtecad": "mvtec-ad",
    "visa": "visa", "mpdd": "mpdd", "btad": "btad",
}


def resolve_dataset(name: str) -> str:
    """Canonical dataset name for an alias such as ``MVTec-AD`` or ``mvtec``."""
    key = name.strip().lower()
    if key not in DATASET_ALIASES:
        raise InputError(f"unknown dataset {name!r}; known: {', '.join(DATASET_CATEGORIES)}")
    return DATASET_ALIASES[key]


def known_categories() -> list[str]:
    """Every category as ``dataset/name``, in dataset order."""
    return [f"{ds}/{c}" for ds, cats in DATASET_CATEGORIES.items() for c in cats]


def resolve_category(name: str) -> tuple[str, str]:
    """Return ``(dataset, category)`` for ``"mvtec-ad/bottle"`` or an unambiguous ``"bottle"``."""
    text = name.strip()
    if "/" in text:
        ds_part, cat = text.split("/", 1)
        ds = resolve_dataset(ds_part)
        if cat in DATASET_CATEGORIES[ds]:
            return ds, cat
    else:
        matches = [(ds, c) for ds, cats in DATASET_CATEGORIES.items() for c in cats if c == text]
        if len(matches) == 1:
            return matches[0]
    raise InputError(f"unknown category {name!r}; known: {', '.join(known_categories())}")
