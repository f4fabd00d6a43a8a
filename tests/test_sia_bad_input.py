"""Bad input and faults in the `sia` commands: one-line errors (exit 2), nothing written outside the
output, nothing deleted that the command did not write."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sia import hub
from sia.cli import app
from sia.errors import InputError
from sia.generate import generate_dataset
from sia.hub import load_sia, stage_sia_dataset
from sia.pipeline import SDASPipeline

sys.path.insert(0, str(Path(__file__).parent))
from official_adm import OfficialADM, randomize_


def _png(path: Path, seed: int = 0, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes, to prove nothing was touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _text(result) -> str:
    return result.output  # stdout and stderr, interleaved


def _refused(result, *needles: str) -> str:
    """Assert a one-line error (exit 2, no traceback) mentioning every needle; return it."""
    text = _text(result)
    assert result.exit_code == 2, (result.exit_code, text, result.exception)
    # diffusers' loading progress bar may come first; it is not part of the error
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("Loading pipeline components")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), text
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    SDASPipeline.from_unet_preset("tiny-32", ["bottle", "cable"], sample_size=16).save_pretrained(folder)
    return folder


def _official_sia(root: Path) -> Path:
    source = root / "MVTec-AD" / "sdas"
    for i, category in enumerate(("bottle", "cable")):
        _png(source / category / f"rank0_{i}.jpg", seed=i)
    (root / "MVTec-AD" / "notes.txt").write_text("the user's own file next to the source")
    return source


# ------------------------------------------------------------------ convert-official: never delete the source


@pytest.mark.parametrize("where", ["source", "parent", "grandparent", "inside"])
def test_convert_official_sia_refuses_an_output_overlapping_the_source(tmp_path, where):
    source = _official_sia(tmp_path)
    before = _snapshot(tmp_path)
    output = {"source": source, "parent": source.parent, "grandparent": tmp_path,
              "inside": source / "converted"}[where]
    _refused(run("convert-official", source, output, "--overwrite"), "overlaps the input")
    assert _snapshot(tmp_path) == before


def test_convert_official_sdas_refuses_the_checkpoints_folder(tmp_path):
    reference = randomize_(OfficialADM(num_classes=3), torch.Generator().manual_seed(0)).eval()
    path = tmp_path / "ckpts" / "btad.pt"
    path.parent.mkdir()
    torch.save({"state_dict": reference.state_dict()}, path)
    before = _snapshot(tmp_path)
    for output in (path.parent, tmp_path):
        _refused(run("convert-official", path, output, "--dataset", "btad", "--image-size", "16",
                     "--head-channels", "32", "--overwrite"), "overlaps the input")
    assert _snapshot(tmp_path) == before

    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "notes.txt").write_text("mine")
    _refused(run("convert-official", path, pipe, "--dataset", "btad", "--image-size", "16", "--head-channels", "32",
                 "--overwrite"), "notes.txt")
    assert (pipe / "notes.txt").read_text() == "mine" and sorted(p.name for p in pipe.iterdir()) == ["notes.txt"]
    (pipe / "notes.txt").unlink()
    args = ("convert-official", path, pipe, "--dataset", "btad", "--image-size", "16", "--head-channels", "32")
    assert run(*args).exit_code == 0
    assert run(*args, "--overwrite").exit_code == 0  # its own earlier output is replaced
    assert SDASPipeline.from_pretrained(pipe).categories == ["01", "02", "03"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpts", "pipe"]  # no partial folders left


def test_convert_official_sia_overwrite_replaces_only_its_own_output(tmp_path):
    source = _official_sia(tmp_path)
    out = tmp_path / "sia"
    assert run("convert-official", source, out).exit_code == 0
    _png(out / "bottle" / "rank0_9.jpg", seed=9)  # a file the conversion did not write
    _refused(run("convert-official", source, out, "--overwrite"), "bottle/rank0_9.jpg")
    assert (out / "bottle" / "rank0_9.jpg").is_file()
    (out / "bottle" / "rank0_9.jpg").unlink()
    (source / "cable" / "rank0_1.jpg").unlink()  # the source changed: an overwrite reflects it
    assert run("convert-official", source, out, "--overwrite").exit_code == 0
    assert sorted(load_sia(out)["category"]) == ["bottle"]
    assert not (out / "cable").exists()

    user = tmp_path / "user"
    _png(user / "photo.png")
    _refused(run("convert-official", source, user, "--overwrite"), "photo.png")
    assert (user / "photo.png").is_file()


@pytest.mark.parametrize("mode", ["sia", "checkpoint"])
def test_convert_official_output_under_a_file_is_a_one_line_error(tmp_path, mode):
    source = _official_sia(tmp_path) if mode == "sia" else tmp_path / "ckpt.pt"
    if mode == "checkpoint":
        reference = randomize_(OfficialADM(num_classes=3), torch.Generator().manual_seed(0)).eval()
        torch.save(reference.state_dict(), source)
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    for output in (afile, afile / "out"):
        _refused(run("convert-official", source, output, "--dataset", "btad" if mode == "checkpoint" else "mvtec-ad",
                     "--overwrite"), "afile.txt")
    assert afile.read_text() == "x"


# ------------------------------------------------------------------ preview


def test_preview_output_that_is_a_folder_or_under_a_file(tmp_path):
    images, source = tmp_path / "normal", tmp_path / "sia"
    _png(images / "0.png")
    _png(source / "0.jpg", seed=1)
    folder_png = tmp_path / "grid.png"
    folder_png.mkdir()
    common = ("--images", images, "--source", source, "--n", "1", "--size", "16")
    _refused(run("preview", *common, "--out", folder_png, "--overwrite"), "is a folder")
    assert folder_png.is_dir() and not list(tmp_path.glob(".*tmp"))
    (tmp_path / "afile.txt").write_text("x")
    _refused(run("preview", *common, "--out", tmp_path / "afile.txt" / "x.png"), "afile.txt is a file")
    before = _snapshot(images)
    _refused(run("preview", *common, "--out", images / "0.png", "--overwrite"), "overlaps the input")
    assert _snapshot(images) == before
    _refused(run("preview", "--images", tmp_path / "absent", "--source", source, "--out", tmp_path / "g.png"), "absent")


# ------------------------------------------------------------------ train


def test_train_refuses_category_names_that_are_paths_and_bad_outputs(tmp_path):
    data = tmp_path / "data"
    for i in range(2):
        _png(data / f"{i}.png", seed=i)
    common = ("--data", data, "--preset", "tiny-32", "--image-size", "16", "--steps", "1", "--sample-every", "0",
              "--cpu")
    for name in ("../x", str(tmp_path / "abs")):
        _refused(run("train", *common, "--output", tmp_path / "run", "--categories", name), "--categories")
    assert not (tmp_path / "run").exists() and not (tmp_path / "x").exists() and not (tmp_path / "abs").exists()

    (tmp_path / "afile").write_text("x")
    _refused(run("train", *common, "--output", tmp_path / "afile"), "--output")
    _refused(run("train", *common, "--output", tmp_path / "afile" / "run"), "--output")
    before = _snapshot(data)
    for output in (data, data / "run", tmp_path):
        _refused(run("train", *common, "--output", output, "--overwrite"), "overlaps the input")
    assert _snapshot(data) == before


# ------------------------------------------------------------------ generate


def _edited_model(model_dir: Path, tmp_path: Path, categories: list[str]) -> Path:
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(model_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["categories"] = categories
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("bad", ["../escape", "ABSOLUTE"])
def test_generate_never_writes_outside_the_output(model_dir, tmp_path, bad):
    name = str(tmp_path / "abs") if bad == "ABSOLUTE" else bad
    model = _edited_model(model_dir, tmp_path, ["bottle", name])
    out = tmp_path / "work" / "out"
    _refused(run("generate", "--model", model, "--category", name, "--num-images", "1", "--steps", "1",
                 "--output", out), "model_index.json", name)
    assert not (tmp_path / "abs").exists() and not (tmp_path / "work" / "escape").exists()
    assert not out.exists()
    with pytest.raises(InputError, match="categories must be a plain name"):
        SDASPipeline.from_unet_preset("tiny-32", ["bottle", name], sample_size=16)


def test_generate_bad_output_device_and_weights_are_one_line_errors(model_dir, tmp_path):
    common = ("--model", model_dir, "--category", "bottle", "--num-images", "1", "--steps", "1")
    (tmp_path / "afile").write_text("x")
    _refused(run("generate", *common, "--output", tmp_path / "afile" / "x"), "--output", "afile is a file")
    _refused(run("generate", *common, "--output", tmp_path / "afile"), "--output")
    _refused(run("generate", *common, "--output", model_dir / "images"), "overlaps the input")
    _refused(run("generate", *common, "--output", tmp_path / "o", "--device", "foo"), "--device 'foo'")
    if not torch.cuda.is_available():
        _refused(run("generate", *common, "--output", tmp_path / "o", "--device", "cuda"), "--device cuda")
    assert not (tmp_path / "o").exists()

    pickled = tmp_path / "pickled"
    SDASPipeline.from_pretrained(model_dir).save_pretrained(pickled, safe_serialization=False)
    assert list((pickled / "unet").glob("*.bin"))
    _refused(run("generate", "--model", pickled, "--category", "bottle", "--num-images", "1", "--steps", "1",
                 "--output", tmp_path / "o"), "only safetensors")
    with pytest.raises(InputError, match="safetensors"):
        SDASPipeline.from_pretrained(pickled)
    (pickled / "model_index.json").write_text("{not json")
    with pytest.raises(InputError, match="model_index.json: not a readable"):
        SDASPipeline.from_pretrained(pickled)

    import shutil

    for damaged_file in ("diffusion_pytorch_model.safetensors", "config.json"):
        damaged = tmp_path / f"damaged-{damaged_file}"
        shutil.copytree(model_dir, damaged)
        (damaged / "unet" / damaged_file).write_text("{garbage")
        _refused(run("generate", "--model", damaged, "--category", "bottle", "--num-images", "1", "--steps", "1",
                     "--output", tmp_path / "o"), "cannot load the pipeline", damaged_file)
    assert not (tmp_path / "o").exists()


def test_generate_warns_above_the_strength_range_and_refuses_nonsense(model_dir, tmp_path, caplog):
    common = {"categories": "bottle", "num_images": 1, "steps": 1, "progress": False}
    with caplog.at_level(logging.WARNING, logger="sia.generate"):
        generate_dataset(model_dir, tmp_path / "a", strength=0.15, **common)
        assert not caplog.records
        generate_dataset(model_dir, tmp_path / "b", strength=11, **common)
        (warning,) = [r.getMessage() for r in caplog.records]
        assert "`strength` 11" in warning and "0.1-0.2" in warning and "\n" not in warning
        caplog.clear()
        generate_dataset(model_dir, tmp_path / "c", strength=0.2, sampler="ddim", **common)
        assert "0.01-0.03" in caplog.records[0].getMessage()
    for bad in ("-0.1", "nan", "inf", "0.3,0.1"):
        _refused(run("generate", "--model", model_dir, "--category", "bottle", "--num-images", "1", "--steps", "1",
                     "--output", tmp_path / "d", "--strength", bad), "--strength")
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------ push and SIA metadata


def _generated(root: Path, rows: list[dict]) -> Path:
    for i, category in enumerate(("bottle", "cable")):
        _png(root / category / "000000.png", seed=i)
    base = [{"file_name": f"{c}/000000.png", "category": c, "strength": 0.1, "seed": 0} for c in ("bottle", "cable")]
    hub.write_sia_metadata(root, base + rows)
    return root


@pytest.mark.parametrize("category", ["../../escape", "ABSOLUTE", "a/b"])
def test_stage_refuses_metadata_categories_that_are_paths(tmp_path, category):
    name = str(tmp_path / "abs") if category == "ABSOLUTE" else category
    source = _generated(tmp_path / "work" / "gen", [{"file_name": "bottle/000000.png", "category": name}])
    result = run("push", source, "--repo-id", "acme/sia", "--stage-only", tmp_path / "work" / "stage")
    _refused(result, "metadata.jsonl:3: category")
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["gen"]
    assert not (tmp_path / "abs").exists() and not (tmp_path / "escape").exists()
    with pytest.raises(InputError, match="category"):
        load_sia(source)


@pytest.mark.parametrize("file_name", ["../secret.png", "../secret.txt", "ABSOLUTE", "bottle/../../secret.png",
                                       "bottle/notes.txt"])
def test_metadata_file_names_must_be_images_inside_the_set(tmp_path, file_name):
    secret = tmp_path / "work" / "secret.png"
    _png(secret, seed=5)
    (tmp_path / "work" / "secret.txt").write_text("password")
    source = _generated(tmp_path / "work" / "gen", [])
    (source / "bottle" / "notes.txt").write_text("not an image")
    name = str(secret) if file_name == "ABSOLUTE" else file_name
    hub.write_sia_metadata(source, [{"file_name": "bottle/000000.png", "category": "bottle"},
                                    {"file_name": name, "category": "bottle"}])
    _refused(run("push", source, "--repo-id", "acme/sia", "--stage-only", tmp_path / "stage"),
             "metadata.jsonl:2: file_name")
    assert not (tmp_path / "stage").exists()
    with pytest.raises(InputError, match="file_name"):
        load_sia(source)


def test_load_sia_refuses_a_category_that_is_a_path(tmp_path):
    source = _generated(tmp_path / "gen", [])
    for category in ("a/../../x", "..", "mvtec-ad/../x"):
        with pytest.raises(InputError, match="category"):
            load_sia(source, category=category)
        with pytest.raises(InputError, match="category"):
            hub.open_sia_images(source, category=category)


def test_stage_overwrite_keeps_files_it_did_not_write(tmp_path):
    source = _generated(tmp_path / "gen", [])
    staging = stage_sia_dataset(source, tmp_path / "stage")
    (staging / "upload-notes.md").write_text("mine")
    _refused(run("push", source, "--repo-id", "acme/sia", "--stage-only", staging, "--overwrite"), "upload-notes.md")
    assert (staging / "upload-notes.md").read_text() == "mine"
    (staging / "upload-notes.md").unlink()
    assert run("push", source, "--repo-id", "acme/sia", "--stage-only", staging, "--overwrite").exit_code == 0


def test_push_offline_is_a_one_line_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    source = _generated(tmp_path / "gen", [])
    _refused(run("push", source, "--repo-id", "acme/sia"), "HF_HUB_OFFLINE", "--stage-only")


def test_stage_only_checks_the_repo_id(tmp_path):
    source = _generated(tmp_path / "gen", [])
    _refused(run("push", source, "--repo-id", "no-slash", "--stage-only", tmp_path / "stage"), "ORG/NAME")
    assert not (tmp_path / "stage").exists()


def test_flags_replace_only_the_parameters_a_command_has():
    from sia.errors import with_flags

    flags, off_flags = {"out": "OUT", "overwrite": "--overwrite", "select": "--select", "verify": "--verify"}, \
        {"verify": "--no-verify"}
    message = "`out` /data/overwrite: pass `overwrite=True`, `select='last'` or `verify=False`; `seed` and `sia push` stay"
    assert with_flags(message, flags, off_flags) == \
        "OUT /data/overwrite: pass --overwrite, --select last or --no-verify; `seed` and `sia push` stay"
    assert InputError(message).parameter == "out" and InputError("no parameter here").parameter is None


def test_library_errors_name_parameters_and_the_cli_names_flags(model_dir, tmp_path, caplog):
    from sia.training import DiffusionTrainingConfig

    with pytest.raises(InputError, match="^`num_images` must be at least 1, got 0$") as info:
        generate_dataset(model_dir, tmp_path / "a", categories="bottle", num_images=0, steps=1, progress=False)
    assert info.value.parameter == "num_images"
    _refused(run("generate", "--model", model_dir, "--category", "bottle", "--num-images", "0", "--output",
                 tmp_path / "b"), "Error: --num-images must be at least 1, got 0")
    # a library name the command spells differently: `max_steps` is `sia train --steps`
    with pytest.raises(InputError, match="^`max_steps` and `epochs`: give one of them"):
        DiffusionTrainingConfig(data_dir=str(tmp_path), output_dir=str(tmp_path / "run"), max_steps=1, epochs=1).validate()
    _refused(run("train", "--data", tmp_path, "--output", tmp_path / "run", "--steps", "1", "--epochs", "1"),
             "Error: --steps and --epochs: give one of them")
    with caplog.at_level(logging.WARNING, logger="sia.generate"):  # logged warnings name the flag as well
        result = run("generate", "--model", model_dir, "--category", "bottle", "--num-images", "1", "--steps", "1",
                     "--output", tmp_path / "c", "--strength", "11")
    assert result.exit_code == 0, _text(result)
    assert any("warning: --strength 11 is above" in r.getMessage() for r in caplog.records)
