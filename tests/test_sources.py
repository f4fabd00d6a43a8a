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
    with pytest.raises(InputError, match="empty"):
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


def test_each_augmentation_keeps_shape_and_range_and_three_distinct_ops_are_used(monkeypatch):
    assert len(DTD_AUGMENTATIONS) == 10
    image = torch.rand(3, 20, 28, generator=torch.Generator().manual_seed(0))
    for name, op in DTD_AUGMENTATIONS:
        out = op(image, torch.Generator().manual_seed(1))
        assert out.shape == image.shape, name
        assert out.min() >= 0 and out.max() <= 1 + 1e-6, name
    assert torch.allclose(dict(DTD_AUGMENTATIONS)["invert"](image, None), 1 - image)
    import sia.sources as sources

    used = []
    wrapped = tuple((name, (lambda n, f: lambda img, g: used.append(n) or f(img, g))(name, f)) for name, f in DTD_AUGMENTATIONS)
    monkeypatch.setattr(sources, "DTD_AUGMENTATIONS", wrapped)
    rand_augment(image, torch.Generator().manual_seed(3))
    assert len(used) == 3 and len(set(used)) == 3


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
