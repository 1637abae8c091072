"""What a diffusion model learns, written once for every model that trains (cascade stages, latent
UNet): the noise schedule a loss implies, the noised batch with its epsilon or v target, and the
noising of a condition to a known level (the low-res image of a super-resolution stage, the plane
above in a volume model: Imagen / DeepFloyd IF "noise conditioning augmentation"), which sampling
applies exactly as training did.
"""

from __future__ import annotations

import torch

from .sampling import DEFAULT_SCHEDULE, make_scheduler


def prediction_type(loss: str) -> str:
    """``v_prediction`` for the ``v`` loss, else ``epsilon`` (the l1 and l2 losses on the noise)."""
    return "v_prediction" if loss == "v" else "epsilon"


def schedule_for(loss: str) -> dict:
    """The noise schedule (a diffusers scheduler config) of a model trained with ``loss``."""
    return dict(DEFAULT_SCHEDULE, prediction_type=prediction_type(loss))


def training_scheduler(schedule: dict):
    """The DDPM scheduler that noises training batches (and holds the schedule's alphas)."""
    return make_scheduler("ddpm", schedule)


def alphas(schedule: dict) -> torch.Tensor:
    """alpha_bar(t) of a noise schedule, t = 0 .. T-1."""
    return training_scheduler(schedule).alphas_cumprod


def noised_batch(x0: torch.Tensor, scheduler, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random time step per item, ``x0`` noised to it, and the model's target there.

    Returns ``(x_t, t, target)``: the target is the noise (epsilon) or the velocity
    ``v = sqrt(a) eps - sqrt(1 - a) x0``, as the scheduler's ``prediction_type`` says. The draws come
    from ``g`` (time steps first, then the noise).
    """
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    xt = scheduler.add_noise(x0, noise, t)
    v = scheduler.config.prediction_type == "v_prediction"
    return xt, t, scheduler.get_velocity(x0, noise, t) if v else noise


def noise_to_level(x: torch.Tensor, level, alphas_cumprod: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``x`` noised to ``level`` in [0, 1] of the diffusion schedule (a float, or one per item):
    ``sqrt(a) x + sqrt(1 - a) noise`` with ``a`` = alpha_bar at step ``round(level * (T - 1))``."""
    level = torch.as_tensor(level, dtype=torch.float32).reshape(-1)
    last = len(alphas_cumprod) - 1
    a = alphas_cumprod[(level * last).round().long().clamp(0, last)]
    a = a.to(x.device).view(-1, *([1] * (x.ndim - 1)))
    return a.sqrt() * x + (1 - a).sqrt() * noise


__all__ = ["alphas", "noise_to_level", "noised_batch", "prediction_type", "schedule_for", "training_scheduler"]
