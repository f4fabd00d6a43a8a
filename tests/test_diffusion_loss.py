"""The IDDPM hybrid loss against an independent float64 reference written from Gaussian formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from scipy.stats import norm

from sia.diffusion_loss import (DiffusionCoefficients, add_noise, approx_standard_normal_cdf,
                                discretized_gaussian_log_likelihood, hybrid_loss)
from sia.errors import InputError

T = 1000


def _reference_schedule():
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    return betas, abar, abar_prev


def _tanh_cdf(x):
    """guided-diffusion's approx_standard_normal_cdf, written out in numpy."""
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _reference_terms(out, x0, xt, eps_true, t, cdf="exact"):
    """Per-sample (mse, vb in bits) from first principles, in numpy float64 (decoder with either CDF)."""
    betas, abar, abar_prev = _reference_schedule()
    c = x0.shape[1]
    mse, vb = [], []
    for i, step in enumerate(t):
        eps, v = out[i, :c], out[i, c:]
        mse.append(np.mean((eps_true[i] - eps) ** 2))
        # Bayes: q(x_{t-1} | x_t, x_0) is Gaussian with this mean and variance.
        def posterior_mean(x_start):
            return (np.sqrt(abar_prev[step]) * betas[step] * x_start
                    + np.sqrt(1 - betas[step]) * (1 - abar_prev[step]) * xt[i]) / (1 - abar[step])
        var_post = lambda k: betas[k] * (1 - abar_prev[k]) / (1 - abar[k])  # noqa: E731
        low = var_post(step) if step > 0 else var_post(1)
        high = betas[step]
        frac = (v + 1) / 2
        model_var = np.exp(frac * np.log(high) + (1 - frac) * np.log(low))
        x0_hat = (xt[i] - np.sqrt(1 - abar[step]) * eps) / np.sqrt(abar[step])
        mu_p = posterior_mean(x0_hat)
        if step > 0:
            mu_q = posterior_mean(x0[i])
            # KL(N(mu_q, s_q^2) || N(mu_p, s_p^2)) = log(s_p/s_q) + (s_q^2 + (mu_q-mu_p)^2)/(2 s_p^2) - 1/2
            kl = 0.5 * np.log(model_var / low) + (low + (mu_q - mu_p) ** 2) / (2 * model_var) - 0.5
            vb.append(np.mean(kl) / np.log(2))
        else:
            sd = np.sqrt(model_var)
            lo_edge = (x0[i] - 1 / 255 - mu_p) / sd
            hi_edge = (x0[i] + 1 / 255 - mu_p) / sd
            phi = norm.cdf if cdf == "exact" else _tanh_cdf
            prob = phi(hi_edge) - phi(lo_edge)
            prob = np.where(x0[i] < -0.999, phi(hi_edge), prob)
            prob = np.where(x0[i] > 0.999, norm.sf(lo_edge) if cdf == "exact" else 1 - phi(lo_edge), prob)
            vb.append(-np.mean(np.log(np.maximum(prob, 1e-12))) / np.log(2))
    return np.array(mse), np.array(vb)


def _random_case(seed, dtype, timesteps):
    g = torch.Generator().manual_seed(seed)
    b = len(timesteps)
    # 8-bit images in [-1, 1], including the exact edge values -1 and 1.
    x0 = torch.randint(0, 256, (b, 3, 6, 5), generator=g).to(dtype) / 127.5 - 1
    noise = torch.randn(b, 3, 6, 5, generator=g, dtype=dtype)
    t = torch.tensor(timesteps)
    scheduler = DDPMScheduler(variance_type="learned_range")
    xt = add_noise(x0, noise, t, DiffusionCoefficients.from_scheduler(scheduler))
    # A plausible model: eps close to the truth, v anywhere in [-1.2, 1.2] (v is not clamped).
    eps_pred = noise + 0.3 * torch.randn(b, 3, 6, 5, generator=g, dtype=dtype)
    v = torch.rand(b, 3, 6, 5, generator=g, dtype=dtype) * 2.4 - 1.2
    return torch.cat([eps_pred, v], dim=1), x0, xt, noise, t, scheduler


@pytest.mark.parametrize("cdf", [None, "approx", "exact"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-6), (torch.float32, 2e-3)])
def test_hybrid_loss_matches_float64_reference(dtype, rtol, cdf):
    steps = [0, 0, 1, 2, 17, 250, 500, 998, 999]
    out, x0, xt, noise, t, scheduler = _random_case(0, dtype, steps)
    result = hybrid_loss(out, x0, xt, noise, t, scheduler, **({} if cdf is None else {"cdf": cdf}))
    ref_mse, ref_vb = _reference_terms(*(a.double().numpy() for a in (out, x0, xt, noise)), steps,
                                       cdf=cdf or "approx")  # the official approximation is the default
    np.testing.assert_allclose(result["mse"].double().numpy(), ref_mse, rtol=rtol)
    np.testing.assert_allclose(result["vb"].double().numpy(), ref_vb, rtol=rtol, atol=1e-7)
    assert result["loss"].item() == pytest.approx(float(np.mean(ref_mse + ref_vb)), rel=rtol)
    assert result["mse"].dtype == dtype and result["loss"].ndim == 0


def test_vb_weight_scales_only_the_vb_term():
    out, x0, xt, noise, t, scheduler = _random_case(1, torch.float64, [0, 5, 900])
    full = hybrid_loss(out, x0, xt, noise, t, scheduler)
    weighted = hybrid_loss(out, x0, xt, noise, t, scheduler, vb_weight=0.25)
    expected = (full["mse"] + 0.25 * full["vb"]).mean()
    assert weighted["loss"].item() == pytest.approx(expected.item(), rel=1e-12)


def test_perfect_model_has_zero_kl_at_positive_t():
    """With the true eps and the posterior variance (v = -1), q and p coincide: KL = 0, MSE = 0."""
    steps = [3, 400, 999]
    _, x0, xt, noise, t, scheduler = _random_case(2, torch.float64, steps)
    out = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    result = hybrid_loss(out, x0, xt, noise, t, scheduler)
    assert torch.allclose(result["vb"], torch.zeros(3, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(result["mse"], torch.zeros(3, dtype=torch.float64))


def test_decoder_nll_is_small_for_an_exact_mean_and_bounded_for_a_bad_one():
    _, x0, xt, noise, _, scheduler = _random_case(3, torch.float64, [0, 0])
    t = torch.zeros(2, dtype=torch.long)
    exact = hybrid_loss(torch.cat([noise, -torch.ones_like(noise)], 1), x0, xt, noise, t, scheduler)
    shifted = hybrid_loss(torch.cat([noise + 0.3, -torch.ones_like(noise)], 1), x0, xt, noise, t, scheduler)
    # At t = 0 the mean is x0 itself; sigma ~ 0.007 against a bin half-width of 1/255: about 1.3 bits.
    assert (exact["vb"] < 2.0).all() and (exact["vb"] < shifted["vb"]).all()
    wrong = hybrid_loss(torch.cat([noise + 5.0, torch.ones_like(noise)], 1), x0, xt, noise, t, scheduler)
    assert torch.isfinite(wrong["vb"]).all()
    assert (wrong["vb"] <= -math.log2(1e-12) + 1e-6).all()


def test_vb_term_gives_no_gradient_to_the_eps_channels():
    out, x0, xt, noise, t, scheduler = _random_case(4, torch.float32, [0, 10, 600])
    out = out.clone().requires_grad_(True)
    result = hybrid_loss(out, x0, xt, noise, t, scheduler)
    (grad_vb,) = torch.autograd.grad(result["vb"].sum(), out, retain_graph=True)
    assert torch.count_nonzero(grad_vb[:, :3]) == 0
    assert torch.count_nonzero(grad_vb[:, 3:]) > 0
    (grad_mse,) = torch.autograd.grad(result["mse"].sum(), out)
    assert torch.count_nonzero(grad_mse[:, 3:]) == 0
    assert torch.count_nonzero(grad_mse[:, :3]) > 0


def test_coefficients_are_float64_and_match_the_reference_schedule():
    coefficients = DiffusionCoefficients.from_scheduler(DDPMScheduler())
    betas, abar, _ = _reference_schedule()
    assert coefficients.alphas_cumprod.dtype == torch.float64
    np.testing.assert_allclose(coefficients.alphas_cumprod.numpy(), abar, rtol=1e-6)
    np.testing.assert_allclose(coefficients.betas.numpy(), betas, rtol=1e-6)


def test_bad_shapes_and_timesteps_are_input_errors():
    out, x0, xt, noise, t, scheduler = _random_case(5, torch.float32, [1, 2])
    with pytest.raises(InputError, match="model_output"):
        hybrid_loss(out[:, :3], x0, xt, noise, t, scheduler)
    with pytest.raises(InputError, match="timesteps"):
        hybrid_loss(out, x0, xt, noise, torch.tensor([1, 1000]), scheduler)


def test_approx_cdf_is_the_official_tanh_formula_and_close_to_the_exact_cdf():
    x = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    expected = 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    torch.testing.assert_close(approx_standard_normal_cdf(x), expected, rtol=0, atol=1e-15)
    error = (approx_standard_normal_cdf(x) - torch.special.ndtr(x)).abs()
    assert 1e-5 < error.max().item() < 2e-4  # a real approximation, but a close one


def test_the_two_decoder_cdfs_give_nearly_the_same_likelihood():
    g = torch.Generator().manual_seed(6)
    x0 = torch.randint(0, 256, (4, 3, 8, 8), generator=g).double() / 127.5 - 1
    mean = x0 + 0.01 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    log_scale = torch.full_like(x0, math.log(0.01))
    approx = discretized_gaussian_log_likelihood(x0, mean, log_scale, cdf="approx")
    exact = discretized_gaussian_log_likelihood(x0, mean, log_scale, cdf="exact")
    assert not torch.equal(approx, exact)
    assert (approx - exact).abs().mean().item() < 1e-3
    torch.testing.assert_close(discretized_gaussian_log_likelihood(x0, mean, log_scale), approx)  # the default
    with pytest.raises(InputError, match="cdf"):
        discretized_gaussian_log_likelihood(x0, mean, log_scale, cdf="erf")
