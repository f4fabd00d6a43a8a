"""Heat maps, overlays and grids: sizes, colours, contours and atomic files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from realnet.visualize import (
    COLORMAPS,
    GROUND_TRUTH_COLOUR,
    PREDICTION_COLOUR,
    heatmap,
    make_grid,
    overlay,
    save_grid,
    save_overlay_grid,
    save_overlay_triptych,
)
from sia.errors import InputError


def test_heatmap_maps_range_to_lut_ends():
    values = np.linspace(0, 1, 64).reshape(8, 8)
    rgb = heatmap(torch.from_numpy(values)[None], vmin=0, vmax=1)
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == tuple(COLORMAPS["viridis"][0])
    assert tuple(rgb[-1, -1]) == tuple(COLORMAPS["viridis"][-1])
    # values outside [vmin, vmax] clip to the ends; a constant map is valid
    assert tuple(heatmap(values * 10, vmin=0, vmax=1)[-1, -1]) == tuple(COLORMAPS["viridis"][-1])
    assert np.all(heatmap(np.ones((4, 4))) == COLORMAPS["viridis"][0])


def test_viridis_lut_gets_brighter_monotonically():
    lut = COLORMAPS["viridis"].astype(float)
    luminance = lut @ np.array([0.2126, 0.7152, 0.0722])
    assert np.all(np.diff(luminance) > -1.0)  # perceptual order: never noticeably darker
    assert lut.shape == (256, 3)


def test_overlay_blends_half_and_draws_contours():
    image = torch.full((3, 32, 32), 0.4)
    scores = torch.zeros(1, 16, 16)
    scores[0, 4:8, 4:8] = 1.0  # resized x2 onto the image
    mask = np.zeros((32, 32)); mask[20:28, 20:28] = 1
    plain = np.asarray(overlay(image, scores, vmin=0, vmax=1))
    low = COLORMAPS["viridis"][0].astype(float)
    expected = np.round(0.5 * low + 0.5 * 102)  # 0.4 * 255 = 102
    assert plain.shape == (32, 32, 3)
    assert np.allclose(plain[0, 0], expected, atol=1)
    marked = np.asarray(overlay(image, scores, mask=mask, threshold=0.5, vmin=0, vmax=1))
    assert tuple(marked[20, 24]) == GROUND_TRUTH_COLOUR and tuple(marked[24, 24]) != GROUND_TRUTH_COLOUR
    assert (marked == PREDICTION_COLOUR).all(axis=-1).any()
    assert tuple(marked[0, 0]) == tuple(plain[0, 0])  # far from both contours: unchanged



@pytest.mark.parametrize("height, width", [(1, 1), (50, 1), (1, 50)])
def test_one_pixel_high_or_wide_maps_keep_their_shape(height, width):
    image = Image.new("RGB", (width, height), (100, 100, 100))
    scores = np.linspace(0, 1, height * width).reshape(height, width)
    layouts = [scores, scores[None], torch.from_numpy(scores)[None]] + ([scores[..., None]] if height > 1 else [])
    for values in layouts:  # (1, 50, 1) is read as (1, H, W): channels first wins
        assert heatmap(values, vmin=0, vmax=1).shape == (height, width, 3)
        picture = overlay(image, values, mask=np.ones((height, width)), threshold=0.5, vmin=0, vmax=1)
        assert picture.size == (width, height)

def test_triptych_layout_and_atomic_write(tmp_path):
    image = Image.new("RGB", (20, 12), (10, 200, 30))
    mask = np.zeros((12, 20)); mask[2:5, 3:9] = 1
    path = save_overlay_triptych(tmp_path / "sub" / "out.png", image, mask, np.random.default_rng(0).random((12, 20)))
    saved = np.asarray(Image.open(path))
    assert saved.shape == (12, 60, 3)
    assert np.array_equal(saved[:, :20], np.asarray(image))
    assert np.array_equal(saved[:, 20:40, 0] > 0, mask > 0)
    assert [p.name for p in path.parent.iterdir()] == ["out.png"]  # no temporary file left behind
    normal = save_overlay_triptych(tmp_path / "n.jpg", image, None, np.zeros((12, 20)))
    assert np.asarray(Image.open(normal))[:, 20:40].max() < 20  # black (JPEG noise aside) mask panel


def test_grid_and_overlay_grid(tmp_path):
    tiles = [Image.new("RGB", (8, 6), (i * 40, 0, 0)) for i in range(5)]
    grid = make_grid(tiles, ncols=2, padding=1)
    assert grid.size == (2 * 8 + 1, 3 * 6 + 2)
    assert grid.getpixel((9, 7)) == (120, 0, 0)  # tile 3: row 1, col 1
    path = save_grid(tiles, tmp_path / "grid.png", ncols=5)
    assert Image.open(path).size == (5 * 8 + 4 * 2, 6)
    maps = [np.full((6, 8), float(i)) for i in range(3)]
    out = save_overlay_grid(tmp_path / "o.png", tiles[:3], maps, ncols=3)
    picture = np.asarray(Image.open(out))
    # shared range: the first map is at vmin, the last at vmax, so their heat differs
    assert not np.array_equal(picture[0, 0], picture[0, 2 * 10])


def test_bad_inputs():
    with pytest.raises(InputError, match="colormap"):
        heatmap(np.zeros((2, 2)), colormap="rainbowish")
    with pytest.raises(InputError, match="single-channel"):
        heatmap(np.zeros((3, 4, 4)))
    with pytest.raises(InputError, match="extension"):
        save_grid([Image.new("RGB", (2, 2))], "/tmp/x.unknownext")
    with pytest.raises(InputError):
        make_grid([])
