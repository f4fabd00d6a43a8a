"""The IDDPM hybrid objective (L_simple + lambda * L_vlb) that trains SDAS's learned-variance UNet.

diffusers ships no loss for `variance_type="learned_range"` models, so it lives here. The model
predicts eps (first C channels) and an interpolation value v (last C channels) between
log(beta_t) and the clipped log posterior variance. The objective per sample is

    mean_pixels((eps - eps_theta)^2)  +  vb_weight * L_t

where L_t is KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) in bits for t > 0 and the
discretised-Gaussian decoder NLL of x_0 (bin width 2/255, open edges beyond +-0.999) in bits for
t = 0. The decoder uses guided-diffusion's tanh approximation of the normal CDF by default
(``cdf="approx"``, as the official code); ``cdf="exact"`` uses the exact CDF (the two differ by
less than 2e-4 in probability). Inside L_t the predicted eps is detached, so the VLB term trains the variance only.
With uniform t and T = 1000 the unweighted per-step term (vb_weight = 1) equals the paper's
lambda = 0.001 on the full L_vlb = T * E_t[L_t].

Schedule coefficients are computed in float64 from the scheduler's betas and cast to the working
dtype only after indexing, which matches the float64 tables of the reference implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import InputError

#: Half a pixel bin for 8-bit data scaled to [-1, 1].
HALF_BIN = 1.0 / 255.0
#: Pixels beyond these values own the open tail of the decoder distribution.
EDGE = 0.999
#: Probability floor, as in the reference implementation (bounds the NLL at ~27.6 nats).
MIN_PROBABILITY = 1e-12
#: The decoder CDFs: "approx" (guided-diffusion / official SDAS) or "exact".
CDF_CHOICES = ("approx", "exact")
CdfKind = Literal["approx", "exact"]


@dataclass(frozen=True)
class DiffusionCoefficients:
    """Float64 tables of the forward process and its Gaussian posterior, indexed by timestep."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor

    @classmethod
    def from_scheduler(cls, scheduler) -> "DiffusionCoefficients":
        """Tables for any diffusers-style scheduler exposing `betas` (DDPM, SDAS)."""
        betas = getattr(scheduler, "betas", None)
        if betas is None:
            raise InputError(f"scheduler {type(scheduler).__name__}: expected a `betas` attribute (a DDPM-style scheduler)")
        return cls.from_betas(torch.as_tensor(betas))

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> "DiffusionCoefficients":
        betas = betas.detach().to("cpu", torch.float64)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # The posterior variance is 0 at t = 0; like IDDPM, reuse the t = 1 value there so the log is finite.
        clipped = torch.cat([posterior_variance[1:2], posterior_variance[1:]])
        return cls(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            sqrt_recip_alphas_cumprod=torch.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=torch.sqrt(1.0 / alphas_cumprod - 1.0),
            posterior_log_variance_clipped=torch.log(clipped),
            posterior_mean_coef1=betas * torch.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - alphas_cumprod),
        )

    def gather(self, name: str, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-sample coefficient `name` at `timesteps`, shaped (B, 1, ..., 1) like `like`."""
        table: torch.Tensor = getattr(self, name)
        values = table[timesteps.detach().to("cpu", torch.long)]
        return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              coefficients: DiffusionCoefficients) -> torch.Tensor:
    """q(x_t | x_0) sample: sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, with float64 coefficients."""
    abar = coefficients.alphas_cumprod[timesteps.detach().to("cpu", torch.long)]
    shape = (-1, *([1] * (x0.ndim - 1)))
    scale = abar.sqrt().to(device=x0.device, dtype=x0.dtype).reshape(shape)
    sigma = (1.0 - abar).sqrt().to(device=x0.device, dtype=x0.dtype).reshape(shape)
    return scale * x0 + sigma * noise


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """guided-diffusion's fast CDF approximation ``0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor,
                                        cdf: CdfKind = "approx") -> torch.Tensor:
    """Elementwise log-probability (nats) of 8-bit data x in [-1, 1] under a binned Gaussian.

    Each pixel owns the bin [x - 1/255, x + 1/255]; the extreme values own the open tails.
    ``cdf="approx"`` reproduces guided-diffusion's arithmetic (tanh CDF, ``1 - cdf`` for the upper
    tail) so the loss matches the official one; ``cdf="exact"`` uses the exact normal CDF, evaluated
    on the side of the mean where it does not round to 1.
    """
    if cdf not in CDF_CHOICES:
        raise InputError(f"cdf: expected one of {', '.join(CDF_CHOICES)}, got {cdf!r}")
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (centered + HALF_BIN)
    lower = inv_std * (centered - HALF_BIN)
    if cdf == "approx":
        cdf_upper = approx_standard_normal_cdf(upper)
        cdf_lower = approx_standard_normal_cdf(lower)
        log_cdf_upper = torch.log(cdf_upper.clamp(min=MIN_PROBABILITY))
        log_survival_lower = torch.log((1.0 - cdf_lower).clamp(min=MIN_PROBABILITY))
        log_mass = torch.log((cdf_upper - cdf_lower).clamp(min=MIN_PROBABILITY))
        return torch.where(x < -EDGE, log_cdf_upper, torch.where(x > EDGE, log_survival_lower, log_mass))
    # P(lower < Z < upper), computed in the tail that keeps precision.
    mass = torch.where(
        centered > 0,
        torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
        torch.special.ndtr(upper) - torch.special.ndtr(lower),
    )
    log_cdf_upper = torch.log(torch.special.ndtr(upper).clamp(min=MIN_PROBABILITY))
    log_survival_lower = torch.log(torch.special.ndtr(-lower).clamp(min=MIN_PROBABILITY))
    log_mass = torch.log(mass.clamp(min=MIN_PROBABILITY))
    return torch.where(x < -EDGE, log_cdf_upper, torch.where(x > EDGE, log_survival_lower, log_mass))


def _mean_over_pixels(values: torch.Tensor) -> torch.Tensor:
    return values.flatten(1).mean(dim=1)


def variational_bound_terms(model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                            timesteps: torch.Tensor, coefficients: DiffusionCoefficients,
                            cdf: CdfKind = "approx") -> torch.Tensor:
    """Per-sample L_t in bits: KL for t > 0, decoder NLL for t = 0 (model_output used as given)."""
    channels = x0.shape[1]
    eps, v = model_output[:, :channels], model_output[:, channels:]
    # Learned-range variance: interpolate in log space between beta_t and the clipped posterior variance.
    frac = (v + 1.0) / 2.0
    min_log = coefficients.gather("posterior_log_variance_clipped", timesteps, x0)
    max_log = torch.log(coefficients.gather("betas", timesteps, x0))
    model_log_variance = frac * max_log + (1.0 - frac) * min_log
    # Predicted x_0 is not clipped during training (clip_denoised=False in the reference).
    x0_pred = (coefficients.gather("sqrt_recip_alphas_cumprod", timesteps, x_t) * x_t
               - coefficients.gather("sqrt_recipm1_alphas_cumprod", timesteps, x_t) * eps)
    coef1 = coefficients.gather("posterior_mean_coef1", timesteps, x0)
    coef2 = coefficients.gather("posterior_mean_coef2", timesteps, x0)
    model_mean = coef1 * x0_pred + coef2 * x_t
    true_mean = coef1 * x0 + coef2 * x_t
    kl = _mean_over_pixels(normal_kl(true_mean, min_log, model_mean, model_log_variance)) / math.log(2.0)
    decoder_nll = -_mean_over_pixels(
        discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance, cdf)) / math.log(2.0)
    return torch.where(timesteps.to(kl.device) == 0, decoder_nll, kl)


def hybrid_loss(model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor,
                timesteps: torch.Tensor, scheduler=None, *, vb_weight: float = 1.0,
                coefficients: DiffusionCoefficients | None = None, cdf: CdfKind = "approx") -> dict[str, torch.Tensor]:
    """IDDPM hybrid loss for a learned-range model.

    Args:
        model_output: (B, 2C, H, W) UNet output: eps prediction, then variance values v in [-1, 1].
        x0: (B, C, H, W) clean images in [-1, 1].
        x_t: (B, C, H, W) noised images at `timesteps`.
        noise: (B, C, H, W) the eps used to make `x_t`.
        timesteps: (B,) integer timesteps in [0, T).
        scheduler: DDPM-style scheduler giving the betas (ignored when `coefficients` is given).
        vb_weight: weight of the per-step VLB term; 1.0 is the paper's lambda = 0.001 for T = 1000.
        cdf: normal CDF of the t = 0 decoder NLL: "approx" (official tanh approximation) or "exact".

    Returns:
        dict with `loss` (scalar, batch mean of mse + vb_weight * vb), `mse` (B,) and `vb` (B,) in bits.
    """
    if model_output.ndim != 4 or x0.ndim != 4 or model_output.shape[1] != 2 * x0.shape[1]:
        raise InputError(f"model_output: expected (B, {2 * x0.shape[1]}, H, W) for learned variance with "
                         f"x0 of shape {tuple(x0.shape)}, got {tuple(model_output.shape)}")
    if coefficients is None:
        if scheduler is None:
            raise InputError("hybrid_loss: pass a scheduler or precomputed coefficients")
        coefficients = DiffusionCoefficients.from_scheduler(scheduler)
    timesteps = timesteps.reshape(-1)
    if timesteps.numel() and (int(timesteps.min()) < 0 or int(timesteps.max()) >= len(coefficients.betas)):
        raise InputError(f"timesteps: expected integers in [0, {len(coefficients.betas)}), "
                         f"got range [{int(timesteps.min())}, {int(timesteps.max())}]")
    channels = x0.shape[1]
    eps = model_output[:, :channels]
    mse = _mean_over_pixels((noise - eps) ** 2)
    # Stop-gradient on the mean: the VLB term may only move the variance channels.
    frozen = torch.cat([eps.detach(), model_output[:, channels:]], dim=1)
    vb = variational_bound_terms(frozen, x0, x_t, timesteps, coefficients, cdf)
    loss = (mse + vb_weight * vb).mean()
    return {"loss": loss, "mse": mse, "vb": vb}
