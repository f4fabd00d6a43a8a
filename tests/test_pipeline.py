"""SDASPipeline: per-image determinism, strength behaviour, categories, outputs and save/load."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDPMScheduler

from sia.errors import InputError
from sia.pipeline import SDASPipeline
from sia.scheduler import SDASDDIMScheduler

CATEGORIES = ["bottle", "cable", "screw"]


@pytest.fixture(scope="module")
def pipe() -> SDASPipeline:
    torch.manual_seed(0)
    pipeline = SDASPipeline.from_unet_preset("tiny-32", CATEGORIES, sample_size=16)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _gens(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_zero_strength_equals_a_plain_ddpm_loop(pipe):
    out = pipe("cable", num_images=2, strength=0.0, num_inference_steps=4,
               generator=torch.Generator().manual_seed(1), output_type="pt")
    stock = DDPMScheduler(variance_type="learned_range")
    stock.set_timesteps(4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=g)
    labels = torch.tensor([1, 1])
    with torch.no_grad():
        for t in stock.timesteps:
            x = stock.step(pipe.unet(x, t, class_labels=labels).sample, t, x, generator=g).prev_sample
    torch.testing.assert_close(out.images, (x / 2 + 0.5).clamp(0, 1))
    assert out.strengths == [0.0, 0.0]


def test_per_image_generators_make_images_independent_of_batch_size(pipe):
    kwargs = dict(category="bottle", num_images=3, strength=(0.1, 0.2), num_inference_steps=3, output_type="pt")
    together = pipe(generator=_gens(10, 3), batch_size=3, **kwargs)
    one_by_one = pipe(generator=_gens(10, 3), batch_size=1, **kwargs)
    torch.testing.assert_close(together.images, one_by_one.images, atol=1e-5, rtol=0)
    assert together.strengths == one_by_one.strengths
    last_alone = pipe("bottle", strength=(0.1, 0.2), num_inference_steps=3, generator=_gens(12, 1), output_type="pt")
    torch.testing.assert_close(last_alone.images[0], together.images[2], atol=1e-5, rtol=0)


def test_range_strength_is_drawn_per_image_within_range(pipe):
    out = pipe("screw", num_images=4, strength=(0.1, 0.2), num_inference_steps=2,
               generator=torch.Generator().manual_seed(3), output_type="np")
    assert len(out.strengths) == 4 and len(set(out.strengths)) == 4
    assert all(0.1 <= s <= 0.2 for s in out.strengths)
    fixed = pipe("screw", num_images=2, strength=0.15, num_inference_steps=2, output_type="np")
    assert fixed.strengths == [0.15, 0.15]


def test_difference_from_normal_sample_grows_with_strength(pipe):
    latents = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(4))

    def run(s: float) -> torch.Tensor:
        return pipe("bottle", num_images=4, strength=s, num_inference_steps=4, latents=latents,
                    generator=torch.Generator().manual_seed(5), output_type="pt").images

    normal = run(0.0)
    distances = [(run(s) - normal).abs().mean().item() for s in (0.1, 0.3, 1.0)]
    assert 0 < distances[0] < distances[1] < distances[2]


def test_output_types_and_per_image_categories(pipe):
    pt = pipe(["bottle", "screw"], strength=0.0, num_inference_steps=2, output_type="pt").images
    assert pt.shape == (2, 3, 16, 16) and pt.dtype == torch.float32 and 0 <= pt.min() and pt.max() <= 1
    arr = pipe("mvtec-ad/cable", num_images=2, num_inference_steps=2, output_type="np").images
    assert arr.shape == (2, 16, 16, 3) and isinstance(arr, np.ndarray)
    pil = pipe("cable", num_inference_steps=2).images
    assert len(pil) == 1 and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (16, 16)
    images, strengths = pipe("cable", num_inference_steps=1, output_type="np", return_dict=False)
    assert images.shape == (1, 16, 16, 3) and strengths == [0.15]


def test_bad_inputs_are_input_errors(pipe):
    with pytest.raises(InputError, match="bottle, cable, screw"):
        pipe("carpet", num_inference_steps=1)
    with pytest.raises(InputError, match="num_images"):
        pipe(["bottle", "cable"], num_images=3, num_inference_steps=1)
    with pytest.raises(InputError, match="strength"):
        pipe("bottle", strength=(0.2, 0.1), num_inference_steps=1)
    with pytest.raises(InputError, match="latents"):
        pipe("bottle", latents=torch.zeros(1, 3, 8, 8), num_inference_steps=1)
    with pytest.raises(InputError, match="generators"):
        pipe("bottle", num_images=2, generator=_gens(0, 3), num_inference_steps=1)


def test_ddim_sampler_is_deterministic_at_zero_strength(pipe):
    pipe_ddim = SDASPipeline(unet=pipe.unet, scheduler=SDASDDIMScheduler.from_config(pipe.scheduler.config),
                             categories=CATEGORIES)
    pipe_ddim.set_progress_bar_config(disable=True)
    latents = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    a = pipe_ddim("cable", num_images=2, strength=0.0, latents=latents, num_inference_steps=3, output_type="pt")
    b = pipe_ddim("cable", num_images=2, strength=0.0, latents=latents, num_inference_steps=3,
                  generator=torch.Generator().manual_seed(99), output_type="pt")
    torch.testing.assert_close(a.images, b.images)
    c = pipe_ddim("cable", num_images=2, strength=0.05, latents=latents, num_inference_steps=3,
                  generator=torch.Generator().manual_seed(99), output_type="pt")
    assert (c.images - a.images).abs().mean() > 0


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    reloaded = SDASPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.categories == CATEGORIES
    assert type(reloaded.scheduler).__name__ == "SDASScheduler"
    kwargs = dict(category="screw", num_images=2, strength=(0.1, 0.2), num_inference_steps=3, output_type="pt")
    before = pipe(generator=torch.Generator().manual_seed(8), **kwargs)
    after = reloaded(generator=torch.Generator().manual_seed(8), **kwargs)
    torch.testing.assert_close(before.images, after.images, atol=1e-5, rtol=0)
    assert before.strengths == after.strengths


def test_bfloat16_unet_keeps_scheduler_math_in_float32(pipe):
    pipe_bf16 = SDASPipeline(unet=SDASPipeline.from_unet_preset("tiny-32", CATEGORIES, sample_size=16).unet.to(torch.bfloat16),
                             scheduler=pipe.scheduler, categories=CATEGORIES)
    pipe_bf16.set_progress_bar_config(disable=True)
    out = pipe_bf16("bottle", num_images=1, num_inference_steps=1, output_type="pt")
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()


def _one_line_input_error(call) -> str:
    with pytest.raises(InputError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_numpy_inputs_are_accepted(pipe):
    kwargs = dict(num_images=2, strength=0.1, num_inference_steps=2, output_type="pt")
    latents = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    by_name = pipe("cable", latents=latents, generator=torch.Generator().manual_seed(1), **kwargs).images
    by_numpy = pipe(np.int64(1), latents=latents.numpy(), generator=torch.Generator().manual_seed(1),
                    **{**kwargs, "num_images": np.int64(2), "strength": np.float32(0.1)}).images
    torch.testing.assert_close(by_name, by_numpy)
    ids = pipe(np.array([1, 1]), latents=latents, generator=torch.Generator().manual_seed(1), **kwargs).images
    torch.testing.assert_close(by_name, ids)


def test_bad_types_and_steps_are_one_line_input_errors(pipe):
    assert "strength" in _one_line_input_error(lambda: pipe("bottle", strength="ab", num_inference_steps=1))
    assert "strength" in _one_line_input_error(lambda: pipe("bottle", strength=(0.1, "x"), num_inference_steps=1))
    assert "num_images" in _one_line_input_error(lambda: pipe("bottle", num_images=2.0, num_inference_steps=1))
    assert "batch_size" in _one_line_input_error(lambda: pipe("bottle", batch_size=1.5, num_inference_steps=1))
    assert "category" in _one_line_input_error(lambda: pipe(1.5, num_inference_steps=1))
    assert "latents" in _one_line_input_error(lambda: pipe("bottle", latents=[[0.0]], num_inference_steps=1))
    message = _one_line_input_error(lambda: pipe("bottle", num_inference_steps=1001))
    assert "num_inference_steps" in message and "1000" in message


def test_scheduler_value_errors_become_input_errors(pipe):
    from sia.scheduler import SDASScheduler

    odd = SDASPipeline(unet=pipe.unet, scheduler=SDASScheduler(timestep_spacing="bogus"), categories=CATEGORIES)
    odd.set_progress_bar_config(disable=True)
    assert "num_inference_steps" in _one_line_input_error(lambda: odd("bottle", num_inference_steps=2))


def test_pil_output_rounds_to_the_nearest_level(pipe):
    kwargs = dict(category="screw", num_images=1, strength=0.1, num_inference_steps=2)
    floats = pipe(generator=torch.Generator().manual_seed(2), output_type="np", **kwargs).images[0]
    pil = np.asarray(pipe(generator=torch.Generator().manual_seed(2), **kwargs).images[0])
    np.testing.assert_array_equal(pil, np.round(floats * 255).astype(np.uint8))
