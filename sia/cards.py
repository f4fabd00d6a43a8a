"""Model and dataset cards for SDAS pipelines and SIA data sets, and the facts every card shares.

RealNet's model card lives in `realnet.cards` (sia never imports realnet); it uses the source
data set facts, citations and table helpers defined here.

The Jinja templates live in `sia/assets/cards/` (shipped in the wheel); they are rendered with
huggingface_hub's `ModelCard.from_template` / `DatasetCard.from_template`, so the YAML front
matter (licence, tags, `model-index` metrics, data set `configs`) is written by the Hub's own
card-data classes. Callers pass facts they know (category, metrics, training settings); licence
and citations are derived from the source data set, because the weights and images inherit the
licence of the images they were made from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .categories import DATASET_ALIASES, DATASET_CATEGORIES
from .errors import InputError

__all__ = [
    "CARD_TEMPLATES",
    "REALNET_CITATION",
    "SOURCE_DATASETS",
    "template_path",
    "dataset_facts",
    "hub_tags",
    "settings_table",
    "render_model_card",
    "render_dataset_card",
    "write_card",
    "write_model_card",
    "size_category",
]

TEMPLATE_DIR = Path(__file__).parent / "assets" / "cards"
CARD_TEMPLATES = {"sdas": "sdas_pipeline.md", "sia": "sia_dataset.md"}

REALNET_CITATION = """@inproceedings{zhang2024realnet,
  title     = {RealNet: A Feature Selection Network with Realistic Synthetic Anomaly for Anomaly Detection},
  author    = {Zhang, Ximiao and Xu, Min and Zhou, Xiuzhuang},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2024},
  eprint    = {2403.05897},
  archivePrefix = {arXiv}
}"""

# Source benchmarks: display name, Hub-style id, licence, home page and citation. All four are
# released under CC BY-NC-SA 4.0, which therefore binds models and images derived from them.
SOURCE_DATASETS: dict[str, dict[str, str]] = {
    "mvtec-ad": {
        "pretty": "MVTec AD",
        "license": "cc-by-nc-sa-4.0",
        "url": "https://www.mvtec.com/company/research/datasets/mvtec-ad",
        "citation": """@inproceedings{bergmann2019mvtec,
  title     = {MVTec AD -- A Comprehensive Real-World Dataset for Unsupervised Anomaly Detection},
  author    = {Bergmann, Paul and Fauser, Michael and Sattlegger, David and Steger, Carsten},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2019}
}""",
    },
    "visa": {
        "pretty": "VisA",
        "license": "cc-by-nc-sa-4.0",
        "url": "https://github.com/amazon-science/spot-diff",
        "citation": """@inproceedings{zou2022spot,
  title     = {SPot-the-Difference Self-Supervised Pre-training for Anomaly Detection and Segmentation},
  author    = {Zou, Yang and Jeong, Jongheon and Pemula, Latha and Zhang, Dongqing and Dabeer, Onkar},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2022}
}""",
    },
    "mpdd": {
        "pretty": "MPDD",
        "license": "cc-by-nc-sa-4.0",
        "url": "https://github.com/stepanje/MPDD",
        "citation": """@inproceedings{jezek2021mpdd,
  title     = {Deep learning-based defect detection of metal parts: evaluating current methods in complex conditions},
  author    = {Jezek, Stepan and Jonak, Martin and Burget, Radim and Dvorak, Pavel and Skotak, Milos},
  booktitle = {International Congress on Ultra Modern Telecommunications and Control Systems and Workshops (ICUMT)},
  year      = {2021}
}""",
    },
    "btad": {
        "pretty": "BTAD",
        "license": "cc-by-nc-sa-4.0",
        "url": "http://avires.dimi.uniud.it/papers/btad/btad.zip",
        "citation": """@inproceedings{mishra2021vtadl,
  title     = {VT-ADL: A Vision Transformer Network for Image Anomaly Detection and Localization},
  author    = {Mishra, Pankaj and Verk, Riccardo and Fornasier, Daniele and Piciarelli, Claudio and Foresti, Gian Luca},
  booktitle = {IEEE International Symposium on Industrial Electronics (ISIE)},
  year      = {2021}
}""",
    },
}

_LICENCE_NAMES = {"cc-by-nc-sa-4.0": "CC BY-NC-SA 4.0", "mit": "MIT", "cc-by-4.0": "CC BY 4.0"}
_REALNET_CARDS = "RealNet cards are rendered by realnet.cards (render_realnet_card, write_realnet_card)"


def template_path(kind: str) -> Path:
    """Path of the shipped template for `kind` ("sdas" or "sia")."""
    if kind not in CARD_TEMPLATES:
        hint = f"; {_REALNET_CARDS}" if kind == "realnet" else ""
        raise InputError(f"card kind {kind!r}: expected one of {', '.join(CARD_TEMPLATES)}{hint}")
    return TEMPLATE_DIR / CARD_TEMPLATES[kind]


def _canonical_dataset(dataset: str | None) -> str | None:
    if dataset is None:
        return None
    return DATASET_ALIASES.get(dataset.strip().lower(), dataset)


def dataset_facts(dataset: str | None, license: str | None = None) -> dict[str, Any]:
    """Pretty name, licence id, licence sentence, URL and citations for a source data set.

    A known benchmark fixes the licence (its own); for custom data the caller's `license`
    is used, or "other" with a sentence telling users the source data's terms apply.
    """
    key = _canonical_dataset(dataset)
    known = SOURCE_DATASETS.get(key or "")
    if known:
        licence_id = known["license"]
        if license and license != licence_id:
            raise InputError(f"license: {known['pretty']} is {licence_id}; derived weights and images cannot be "
                             f"released as {license}")
        text = (f"{known['pretty']} is released under {_LICENCE_NAMES[licence_id]} "
                f"(https://creativecommons.org/licenses/by-nc-sa/4.0/); these files are derived from it and are "
                f"shared under the same licence: non-commercial use, attribution, share-alike. The code that "
                f"made them (the `sia` package) is MIT-licensed.")
        citation = REALNET_CITATION + "\n\n" + known["citation"]
        return {"dataset_key": key, "dataset_pretty": known["pretty"], "license": licence_id, "licence_text": text,
                "dataset_url": known["url"], "citation": citation}
    licence_id = license or "other"
    if license:
        text = f"Released under {_LICENCE_NAMES.get(license, license)}; the terms of the source images also apply."
    else:
        text = ("The licence follows that of the source images, which the publisher of these files must state; "
                "check it before any use.")
    return {"dataset_key": key, "dataset_pretty": dataset or "a custom image set", "license": licence_id,
            "licence_text": text, "dataset_url": None, "citation": REALNET_CITATION}


def size_category(count: int) -> str:
    """The Hub's `size_categories` bucket for `count` rows."""
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if count < limit:
            return label
    return "n>10M"


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format(v) for v in value)
    return str(value)


def settings_table(facts: Mapping[str, Any] | None) -> dict[str, str]:
    """A settings dictionary as the rows of a card table: values formatted, None left out."""
    return {str(k): _format(v) for k, v in (facts or {}).items() if v is not None}


def hub_tags(base: Sequence[str], dataset_key: str | None, extra: Sequence[str] = ()) -> list[str]:
    """A card's tags: its own, then the source benchmark's key, then the caller's (no repeats)."""
    tags = list(base)
    if dataset_key:
        tags.append(dataset_key)
    return tags + [t for t in extra if t not in tags]


def render_model_card(kind: str, **facts: Any):
    """Render a `huggingface_hub.ModelCard` for an SDAS pipeline (`kind` "sdas").

    Facts used (all optional): repo_id, revision, dataset, categories, training (dict),
    architecture (dict), image_size, source (provenance sentence), license (only for custom data),
    tags, base_model, title.
    """
    from huggingface_hub import ModelCard, ModelCardData

    if kind != "sdas":
        hint = f" ({_REALNET_CARDS})" if kind == "realnet" else ""
        raise InputError(f"model card kind {kind!r}: expected 'sdas'{hint}")
    info = dataset_facts(facts.get("dataset"), facts.get("license"))
    repo_id = facts.get("repo_id") or "path/to/model"
    dataset_key = info["dataset_key"]
    tags = hub_tags(["diffusers", "anomaly-synthesis", "sdas", "realnet", "industrial-inspection"], dataset_key,
                    facts.get("tags", []))
    categories = list(facts.get("categories") or DATASET_CATEGORIES.get(dataset_key or "", ()) or [])
    if not categories:
        raise InputError("categories: an SDAS card needs the pipeline's category list")
    image_size = facts.get("image_size", 256)
    architecture = {"UNet": "class-conditional ADM (diffusers UNet2DModel), learned variance (6 output channels)"}
    architecture.update(settings_table(facts.get("architecture")))
    card_data = ModelCardData(
        library_name="diffusers", license=info["license"], pipeline_tag="unconditional-image-generation",
        tags=tags, base_model=facts.get("base_model"),
    )
    title = facts.get("title") or f"SDAS anomaly synthesis for {info['dataset_pretty']}"
    return ModelCard.from_template(
        card_data, template_path=str(template_path("sdas")), title=title, repo_id=repo_id,
        revision=facts.get("revision"), categories=categories, example_category=categories[0],
        image_size=image_size, architecture=architecture, training=settings_table(facts.get("training")),
        source=facts.get("source"), **{k: info[k] for k in ("dataset_pretty", "dataset_url", "licence_text", "citation")},
    )


def render_dataset_card(
    counts: Mapping[str, int],
    dataset: str | None = None,
    repo_id: str | None = None,
    revision: str | None = None,
    generation: Mapping[str, Any] | None = None,
    strength_range: tuple[float, float] | None = None,
    image_size: str | None = None,
    has_mask: bool = False,
    columns: Sequence[str] = ("image", "category", "strength", "seed"),
    source: str | None = None,
    license: str | None = None,
    split: str = "train",
):
    """Render a `huggingface_hub.DatasetCard` for an SIA set with one config per category.

    `counts` maps category -> number of images; each category becomes a config whose data files are
    `data/<category>/<split>-*.parquet` (the layout written by `sia push`).
    """
    from huggingface_hub import DatasetCard, DatasetCardData

    if not counts:
        raise InputError("counts: an SIA dataset card needs at least one category")
    info = dataset_facts(dataset, license)
    total = int(sum(counts.values()))
    tags = ["anomaly-detection", "anomaly-synthesis", "synthetic", "sdas", "realnet"]
    if info["dataset_key"] in SOURCE_DATASETS:
        tags.append(info["dataset_key"])
    configs = [{"config_name": name, "data_files": [{"split": split, "path": f"data/{name}/{split}-*"}]}
               for name in counts]
    card_data = DatasetCardData(
        license=info["license"], task_categories=["image-segmentation"], size_categories=[size_category(total)],
        pretty_name=f"SIA: synthetic anomalies of {info['dataset_pretty']}", tags=tags,
        source_datasets=[info["dataset_key"]] if info["dataset_key"] in SOURCE_DATASETS else None,
        configs=configs,
    )
    strength_text = None
    if strength_range is not None:
        strength_text = f"{strength_range[0]:.3g} to {strength_range[1]:.3g}"
    first = next(iter(counts))
    return DatasetCard.from_template(
        card_data, template_path=str(template_path("sia")),
        title=f"SIA — synthetic industrial anomalies of {info['dataset_pretty']}",
        repo_id=repo_id or "path/to/dataset", revision=revision, num_images=total, counts=dict(counts),
        example_category=first, generation=settings_table(generation), strength_range=strength_text,
        image_size=image_size, has_mask=has_mask, columns=list(columns), source=source,
        **{k: info[k] for k in ("dataset_pretty", "licence_text", "citation")},
    )


def write_model_card(folder: str | Path, kind: str, **facts: Any) -> Path:
    """Render an SDAS model card and write it as `folder/README.md` (replacing an auto-generated stub)."""
    _check_model_folder(folder)
    return write_card(folder, render_model_card(kind, **facts))


def _check_model_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: model folder does not exist")
    return folder


def write_card(folder: str | Path, card: Any) -> Path:
    """Write a rendered card as `folder/README.md`, atomically (a kill never leaves half a card)."""
    folder = _check_model_folder(folder)
    path = folder / "README.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(str(card), encoding="utf-8")
    tmp.replace(path)
    return path
