"""SDAS schedulers: diffusers samplers whose noise term can be amplified by an anomaly strength `s`.

SDAS (RealNet, CVPR 2024) turns a diffusion model of *normal* images into a generator of realistic
anomalies by sampling with a larger variance than the model learned: every ancestral step draws
``x_{t-1} = mu_theta + sqrt((1 + s) * Sigma_theta) * z`` (no noise at the last step), where
``Sigma_theta`` is the IDDPM learned-range variance predicted by the model's extra output channels.
``s = 0`` is ordinary sampling and yields normal images.

`SDASScheduler` is the official sampler (20 respaced steps with "leading" spacing are the timesteps
{950, 900, ..., 0} of the official ``ddim20`` section count). `SDASDDIMScheduler` is the DDIM variant
of the official code: a deterministic DDIM step plus ``sqrt(s * Sigma_theta) * z``.

Both are saved to and loaded from ``scheduler_config.json`` like any diffusers scheduler. The
module-level names `SchedulerMixin` and `DiffusionPipeline` are needed by diffusers to reload these
classes from a saved pipeline; keep this module path stable because it is written into
``model_index.json``.
"""

from __future__ import annotations

import inspect
from typing import Literal

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, SchedulerMixin  # noqa: F401
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .errors import InputError

__all__ = ["SDASScheduler", "SDASDDIMScheduler", "SAMPLERS", "make_scheduler", "learned_range_log_variance"]

StrengthLike = float | torch.Tensor


def learned_range_log_variance(alpha_prod_t: torch.Tensor, alpha_prod_t_prev: torch.Tensor,
                               predicted_variance: torch.Tensor,
                               alpha_prod_t_next: torch.Tensor | None = None) -> torch.Tensor:
    """IDDPM learned-range log-variance between the posterior variance and beta for one (respaced) step.

    ``frac = (v + 1) / 2`` (not clamped, as in the official code) interpolates in log space between
    ``log(beta~_t)`` and ``log(beta_t)``, with ``beta_t = 1 - abar_t / abar_prev``. The posterior
    variance is 0 at the first step of the chain (``abar_prev = 1``); there IDDPM (and the official
    code, and our training loss) uses the posterior variance of the following step, whose
    ``abar`` is `alpha_prod_t_next` (a zero-dimensional or per-sample tensor; ``nan`` or None where there
    is no following step, which falls back to a 1e-20 clamp).
    """
    current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
    posterior_variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t
    if alpha_prod_t_next is not None:
        following = (1 - alpha_prod_t) / (1 - alpha_prod_t_next) * (1 - alpha_prod_t_next / alpha_prod_t)
        first = (alpha_prod_t_prev >= 1) & ~torch.isnan(following)
        posterior_variance = torch.where(first, following, posterior_variance)
    min_log = torch.log(torch.clamp(posterior_variance, min=1e-20))
    max_log = torch.log(current_beta_t)
    frac = (predicted_variance + 1) / 2
    return frac * max_log + (1 - frac) * min_log


def _gather_or_nan(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``alphas_cumprod[t]`` per timestep, ``nan`` where ``t`` is outside the table (no such step)."""
    inside = (timesteps >= 0) & (timesteps < alphas_cumprod.shape[0])
    values = alphas_cumprod[timesteps.clamp(0, alphas_cumprod.shape[0] - 1)]
    return torch.where(inside, values, torch.full_like(values, float("nan")))


def _per_sample_log_variance(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, previous: torch.Tensor,
                             following: torch.Tensor, final_alpha_cumprod: torch.Tensor,
                             predicted_variance: torch.Tensor) -> torch.Tensor:
    """`learned_range_log_variance` for (B,) timesteps, their previous (-1: before the first) and following ones."""
    alpha_prod_t = alphas_cumprod[timesteps]
    alpha_prod_t_prev = torch.where(previous >= 0, alphas_cumprod[previous.clamp(min=0)], final_alpha_cumprod)
    alpha_prod_t_next = _gather_or_nan(alphas_cumprod, following)
    shape = (-1,) + (1,) * (predicted_variance.ndim - 1)
    device = predicted_variance.device
    return learned_range_log_variance(alpha_prod_t.reshape(shape).to(device),
                                      alpha_prod_t_prev.reshape(shape).to(device), predicted_variance,
                                      alpha_prod_t_next.reshape(shape).to(device))


def _strength_factor(anomaly_strength: StrengthLike, like: torch.Tensor, offset: float) -> torch.Tensor | float:
    """``sqrt(offset + s)`` as a python float or a (B,1,...,1) tensor broadcastable against `like`."""
    if isinstance(anomaly_strength, torch.Tensor):
        strength = anomaly_strength.detach()
        if strength.ndim == 0:
            strength = strength.reshape(1)
        if strength.ndim != 1 or strength.shape[0] not in (1, like.shape[0]):
            raise InputError(f"anomaly_strength must be a float or a tensor of shape ({like.shape[0]},), "
                             f"got shape {tuple(anomaly_strength.shape)}")
        if bool((strength < 0).any()):
            raise InputError("anomaly_strength must be >= 0")
        strength = strength.to(device=like.device, dtype=like.dtype)
        return torch.sqrt(offset + strength).reshape(-1, *([1] * (like.ndim - 1)))
    value = float(anomaly_strength)
    if value < 0 or not np.isfinite(value):
        raise InputError(f"anomaly_strength must be a finite number >= 0, got {anomaly_strength}")
    return float(np.sqrt(offset + value))


def _is_zero(anomaly_strength: StrengthLike) -> bool:
    if isinstance(anomaly_strength, torch.Tensor):
        return not bool((anomaly_strength != 0).any())
    return float(anomaly_strength) == 0.0


class SDASScheduler(DDPMScheduler):
    """Respaced IDDPM ancestral sampler with the SDAS anomaly strength (the official SDAS sampler).

    Identical to `DDPMScheduler` (defaults changed to ``variance_type="learned_range"``: the model
    predicts ε and the variance interpolation v, 6 output channels) except that `step` accepts
    ``anomaly_strength`` and multiplies the noise term by ``sqrt(1 + s)``. With ``s = 0`` the result is
    bit for bit the parent's step for the same generator state. Call ``set_timesteps(20)`` for the
    official 20-step respacing (the pipeline does).
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: str = "learned_range",
        clip_sample: bool = True,
        prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        super().__init__(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, variance_type=variance_type,
            clip_sample=clip_sample, prediction_type=prediction_type, thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio, clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )

    def _neighbour_timesteps(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectorised previous and following timesteps of the chain (respaced after `set_timesteps`,
        else t - 1 and t + 1); -1 before the first step, `num_train_timesteps` after the last."""
        if self.custom_timesteps or self.num_inference_steps:
            schedule = self.timesteps.to(timesteps.device)
            index = (schedule[None, :] == timesteps[:, None]).int().argmax(dim=1)
            if not bool((schedule[index] == timesteps).all()):
                raise InputError(f"timesteps {timesteps.tolist()} are not all in the scheduler's timesteps")
            previous = torch.cat([schedule[1:], schedule.new_tensor([-1])])
            following = torch.cat([schedule.new_tensor([self.config.num_train_timesteps]), schedule[:-1]])
            return previous[index], following[index]
        return timesteps - 1, timesteps + 1

    def log_variance(self, t: int | torch.Tensor, predicted_variance: torch.Tensor) -> torch.Tensor:
        """Learned-range log Σθ at timestep `t` (int, 0-d tensor, or a (B,) tensor of per-sample timesteps).

        Uses the respaced step (t -> previous scheduled timestep) after `set_timesteps`, the plain
        1000-step chain before. `predicted_variance` is the model's v output (B,C,H,W). At the last
        step (t = 0, zero posterior variance) the lower end is the following step's posterior
        variance, as in the official sampler and the training loss; sampling adds no noise there.
        """
        scalar = not isinstance(t, torch.Tensor) or t.ndim == 0
        timesteps = torch.tensor([int(t)]) if scalar else t.detach().long().cpu()  # one step broadcasts over B
        previous, following = self._neighbour_timesteps(timesteps)
        return _per_sample_log_variance(self.alphas_cumprod, timesteps, previous, following, self.one,
                                        predicted_variance)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        anomaly_strength: StrengthLike = 0.0,
    ) -> DDPMSchedulerOutput | tuple:
        """One ancestral step ``x_{t-1} = mu + sqrt(1 + s) * sigma * z`` (``z`` drawn exactly as the parent).

        Args:
            model_output: (B, 2C, H, W) ε and v for learned variances (or (B, C, H, W) for fixed ones).
            timestep: current (original-scale) timestep.
            sample: x_t, (B, C, H, W).
            generator: a generator or one per sample, as in `DDPMScheduler.step`.
            anomaly_strength: s >= 0, a float or a (B,) tensor (one strength per sample).
        """
        t = timestep
        prev_t = self.previous_timestep(t)

        if model_output.shape[1] == sample.shape[1] * 2 and self.variance_type in ["learned", "learned_range"]:
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        else:
            predicted_variance = None

        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t

        pred_original_sample = self._predicted_original(model_output, sample, alpha_prod_t, beta_prod_t)
        pred_original_sample_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
        current_sample_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
        pred_prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample

        scale = _strength_factor(anomaly_strength, model_output, offset=1.0)
        variance = 0
        if t > 0:
            variance_noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                          dtype=model_output.dtype)
            if self.variance_type == "fixed_small_log":
                variance = self._get_variance(t, predicted_variance=predicted_variance) * variance_noise
            elif self.variance_type == "learned_range":
                variance = self._get_variance(t, predicted_variance=predicted_variance)
                variance = torch.exp(0.5 * variance) * variance_noise
            else:
                variance = (self._get_variance(t, predicted_variance=predicted_variance) ** 0.5) * variance_noise
            variance = variance * scale

        pred_prev_sample = pred_prev_sample + variance

        if not return_dict:
            return (pred_prev_sample, pred_original_sample)
        return DDPMSchedulerOutput(prev_sample=pred_prev_sample, pred_original_sample=pred_original_sample)

    def _predicted_original(self, model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor,
                            beta_prod_t: torch.Tensor) -> torch.Tensor:
        """x_0 predicted from the model output (as the parent: per prediction type, then thresholded or clipped)."""
        if self.config.prediction_type == "epsilon":
            pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        elif self.config.prediction_type == "sample":
            pred_original_sample = model_output
        elif self.config.prediction_type == "v_prediction":
            pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
        else:
            raise InputError(f"prediction_type must be epsilon, sample or v_prediction, got {self.config.prediction_type!r}")

        if self.config.thresholding:
            return self._threshold_sample(pred_original_sample)
        if self.config.clip_sample:
            return pred_original_sample.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return pred_original_sample


class SDASDDIMScheduler(DDIMScheduler):
    """DDIM with the SDAS perturbation: ``x_{t-1} = DDIM(x_t) + sqrt(s * Sigma_theta) * z`` (official DDIM variant).

    Σθ is the learned-range variance of the respaced step, computed from the model's v channels, so
    `step` takes the full (B, 2C, H, W) output (a (B, C, H, W) ε-only output works for ``s = 0``).
    ``use_clipped_model_output`` defaults to True: like guided-diffusion, ε is re-derived from the
    clipped x̂0. With ``s = 0`` the step equals `DDIMScheduler.step(eps, ..., use_clipped_model_output=True)`.
    The official code suggests much smaller strengths for DDIM (s in [0.01, 0.03]).
    """

    def log_variance(self, t: int | torch.Tensor, predicted_variance: torch.Tensor) -> torch.Tensor:
        """Learned-range log Σθ of the DDIM step from `t` to ``t - T // num_inference_steps``."""
        if self.num_inference_steps is None:
            raise InputError("call set_timesteps(num_inference_steps) before log_variance")
        stride = self.config.num_train_timesteps // self.num_inference_steps
        scalar = not isinstance(t, torch.Tensor) or t.ndim == 0
        timesteps = torch.tensor([int(t)]) if scalar else t.detach().long().cpu()  # one step broadcasts over B
        return _per_sample_log_variance(self.alphas_cumprod, timesteps, timesteps - stride, timesteps + stride,
                                        self.final_alpha_cumprod, predicted_variance)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = True,
        generator: torch.Generator | list[torch.Generator] | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
        anomaly_strength: StrengthLike = 0.0,
    ) -> DDIMSchedulerOutput | tuple:
        """DDIM step plus ``sqrt(s) * exp(0.5 * log Sigma_theta) * z`` for t > 0.

        As in the official code, one noise tensor z serves both the eta noise and the SDAS term.
        """
        if self.num_inference_steps is None:
            raise InputError("call set_timesteps(num_inference_steps) before step")
        channels = sample.shape[1]
        if model_output.shape[1] == 2 * channels:
            eps, predicted_variance = torch.split(model_output, channels, dim=1)
        else:
            eps, predicted_variance = model_output, None
        perturb = not _is_zero(anomaly_strength) and int(timestep) > 0
        if perturb and predicted_variance is None:
            raise InputError("anomaly_strength > 0 needs the model's variance channels (a (B, 2C, H, W) output)")
        noise = variance_noise
        if noise is None and (eta > 0 or perturb):
            noise = randn_tensor(eps.shape, generator=generator, device=eps.device, dtype=eps.dtype)
        output = super().step(eps, timestep, sample, eta=eta, use_clipped_model_output=use_clipped_model_output,
                              generator=None, variance_noise=noise if eta > 0 else None, return_dict=True)
        prev_sample = output.prev_sample
        if perturb:
            scale = _strength_factor(anomaly_strength, eps, offset=0.0)
            log_var = self.log_variance(timestep, predicted_variance)
            prev_sample = prev_sample + scale * torch.exp(0.5 * log_var) * noise
        if not return_dict:
            return (prev_sample, output.pred_original_sample)
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=output.pred_original_sample)


SAMPLERS: dict[str, type[SchedulerMixin]] = {"ddpm": SDASScheduler, "ddim": SDASDDIMScheduler}


def make_scheduler(sampler: str, config: dict | None = None) -> SchedulerMixin:
    """An SDAS scheduler by name ("ddpm" = official ancestral sampler, "ddim"), optionally from another's config."""
    key = sampler.strip().lower()
    if key not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; expected one of: {', '.join(SAMPLERS)}")
    cls = SAMPLERS[key]
    if config is None:
        return cls()
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return cls.from_config({k: v for k, v in dict(config).items() if k in accepted})
