"""Few-step and many-step samplers shared by validation, ``recipes/sample.py`` and the toy quality check.

Two samplers over the flow-matching conventions of :mod:`fv_accel.flow`:
- ``euler_sample``: the deterministic flow ODE, K Euler steps along a shifted schedule (teacher sampling);
- ``dmd_sample``: the DMD student's sampler: at each step t_k predict x0, then re-noise it to t_{k+1} with fresh
  noise (the same operation as the training rollout).
Both work in the model's normalised latent space and draw every random number from ``generator``: one
generator for the whole batch, or one per sample (row ``i`` draws from ``generator[i]``), which makes a sample's
noise independent of the batch it is drawn in (validation splits its prompts over ranks this way).
"""

from __future__ import annotations

from collections.abc import Sequence

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
        return model.predict_noise(x, t, text)
    # cond and uncond in one batched forward; standard CFG: uncond + w·(cond − uncond)
    v = model.predict_noise(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, uncond]))
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
