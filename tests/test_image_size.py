"""`--image-size N` / `HxW`: parsing, the stride check, non-square training, and running a model at
another size than its training one (tiny resnet18 models on generated tall images)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_training import TINY_MODEL, make_dataset
from typer.testing import CliRunner

from realnet.backbone import feature_strides
from realnet.cli import app
from realnet.image_size import check_stride, format_image_size, parse_image_size
from realnet.model import RealNet
from sia.errors import InputError

pytestmark = pytest.mark.usefixtures("fresh_accelerate")

runner = CliRunner()

# resnet18 at layers [1, 2]: stride 8, so 48x32 and 40x32 are valid sizes, 60 and 24 are not.
TINY = [
    "--backbone", "resnet18", "--no-pretrained", "--iterations", "2", "--batch-size", "4",
    "--afs-batches", "1", "--checkpoint-every", "0", "--cpu",
    "--model-option", "layers=[1,2]", "--model-option", "afs_channels=[8,16]",
    "--model-option", "recon_channel_mult=[1,2]", "--model-option", "recon_attention_mult=[2]",
]
TALL = (72, 40)  # (height, width) of the generated images


@pytest.mark.parametrize(
    "value, expected",
    [(256, (256, 256)), ("256", (256, 256)), ("640x256", (640, 256)), (" 640 X 256 ", (640, 256)),
     ((640, 256), (640, 256)), ([64.0, 96], (64, 96)), (np.int64(32), (32, 32))],
)
def test_accepted_forms(value, expected):
    assert parse_image_size(value) == expected


@pytest.mark.parametrize("value", [0, "0", "abc", "256x", "x256", "0x256", "-32", "256x256x3", "2.5", True, 2.5,
                                   [256], (256, 0), "", None])
def test_bad_sizes_name_the_argument_and_the_accepted_forms(value):
    with pytest.raises(InputError) as info:
        parse_image_size(value, "--image-size")
    message = str(info.value)
    assert message.startswith("--image-size") and "HxW" in message and "\n" not in message


def test_stride_check_suggests_the_nearest_valid_size():
    assert check_stride((640, 256), 32) == (640, 256)
    with pytest.raises(InputError, match=r"multiple of 32.*e\.g\. 640x256"):
        check_stride((630, 250), 32, "--image-size")
    with pytest.raises(InputError, match="at least 32"):
        check_stride((16, 16), 32)
    with pytest.raises(InputError, match="at least 32"):
        check_stride((24, 40), 8)
    assert format_image_size((256, 256)) == "256" and format_image_size((640, 256)) == "640x256"


def test_feature_strides_read_the_backbone_without_weights():
    assert feature_strides("resnet18", [1, 2]) == [4, 8]
    assert feature_strides("tf_efficientnet_lite0", [1, 2, 3, 4]) == [4, 8, 16, 32]
    with pytest.raises(InputError, match="backbone"):
        feature_strides("no_such_net", [1, 2])


def test_model_predict_runs_at_another_size_with_a_one_line_notice(caplog):
    torch.manual_seed(0)
    model = RealNet(backbone="resnet18", image_size=[48, 32], **TINY_MODEL)
    model.selector.set_indices([torch.arange(8), torch.arange(16)])
    images = torch.rand(2, 3, 50, 36)
    assert model.predict(images).anomaly_map.shape == (2, 1, 48, 32)
    with caplog.at_level(logging.WARNING, logger="realnet.image_size"):
        out = model.predict(images, image_size="32x40")
    assert out.anomaly_map.shape == (2, 1, 32, 40)
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 1 and "48x32" in notices[0] and "32x40" in notices[0] and "\n" not in notices[0]
    with pytest.raises(InputError, match="multiple of 8"):
        model.predict(images, image_size=30)


def _tall_dataset(root: Path) -> Path:
    """The generated square widget set, resized to tall TALL images (masks with nearest)."""
    make_dataset(root, n_train=8, n_good=2, n_bad=3)
    for path in root.rglob("*.png"):
        with Image.open(path) as picture:
            resample = Image.NEAREST if "ground_truth" in path.parts else Image.BILINEAR
            picture.resize((TALL[1], TALL[0]), resample).save(path)
    return root


@pytest.fixture(scope="module")
def trained_tall(tmp_path_factory, reset_accelerate) -> tuple[Path, Path]:
    """(data root, run folder) of a tiny CLI run at 48x32 (height x width) on tall images."""
    reset_accelerate()
    root = tmp_path_factory.mktemp("data")
    _tall_dataset(root / "widget")
    output = tmp_path_factory.mktemp("run") / "out"
    result = runner.invoke(app, ["train", "--data", str(root), "--category", "widget", "--source", "cutpaste",
                                 "--output", str(output), "--image-size", "48x32", *TINY])
    assert result.exit_code == 0, result.output
    reset_accelerate()
    return root, output


def test_non_square_size_is_saved_with_the_model_and_the_run(trained_tall):
    _, output = trained_tall
    assert json.loads((output / "model" / "config.json").read_text())["image_size"] == [48, 32]
    assert json.loads((output / "config.json").read_text())["training"]["image_size"] == [48, 32]
    assert "48 × 32" in (output / "model" / "README.md").read_text()


def test_eval_defaults_to_the_training_size(trained_tall, tmp_path):
    root, output = trained_tall
    result = runner.invoke(app, ["eval", "--model", str(output), "--data", str(root), "--category", "widget",
                                 "--out", str(tmp_path / "eval"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "notice" not in result.output
    record = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert record["image_size"] == [48, 32]
    overlay = next((tmp_path / "eval" / "overlays" / "widget").glob("*.png"))
    with Image.open(overlay) as picture:
        assert picture.size == (3 * 32, 48)  # image | ground truth | heat map, each 32 wide, 48 high


def test_eval_at_another_size_resizes_with_a_notice(trained_tall, tmp_path, caplog):
    root, output = trained_tall
    with caplog.at_level(logging.WARNING, logger="realnet.image_size"):
        result = runner.invoke(app, ["eval", "--model", str(output), "--data", str(root), "--category", "widget",
                                     "--out", str(tmp_path / "eval"), "--device", "cpu", "--image-size", "64"])
    assert result.exit_code == 0, result.output
    notices = [r.getMessage() for r in caplog.records if "notice" in r.getMessage()]
    assert len(notices) == 1 and "trained at 48x32" in notices[0] and "at 64" in notices[0]
    record = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert record["image_size"] == [64, 64]
    assert all(0.0 <= record["metrics"]["widget"][k] <= 1.0 for k in ("image_auroc", "pixel_auroc", "pro"))


def test_predict_at_training_and_other_sizes(trained_tall, tmp_path):
    root, output = trained_tall
    for size, expected in ((None, (48, 32)), ("40x32", (40, 32))):
        out = tmp_path / f"pred_{size}"
        args = ["predict", str(root / "widget" / "test"), "--model", str(output), "--out", str(out), "--device", "cpu"]
        result = runner.invoke(app, args + (["--image-size", size] if size else []))
        assert result.exit_code == 0, result.output
        row = json.loads((out / "scores.jsonl").read_text().splitlines()[0])
        assert np.load(out / row["map"]).shape == expected  # the raw map, at the size the model ran at
        with Image.open(out / row["mask"]) as mask:
            assert mask.size == (TALL[1], TALL[0])  # masks come back at the image's own size


@pytest.mark.parametrize("command", ["train", "eval", "predict"])
@pytest.mark.parametrize("size, message", [("0", "HxW"), ("abc", "HxW"), ("256x", "HxW"), ("60", "multiple of 8")])
def test_bad_image_sizes_exit_2_with_one_line(trained_tall, tmp_path, command, size, message):
    root, output = trained_tall
    if command == "train":
        args = ["train", "--data", str(root), "--category", "widget", "--source", "cutpaste",
                "--output", str(tmp_path / "run"), *TINY]
    elif command == "eval":
        args = ["eval", "--model", str(output), "--data", str(root), "--category", "widget", "--device", "cpu"]
    else:
        args = ["predict", str(root / "widget" / "test"), "--model", str(output), "--out", str(tmp_path / "pred"),
                "--device", "cpu"]
    result = runner.invoke(app, [*args, "--image-size", size])
    assert result.exit_code == 2, result.output
    assert "--image-size" in result.output and message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "pred").exists()
