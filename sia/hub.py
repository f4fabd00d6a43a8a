"""SIA data sets: load them from anywhere, stage them as Hub parquet, push them.

An SIA set is a collection of synthetic anomaly images with their category and, where known, the
anomaly strength and seed they were sampled with. It can live in four places, all loaded by
`load_sia` into the same `datasets` schema (`image`, `category`, `strength`, `seed`, plus `mask`
when present):

- a folder written by `sia generate`: `<category>/*.png` with `metadata.jsonl` (the
  `datasets` ImageFolder convention: `file_name` relative to the metadata file, other keys are
  columns), at the top or in each category folder;
- a folder in the official release layout, `<category>/*.jpg` with no metadata (strength and seed
  unknown, so null);
- a folder written by `stage_sia_dataset` / `sia push`: `data/<category>/train-0000i-of-0000n.parquet`
  with images embedded, plus a `README.md` card with one config per category;
- a Hub data set repo of either layout, given by id (`org/name`) or by a short alias of a
  benchmark (`mvtec-ad`, `visa`, `mpdd`, `btad`), resolved through the Hub cache so
  `HF_HUB_OFFLINE=1` works once it has been downloaded.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .categories import DATASET_CATEGORIES, resolve_dataset
from .errors import InputError
from .images import IMAGE_EXTENSIONS
from .outputs import check_replaceable, files_under, partial_folder, swap_in
from .paths import inside, path_component, separate_output, writable_folder_path

__all__ = [
    "DEFAULT_SIA_REPOS",
    "SIA_REPO_ENV",
    "sia_repo_id",
    "load_sia",
    "sdas_repo_id",
    "sia_categories",
    "stage_sia_dataset",
    "push_sia_dataset",
    "open_sia_images",
    "write_sia_metadata",
]

# Default Hub repos of the SIA sets per benchmark; override one with its environment variable.
DEFAULT_SIA_REPOS: dict[str, str] = {
    "mvtec-ad": "sia-realnet/sia-mvtec-ad",
    "visa": "sia-realnet/sia-visa",
    "mpdd": "sia-realnet/sia-mpdd",
    "btad": "sia-realnet/sia-btad",
}
SIA_REPO_ENV: dict[str, str] = {name: "SIA_REPO_" + name.upper().replace("-", "_") for name in DEFAULT_SIA_REPOS}
# Default Hub repos of the SDAS pipelines (one class-conditional model per benchmark, as the paper).
DEFAULT_SDAS_REPOS: dict[str, str] = {name: f"sia-realnet/sdas-{name}" for name in DEFAULT_SIA_REPOS}
SDAS_REPO_ENV: dict[str, str] = {name: "SIA_SDAS_REPO_" + name.upper().replace("-", "_") for name in DEFAULT_SDAS_REPOS}

METADATA_NAME = "metadata.jsonl"
STANDARD_COLUMNS = ("image", "category", "strength", "seed")
_SKIPPED_KEYS = {"file_name", "mask_file_name", "image", "mask"}


def _features(has_mask: bool, extra: Mapping[str, Any] | None = None):
    from datasets import Features, Image, Value

    spec = {"image": Image(), "category": Value("string"), "strength": Value("float32"), "seed": Value("int64")}
    if has_mask:
        spec["mask"] = Image()
    spec.update(extra or {})
    return Features(spec)


# ---------------------------------------------------------------------------------------------
# name resolution


def sia_repo_id(alias: str) -> str:
    """Hub repo id of a benchmark's SIA set (`mvtec-ad`, `visa`, `mpdd`, `btad`, or their aliases).

    The environment variable `SIA_REPO_<NAME>` (e.g. `SIA_REPO_MVTEC_AD`) overrides the default.
    """
    dataset = resolve_dataset(alias)
    return os.environ.get(SIA_REPO_ENV[dataset]) or DEFAULT_SIA_REPOS[dataset]


def sdas_repo_id(alias: str) -> str:
    """Hub repo id of a benchmark's SDAS pipeline; `SIA_SDAS_REPO_<NAME>` overrides the default."""
    dataset = resolve_dataset(alias)
    return os.environ.get(SDAS_REPO_ENV[dataset]) or DEFAULT_SDAS_REPOS[dataset]


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and "\\" not in text


def _resolve(name_or_path: str | os.PathLike, category: str | None, revision: str | None,
             cache_dir: str | os.PathLike | None) -> tuple[Path, str | None, str]:
    """Local folder of an SIA set, the benchmark it belongs to (if known) and a label for messages."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path, None, str(path)
    if path.exists():
        raise InputError(f"{path}: expected an SIA folder, a Hub dataset id or one of {', '.join(DEFAULT_SIA_REPOS)}")
    dataset = None
    try:
        dataset = resolve_dataset(text)
    except InputError:
        pass
    if dataset is not None:
        if category is not None and category not in DATASET_CATEGORIES[dataset]:
            raise InputError(f"category {category!r}: not a {dataset} category; "
                             f"known: {', '.join(DATASET_CATEGORIES[dataset])}")
        repo_id = sia_repo_id(dataset)
    elif _looks_like_repo_id(text):
        repo_id = text
    elif path.is_absolute() or text.startswith((".", "~")) or os.sep in text:
        raise InputError(f"{text}: no such folder (expected an SIA folder, a Hub dataset id org/name or one of "
                         f"{', '.join(DEFAULT_SIA_REPOS)})")
    else:
        raise InputError(f"name_or_path {text!r}: not an existing folder, a Hub dataset id (org/name) or a known "
                         f"alias ({', '.join(DEFAULT_SIA_REPOS)})")
    return _snapshot(repo_id, category, revision, cache_dir), dataset, repo_id


def _snapshot(repo_id: str, category: str | None, revision: str | None, cache_dir) -> Path:
    """Download (or find in the Hub cache) the files of `repo_id` needed for `category`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = None
    if category:
        patterns = ["README.md", "*.json", METADATA_NAME, f"data/{category}/*", f"{category}/*", f"{category}/**"]
    try:
        folder = snapshot_download(repo_id, repo_type="dataset", revision=revision, allow_patterns=patterns,
                                   cache_dir=cache_dir)
    except RevisionNotFoundError:
        raise InputError(f"revision {revision!r}: not found in dataset repo {repo_id!r}") from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise InputError(f"dataset repo {repo_id!r}: not found on the Hub (or not accessible with your token)") from None
    except LocalEntryNotFoundError:
        raise InputError(f"dataset repo {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
                         + ": not in the local Hub cache and the Hub cannot be reached (HF_HUB_OFFLINE?)") from None
    return Path(folder)


# ---------------------------------------------------------------------------------------------
# local layouts


@dataclass
class _Record:
    image: Path
    category: str
    strength: float | None = None
    seed: int | None = None
    mask: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _parquet_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.parquet") if not any(part.startswith(".") for part in p.relative_to(root).parts))


def _metadata_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(METADATA_NAME) if not any(part.startswith(".") for part in p.relative_to(root).parts))


def _metadata_rows(root: Path, files: list[Path]) -> Iterator[tuple[Path, int, dict, Path, str]]:
    """(metadata file, line number, row, image path, category) of every metadata line; files are not opened, so a
    partial download (one category of a repo with a top-level metadata.jsonl) can be listed."""
    for meta in files:
        with meta.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise InputError(f"{meta}:{number}: not a JSON line") from None
                if not isinstance(row, dict) or "file_name" not in row:
                    raise InputError(f"{meta}:{number}: expected an object with 'file_name'")
                image, relative = _member(root, meta, number, "file_name", row["file_name"])
                category = row.get("category")
                if category is None:
                    category = relative.parts[0] if len(relative.parts) > 1 else meta.parent.name
                # a category becomes a folder name (staging's data/<category>/), so it must be a plain name
                yield meta, number, row, image, path_component(str(category), f"{meta}:{number}: category")


def _member(root: Path, meta: Path, number: int, key: str, value: object) -> tuple[Path, Path]:
    """(path, path relative to `root`) of an image a metadata row names; InputError if it is not an image
    file inside the set. The check is on the names (symlinked files, as in the Hub cache, stay valid)."""
    where = f"{meta}:{number}: {key}"
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: expected a file name relative to {meta.parent}, got {value!r}")
    relative = Path(os.path.normpath(meta.parent.relative_to(root) / value))
    if relative.is_absolute() or relative.parts[:1] == ("..",) or relative == Path("."):
        raise InputError(f"{where} {value!r}: must name a file inside the set {root}")
    if relative.suffix.lower() not in IMAGE_EXTENSIONS:
        raise InputError(f"{where} {value!r}: not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)})")
    return root / relative, relative


def _read_metadata(root: Path, files: list[Path], category: str | None = None) -> list[_Record]:
    """Records of the metadata files; with `category`, rows of other categories are skipped
    (their images need not be there)."""
    records: list[_Record] = []
    for meta, number, row, image, row_category in _metadata_rows(root, files):
        if category is not None and row_category != category:
            continue
        if not image.is_file():
            raise InputError(f"{meta}:{number}: image {row['file_name']!r} does not exist")
        mask = _member(root, meta, number, "mask_file_name", row["mask_file_name"])[0] if row.get("mask_file_name") else None
        if mask is not None and not mask.is_file():
            raise InputError(f"{meta}:{number}: mask {row['mask_file_name']!r} does not exist")
        extra = {k: v for k, v in row.items() if k not in _SKIPPED_KEYS | {"category", "strength", "seed"}
                 and (v is None or isinstance(v, (bool, int, float, str)))}
        records.append(_Record(image, row_category, _optional(row.get("strength"), float),
                               _optional(row.get("seed"), int), mask, extra))
    return records


def _optional(value: Any, kind: type) -> Any:
    return None if value is None else kind(value)


def _plain_folder_records(root: Path) -> list[_Record]:
    """Official release layout: one sub-folder of images per category, nothing else known."""
    records = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        records += [_Record(f, folder.name) for f in files]
    if not records:
        files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        records = [_Record(f, root.name) for f in files]
    return records


def _folder_kind(root: Path) -> str:
    if _parquet_files(root):
        return "parquet"
    if _metadata_files(root):
        return "imagefolder"
    return "images"


def _records(root: Path, category: str | None = None) -> list[_Record]:
    """Every record of a local image folder, or only those of `category`."""
    kind = _folder_kind(root)
    if kind == "imagefolder":
        records = _read_metadata(root, _metadata_files(root), category)
    else:
        records = [r for r in _plain_folder_records(root) if category is None or r.category == category]
    if not records:
        raise InputError(f"{root}: no SIA images found (expected <category>/*.png with metadata.jsonl, "
                         "<category>/*.jpg, or data/<category>/*.parquet)")
    return records


def _parquet_categories(root: Path, split: str) -> dict[str, list[Path]]:
    """Per-category shards of the `data/<category>/<split>-*.parquet` layout."""
    by_category: dict[str, list[Path]] = {}
    for path in _parquet_files(root):
        relative = path.relative_to(root).parts
        if len(relative) == 3 and relative[0] == "data" and path.name.startswith(f"{split}-"):
            by_category.setdefault(relative[1], []).append(path)
    return by_category


def sia_categories(name_or_path: str | os.PathLike, split: str = "train", revision: str | None = None) -> list[str]:
    """Categories present in an SIA set (local folder, Hub id or alias)."""
    root, dataset, label = _resolve(name_or_path, None, revision, None)
    return _categories_of(root, split, label)


def _categories_of(root: Path, split: str, label: str) -> list[str]:
    if _folder_kind(root) == "parquet":
        by_category = _parquet_categories(root, split)
        if by_category:
            return sorted(by_category)
        import pyarrow.parquet as pq

        files = [p for p in _parquet_files(root) if p.name.startswith(f"{split}-") or split in p.parts]
        names: set[str] = set()
        for path in files:
            names.update(pq.read_table(path, columns=["category"]).column("category").to_pylist())
        return sorted(n for n in names if n is not None)
    if _folder_kind(root) == "imagefolder":
        return sorted({row[-1] for row in _metadata_rows(root, _metadata_files(root))})
    return sorted({r.category for r in _records(root)})


# ---------------------------------------------------------------------------------------------
# loading


def _normalise_category(category: str | None) -> str | None:
    if category is None:
        return None
    text = str(category).strip()
    return path_component(text.split("/", 1)[1] if "/" in text else text, "category")


def load_sia(
    name_or_path: str | os.PathLike,
    category: str | None = None,
    split: str = "train",
    streaming: bool = False,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
):
    """Load an SIA set as a `datasets.Dataset` (or `IterableDataset` with `streaming=True`).

    Args:
        name_or_path: a local folder (see the module docstring), a Hub dataset id `org/name`, or
            an alias `mvtec-ad` | `visa` | `mpdd` | `btad` (default repos in `DEFAULT_SIA_REPOS`,
            overridable with `SIA_REPO_MVTEC_AD` etc.). An existing folder wins over an alias.
        category: keep only this category (`"bottle"` or `"mvtec-ad/bottle"`); None keeps all.
        split: split of the set (SIA sets have only "train").
        streaming: return an `IterableDataset` that reads rows lazily.
        revision: Hub branch, tag or commit (ignored for local folders).
        cache_dir: `datasets` cache for the prepared Arrow files (default: the usual cache).

    Columns: `image` (PIL), `category` (str), `strength` (float or None), `seed` (int or None),
    `mask` (PIL) when the set has masks, and any extra metadata columns.
    """
    category = _normalise_category(category)
    root, dataset, label = _resolve(name_or_path, category, revision, None)  # checks a benchmark's category
    categories = _categories_of(root, split, label) if _folder_kind(root) == "parquet" else None

    if categories is not None:
        return _load_parquet(root, label, category, categories, split, streaming, cache_dir)
    if split != "train":
        raise InputError(f"split {split!r}: {label} is an image folder with only a 'train' split")
    if category is not None:
        present = _categories_of(root, split, label)
        if category not in present:
            raise InputError(f"category {category!r}: not in {label}; present: {', '.join(present)}")
    data = _records_to_dataset(_records(root, category))
    return data.to_iterable_dataset() if streaming else data


def _load_parquet(root: Path, label: str, category: str | None, categories: list[str], split: str,
                  streaming: bool, cache_dir):
    from datasets import load_dataset

    if not categories:
        what = f"category {category!r} of split {split!r}" if category else f"split {split!r}"
        raise InputError(f"{label}: no parquet files for {what}")
    if category is not None and category not in categories:
        raise InputError(f"category {category!r}: not in {label}; present: {', '.join(categories)}")
    by_category = _parquet_categories(root, split)
    if by_category:
        wanted = [category] if category is not None else categories
        files = [str(p) for name in wanted for p in sorted(by_category[name])]
        filter_needed = False
    else:  # a single parquet table (e.g. written by Dataset.push_to_hub) with a category column
        files = [str(p) for p in _parquet_files(root) if p.name.startswith(f"{split}-") or split in p.parts]
        filter_needed = category is not None
    data = load_dataset("parquet", data_files={split: files}, split=split, streaming=streaming,
                        cache_dir=None if cache_dir is None else str(cache_dir))
    if filter_needed:
        data = data.filter(lambda value: value == category, input_columns="category")
    return data


def _records_to_dataset(records: list[_Record]):
    from datasets import Dataset

    has_mask = any(r.mask is not None for r in records)
    extra_keys = sorted({k for r in records for k in r.extra})
    columns: dict[str, list[Any]] = {
        "image": [str(r.image) for r in records],
        "category": [r.category for r in records],
        "strength": [r.strength for r in records],
        "seed": [r.seed for r in records],
    }
    if has_mask:
        columns["mask"] = [str(r.mask) if r.mask is not None else None for r in records]
    extra_features = {}
    for key in extra_keys:
        values = [r.extra.get(key) for r in records]
        columns[key] = values
        extra_features[key] = _infer_value_feature(values)
    return Dataset.from_dict(columns, features=_features(has_mask, extra_features))


def _infer_value_feature(values: list[Any]):
    from datasets import Value

    kinds = {type(v) for v in values if v is not None}
    if kinds <= {bool}:
        return Value("bool")
    if kinds <= {int}:
        return Value("int64")
    if kinds <= {int, float}:
        return Value("float64")
    return Value("string")


# ---------------------------------------------------------------------------------------------
# augmentation hook


def open_sia_images(spec: str | os.PathLike, category: str | None = None):
    """What an SIA anomaly source should read for `spec`: a folder path or a `datasets.Dataset`.

    Plain image folders (with or without metadata) come back as the category's folder path when
    it exists, so the augmentation reads files directly; parquet folders, Hub ids and aliases come
    back as a Dataset filtered to `category` (all categories when None).
    """
    category = _normalise_category(category)
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_dir() and _folder_kind(path) != "parquet":
        if category and (path / category).is_dir():
            return path / category
        if category:
            present = _categories_of(path, "train", str(path))
            if category not in present:
                raise InputError(f"category {category!r}: no SIA images of it in {path}; present: {', '.join(present)}")
            return load_sia(path, category=category)
        return path
    return load_sia(text, category=category)


# ---------------------------------------------------------------------------------------------
# staging and pushing


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    for suffix, factor in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if text.endswith(suffix):
            try:
                return int(float(text[: -len(suffix)]) * factor)
            except ValueError:
                break
    raise InputError(f"max_shard_size {size!r}: expected bytes or a size like '500MB'")


def _image_size_text(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return f"{image.width} × {image.height}"
    except Exception:  # the size is only informative
        return None


def write_sia_metadata(folder: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write `folder/metadata.jsonl` atomically (rows need `file_name` relative to `folder`)."""
    folder = Path(folder)
    path = folder / METADATA_NAME
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def stage_sia_dataset(
    source: str | os.PathLike,
    staging_dir: str | os.PathLike,
    *,
    dataset: str | None = None,
    repo_id: str | None = None,
    revision: str | None = None,
    max_shard_size: int | str = "500MB",
    generation: Mapping[str, Any] | None = None,
    license: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Build the Hub layout of an SIA image folder in `staging_dir`, without any network access.

    Writes `data/<category>/train-0000i-of-0000n.parquet` (image bytes embedded as they are, no
    re-encoding; shards of at most `max_shard_size` of image data) and a `README.md` dataset card
    with one config per category, licence inherited from the source benchmark and the generation
    settings (`generation`, else `generation.json` in `source` when present).
    """
    source = Path(source)
    staging = Path(staging_dir)
    if repo_id is not None and not _looks_like_repo_id(repo_id):  # it goes into the card and the upload command
        raise InputError(f"repo_id {repo_id!r}: expected ORG/NAME")
    if not source.is_dir():
        raise InputError(f"{source}: SIA folder does not exist")
    if _folder_kind(source) == "parquet":
        raise InputError(f"{source}: already in parquet layout; upload it as it is")
    writable_folder_path(staging, "`staging_dir`")
    separate_output(staging, [source], "`staging_dir`")
    check_replaceable(staging, overwrite, _staged_files(staging), "`staging_dir`", "sia push --stage-only")
    records = _records(source)
    by_category: dict[str, list[_Record]] = {}
    for record in records:
        by_category.setdefault(record.category, []).append(record)
    dataset = _guess_dataset(by_category) if dataset is None else _named_dataset(dataset)
    if generation is None:
        generation = _stored_generation(source)

    has_mask = any(r.mask is not None for r in records)
    limit = _parse_size(max_shard_size)
    # Built next to the target (same file system, so the final renames are atomic) and swapped in
    # only when complete: a failure leaves an earlier staging folder as it was.
    partial = partial_folder(staging)
    try:
        for name, items in by_category.items():
            _write_category_shards(inside(partial / "data", name, "category"), items, has_mask, limit)
        strengths = [r.strength for r in records if r.strength is not None]
        from .cards import render_dataset_card

        card = render_dataset_card(
            {name: len(items) for name, items in by_category.items()}, dataset=dataset, repo_id=repo_id,
            revision=revision, generation=generation,
            strength_range=(min(strengths), max(strengths)) if strengths else None,
            image_size=_image_size_text(records[0].image), has_mask=has_mask,
            columns=list(STANDARD_COLUMNS) + (["mask"] if has_mask else []), license=license,
        )
        (partial / "README.md").write_text(str(card), encoding="utf-8")
        swap_in(partial, staging)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return staging


def _named_dataset(dataset: str) -> str:
    """A benchmark's canonical name; a custom data set's name as given."""
    try:
        return resolve_dataset(dataset)
    except InputError:
        return dataset


def _stored_generation(source: Path) -> Any:
    """The generation settings an SIA folder keeps, if any: `sia convert-official` writes
    generation.json, `sia generate` writes .sia/settings.json."""
    for candidate in (source / "generation.json", source / ".sia" / "settings.json"):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                raise InputError(f"{candidate}: not valid JSON") from None
    return None


def _staged_files(folder: Path) -> list[Path]:
    """Files an earlier staging wrote into `folder`: its card and the parquet shards under data/."""
    data = folder / "data"
    shards = [Path("data") / p for p in files_under(data) if p.suffix == ".parquet"] if data.is_dir() else []
    return [Path("README.md")] + shards


def _guess_dataset(by_category: Mapping[str, list[_Record]]) -> str | None:
    names = set(by_category)
    matches = [ds for ds, cats in DATASET_CATEGORIES.items() if names <= set(cats)]
    return matches[0] if len(matches) == 1 else None


def _write_category_shards(folder: Path, items: list[_Record], has_mask: bool, limit: int) -> None:
    from datasets import Dataset

    folder.mkdir(parents=True, exist_ok=True)
    sizes = [r.image.stat().st_size + (r.mask.stat().st_size if r.mask else 0) for r in items]
    num_shards = max(1, math.ceil(sum(sizes) / max(1, limit)))
    num_shards = min(num_shards, len(items))
    bounds = [round(i * len(items) / num_shards) for i in range(num_shards + 1)]
    extra_keys = sorted({k for r in items for k in r.extra})
    extra_features = {k: _infer_value_feature([r.extra.get(k) for r in items]) for k in extra_keys}
    features = _features(has_mask, extra_features)
    for shard in range(num_shards):
        chunk = items[bounds[shard]: bounds[shard + 1]]
        columns: dict[str, list[Any]] = {
            "image": [{"bytes": r.image.read_bytes(), "path": r.image.name} for r in chunk],
            "category": [r.category for r in chunk],
            "strength": [r.strength for r in chunk],
            "seed": [r.seed for r in chunk],
        }
        if has_mask:
            columns["mask"] = [{"bytes": r.mask.read_bytes(), "path": r.mask.name} if r.mask else None for r in chunk]
        for key in extra_keys:
            columns[key] = [r.extra.get(key) for r in chunk]
        Dataset.from_dict(columns, features=features).to_parquet(
            str(folder / f"train-{shard:05d}-of-{num_shards:05d}.parquet"))


def push_sia_dataset(
    source: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    dataset: str | None = None,
    max_shard_size: int | str = "500MB",
    generation: Mapping[str, Any] | None = None,
    license: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Stage `source` (see `stage_sia_dataset`) and upload it to the Hub dataset repo `repo_id`.

    Creates the repo (and the branch `revision`) when missing. Returns the commit URL.
    """
    import huggingface_hub.constants
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if not _looks_like_repo_id(repo_id):
        raise InputError(f"repo_id {repo_id!r}: expected ORG/NAME")
    offline = InputError(f"repo_id {repo_id}: cannot upload while HF_HUB_OFFLINE is set; unset it, or build the "
                         "upload locally with `stage_sia_dataset`")
    if huggingface_hub.constants.HF_HUB_OFFLINE:  # known before staging, which can take long
        raise offline
    with tempfile.TemporaryDirectory(prefix="sia-push-") as tmp:
        staging = stage_sia_dataset(source, Path(tmp) / "staging", dataset=dataset, repo_id=repo_id,
                                    revision=revision, max_shard_size=max_shard_size, generation=generation,
                                    license=license)
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
            if revision:
                api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True)
            info = api.upload_folder(
                folder_path=str(staging), repo_id=repo_id, repo_type="dataset", revision=revision,
                commit_message=commit_message or f"Upload SIA set from {Path(source).name}",
                delete_patterns=["data/**"],
            )
        except OfflineModeIsEnabled:
            raise offline from None
        except HfHubHTTPError as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(f"repo_id {repo_id}: the Hub refused the upload ({first_line})") from None
    return str(getattr(info, "commit_url", info))
