"""The one sampling loop: every pipeline (cascade, volume, latent EM) denoises through :func:`denoise`.

Guidance is a chain of conditions, from least to most conditioned::

    eps = e0 + w1 (e1 - e0) + w2 (e2 - e1) + ...

With one guided condition this is classifier-free guidance ``eps = u + w (c - u)``: ``w = 0`` is the
unconditional prediction, ``w = 1`` the conditional one, ``w > 1`` pushes further. The predictions
that carry a non-zero weight are computed in **one batched forward**; the others are skipped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from ..errors import UserInputError
from ..progress import Progress, ProgressCallback

SAMPLERS = ("dpmsolver++", "ddim", "ddpm")
DEFAULT_SAMPLER = "dpmsolver++"
DEFAULT_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon"}


def make_scheduler(name: str, schedule: dict | None = None, *, clip: bool = True):
    """A diffusers scheduler for ``name`` over the noise schedule a model was trained with.

    ``clip``: clip the predicted x0 to [-1, 1] at every step (images); off for latents, which are
    not bounded.
    """
    sched = dict(DEFAULT_SCHEDULE)
    sched.update(schedule or {})
    name = name.lower()
    if name == "ddpm":
        return DDPMScheduler(**sched, clip_sample=clip)
    if name == "ddim":
        return DDIMScheduler(**sched, clip_sample=clip, timestep_spacing="trailing", set_alpha_to_one=False)
    if name in ("dpmsolver++", "dpm-solver++", "dpmsolver"):
        # The cosine schedule ends at alpha_bar ~ 2e-9: x0 = (x - sigma eps) / alpha blows any error in
        # eps up by ~1e4 at the first steps. Clip lambda (diffusers: "critical for the cosine schedule")
        # and clip x0 to [-1, 1] (thresholding with max 1), as clip_sample does for DDIM and DDPM.
        return DPMSolverMultistepScheduler(**sched, algorithm_type="dpmsolver++", solver_order=2,
                                           lambda_min_clipped=-5.1, thresholding=clip, sample_max_value=1.0)
    raise UserInputError(f"unknown sampler '{name}': choose one of {', '.join(SAMPLERS)}.")


def check_steps(steps: int) -> int:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise UserInputError(f"steps must be a whole number of at least 1, got {steps!r}.")
    if steps > 1000:
        raise UserInputError(f"steps must be at most 1000 (the models' training schedule), got {steps}.")
    return steps


def check_guidance(guidance: float, what: str = "guidance") -> float:
    g = float(guidance)
    if not g == g or g < 0:  # NaN or negative
        raise UserInputError(f"{what} must be 0 or more (0 = unconditional, 1 = conditional), got {guidance!r}.")
    return g


def generators(seed: int, n: int) -> list[torch.Generator]:
    """One CPU generator per sample (seed, seed+1, ...): sample i of a batch equals a run with seed+i."""
    if not isinstance(seed, int) or seed < 0:
        raise UserInputError(f"seed must be a whole number of 0 or more, got {seed!r}.")
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


def randn(shape: Sequence[int], gens: list[torch.Generator], device: torch.device) -> torch.Tensor:
    """Gaussian noise of ``shape`` (batch first), drawn on the CPU from one generator per sample."""
    per = tuple(shape[1:])
    return torch.stack([torch.randn(per, generator=g) for g in gens]).to(device)


def _coefficients(weights: Sequence[float]) -> list[float]:
    # e0 + w1(e1-e0) + w2(e2-e1) = (1-w1) e0 + (w1-w2) e1 + w2 e2
    w = [1.0, *weights]
    return [w[i] - (w[i + 1] if i + 1 < len(w) else 0.0) for i in range(len(w))]


def _cat_conditions(conds: list[dict]) -> dict:
    keys = conds[0].keys()
    return {k: (None if conds[0][k] is None else torch.cat([c[k] for c in conds])) for k in keys}


@torch.no_grad()
def denoise(
    model: Callable[..., torch.Tensor],
    shape: Sequence[int],
    *,
    conditions: Sequence[dict],
    guidance: Sequence[float] = (),
    sampler: str = DEFAULT_SAMPLER,
    steps: int = 25,
    schedule: dict | None = None,
    gens: list[torch.Generator],
    device: torch.device,
    dtype: torch.dtype | None = None,
    callback: ProgressCallback | None = None,
    stage: str = "sample",
    stage_index: int = 0,
    n_stages: int = 1,
    clip: bool = True,
) -> torch.Tensor:
    """Run the reverse diffusion for a batch and return x0 (float32, on ``device``).

    ``conditions``: keyword arguments for ``model``, least to most conditioned; each tensor has the
    batch size of ``shape``. ``guidance``: one weight per condition after the first.
    ``callback`` is called after every step; it stops the loop by raising :class:`Cancelled`.
    ``clip``: keep the predicted x0 in [-1, 1] (images; False for latents).
    """
    if len(guidance) != len(conditions) - 1:
        raise ValueError("guidance needs one weight per condition after the first")
    check_steps(steps)
    for w in guidance:
        check_guidance(w)
    if len(gens) != shape[0]:
        raise ValueError("one generator per sample is needed")
    scheduler = make_scheduler(sampler, schedule, clip=clip)
    scheduler.set_timesteps(steps, device=device)
    coeffs = _coefficients(guidance)
    used = [i for i, a in enumerate(coeffs) if a != 0.0]
    batched = _cat_conditions([conditions[i] for i in used])
    n = shape[0]
    x = randn(shape, gens, device) * scheduler.init_noise_sigma
    amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    total = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t)
        with amp:
            out = model(x_in.repeat(len(used), *([1] * (x.ndim - 1))), t, **batched)
        out = out.float().split(n)
        pred = sum(coeffs[j] * o for j, o in zip(used, out))
        x = scheduler.step(pred, t, x, generator=gens).prev_sample
        if callback is not None:
            callback(Progress(stage, i + 1, total, stage_index, n_stages))
    return x
