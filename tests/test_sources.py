"""Anomaly sources: SIA folder / HF dataset, DTD with random augmentation, CutPaste, spec parsing."""

import numpy as np
import pytest
import torch
from PIL import Image

from sia.errors import InputError
from sia.sources import (
    DTD_AUGMENTATIONS,
    CutPasteSource,
    DTDSource,
    SIASource,
    make_source,
    rand_augment,
    sample_batch,
)


def save_images(folder, colors, size=(40, 30), mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, color in enumerate(colors):
        Image.new("RGB", size, color).convert(mode).save(folder / f"{i:02d}.png")
    return folder


def target(height=24, width=36):
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(0))


def test_sia_folder_sample_has_target_size_and_is_seeded(tmp_path):
    folder = save_images(tmp_path / "sia", [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)])
    source = SIASource(folder)
    a = source.sample(target(), torch.Generator().manual_seed(1))
    b = source.sample(target(), torch.Generator().manual_seed(1))
    assert a.shape == (3, 24, 36) and a.dtype == torch.float32
    assert torch.equal(a, b)
    draws = {tuple(source.sample(target(), torch.Generator().manual_seed(s))[:, 0, 0].tolist()) for s in range(30)}
    assert len(draws) == 4  # every image gets drawn, and only those
    batch = sample_batch(source, torch.stack([target()] * 5), torch.Generator().manual_seed(2))
    assert batch.shape == (5, 3, 24, 36) and 0 <= batch.min() and batch.max() <= 1
    assert source.name.startswith("sia:") and source.default_opacity == (0.5, 1.0)


def test_sia_uses_the_category_subfolder(tmp_path):
    save_images(tmp_path / "sia" / "bottle", [(200, 10, 10)])
    save_images(tmp_path / "sia" / "cable", [(10, 200, 10)])
    source = SIASource(tmp_path / "sia", category="mvtec-ad/bottle")
    assert source.sample(target(), torch.Generator().manual_seed(0))[:, 0, 0].tolist() == pytest.approx([200 / 255, 10 / 255, 10 / 255])


def test_a_per_category_folder_without_the_category_is_an_error(tmp_path):
    """SIA images come from the SAME category (another product's defect would be off-class);
    other categories are never mixed in."""
    save_images(tmp_path / "sia" / "bottle", [(200, 10, 10)])
    save_images(tmp_path / "sia" / "cable", [(10, 200, 10)])
    with pytest.raises(InputError, match=r"category 'screw': no SIA images of it in .*sia; present: bottle, cable$"):
        make_source(str(tmp_path / "sia"), category="screw")
    with pytest.raises(InputError, match="present: bottle, cable"):
        SIASource(tmp_path / "sia", category="mvtec-ad/screw")
    save_images(tmp_path / "nested" / "mvtec-ad" / "bottle", [(200, 10, 10)])
    with pytest.raises(InputError, match="present: mvtec-ad/bottle"):
        make_source(str(tmp_path / "nested"), category="cable")
    nested = make_source(str(tmp_path / "nested"), category="bottle")
    assert nested.sample(target(), torch.Generator().manual_seed(0))[0, 0, 0] == pytest.approx(200 / 255)


def test_a_flat_folder_serves_any_category(tmp_path):
    flat = save_images(tmp_path / "mine", [(1, 2, 3), (4, 5, 6)])
    for category in ("screw", "visa/pcb1", None):
        assert len(make_source(str(flat), category=category)) == 2
    own = save_images(tmp_path / "sdas" / "bottle", [(7, 8, 9)])
    assert len(make_source(str(own), category="bottle")) == 1  # the category's own folder


def test_sia_from_hf_dataset_filters_category():
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 255, 0), (255, 0, 0), (0, 0, 255)]]
    ds = datasets.Dataset.from_dict({"image": images, "category": ["bottle", "cable", "bottle", "cable"]})
    ds = ds.cast_column("image", datasets.Image())
    source = make_source(ds, category="bottle")
    for seed in range(10):
        assert source.sample(target(), torch.Generator().manual_seed(seed))[:, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert len(SIASource(ds)) == 4
    with pytest.raises(InputError, match="no images"):
        SIASource(ds, category="zipper")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_sources_convert_any_image_mode(tmp_path, mode):
    folder = tmp_path / mode.replace(";", "")
    folder.mkdir()
    if mode == "I;16":
        Image.fromarray((np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16)).save(folder / "a.png")
    else:
        save_images(folder, [(120, 60, 30)], mode=mode)
    out = SIASource(folder).sample(target(), torch.Generator().manual_seed(0))
    assert out.shape == (3, 24, 36) and 0 <= out.min() and out.max() <= 1


def test_empty_folder_and_corrupt_file_raise_input_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        SIASource(tmp_path / "empty")
    with pytest.raises(InputError):
        DTDSource(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(InputError, match="broken.png"):
        SIASource(bad).sample(target(), torch.Generator().manual_seed(0))


def test_source_cache_decodes_each_image_once(tmp_path, monkeypatch):
    import sia.sources as sources

    folder = save_images(tmp_path / "sia", [(1, 2, 3), (4, 5, 6)])
    calls = []
    real = sources.load_image
    monkeypatch.setattr(sources, "load_image", lambda p: calls.append(p) or real(p))
    source = SIASource(folder)
    for seed in range(20):
        source.sample(target(), torch.Generator().manual_seed(seed))
    assert len(calls) == 2


def test_dtd_source_augments_reproducibly(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "dtd" / "banded"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)).save(folder / f"t{i}.jpg")
    source = make_source(f"dtd:{tmp_path / 'dtd'}")
    assert isinstance(source, DTDSource) and source.default_opacity == (0.2, 1.0)
    a = source.sample(target(), torch.Generator().manual_seed(5))
    b = source.sample(target(), torch.Generator().manual_seed(5))
    c = source.sample(target(), torch.Generator().manual_seed(6))
    assert a.shape == (3, 24, 36) and torch.equal(a, b) and not torch.equal(a, c)
    assert 0 <= a.min() and a.max() <= 1


AUG = dict(DTD_AUGMENTATIONS)


def mid_range_image(low=0.3, high=0.7, height=20, width=28, seed=0):
    return low + (high - low) * torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed))


def test_each_augmentation_keeps_shape_and_range_and_three_distinct_ops_are_used(monkeypatch):
    assert [name for name, _ in DTD_AUGMENTATIONS] == [
        "gamma_contrast", "multiply_add_brightness", "sharpness", "hue_saturation", "solarize",
        "posterize", "invert", "autocontrast", "equalize", "rotate",
    ]
    image = torch.rand(3, 20, 28, generator=torch.Generator().manual_seed(0))
    for name, op in DTD_AUGMENTATIONS:
        out = op(image, torch.Generator().manual_seed(1))
        assert out.shape == image.shape, name
        assert out.min() >= 0 and out.max() <= 1 + 1e-6, name
    import sia.sources as sources

    used = []
    wrapped = tuple((name, (lambda n, f: lambda img, g: used.append(n) or f(img, g))(name, f)) for name, f in DTD_AUGMENTATIONS)
    monkeypatch.setattr(sources, "DTD_AUGMENTATIONS", wrapped)
    rand_augment(image, torch.Generator().manual_seed(3))
    assert len(used) == 3 and len(set(used)) == 3


def test_gamma_contrast_raises_each_channel_to_its_own_power_in_half_to_two():
    image = mid_range_image(0.05, 0.95)
    gammas = []
    for seed in range(10):
        gamma = torch.log(AUG["gamma_contrast"](image, torch.Generator().manual_seed(seed))) / torch.log(image)
        per_channel = gamma.flatten(1)
        assert (per_channel.std(dim=1) < 1e-3).all()  # one exponent per channel
        gammas.append(per_channel.mean(dim=1))
    gammas = torch.stack(gammas)
    assert gammas.min() >= 0.5 - 1e-3 and gammas.max() <= 2.0 + 1e-3
    assert (gammas.std(dim=1) > 0.05).all()  # per_channel=True: the channels differ


def test_brightness_shifts_all_channels_by_an_affine_function_of_luma():
    image = mid_range_image()
    luma = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]
    for seed in range(10):
        delta = AUG["multiply_add_brightness"](image, torch.Generator().manual_seed(seed)) - image
        assert (delta - delta[0]).abs().max() < 1e-5  # the same shift in R, G and B: hue kept
        design = torch.stack([luma.flatten(), torch.ones(luma.numel())], dim=1)
        slope, intercept = torch.linalg.lstsq(design, delta[0].flatten()[:, None]).solution.flatten().tolist()
        assert torch.allclose(design @ torch.tensor([[slope], [intercept]]), delta[0].flatten()[:, None], atol=1e-5)
        assert -0.2 - 1e-4 <= slope <= 0.2 + 1e-4  # mul in [0.8, 1.2]
        assert abs(intercept) <= 30 / 255 + 1e-4  # add in [-30, 30]


def test_sharpness_blends_with_a_smoothed_copy_by_a_factor_in_zero_to_two():
    image = mid_range_image(0.4, 0.6)
    assert torch.equal(AUG["sharpness"](torch.full((3, 12, 12), 0.3), torch.Generator().manual_seed(0)),
                       torch.full((3, 12, 12), 0.3))  # nothing to sharpen on a flat image
    kernel = torch.ones(3, 1, 3, 3)
    kernel[:, :, 1, 1] = 5.0
    smooth = torch.nn.functional.conv2d(image[None], kernel / 13.0, groups=3)[0]
    inner = image[:, 1:-1, 1:-1]
    factors = []
    for seed in range(12):
        out = AUG["sharpness"](image, torch.Generator().manual_seed(seed))
        assert torch.equal(out[:, 0], image[:, 0]) and torch.equal(out[:, :, -1], image[:, :, -1])  # border kept
        keep = (inner - smooth).abs() > 0.02
        factor = ((out[:, 1:-1, 1:-1] - smooth) / (inner - smooth))[keep]
        assert factor.std() < 1e-2  # one factor for the whole image
        factors.append(factor.mean().item())
    assert 0 - 1e-2 <= min(factors) < 1 < max(factors) <= 2 + 1e-2  # both blurs and sharpens


def _hsv_saturation(image):
    value, low = image.amax(dim=0), image.amin(dim=0)
    return (value - low) / value.clamp(min=1e-8)


def test_hue_saturation_keeps_value_and_adds_a_constant_to_saturation():
    image = mid_range_image(0.2, 0.9)
    saturation = _hsv_saturation(image)
    moderate = (saturation > 0.25) & (saturation < 0.7)
    gray = torch.full((3, 6, 6), 0.4)
    for seed in range(8):
        out = AUG["hue_saturation"](image, torch.Generator().manual_seed(seed))
        assert torch.allclose(out.amax(dim=0), image.amax(dim=0), atol=1e-5)  # HSV value is kept
        added = (_hsv_saturation(out) - saturation)[moderate]
        assert added.std() < 1e-3 and added.abs().mean() <= 50 / 255 + 1e-3
        assert not torch.allclose(out, image, atol=1e-3)  # hue and/or saturation moved
        assert torch.allclose(AUG["hue_saturation"](gray, torch.Generator().manual_seed(seed)), gray, atol=1e-6)


def test_solarize_inverts_only_pixels_above_a_threshold_in_32_to_128():
    image = torch.rand(3, 20, 28, generator=torch.Generator().manual_seed(0))
    applied = 0
    for seed in range(20):
        out = AUG["solarize"](image, torch.Generator().manual_seed(seed))
        changed = out != image
        if not changed.any():
            continue
        applied += 1
        assert torch.allclose(out[changed], 1 - image[changed])
        below, above = image[~changed].max().item(), image[changed].min().item()
        assert below < above  # a single threshold separates kept and inverted pixels
        assert above >= 32 / 255 - 1e-6 and below < 128 / 255  # threshold in [32, 128] / 255
    assert 3 <= applied <= 17  # applied about half of the time (p = 0.5)


def test_posterize_keeps_only_the_top_bits():
    image = torch.arange(256.0).reshape(1, 16, 16).expand(3, 16, 16) / 255.0
    seen = set()
    for seed in range(20):
        out = (AUG["posterize"](image, torch.Generator().manual_seed(seed)) * 255).round().long()
        levels = (image * 255).round().long()
        bits = [b for b in range(1, 9) if torch.equal(out, levels & (256 - 2 ** (8 - b)))]
        assert len(bits) == 1
        assert out.unique().numel() == 2 ** bits[0]  # fewer distinct levels
        seen.add(bits[0])
    assert len(seen) >= 4 and min(seen) < 8


def test_invert_maps_x_to_one_minus_x():
    image = torch.rand(3, 20, 28, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(AUG["invert"](image, None), 1 - image)


def test_autocontrast_stretches_each_channel_to_full_range_keeping_order():
    image = mid_range_image(0.3, 0.6, 24, 24)
    image[1] = image[1] * 0.5 + 0.1  # a different range per channel
    for seed in range(6):
        out = AUG["autocontrast"](image, torch.Generator().manual_seed(seed))
        for c in range(3):
            x, y = image[c].flatten(), out[c].flatten()
            assert y.min() == 0 and y.max() == pytest.approx(1.0)
            order = torch.argsort(x)
            assert (y[order].diff() >= -1e-6).all()  # monotonic
            inside = (y > 0) & (y < 1)
            slope = (y[inside].max() - y[inside].min()) / (x[inside].max() - x[inside].min())
            assert slope > 1  # a stretch, not a squeeze
            assert ((y == 0).float().mean() <= 0.21) and ((y == 1).float().mean() <= 0.21)  # cutoff <= 20 %


def test_equalize_flattens_the_histogram():
    skewed = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) ** 3  # mostly dark

    def coarse_histogram(x):
        counts = torch.histc(x, bins=8, min=0, max=1)
        return counts / counts.sum()

    out = AUG["equalize"](skewed, None)
    for c in range(3):
        assert coarse_histogram(skewed[c]).max() > 0.4  # half the pixels in the darkest eighth
        assert (coarse_histogram(out[c]) - 1 / 8).abs().max() < 0.02  # about 1/8 in every eighth
        order = torch.argsort(skewed[c].flatten())
        assert (out[c].flatten()[order].diff() >= 0).all()  # a monotonic remapping


def test_rotate_turns_content_about_the_centre_by_at_most_45_degrees():
    image = torch.zeros(3, 41, 41)
    image[:, 19:22, 31:34] = 1.0  # a blob 12 px right of the centre
    ys, xs = torch.meshgrid(torch.arange(41.0), torch.arange(41.0), indexing="ij")
    angles = []
    for seed in range(10):
        out = AUG["rotate"](image, torch.Generator().manual_seed(seed))[0]
        weight = out.sum()
        dy, dx = (out * ys).sum() / weight - 20, (out * xs).sum() / weight - 20
        assert torch.hypot(dy, dx).item() == pytest.approx(12, abs=0.5)  # moved along a circle
        angles.append(torch.rad2deg(torch.atan2(-dy, dx)).item())
    assert max(abs(a) for a in angles) <= 45.5 and min(angles) < -5 and max(angles) > 5
    ones = AUG["rotate"](torch.ones(3, 41, 41), torch.Generator().manual_seed(0))
    assert ones[:, 20, 20].tolist() == pytest.approx([1, 1, 1]) and ones[:, 0, 0].max() < 1  # zero fill


def test_cutpaste_moves_content_of_the_same_image():
    image = target(32, 40)
    source = CutPasteSource(jitter=0.0)
    out = source.sample(image, torch.Generator().manual_seed(0))
    shifts = [(dy, dx) for dy in range(32) for dx in range(40)
              if torch.equal(torch.roll(image, (dy, dx), dims=(1, 2)), out)]
    assert len(shifts) == 1 and shifts[0] != (0, 0)
    jittered = CutPasteSource().sample(image, torch.Generator().manual_seed(0))
    assert torch.equal(jittered, CutPasteSource().sample(image, torch.Generator().manual_seed(0)))
    with pytest.raises(InputError):
        CutPasteSource(min_shift=0.9)


def test_make_source_parses_specs(tmp_path):
    folder = save_images(tmp_path / "sia", [(1, 2, 3)])
    assert isinstance(make_source("cutpaste"), CutPasteSource)
    assert isinstance(make_source(f"sia:{folder}"), SIASource)
    assert isinstance(make_source(str(folder)), SIASource)
    existing = CutPasteSource()
    assert make_source(existing) is existing
    with pytest.raises(InputError, match="expected 'sia:PATH'"):
        make_source("nonsense-spec")
    with pytest.raises(InputError, match="no such folder"):
        make_source(f"sia:{tmp_path / 'nope'}")
    with pytest.raises(InputError, match="not an existing folder"):
        make_source("sia:not-a-folder-or-repo")
