"""Flow-matching supervised fine-tuning of the student (``method.name: finetune``)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from fv_accel import flow
from fv_accel.config import MethodConfigBase, RunConfig
from fv_accel.data import LatentBatch
from fv_accel.flops import PassCount
from fv_accel.methods.base import StepOutput, TrainingMethod
from fv_accel.methods.registry import register_method
from fv_accel.models.base import ModelBase


class FinetuneMethodConfig(MethodConfigBase):
    """Flow-matching supervised fine-tuning of the student."""

    name: Literal["finetune"]
    """Selects this method; keys of other methods are unknown keys here."""
    weighting_scheme: Literal["uniform", "logit_normal"] = "uniform"
    """How training timesteps u ∈ (0, 1) are drawn before the student's flow shift is applied."""
    logit_mean: float = 0.0
    """logit_normal only: mean of z ~ N(mean, std); σ = shift(1 − sigmoid(z)) as in diffusers' and FastVideo's
    training scripts, so a positive mean favours *low* noise (mean 1, shift 3: median t ≈ 525)."""
    logit_std: float = Field(1.0, gt=0)
    """logit_normal only: standard deviation of z."""


@register_method
class FinetuneMethod(TrainingMethod):
    """Loss: ‖v̂(x_t, t) − (ε − x0)‖² with t drawn uniformly or logit-normally, then shifted."""

    name: ClassVar[str] = "finetune"
    Config: ClassVar[type[MethodConfigBase]] = FinetuneMethodConfig

    def __init__(self, *, cfg: RunConfig, role_models: dict[str, ModelBase]) -> None:
        super().__init__(cfg=cfg, role_models=role_models)
        assert isinstance(cfg.method, FinetuneMethodConfig)  # the base class checked it against Config
        self.config: FinetuneMethodConfig = cfg.method

    def single_train_step(self, batch: LatentBatch, step: int) -> StepOutput:
        assert self.cuda_generator is not None, "on_train_start() was not called"
        student = self.student
        cond = student.prepare_batch(batch, student.device)
        if cond.latents_bcthw is None:
            raise ValueError("finetune needs latents; text-only data only works with method dmd2 (simulate)")
        x0 = cond.latents_bcthw
        gen = self.cuda_generator
        noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
        t = flow.sample_training_timesteps(
            x0.shape[0], scheme=self.config.weighting_scheme, shift=student.flow_shift, generator=gen,
            device=x0.device, logit_mean=self.config.logit_mean, logit_std=self.config.logit_std,
        )
        x_t = student.add_noise(x0, noise, t)
        v_pred = student.predict_velocity(x_t, t, cond.text_embeds_bld)
        loss = torch.mean((v_pred - flow.velocity_target(x0, noise)) ** 2)
        b = x0.shape[0]
        return StepOutput(losses={"loss": loss}, loss_roles={"loss": "student"},
                          passes={"student": PassCount(forward=b, backward=b)})
