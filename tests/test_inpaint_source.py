"""The in-context SDAS source: AnomalySynthesizer paints the defect under its own mask (spec sdas-inpaint:MODEL)."""

from __future__ import annotations

import pytest
import torch

from sia.errors import InputError
from sia.inpaint_source import InpaintSDASSource
from sia.pipeline import SDASPipeline
from sia.sources import make_source
from sia.synthesizer import AnomalySynthesizer, SyntheticAnomalyDataset


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sdas") / "pipeline"
    SDASPipeline.from_unet_preset("tiny-32", ["bottle", "cable"], sample_size=16).save_pretrained(folder)
    return folder


def _targets(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", [16, 32])  # the model's size, and one it has to be resized to
def test_synthesizer_paints_inside_its_mask_only(model_dir, size):
    source = make_source(f"sdas-inpaint:{model_dir}", category="bottle")
    source.settings["num_inference_steps"] = 3
    assert isinstance(source, InpaintSDASSource) and source.name.endswith("[bottle]")
    synth = AnomalySynthesizer(source, category="none", require_nonempty=True)
    targets = _targets(3, size)
    out, masks, opacity = synth.synthesize_batch(targets, torch.Generator().manual_seed(0), return_opacity=True)
    inside = masks.bool().expand(-1, 3, -1, -1)
    assert bool(masks.flatten(1).any(dim=1).all()) and torch.equal(opacity, torch.ones(3))
    assert torch.equal(out[~inside], targets[~inside])
    assert (out[inside] - targets[inside]).abs().mean() > 0.01
    again = synth.synthesize_batch(targets, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again[0], out)


def test_empty_or_full_masks_leave_the_image_unchanged_and_unmarked(model_dir):
    source = InpaintSDASSource(model_dir, category="cable", steps=2)
    targets = _targets(3, 16, seed=1)
    masks = torch.zeros(3, 1, 16, 16, dtype=torch.bool)
    masks[1, :, 4:9, 4:9] = True
    masks[2] = True
    images, used = source.paint_batch(targets, masks, torch.Generator().manual_seed(0))
    assert torch.equal(images[0], targets[0]) and torch.equal(images[2], targets[2])
    assert not bool(used[0].any()) and not bool(used[2].any()) and torch.equal(used[1], masks[1])
    assert not torch.equal(images[1], targets[1])


def test_dataset_items_carry_the_painted_mask(model_dir):
    source = InpaintSDASSource(model_dir, category="bottle", steps=2, strength=0.2)
    data = SyntheticAnomalyDataset(list(_targets(2, 16, seed=2)), AnomalySynthesizer(source, require_nonempty=True),
                                   probability=1.0, seed=0)
    item = data[1]
    changed = (item["image"] - item["clean_image"]).abs().amax(dim=0, keepdim=True) > 0
    assert item["is_synthetic"] and item["source"] == source.name
    assert bool(changed.any()) and not bool((changed & (item["mask"] == 0)).any())


def test_bad_source_specs(model_dir, tmp_path):
    with pytest.raises(InputError, match="the model knows several categories"):
        make_source(f"sdas-inpaint:{model_dir}")
    with pytest.raises(InputError, match="unknown category 'screw'"):
        make_source(f"sdas-inpaint:{model_dir}", category="screw")
    with pytest.raises(InputError, match="^source sdas-inpaint:.*not a saved SDAS pipeline"):
        make_source(f"sdas-inpaint:{tmp_path / 'missing'}", category="bottle")


def test_realnet_trains_with_the_in_context_source(model_dir, tmp_path):
    import json

    from test_training import TINY_MODEL, make_dataset

    from realnet.training import TrainingConfig, train

    make_dataset(tmp_path / "data" / "widget", n_train=4, n_good=2, n_bad=2, size=32)
    config = TrainingConfig(
        data=str(tmp_path / "data"), output=str(tmp_path / "run"), source=f"sdas-inpaint:{model_dir}",
        dataset="mvtec-ad", categories=["widget"], recipe="fast", backbone="resnet18", image_size=32, iterations=1,
        batch_size=2, afs_batches=1, model_kwargs=dict(TINY_MODEL), validation_fraction=0.0, checkpoint_every=0,
        progress=False, cpu=True, log_every=1)
    with pytest.raises(InputError, match="the model knows several categories"):
        train(config)  # widget is no category of this two-category model
    single = tmp_path / "single"
    torch.manual_seed(0)
    SDASPipeline.from_unet_preset("tiny-32", ["widget"], sample_size=16).save_pretrained(single)
    config.source, config.overwrite = f"sdas-inpaint:{single}", True
    train(config)
    run = json.loads((tmp_path / "run" / "config.json").read_text())
    assert run["status"] == "finished" and run["training"]["source"] == f"sdas-inpaint:{single}"
