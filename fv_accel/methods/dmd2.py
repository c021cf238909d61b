"""Distribution matching distillation with a trainable critic (``method.name: dmd2``, DESIGN.md §4).

Roles: ``student`` (trainable, the few-step generator), ``teacher`` (frozen, the real score) and ``critic``
(trainable, the fake score: it learns the student's own output distribution by flow matching).

Per iteration (1-based ``iteration`` = the loop's step):
- generator iteration (``iteration > critic_warmup_steps`` and ``iteration % generator_update_interval == 0``):
  the student rolls out x̂0 with one graded forward; x̂0 is noised to a score timestep t; the critic gives
  ``f = x0_fake(x_t)``, the teacher gives the CFG x0 ``r = r_u + w·(r_c − r_u)`` (cond and uncond in one
  batched forward); ``g = (f − r) / mean|x̂0 − r|`` and ``generator_loss = 0.5·mean((x̂0 − sg(x̂0 − g))²)``,
  whose gradient with respect to x̂0 is ``g / numel``: it pulls x̂0 toward the teacher and away from the critic;
- every iteration: ``critic_loss``, the critic's flow-matching loss on detached student samples.

The generator loss reaches only the student (f and r are computed without grad) and the critic loss only the
critic (its samples are detached). So the generator loss is differentiated as soon as it exists
(``backward_now``, generator-first): the student's graph is freed before the critic's rollout and forward, and
one role's graph is alive at a time (``fv_accel/memory.py``). The gradients are bitwise those of one combined
backward of the sum (``eager_backward = False``), which holds both graphs until the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from fv_accel import flow
from fv_accel.config import DMD2MethodConfig, OptimizerConfig, RunConfig
from fv_accel.data import LatentBatch
from fv_accel.errors import ConfigError
from fv_accel.flops import PassCount
from fv_accel.methods import register_method
from fv_accel.methods.base import StepOutput, TrainingMethod, ValidationSampler
from fv_accel.models.base import ConditionBatch, ModelBase
from fv_accel.runtime import reshard_all


def is_generator_step(iteration: int, *, interval: int, warmup: int = 0) -> bool:
    """Whether the student steps at 1-based ``iteration``."""
    return iteration > warmup and iteration % interval == 0


def num_generator_steps(max_train_steps: int, *, interval: int, warmup: int = 0) -> int:
    """How many iterations in 1..max_train_steps are generator iterations."""
    if max_train_steps <= warmup:
        return 0
    return max_train_steps // interval - warmup // interval


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Standard classifier-free guidance: ``uncond + w·(cond − uncond)`` (FastVideo's legacy w is one lower)."""
    return uncond + guidance_scale * (cond - uncond)


def dmd_gradient(x0_student: torch.Tensor, x0_fake: torch.Tensor, x0_real: torch.Tensor) -> torch.Tensor:
    """DMD2's normalised gradient ``(f − r) / mean|x̂0 − r|``, the normaliser taken per sample.

    No ``nan_to_num``: a non-finite value must reach the loop, which stops or skips the step."""
    dims = list(range(1, x0_student.ndim))
    normaliser = (x0_student - x0_real).abs().mean(dim=dims, keepdim=True)
    return (x0_fake - x0_real) / normaliser


def dmd_loss(x0_student: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``0.5·mean((x̂0 − sg(x̂0 − g))²)``: its value is 0.5·mean(g²), its gradient wrt x̂0 is g / numel."""
    target = (x0_student - grad).detach()
    return 0.5 * torch.mean((x0_student - target) ** 2)


def score_timesteps(batch_size: int, cfg: DMD2MethodConfig, *, generator: torch.Generator,
                    device: torch.device) -> torch.Tensor:
    """t for the teacher / critic: uniform in the window ``[min, max]·1000``, shifted, clamped to the window."""
    lo, hi = cfg.min_timestep_ratio * flow.NUM_TRAIN_TIMESTEPS, cfg.max_timestep_ratio * flow.NUM_TRAIN_TIMESTEPS
    t = lo + (hi - lo) * torch.rand(batch_size, generator=generator, device=device)
    return flow.shift_timestep(t, cfg.score_timestep_shift).clamp(lo, hi)


@register_method
class DMD2Method(TrainingMethod):
    """DMD2 with a critic; see the module docstring."""

    name: ClassVar[str] = "dmd2"
    required_roles: ClassVar[tuple[str, ...]] = ("student", "teacher", "critic")
    trainable_roles: ClassVar[tuple[str, ...]] = ("student", "critic")

    def __init__(self, *, cfg: RunConfig, role_models: dict[str, ModelBase]) -> None:
        super().__init__(cfg=cfg, role_models=role_models)
        assert isinstance(cfg.method, DMD2MethodConfig)
        self.config: DMD2MethodConfig = cfg.method
        if role_models["teacher"]._trainable:
            raise ConfigError("models.teacher.trainable must be false for method dmd2 (the teacher is frozen)")
        self.teacher = role_models["teacher"]
        self.critic = role_models["critic"]

    # -- gating -------------------------------------------------------------------------------------------------
    def is_generator_step(self, iteration: int) -> bool:
        return is_generator_step(iteration, interval=self.config.generator_update_interval,
                                 warmup=self.config.critic_warmup_steps)

    def optimizer_configs(self) -> dict[str, OptimizerConfig]:
        return {"student": self.training_config.optimizer, "critic": self.config.critic_optimizer}

    def num_optimizer_steps(self, role: str, max_train_steps: int) -> int:
        if role == "student":
            return num_generator_steps(max_train_steps, interval=self.config.generator_update_interval,
                                       warmup=self.config.critic_warmup_steps)
        return max_train_steps

    def _stepping_roles(self, iteration: int) -> list[str]:
        return ["student", "critic"] if self.is_generator_step(iteration) else ["critic"]

    def get_optimizers(self, iteration: int) -> Sequence[Any]:
        return [self._optimizer_dict[r] for r in self._stepping_roles(iteration) if r in self._optimizer_dict]

    def get_lr_schedulers(self, iteration: int) -> Sequence[Any]:
        return [self._lr_scheduler_dict[r] for r in self._stepping_roles(iteration)
                if r in self._lr_scheduler_dict]

    def get_grad_clip_targets(self, iteration: int) -> dict[str, nn.Module]:
        return {r: self._role_models[r].transformer for r in self._stepping_roles(iteration)}

    # -- student rollout ----------------------------------------------------------------------------------------
    def _rollout(self, cond: ConditionBatch, *, grad: bool) -> tuple[torch.Tensor, int]:
        """Student sample x̂0 (normalised space) with exactly one graded forward when ``grad``.

        Returns x̂0 and the number of student forwards it took (identical on every rank)."""
        assert self.cuda_generator is not None, "on_train_start() was not called"
        gen = self.cuda_generator
        student = self.student
        device = student.device
        steps = self.config.dmd_denoising_steps
        b = cond.batch_size
        text = cond.text_embeds_bld
        # The graded step decides how many forwards run: drawn from the host-side generator that is identical
        # on every rank (no broadcast, no device sync).
        assert self.choice_generator is not None
        index = int(torch.randint(len(steps), (1,), generator=self.choice_generator))
        if self.config.rollout_mode == "data_latent":
            if cond.latents_bcthw is None:
                raise ValueError("method.rollout_mode=data_latent needs latents; text-only data needs simulate")
            t = torch.full((b,), float(steps[index]), device=device)
            noise = torch.randn(cond.latents_bcthw.shape, generator=gen, device=device)
            x_t = student.add_noise(cond.latents_bcthw, noise, t)
            with torch.set_grad_enabled(grad):
                return student.predict_x0(x_t, t, text), 1
        # simulate: pure noise → no-grad steps 0..index−1 (x0 prediction, re-noised to the next step) → step index
        x_t = torch.randn((b, *cond.latent_shape), generator=gen, device=device)
        for k in range(index):
            t = torch.full((b,), float(steps[k]), device=device)
            with torch.no_grad():
                x0 = student.predict_x0(x_t, t, text)
            noise = torch.randn(x0.shape, generator=gen, device=device)
            x_t = student.add_noise(x0, noise, torch.full((b,), float(steps[k + 1]), device=device))
        t = torch.full((b,), float(steps[index]), device=device)
        with torch.set_grad_enabled(grad):
            return student.predict_x0(x_t, t, text), index + 1

    # -- scores -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _teacher_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: ConditionBatch) -> tuple[torch.Tensor, int]:
        """Teacher CFG x0; cond and uncond in ONE batched forward. Returns it and the samples forwarded."""
        w = self.config.real_score_guidance_scale
        if w == 1.0:  # uncond + 1·(cond − uncond) = cond: the uncond half would be wasted compute
            return self.teacher.predict_x0(x_t, t, cond.text_embeds_bld), x_t.shape[0]
        x0 = self.teacher.predict_x0(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                     torch.cat([cond.text_embeds_bld, cond.uncond_embeds_bld]))
        r_cond, r_uncond = x0.chunk(2)
        return cfg_combine(r_cond, r_uncond, w), 2 * x_t.shape[0]

    def generator_loss(self, x0_student: torch.Tensor, cond: ConditionBatch) -> tuple[torch.Tensor, int, int]:
        """DMD2 generator loss of x̂0 (graded). Returns the loss, critic and teacher forward sample counts."""
        assert self.cuda_generator is not None
        gen = self.cuda_generator
        b = x0_student.shape[0]
        t = score_timesteps(b, self.config, generator=gen, device=x0_student.device)
        noise = torch.randn(x0_student.shape, generator=gen, device=x0_student.device)
        x_t = self.student.add_noise(x0_student.detach(), noise, t)
        with torch.no_grad():
            x0_fake = self.critic.predict_x0(x_t, t, cond.text_embeds_bld)
            x0_real, teacher_samples = self._teacher_x0(x_t, t, cond)
            grad = dmd_gradient(x0_student.detach(), x0_fake, x0_real)
        return dmd_loss(x0_student, grad), b, teacher_samples

    def critic_loss(self, x0_fake_samples: torch.Tensor, cond: ConditionBatch) -> torch.Tensor:
        """Flow matching of the critic on (detached) student samples, at score-window timesteps."""
        assert self.cuda_generator is not None
        gen = self.cuda_generator
        x0 = x0_fake_samples.detach()
        t = score_timesteps(x0.shape[0], self.config, generator=gen, device=x0.device)
        noise = torch.randn(x0.shape, generator=gen, device=x0.device)
        x_t = self.critic.add_noise(x0, noise, t)
        v = self.critic.predict_velocity(x_t, t, cond.text_embeds_bld)
        return torch.mean((v - flow.velocity_target(x0, noise)) ** 2)

    # -- the step -----------------------------------------------------------------------------------------------
    def single_train_step(self, batch: LatentBatch, iteration: int) -> StepOutput:
        cond = self.student.prepare_batch(batch, self.student.device)
        b = cond.batch_size
        losses: dict[str, torch.Tensor] = {}
        loss_roles: dict[str, str] = {}
        student_passes = PassCount()
        critic_passes = PassCount()
        teacher_passes = PassCount()
        backpropagated: set[str] = set()
        rollout: torch.Tensor | None = None
        if self.is_generator_step(iteration):
            x0_student, num_forwards = self._rollout(cond, grad=True)
            student_passes += PassCount(forward=num_forwards * b, backward=b)
            loss, critic_samples, teacher_samples = self.generator_loss(x0_student, cond)
            critic_passes += PassCount(forward=critic_samples)
            teacher_passes += PassCount(forward=teacher_samples)
            # Generator-first: free the student's graph before the critic's rollout and forward.
            if self.backward_now(loss):
                loss = loss.detach()
                backpropagated.add("generator_loss")
            losses["generator_loss"] = loss
            loss_roles["generator_loss"] = "student"
            if self.config.reuse_generator_rollout_for_critic:
                rollout = x0_student.detach()
        if rollout is None:
            rollout, num_forwards = self._rollout(cond, grad=False)
            student_passes += PassCount(forward=num_forwards * b)
            if backpropagated:
                # A unit this no-grad forward left unsharded (reshard_after_forward false) would expose its
                # gathered parameters, which do not hold the gradients just computed (the sharded ones do), to
                # clipping: put every unit back. (The root reshards by itself: build.finish_prepare.)
                reshard_all(self.student.transformer)
        losses["critic_loss"] = self.critic_loss(rollout, cond)
        loss_roles["critic_loss"] = "critic"
        critic_passes += PassCount(forward=b, backward=b)
        return StepOutput(losses=losses, loss_roles=loss_roles, backpropagated=frozenset(backpropagated),
                          passes={"student": student_passes, "critic": critic_passes, "teacher": teacher_passes})

    # -- sampling -----------------------------------------------------------------------------------------------
    def validation_sampler(self) -> ValidationSampler:
        """The student's few-step DMD sampler over ``method.dmd_denoising_steps``."""
        from fv_accel.sampling import Generators, dmd_sample

        steps = list(self.config.dmd_denoising_steps)

        def sample(model: ModelBase, text_embeds_bld: torch.Tensor, uncond_embeds_bld: torch.Tensor,
                   latent_shape: Sequence[int], generator: Generators) -> torch.Tensor:
            return dmd_sample(model, text_embeds_bld, latent_shape=latent_shape, denoising_steps=steps,
                              generator=generator)

        return sample


__all__ = ["DMD2Method", "cfg_combine", "dmd_gradient", "dmd_loss", "is_generator_step", "num_generator_steps",
           "score_timesteps"]
