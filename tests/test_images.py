"""Image reading accepts every common mode and depth and fails clearly on bad files."""

import numpy as np
import pytest
import torch
from PIL import Image

from sia.errors import InputError
from sia.images import list_images, load_image, load_image_tensor, load_mask, tensor_to_pil, to_pil_rgb


def _save(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path)
    return path


@pytest.mark.parametrize("kind", ["gray", "rgba", "palette", "gray16", "rgb"])
def test_any_mode_becomes_rgb_uint8(tmp_path, kind):
    rng = np.random.default_rng(0)
    if kind == "gray":
        path = _save(tmp_path / "a.png", rng.integers(0, 256, (20, 30), dtype=np.uint8))
    elif kind == "rgba":
        path = _save(tmp_path / "a.png", rng.integers(0, 256, (20, 30, 4), dtype=np.uint8))
    elif kind == "palette":
        path = tmp_path / "a.png"
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).convert("P").save(path)
    elif kind == "gray16":
        path = tmp_path / "a.png"
        Image.fromarray(np.full((20, 30), 65535, dtype=np.uint16)).save(path)
    else:
        path = _save(tmp_path / "a.jpg", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (30, 20)
    if kind == "gray16":
        assert np.asarray(image).min() == 255  # full-scale 16-bit white stays white, not clipped noise


def test_sixteen_bit_mid_grey_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "mid.png"
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(path)
    value = np.asarray(load_image(path))[0, 0, 0]
    assert 126 <= value <= 129


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="bad.png"):
        load_image(bad)
    good = _save(tmp_path / "t.png", np.zeros((64, 64, 3), dtype=np.uint8) + 7)
    data = good.read_bytes()
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="trunc.png"):
        load_image(truncated)
    with pytest.raises(InputError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_tensor_roundtrip_and_resize_without_crop():
    image = torch.rand(3, 10, 14)
    pil = tensor_to_pil(image)
    back = load_image_tensor(pil)
    assert back.shape == (3, 10, 14)
    assert torch.allclose(back, image, atol=1 / 255)
    resized = load_image_tensor(pil, size=(16, 32))
    assert resized.shape == (3, 16, 32)


def test_array_inputs_of_several_layouts():
    assert to_pil_rgb(np.zeros((5, 6), dtype=np.uint8)).size == (6, 5)
    assert to_pil_rgb(np.ones((5, 6, 3), dtype=np.float32)).getpixel((0, 0)) == (255, 255, 255)
    assert to_pil_rgb(torch.zeros(3, 5, 6)).size == (6, 5)
    chw = np.zeros((3, 5, 6), dtype=np.uint8)
    chw[0], chw[2] = 200, 10
    assert to_pil_rgb(chw).size == (6, 5) and to_pil_rgb(chw).getpixel((0, 0)) == (200, 0, 10)
    with pytest.raises(InputError, match="expected"):
        to_pil_rgb(np.zeros((5, 6, 7), dtype=np.uint8))


def test_bit_depth_comes_from_the_type_not_the_pixel_values(tmp_path):
    """A dark 16-bit image stays dark: 255 in a 16-bit image is 255/65535 of full scale."""
    for mode, dtype in (("I;16", np.uint16), ("I", np.int32)):
        pil = Image.fromarray(np.full((4, 4), 255, dtype=dtype))
        assert pil.mode == mode
        assert np.asarray(to_pil_rgb(pil))[0, 0, 0] == 1
        assert np.asarray(to_pil_rgb(Image.fromarray(np.full((4, 4), 65535, dtype=dtype))))[0, 0, 0] == 255
    assert np.asarray(to_pil_rgb(np.full((4, 4), 255, dtype=np.uint16)))[0, 0, 0] == 1
    assert np.asarray(to_pil_rgb(np.full((4, 4), 255, dtype=np.uint8)))[0, 0, 0] == 255
    path = _save(tmp_path / "dark16.png", np.full((4, 4), 200, dtype=np.uint16))
    assert np.asarray(load_image(path))[0, 0, 0] == 1
    with pytest.raises(InputError, match=r"\[0, 65535\]"):
        to_pil_rgb(Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)))  # not 16-bit data
    with pytest.raises(InputError, match="uint8 or uint16"):
        to_pil_rgb(np.full((4, 4), 7, dtype=np.int64))  # no bit depth to go by


def test_mask_binarised_above_zero_and_resized_nearest(tmp_path):
    array = np.zeros((8, 8), dtype=np.uint8)
    array[2:4, 2:4] = 85  # a non-255 label value still counts as anomalous
    path = _save(tmp_path / "m.png", array)
    mask = load_mask(path)
    assert mask.shape == (1, 8, 8) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask.sum() == 4
    assert load_mask(path, size=(16, 16)).sum() == 16


def test_list_images_sorted_and_empty_folder_error(tmp_path):
    for name in ["b.png", "a.jpg", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no images"):
        list_images(empty, what="--source")


def _mask_file(tmp_path, name, image):
    path = tmp_path / name
    image.save(path)
    return load_mask(path)[0]


def test_alpha_is_not_a_label_and_palette_masks_read_their_colours(tmp_path):
    label = np.zeros((6, 8), dtype=np.uint8)
    label[1:3, 2:5] = 255
    opaque = np.full_like(label, 255)
    rgba = np.stack([label, label, label, opaque], axis=-1)
    assert torch.equal(_mask_file(tmp_path, "rgba.png", Image.fromarray(rgba, "RGBA")), torch.from_numpy(label > 0).float())
    la = np.stack([label, opaque], axis=-1)
    assert torch.equal(_mask_file(tmp_path, "la.png", Image.fromarray(la, "LA")), torch.from_numpy(label > 0).float())
    # Palette masks are read through their colours, not their indices:
    palette = Image.fromarray((label > 0).astype(np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)  # index 0 black, index 1 red
    assert torch.equal(_mask_file(tmp_path, "p.png", palette), torch.from_numpy(label > 0).float())
    swapped = Image.fromarray((label == 0).astype(np.uint8), "P")
    swapped.putpalette([255, 255, 255, 0, 0, 0] + [0, 0, 0] * 254)  # index 0 white (anomalous), 1 black
    assert torch.equal(_mask_file(tmp_path, "q.png", swapped), torch.from_numpy(label > 0).float())
