"""Diffusion forcing: flow-matching fine-tuning of a causal student with a noise level per block
(``method.name: diffusion_forcing``).

Role: ``student`` (trainable, family ``wan_causal``). The fine-tune's loss (``fv_accel/methods/finetune.py``)
with one change: instead of one timestep per sample, every sample draws one timestep per attention block of the
student (blocks of ``num_frames_per_block`` latent frames, remainder first, ``fv_accel/causal_blocks.py``),
constant inside the block and independent across blocks and samples; the B·n_blocks draws are the fine-tune's
(``weighting_scheme``, ``logit_mean``, ``logit_std``, then the student's ``flow_shift``), so a per-sample draw is a
special case. Per micro-batch, on ``cuda_generator`` in this order:

1. ε ~ N(0, I) of the latents' shape [B, C, F, H, W];
2. B·n_blocks timesteps (sample-major: draw i·n_blocks + k is block k of sample i), expanded to t [B, F];
3. with ``teacher_forcing`` and ``clean_context_timestep`` t_c > 0 only: a second noise ε_c, and the clean
   context x_c = (1 − t_c/1000)·x0 + (t_c/1000)·ε_c.

Then x_t = (1 − σ)·x0 + σ·ε frame by frame (σ = t / 1000) and

    loss = mean over (B, C, F, H, W) of (v̂ − (ε − x0))²

where v̂ is the student's block-causal forward (``CausalWanModel.predict_velocity``: block b sees blocks ≤ b,
all noisy at their own levels), or with ``teacher_forcing`` its teacher-forced forward
(``CausalWanModel.predict_velocity_teacher_forced``): block b sees its own noisy frames and the clean copies
x_c of blocks < b embedded at t_c (x_c = x0 when t_c = 0). t_c > 0 re-noises the context as a streaming sampler
that commits its outputs at that context noise does (``method.context_noise`` of ``self_forcing``), so the
model is trained on the context it will see. The last draw is public (:attr:`DiffusionForcingMethod.last_timesteps_bf`).

Validation and ``recipes/sample.py`` use the fine-tune's sampler (the Euler flow ODE): a causal student
trained this way is a many-step model.

Cost at Wan 2.1 1.3B (30 layers, D = 1,536, text 512 tokens), 480×832×81 → 21 latent frames × 1,560 tokens =
N = 32,760 tokens, 7 blocks of 3, B = 1 (FLOPs as ``fv_accel/flops.py`` counts them: matmuls, masked entries
included, since SDPA with a dense mask computes them):

- plain (mask path): one forward and one backward over N tokens, as the fine-tune. Self-attention per layer
  8·N·D² + 4·N²·D = 7.21 TFLOP (of which 4·N²·D = 6.59 for scores and weighted sum); the whole forward 283.0
  TFLOP. The mask is N² = 1.073e9 bool entries = 1.07 GB (4/7 of them allowed: 28 of 49 block pairs).
- teacher forcing: 2N = 65,520 tokens. Self-attention per layer 8·2N·D² + 4·(2N)²·D = 27.61 TFLOP, a factor
  4(D + N)/(2D + N) = 3.83 over plain; the whole forward 961.5 TFLOP, 3.40× (the linear layers double, the text
  and time terms stay). The [2N, 2N] mask is 4× plain: 4.29e9 entries = 4.29 GB (56 of 196 block pairs allowed:
  twice plain's useful score entries, computed at four times the cost). Activations double.
- ``StepOutput.passes``: B forwards and B backwards; with teacher forcing B × the student's own FLOP ratio of the
  doubled clip to the clip (``forward_flops``; 2 when the family has no FLOP model), rounded.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from fv_accel import flow
from fv_accel.config import MethodConfigBase, RunConfig
from fv_accel.data import LatentBatch
from fv_accel.flops import PassCount
from fv_accel.methods.base import StepOutput
from fv_accel.methods.causal import causal_student, check_causal_student
from fv_accel.methods.finetune import FinetuneMethod, FinetuneMethodConfig
from fv_accel.methods.registry import register_method
from fv_accel.models.base import ModelBase
from fv_accel.models.wan_causal import CausalWanModel


class DiffusionForcingMethodConfig(FinetuneMethodConfig):
    """The fine-tune's flow matching with an independent timestep per block of a causal student."""

    name: Literal["diffusion_forcing"]  # type: ignore[assignment]
    """Selects this method; keys of other methods are unknown keys here."""
    teacher_forcing: bool = False
    """Each block sees the clean copies of earlier blocks instead of their noisy frames (the teacher-forced
    forward over [clean | noisy]; about 3.4× the forward FLOPs at Wan 1.3B 480×832, see the module docstring)."""
    clean_context_timestep: float = Field(0.0, ge=0, lt=1000)
    """teacher_forcing only: timestep of the clean copies; > 0 re-noises them to it with fresh noise first."""

    @model_validator(mode="after")
    def _context_needs_teacher_forcing(self) -> DiffusionForcingMethodConfig:
        if self.clean_context_timestep > 0 and not self.teacher_forcing:
            raise ValueError("method.clean_context_timestep only applies with method.teacher_forcing: true")
        return self


@register_method
class DiffusionForcingMethod(FinetuneMethod):
    """Diffusion forcing: see the module docstring. Its sampler is the fine-tune's (inherited)."""

    name: ClassVar[str] = "diffusion_forcing"
    Config: ClassVar[type[MethodConfigBase]] = DiffusionForcingMethodConfig

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        super().check_config(cfg)
        check_causal_student(cfg, "diffusion_forcing", "the timesteps are drawn per block of the block-causal mask")

    def __init__(self, *, cfg: RunConfig, role_models: dict[str, ModelBase]) -> None:
        super().__init__(cfg=cfg, role_models=role_models)
        assert isinstance(cfg.method, DiffusionForcingMethodConfig)
        self.config: DiffusionForcingMethodConfig = cfg.method
        self.causal_student: CausalWanModel = causal_student(role_models, "diffusion_forcing")
        self.last_timesteps_bf: torch.Tensor | None = None
        """The timesteps of the last micro-batch, per sample and latent frame (float [B, F], on the device)."""

    def draw_timesteps(self, batch_size: int, block_sizes: list[int], device: torch.device) -> torch.Tensor:
        """One fine-tune draw per sample and block (sample-major), expanded to latent frames: t [B, F]."""
        assert self.cuda_generator is not None, "on_train_start() was not called"
        t = flow.sample_training_timesteps(
            batch_size * len(block_sizes), scheme=self.config.weighting_scheme,
            shift=self.causal_student.flow_shift, generator=self.cuda_generator, device=device,
            logit_mean=self.config.logit_mean, logit_std=self.config.logit_std,
        )
        sizes = torch.tensor(block_sizes, device=device)
        return t.view(batch_size, len(block_sizes)).repeat_interleave(sizes, dim=1, output_size=sum(block_sizes))  # no device sync

    def single_train_step(self, batch: LatentBatch, step: int) -> StepOutput:
        assert self.cuda_generator is not None, "on_train_start() was not called"
        student = self.causal_student
        cond = student.prepare_batch(batch, student.device)
        if cond.latents_bcthw is None:
            raise ValueError("diffusion_forcing needs latents; text-only data only works with method dmd2 (simulate)")
        x0 = cond.latents_bcthw
        gen = self.cuda_generator
        b, num_frames = x0.shape[0], x0.shape[2]
        noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
        t_bf = self.draw_timesteps(b, student.block_sizes(num_frames), x0.device)
        self.last_timesteps_bf = t_bf
        x_t = student.add_noise(x0, noise, t_bf)
        forwards = b
        if self.config.teacher_forcing:
            t_clean = self.config.clean_context_timestep
            x_clean = x0
            if t_clean > 0:
                context_noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
                x_clean = student.add_noise(x0, context_noise, torch.full((b,), t_clean, device=x0.device))
            v_pred = student.predict_velocity_teacher_forced(x_t, t_bf, x_clean, cond.text_embeds_bld,
                                                             t_clean=t_clean)
            forwards = round(b * self.teacher_forcing_cost(x0.shape[1:], cond.text_embeds_bld.shape[1]))
        else:
            v_pred = student.predict_velocity(x_t, t_bf, cond.text_embeds_bld)
        loss = torch.mean((v_pred - flow.velocity_target(x0, noise)) ** 2)
        return StepOutput(losses={"loss": loss}, loss_roles={"loss": "student"},
                          passes={"student": PassCount(forward=forwards, backward=forwards)})

    def teacher_forcing_cost(self, latent_shape: torch.Size | tuple[int, ...], text_len: int) -> float:
        """Forward FLOPs of the teacher-forced (doubled) clip over the clip's, from the student's FLOP model
        (2: the token count, when the family has none)."""
        c, f, h, w = (int(x) for x in latent_shape)
        single = self.causal_student.forward_flops((c, f, h, w), text_len)
        double = self.causal_student.forward_flops((c, 2 * f, h, w), text_len)
        return 2.0 if single is None or double is None else double / single


__all__ = ["DiffusionForcingMethod", "DiffusionForcingMethodConfig"]
