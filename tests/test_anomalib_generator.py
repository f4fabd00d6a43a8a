"""sia.anomalib.SiaAnomalyGenerator keeps anomalib's generator contract; use_sia swaps it into real models."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sia.anomalib import SiaAnomalyGenerator, use_sia
from sia.errors import InputError


@pytest.fixture()
def textures(tmp_path):
    folder = tmp_path / "textures"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"texture_{i}.png")
    return folder


def images(batch=4, size=32, seed=0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 0.5 + 0.25


@pytest.mark.parametrize("source", ["cutpaste", "dtd"])
def test_single_and_batched_calls_return_anomalib_shapes_dtypes_and_ranges(source, textures):
    spec = "cutpaste" if source == "cutpaste" else f"dtd:{textures}"
    generator = SiaAnomalyGenerator(spec, probability=1.0, seed=0)
    batch = images()
    augmented, masks = generator(batch)
    assert augmented.shape == batch.shape and masks.shape == (4, 1, 32, 32)
    assert augmented.dtype == masks.dtype == torch.float32
    assert 0.0 <= float(augmented.min()) and float(augmented.max()) <= 1.0
    assert set(masks.unique().tolist()) <= {0.0, 1.0} and bool((masks.flatten(1).amax(dim=1) == 1).all())
    outside = masks.expand_as(batch) == 0
    torch.testing.assert_close(augmented[outside], batch[outside])  # untouched outside the mask
    assert not torch.allclose(augmented, batch)

    single, mask = generator(batch[0].double())
    assert single.shape == (3, 32, 32) and mask.shape == (1, 32, 32)
    assert single.dtype == mask.dtype == torch.float64  # dtype of the input, as anomalib's generator


def test_same_shapes_as_anomalibs_own_generator(textures):
    generators = pytest.importorskip("anomalib.data.utils.generators")
    stock = generators.PerlinAnomalyGenerator(anomaly_source_path=textures, probability=1.0)
    ours = SiaAnomalyGenerator(f"dtd:{textures}", probability=1.0, seed=0)
    for inputs in (images(), images()[0]):
        theirs, their_mask = stock(inputs)
        mine, my_mask = ours(inputs)
        assert (mine.shape, my_mask.shape, mine.dtype, my_mask.dtype) == (
            theirs.shape, their_mask.shape, theirs.dtype, their_mask.dtype)


def test_probability_sets_the_share_of_anomalous_images():
    batch = images(batch=64, size=32)
    assert not SiaAnomalyGenerator(probability=0.0, seed=0)(batch)[1].any()
    assert torch.equal(SiaAnomalyGenerator(probability=0.0, seed=0)(batch)[0], batch)
    assert bool(SiaAnomalyGenerator(probability=1.0, seed=0)(batch)[1].flatten(1).any(dim=1).all())
    half = SiaAnomalyGenerator(probability=0.5, seed=0)
    share = float(half(batch)[1].flatten(1).any(dim=1).float().mean())
    assert 0.3 <= share <= 0.7
    assert half.probability == 0.5


def test_same_seed_same_sequence_of_anomalies_other_seed_other():
    batch = images()
    first, second = SiaAnomalyGenerator(probability=1.0, seed=3), SiaAnomalyGenerator(probability=1.0, seed=3)
    calls_first = [first(batch) for _ in range(2)]
    calls_second = [second(batch) for _ in range(2)]
    for (a, m), (b, n) in zip(calls_first, calls_second):
        assert torch.equal(a, b) and torch.equal(m, n)
    assert not torch.equal(calls_first[0][1], calls_first[1][1])  # the sequence moves on
    other = SiaAnomalyGenerator(probability=1.0, seed=4)(batch)
    assert not torch.equal(other[1], calls_first[0][1])
    from_generator = SiaAnomalyGenerator(probability=1.0, seed=torch.Generator().manual_seed(3))(batch)
    assert torch.equal(from_generator[0], calls_first[0][0])


def test_foreground_preset_keeps_anomalies_on_the_object():
    batch = torch.zeros(8, 3, 32, 32)
    batch[:, :, 8:24, 8:24] = 0.9  # a bright object on a black background
    generator = SiaAnomalyGenerator("cutpaste", category="auto", probability=1.0, seed=0)
    _, masks = generator(batch)
    assert masks.any()
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[8:24, 8:24] = False
    assert not masks[:, 0, outside].any()


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (torch.rand(32, 32), r"shape \(32, 32\)"),
        (torch.rand(2, 1, 32, 32), r"shape \(2, 1, 32, 32\)"),
        (torch.full((2, 3, 32, 32), 255.0), r"values in \[255, 255\] with shape \(2, 3, 32, 32\)"),
        (torch.full((3, 32, 32), -0.5), r"with shape \(3, 32, 32\)"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), r"dtype torch.uint8 with shape \(2, 3, 32, 32\)"),
        (np.zeros((3, 32, 32), np.float32), "ndarray"),
    ],
)
def test_bad_images_are_one_line_errors_with_the_shape(bad, expected):
    generator = SiaAnomalyGenerator(seed=0)
    with pytest.raises(InputError, match=expected) as info:
        generator(bad)
    assert "\n" not in str(info.value)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(InputError, match="probability"):
        SiaAnomalyGenerator(probability=1.5)
    with pytest.raises(InputError, match="seed"):
        SiaAnomalyGenerator(seed="zero")


def test_use_sia_swaps_draems_augmenter_and_keeps_its_probability(textures):
    models = pytest.importorskip("anomalib.models")
    model = models.Draem(dtd_dir=str(textures))
    assert type(model.augmenter).__name__ == "PerlinAnomalyGenerator"
    assert use_sia(model, source=f"dtd:{textures}", category="none", seed=0) is model
    assert isinstance(model.augmenter, SiaAnomalyGenerator) and model.augmenter.probability == 0.5
    augmented, masks = model.augmenter(images())
    assert augmented.shape == (4, 3, 32, 32) and masks.shape == (4, 1, 32, 32)
    use_sia(model, source="cutpaste", probability=1.0, seed=1)  # again: replaces the sia generator
    assert model.augmenter.probability == 1.0 and model.augmenter.synthesizer.source.name == "cutpaste"


def test_use_sia_finds_generators_under_other_names(textures):
    generators = pytest.importorskip("anomalib.data.utils.generators")

    class Inner(torch.nn.Module):  # GLASS keeps its generator on the torch model, as `augmentor`
        def __init__(self):
            super().__init__()
            self.augmentor = generators.PerlinAnomalyGenerator(probability=1.0)

    class Outer(torch.nn.Module):  # DSR keeps it on the lightning module, as `perlin_generator`
        def __init__(self):
            super().__init__()
            self.perlin_generator = generators.PerlinAnomalyGenerator()
            self.model = Inner()

    model = use_sia(Outer(), source="cutpaste", seed=0)
    assert isinstance(model.perlin_generator, SiaAnomalyGenerator) and model.perlin_generator.probability == 0.5
    assert isinstance(model.model.augmentor, SiaAnomalyGenerator) and model.model.augmentor.probability == 1.0
    # two generators get different (still seeded) random sequences
    batch = images()
    model.perlin_generator.probability = 1.0
    assert not torch.equal(model.perlin_generator(batch)[1], model.model.augmentor(batch)[1])


def test_use_sia_on_dsr_replaces_its_perlin_generator():
    models = pytest.importorskip("anomalib.models")
    model = use_sia(models.Dsr(), source="cutpaste", seed=0)
    assert isinstance(model.perlin_generator, SiaAnomalyGenerator)


def test_use_sia_on_a_model_without_a_generator_names_the_model_class():
    pytest.importorskip("anomalib")

    class Padim(torch.nn.Module):
        pass

    with pytest.raises(InputError, match="model: Padim has no anomaly generator") as info:
        use_sia(Padim())
    assert "\n" not in str(info.value)


def test_use_sia_without_anomalib_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "anomalib" or m.startswith("anomalib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "anomalib", None)  # what an environment without the extra sees
    with pytest.raises(InputError, match=r'pip install "sia\[anomalib\]"') as info:
        use_sia(torch.nn.Linear(2, 2))
    assert "\n" not in str(info.value)


def test_import_sia_and_the_generator_never_import_anomalib_or_lightning():
    code = (
        "import sys, sia\n"
        "from sia.anomalib import SiaAnomalyGenerator\n"
        "import torch\n"
        "SiaAnomalyGenerator(seed=0)(torch.rand(3, 32, 32))\n"
        "print(sorted(m for m in ('anomalib', 'lightning', 'pytorch_lightning') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
