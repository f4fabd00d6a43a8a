"""`realnet` fed bad input on purpose: one-line errors (exit 2), nothing half-written, nothing lost.

A tiny untrained RealNet saved to a folder stands in for a trained model: these tests are about
what the commands accept, refuse, write and delete, not about detection quality.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_training import make_dataset
from typer.testing import CliRunner

from realnet.cli import app
from realnet.model import RealNet
from realnet.recipes import get_recipe
from realnet.training import parse_key_values
from sia.errors import InputError

runner = CliRunner()

TINY_MODEL = {"backbone": "resnet18", "backbone_pretrained": False, "afs_channels": [16, 24, 32, 16], "image_size": 64}
TRAIN_ARGS = ["--backbone", "resnet18", "--no-pretrained", "--image-size", "64", "--iterations", "1",
              "--batch-size", "2", "--afs-batches", "1", "--cpu", "--source", "cutpaste"]


def one_line_error(result, *words: str) -> None:
    """Exit 2 with the error on one line (after any progress bar) naming ``words``, no traceback."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0] == lines[-1] and "Traceback" not in result.output, result.output
    for word in words:
        assert word in errors[0], result.output


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: what must survive a refused command."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = RealNet(**TINY_MODEL)
    net.selector.set_indices([torch.arange(16) * 4, torch.arange(24) * 5, torch.arange(32) * 8, torch.arange(16) * 32])
    folder = tmp_path_factory.mktemp("model") / "tiny"
    net.save_pretrained(folder)
    (folder / "thresholds.json").write_text(json.dumps({"image_threshold": 0.5, "pixel_threshold": 0.5}))
    return folder


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_dataset(root / "widget", n_train=4, n_good=2, n_bad=2)
    return root


# ------------------------------------------------------------------------------------------------
# numbers: NaN, inf and negative counts


@pytest.mark.parametrize("field", ["learning_rate", "weight_decay", "warmup_fraction", "min_lr_ratio", "focal_gamma",
                                   "segmentation_weight", "reconstruction_weight", "anomaly_probability",
                                   "discriminator_lr_scale", "grad_clip_norm", "ema_decay", "rrs_bn_momentum"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_float_recipe_field_refuses_nan_and_infinity(field, value):
    with pytest.raises(InputError, match=f"{field} must be a finite number"):
        get_recipe("fast").replace(**{field: value})


def test_recipe_betas_and_ranges_are_checked():
    with pytest.raises(InputError, match="betas must be a finite number"):
        get_recipe("paper").replace(betas=[float("nan"), 0.999])
    for changes, word in [({"betas": [0.9, 1.5]}, "betas"), ({"weight_decay": -1e-4}, "weight_decay"),
                          ({"grad_clip_norm": 0.0}, "grad_clip_norm"), ({"min_lr_ratio": 2.0}, "min_lr_ratio")]:
        with pytest.raises(InputError, match=word):
            get_recipe("paper").replace(**changes)


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "[1, NaN]"])
def test_key_value_options_refuse_non_finite_json_numbers(text):
    with pytest.raises(InputError, match="finite"):
        parse_key_values([f"learning_rate={text}"], "--recipe-option")


@pytest.mark.parametrize(
    "extra, word",
    [
        (["--recipe-option", "learning_rate=NaN"], "learning_rate"),
        (["--recipe-option", "learning_rate=Infinity"], "learning_rate"),
        (["--num-workers", "-1"], "--num-workers"),
        (["--checkpoint-every", "-1"], "--checkpoint-every"),
        (["--validate-every", "-1"], "--validate-every"),
        (["--validation-fraction", "nan"], "--validation-fraction"),
        (["--threshold-fpr", "nan"], "--threshold-fpr"),
        (["--mask-threshold", "255"], "--mask-threshold"),
        (["--mask-threshold", "nan"], "--mask-threshold"),
    ],
)
def test_train_refuses_bad_numbers_before_writing_anything(data_root, tmp_path, extra, word):
    output = tmp_path / "run"
    result = runner.invoke(app, ["train", "--data", str(data_root), "--category", "widget", "--output", str(output),
                                 *TRAIN_ARGS, *extra])
    one_line_error(result, word)
    assert not output.exists()  # no config.json left behind to block the next run


@pytest.mark.parametrize("flag", ["--image-threshold", "--pixel-threshold"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_predict_refuses_non_finite_thresholds(model_dir, data_root, tmp_path, flag, value):
    out = tmp_path / "pred"
    result = runner.invoke(app, ["predict", str(data_root / "widget" / "test"), "--model", str(model_dir),
                                 "--out", str(out), flag, value, "--device", "cpu"])
    one_line_error(result, flag)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# devices


@pytest.mark.parametrize("command", ["eval", "predict"])
@pytest.mark.parametrize("device, words", [("foo", ["--device", "foo", "not a device name"]),
                                           ("cuda:99", ["--device", "cuda:99"]),
                                           ("meta", ["--device", "meta"])])
def test_unknown_or_missing_devices_are_one_line_errors(model_dir, data_root, tmp_path, command, device, words):
    out = tmp_path / "out"
    if command == "eval":
        args = ["eval", "--model", str(model_dir), "--data", str(data_root), "--category", "widget", "--out", str(out)]
    else:
        args = ["predict", str(data_root / "widget" / "test"), "--model", str(model_dir), "--out", str(out)]
    one_line_error(runner.invoke(app, [*args, "--device", device]), *words)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("command", ["eval", "predict"])
def test_cuda_without_a_gpu_is_a_one_line_error(model_dir, data_root, tmp_path, command):
    if command == "eval":
        args = ["eval", "--model", str(model_dir), "--data", str(data_root), "--category", "widget"]
    else:
        args = ["predict", str(data_root / "widget" / "test"), "--model", str(model_dir), "--out", str(tmp_path / "o")]
    one_line_error(runner.invoke(app, [*args, "--device", "cuda"]), "--device cuda", "not available on this machine")


# ------------------------------------------------------------------------------------------------
# corrupt model files


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("config.json", b"{\"backbone\": ", ["config.json", "not a readable RealNet config"]),
        ("config.json", b"[1, 2]", ["config.json", "expected a JSON object"]),
        ("config.json", b"{\"image_size\": \"huge\"}", ["config.json", "image_size"]),
        ("model.safetensors", b"not safetensors at all", ["model.safetensors", "not a readable safetensors"]),
        ("thresholds.json", b"{\"image_threshold\": 0.5,", ["thresholds.json", "not a readable thresholds file"]),
        ("thresholds.json", b"{\"image_threshold\": \"high\"}", ["thresholds.json", "image_threshold"]),
        ("thresholds.json", b"[0.5]", ["thresholds.json", "expected a JSON object"]),
    ],
)
@pytest.mark.parametrize("command", ["eval", "predict"])
def test_corrupt_model_files_are_one_line_errors_naming_the_file(model_dir, data_root, tmp_path, name, content, words, command):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / name).write_bytes(content)
    out = tmp_path / "out"
    if command == "eval":
        args = ["eval", "--model", str(broken), "--data", str(data_root), "--category", "widget", "--out", str(out)]
    else:
        args = ["predict", str(data_root / "widget" / "test"), "--model", str(broken), "--out", str(out)]
    one_line_error(runner.invoke(app, [*args, "--device", "cpu"]), *words)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# images of any size


def test_predict_accepts_one_pixel_high_or_wide_images(model_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for height, width in [(1, 1), (50, 1), (1, 50)]:
        Image.fromarray(np.full((height, width, 3), 120, dtype=np.uint8)).save(images / f"img_{height}x{width}.png")
    out = tmp_path / "pred"
    result = runner.invoke(app, ["predict", str(images), "--model", str(model_dir), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = {Path(r["image"]).stem: r for r in map(json.loads, (out / "scores.jsonl").read_text().splitlines())}
    for height, width in [(1, 1), (50, 1), (1, 50)]:
        row = rows[f"img_{height}x{width}"]
        for key in ("map_png", "mask", "overlay"):
            with Image.open(out / row[key]) as picture:
                assert picture.size == (width, height)


# ------------------------------------------------------------------------------------------------
# categories: names that become paths, names that do not exist


@pytest.mark.parametrize("category", ["/abs/elsewhere", "../escape", "a/b", ".."])
def test_eval_refuses_category_names_that_are_paths(model_dir, data_root, tmp_path, category):
    out = tmp_path / "out"
    target = Path(category) if Path(category).is_absolute() else None
    result = runner.invoke(app, ["eval", "--model", str(model_dir), "--data", str(data_root), "--category", category,
                                 "--out", str(out), "--device", "cpu"])
    one_line_error(result, "--category", repr(category))
    assert not out.exists() and (target is None or not target.exists())


@pytest.mark.parametrize("command", ["eval", "train"])
def test_a_single_category_folder_refuses_another_category_name(model_dir, data_root, tmp_path, command):
    single = data_root / "widget"
    if command == "eval":
        args = ["eval", "--model", str(model_dir), "--data", str(single), "--dataset", "folder", "--category", "nope",
                "--out", str(tmp_path / "out"), "--device", "cpu"]
    else:
        args = ["train", "--data", str(single), "--dataset", "folder", "--category", "nope",
                "--output", str(tmp_path / "out"), *TRAIN_ARGS]
    one_line_error(runner.invoke(app, args), "'nope'", "'widget'")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# outputs that overlap inputs


def test_outputs_overlapping_an_input_are_refused_and_nothing_is_touched(model_dir, data_root, tmp_path):
    before = tree(data_root)
    model_before = tree(model_dir)
    images = data_root / "widget" / "test"
    cases = [
        ["eval", "--model", str(model_dir), "--data", str(data_root), "--category", "widget", "--out", str(data_root)],
        ["eval", "--model", str(model_dir), "--data", str(data_root), "--category", "widget", "--out", str(model_dir)],
        ["predict", str(images), "--model", str(model_dir), "--out", str(images / "good")],
        ["predict", str(images), "--model", str(model_dir), "--out", str(data_root)],
        ["predict", str(images / "good" / "000.png"), "--model", str(model_dir), "--out", str(images / "good")],
        ["train", "--data", str(data_root), "--category", "widget", "--output", str(data_root / "widget"), *TRAIN_ARGS],
        ["train", "--data", str(data_root / "widget"), "--output", str(data_root), *TRAIN_ARGS],
    ]
    for args in cases:
        one_line_error(runner.invoke(app, [*args, "--overwrite"] + (["--device", "cpu"] if args[0] != "train" else [])),
                       "overlaps the input")
    assert tree(data_root) == before and tree(model_dir) == model_before


def test_convert_official_refuses_an_output_holding_the_checkpoint(tmp_path):
    source = tmp_path / "official"
    source.mkdir()
    checkpoint = source / "ckpt_best.pth.tar"
    checkpoint.write_bytes(b"checkpoint bytes")
    for output in (source, tmp_path):
        one_line_error(runner.invoke(app, ["convert-official", str(checkpoint), str(output), "--overwrite"]),
                       "overlaps the input")
    assert checkpoint.read_bytes() == b"checkpoint bytes"


# ------------------------------------------------------------------------------------------------
# --overwrite deletes only what realnet wrote


def test_predict_overwrite_keeps_the_users_own_files_in_result_folders(model_dir, data_root, tmp_path):
    out = tmp_path / "out"
    mine = {"masks/gt_00.png": b"my ground truth", "maps/notes.txt": b"my notes", "overlays/keep/x.png": b"mine"}
    for name, content in mine.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(content)
    args = ["predict", str(data_root / "widget" / "test"), "--model", str(model_dir), "--out", str(out), "--device", "cpu"]
    for _ in range(2):  # into the user's folder, then over our own results
        result = runner.invoke(app, [*args, "--overwrite"])
        assert result.exit_code == 0, result.output
        assert (out / "scores.csv").is_file() and (out / "masks" / "good__000.png").is_file()
    assert {name: (out / name).read_bytes() for name in mine} == mine
    # a third run on fewer images removes the results of the earlier one, and only those
    result = runner.invoke(app, ["predict", str(data_root / "widget" / "test" / "good"), "--model", str(model_dir),
                                 "--out", str(out), "--device", "cpu", "--overwrite", "--no-overlays"])
    assert result.exit_code == 0, result.output
    assert not (out / "masks" / "good__000.png").exists() and (out / "masks" / "000.png").is_file()
    assert not list((out / "overlays").glob("*.png"))
    assert {name: (out / name).read_bytes() for name in mine} == mine


def test_predict_overwrite_refuses_to_replace_a_file_it_did_not_write(model_dir, data_root, tmp_path):
    out = tmp_path / "out"
    (out / "masks").mkdir(parents=True)
    (out / "masks" / "good__000.png").write_bytes(b"my mask, same name as a result")
    result = runner.invoke(app, ["predict", str(data_root / "widget" / "test"), "--model", str(model_dir),
                                 "--out", str(out), "--device", "cpu", "--overwrite"])
    one_line_error(result, "masks/good__000.png", "no realnet run wrote")
    assert tree(out) == {"masks/good__000.png": b"my mask, same name as a result"}


def test_eval_overwrite_removes_its_own_overlays_and_keeps_the_rest(model_dir, data_root, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "--model", str(model_dir), "--data", str(data_root), "--category", "widget", "--out", str(out),
            "--device", "cpu"]
    assert runner.invoke(app, args).exit_code == 0
    overlays = sorted((out / "overlays" / "widget").glob("*.png"))
    assert len(overlays) == 4
    (out / "overlays" / "mine.png").write_bytes(b"mine")
    result = runner.invoke(app, [*args, "--overwrite", "--no-overlays"])
    assert result.exit_code == 0, result.output
    assert not (out / "overlays" / "widget").exists()  # created by the first run, now empty
    assert (out / "overlays" / "mine.png").read_bytes() == b"mine" and (out / "metrics.json").is_file()


def test_a_tampered_manifest_cannot_delete_outside_the_output(model_dir, data_root, tmp_path):
    out = tmp_path / "out"
    args = ["predict", str(data_root / "widget" / "test"), "--model", str(model_dir), "--out", str(out), "--device", "cpu"]
    assert runner.invoke(app, args).exit_code == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    manifest = out / ".realnet-outputs.json"
    record = json.loads(manifest.read_text())
    record["files"].append("../victim.txt")
    manifest.write_text(json.dumps(record))
    one_line_error(runner.invoke(app, [*args, "--overwrite"]), "points outside")
    assert victim.read_text() == "precious"


# ------------------------------------------------------------------------------------------------
# a corrupt input image stops predict before anything is written


def test_predict_with_a_corrupt_image_writes_nothing_and_a_rerun_succeeds(model_dir, data_root, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(data_root / "widget" / "test", images)
    corrupt = images / "zzz" / "broken.png"  # sorted last: earlier batches would be written first
    corrupt.parent.mkdir()
    corrupt.write_bytes((images / "good" / "000.png").read_bytes()[:60])
    out = tmp_path / "pred"
    args = ["predict", str(images), "--model", str(model_dir), "--out", str(out), "--batch-size", "1", "--device", "cpu"]
    one_line_error(runner.invoke(app, args), "broken.png")
    assert not out.exists()
    corrupt.unlink()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "scores.csv").read_text().count("\n") == 5


# ------------------------------------------------------------------------------------------------
# lossy masks, and the module entry point


def test_eval_mask_threshold_is_applied_and_recorded_and_the_default_warns(model_dir, tmp_path, caplog):
    from scipy import ndimage

    root = tmp_path / "data"
    make_dataset(root / "widget", n_train=2, n_good=1, n_bad=2)
    for mask in (root / "widget" / "ground_truth" / "blob").glob("*.png"):
        defect = np.asarray(Image.open(mask)) > 0
        rim = ndimage.binary_dilation(defect, iterations=4) & ~defect
        Image.fromarray(np.where(defect, 255, np.where(rim, 60, 0)).astype(np.uint8)).save(mask)  # a grey rim
    metrics, warnings = {}, {}
    for threshold in ("0", "127"):
        out = tmp_path / f"eval_{threshold}"
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="realnet.data"):
            result = runner.invoke(app, ["eval", "--model", str(model_dir), "--data", str(root), "--category", "widget",
                                         "--out", str(out), "--device", "cpu", "--mask-threshold", threshold])
        assert result.exit_code == 0, result.output
        warnings[threshold] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        record = json.loads((out / "metrics.json").read_text())
        assert record["mask_threshold"] == float(threshold)
        metrics[threshold] = record["metrics"]["widget"]
    assert len(warnings["0"]) == 1 and "2 of 2 masks" in warnings["0"][0] and not warnings["127"]
    assert "pass --mask-threshold 127 to binarise" in warnings["0"][0]  # the library's parameter, as the flag
    assert metrics["0"]["pixel_auroc"] != metrics["127"]["pixel_auroc"]  # the rim is defect only at > 0


def test_python_dash_m_runs_the_realnet_cli():
    done = subprocess.run([sys.executable, "-m", "realnet.cli", "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "predict" in done.stdout


def test_library_errors_name_parameters_and_the_cli_names_flags(data_root, tmp_path):
    from realnet.training import TrainingConfig, train

    config = TrainingConfig(data=str(data_root), output=str(tmp_path / "lib"), source="cutpaste", categories=["widget"],
                            backbone="resnet18", model_kwargs={"backbone_pretrained": False, "no_such_setting": 1},
                            image_size=64, iterations=1, cpu=True, progress=False)
    with pytest.raises(InputError, match="^`model_kwargs` no_such_setting: unknown RealNet setting") as info:
        train(config)
    assert info.value.parameter == "model_kwargs" and "--" not in str(info.value)
    result = runner.invoke(app, ["train", "--data", str(data_root), "--category", "widget", "--output",
                                 str(tmp_path / "cli"), *TRAIN_ARGS, "--model-option", "no_such_setting=1"])
    one_line_error(result, "Error: --model-option no_such_setting: unknown RealNet setting")
    result = runner.invoke(app, ["train", "--data", str(data_root), "--category", "widget", "--output",
                                 str(tmp_path / "cli"), *TRAIN_ARGS, "--select", "best", "--validation-fraction", "0"])
    one_line_error(result, "--select best: needs held-out training images (raise --validation-fraction or use --select last)")
