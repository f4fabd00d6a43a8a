"""SDASInpaintPipeline (in-context SDAS): exact outside, strength inside, seeding, batching, samplers, bad input."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import UNet2DModel

from sia.errors import InputError
from sia.inpaint import SDASInpaintPipeline, feather_weights
from sia.pipeline import SDASPipeline
from sia.scheduler import make_scheduler
from sia.unets import unet_config

CATEGORIES = ["bottle", "cable"]
SIZE = 16


@pytest.fixture(scope="module")
def pipe() -> SDASInpaintPipeline:
    torch.manual_seed(0)
    pipeline = SDASInpaintPipeline.from_unet_preset("tiny-32", CATEGORIES, sample_size=SIZE)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _gens(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _masks(n: int) -> torch.Tensor:
    masks = torch.zeros(n, 1, SIZE, SIZE)
    for i in range(n):
        masks[i, :, 3 + i:9 + i, 4:12] = 1
    return masks


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_outside_the_mask_the_output_is_the_input(pipe, sampler):
    pipe.use_sampler(sampler)
    images, masks = _images(3), _masks(3)
    out = pipe(images, masks, category="bottle", strength=0.3, num_inference_steps=4, resamples=1,
               mask_dilation=1, mask_feather=2, generator=_gens(0, 3), output_type="pt")
    used = out.masks.bool().expand(-1, 3, -1, -1)
    assert bool((out.masks >= masks).all()) and out.masks.sum() > masks.sum()  # dilation grew them
    assert torch.equal(out.images[~used], images[~used])  # a composite copy of the same values
    assert (out.images[used] - images[used]).abs().mean() > 0.01
    pipe.use_sampler("ddpm")


def test_uint8_inputs_come_back_unchanged_outside_in_pil_output(pipe):
    rng = np.random.default_rng(0)
    photo = PIL.Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[5:11, 2:9] = 255
    out = pipe(photo, PIL.Image.fromarray(mask), category="cable", num_inference_steps=3,
               generator=torch.Generator().manual_seed(1))
    result, inside = np.asarray(out.images[0]), mask > 0
    assert np.array_equal(result[~inside], np.asarray(photo)[~inside])
    assert not np.array_equal(result[inside], np.asarray(photo)[inside])
    assert np.array_equal(np.asarray(out.masks[0]), mask)


@pytest.mark.parametrize("sampler,strengths", [("ddpm", (0.1, 0.3, 1.0)), ("ddim", (0.01, 0.05, 0.3))])
def test_inside_change_grows_with_strength(pipe, sampler, strengths):
    pipe.use_sampler(sampler)
    images, masks = _images(4, seed=2), _masks(4)

    def run(s: float) -> torch.Tensor:
        return pipe(images, masks, category="bottle", strength=s, num_inference_steps=4, denoising_strength=1.0,
                    generator=_gens(5, 4), output_type="pt").images

    normal = run(0.0)
    distances = [(run(s) - normal).abs().mean().item() for s in strengths]
    pipe.use_sampler("ddpm")
    assert 0 < distances[0] < distances[1] < distances[2]


def test_same_seed_same_output_and_batch_independence(pipe):
    images, masks = _images(3, seed=3), _masks(3)
    kwargs = dict(category=["bottle", "cable", "bottle"], strength=(0.1, 0.3), num_inference_steps=3, resamples=1,
                  output_type="pt")
    together = pipe(images, masks, generator=_gens(10, 3), batch_size=3, **kwargs)
    again = pipe(images, masks, generator=_gens(10, 3), batch_size=3, **kwargs)
    one_by_one = pipe(images, masks, generator=_gens(10, 3), batch_size=1, **kwargs)
    torch.testing.assert_close(together.images, again.images)
    torch.testing.assert_close(together.images, one_by_one.images, atol=1e-5, rtol=0)
    assert together.strengths == one_by_one.strengths and len(set(together.strengths)) == 3
    alone = pipe(images[2], masks[2], category="bottle", strength=(0.1, 0.3), num_inference_steps=3, resamples=1,
                 generator=_gens(12, 1), output_type="pt")
    torch.testing.assert_close(alone.images[0], together.images[2], atol=1e-5, rtol=0)
    other = pipe(images, masks, generator=_gens(20, 3), **kwargs)
    assert not torch.allclose(other.images, together.images)


def test_start_timestep_equals_the_matching_denoising_strength(pipe):
    images, masks = _images(2, seed=4), _masks(2)
    pipe.scheduler.set_timesteps(4)
    third = int(pipe.scheduler.timesteps[2])
    kwargs = dict(category="cable", strength=0.2, num_inference_steps=4, output_type="pt")
    by_fraction = pipe(images, masks, denoising_strength=0.5, generator=_gens(1, 2), **kwargs)
    by_step = pipe(images, masks, start_timestep=third, generator=_gens(1, 2), **kwargs)
    deeper = pipe(images, masks, denoising_strength=1.0, generator=_gens(1, 2), **kwargs)
    torch.testing.assert_close(by_fraction.images, by_step.images)
    assert not torch.allclose(by_fraction.images, deeper.images)


def test_feather_weights_fall_off_inside_the_mask_only():
    mask = torch.zeros(1, 1, 12, 12, dtype=torch.bool)
    mask[..., 2:10, 2:10] = True
    weights = feather_weights(mask, 3)
    assert bool((weights[~mask] == 0).all())
    assert weights[0, 0, 2, 5] == pytest.approx(1 / 3) and weights[0, 0, 3, 5] == pytest.approx(2 / 3)
    assert weights[0, 0, 5, 5] == 1.0
    assert torch.equal(feather_weights(mask, 0), mask.float())


def test_saved_sdas_pipeline_loads_as_inpaint_pipeline(pipe, tmp_path):
    plain = SDASPipeline(unet=pipe.unet, scheduler=make_scheduler("ddpm"), categories=CATEGORIES)
    plain.save_pretrained(tmp_path / "sdas")
    loaded = SDASInpaintPipeline.from_pretrained(tmp_path / "sdas")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.categories == CATEGORIES
    kwargs = dict(category="cable", num_inference_steps=2, output_type="pt")
    torch.testing.assert_close(loaded(_images(1), _masks(1), generator=_gens(0, 1), **kwargs).images,
                               pipe(_images(1), _masks(1), generator=_gens(0, 1), **kwargs).images)


def test_model_without_class_conditioning():
    config = unet_config("tiny-32", num_classes=1, sample_size=SIZE)
    config.pop("num_class_embeds")
    torch.manual_seed(0)
    unconditioned = SDASInpaintPipeline(unet=UNet2DModel(**config), scheduler=make_scheduler("ddim"))
    unconditioned.set_progress_bar_config(disable=True)
    out = unconditioned(_images(1), _masks(1), strength=0.02, num_inference_steps=2, output_type="pt")
    assert out.images.shape == (1, 3, SIZE, SIZE)
    with pytest.raises(InputError, match="^category: this model has no class conditioning"):
        unconditioned(_images(1), _masks(1), category="bottle", num_inference_steps=2)


def _bad(pipe, match: str, **overrides):
    kwargs = dict(image=_images(2), mask_image=_masks(2), category="bottle", num_inference_steps=3)
    kwargs.update(overrides)
    with pytest.raises(InputError, match=match) as info:
        pipe(**kwargs)
    assert "\n" not in str(info.value)


def test_bad_inputs_are_one_line_errors_naming_the_parameter(pipe):
    full, empty = torch.ones(2, 1, SIZE, SIZE), _masks(2)
    empty[1] = 0
    _bad(pipe, r"^mask_image 0: size 8x16 differs from the image's 16x16", mask_image=torch.ones(1, 8, SIZE))
    _bad(pipe, "^mask_image 1: the mask is empty", mask_image=empty)
    _bad(pipe, "^mask_image 0: the mask covers the whole image", mask_image=full)
    _bad(pipe, "^mask_dilation 16: mask 0 then covers the whole image", mask_dilation=16)
    _bad(pipe, "^mask_image: got 3 masks for 2 images", mask_image=_masks(3))
    _bad(pipe, "^start_timestep 951 is not a timestep of the 3-step schedule", start_timestep=951)
    _bad(pipe, "^`start_timestep` must be at least 0", start_timestep=-1)
    _bad(pipe, "^pass either start_timestep or denoising_strength", start_timestep=0, denoising_strength=0.5)
    _bad(pipe, r"^denoising_strength must be a number in \(0, 1\]", denoising_strength=1.5)
    _bad(pipe, "^denoising_strength 0.1 leaves no step of 3", denoising_strength=0.1)
    _bad(pipe, "^unknown category 'screw'", category="screw")
    _bad(pipe, "^category: this model knows several categories", category=None)
    _bad(pipe, "^got 1 generators for 2 images", generator=_gens(0, 1))
    _bad(pipe, "^image: size 11x11 must be a multiple of 2", image=torch.rand(2, 3, 11, 11),
         mask_image=torch.ones(11, 11))
    _bad(pipe, r"^image 0: expected floats in \[0, 1\]", image=_images(2) * 255)
    _bad(pipe, "^strength must satisfy", strength=(0.3, 0.1))
    _bad(pipe, "^`resamples` must be at least 0", resamples=-1)
    _bad(pipe, "^`mask_feather` must be a whole number", mask_feather=1.5)
