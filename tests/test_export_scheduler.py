"""The exported distilled scheduler re-noises like fv_accel's few-step sampler, step by step.

diffusers' FlowMatchEulerDiscreteScheduler is built from ``distilled_scheduler_config`` and driven the way a
pipeline drives it (velocity in, fresh noise from the generator passed to ``step``). Each step must give
(1 − σ_next)·x̂0 + σ_next·ε_fresh with x̂0 = x − σ·v, and the whole loop must equal ``dmd_sample``.
"""

from __future__ import annotations

import torch
from torch import nn

from fv_accel.config import ModelConfig
from fv_accel.models import ModelBase
from fv_accel.sampling import distilled_scheduler_config, dmd_sample

STEPS = [1000, 750, 500, 250]
SHAPE = (2, 1, 2, 3)  # [C, T, H, W]


class AffineX0Model(ModelBase):
    """x̂0 = 0.5·x_t + mean(text): the velocity is (x_t − x̂0) / σ, so the x0 prediction is known exactly."""

    def normalize_latents(self, latents_bcthw: torch.Tensor) -> torch.Tensor:
        return latents_bcthw

    def denormalize_latents(self, latents_bcthw: torch.Tensor) -> torch.Tensor:
        return latents_bcthw

    def x0_of(self, x_t: torch.Tensor, text_embeds_bld: torch.Tensor) -> torch.Tensor:
        return 0.5 * x_t + text_embeds_bld.float().mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)

    def predict_velocity(self, x_t: torch.Tensor, t: torch.Tensor, text_embeds_bld: torch.Tensor) -> torch.Tensor:
        sigma = (t.float() / 1000).view(-1, 1, 1, 1, 1)
        return (x_t.float() - self.x0_of(x_t, text_embeds_bld)) / sigma


def _model() -> AffineX0Model:
    return AffineX0Model(role="student", transformer=nn.Linear(1, 1), config=ModelConfig(init_from="unused"))


def _text() -> torch.Tensor:
    return torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(9)) + torch.tensor([1.0, -1.0]).view(2, 1, 1)


def _scheduler():  # type: ignore[no-untyped-def]
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(distilled_scheduler_config(STEPS))
    scheduler.set_timesteps(len(STEPS))
    return scheduler


def _pipeline_loop(model: ModelBase, text: torch.Tensor, seed: int,
                   record: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """What a diffusers pipeline does with the exported scheduler: x ~ N(0, I), then step on each timestep."""
    scheduler = _scheduler()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((text.shape[0], *SHAPE), generator=gen)
    for t in scheduler.timesteps:
        v = model.predict_velocity(x, t.expand(text.shape[0]), text)
        out = scheduler.step(v, t, x, generator=gen, return_dict=False)[0]
        if record is not None:
            record.append((x, v, out))
        x = out
    return x


def test_each_step_renoises_the_x0_prediction_with_fresh_noise() -> None:
    model, text = _model(), _text()
    record: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    _pipeline_loop(model, text, seed=4, record=record)
    assert len(record) == len(STEPS)
    replay = torch.Generator().manual_seed(4)
    torch.randn((2, *SHAPE), generator=replay)  # the initial noise
    sigmas = [s / 1000 for s in STEPS] + [0.0]
    for k, (x, v, out) in enumerate(record):
        x0 = x - sigmas[k] * v
        torch.testing.assert_close(x0, model.x0_of(x, text), rtol=1e-5, atol=1e-5)
        fresh = torch.randn(x.shape, generator=replay)  # the scheduler draws one per step, the last one too
        expected = (1 - sigmas[k + 1]) * x0 + sigmas[k + 1] * fresh
        if k + 1 < len(STEPS):  # a deterministic Euler step lands elsewhere
            assert (expected - (x + (sigmas[k + 1] - sigmas[k]) * v)).abs().max() > 0.1
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_scheduler_loop_equals_dmd_sample() -> None:
    model, text = _model(), _text()
    got = _pipeline_loop(model, text, seed=6)
    expected = dmd_sample(model, text, latent_shape=SHAPE, denoising_steps=STEPS,
                          generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the oracle tells re-noising from the deterministic flow ODE: Euler from the same start lands elsewhere
    x = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(6))
    sigmas = [s / 1000 for s in STEPS] + [0.0]
    for k in range(len(STEPS)):
        x = x + (sigmas[k + 1] - sigmas[k]) * (x - model.x0_of(x, text)) / sigmas[k]
    assert (x - expected).abs().max() > 0.1
