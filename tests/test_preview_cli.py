"""`sia preview` end to end on generated images."""

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from sia.cli import app
from sia.preview import HEADER_HEIGHT


def make_folders(tmp_path):
    rng = np.random.default_rng(0)
    normal = tmp_path / "normal"
    normal.mkdir()
    for i, (size, mode) in enumerate([((80, 60), "RGB"), ((50, 50), "L"), ((64, 40), "RGBA")]):
        canvas = np.full((size[1], size[0], 3), 200, np.uint8)
        canvas[size[1] // 4 : 3 * size[1] // 4, size[0] // 4 : 3 * size[0] // 4] = 40
        Image.fromarray(canvas).convert(mode).save(normal / f"{i}.png")
    source = tmp_path / "sia"
    source.mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(source / f"{i}.jpg")
    return normal, source


def output_text(result):
    text = result.output
    try:
        text += result.stderr
    except (ValueError, AttributeError):
        pass
    return text


def test_preview_writes_a_png_grid_and_refuses_to_overwrite(tmp_path):
    normal, source = make_folders(tmp_path)
    out = tmp_path / "grid.png"
    args = ["preview", "--images", str(normal), "--source", str(source), "--category", "bottle", "--out", str(out),
            "--n", "4", "--seed", "0", "--size", "32"]
    runner = CliRunner()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, output_text(result)
    with Image.open(out) as grid:
        assert grid.format == "PNG" and grid.size == (3 * 32, HEADER_HEIGHT + 4 * 32)
        pixels = np.asarray(grid.convert("RGB"))
    outline_panel = pixels[HEADER_HEIGHT:, 64:]
    assert ((outline_panel[..., 0] == 255) & (outline_panel[..., 1] == 0) & (outline_panel[..., 2] == 0)).any()
    first = out.read_bytes()
    result = runner.invoke(app, args)
    assert result.exit_code != 0 and "--overwrite" in output_text(result)
    result = runner.invoke(app, args + ["--overwrite"])
    assert result.exit_code == 0 and out.read_bytes() == first  # same seed, same grid


def test_preview_with_cutpaste_and_dtd_sources(tmp_path):
    normal, source = make_folders(tmp_path)
    runner = CliRunner()
    for spec in ["cutpaste", f"dtd:{source}"]:
        out = tmp_path / f"{spec[:3]}.png"
        result = runner.invoke(app, ["preview", "--images", str(normal), "--source", spec, "--out", str(out), "--n", "2",
                                     "--size", "24", "--category", "auto"])
        assert result.exit_code == 0, output_text(result)
        with Image.open(out) as grid:
            assert grid.size == (72, HEADER_HEIGHT + 48)


def test_preview_bad_inputs_exit_non_zero_with_one_line(tmp_path):
    normal, source = make_folders(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    runner = CliRunner()
    base = ["preview", "--images", str(normal), "--out", str(tmp_path / "x.png")]
    cases = [
        (["--source", str(source), "--category", "bottel"], "unknown category"),
        (["--source", str(empty)], "no images"),
        (["--source", "sia:" + str(tmp_path / "missing")], "no such folder"),
        (["--source", str(source), "--n", "0"], "--n"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, base + extra)
        text = output_text(result)
        assert result.exit_code != 0 and message in text, text
        assert "Traceback" not in text
    assert not (tmp_path / "x.png").exists()
