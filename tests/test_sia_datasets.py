"""SIA data sets: load from folders and an offline Hub cache, stage parquet + card, push wiring."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import sia.hub as hub
from sia.errors import InputError
from sia.hub import load_sia, open_sia_images, push_sia_dataset, sia_categories, sia_repo_id, stage_sia_dataset

COUNTS = {"bottle": 5, "cable": 3}


def _png(path: Path, rng: np.random.Generator, size: int = 16, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)


def make_generated(root: Path, per_category_metadata: bool = False, masks: bool = False) -> Path:
    """A folder as `sia generate` writes it: <category>/*.png + metadata.jsonl."""
    rng = np.random.default_rng(0)
    rows_by_category: dict[str, list[dict]] = {}
    for category, count in COUNTS.items():
        for i in range(count):
            name = f"{category}/{i:05d}.png"
            _png(root / name, rng)
            row = {"file_name": name, "category": category, "strength": round(0.1 + 0.02 * i, 4), "seed": 1000 + i}
            if masks:
                _png(root / f"{category}/masks/{i:05d}.png", rng, mode="L")
                row["mask_file_name"] = f"{category}/masks/{i:05d}.png"
            rows_by_category.setdefault(category, []).append(row)
    if per_category_metadata:
        for category, rows in rows_by_category.items():
            hub.write_sia_metadata(root / category, [
                {**r, "file_name": r["file_name"].split("/", 1)[1],
                 **({"mask_file_name": r["mask_file_name"].split("/", 1)[1]} if masks else {})} for r in rows])
    else:
        hub.write_sia_metadata(root, [r for rows in rows_by_category.values() for r in rows])
    return root


def make_official(root: Path) -> Path:
    """The official release layout: <class>/*.jpg and nothing else."""
    rng = np.random.default_rng(1)
    for category, count in COUNTS.items():
        for i in range(count):
            path = root / category / f"rank0_{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path, quality=90)
    return root


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


# ------------------------------------------------------------------ local folders


@pytest.mark.parametrize("per_category", [False, True])
def test_load_generated_folder(tmp_path, per_category):
    root = make_generated(tmp_path / "gen", per_category_metadata=per_category)
    ds = load_sia(root)
    assert len(ds) == sum(COUNTS.values())
    assert {"image", "category", "strength", "seed"} <= set(ds.column_names)
    assert sorted(set(ds["category"])) == sorted(COUNTS)
    bottle = load_sia(root, category="mvtec-ad/bottle")
    assert len(bottle) == COUNTS["bottle"] and set(bottle["category"]) == {"bottle"}
    row = bottle[2]
    assert row["strength"] == pytest.approx(0.14) and row["seed"] == 1002
    np.testing.assert_array_equal(_pixels(row["image"]), _pixels(Image.open(root / "bottle/00002.png")))
    assert sia_categories(root) == sorted(COUNTS)


def test_generated_folder_agrees_with_datasets_imagefolder(tmp_path):
    """The reader and `load_dataset('imagefolder')` see the same rows (the format is ImageFolder's)."""
    from datasets import load_dataset

    root = make_generated(tmp_path / "gen")
    reference = load_dataset("imagefolder", data_dir=str(root), split="train", cache_dir=str(tmp_path / "cache"))
    ours = load_sia(root)
    key = lambda ds: sorted(zip(ds["category"], [round(s, 4) for s in ds["strength"]], ds["seed"]))  # noqa: E731
    assert key(reference) == key(ours)


def test_official_layout_has_unknown_strength(tmp_path):
    root = make_official(tmp_path / "sdas")
    ds = load_sia(root, category="cable")
    assert len(ds) == COUNTS["cable"]
    assert ds["strength"] == [None] * COUNTS["cable"] and ds["seed"] == [None] * COUNTS["cable"]


def test_masks_are_loaded_when_present(tmp_path):
    root = make_generated(tmp_path / "gen", masks=True)
    ds = load_sia(root, category="cable")
    assert "mask" in ds.column_names and ds[0]["mask"].size == (16, 16)


def test_streaming_yields_the_same_rows(tmp_path):
    root = make_generated(tmp_path / "gen")
    rows = list(load_sia(root, category="bottle", streaming=True))
    assert [r["seed"] for r in rows] == [1000 + i for i in range(COUNTS["bottle"])]


# ------------------------------------------------------------------ staging (push without network)


def _front_matter(readme: Path) -> dict:
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_stage_writes_parquet_shards_and_card(tmp_path):
    source = make_generated(tmp_path / "gen")
    (source / "generation.json").write_text(json.dumps({"model": "acme/sdas-mvtec", "num_inference_steps": 20}))
    staging = stage_sia_dataset(source, tmp_path / "stage", repo_id="acme/sia-mvtec", max_shard_size=200)
    files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*.parquet"))
    # 200-byte shards force several shards per category; names follow push_to_hub's pattern
    assert any(f.startswith("data/bottle/train-00000-of-") for f in files)
    for category, count in COUNTS.items():
        shards = [f for f in files if f.startswith(f"data/{category}/")]
        n = len(shards)
        assert n == count  # each image is larger than 200 bytes, so one image per shard
        assert shards == [f"data/{category}/train-{i:05d}-of-{n:05d}.parquet" for i in range(n)]

    meta = _front_matter(staging / "README.md")
    assert meta["license"] == "cc-by-nc-sa-4.0"
    assert meta["source_datasets"] == ["mvtec-ad"]
    assert {c["config_name"] for c in meta["configs"]} == set(COUNTS)
    assert {"split": "train", "path": "data/bottle/train-*"} in next(
        c for c in meta["configs"] if c["config_name"] == "bottle")["data_files"]
    body = (staging / "README.md").read_text(encoding="utf-8")
    assert "zhang2024realnet" in body and "bergmann2019mvtec" in body
    assert "num_inference_steps" in body and "0.1 to 0.18" in body
    assert "| `bottle` | 5 |" in body


def test_staged_set_round_trips(tmp_path):
    source = make_generated(tmp_path / "gen", masks=True)
    staging = stage_sia_dataset(source, tmp_path / "stage")
    ds = load_sia(staging, category="bottle", cache_dir=tmp_path / "cache")
    assert len(ds) == COUNTS["bottle"] and "mask" in ds.column_names
    by_seed = {row["seed"]: row for row in ds}
    for i in range(COUNTS["bottle"]):
        row = by_seed[1000 + i]
        # image bytes are embedded unchanged (no re-encoding)
        np.testing.assert_array_equal(_pixels(row["image"]), _pixels(Image.open(source / f"bottle/{i:05d}.png")))
        assert row["strength"] == pytest.approx(0.1 + 0.02 * i)
    assert sorted(load_sia(staging, cache_dir=tmp_path / "cache")["category"]) == sorted(
        [c for c, n in COUNTS.items() for _ in range(n)])
    assert len(list(load_sia(staging, category="cable", streaming=True))) == COUNTS["cable"]


def test_card_configs_work_with_plain_load_dataset(tmp_path):
    """The card's per-category configs are what `load_dataset(repo, config)` reads on the Hub."""
    from datasets import load_dataset

    staging = stage_sia_dataset(make_generated(tmp_path / "gen"), tmp_path / "stage")
    ds = load_dataset(str(staging), "cable", split="train", cache_dir=str(tmp_path / "cache"))
    assert len(ds) == COUNTS["cable"] and set(ds["category"]) == {"cable"}


def test_stage_refuses_to_overwrite(tmp_path):
    source = make_generated(tmp_path / "gen")
    staging = stage_sia_dataset(source, tmp_path / "stage")
    with pytest.raises(InputError, match="not empty"):
        stage_sia_dataset(source, staging)
    assert stage_sia_dataset(source, staging, overwrite=True) == staging


def test_stage_overwrite_swaps_in_a_complete_folder(tmp_path, monkeypatch):
    source = make_generated(tmp_path / "gen")
    staging = stage_sia_dataset(source, tmp_path / "stage")
    stale = staging / "data" / "cable" / "train-00007-of-00009.parquet"  # a shard of an earlier staging
    stale.write_bytes(b"stale")
    original = hub._write_category_shards

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hub, "_write_category_shards", fail)
    with pytest.raises(RuntimeError):
        stage_sia_dataset(source, staging, overwrite=True)
    assert stale.is_file() and (staging / "README.md").is_file()  # untouched by the failure
    monkeypatch.setattr(hub, "_write_category_shards", original)
    stage_sia_dataset(source, staging, overwrite=True)
    assert not stale.exists() and (staging / "data" / "cable").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen", "stage"]  # no temporary folder left


def test_stage_creates_missing_parents_next_to_the_target(tmp_path, monkeypatch):
    import tempfile

    folders = []
    original = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: folders.append(k.get("dir")) or original(*a, **k))
    target = tmp_path / "new" / "deeper" / "stage"
    assert stage_sia_dataset(make_generated(tmp_path / "gen"), target) == target
    assert folders and all(Path(f) == target.parent for f in folders)


def test_stage_refuses_a_folder_inside_or_around_the_source(tmp_path):
    source = make_generated(tmp_path / "gen")
    before = sorted(p.relative_to(source) for p in source.rglob("*"))
    for staging in (source, source / "bottle", source / "new" / "stage", tmp_path):
        with pytest.raises(InputError, match="overlaps the input"):
            stage_sia_dataset(source, staging, overwrite=True)
    assert sorted(p.relative_to(source) for p in source.rglob("*")) == before


def test_push_stages_then_uploads(tmp_path, monkeypatch):
    """push = staging + HfApi calls; the API is replaced by a recorder (no network)."""
    import huggingface_hub

    calls = []

    class Recorder:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def create_branch(self, repo_id, **kwargs):
            calls.append(("create_branch", repo_id, kwargs))

        def upload_folder(self, folder_path, **kwargs):
            uploaded = sorted(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file())
            calls.append(("upload_folder", uploaded, kwargs))
            return "https://huggingface.co/datasets/acme/sia/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", Recorder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the suite runs offline
    url = push_sia_dataset(make_generated(tmp_path / "gen"), "acme/sia", private=True, revision="v1")
    assert url.endswith("/commit/abc")
    names = [c[0] for c in calls]
    assert names == ["init", "create_repo", "create_branch", "upload_folder"]
    assert calls[1][2]["repo_type"] == "dataset" and calls[1][2]["private"] is True
    assert calls[2][2]["branch"] == "v1"
    uploaded, kwargs = calls[3][1], calls[3][2]
    assert "README.md" in uploaded and "data/bottle/train-00000-of-00001.parquet" in uploaded
    assert kwargs["revision"] == "v1" and kwargs["repo_id"] == "acme/sia" and kwargs["repo_type"] == "dataset"
    with pytest.raises(InputError, match="ORG/NAME"):
        push_sia_dataset(tmp_path / "gen", "no-slash")


# ------------------------------------------------------------------ Hub-shaped offline cache


def _fake_hub_cache(cache: Path, repo_id: str, snapshots: dict[str, Path]) -> None:
    """Lay out `datasets--org--name/{refs,snapshots}` as huggingface_hub does (plain copies)."""
    repo = cache / ("datasets--" + repo_id.replace("/", "--"))
    for i, (ref, folder) in enumerate(snapshots.items()):
        commit = f"{i + 1:040x}"
        shutil.copytree(folder, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_load_from_offline_hub_cache_by_id_alias_and_revision(tmp_path, offline_cache, monkeypatch):
    main = stage_sia_dataset(make_generated(tmp_path / "gen"), tmp_path / "stage-main")
    only_bottle = tmp_path / "gen-v1"
    make_generated(only_bottle)
    shutil.rmtree(only_bottle / "cable")
    rows = [json.loads(line) for line in (only_bottle / "metadata.jsonl").read_text().splitlines()]
    hub.write_sia_metadata(only_bottle, [r for r in rows if r["category"] == "bottle"][:2])
    v1 = stage_sia_dataset(only_bottle, tmp_path / "stage-v1")
    _fake_hub_cache(offline_cache, "acme/sia-mvtec", {"main": main, "v1": v1})

    ds = load_sia("acme/sia-mvtec", category="cable", cache_dir=tmp_path / "cache")
    assert len(ds) == COUNTS["cable"]
    assert len(load_sia("acme/sia-mvtec", category="bottle", revision="v1", cache_dir=tmp_path / "cache")) == 2

    monkeypatch.setenv("SIA_REPO_MVTEC_AD", "acme/sia-mvtec")
    assert sia_repo_id("MVTec-AD") == "acme/sia-mvtec"
    assert len(load_sia("mvtec-ad", category="bottle", cache_dir=tmp_path / "cache")) == COUNTS["bottle"]

    source = open_sia_images("mvtec-ad", category="bottle")
    assert len(source) == COUNTS["bottle"]


def test_hub_repo_with_one_top_level_metadata_loads_one_category(tmp_path, offline_cache):
    """Only `bottle/*` and the top-level metadata.jsonl are downloaded for category="bottle"; the
    rows of the other categories point at files that are not there."""
    generated = make_generated(tmp_path / "gen")
    _fake_hub_cache(offline_cache, "acme/sia-folder", {"main": generated})
    snapshot = next((offline_cache / "datasets--acme--sia-folder" / "snapshots").iterdir())
    shutil.rmtree(snapshot / "cable")  # what allow_patterns=["bottle/*", "metadata.jsonl", ...] leaves out
    ds = load_sia("acme/sia-folder", category="bottle")
    assert len(ds) == COUNTS["bottle"] and set(ds["category"]) == {"bottle"}
    assert ds["seed"] == [1000 + i for i in range(COUNTS["bottle"])]
    with pytest.raises(InputError, match=r"category 'zipper': not in acme/sia-folder; present: bottle, cable"):
        load_sia("acme/sia-folder", category="zipper")
    with pytest.raises(InputError, match="does not exist"):  # all categories: the missing images are an error
        load_sia("acme/sia-folder")


def test_missing_repo_offline_is_one_line_error(offline_cache):
    with pytest.raises(InputError, match="not in the local Hub cache") as err:
        load_sia("acme/absent", category="bottle")
    assert "\n" not in str(err.value)


def test_default_alias_repos(monkeypatch):
    monkeypatch.delenv("SIA_REPO_VISA", raising=False)
    assert sia_repo_id("visa") == hub.DEFAULT_SIA_REPOS["visa"]
    monkeypatch.setenv("SIA_REPO_VISA", "me/my-visa")
    assert sia_repo_id("visa") == "me/my-visa"


# ------------------------------------------------------------------ augmentation hook


def test_open_sia_images_feeds_sia_source(tmp_path):
    from sia.sources import SIASource

    gen = make_generated(tmp_path / "gen")
    assert open_sia_images(gen, category="bottle") == gen / "bottle"  # plain folder: read files directly
    staging = stage_sia_dataset(gen, tmp_path / "stage")
    data = open_sia_images(staging, category="cable")
    assert len(data) == COUNTS["cable"]
    source = SIASource(data, category="cable")
    image = source.sample(torch.zeros(3, 32, 32), torch.Generator().manual_seed(0))
    assert image.shape == (3, 32, 32) and 0 <= image.min() and image.max() <= 1


# ------------------------------------------------------------------ bad input


def test_bad_inputs_are_one_line_input_errors(tmp_path, offline_cache):
    gen = make_generated(tmp_path / "gen")
    cases = [
        lambda: load_sia("not-an-alias"),
        lambda: load_sia(gen, category="zipper"),
        lambda: load_sia("mvtec-ad", category="pcb1"),
        lambda: load_sia(gen, split="test"),
        lambda: load_sia(tmp_path / "gen" / "metadata.jsonl"),
        lambda: open_sia_images(gen, category="zipper"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append(lambda: load_sia(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metadata.jsonl").write_text('{"file_name": "missing.png", "category": "bottle"}\n')
    cases.append(lambda: load_sia(broken))
    staging = stage_sia_dataset(gen, tmp_path / "stage")
    cases.append(lambda: load_sia(staging, category="zipper"))
    for case in cases:
        with pytest.raises(InputError) as err:
            case()
        assert "\n" not in str(err.value)
    # checked before any download: the message is about the category, not the offline cache
    with pytest.raises(InputError, match=r"category 'pcb1': not a mvtec-ad category; known: bottle, cable"):
        load_sia("mvtec-ad", category="pcb1")
    with pytest.raises(InputError, match=r"category 'pcb1': not a mvtec-ad category"):
        load_sia("mvtec-ad", category="mvtec-ad/pcb1")
