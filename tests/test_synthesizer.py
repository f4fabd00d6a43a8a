"""AnomalySynthesizer and SyntheticAnomalyDataset: any input, reproducible, correct ratio."""

import numpy as np
import pytest
import torch
from PIL import Image

from sia.errors import InputError
from sia.synthesizer import AnomalySynthesizer, SynthesisResult, SyntheticAnomalyDataset, as_image_tensor, item_seed


@pytest.fixture()
def sia_folder(tmp_path):
    folder = tmp_path / "sia"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def normal_image(height=48, width=64, seed=0):
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed)) * 0.5


def test_result_shapes_binary_mask_and_untouched_outside(sia_folder):
    synth = AnomalySynthesizer(sia_folder, category="none", require_nonempty=True)
    image = normal_image()
    result = synth(image, seed=3)
    assert isinstance(result, SynthesisResult)
    assert result.image.shape == (3, 48, 64) and result.mask.shape == (1, 48, 64)
    assert set(result.mask.unique().tolist()) == {0.0, 1.0}
    outside = (result.mask == 0).expand_as(image)
    assert torch.equal(result.image[outside], image[outside])
    assert not torch.equal(result.image, image)
    assert 0.5 <= result.opacity <= 1.0 and result.seed == 3 and result.source.startswith("sia:")


def test_same_seed_same_result_different_seed_different(sia_folder):
    synth = AnomalySynthesizer(f"sia:{sia_folder}", category="auto")
    a, b, c = synth(normal_image(), seed=7), synth(normal_image(), seed=7), synth(normal_image(), seed=8)
    assert torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask) and a.opacity == b.opacity
    assert not (torch.equal(a.mask, c.mask) and torch.equal(a.image, c.image))
    drawn = synth(normal_image())
    again = synth(normal_image(), seed=drawn.seed)
    assert torch.equal(drawn.image, again.image)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "RGB"])
def test_any_image_mode_size_and_path_input(sia_folder, tmp_path, mode):
    rng = np.random.default_rng(1)
    if mode == "I;16":
        pil = Image.fromarray(rng.integers(0, 65535, (30, 50), dtype=np.uint16))
    else:
        pil = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / "normal.png"
    pil.save(path)
    synth = AnomalySynthesizer(sia_folder, category="bottle")
    for image in (pil, path, str(path), np.asarray(pil.convert("RGB"))):
        result = synth(image, seed=0)
        assert result.image.shape == (3, 30, 50) and result.mask.shape == (1, 30, 50)
    resized = AnomalySynthesizer(sia_folder, category="bottle", image_size=(32, 40))(pil, seed=0)
    assert resized.image.shape == (3, 32, 40)


def test_require_nonempty_redraws_while_default_allows_empty_masks(sia_folder):
    images = torch.stack([normal_image(32, 32, s) for s in range(4)]).repeat(75, 1, 1, 1)  # 300 images
    _, masks = AnomalySynthesizer(sia_folder).synthesize_batch(images, torch.Generator().manual_seed(0))
    assert (masks.flatten(1).amax(1) == 0).sum() > 0  # official behaviour: some empty masks
    _, masks = AnomalySynthesizer(sia_folder, require_nonempty=True).synthesize_batch(images, torch.Generator().manual_seed(0))
    assert (masks.flatten(1).amax(1) > 0).all()


def test_batch_path_is_seeded_and_probability_controls_the_ratio(sia_folder):
    synth = AnomalySynthesizer("cutpaste", category="none")
    images = torch.stack([normal_image(32, 40, s) for s in range(8)])
    a = synth.synthesize_batch(images, torch.Generator().manual_seed(1))
    b = synth.synthesize_batch(images, torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[1].shape == (8, 1, 32, 40)
    out, masks = synth.synthesize_batch(images, probability=0.0)
    assert torch.equal(out, images) and masks.sum() == 0
    out, masks, opacity = synth.synthesize_batch(images.repeat(50, 1, 1, 1), torch.Generator().manual_seed(2),
                                                 probability=0.5, return_opacity=True)
    touched = (opacity > 0).float().mean().item()
    assert 0.4 < touched < 0.6


def test_bad_inputs_raise_one_line_input_errors(sia_folder, tmp_path):
    with pytest.raises(InputError, match="mvtec-ad/bottle"):
        AnomalySynthesizer(sia_folder, category="bottel")
    with pytest.raises(InputError, match="opacity"):
        AnomalySynthesizer(sia_folder, opacity=(0.5, 1.5))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no images found"):
        AnomalySynthesizer(empty)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(InputError, match="corrupt.jpg") as err:
        AnomalySynthesizer(sia_folder)(corrupt)
    assert "\n" not in str(err.value)
    truncated = tmp_path / "truncated.png"
    data = (tmp_path / "full.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(data)
    truncated.write_bytes(data.read_bytes()[:60])
    with pytest.raises(InputError, match="truncated.png"):
        AnomalySynthesizer(sia_folder)(truncated)


class NormalImages(torch.utils.data.Dataset):
    def __init__(self, n=200, kind="dict"):
        self.n, self.kind = n, kind

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        image = normal_image(24, 24, i % 5)
        if self.kind == "dict":
            return {"image": image, "label": 0, "path": f"img{i}.png"}
        if self.kind == "tuple":
            return image, 0
        return Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8))


def test_dataset_ratio_determinism_and_epochs(sia_folder):
    dataset = SyntheticAnomalyDataset(NormalImages(400), AnomalySynthesizer(sia_folder), probability=0.3, seed=1)
    items = [dataset[i] for i in range(len(dataset))]
    ratio = np.mean([item["is_synthetic"] for item in items])
    assert abs(ratio - 0.3) < 0.07  # ~3 binomial standard deviations
    again = dataset[17]
    assert torch.equal(again["image"], items[17]["image"]) and again["is_synthetic"] == items[17]["is_synthetic"]
    dataset.set_epoch(1)
    flags = [dataset[i]["is_synthetic"] for i in range(100)]
    assert flags != [item["is_synthetic"] for item in items[:100]]
    for item in items[:40]:
        assert set(item) >= {"image", "clean_image", "mask", "is_synthetic", "opacity", "source", "label", "path"}
        if not item["is_synthetic"]:
            assert torch.equal(item["image"], item["clean_image"]) and item["mask"].sum() == 0 and item["source"] == "none"
        else:
            assert 0.5 <= item["opacity"] <= 1.0
    assert item_seed(0, 1, 0) != item_seed(0, 0, 1)


@pytest.mark.parametrize("kind", ["tuple", "pil"])
def test_dataset_accepts_tuples_and_pil_and_collates(sia_folder, kind):
    dataset = SyntheticAnomalyDataset(NormalImages(8, kind), AnomalySynthesizer(sia_folder), probability=1.0)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 3, 24, 24) and batch["mask"].shape == (4, 1, 24, 24)
    assert batch["is_synthetic"].all()


def test_float_tensors_must_be_finite_and_in_unit_range(sia_folder):
    image = normal_image()
    assert torch.equal(as_image_tensor(image), image)
    assert as_image_tensor(image * 0 + 1.0005).max() == 1.0  # rounding overshoot is tolerated
    synth = AnomalySynthesizer(sia_folder)
    with pytest.raises(InputError, match=r"expected floats in \[0, 1\], got values in \[0\.0\d+, 127\.\d+\]"):
        synth(image * 255, seed=0)  # a 0..255 float image is not silently turned white
    with pytest.raises(InputError, match="NaN"):
        synth(torch.where(image > 0.4, torch.nan, image), seed=0)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        as_image_tensor(image - 0.1)


def test_dataset_indexing_follows_python_rules(sia_folder):
    dataset = SyntheticAnomalyDataset(NormalImages(6), AnomalySynthesizer(sia_folder), probability=1.0, seed=3)
    last, also_last = dataset[-1], dataset[5]
    assert torch.equal(last["image"], also_last["image"]) and last["path"] == "img5.png"
    assert dataset[-6]["path"] == "img0.png"
    for bad in (6, -7):
        with pytest.raises(IndexError, match="out of range"):
            dataset[bad]
    assert len(list(dataset)) == 6  # iteration stops at the end via IndexError


def test_image_size_must_be_positive(sia_folder):
    for bad in (0, -3, (0, 8), (8,), (8, 8, 8), 2.5, True):
        with pytest.raises(InputError, match="image_size"):
            SyntheticAnomalyDataset(NormalImages(2), AnomalySynthesizer(sia_folder), image_size=bad)
        with pytest.raises(InputError, match="image_size"):
            AnomalySynthesizer(sia_folder, image_size=bad)
    assert SyntheticAnomalyDataset(NormalImages(2), AnomalySynthesizer(sia_folder), image_size=16)[0]["image"].shape == (3, 16, 16)


def test_mask_shape_reaches_the_masks_and_redraws_keep_it(sia_folder):
    images = torch.stack([normal_image(64, 64, s) for s in range(4)]).repeat(8, 1, 1, 1)
    default = AnomalySynthesizer(sia_folder).masks(images, torch.Generator().manual_seed(0))
    blobs = AnomalySynthesizer(sia_folder, mask_shape="perlin").masks(images, torch.Generator().manual_seed(0))
    assert torch.equal(default, blobs)
    synth = AnomalySynthesizer(sia_folder, mask_shape="cracks", require_nonempty=True)
    assert "mask_shape='cracks'" in repr(synth) and "mask_shape=" not in repr(AnomalySynthesizer(sia_folder))
    cracks = synth.masks(images, torch.Generator().manual_seed(0))
    assert (cracks.flatten(1).amax(1) > 0).all()
    assert cracks.mean() < 0.5 * default.mean()  # thin lines cover far less than blobs
    assert torch.equal(cracks, synth.masks(images, torch.Generator().manual_seed(0)))
    with pytest.raises(InputError, match="mask_shape"):
        AnomalySynthesizer(sia_folder, mask_shape="blobs")
