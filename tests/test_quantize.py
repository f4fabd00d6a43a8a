"""OpenVINO int8 export: a quantised graph that runs, stays close to the float model, and refuses bad input."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from realnet.cli import app
from realnet.deploy import ExportedRealNet, read_manifest
from realnet.export import export_model
from sia.errors import InputError

pytest.importorskip("openvino")
pytest.importorskip("nncf")

import test_export  # noqa: E402
from test_export import SIZE, THRESHOLDS, real_looking  # noqa: E402

model_dir = test_export.model_dir  # the same saved tiny model, as a fixture of this module


@pytest.fixture(scope="module")
def calibration_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("normal")
    for i, image in enumerate(real_looking(12, size=(80, 120), seed=3)):
        Image.fromarray((image.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def int8_dir(model_dir, calibration_folder, tmp_path_factory):
    return export_model(model_dir, tmp_path_factory.mktemp("int8") / "export", format="openvino", precision="int8",
                        calibration_images=calibration_folder)


def test_int8_graph_is_quantised_and_records_its_calibration(int8_dir):
    import openvino as ov

    manifest = read_manifest(int8_dir)
    assert manifest["precision"] == "int8" and manifest["calibration_images"] == 12
    assert manifest["thresholds"] == THRESHOLDS
    model = ov.Core().read_model(str(int8_dir / "model.xml"))
    fake_quantize = [op for op in model.get_ops() if op.get_type_name() == "FakeQuantize"]
    assert len(fake_quantize) >= 10  # convolutions and matrix products run in 8 bits
    check = manifest["verification"]
    assert check["mean_abs_anomaly_map"] > 0  # not the float graph under another name


@pytest.fixture(scope="module")
def cli_int8_dir(model_dir, calibration_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "export"
    result = CliRunner().invoke(app, ["export", "--model", str(model_dir), "--out", str(out), "--format", "openvino",
                                      "--precision", "int8", "--calibration-images", str(calibration_folder)])
    assert result.exit_code == 0, result.output
    return out


def test_int8_graph_gives_valid_deterministic_outputs(int8_dir, cli_int8_dir):
    # How close int8 stays to float is a property of a trained model on real data (the speed
    # benchmark measures it); an untrained model's residual channels are near-ties that any noise
    # reorders. Here: valid probabilities and scores, and the same calibration gives the same graph.
    images = real_looking(4, size=SIZE, seed=9)
    out = ExportedRealNet(int8_dir)(images)
    assert out.anomaly_map.shape == (4, 1, *SIZE) and out.image_score.shape == (4,)
    assert np.isfinite(out.anomaly_map).all() and out.anomaly_map.min() >= 0 and out.anomaly_map.max() <= 1
    repeat = ExportedRealNet(cli_int8_dir)(images)  # the same calibration images, through the CLI
    np.testing.assert_allclose(repeat.anomaly_map, out.anomaly_map, atol=1e-6)
    np.testing.assert_array_equal(repeat.rrs_indices, out.rrs_indices)


def test_only_backbone_and_reconstruction_unets_are_quantised(int8_dir):
    # The residual is a small difference of large tensors, and the map / image score are
    # probabilities: 8-bit ranges there (calibrated on normal images) turned a trained model's
    # image scores into one constant. Every FakeQuantize must feed the backbone or a U-Net.
    import openvino as ov

    model = ov.Core().read_model(str(int8_dir / "model.xml"))
    quantised_inputs = set()
    for op in model.get_ops():
        if op.get_type_name() == "FakeQuantize":
            for target in op.output(0).get_target_inputs():
                quantised_inputs.add(target.get_node().get_friendly_name())
    assert any("/backbone/" in name for name in quantised_inputs)
    assert any("/recon/unets." in name for name in quantised_inputs)
    outside = sorted(n for n in quantised_inputs if "/backbone/" not in n and not re.search(r"/recon/unets\.\d+/", n))
    assert outside == []  # standardiser, AFS gather, residual, RRS, discriminator, softmax, image score: float


def quantised_input_nodes(folder) -> set[str]:
    import openvino as ov

    model = ov.Core().read_model(str(folder / "model.xml"))
    return {target.get_node().get_friendly_name() for op in model.get_ops() if op.get_type_name() == "FakeQuantize"
            for target in op.output(0).get_target_inputs()}


def test_int8_discriminator_also_quantises_the_discriminator_but_not_the_map(model_dir, calibration_folder, tmp_path):
    folder = export_model(model_dir, tmp_path / "export", format="openvino", precision="int8-discriminator",
                          calibration_images=calibration_folder)
    assert read_manifest(folder)["precision"] == "int8-discriminator"
    names = quantised_input_nodes(folder)
    assert any("/discriminator/decoder1/" in n for n in names) and any("/recon/unets." in n for n in names)
    allowed = r"/(backbone|recon/unets\.\d+|discriminator/decoder[12])/"
    assert sorted(n for n in names if not re.search(allowed, n)) == []  # last convolutions, softmax, score: float
    out = ExportedRealNet(folder)(real_looking(2, size=SIZE, seed=4))
    assert np.isfinite(out.anomaly_map).all() and out.anomaly_map.min() >= 0 and out.anomaly_map.max() <= 1


def test_float_export_records_fp32(model_dir, tmp_path):
    folder = export_model(model_dir, tmp_path / "fp32", format="openvino")
    manifest = read_manifest(folder)
    assert manifest["precision"] == "fp32" and manifest["calibration_images"] is None
    assert manifest["verification"]["max_abs_anomaly_map"] <= 1e-4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"format": "onnx", "precision": "int8"}, "`precision`: int8 is available for format openvino"),
        ({"format": "openvino", "precision": "int4"}, "`precision`: expected one of fp32, int8"),
        ({"format": "openvino", "precision": "int8"}, "`calibration_images`: int8 needs normal images"),
        ({"format": "openvino", "precision": "int8", "calibration_images": np.zeros((2, 3, 8, 8), np.float32)},
         "`calibration_images`: expected images (N, 3, 64, 96)"),
    ],
)
def test_bad_int8_requests_are_one_line_errors_that_write_nothing(model_dir, tmp_path, kwargs, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        export_model(model_dir, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_int8_names_the_flags(model_dir, cli_int8_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["export", "--model", str(model_dir), "--out", str(tmp_path / "a"),
                                 "--format", "onnx", "--precision", "int8"])
    assert result.exit_code == 2 and "--precision: int8 is available for format openvino" in result.output
    result = runner.invoke(app, ["export", "--model", str(model_dir), "--out", str(tmp_path / "b"),
                                 "--format", "openvino", "--precision", "int8"])
    assert result.exit_code == 2 and "--calibration-images: int8 needs normal images" in result.output
    assert read_manifest(cli_int8_dir)["precision"] == "int8"
