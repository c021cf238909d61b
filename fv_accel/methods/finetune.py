"""Flow-matching supervised fine-tuning of the student (``method.name: finetune``)."""

from __future__ import annotations

from typing import ClassVar

import torch

from fv_accel import flow
from fv_accel.config import FinetuneMethodConfig, RunConfig
from fv_accel.data import LatentBatch
from fv_accel.flops import PassCount
from fv_accel.methods.base import StepOutput, TrainingMethod
from fv_accel.models.base import ModelBase


class FinetuneMethod(TrainingMethod):
    """Loss: ‖v̂(x_t, t) − (ε − x0)‖² with t drawn uniformly or logit-normally, then shifted."""

    name: ClassVar[str] = "finetune"

    def __init__(self, *, cfg: RunConfig, role_models: dict[str, ModelBase]) -> None:
        super().__init__(cfg=cfg, role_models=role_models)
        assert isinstance(cfg.method, FinetuneMethodConfig)
        self.config: FinetuneMethodConfig = cfg.method

    def single_train_step(self, batch: LatentBatch, iteration: int) -> StepOutput:
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
