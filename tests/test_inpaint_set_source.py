"""A pre-generated in-context SDAS set as an anomaly source, and options on the sdas-inpaint: spec."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from sia.errors import InputError
from sia.generate_inpaint import generate_inpainted_dataset
from sia.images import load_image_tensor
from sia.inpaint_set_source import InpaintedSetSource
from sia.inpaint_source import InpaintSDASSource, parse_spec_options
from sia.pipeline import SDASPipeline
from sia.sources import make_source
from sia.synthesizer import AnomalySynthesizer

SIZE = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    SDASPipeline.from_unet_preset("tiny-32", ["cable"], sample_size=SIZE).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def normal_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("normal")
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    for i, name in enumerate(("a", "b", "c")):  # smooth and clearly different images, as products are
        rgb = np.stack([np.sin(3 * xs + i), np.cos(2 * ys * (i + 1)), (xs + ys) / 2 * (i + 1) / 3], axis=-1)
        PIL.Image.fromarray(((rgb * 0.4 + 0.5).clip(0, 1) * 255).astype(np.uint8)).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def painted_set(model_dir, normal_dir, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("set") / "painted"
    generate_inpainted_dataset(model_dir, output, normal_dir, category="cable", num_images=6, strength=0.3, seed=1,
                               batch_size=3, steps=2, progress=False)
    return output


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_a_target_receives_a_defect_painted_into_that_very_image(painted_set, normal_dir):
    source = make_source(f"sdas-inpaint:{painted_set}")
    assert isinstance(source, InpaintedSetSource)
    records = _records(painted_set)
    targets = torch.stack([load_image_tensor(normal_dir / name) for name in ("a.png", "b.png", "c.png")])
    out, masks = source.paint_batch(targets, torch.zeros(3, 1, SIZE, SIZE, dtype=torch.bool), torch.Generator().manual_seed(0))
    assert source.matched_fraction == 1.0
    for row, name in enumerate(("a.png", "b.png", "c.png")):
        stored = [r for r in records if r["source_image"] == name]
        candidates = [load_image_tensor(painted_set / r["file_name"]) for r in stored]
        assert any(torch.equal(out[row], c) for c in candidates)  # exactly one of its own painted samples
        assert bool(masks[row].any())
        outside = ~masks[row].expand(3, -1, -1)
        assert torch.equal(out[row][outside], targets[row][outside])


def test_an_unknown_target_gets_a_pasted_defect_under_its_stored_mask(painted_set):
    source = InpaintedSetSource(painted_set)
    target = torch.full((1, 3, 32, 32), 0.9)  # another image, at another size
    out, masks = source.paint_batch(target, torch.zeros(1, 1, 32, 32, dtype=torch.bool), torch.Generator().manual_seed(0))
    assert source.matched_fraction == 0.0
    assert masks.shape == (1, 1, 32, 32) and bool(masks.any())
    outside = ~masks.expand(-1, 3, -1, -1)
    assert torch.equal(out[outside], target[outside]) and not torch.equal(out, target)


def test_synthesizer_with_the_set_is_seeded_and_unblended(painted_set, normal_dir):
    synth = AnomalySynthesizer(f"sdas-inpaint:{painted_set}", category="none")
    targets = torch.stack([load_image_tensor(normal_dir / "a.png")] * 2)
    first = synth.synthesize_batch(targets, torch.Generator().manual_seed(5), return_opacity=True)
    again = synth.synthesize_batch(targets, torch.Generator().manual_seed(5), return_opacity=True)
    torch.testing.assert_close(first[0], again[0])
    assert torch.equal(first[2], torch.ones(2))
    changed = (first[0] - targets).abs().amax(dim=1, keepdim=True) > 0
    assert not bool((changed & (first[1] == 0)).any())


def test_spec_options_reach_the_on_the_fly_source(model_dir):
    source = make_source(f"sdas-inpaint:{model_dir}?steps=3&strength=0.1,0.4&denoising_strength=0.6&resamples=1")
    assert isinstance(source, InpaintSDASSource)
    assert source.settings["num_inference_steps"] == 3 and source.settings["denoising_strength"] == 0.6
    assert source.settings["resamples"] == 1 and source.strength == (0.1, 0.4)
    assert parse_spec_options("m?mask_feather=2") == ("m", {"mask_feather": 2})


@pytest.mark.parametrize(
    "suffix, message",
    [("?speed=3", "unknown option 'speed'"), ("?steps=many", "option steps expects an integer, got 'many'")],
)
def test_bad_spec_options_are_one_line_errors(model_dir, suffix, message):
    with pytest.raises(InputError, match=message):
        make_source(f"sdas-inpaint:{model_dir}{suffix}")


def test_bad_sets_are_one_line_errors(painted_set, tmp_path):
    with pytest.raises(InputError, match="a pre-generated set takes no options"):
        make_source(f"sdas-inpaint:{painted_set}?steps=2")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metadata.jsonl").write_text(json.dumps({"file_name": "../x.png", "mask_file_name": "m.png"}) + "\n")
    with pytest.raises(InputError, match="points outside"):
        InpaintedSetSource(broken)
    with pytest.raises(InputError, match="not a set written by `sia generate --images`"):
        InpaintedSetSource(tmp_path)
