"""The model card of a RealNet detector: usage, measured metrics, settings, licence and citations.

The Jinja template ships in `realnet/assets/cards/realnet_model.md`. Licence, citations and the
source benchmarks come from `sia.cards`, shared with the SDAS and SIA cards, because a detector
inherits the licence of the images it was trained on just as synthetic images do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sia.cards import dataset_facts, hub_tags, settings_table, write_card
from sia.errors import InputError

__all__ = ["METRIC_NAMES", "TEMPLATE_PATH", "render_realnet_card", "write_realnet_card"]

TEMPLATE_PATH = Path(__file__).parent / "assets" / "cards" / "realnet_model.md"

METRIC_NAMES = {"image_auroc": "Image AUROC", "pixel_auroc": "Pixel AUROC", "pro": "PRO (FPR ≤ 0.3)",
                "image_f1": "Image F1", "pixel_f1": "Pixel F1", "pixel_ap": "Pixel AP", "image_ap": "Image AP"}


def _metric_value(value: float) -> float:
    """Metrics are stored as fractions in [0, 1]; percentages are converted."""
    value = float(value)
    if not 0.0 <= value <= 100.0:
        raise InputError(f"metrics: expected values in [0, 1] (or percentages), got {value}")
    return value / 100.0 if value > 1.0 else value


def _eval_results(metrics: dict[str, float], info: dict[str, Any], category: str | None, eval_split: str):
    """One `model-index` entry per metric, with the data set, category (config) and split it was measured on."""
    from huggingface_hub import EvalResult

    return [
        EvalResult(task_type="image-segmentation", task_name="Anomaly detection and localisation",
                   dataset_type=info["dataset_key"] or "custom", dataset_name=info["dataset_pretty"],
                   dataset_config=category, dataset_split=eval_split, metric_type=name,
                   metric_name=METRIC_NAMES.get(name, name), metric_value=round(value, 6))
        for name, value in metrics.items()
    ]


def render_realnet_card(**facts: Any):
    """Render a `huggingface_hub.ModelCard` for a RealNet model.

    Facts used (all optional): repo_id, revision, dataset, category, metrics (dict of name ->
    value in [0, 1]), eval_split, training (dict), architecture (dict), backbone, image_size,
    source (provenance sentence), license (only for custom data), tags, base_model, datasets,
    model_name, title.
    """
    from huggingface_hub import ModelCard, ModelCardData

    info = dataset_facts(facts.get("dataset"), facts.get("license"))
    repo_id = facts.get("repo_id") or "path/to/model"
    tags = hub_tags(["anomaly-detection", "realnet", "industrial-inspection"], info["dataset_key"],
                    facts.get("tags", []))
    category = facts.get("category")
    metrics = {str(k): _metric_value(v) for k, v in (facts.get("metrics") or {}).items() if v is not None}
    eval_split = facts.get("eval_split", "test")
    eval_results = _eval_results(metrics, info, category, eval_split) if metrics else None
    architecture = {"backbone": facts.get("backbone", "wide_resnet50_2")}
    architecture.update(settings_table(facts.get("architecture")))
    image_size = facts.get("image_size", 256)
    image_size_text = (f"{image_size[0]} × {image_size[1]}" if isinstance(image_size, (list, tuple))
                       else f"{image_size} × {image_size}")
    card_data = ModelCardData(
        library_name="realnet", license=info["license"], pipeline_tag="image-segmentation", tags=tags,
        datasets=facts.get("datasets"), base_model=facts.get("base_model"),
        model_name=facts.get("model_name") or (repo_id.split("/")[-1] if facts.get("repo_id") else "realnet"),
        eval_results=eval_results, metrics=sorted(metrics) or None,
    )
    title = facts.get("title") or ("RealNet" + (f": {info['dataset_pretty']} / {category}" if category else ""))
    return ModelCard.from_template(
        card_data, template_path=str(TEMPLATE_PATH), title=title, repo_id=repo_id,
        revision=facts.get("revision"), category=category, backbone=architecture["backbone"],
        metrics={METRIC_NAMES.get(k, k): f"{100 * v:.1f}" for k, v in metrics.items()}, eval_split=eval_split,
        architecture=architecture, training=settings_table(facts.get("training")), image_size_text=image_size_text,
        source=facts.get("source"), **{k: info[k] for k in ("dataset_pretty", "dataset_url", "licence_text", "citation")},
    )


def write_realnet_card(folder: str | Path, **facts: Any) -> Path:
    """Render a RealNet model card and write it as `folder/README.md` (replacing the mixin's stub)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: model folder does not exist")
    return write_card(folder, render_realnet_card(**facts))
