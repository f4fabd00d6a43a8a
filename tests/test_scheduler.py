"""SDAS schedulers: s = 0 is the stock diffusers step, s > 0 scales exactly the noise term."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from sia.errors import InputError
from sia.scheduler import SDASDDIMScheduler, SDASScheduler, make_scheduler


def _model_output(seed: int, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 3, 8, 8, generator=g)
    model_output = torch.cat([torch.randn(batch, 3, 8, 8, generator=g),
                              torch.rand(batch, 3, 8, 8, generator=g) * 2.4 - 1.2], dim=1)
    return sample, model_output


def test_twenty_steps_are_the_official_ddim20_timesteps():
    scheduler = SDASScheduler()
    scheduler.set_timesteps(20)
    assert scheduler.timesteps.tolist() == list(range(950, -1, -50))
    assert scheduler.config.variance_type == "learned_range"


@pytest.mark.parametrize("strength", [0.0, torch.zeros(3)])
def test_zero_strength_equals_stock_ddpm_bit_for_bit(strength):
    sdas, stock = SDASScheduler(), DDPMScheduler(variance_type="learned_range")
    sdas.set_timesteps(20)
    stock.set_timesteps(20)
    sample, model_output = _model_output(0)
    x_sdas, x_stock = sample.clone(), sample.clone()
    g_sdas, g_stock = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for t in sdas.timesteps:
        x_sdas = sdas.step(model_output, t, x_sdas, generator=g_sdas, anomaly_strength=strength).prev_sample
        x_stock = stock.step(model_output, t, x_stock, generator=g_stock).prev_sample
        assert torch.equal(x_sdas, x_stock)


def test_strength_scales_exactly_the_learned_noise_term():
    scheduler = SDASScheduler()
    scheduler.set_timesteps(20)
    sample, model_output = _model_output(1)
    strength = torch.tensor([0.0, 0.1, 0.7])
    for t in scheduler.timesteps[:-1]:
        x0 = scheduler.step(model_output, t, sample, generator=torch.Generator().manual_seed(3)).prev_sample
        xs = scheduler.step(model_output, t, sample, generator=torch.Generator().manual_seed(3),
                            anomaly_strength=strength).prev_sample
        z = torch.randn(sample.shape, generator=torch.Generator().manual_seed(3))
        sigma = torch.exp(0.5 * scheduler.log_variance(t, model_output[:, 3:]))
        expected = (torch.sqrt(1 + strength) - 1).view(-1, 1, 1, 1) * sigma * z
        torch.testing.assert_close(xs - x0, expected, atol=1e-6, rtol=1e-5)
        assert torch.equal(xs[0], x0[0])
        assert (xs[2] - x0[2]).abs().mean() > (xs[1] - x0[1]).abs().mean() > 0


def test_last_step_adds_no_noise_whatever_the_strength():
    scheduler = SDASScheduler()
    scheduler.set_timesteps(20)
    sample, model_output = _model_output(2)
    a = scheduler.step(model_output, 0, sample, anomaly_strength=0.0).prev_sample
    b = scheduler.step(model_output, 0, sample, anomaly_strength=5.0).prev_sample
    assert torch.equal(a, b)


def test_log_variance_per_sample_timesteps_match_scalar_calls():
    scheduler = SDASScheduler()
    _, model_output = _model_output(3)
    v = model_output[:, 3:]
    for respaced in (False, True):
        if respaced:
            scheduler.set_timesteps(20)
        ts = torch.tensor([950, 50, 0]) if respaced else torch.tensor([999, 10, 0])
        batched = scheduler.log_variance(ts, v)
        for i, t in enumerate(ts.tolist()):
            torch.testing.assert_close(batched[i], scheduler.log_variance(t, v[i:i + 1])[0])
    # v = +1 gives log(beta_t), v = -1 the clipped posterior variance
    scheduler.set_timesteps(20)
    ones = torch.ones(1, 3, 2, 2)
    beta = 1 - scheduler.alphas_cumprod[950] / scheduler.alphas_cumprod[900]
    torch.testing.assert_close(scheduler.log_variance(950, ones), torch.log(beta).expand(1, 3, 2, 2))


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_zero_strength_equals_stock_ddim(eta):
    sdas, stock = SDASDDIMScheduler(), DDIMScheduler()
    sdas.set_timesteps(20)
    stock.set_timesteps(20)
    sample, model_output = _model_output(4)
    x_sdas, x_stock = sample.clone(), sample.clone()
    g_sdas, g_stock = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for t in sdas.timesteps:
        x_sdas = sdas.step(model_output, t, x_sdas, eta=eta, generator=g_sdas).prev_sample
        x_stock = stock.step(model_output[:, :3], t, x_stock, eta=eta, use_clipped_model_output=True,
                             generator=g_stock).prev_sample
        assert torch.equal(x_sdas, x_stock)


def test_ddim_strength_adds_sqrt_s_times_learned_sigma_noise():
    scheduler = SDASDDIMScheduler()
    scheduler.set_timesteps(20)
    sample, model_output = _model_output(5)
    t = scheduler.timesteps[3]
    base = scheduler.step(model_output, t, sample).prev_sample
    perturbed = scheduler.step(model_output, t, sample, anomaly_strength=0.02,
                               generator=torch.Generator().manual_seed(9)).prev_sample
    z = torch.randn(sample.shape, generator=torch.Generator().manual_seed(9))
    expected = math.sqrt(0.02) * torch.exp(0.5 * scheduler.log_variance(t, model_output[:, 3:])) * z
    torch.testing.assert_close(perturbed - base, expected, atol=1e-6, rtol=1e-5)


def test_bad_strength_is_an_input_error():
    scheduler = SDASScheduler()
    scheduler.set_timesteps(20)
    sample, model_output = _model_output(6)
    with pytest.raises(InputError):
        scheduler.step(model_output, 950, sample, anomaly_strength=-0.1)
    with pytest.raises(InputError):
        scheduler.step(model_output, 950, sample, anomaly_strength=torch.zeros(2))


def test_config_round_trip_and_sampler_switch(tmp_path):
    scheduler = SDASScheduler(beta_end=0.03)
    scheduler.save_config(tmp_path)
    reloaded = SDASScheduler.from_pretrained(tmp_path)
    assert reloaded.config.beta_end == 0.03 and reloaded.config.variance_type == "learned_range"
    ddim = make_scheduler("ddim", reloaded.config)
    assert isinstance(ddim, SDASDDIMScheduler) and ddim.config.beta_end == 0.03
    with pytest.raises(InputError, match="ddpm"):
        make_scheduler("euler")


def _spec_respaced_schedule(steps: int = 20):
    """The official respaced schedule rebuilt from scratch in float64: linear betas, keep abar at {0, 50, ..., 950}, re-derive betas."""
    import numpy as np

    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    kept = list(range(0, 1000, 1000 // steps))
    abar_kept = abar[kept]
    abar_prev = np.concatenate([[1.0], abar_kept[:-1]])
    return kept, abar_kept, abar_prev, 1.0 - abar_kept / abar_prev


def test_respaced_twenty_step_schedule_matches_the_spec_values():
    kept, abar_kept, abar_prev, betas = _spec_respaced_schedule()
    assert kept[::-1] == list(range(950, -1, -50))
    assert betas[0] == pytest.approx(1e-4, rel=1e-9)
    assert betas[1] == pytest.approx(0.02995, abs=5e-6)
    assert betas[19] == pytest.approx(0.6076, abs=5e-5)
    assert abar_kept[19] == pytest.approx(1.06e-4, abs=5e-7)

    scheduler = SDASScheduler()
    scheduler.set_timesteps(20)
    assert scheduler.timesteps.tolist() == kept[::-1]
    ones = torch.ones(1, 1, 1, 1)
    for k, t in enumerate(kept):
        # v = +1 selects log(beta'_k) of the respaced step the sampler takes from t. The diffusers
        # tables are float32 (1 - abar_0 loses ~2e-4 relative), the official ones float64.
        assert math.exp(scheduler.log_variance(t, ones).item()) == pytest.approx(betas[k], rel=3e-4), t
        if k > 0:  # v = -1: the respaced posterior variance beta'_k (1 - abar'_{k-1}) / (1 - abar'_k)
            posterior = betas[k] * (1 - abar_prev[k]) / (1 - abar_kept[k])
            assert math.exp(scheduler.log_variance(t, -ones).item()) == pytest.approx(posterior, rel=3e-4), t
    assert scheduler.alphas_cumprod[950].item() == pytest.approx(abar_kept[19], rel=1e-4)

    # The sampler's own noise at t = 950 with v = +1 has std sqrt(beta'_19) (x (1 + s) for s > 0).
    sample = torch.zeros(1, 3, 4, 4)
    output = torch.cat([torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)], dim=1)
    a = scheduler.step(output, 950, sample, generator=torch.Generator().manual_seed(0), anomaly_strength=0.2).prev_sample
    b = scheduler.step(output, 950, sample, generator=torch.Generator().manual_seed(1), anomaly_strength=0.2).prev_sample
    za = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    zb = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a - b, math.sqrt(1.2 * betas[19]) * (za - zb), rtol=1e-4, atol=1e-6)


def test_ddim_log_variance_matches_an_independent_formula():
    """IDDPM learned range on the DDIM step t -> t - 50: frac log(beta') + (1 - frac) log(beta~'), frac = (v + 1) / 2."""
    import numpy as np

    kept, abar_kept, abar_prev, betas = _spec_respaced_schedule()
    scheduler = SDASDDIMScheduler()
    scheduler.set_timesteps(20)
    v = torch.linspace(-1.3, 1.3, 12, dtype=torch.float64).reshape(1, 3, 2, 2)  # v is not clamped
    frac = (v.numpy() + 1) / 2
    for k in range(1, 20):  # t = 0 adds no noise, so its (clipped) variance is never used
        posterior = betas[k] * (1 - abar_prev[k]) / (1 - abar_kept[k])
        expected = frac * np.log(betas[k]) + (1 - frac) * np.log(posterior)
        got = scheduler.log_variance(kept[k], v.float()).double().numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=3e-4, err_msg=str(kept[k]))  # 3e-4 relative in the variance
    batched = scheduler.log_variance(torch.tensor([950, 500, 50]), v.float().expand(3, 3, 2, 2))
    for row, t in enumerate((950, 500, 50)):
        torch.testing.assert_close(batched[row], scheduler.log_variance(t, v.float())[0])


@pytest.mark.parametrize("scheduler_class", [SDASScheduler, SDASDDIMScheduler])
def test_last_step_log_variance_uses_the_following_steps_posterior_variance(scheduler_class):
    """At t = 0 the posterior variance is 0; like the official sampler, the lower end of the learned
    range is the posterior variance of the following respaced step (t = 50), not a 1e-20 clamp."""
    _, abar_kept, abar_prev, betas = _spec_respaced_schedule()
    following = betas[1] * (1 - abar_prev[1]) / (1 - abar_kept[1])
    scheduler = scheduler_class()
    scheduler.set_timesteps(20)
    v = torch.linspace(-1.3, 1.3, 12).reshape(1, 3, 2, 2)
    frac = (v.double() + 1) / 2
    expected = frac * math.log(betas[0]) + (1 - frac) * math.log(following)
    torch.testing.assert_close(scheduler.log_variance(0, v).double(), expected, rtol=0, atol=3e-4)
    lowest = scheduler.log_variance(0, -torch.ones(1, 1, 1, 1)).item()
    assert lowest == pytest.approx(math.log(following), abs=3e-4) and round(lowest, 2) == -9.21
    batched = scheduler.log_variance(torch.tensor([50, 0]), v.expand(2, 3, 2, 2))
    torch.testing.assert_close(batched[1], scheduler.log_variance(0, v)[0])
    torch.testing.assert_close(batched[0], scheduler.log_variance(50, v)[0])


def test_unrespaced_log_variance_equals_the_training_loss_variance_at_every_timestep():
    """Sampler and training loss interpolate between the same ends, t = 0 included."""
    from sia.diffusion_loss import DiffusionCoefficients

    scheduler = SDASScheduler()
    tables = DiffusionCoefficients.from_scheduler(scheduler)
    timesteps = torch.tensor([0, 1, 2, 500, 998, 999])
    v = torch.linspace(-1, 1, 6).reshape(6, 1, 1, 1).expand(6, 3, 2, 2)
    frac = (v.double() + 1) / 2
    expected = (frac * tables.betas[timesteps].log().view(-1, 1, 1, 1)
                + (1 - frac) * tables.posterior_log_variance_clipped[timesteps].view(-1, 1, 1, 1))
    # float32 diffusers tables against float64 ones: 1 - abar near t = 0 loses ~1e-4 relative
    torch.testing.assert_close(scheduler.log_variance(timesteps, v).double(), expected, rtol=0, atol=1e-3)
    for row, t in enumerate(timesteps.tolist()):
        torch.testing.assert_close(scheduler.log_variance(t, v[row:row + 1]).double(), expected[row:row + 1],
                                   rtol=0, atol=1e-3)
