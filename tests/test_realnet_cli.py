"""`realnet train`, `realnet eval` and `realnet predict` end to end through the CLI, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from realnet.cli import app
from test_training import make_dataset

runner = CliRunner()

TINY = [
    "--backbone", "resnet18", "--no-pretrained", "--image-size", "64", "--iterations", "2", "--batch-size", "4",
    "--afs-batches", "1", "--checkpoint-every", "0", "--cpu",
    "--model-option", "layers=[1,2]", "--model-option", "afs_channels=[8,16]",
    "--model-option", "recon_channel_mult=[1,2]", "--model-option", "recon_attention_mult=[2]",
]


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, reset_accelerate) -> tuple[Path, Path]:
    """(data root, training output) of one tiny CLI training run shared by the tests below."""
    reset_accelerate()
    root = tmp_path_factory.mktemp("data")
    make_dataset(root / "widget", n_train=8, n_good=2, n_bad=3)
    output = tmp_path_factory.mktemp("run") / "out"
    result = runner.invoke(app, ["train", "--data", str(root), "--category", "widget", "--source", "cutpaste",
                                 "--output", str(output), "--recipe", "paper", *TINY])
    assert result.exit_code == 0, result.output
    reset_accelerate()
    return root, output


def test_train_writes_model_thresholds_log_and_run_config(trained):
    _, output = trained
    assert (output / "model" / "config.json").is_file() and (output / "model" / "model.safetensors").is_file()
    thresholds = json.loads((output / "model" / "thresholds.json").read_text())
    assert {"image_threshold", "pixel_threshold", "false_positive_rate"} <= set(thresholds)
    run = json.loads((output / "config.json").read_text())
    assert run["status"] == "finished" and run["recipe"]["name"] == "paper"
    assert run["training"]["model_kwargs"]["afs_channels"] == [8, 16]
    assert (output / "train_log.jsonl").read_text().strip()


def test_train_refuses_to_overwrite_a_finished_run(trained):
    root, output = trained
    result = runner.invoke(app, ["train", "--data", str(root), "--category", "widget", "--source", "cutpaste",
                                 "--output", str(output), *TINY])
    assert result.exit_code == 2
    assert "--overwrite" in result.output and len(result.output.strip().splitlines()) == 1


def test_eval_prints_table_and_writes_metrics_and_overlays(trained, tmp_path):
    root, output = trained
    result = runner.invoke(app, ["eval", "--model", str(output), "--data", str(root), "--category", "widget",
                                 "--out", str(tmp_path / "eval"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "| category | image AUROC | pixel AUROC | PRO |" in result.output and "| widget |" in result.output
    record = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    metrics = record["metrics"]["widget"]
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("image_auroc", "pixel_auroc", "pro"))
    assert metrics["num_images"] == 5 and metrics["num_anomalous"] == 3
    overlays = sorted((tmp_path / "eval" / "overlays" / "widget").glob("*.png"))
    assert len(overlays) == 5
    with Image.open(overlays[0]) as picture:
        assert picture.size == (3 * 64, 64)  # image | ground truth | heat map


def test_predict_writes_scores_maps_masks_and_overlays(trained, tmp_path):
    root, output = trained
    folder = root / "widget" / "test"
    result = runner.invoke(app, ["predict", str(folder), "--model", str(output / "model"), "--out", str(tmp_path / "pred"),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "pred" / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and (tmp_path / "pred" / "scores.csv").read_text().count("\n") == 6
    for row in rows:
        assert (tmp_path / "pred" / row["map"]).is_file() and (tmp_path / "pred" / row["overlay"]).is_file()
        mask = np.asarray(Image.open(tmp_path / "pred" / row["mask"]))
        assert set(np.unique(mask)) <= {0, 255} and mask.shape == (64, 64)
        assert isinstance(row["is_anomalous"], bool)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--data", "/no/such/root", "--source", "cutpaste", "--output", "OUT"], "no such folder"),
        (["train", "--data", "DATA", "--category", "nope", "--source", "cutpaste", "--output", "OUT"], "no such category"),
        (["train", "--data", "DATA", "--category", "widget", "--source", "cutpaste", "--output", "OUT", "--recipe", "turbo"], "unknown recipe"),
        (["train", "--data", "DATA", "--category", "widget", "--source", "cutpaste", "--output", "OUT",
          "--backbone", "no_such_net"], "backbone"),
        (["train", "--data", "DATA", "--category", "widget", "--source", "cutpaste", "--output", "OUT",
          "--model-option", "afs_channels=[8,999]"], "afs_channels"),
        (["train", "--data", "DATA", "--category", "widget", "--source", "cutpaste", "--output", "OUT",
          "--recipe-option", "oops"], "KEY=VALUE"),
        (["train", "--data", "DATA", "--category", "widget", "--source", "cutpaste", "--output", "OUT",
          "--model-option", "no_such_setting=1"], "--model-option no_such_setting: unknown"),
        (["train", "--data", "DATA", "--category", "widget", "--source", "cutpaste", "--output", "OUT",
          "--recipe-option", 'learning_rate="fast"'], "learning_rate must be a number"),
        (["train", "--data", "DATA", "--category", "widget", "--source", "cutpaste", "--output", "OUT",
          "--batch-size", "0"], "--batch-size"),
        (["train", "--data", "DATA", "--category", "widget", "--source", "cutpaste", "--output", "OUT",
          "--mixed-precision", "fp16"], "--mixed-precision fp16"),
        (["eval", "--model", "/no/such/model", "--data", "DATA"], "--model"),
        (["eval", "--model", "MODEL", "--data", "DATA", "--category", "widget", "--batch-size", "0"], "--batch-size"),
        (["predict", "DATA", "--model", "MODEL", "--out", "OUT", "--batch-size", "-1"], "--batch-size"),
        (["eval", "--model", "MODEL", "--data", "DATA", "--category", "nope"], "no such category"),
        (["predict", "/no/such/image.png", "--model", "MODEL", "--out", "OUT"], "no such image"),
    ],
)
def test_bad_inputs_exit_non_zero_with_one_line(trained, tmp_path, args, message):
    root, output = trained
    substitutions = {"DATA": str(root), "OUT": str(tmp_path / "out"), "MODEL": str(output)}
    args = [substitutions.get(a, a) for a in args]
    if args[0] == "train":  # the case's own options come last, so they override TINY's
        args = [args[0], *TINY, *args[1:]]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_eval_rejects_masks_of_missing_files(trained, tmp_path):
    root, output = trained
    broken = tmp_path / "broken"
    make_dataset(broken / "widget", n_train=2, n_good=1, n_bad=2)
    next((broken / "widget" / "ground_truth" / "blob").glob("*.png")).unlink()
    result = runner.invoke(app, ["eval", "--model", str(output), "--data", str(broken), "--category", "widget"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "no ground-truth mask" in result.output and "blob" in result.output


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_a_second_run_into_the_same_out_needs_overwrite_and_leaves_no_stale_file(trained, tmp_path, command):
    root, output = trained
    out = tmp_path / "out"
    if command == "eval":
        base = ["eval", "--model", str(output), "--data", str(root), "--category", "widget", "--out", str(out)]
        first_args, second_args = base, [*base, "--no-overlays"]
        stale, result_file = out / "overlays" / "widget" / "blob_000.png", out / "metrics.json"
    else:
        base = ["--model", str(output), "--out", str(out)]
        first_args = ["predict", str(root / "widget" / "test"), *base]
        second_args = ["predict", str(root / "widget" / "test" / "good"), *base]
        stale, result_file = out / "maps" / "blob__000.npy", out / "scores.csv"
    assert runner.invoke(app, [*first_args, "--device", "cpu"]).exit_code == 0
    assert stale.is_file()  # a result of the first run that the second does not write again
    keep = out / "notes.txt"  # not a result: --overwrite must leave it alone
    keep.write_text("mine")
    first = result_file.read_bytes()

    again = runner.invoke(app, [*second_args, "--device", "cpu"])
    assert again.exit_code == 2 and "--overwrite" in again.output and len(again.output.strip().splitlines()) == 1
    assert stale.is_file() and result_file.read_bytes() == first

    replaced = runner.invoke(app, [*second_args, "--device", "cpu", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert not stale.exists() and result_file.is_file() and keep.read_text() == "mine"


def test_python_dash_m_runs_the_cli():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "realnet.cli", "predict", "--help"], capture_output=True, text=True,
                            check=False, timeout=300)
    assert result.returncode == 0 and "--image-size" in result.stdout
