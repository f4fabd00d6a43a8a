"""`sia generate --images DIR --masks perlin|DIR`: in-context sets with the exact defect masks, resumable."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from typer.testing import CliRunner

from sia.cli import app
from sia.errors import InputError
from sia.generate_inpaint import generate_inpainted_dataset
from sia.pipeline import SDASPipeline

SIZE = 16
COMMON = {"category": "cable", "num_images": 5, "strength": (0.1, 0.3), "seed": 3, "batch_size": 2, "steps": 2,
          "progress": False}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    SDASPipeline.from_unet_preset("tiny-32", ["bottle", "cable"], sample_size=SIZE).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def normal_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("normal")
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        PIL.Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def reference(model_dir, normal_dir, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("reference")
    generate_inpainted_dataset(model_dir, output, normal_dir, **COMMON)
    return output


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def _array(path: Path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path), dtype=np.int16)


def test_each_sample_differs_from_its_normal_image_only_inside_its_mask(reference, normal_dir):
    records = _records(reference)
    assert [r["index"] for r in records] == list(range(5)) and [r["seed"] for r in records] == [3, 4, 5, 6, 7]
    assert [r["source_image"] for r in records] == ["a.png", "b.png", "c.png", "a.png", "b.png"]
    for r in records:
        image, mask = _array(reference / r["file_name"]), _array(reference / r["mask_file_name"]) > 0
        normal = _array(normal_dir / r["source_image"])
        assert 0.1 <= r["strength"] <= 0.3 and r["category"] == "cable" and r["mask_source"] == "perlin"
        assert mask.any() and not mask.all()
        assert np.array_equal(image[~mask], normal[~mask])
        assert np.abs(image[mask] - normal[mask]).mean() > 1


def test_output_loads_as_imagefolder_with_image_and_mask_columns(reference, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = datasets.load_dataset("imagefolder", data_dir=str(reference), split="train", cache_dir=str(tmp_path))
    assert len(rows) == 5 and {"image", "mask", "strength", "seed", "source_image"} <= set(rows.column_names)
    assert rows[0]["mask"].size == (SIZE, SIZE)


def test_interrupted_run_resumes_to_the_same_set(model_dir, normal_dir, reference, tmp_path):
    saved = []

    def crash_after_three(record):
        saved.append(record)
        if len(saved) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_inpainted_dataset(model_dir, tmp_path, normal_dir, **COMMON, on_image_saved=crash_after_three)
    summary = generate_inpainted_dataset(model_dir, tmp_path, normal_dir, **{**COMMON, "batch_size": 3})
    assert (summary.generated, summary.skipped, summary.total) == (2, 3, 5)
    assert not list(tmp_path.rglob("*.tmp"))
    ours, theirs = _records(tmp_path), _records(reference)
    assert [r["strength"] for r in ours] == [r["strength"] for r in theirs]
    for a, b in zip(ours, theirs, strict=True):  # another batch size: allow one grey level
        assert np.abs(_array(tmp_path / a["file_name"]) - _array(reference / b["file_name"])).max() <= 1
        assert np.array_equal(_array(tmp_path / a["mask_file_name"]), _array(reference / b["mask_file_name"]))
    with pytest.raises(InputError, match="was generated with other settings.*resamples"):
        generate_inpainted_dataset(model_dir, tmp_path, normal_dir, **{**COMMON, "resamples": 1})


def test_mask_folder_masks_are_the_defects_and_cli_writes_them(model_dir, normal_dir, tmp_path):
    masks = tmp_path / "masks_in"
    masks.mkdir()
    for i, name in enumerate(("a", "b_mask", "c")):
        mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
        mask[2 + i:8 + i, 3:11] = 255
        PIL.Image.fromarray(mask).save(masks / f"{name}.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["generate", "--model", str(model_dir), "--images", str(normal_dir), "--masks",
                                      str(masks), "--category", "bottle", "--strength", "0.2", "--steps", "2",
                                      "--output", str(out)])
    assert result.exit_code == 0, result.output
    records = _records(out)
    assert len(records) == 3 and {r["strength"] for r in records} == {0.2}
    for r, name in zip(records, ("a", "b_mask", "c"), strict=True):
        assert np.array_equal(_array(out / r["mask_file_name"]), _array(masks / f"{name}.png"))


@pytest.mark.parametrize("args,message", [
    (["--masks", "MISSING"], "--masks MISSING: expected 'perlin' or a folder of masks"),
    (["--category", "screw"], "unknown category 'screw'"),
    ([], "--category is needed: the model knows bottle, cable"),
    (["--category", "bottle", "--denoising-strength", "2"], r"denoising_strength must be a number in \(0, 1\]"),
])
def test_cli_bad_inputs_are_one_line_errors(model_dir, normal_dir, tmp_path, args, message):
    result = CliRunner().invoke(app, ["generate", "--model", str(model_dir), "--images", str(normal_dir), "--steps", "2",
                                      "--output", str(tmp_path / "out"), *args])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and re.search(message, errors[0])
    assert not (tmp_path / "out" / ".sia" / "settings.json").exists()


def test_output_inside_the_image_folder_is_refused(model_dir, normal_dir):
    with pytest.raises(InputError, match="overlaps the input"):
        generate_inpainted_dataset(model_dir, normal_dir / "out", normal_dir, **COMMON)
