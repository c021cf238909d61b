"""Few-step and many-step samplers shared by validation, ``recipes/sample.py`` and the toy quality check.

Two samplers over the flow-matching conventions of :mod:`fv_accel.flow`:
- ``euler_sample``: the deterministic flow ODE, K Euler steps along a shifted schedule (teacher sampling;
  ``euler_integrate`` is its loop over any schedule, keeping chosen states);
- ``dmd_sample``: the DMD student's sampler: at each step t_k predict x0, then re-noise it to t_{k+1} with fresh
  noise (the same operation as the training rollout).
Both work in the model's normalised latent space and draw every random number from ``generator``: one
generator for the whole batch, or one per sample (row ``i`` draws from ``generator[i]``), which makes a sample's
noise independent of the batch it is drawn in (validation splits its prompts over ranks this way).
``EulerSampler`` / ``DMDSampler`` bind a sampler's settings; the method class picks the one its student
generates with (``TrainingMethod.sampler(config, ...)``), in training (``validation_sampler()``) and in tools
without a method instance (``recipes/sample.py``) alike. :func:`spread_rows` picks the
dataset rows that condition validation, ``recipes/sample.py`` and the toy quality table.
``distilled_scheduler_config`` is ``dmd_sample`` as a diffusers scheduler config: what an exported few-step
pipeline runs (``fv_accel/export/diffusers.py`` bundles it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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
    """Integrate the flow ODE from pure noise with ``num_steps`` Euler steps; returns x0 (normalised space). A
    streaming (causal) model is sampled block by block (:func:`fv_accel.causal_sampling.causal_euler_sample`)."""
    if model.streams:
        from fv_accel.causal_sampling import causal_euler_sample

        return causal_euler_sample(model, text_embeds_bld, latent_shape=latent_shape,  # type: ignore[arg-type]
                                   num_steps=num_steps, shift=shift, generator=generator,
                                   guidance_scale=guidance_scale, uncond_embeds_bld=uncond_embeds_bld)
    device = text_embeds_bld.device
    b = text_embeds_bld.shape[0]
    x = randn_rows((b, *latent_shape), generator, device)
    schedule = flow.sampling_schedule(num_steps, shift, device=device)
    return euler_integrate(model, x, schedule, text_embeds_bld, guidance_scale=guidance_scale,
                           uncond_embeds_bld=uncond_embeds_bld)[0]


@torch.no_grad()
def euler_integrate(
    model: ModelBase,
    x: torch.Tensor,
    schedule: torch.Tensor,
    text_embeds_bld: torch.Tensor,
    *,
    guidance_scale: float = 1.0,
    uncond_embeds_bld: torch.Tensor | None = None,
    record: Sequence[int] = (),
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Euler steps of the flow ODE from ``x`` at ``schedule[0]`` through every later point of ``schedule``
    (descending timesteps). Returns the final state and the states at the schedule positions ``record`` (what
    ``fv_accel/ode_pairs.py`` stores as the teacher's trajectory)."""
    b = x.shape[0]
    if any(not 0 <= i < schedule.shape[0] for i in record):
        raise ValueError(f"record {list(record)}: positions outside a schedule of {schedule.shape[0]} points")
    kept = {i: x for i in record if i == 0}
    for k in range(schedule.shape[0] - 1):
        t = schedule[k].expand(b)
        v = _velocity(model, x, t, text_embeds_bld, uncond_embeds_bld, guidance_scale)
        x = flow.euler_step(x, v, t, schedule[k + 1].expand(b))
        if k + 1 in record:
            kept[k + 1] = x
    return x, [kept[i] for i in record]


@torch.no_grad()
def dmd_sample(
    model: ModelBase,
    text_embeds_bld: torch.Tensor,
    *,
    latent_shape: Sequence[int],
    denoising_steps: Sequence[float],
    generator: Generators,
    context_noise: float = 0.0,
) -> torch.Tensor:
    """The few-step DMD sampler: x0 prediction at each step, re-noised to the next step; returns x0. A streaming
    (causal) model is sampled block by block (:func:`fv_accel.causal_sampling.causal_dmd_sample`), its blocks
    committed as context at ``context_noise`` (unused otherwise)."""
    if model.streams:
        from fv_accel.causal_sampling import causal_dmd_sample

        return causal_dmd_sample(model, text_embeds_bld, latent_shape=latent_shape,  # type: ignore[arg-type]
                                 denoising_steps=denoising_steps, generator=generator, context_noise=context_noise)
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


@dataclass(frozen=True)
class EulerSampler:
    """:func:`euler_sample` along the model's own shifted schedule; classifier-free guidance when
    ``guidance_scale`` != 1 (then the unconditional embeddings are used, else ignored)."""

    num_steps: int
    guidance_scale: float = 1.0

    def __call__(self, model: ModelBase, text_embeds_bld: torch.Tensor, uncond_embeds_bld: torch.Tensor | None,
                 latent_shape: Sequence[int], generator: Generators) -> torch.Tensor:
        guided = self.guidance_scale != 1.0
        return euler_sample(model, text_embeds_bld, latent_shape=latent_shape, num_steps=self.num_steps,
                            shift=model.flow_shift, generator=generator, guidance_scale=self.guidance_scale,
                            uncond_embeds_bld=uncond_embeds_bld if guided else None)


@dataclass(frozen=True)
class DMDSampler:
    """:func:`dmd_sample` over ``denoising_steps`` (the unconditional embeddings are ignored); a causal model's
    blocks are committed as context at ``context_noise``."""

    denoising_steps: tuple[float, ...]
    context_noise: float = 0.0

    @property
    def num_steps(self) -> int:
        return len(self.denoising_steps)

    def __call__(self, model: ModelBase, text_embeds_bld: torch.Tensor, uncond_embeds_bld: torch.Tensor | None,
                 latent_shape: Sequence[int], generator: Generators) -> torch.Tensor:
        return dmd_sample(model, text_embeds_bld, latent_shape=latent_shape,
                          denoising_steps=list(self.denoising_steps), generator=generator,
                          context_noise=self.context_noise)


#: A sampler with its settings bound (``model, text, uncond, latent_shape, generator`` → x0).
Sampler = EulerSampler | DMDSampler


def spread_rows(num_rows: int, num_samples: int) -> list[int]:
    """``num_samples`` row indices spread evenly over ``[0, num_rows)``, starting at row 0, without repeats (all
    rows when ``num_samples >= num_rows``). Row ``i`` is ``i · num_rows // num_samples``: when the rows come in
    equal groups (the toy world's conditions) and ``num_samples`` is a multiple of the group count, every group
    gets the same number of rows."""
    num = min(num_samples, num_rows)
    return [i * num_rows // num for i in range(num)]


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
