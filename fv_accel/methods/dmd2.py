"""Distribution matching distillation with a trainable critic (``method.name: dmd2``; docs/distillation.md).

Roles: ``student`` (trainable, the few-step generator), ``teacher`` (frozen, the real score) and ``critic``
(trainable, the fake score: it learns the student's own output distribution by flow matching).

Per (1-based) step of the loop:
- generator step (``step > critic_warmup_steps`` and ``step % generator_update_interval == 0``):
  the student rolls out x̂0 with one graded forward (:meth:`DMD2Method.rollout`); x̂0 is noised to a score
  timestep t (:func:`score_timesteps`); the critic gives
  ``f = x0_fake(x_t)``, the teacher gives the CFG x0 ``r = r_u + w·(r_c − r_u)`` (cond and uncond in one
  batched forward); ``g = (f − r) / mean|x̂0 − r|`` and ``generator_loss = 0.5·mean((x̂0 − sg(x̂0 − g))²)``,
  whose gradient with respect to x̂0 is ``g / numel``: it pulls x̂0 toward the teacher and away from the critic;
- every step: ``critic_loss``, the critic's flow-matching loss on detached student samples.

The generator loss reaches only the student (f and r are computed without grad) and the critic loss only the
critic (its samples are detached). So the generator loss is differentiated as soon as it exists
(``backward_now``, generator-first): the student's graph is freed before the critic's rollout and forward, and
one role's graph is alive at a time (``fv_accel/memory.py``). The gradients are bitwise those of one combined
backward of the sum (``eager_backward = False``), which holds both graphs until the end.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator

from fv_accel import flow
from fv_accel.config import MethodConfigBase, OptimizerConfig, RunConfig, check_pipeline_components
from fv_accel.data import LatentBatch
from fv_accel.errors import ConfigError
from fv_accel.flops import PassCount
from fv_accel.methods.base import StepOutput, TrainingMethod
from fv_accel.methods.registry import register_method
from fv_accel.models.base import ConditionBatch, ModelBase
from fv_accel.runtime import reshard_all
from fv_accel.sampling import DMDSampler, Sampler


def check_denoising_steps(value: list[int]) -> list[int]:
    """A few-step student's timesteps (DMD2's ``dmd_denoising_steps``, ODE-init's ``denoising_step_list``): at
    least one, strictly descending integers in (0, 1000]; ValueError otherwise."""
    if not value:
        raise ValueError("needs at least one step")
    if any(not 0 < s <= 1000 for s in value) or any(a <= b for a, b in zip(value, value[1:], strict=False)):
        raise ValueError("must be strictly descending integers in (0, 1000]")
    return value


class DMD2MethodConfig(MethodConfigBase):
    """Distribution matching distillation (DMD2) with a trainable critic ("fake score")."""

    name: Literal["dmd2"]
    """Selects this method; keys of other methods are unknown keys here."""
    rollout_mode: Literal["simulate", "data_latent"] = "simulate"
    """How the student's input is made: ``simulate`` runs the few-step student sampler from noise (data-free);
    ``data_latent`` noises dataset latents."""
    dmd_denoising_steps: list[int] = Field(default_factory=lambda: [1000, 750, 500, 250])
    """The student's timesteps, strictly descending in (0, 1000]."""
    generator_update_interval: int = Field(5, ge=1)
    """The student (generator) steps every N steps; the critic at every step."""
    real_score_guidance_scale: float = Field(4.5, ge=0)
    """Teacher CFG scale in the standard form uncond + w·(cond − uncond). FastVideo's legacy w = this − 1."""
    min_timestep_ratio: float = Field(0.02, ge=0, le=1)
    """Lower end of the score timestep window, as a fraction of 1000."""
    max_timestep_ratio: float = Field(0.98, ge=0, le=1)
    """Upper end of that window (must be > ``min_timestep_ratio``)."""
    score_timestep_shift: float = Field(3.0, gt=0)
    """Shift applied to the score (teacher/critic) timestep (see ``score_timestep_sampling``)."""
    score_timestep_sampling: Literal["shift_then_clamp", "window_then_shift"] = "shift_then_clamp"
    """How the score timestep t is drawn. ``shift_then_clamp`` (default, as FastVideo): u uniform in [0, 1),
    t = shift(1000·u), clamped into ``[min, max]·1000``; the ends of the window collect the mass shifted past
    them, and small t (low noise) is reached. ``window_then_shift``: u uniform in the window, then shifted (and
    clamped): the smallest t is shift(min·1000), e.g. 140 for min 0.02 and shift 8."""
    rollout_step_sampling: Literal["per_rank", "shared"] = "per_rank"
    """How the rollout's graded step is drawn from ``dmd_denoising_steps``. ``per_rank`` (default, as
    FastVideo): each rank draws its own, so one student update mixes steps across ranks; a ``simulate`` rollout
    then always runs all K − 1 no-grad steps plus the graded one (K student forwards on every rank, whatever
    each drew: FSDP collectives stay aligned with no broadcast). ``shared``: one draw for all ranks, and the
    rollout stops at the graded step (index + 1 forwards; fewer on average, but with Adam β1 = 0 each student
    update trains one step only)."""
    uncond: Literal["zeros", "negative_prompt", "empty_prompt"] = "zeros"
    """The teacher's unconditional text embedding in its CFG. ``zeros``: all-zero embeddings (what CFG dropout
    trains). ``negative_prompt``: the embedding of ``training.data.negative_prompt_path`` (required).
    ``empty_prompt``: "" encoded once at train start (on rank 0, broadcast) by the student pipeline's text encoder
    (``models.student.init_from`` needs one). FastVideo uses the negative prompt."""
    critic_optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(learning_rate=4e-5, betas=[0.0, 0.999])
    )
    """The critic's optimizer (``training.optimizer`` is the student's); its defaults differ in the learning
    rate and beta1."""
    critic_warmup_steps: int = Field(0, ge=0)
    """Critic-only steps before the first student update."""
    reuse_generator_rollout_for_critic: bool = False
    """Train the critic on the generator step's detached rollout instead of a fresh one (saves forwards,
    changes the algorithm; off by default)."""

    @field_validator("dmd_denoising_steps")
    @classmethod
    def _steps_descending(cls, value: list[int]) -> list[int]:
        return check_denoising_steps(value)

    @model_validator(mode="after")
    def _window(self) -> DMD2MethodConfig:
        if self.min_timestep_ratio >= self.max_timestep_ratio:
            raise ValueError("min_timestep_ratio must be < max_timestep_ratio")
        return self


def is_generator_step(step: int, *, interval: int, warmup: int = 0) -> bool:
    """Whether the student steps at 1-based ``step``."""
    return step > warmup and step % interval == 0


def num_generator_steps(max_train_steps: int, *, interval: int, warmup: int = 0) -> int:
    """How many steps in 1..max_train_steps are generator steps."""
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
    """t for the teacher / critic, in the window ``[min, max]·1000`` (``method.score_timestep_sampling``):
    uniform over [0, 1000), shifted, clamped to the window; or uniform in the window, shifted, clamped."""
    lo, hi = cfg.min_timestep_ratio * flow.NUM_TRAIN_TIMESTEPS, cfg.max_timestep_ratio * flow.NUM_TRAIN_TIMESTEPS
    u = torch.rand(batch_size, generator=generator, device=device)
    if cfg.score_timestep_sampling == "shift_then_clamp":
        t = flow.NUM_TRAIN_TIMESTEPS * u
    else:
        t = lo + (hi - lo) * u
    return flow.shift_timestep(t, cfg.score_timestep_shift).clamp(lo, hi)


def encode_empty_prompt(cfg: RunConfig, device: torch.device) -> torch.Tensor:
    """"" through the student pipeline's text encoder, zero-padded to ``[training.data.text_len, D]`` as the data
    loader pads captions; float32 on the host. Collective: rank 0 alone loads the encoder and encodes, every rank
    receives the result (at Wan 14B on 64 GPUs: one UMT5-XXL load, ≈ 11 GB read and held once instead of 64
    times; the broadcast is 512 × 4096 × 4 B = 8 MB)."""
    from fv_accel.models import FAMILIES  # lazy: fv_accel.models imports fv_accel.config
    from fv_accel.prompts import encode_prompts, pad_embeddings
    from fv_accel.runtime import rank0_result

    student = cfg.models["student"]
    text_len = cfg.training.data.text_len

    def encode() -> torch.Tensor:
        embeddings = encode_prompts(FAMILIES[student.family], student.init_from, [""],
                                    key="models.student.init_from", what="method.uncond=empty_prompt",
                                    device=device, text_len=text_len)
        return pad_embeddings(embeddings, text_len)[0]

    return rank0_result(encode)


@register_method
class DMD2Method(TrainingMethod):
    """DMD2 with a critic; see the module docstring."""

    name: ClassVar[str] = "dmd2"
    Config: ClassVar[type[MethodConfigBase]] = DMD2MethodConfig
    required_roles: ClassVar[tuple[str, ...]] = ("student", "teacher", "critic")
    trainable_roles: ClassVar[tuple[str, ...]] = ("student", "critic")
    frozen_roles: ClassVar[tuple[str, ...]] = ("teacher",)

    @classmethod
    def default_roles(cls, models: dict[str, Any]) -> dict[str, Any]:
        """Without ``models.critic``: the critic starts from the teacher's weights and is trainable."""
        if "critic" not in models and isinstance(models.get("teacher"), dict):
            return {**models, "critic": {**models["teacher"], "trainable": True}}
        return models

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        method = cfg.method
        assert isinstance(method, DMD2MethodConfig)
        if method.uncond == "negative_prompt" and not cfg.training.data.negative_prompt_path:
            raise ValueError("method.uncond=negative_prompt needs training.data.negative_prompt_path (a text-only "
                             "parquet with the negative-prompt embedding); or set method.uncond=zeros")
        if method.uncond == "empty_prompt":
            from fv_accel.models import FAMILIES  # lazy: fv_accel.models imports fv_accel.config

            student = cfg.models["student"]
            components = list(FAMILIES[student.family].text_encoder_components)
            if not components:
                raise ValueError(f"method.uncond=empty_prompt: model family {student.family!r} has no text "
                                 "encoder; set method.uncond=zeros or negative_prompt")
            try:
                check_pipeline_components(
                    student.init_from, components,
                    what=f"method.uncond=empty_prompt: models.student.init_from {student.init_from!r}",
                    why="the empty prompt is encoded with the student pipeline's text encoder; set method.uncond="
                        "zeros or negative_prompt")
            except ConfigError as exc:
                raise ValueError(str(exc)) from None

    def __init__(self, *, cfg: RunConfig, role_models: dict[str, ModelBase]) -> None:
        super().__init__(cfg=cfg, role_models=role_models)
        assert isinstance(cfg.method, DMD2MethodConfig)  # the base class checked it against Config
        self.config: DMD2MethodConfig = cfg.method
        self.teacher = role_models["teacher"]
        self.critic = role_models["critic"]
        self.empty_prompt_ld: torch.Tensor | None = None
        """``method.uncond=empty_prompt``: "" encoded by the student pipeline's text encoder, zero-padded to
        ``[text_len, D]`` (host, float32); set by :meth:`on_train_start`."""

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.config.uncond == "empty_prompt" and self.empty_prompt_ld is None:
            self.empty_prompt_ld = encode_empty_prompt(self.cfg, self.student.device)

    # -- gating -------------------------------------------------------------------------------------------------
    def is_generator_step(self, step: int) -> bool:
        return is_generator_step(step, interval=self.config.generator_update_interval,
                                 warmup=self.config.critic_warmup_steps)

    def optimizer_configs(self) -> dict[str, OptimizerConfig]:
        return {"student": self.training_config.optimizer, "critic": self.config.critic_optimizer}

    def num_optimizer_steps(self, role: str, max_train_steps: int) -> int:
        if role == "student":
            return num_generator_steps(max_train_steps, interval=self.config.generator_update_interval,
                                       warmup=self.config.critic_warmup_steps)
        return max_train_steps

    def stepping_roles(self, step: int) -> list[str]:
        return ["student", "critic"] if self.is_generator_step(step) else ["critic"]

    # -- student rollout ----------------------------------------------------------------------------------------
    def graded_step_index(self) -> int:
        """Index into ``dmd_denoising_steps`` of the rollout's graded step (``method.rollout_step_sampling``),
        drawn on the host (no device sync): from the per-rank ``rank_choice_generator``, or from the
        ``choice_generator`` every rank draws alike."""
        per_rank = self.config.rollout_step_sampling == "per_rank"
        gen = self.rank_choice_generator if per_rank else self.choice_generator
        assert gen is not None, "on_train_start() was not called"
        return int(torch.randint(len(self.config.dmd_denoising_steps), (1,), generator=gen))

    def rollout(self, cond: ConditionBatch, *, grad: bool) -> tuple[torch.Tensor, int]:
        """Student sample x̂0 (normalised space) at the graded step, with exactly one graded forward when ``grad``.

        Returns x̂0 and the number of student forwards it took, identical on every rank: ``simulate`` runs K
        (all K − 1 no-grad steps, then the graded one) with ``rollout_step_sampling: per_rank``, index + 1 with
        ``shared`` (the index is the same on every rank); ``data_latent`` runs one."""
        assert self.cuda_generator is not None, "on_train_start() was not called"
        gen = self.cuda_generator
        student = self.student
        device = student.device
        steps = self.config.dmd_denoising_steps
        b = cond.batch_size
        text = cond.text_embeds_bld
        index = self.graded_step_index()
        if self.config.rollout_mode == "data_latent":
            if cond.latents_bcthw is None:
                raise ValueError("method.rollout_mode=data_latent needs latents; text-only data needs simulate")
            t = torch.full((b,), float(steps[index]), device=device)
            noise = torch.randn(cond.latents_bcthw.shape, generator=gen, device=device)
            x_t = student.add_noise(cond.latents_bcthw, noise, t)
            with torch.set_grad_enabled(grad):
                return student.predict_x0(x_t, t, text), 1
        # simulate: pure noise → no-grad steps (x0 prediction, re-noised to the next step) → the graded step, whose
        # input is the noise (index 0) or the latent the no-grad chain reached at steps[index].
        # per_rank: the chain always runs all K − 1 steps, so every rank runs K forwards whatever it drew (the
        # steps after the graded one are discarded); shared: it stops at the graded step.
        x_t = torch.randn((b, *cond.latent_shape), generator=gen, device=device)
        graded_input = x_t
        num_chain = len(steps) - 1 if self.config.rollout_step_sampling == "per_rank" else index
        for k in range(num_chain):
            t = torch.full((b,), float(steps[k]), device=device)
            with torch.no_grad():
                x0 = student.predict_x0(x_t, t, text)
            noise = torch.randn(x0.shape, generator=gen, device=device)
            x_t = student.add_noise(x0, noise, torch.full((b,), float(steps[k + 1]), device=device))
            if k + 1 == index:
                graded_input = x_t
        t = torch.full((b,), float(steps[index]), device=device)
        with torch.set_grad_enabled(grad):
            return student.predict_x0(graded_input, t, text), num_chain + 1

    # -- scores -------------------------------------------------------------------------------------------------
    def uncond_embeds(self, cond: ConditionBatch) -> torch.Tensor:
        """The teacher's unconditional text embeddings for ``cond`` (``method.uncond``), ``[B, L, D]``."""
        text = cond.text_embeds_bld
        if self.config.uncond == "zeros":
            return torch.zeros_like(text)
        if self.config.uncond == "negative_prompt":
            return cond.uncond_embeds_bld  # the loader's, from training.data.negative_prompt_path (check_config)
        assert self.empty_prompt_ld is not None, "on_train_start() was not called"
        empty = self.empty_prompt_ld.to(text.device, text.dtype, non_blocking=True)
        if empty.shape != text.shape[1:]:
            raise ConfigError(f"method.uncond=empty_prompt: the text encoder gives [{empty.shape[0]}, "
                              f"{empty.shape[1]}] embeddings but the data has {list(text.shape[1:])}")
        return empty.expand_as(text)

    @torch.no_grad()
    def teacher_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: ConditionBatch) -> tuple[torch.Tensor, int]:
        """Teacher CFG x0; cond and uncond in ONE batched forward. Returns it and the samples forwarded."""
        w = self.config.real_score_guidance_scale
        if w == 1.0:  # uncond + 1·(cond − uncond) = cond: the uncond half would be wasted compute
            return self.teacher.predict_x0(x_t, t, cond.text_embeds_bld), x_t.shape[0]
        x0 = self.teacher.predict_x0(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                     torch.cat([cond.text_embeds_bld, self.uncond_embeds(cond)]))
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
            x0_real, teacher_samples = self.teacher_x0(x_t, t, cond)
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
    def single_train_step(self, batch: LatentBatch, step: int) -> StepOutput:
        cond = self.student.prepare_batch(batch, self.student.device)
        b = cond.batch_size
        losses: dict[str, torch.Tensor] = {}
        loss_roles: dict[str, str] = {}
        student_passes = PassCount()
        critic_passes = PassCount()
        teacher_passes = PassCount()
        backpropagated: set[str] = set()
        fake_x0: torch.Tensor | None = None  # the student samples the critic learns from
        if self.is_generator_step(step):
            x0_student, num_forwards = self.rollout(cond, grad=True)
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
                fake_x0 = x0_student.detach()
        if fake_x0 is None:
            fake_x0, num_forwards = self.rollout(cond, grad=False)
            student_passes += PassCount(forward=num_forwards * b)
            if backpropagated:
                # A unit this no-grad forward left unsharded (reshard_after_forward false) would expose its
                # gathered parameters, which do not hold the gradients just computed (the sharded ones do), to
                # clipping: put every unit back. (The root reshards by itself: build.finish_prepare.)
                for module in self.student.modules().values():  # both experts of a two-expert student
                    reshard_all(module)
        losses["critic_loss"] = self.critic_loss(fake_x0, cond)
        loss_roles["critic_loss"] = "critic"
        critic_passes += PassCount(forward=b, backward=b)
        return StepOutput(losses=losses, loss_roles=loss_roles, backpropagated=frozenset(backpropagated),
                          passes={"student": student_passes, "critic": critic_passes, "teacher": teacher_passes})

    # -- sampling -----------------------------------------------------------------------------------------------
    @classmethod
    def sampler(cls, config: MethodConfigBase, *, num_steps: int, guidance_scale: float = 1.0) -> Sampler:
        """The student's few-step DMD sampler over ``method.dmd_denoising_steps`` (``num_steps`` and the
        guidance scale do not apply: the student was distilled with the teacher's guidance)."""
        assert isinstance(config, DMD2MethodConfig)
        return DMDSampler(tuple(config.dmd_denoising_steps))


__all__ = ["DMD2Method", "DMD2MethodConfig", "cfg_combine", "check_denoising_steps", "dmd_gradient", "dmd_loss",
           "encode_empty_prompt", "is_generator_step", "num_generator_steps", "score_timesteps"]
