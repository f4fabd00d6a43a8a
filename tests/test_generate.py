"""`sia generate`: imagefolder output, per-image determinism, resume after interruption, sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from typer.testing import CliRunner

from sia.cli import app
from sia.errors import InputError
from sia.generate import generate_dataset, parse_categories, parse_strength
from sia.pipeline import SDASPipeline

COMMON = dict(categories="bottle,cable", num_images=5, strength=(0.1, 0.2), seed=3, batch_size=2, steps=2,
              progress=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    SDASPipeline.from_unet_preset("tiny-32", ["bottle", "cable", "screw"], sample_size=16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("reference")
    generate_dataset(model_dir, output, **COMMON)
    return output


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(folder)): np.asarray(PIL.Image.open(p), dtype=np.int16)
            for p in sorted(folder.glob("*/*.png"))}


def _assert_same_dataset(a: Path, b: Path) -> None:
    pa, pb = _pixels(a), _pixels(b)
    assert sorted(pa) == sorted(pb)
    for name in pa:  # batch composition may move a float by an ulp: allow one grey level
        assert np.abs(pa[name] - pb[name]).max() <= 1, name
    assert (a / "metadata.jsonl").read_text() == (b / "metadata.jsonl").read_text()


def test_output_loads_as_imagefolder_with_metadata(reference):
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("imagefolder", data_dir=str(reference), split="train")
    assert len(ds) == 10
    for column in ("image", "category", "strength", "seed", "model", "revision", "sampler", "steps"):
        assert column in ds.column_names
    row = ds[0]
    assert row["image"].size == (16, 16) and row["category"] == "bottle" and row["sampler"] == "ddpm"
    assert all(0.1 <= s <= 0.2 for s in ds["strength"])
    assert sorted(set(ds["seed"])) == [3, 4, 5, 6, 7]


def test_images_depend_only_on_seed_plus_index(model_dir, reference, tmp_path):
    generate_dataset(model_dir, tmp_path, **{**COMMON, "batch_size": 3, "categories": ["cable"]})
    expected = _pixels(reference)
    for name, pixels in _pixels(tmp_path).items():
        assert np.abs(pixels - expected[name]).max() <= 1


def test_interrupted_run_resumes_to_the_same_dataset(model_dir, reference, tmp_path):
    saved = []

    def crash_after_three(record):
        saved.append(record["file_name"])
        if len(saved) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_dataset(model_dir, tmp_path, **COMMON, on_image_saved=crash_after_three)
    assert len(list(tmp_path.glob("*/*.png"))) == 3
    summary = generate_dataset(model_dir, tmp_path, **COMMON)
    assert (summary.generated, summary.skipped, summary.total) == (7, 3, 10)
    assert not list(tmp_path.rglob("*.tmp"))
    _assert_same_dataset(reference, tmp_path)
    again = generate_dataset(model_dir, tmp_path, **COMMON)
    assert again.generated == 0 and again.skipped == 10


def test_refuses_to_mix_settings(model_dir, reference):
    with pytest.raises(InputError, match="strength"):
        generate_dataset(model_dir, reference, **{**COMMON, "strength": 0.3})
    with pytest.raises(InputError, match="steps"):
        generate_dataset(model_dir, reference, **{**COMMON, "steps": 3})


def test_unknown_category_lists_known_ones(model_dir, tmp_path):
    with pytest.raises(InputError, match="bottle, cable, screw"):
        generate_dataset(model_dir, tmp_path, **{**COMMON, "categories": "carpet"})


@pytest.mark.slow
def test_two_processes_produce_the_same_set_as_one(model_dir, reference, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    script = tmp_path / "run.py"
    output = tmp_path / "out"
    script.write_text(textwrap.dedent(f"""
        from sia.generate import generate_dataset
        generate_dataset({str(model_dir)!r}, {str(output)!r}, **{COMMON!r})
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(script)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_same_dataset(reference, output)


def test_cli_accepts_two_strength_values_and_comma_categories(model_dir, tmp_path):
    args = ["--category", "bottle,cable", "--category", "screw", "--strength", "0.1", "0.2", "--num-images", "2",
            "--model", str(model_dir), "--output", str(tmp_path), "--steps", "1", "--batch-size", "4"]
    if len(app.registered_commands) > 1:
        args = ["generate", *args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert sorted({r["category"] for r in records}) == ["bottle", "cable", "screw"] and len(records) == 6
    assert all(0.1 <= r["strength"] <= 0.2 for r in records)
    bad = CliRunner().invoke(app, [a if a != "0.2" else "0.05" for a in args])  # --strength 0.1 0.05
    assert bad.exit_code == 2 and "strength" in bad.output


def test_parse_strength_and_categories():
    assert parse_strength("0.15") == (0.15,)
    assert parse_strength("0.1,0.2") == (0.1, 0.2)
    assert parse_strength([0.2, 0.2]) == (0.2,)
    for bad in ("a", "0.1,0.2,0.3", "-0.1", "0.3,0.1"):
        with pytest.raises(InputError):
            parse_strength(bad)
    assert parse_categories(["bottle,cable", "bottle", " screw "]) == ["bottle", "cable", "screw"]


def _hub_cache_with_pipeline(cache: Path, repo_id: str, folders: dict[str, Path]) -> dict[str, str]:
    """Lay out `models--org--name/{refs,snapshots}` as huggingface_hub does; returns ref -> commit."""
    import shutil

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commits = {}
    for i, (ref, folder) in enumerate(folders.items()):
        commits[ref] = f"{i + 1:040x}"
        shutil.copytree(folder, repo / "snapshots" / commits[ref])
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commits[ref])
    return commits


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_pipeline_from_an_offline_hub_cache_by_id_and_revision(model_dir, tmp_path, offline_hub):
    torch.manual_seed(1)
    other = tmp_path / "other"
    SDASPipeline.from_unet_preset("tiny-32", ["bottle", "cable", "screw"], sample_size=16).save_pretrained(other)
    commits = _hub_cache_with_pipeline(offline_hub, "acme/sdas-tiny", {"main": model_dir, "v1": other})

    def sample(pipe):
        return pipe("bottle", num_images=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    np.testing.assert_array_equal(sample(SDASPipeline.from_pretrained("acme/sdas-tiny")),
                                  sample(SDASPipeline.from_pretrained(model_dir)))
    np.testing.assert_array_equal(sample(SDASPipeline.from_pretrained("acme/sdas-tiny", revision="v1")),
                                  sample(SDASPipeline.from_pretrained(other)))
    assert commits["main"] != commits["v1"]


def test_default_model_is_the_benchmarks_sdas_pipeline(model_dir, tmp_path, offline_hub, monkeypatch):
    with pytest.raises(InputError, match="sia-realnet/sdas-mvtec-ad.*sia train"):
        generate_dataset(None, tmp_path / "none", categories="bottle", num_images=1, steps=1, progress=False)
    commits = _hub_cache_with_pipeline(offline_hub, "acme/sdas-mvtec", {"main": model_dir})
    monkeypatch.setenv("SIA_SDAS_REPO_MVTEC_AD", "acme/sdas-mvtec")
    for model in (None, "mvtec-ad"):
        output = tmp_path / f"out-{model}"
        generate_dataset(model, output, categories="bottle", num_images=2, steps=1, progress=False)
        records = [json.loads(line) for line in (output / "metadata.jsonl").read_text().splitlines()]
        assert {(r["model"], r["revision"]) for r in records} == {("acme/sdas-mvtec", commits["main"])}
    with pytest.raises(InputError, match="several benchmarks"):
        generate_dataset(None, tmp_path / "mixed", categories="bottle,pcb1", num_images=1, progress=False)
    with pytest.raises(InputError, match="no benchmark"):
        generate_dataset(None, tmp_path / "custom", categories="widget", num_images=1, progress=False)


@pytest.mark.parametrize("bad", [dict(steps=1001), dict(steps=2.0), dict(num_images=0), dict(seed=-1),
                                 dict(seed=2**64 - 2), dict(categories="carpet"), dict(sampler="euler")])
def test_bad_arguments_are_refused_before_the_folder_is_locked(model_dir, tmp_path, bad):
    with pytest.raises(InputError) as info:
        generate_dataset(model_dir, tmp_path, **{**COMMON, "num_images": 3, **bad})
    assert "\n" not in str(info.value)
    assert not (tmp_path / ".sia" / "settings.json").exists()
    summary = generate_dataset(model_dir, tmp_path, **{**COMMON, "num_images": 1, "steps": 1})  # a corrected retry
    assert summary.generated == 2


def test_steps_above_the_training_timesteps_name_the_limit(model_dir, tmp_path):
    with pytest.raises(InputError, match=r"`steps` must be at most 1000"):
        generate_dataset(model_dir, tmp_path, **{**COMMON, "steps": 1001})


def test_names_are_deduplicated_after_resolving(model_dir, tmp_path):
    summary = generate_dataset(model_dir, tmp_path, **{**COMMON, "categories": "bottle,mvtec-ad/bottle", "num_images": 2})
    assert (summary.total, summary.generated) == (2, 2)
    records = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in records] == ["bottle/000000.png", "bottle/000001.png"]


def test_corrupt_settings_file_is_a_one_line_input_error(model_dir, tmp_path):
    settings = tmp_path / ".sia" / "settings.json"
    settings.parent.mkdir(parents=True)
    for text in ('{"model": "x", "st', "[1, 2]"):
        settings.write_text(text)
        with pytest.raises(InputError) as info:
            generate_dataset(model_dir, tmp_path, **COMMON)
        assert str(settings) in str(info.value) and "\n" not in str(info.value)


def test_seed_offsets_overlap_as_documented(model_dir, reference, tmp_path):
    """seed + i: a run with seed 4 repeats images 1.. of the seed-3 reference, hence the far-apart advice."""
    generate_dataset(model_dir, tmp_path, **{**COMMON, "seed": 4, "num_images": 2, "categories": "bottle"})
    shifted, expected = _pixels(tmp_path), _pixels(reference)
    for index in (0, 1):
        assert np.abs(shifted[f"bottle/{index:06d}.png"] - expected[f"bottle/{index + 1:06d}.png"]).max() <= 1
    import sia.generate

    for doc in (sia.generate.__doc__, generate_dataset.__doc__):
        assert "1_000_000" in doc


def test_batch_size_changes_only_float_rounding(model_dir, tmp_path):
    """What `--batch-size` promises: at most one grey level between batch sizes, exact bytes at the same one."""
    import typer.main

    runs = {}
    for name, batch in (("three", "3"), ("four", "4"), ("four_again", "4")):
        args = ["generate", "--category", "cable", "--num-images", "8", "--strength", "0.1", "0.2", "--seed", "11",
                "--model", str(model_dir), "--output", str(tmp_path / name), "--steps", "3", "--batch-size", batch]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        runs[name] = tmp_path / name
    _assert_same_dataset(runs["three"], runs["four"])
    for png in sorted(runs["four"].glob("*/*.png")):  # same computation: same bytes
        assert png.read_bytes() == (runs["four_again"] / png.relative_to(runs["four"])).read_bytes()

    # the float outputs differ by rounding only, far below half a grey level (0.002), so 8-bit
    # rounding can move a pixel by one level at most
    pipe = SDASPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)

    def sample(batch_size):
        generators = [torch.Generator().manual_seed(11 + i) for i in range(8)]
        return pipe("cable", num_images=8, strength=(0.1, 0.2), num_inference_steps=3, generator=generators,
                    batch_size=batch_size, output_type="np").images

    assert np.abs(sample(3) - sample(4)).max() < 1e-4

    command = typer.main.get_command(app).commands["generate"]
    help_text = next(p.help for p in command.params if p.name == "batch_size")
    assert "one grey level" in help_text and "does not change the images" not in help_text
