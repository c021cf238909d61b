"""Few-step and many-step samplers shared by validation, ``recipes/sample.py`` and the toy quality check.

Two samplers over the flow-matching conventions of :mod:`fv_accel.flow`:
- ``euler_sample``: the deterministic flow ODE, K Euler steps along a shifted schedule (teacher sampling);
- ``dmd_sample``: the DMD student's sampler: at each step t_k predict x0, then re-noise it to t_{k+1} with fresh
  noise (the same operation as the training rollout).
Both work in the model's normalised latent space and draw every random number from ``generator``: one
generator for the whole batch, or one per sample (row ``i`` draws from ``generator[i]``), which makes a sample's
noise independent of the batch it is drawn in (validation splits its prompts over ranks this way).
``distilled_scheduler_config`` is ``dmd_sample`` as a diffusers scheduler config: what an exported few-step
pipeline runs (``fv_accel/export/diffusers.py`` bundles it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fv_accel import flow
from fv_accel.models.base import ModelBase

#: One generator for the batch, or one per sample.
Generators = torch.Generator | Sequence[torch.Generator]


def randn_rows(shape: Sequence[int], generator: Generators, device: torch.device) -> torch.Tensor:
    """Standard normal noise of ``shape`` (``[B, ...]``); with one generator per row, row ``i`` is drawn from
    ``generator[i]`` alone, so it does not depend on the other rows."""
    if isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device) for g in generator])


def _velocity(
    model: ModelBase,
    x: torch.Tensor,
    t: torch.Tensor,
    text: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance_scale: float,
) -> torch.Tensor:
    if uncond is None or guidance_scale == 1.0:
        return model.predict_velocity(x, t, text)
    # cond and uncond in one batched forward; standard CFG: uncond + w·(cond − uncond)
    v = model.predict_velocity(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, uncond]))
    v_cond, v_uncond = v.chunk(2)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


@torch.no_grad()
def euler_sample(
    model: ModelBase,
    text_embeds_bld: torch.Tensor,
    *,
    latent_shape: Sequence[int],
    num_steps: int,
    shift: float,
    generator: Generators,
    guidance_scale: float = 1.0,
    uncond_embeds_bld: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate the flow ODE from pure noise with ``num_steps`` Euler steps; returns x0 (normalised space)."""
    device = text_embeds_bld.device
    b = text_embeds_bld.shape[0]
    x = randn_rows((b, *latent_shape), generator, device)
    schedule = flow.sampling_schedule(num_steps, shift, device=device)
    for k in range(num_steps):
        t = schedule[k].expand(b)
        v = _velocity(model, x, t, text_embeds_bld, uncond_embeds_bld, guidance_scale)
        x = flow.euler_step(x, v, t, schedule[k + 1].expand(b))
    return x


@torch.no_grad()
def dmd_sample(
    model: ModelBase,
    text_embeds_bld: torch.Tensor,
    *,
    latent_shape: Sequence[int],
    denoising_steps: Sequence[int],
    generator: Generators,
) -> torch.Tensor:
    """The few-step DMD sampler: x0 prediction at each step, re-noised to the next step; returns x0."""
    device = text_embeds_bld.device
    b = text_embeds_bld.shape[0]
    x = randn_rows((b, *latent_shape), generator, device)
    x0 = x
    for k, step in enumerate(denoising_steps):
        t = torch.full((b,), float(step), device=device)
        x0 = model.predict_x0(x, t, text_embeds_bld)
        if k + 1 < len(denoising_steps):
            noise = randn_rows(x0.shape, generator, device)
            x = flow.add_noise(x0, noise, torch.full((b,), float(denoising_steps[k + 1]), device=device))
    return x0


# -- the same sampler as a diffusers scheduler (what an exported pipeline runs) ----------------------------
def distilled_scheduler_config(denoising_steps: list[int]) -> dict[str, Any]:
    """A FlowMatchEulerDiscreteScheduler config whose default K-step schedule is the DMD schedule.

    fv_accel's few-step sampler predicts x0 at each step t_k and re-noises it to t_{k+1} with fresh noise:
    exactly FlowMatchEuler with ``stochastic_sampling=True``. With ``shift=1`` and K steps, diffusers spaces
    σ evenly from 1 to 0.001; ``shift_terminal`` stretches that so the last σ is t_K/1000, which reproduces
    an evenly spaced DMD schedule such as [1000, 750, 500, 250] exactly with ``num_inference_steps=K``.
    """
    cfg: dict[str, Any] = {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
        "stochastic_sampling": True,
    }
    if len(denoising_steps) > 1:
        cfg["shift_terminal"] = denoising_steps[-1] / 1000.0
    return cfg


def scheduler_timesteps(scheduler_cfg: dict[str, Any], num_steps: int) -> list[float]:
    """The timesteps the exported scheduler runs for ``num_steps`` (what a pipeline call will use)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_cfg)
    scheduler.set_timesteps(num_steps)
    return [round(float(t), 3) for t in scheduler.timesteps]
