"""Self-forcing distillation of a causal student (``method.name: self_forcing``): DMD2 (``fv_accel/methods/dmd2.py``)
whose student sample is a block-by-block rollout against the student's own KV cache.

Roles as DMD2: ``student`` (trainable, family ``wan_causal``), ``teacher`` (frozen, bidirectional ``wan``) and
``critic`` (trainable, bidirectional ``wan``; default: the teacher's weights). Only :meth:`SelfForcingMethod.rollout`
differs; score timesteps, the teacher's CFG, the critic's flow matching on a fresh no-grad rollout and the
generator-first backward are DMD2's.

The rollout (K = len(``dmd_denoising_steps``), steps warped by ``denoising_step_shift`` when set; the blocks are
the student's ``block_sizes`` of the clip's F latent frames, ``fv_accel/causal_blocks.py``). Inside one
``student.stream(...)``, for each block b at frames [s, s + f):

1. exit index e_b ∈ {0..K−1}: one host draw per block from ``choice_generator`` (the same on every rank, so every
   rank runs the same number of forwards without a broadcast); one draw for all blocks with
   ``same_step_across_blocks``; K − 1 with ``last_step_only`` (no draw);
2. x = fresh noise [B, C, f, H, W] (``cuda_generator``); for k < e_b, under no_grad: x̂0 = predict_x0(x, t_k),
   then x = re-noised x̂0 at t_{k+1}: ``renoise: sde`` x = (1 − σ')·x̂0 + σ'·ε with fresh ε, ``ode`` the same with
   the implied ε̂ = (x − (1 − σ)·x̂0) / σ (a DDIM step);
3. the exit forward x̂0_b = predict_x0(x, t_{e_b}) records a graph when the rollout is graded and the block
   overlaps the last ``grad_last_frames`` frames (all blocks when null); else it runs under no_grad;
4. except after the last block: a no-grad ``commit`` of x̂0_b.detach() at t = ``context_noise`` (> 0: x̂0_b
   re-noised to that t with fresh noise first), so later blocks attend to self-generated context and no gradient
   crosses blocks through the cache. The last block's commit is skipped: nothing reads it.

The generator sample is the concatenation of the x̂0_b. Random draws on ``cuda_generator``, in order: per block,
its initial noise, one noise per SDE re-noising, then the context noise (``context_noise`` > 0, not after the
last block).

Pass counting (``StepOutput.passes["student"]``). A block forward over f of F frames counts f / F of a sample's
clip forward (token-proportional: the linear layers dominate; attending to the cached context is not counted
extra); a rollout's forwards (chain steps, exit steps, commits) and its graded frames are summed over the step's
rollouts, multiplied by B and rounded to whole samples once per step. ``forward`` counts the graded forwards too,
``backward`` the graded frames / F (B per generator rollout when every block is graded).

Cost at Wan 2.1 1.3B (30 layers, dim 1536), 480×832×81 → 21 latent frames of 1,560 tokens, 7 blocks of 3
(4,680 tokens), K = 4, B = 1:

- student forwards per rollout: per block e_b + 1 (mean 2.5) plus 6 commits: 7·2.5 + 6 = 23.5 block forwards on
  average = 3.36 clip forwards (``last_step_only``: 7·4 + 6 = 34 = 4.86). A generator step runs two rollouts
  (graded, then the critic's fresh one): ≈ 6.7 clip forwards + 1 clip backward; a critic-only step 3.36.
- graph memory: the DMD loss needs the whole clip, so the graded exit forwards of all 7 blocks are alive until
  the backward: together one whole clip's tokens (32,760), i.e. about one bidirectional clip forward's
  activations, not one block's. On top, each graded block's graph keeps the keys and values of the context it
  attended to (saved for attention's backward; under activation checkpointing the cache version it read, as
  the cache is replaced at each commit, not written in place): Σ_b b·4,680 = 98,280 tokens =
  2·30·98,280·1,536·2 B = 18.1 GB in bf16. ``grad_last_frames: 3`` (the last block only): one block's
  activations (4,680 tokens) plus a 6-block context, 5.18 GB.
- KV cache: 2·layers·tokens·dim·2 B; at most 6 blocks are committed in the rollout (28,080 tokens):
  2·30·28,080·1,536·2 B = 5.18 GB (21 frames: 6.04 GB), plus the text keys/values.
- teacher and critic, per generator step, whole clips: teacher 2 forwards (cond and uncond batched; 1 when
  ``real_score_guidance_scale`` is 1), critic 1 no-grad forward; every step the critic's flow matching, 1 forward
  and 1 backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from fv_accel import flow
from fv_accel.causal_sampling import commit_context
from fv_accel.config import MethodConfigBase, RunConfig
from fv_accel.data import LatentBatch
from fv_accel.flops import PassCount
from fv_accel.methods.base import StepOutput
from fv_accel.methods.causal import causal_student, check_causal_student
from fv_accel.methods.dmd2 import DMD2Method, DMD2MethodConfig
from fv_accel.methods.registry import register_method
from fv_accel.models.base import ConditionBatch, ModelBase
from fv_accel.models.wan_causal import CausalWanModel
from fv_accel.sampling import DMDSampler, Sampler


class SelfForcingMethodConfig(DMD2MethodConfig):
    """DMD2 with a causal student rolled out block by block against its own KV cache (self-forcing)."""

    name: Literal["self_forcing"]  # type: ignore[assignment]
    """Selects this method; keys of other methods are unknown keys here."""
    rollout_mode: Literal["simulate"] = "simulate"
    """The rollout always starts from noise (``data_latent`` does not apply)."""
    rollout_step_sampling: Literal["shared"] = "shared"
    """Exit steps are always drawn from the generator every rank shares (see ``same_step_across_blocks``)."""
    same_step_across_blocks: bool = False
    """One exit-step draw for all blocks of a rollout, instead of one per block."""
    last_step_only: bool = False
    """Every block exits at the last step (K forwards per block, no draw)."""
    grad_last_frames: int | None = Field(None, ge=1)
    """Only blocks overlapping the last N latent frames record a graph at their exit step (null: all blocks)."""
    renoise: Literal["sde", "ode"] = "sde"
    """How x̂0 goes to the next step before the exit: ``sde`` with fresh noise, ``ode`` with the implied noise
    (x_t − (1 − σ)·x̂0) / σ (a DDIM step)."""
    context_noise: float = Field(0.0, ge=0, lt=1000)
    """Timestep at which a finished block's x̂0 is committed to the cache (> 0: re-noised to it first)."""
    denoising_step_shift: float | None = Field(None, gt=0)
    """Warp ``dmd_denoising_steps`` with the timestep shift s·u / (1 + (s − 1)·u) (null: use them as they are);
    5.0 turns [1000, 750, 500, 250] into [1000, 937.5, 833.3, 625]. Rollout and sampler alike."""

    @model_validator(mode="after")
    def _exit_options(self) -> SelfForcingMethodConfig:
        if self.same_step_across_blocks and self.last_step_only:
            raise ValueError("method.same_step_across_blocks and method.last_step_only exclude each other")
        return self


def denoising_steps(config: SelfForcingMethodConfig) -> list[float]:
    """The student's timesteps: ``dmd_denoising_steps``, warped by ``denoising_step_shift`` when set."""
    steps = [float(s) for s in config.dmd_denoising_steps]
    if config.denoising_step_shift is None:
        return steps
    return flow.shift_timestep(torch.tensor(steps, dtype=torch.float64), config.denoising_step_shift).tolist()


@dataclass
class RolloutRecord:
    """What one rollout did (public for logging and tests)."""

    block_sizes: list[int]
    exit_indices: list[int]
    """Exit step index of each block."""
    graded: list[bool]
    """Whether each block's exit forward recorded a graph."""
    forwards: list[int]
    """Student forwards of each block: e_b + 1, plus its commit (all but the last block)."""

    @property
    def clip_forwards(self) -> float:
        """Forwards in clip units (a block of f of F frames counts f / F)."""
        return sum(n * f for n, f in zip(self.forwards, self.block_sizes, strict=True)) / sum(self.block_sizes)

    @property
    def clip_backwards(self) -> float:
        """Graded frames / F."""
        return sum(f for f, g in zip(self.block_sizes, self.graded, strict=True) if g) / sum(self.block_sizes)


@register_method
class SelfForcingMethod(DMD2Method):
    """Self-forcing: see the module docstring."""

    name: ClassVar[str] = "self_forcing"
    Config: ClassVar[type[MethodConfigBase]] = SelfForcingMethodConfig

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        super().check_config(cfg)
        check_causal_student(cfg, "self_forcing", "the rollout streams block by block against a KV cache")
        for role in ("teacher", "critic"):
            model = cfg.models.get(role)
            if model is not None and model.family != "wan":
                raise ValueError(f"models.{role}.family must be 'wan' for method.name=self_forcing (got "
                                 f"{model.family!r}): the {role} scores the whole clip bidirectionally")

    def __init__(self, *, cfg: RunConfig, role_models: dict[str, ModelBase]) -> None:
        super().__init__(cfg=cfg, role_models=role_models)
        assert isinstance(cfg.method, SelfForcingMethodConfig)
        self.config: SelfForcingMethodConfig = cfg.method
        self.causal_student: CausalWanModel = causal_student(role_models, "self_forcing")
        self.denoising_steps: list[float] = denoising_steps(self.config)
        """The rollout's timesteps (:func:`denoising_steps`)."""
        self.rollouts: list[RolloutRecord] = []
        """The rollouts of the current micro-batch, in order (cleared at each :meth:`single_train_step`)."""

    # -- the rollout ------------------------------------------------------------------------------------------
    def exit_step_indices(self, num_blocks: int) -> list[int]:
        """Exit step index per block, drawn from ``choice_generator`` (identical on every rank)."""
        num_steps = len(self.denoising_steps)
        if self.config.last_step_only:
            return [num_steps - 1] * num_blocks
        gen = self.choice_generator
        assert gen is not None, "on_train_start() was not called"
        if self.config.same_step_across_blocks:
            return [int(torch.randint(num_steps, (1,), generator=gen))] * num_blocks
        return [int(k) for k in torch.randint(num_steps, (num_blocks,), generator=gen)]

    def renoise(self, x0: torch.Tensor, x_t: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        """x̂0 predicted at ``t`` from ``x_t``, taken to ``t_next`` (``method.renoise``)."""
        assert self.cuda_generator is not None
        if self.config.renoise == "sde":
            noise = torch.randn(x0.shape, generator=self.cuda_generator, device=x0.device)
        else:
            sigma = t / flow.NUM_TRAIN_TIMESTEPS  # > 0: steps are in (0, 1000]
            noise = (x_t - (1 - sigma) * x0) / sigma
        sigma_next = t_next / flow.NUM_TRAIN_TIMESTEPS
        return (1 - sigma_next) * x0 + sigma_next * noise

    def rollout(self, cond: ConditionBatch, *, grad: bool) -> tuple[torch.Tensor, int]:
        """The block-wise rollout of the module docstring: x̂0 [B, C, F, H, W] and the student forwards in whole
        clip units, rounded (the exact record is appended to :attr:`rollouts`)."""
        assert self.cuda_generator is not None, "on_train_start() was not called"
        gen = self.cuda_generator
        student = self.causal_student
        device = student.device
        steps = self.denoising_steps
        b = cond.batch_size
        c, num_frames, h, w = cond.latent_shape
        sizes = student.block_sizes(num_frames)
        exits = self.exit_step_indices(len(sizes))
        grad_from = 0 if self.config.grad_last_frames is None else num_frames - self.config.grad_last_frames
        t_ctx = self.config.context_noise
        record = RolloutRecord(block_sizes=sizes, exit_indices=exits, graded=[], forwards=[])
        blocks: list[torch.Tensor] = []
        with student.stream(cond.text_embeds_bld, num_frames=num_frames, latent_hw=(h, w)) as stream:
            for index, (start, size) in enumerate(zip(stream.block_starts, stream.block_sizes, strict=True)):
                x = torch.randn((b, c, size, h, w), generator=gen, device=device)
                for k in range(exits[index]):
                    with torch.no_grad():
                        x0 = stream.predict_x0(x, torch.full((b,), steps[k], device=device), frame_start=start)
                    x = self.renoise(x0, x, steps[k], steps[k + 1])
                graded = grad and start + size > grad_from
                with torch.set_grad_enabled(graded):
                    x0 = stream.predict_x0(x, torch.full((b,), steps[exits[index]], device=device),
                                           frame_start=start)
                blocks.append(x0)
                record.graded.append(graded)
                record.forwards.append(exits[index] + 1)
                if index + 1 < len(sizes):
                    commit_context(stream, x0.detach(), start, t_ctx, gen)  # the samplers' commit
                    record.forwards[-1] += 1
        self.rollouts.append(record)
        return torch.cat(blocks, dim=2), round(record.clip_forwards)

    def single_train_step(self, batch: LatentBatch, step: int) -> StepOutput:
        """DMD2's step; the student's passes recounted from the rollout records (module docstring)."""
        self.rollouts = []
        out = super().single_train_step(batch, step)
        b = len(batch.index)
        forward = sum(r.clip_forwards for r in self.rollouts)
        backward = sum(r.clip_backwards for r in self.rollouts)
        out.passes["student"] = PassCount(forward=round(b * forward), backward=round(b * backward))
        return out

    # -- sampling ---------------------------------------------------------------------------------------------
    @classmethod
    def sampler(cls, config: MethodConfigBase, *, num_steps: int, guidance_scale: float = 1.0) -> Sampler:
        """The few-step DMD sampler over the (warped) denoising steps; it streams a causal student block by
        block, committing each block at ``context_noise`` as the training rollout does (``num_steps`` and the
        guidance scale do not apply)."""
        assert isinstance(config, SelfForcingMethodConfig)
        return DMDSampler(tuple(denoising_steps(config)), context_noise=config.context_noise)


__all__ = ["RolloutRecord", "SelfForcingMethod", "SelfForcingMethodConfig", "denoising_steps"]
