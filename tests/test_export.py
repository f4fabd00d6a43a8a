"""Export to ONNX / OpenVINO: the exported graph reproduces the eager RealNet, and bad input is refused.

A tiny random resnet18 RealNet with every part made non-trivial (reconstructions, RRS ranking
statistics, discriminator) is exported once per format; the real runtimes run it.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from realnet.cli import app
from realnet.deploy import MANIFEST_NAME, ExportedRealNet, read_manifest
from realnet.export import export_model
from realnet.model import RealNet
from realnet.predict import predict
from sia.errors import InputError

pytest.importorskip("onnx")

SIZE = (64, 96)
THRESHOLDS = {"image_threshold": 0.6, "pixel_threshold": 0.55}
MAP_TOLERANCE, SCORE_TOLERANCE = 1e-4, 1e-5


def tiny_realnet(image_size=SIZE) -> RealNet:
    """Small and fast to export, with nothing left at an identity or zero initialisation."""
    torch.manual_seed(0)
    net = RealNet(
        backbone="resnet18", backbone_pretrained=False, layers=[1, 2, 3], afs_channels=[16, 24, 32],
        image_size=list(image_size), recon_channel_mult=[1, 2], recon_attention_mult=[2], recon_num_res_blocks=1,
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for unet in net.recon.unets:  # zero-initialised outputs would make the U-Nets invisible
            unet.out[-1].weight.normal_(0, 0.05, generator=generator)
        for block in net.modules():
            if getattr(block, "proj_out", None) is not None:  # zero-initialised attention outputs too
                block.proj_out.weight.normal_(0, 0.05, generator=generator)
        net.rrs.bn.running_mean.uniform_(0, 2, generator=generator)  # as after training: distinct channels
        net.rrs.bn.running_var.uniform_(0.5, 4, generator=generator)
        for module in net.discriminator.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.mul_(3)  # spread the map over (0, 1) instead of ~0.5 everywhere
    net.selector.set_indices([torch.arange(16) * 4, torch.arange(24) * 5, torch.arange(32) * 8])
    return net.eval()


def real_looking(count: int, size=SIZE, seed: int = 0) -> np.ndarray:
    """Smooth textured surfaces with a dark or bright blemish, float32 (B, 3, H, W) in [0, 1]."""
    rng = np.random.default_rng(seed)
    ys, xs = np.meshgrid(np.linspace(0, 1, size[0]), np.linspace(0, 1, size[1]), indexing="ij")
    images = []
    for _ in range(count):
        base = 0.5 + 0.2 * np.sin(2 * np.pi * (rng.uniform(1, 4) * xs + rng.uniform(1, 4) * ys))
        cy, cx, radius = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.15)
        blob = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * radius**2))
        grey = base + rng.choice([-0.4, 0.4]) * blob + rng.normal(0, 0.02, size)
        tint = rng.uniform(0.8, 1.0, 3)[:, None, None]
        images.append(np.clip(grey[None] * tint, 0, 1))
    return np.stack(images).astype(np.float32)


def eager(net: RealNet, images: np.ndarray):
    with torch.no_grad():
        out = net(torch.from_numpy(images))
    return out.anomaly_map.numpy(), out.image_score.numpy(), out.rrs_indices.numpy()


def assert_parity(deployed: ExportedRealNet, net: RealNet, images: np.ndarray) -> None:
    maps, scores, indices = eager(net, images)
    out = deployed(images)
    assert out.anomaly_map.shape == maps.shape and out.image_score.shape == scores.shape
    assert np.abs(out.anomaly_map - maps).max() <= MAP_TOLERANCE
    assert np.abs(out.image_score - scores).max() <= SCORE_TOLERANCE
    np.testing.assert_array_equal(out.rrs_indices, indices)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "model"
    tiny_realnet().save_pretrained(folder)
    (folder / "thresholds.json").write_text(json.dumps(THRESHOLDS))
    return folder


@pytest.fixture(scope="module")
def net(model_dir):
    return RealNet.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def onnx_dir(model_dir, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    return export_model(model_dir, tmp_path_factory.mktemp("onnx") / "export", format="onnx")


@pytest.fixture(scope="module")
def openvino_dir(model_dir, tmp_path_factory):
    pytest.importorskip("openvino")
    return export_model(model_dir, tmp_path_factory.mktemp("openvino") / "export", format="openvino")


def test_tiny_model_is_not_trivial(net):
    maps, scores, indices = eager(net, real_looking(3))
    assert maps.std() > 0.05 and np.ptp(scores) > 1e-3  # a constant map would make parity meaningless
    assert not (indices == indices[:1]).all()  # RRS picks different channels per image


def test_export_folder_holds_graph_manifest_thresholds_and_check(onnx_dir, model_dir):
    assert sorted(p.name for p in onnx_dir.iterdir()) == sorted([MANIFEST_NAME, "model.onnx"])
    manifest = read_manifest(onnx_dir)
    assert manifest["image_size"] == list(SIZE) and manifest["batch"] is None
    assert manifest["thresholds"] == THRESHOLDS
    assert manifest["model_config"]["afs_channels"] == [16, 24, 32]
    check = manifest["verification"]
    assert check["rrs_indices_equal"] and check["max_abs_anomaly_map"] <= MAP_TOLERANCE
    assert not list(onnx_dir.parent.glob(".*tmp"))  # the build folder is gone


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", ["random", "real-looking"])
def test_onnxruntime_matches_eager(onnx_dir, net, batch, kind):
    images = np.random.default_rng(batch).random((batch, 3, *SIZE), dtype=np.float32) if kind == "random" else real_looking(batch, seed=batch)
    assert_parity(ExportedRealNet(onnx_dir), net, images)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", ["random", "real-looking"])
def test_openvino_matches_eager(openvino_dir, net, batch, kind):
    images = np.random.default_rng(batch).random((batch, 3, *SIZE), dtype=np.float32) if kind == "random" else real_looking(batch, seed=batch)
    assert sorted(p.name for p in openvino_dir.iterdir()) == sorted([MANIFEST_NAME, "model.bin", "model.xml"])
    assert_parity(ExportedRealNet(openvino_dir, num_threads=1), net, images)


def test_square_export_with_a_fixed_batch_runs_any_number_of_images(model_dir, net, tmp_path):
    pytest.importorskip("onnxruntime")
    folder = export_model(model_dir, tmp_path / "square", image_size="64x64", batch=2)
    deployed = ExportedRealNet(folder)
    assert deployed.image_size == (64, 64) and deployed.batch == 2
    import onnx

    graph_input = onnx.load(str(folder / "model.onnx")).graph.input[0]
    assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim] == [2, 3, 64, 64]
    for count in (1, 3):  # padded to the fixed batch and cropped back
        assert_parity(deployed, net, real_looking(count, size=(64, 64), seed=count))


def test_eager_outputs_and_model_are_unchanged_by_export(model_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    model = RealNet.from_pretrained(model_dir).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    images = real_looking(2)
    model.eval()
    before = eager(model, images)
    model.train()
    export_model(model, tmp_path / "from-module", verify=False)
    assert model.training  # the caller's model keeps its mode and statistics
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    model.eval()
    for a, b in zip(before, eager(model, images)):
        np.testing.assert_array_equal(a, b)


def test_overwrite_replaces_an_export_but_never_another_folder(model_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "export"
    export_model(model_dir, out, verify=False)
    with pytest.raises(InputError, match="`out` .*not empty.*`overwrite=True`"):
        export_model(model_dir, out, verify=False)
    export_model(model_dir, out, image_size=(64, 64), overwrite=True, verify=False)
    assert read_manifest(out)["image_size"] == [64, 64]
    other = tmp_path / "results"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not an export folder"):
        export_model(model_dir, other, overwrite=True, verify=False)
    assert (other / "keep.txt").read_text() == "mine"


def _cli(*args):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--format", "tflite"], "--format: unknown export format 'tflite'"),
        (["--image-size", "64x90"], "--image-size 64x90: each side must be a multiple of 16"),
        (["--image-size", "big"], "--image-size 'big': expected"),
        (["--batch", "0"], "--batch: expected 'dynamic' or a positive whole number"),
    ],
)
def test_export_cli_bad_arguments_are_one_line_errors_and_write_nothing(model_dir, tmp_path, extra, message):
    result = _cli("export", "--model", str(model_dir), "--out", str(tmp_path / "out"), *extra)
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_export_cli_refuses_a_model_folder_without_weights(model_dir, tmp_path):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "config.json").write_text((model_dir / "config.json").read_text())
    result = _cli("export", "--model", str(folder), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "--model" in result.output and "model.safetensors" in result.output
    assert not (tmp_path / "out").exists()


def test_missing_runtime_is_a_one_line_install_hint(model_dir, onnx_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(InputError, match=r"onnxruntime.*pip install \"sia\[export\]\""):
        ExportedRealNet(onnx_dir)
    result = _cli("export", "--model", str(model_dir), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "--format onnx: needs the 'onnxruntime' package" in result.output
    assert list(tmp_path.iterdir()) == []


def test_an_export_of_another_format_version_is_refused(onnx_dir, tmp_path):
    import shutil

    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(tmp_path / "images" / "image.png")
    copy = tmp_path / "old"
    shutil.copytree(onnx_dir, copy)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["format_version"] = 99
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    result = _cli("predict", str(tmp_path / "images"), "--model", str(copy), "--out", str(tmp_path / "results"))
    assert result.exit_code == 2 and "--model" in result.output and "export format version 99" in result.output
    assert not (tmp_path / "results").exists()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Pictures smaller, larger and of another aspect than the model's input."""
    folder = tmp_path_factory.mktemp("images")
    for i, (height, width) in enumerate([(50, 70), (120, 90), (64, 96)]):
        picture = real_looking(1, size=(height, width), seed=10 + i)[0]
        Image.fromarray(np.round(picture.transpose(1, 2, 0) * 255).astype(np.uint8)).save(folder / f"part{i}.png")
    return folder


def _rows(folder: Path) -> list[dict]:
    with (folder / "scores.csv").open() as handle:
        return list(csv.DictReader(handle))


def assert_same_results(deployed: Path, eager_out: Path) -> None:
    """Same images, scores, decisions, maps, masks and overlays as the PyTorch path wrote."""
    rows, expected = _rows(deployed), _rows(eager_out)
    assert [r["image"] for r in rows] == [r["image"] for r in expected]
    for row, want in zip(rows, expected):
        assert abs(float(row["score"]) - float(want["score"])) <= SCORE_TOLERANCE
        assert row["is_anomalous"] == want["is_anomalous"]
        for column in ("map", "map_png", "mask", "overlay"):
            assert row[column] == want[column] and (deployed / row[column]).is_file()
        ours, theirs = np.load(deployed / row["map"]), np.load(eager_out / want["map"])
        assert ours.shape == theirs.shape == SIZE and np.abs(ours - theirs).max() <= MAP_TOLERANCE
        png = np.asarray(Image.open(deployed / row["map_png"]), dtype=np.float64)
        png_eager = np.asarray(Image.open(eager_out / want["map_png"]), dtype=np.float64)
        assert np.abs(png - png_eager).max() <= MAP_TOLERANCE * 65535 + 1
        mask, mask_eager = (np.asarray(Image.open(f / r["mask"])) > 0 for f, r in ((deployed, row), (eager_out, want)))
        near_threshold = np.abs(png_eager / 65535 - THRESHOLDS["pixel_threshold"]) <= 2 * MAP_TOLERANCE
        assert mask.shape == png.shape and np.array_equal(mask[~near_threshold], mask_eager[~near_threshold])
    flagged = {r["is_anomalous"] for r in expected}
    assert flagged == {"True", "False"} or len(rows) == 1 or flagged  # decisions were taken (thresholds applied)


def test_cli_predict_with_an_onnx_export_never_imports_torch(onnx_dir, model_dir, image_folder, tmp_path):
    predict(model_dir, [image_folder], tmp_path / "eager", progress=False)
    script = (
        "import sys; from realnet.cli import app\n"
        "try:\n    app(sys.argv[1:])\nexcept SystemExit as done:\n    code = done.code\n"
        "print('TORCH_LOADED' if 'torch' in sys.modules else 'NO_TORCH', code)\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", script, "predict", str(image_folder), "--model", str(onnx_dir),
         "--out", str(tmp_path / "deployed")],
        capture_output=True, text=True, env=env, cwd=root, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "NO_TORCH 0", done.stdout + done.stderr
    assert_same_results(tmp_path / "deployed", tmp_path / "eager")


def test_predict_with_an_openvino_export_writes_the_same_results(openvino_dir, model_dir, image_folder, tmp_path):
    predict(model_dir, [image_folder], tmp_path / "eager", progress=False)
    results = predict(openvino_dir, [image_folder], tmp_path / "deployed", batch_size=2, progress=False)
    assert len(results) == 3 and all(r.mask is not None for r in results)  # the manifest's thresholds were used
    assert_same_results(tmp_path / "deployed", tmp_path / "eager")


def test_graphs_over_two_gigabytes_keep_their_weights_in_one_data_file(onnx_dir, net, tmp_path):
    """The tracer writes one file per tensor for models over protobuf's limit; the export has one."""
    onnx = pytest.importorskip("onnx")
    from realnet.export import _write_onnx

    traced = tmp_path / "trace" / "model.onnx"
    traced.parent.mkdir()
    onnx.save_model(onnx.load(str(onnx_dir / "model.onnx")), str(traced), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(traced.parent.iterdir())) > 10
    folder = tmp_path / "export"
    folder.mkdir()
    _write_onnx(traced, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.onnx.data"]
    manifest = json.loads((onnx_dir / MANIFEST_NAME).read_text())
    (folder / MANIFEST_NAME).write_text(json.dumps({**manifest, "files": ["model.onnx", "model.onnx.data"]}))
    assert_parity(ExportedRealNet(folder), net, real_looking(2))
