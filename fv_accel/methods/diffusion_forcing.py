"""Diffusion forcing: flow-matching fine-tuning of a causal student with a noise level per block
(``method.name: diffusion_forcing``).

The student must be a ``wan_causal`` role (``models.student.family``; exit 2 otherwise). Per micro-batch, for
each sample and each of the student's blocks (``num_frames_per_block`` latent frames, remainder first,
``fv_accel/causal_blocks.py``) a timestep is drawn independently, exactly as ``method.name: finetune`` draws its
one timestep per sample (``weighting_scheme``, ``logit_mean``/``logit_std``, then the student's flow shift,
``fv_accel.flow.sample_training_timesteps``), from the method's ``cuda_generator``: first the noise ε like x0,
then the B × num_blocks timesteps, row-major (sample, block). Every frame of a block takes its block's t, so
t is [B, F]; x_t = (1 − σ_f)·x0 + σ_f·ε per frame, and

    loss = mean over (B, C, F, H, W) of (v̂(x_t, t, text) − (ε − x0))²

with v̂ the block-causal forward over the whole clip (``CausalWanModel.predict_velocity``: each block sees
itself and the *noisy* earlier blocks, at their own noise levels). One noise level per block is what lets a
causal student denoise block b while earlier blocks are at any other level (streaming at inference).

``teacher_forcing: true`` uses the teacher-forced forward instead (``CausalWanModel.predict_velocity_teacher_forced``):
one forward over [clean | noisy], where each noisy block sees itself and the *clean* copies of earlier blocks,
the context streaming inference commits to the KV cache. The clean copies are x0 embedded at
``clean_context_timestep`` (0 by default); above 0 they are x0 re-noised to that timestep with fresh noise
(drawn after t), as inference re-noises its committed context. The loss is over the noisy copy only.

Validation and ``recipes/sample.py`` generate as ``method.name: finetune`` does (the Euler sampler; for a causal
student it streams block by block).

Cost at Wan 2.1 1.3B, 480×832, 81 frames (21 latent frames of 60×104, 1,560 tokens each, N = 32,760 tokens;
blocks of 3 → 7 blocks; D = 1,536, 30 layers, 512 text tokens; counting as ``fv_accel/flops.py``):

- mask path: a dense [N, N] boolean mask, N² = 1.073e9 entries = 1.07 GB (kept per clip shape). Torch SDPA
  with an arbitrary mask computes every score: self-attention scores + weighted sum 4·N²·D per layer =
  1.98e14 FLOPs per forward (70 % of the forward's 2.83e14), of which the block-causal pattern needs only
  252/441 = 4/7 of the frame pairs.
- teacher forcing doubles the tokens (2N = 65,520): the mask is (2N)² = 4.29e9 entries = 4.29 GB, exactly
  4× the mask path's; the dense self-attention is exactly 4× (7.91e14 FLOPs per forward), while the pairs the
  mask allows are only 2× (504 of 1,764 frame pairs, density 2/7 instead of 4/7); the linear layers are 2×.
  One teacher-forced forward costs 9.61e14 FLOPs, 3.40× a mask-path forward. The step reports it as two
  sample passes (``PassCount``), so its MFU undercounts the quadratic attention term (by 41 % at this size).
A flex-attention block mask would make the mask O(blocks²) and skip the masked scores; not implemented here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal, Protocol, cast

import torch
from pydantic import Field

from fv_accel import flow
from fv_accel.config import MethodConfigBase, RunConfig
from fv_accel.data import LatentBatch
from fv_accel.errors import DataError
from fv_accel.flops import PassCount
from fv_accel.methods.base import StepOutput
from fv_accel.methods.finetune import FinetuneMethod, FinetuneMethodConfig
from fv_accel.methods.ode_init import frame_blocks
from fv_accel.methods.registry import register_method
from fv_accel.models.base import ModelBase

CAUSAL_FAMILY = "wan_causal"


class TeacherForcedModel(Protocol):
    """What ``teacher_forcing`` needs from the student (``fv_accel.models.wan_causal.CausalWanModel``)."""

    def predict_velocity_teacher_forced(self, x_t: torch.Tensor, t: torch.Tensor, x_clean: torch.Tensor,
                                        text_embeds_bld: torch.Tensor, *, t_clean: float = 0.0) -> torch.Tensor:
        ...


class DiffusionForcingMethodConfig(FinetuneMethodConfig):
    """Flow-matching fine-tuning of a causal student, one timestep per block (the timestep keys are
    ``finetune``'s)."""

    name: Literal["diffusion_forcing"]  # type: ignore[assignment]  # a Literal per method selects it
    """Selects this method; keys of other methods are unknown keys here."""
    teacher_forcing: bool = False
    """Each noisy block sees the clean copies of earlier blocks (a doubled sequence) instead of their noisy
    versions."""
    clean_context_timestep: float = Field(0.0, ge=0, lt=flow.NUM_TRAIN_TIMESTEPS)
    """teacher_forcing only: the timestep of the clean copies, in [0, 1000); above 0 they are x0 re-noised to it."""


@register_method
class DiffusionForcingMethod(FinetuneMethod):
    """Diffusion forcing: see the module docstring. Roles: ``student`` (trainable, family ``wan_causal``)."""

    name: ClassVar[str] = "diffusion_forcing"
    Config: ClassVar[type[MethodConfigBase]] = DiffusionForcingMethodConfig

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        family = cfg.models["student"].family
        if family != CAUSAL_FAMILY:
            raise ValueError(f"models.student.family must be {CAUSAL_FAMILY} for method.name={cls.name} "
                             f"(got {family!r}): diffusion forcing trains a block-causal student")

    def __init__(self, *, cfg: RunConfig, role_models: dict[str, ModelBase]) -> None:
        super().__init__(cfg=cfg, role_models=role_models)
        assert isinstance(cfg.method, DiffusionForcingMethodConfig)  # the base class checked it against Config
        self.config: DiffusionForcingMethodConfig = cfg.method
        self.last_timesteps_bf: torch.Tensor | None = None
        """The timesteps of the last micro-batch, per sample and latent frame ([B, F], on the student's device;
        logging and tests)."""

    def draw_block_timesteps(self, batch_size: int, block_sizes: Sequence[int]) -> torch.Tensor:
        """One timestep per sample and block, drawn as ``finetune`` draws one per sample, expanded to the
        blocks' frames: [B, F] on the student's device."""
        gen = self.cuda_generator
        assert gen is not None, "on_train_start() was not called"
        t = flow.sample_training_timesteps(
            batch_size * len(block_sizes), scheme=self.config.weighting_scheme, shift=self.student.flow_shift,
            generator=gen, device=self.student.device, logit_mean=self.config.logit_mean,
            logit_std=self.config.logit_std,
        ).view(batch_size, len(block_sizes))
        return t.repeat_interleave(torch.tensor(list(block_sizes), device=t.device), dim=1)

    def single_train_step(self, batch: LatentBatch, step: int) -> StepOutput:
        gen = self.cuda_generator
        assert gen is not None, "on_train_start() was not called"
        student = self.student
        cond = student.prepare_batch(batch, student.device)
        if cond.latents_bcthw is None:
            raise DataError("method.name=diffusion_forcing needs latents in training.data.data_path (text-only "
                            "rows only work with method dmd2)")
        x0 = cond.latents_bcthw
        b, num_frames = x0.shape[0], x0.shape[2]
        noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
        t = self.draw_block_timesteps(b, frame_blocks(student, num_frames))
        self.last_timesteps_bf = t
        x_t = student.add_noise(x0, noise, t)
        if self.config.teacher_forcing:
            t_clean = self.config.clean_context_timestep
            x_clean = x0
            if t_clean > 0:
                context_noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
                x_clean = student.add_noise(x0, context_noise, torch.full((b,), t_clean, device=x0.device))
            # check_config made the student a wan_causal role
            v_pred = cast("TeacherForcedModel", student).predict_velocity_teacher_forced(
                x_t, t, x_clean, cond.text_embeds_bld, t_clean=t_clean)
            passes = PassCount(forward=2 * b, backward=2 * b)  # twice the tokens; see the module docstring
        else:
            v_pred = student.predict_velocity(x_t, t, cond.text_embeds_bld)
            passes = PassCount(forward=b, backward=b)
        loss = torch.mean((v_pred - flow.velocity_target(x0, noise)) ** 2)
        return StepOutput(losses={"loss": loss}, loss_roles={"loss": "student"}, passes={"student": passes})


__all__ = ["DiffusionForcingMethod", "DiffusionForcingMethodConfig"]
