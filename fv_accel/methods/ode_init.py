"""ODE initialisation (knowledge distillation) of a few-step student (``method.name: ode_init``).

The teacher's ODE trajectories are made once by ``recipes/ode_pairs.py`` (``fv_accel/ode_pairs.py``): for each
row, the teacher's states x_{t_k} at the student's K timesteps t_k (``denoising_step_list``) and its final x0.
``training.data.data_path`` points at those pairs; each batch then carries the trajectory
(``LatentBatch.trajectory_bkcthw``) and the teacher's x0 (``latents_bcthw``).

Per micro-batch, for each sample and each of the student's attention blocks (a causal family's blocks of
``num_frames_per_block`` latent frames, remainder first, ``fv_accel/causal_blocks.py``; one block = the whole
clip for a bidirectional family) a step index k ∈ {0..K−1} is drawn uniformly (one per sample for all its blocks
with ``same_step_across_blocks``); the student's input takes each frame from the stored state of its block's
step, x_t[:, :, f] = x_{t_k(f)}[:, :, f], with per-frame timesteps t [B, F], and the student regresses the
teacher's x0:

    loss = mean over (B, C, F, H, W) of (student.predict_x0(x_t, t, text) − x0_teacher)²

in the model's normalised latent space, every element weighted alike: the target is the same x0 at every step,
so no per-timestep weight is needed to balance the steps (they are drawn uniformly), and the normalised space
gives every channel unit scale. This is the x0 regression of CausVid / Self-Forcing's ODE init. The draws come
from the per-data-rank host generator (``rank_choice_generator``): one student forward per micro-batch whatever
is drawn, so ranks need not agree; the last draw is public (:attr:`OdeInitMethod.last_step_indices_bf`).

The student generates with the DMD sampler at its K timesteps (``fv_accel.sampling.DMDSampler``), as the DMD2 /
self-forcing student that this one initialises.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator

from fv_accel.config import MethodConfigBase, RunConfig
from fv_accel.data import LatentBatch
from fv_accel.errors import ConfigError, DataError
from fv_accel.flops import PassCount
from fv_accel.methods.base import StepOutput, TrainingMethod
from fv_accel.methods.dmd2 import DMD2MethodConfig, check_denoising_steps
from fv_accel.methods.registry import register_method
from fv_accel.models.base import ModelBase
from fv_accel.sampling import DMDSampler, Sampler


def _dmd2_default_steps() -> list[int]:
    steps = DMD2MethodConfig.model_fields["dmd_denoising_steps"].get_default(call_default_factory=True)
    return list(steps)


class OdeInitMethodConfig(MethodConfigBase):
    """Regression of the student's x0 onto the teacher's ODE trajectories (pairs from ``recipes/ode_pairs.py``)."""

    name: Literal["ode_init"]
    """Selects this method; keys of other methods are unknown keys here."""
    denoising_step_list: list[int] = Field(default_factory=_dmd2_default_steps)
    """The student's timesteps, strictly descending in (0, 1000] (default: DMD2's ``dmd_denoising_steps``). Must
    be those the pairs in ``training.data.data_path`` were recorded at (their manifest is checked)."""
    same_step_across_blocks: bool = False
    """Draw one step index per sample for all its blocks, instead of one per block."""

    @field_validator("denoising_step_list")
    @classmethod
    def _steps_descending(cls, value: list[int]) -> list[int]:
        return check_denoising_steps(value)


def frame_blocks(model: ModelBase, num_frames: int) -> list[int]:
    """The student's attention blocks (latent frames each): a causal family answers ``block_sizes``, any other
    family attends over the whole clip (one block)."""
    sizes = getattr(model, "block_sizes", None)
    return list(sizes(num_frames)) if callable(sizes) else [num_frames]


def gather_states(trajectory_bkcthw: torch.Tensor, index_bf: torch.Tensor) -> torch.Tensor:
    """x_t [B, C, F, H, W] with frame f of sample b taken from state ``index_bf[b, f]`` of the trajectory."""
    b, _, c, f, h, w = trajectory_bkcthw.shape
    index = index_bf.view(b, 1, 1, f, 1, 1).expand(b, 1, c, f, h, w)
    return torch.gather(trajectory_bkcthw, 1, index).squeeze(1)


@register_method
class OdeInitMethod(TrainingMethod):
    """ODE-init: see the module docstring. Roles: ``student`` (trainable) only."""

    name: ClassVar[str] = "ode_init"
    Config: ClassVar[type[MethodConfigBase]] = OdeInitMethodConfig

    def __init__(self, *, cfg: RunConfig, role_models: dict[str, ModelBase]) -> None:
        super().__init__(cfg=cfg, role_models=role_models)
        assert isinstance(cfg.method, OdeInitMethodConfig)  # the base class checked it against Config
        self.config: OdeInitMethodConfig = cfg.method
        self.last_step_indices_bf: torch.Tensor | None = None
        """The step indices of the last micro-batch, per sample and latent frame (int64 [B, F], host): which
        stored state each frame's input came from (logging and tests)."""
        self.check_pairs(cfg)

    def check_pairs(self, cfg: RunConfig) -> None:
        """The pairs' manifests against ``denoising_step_list``, before any weight is read (exit 2). Here, not
        in ``check_config``: a finished run's config must still load (``recipes/sample.py``) once its pairs are
        gone."""
        from fv_accel.data.dataset import parse_data_path
        from fv_accel.ode_pairs import pairs_errors
        from fv_accel.runtime import rank0_result

        path = cfg.training.data.data_path
        if path in ("", [], {}):
            return  # the data stream reports a missing data_path

        def check() -> None:
            for entry, _ in parse_data_path(path):
                errors = pairs_errors(Path(entry), self.config.denoising_step_list) if entry.is_dir() else []
                if errors:
                    raise ConfigError(f"training.data.data_path: {errors[0]}")

        # Rank 0 reads the manifests for all (a rank that saw them differently would leave the others alone in
        # the first collective); its error is raised on every rank.
        rank0_result(check)

    def draw_step_indices(self, batch_size: int, block_sizes: Sequence[int]) -> torch.Tensor:
        """Step index per sample and block (or per sample), expanded to latent frames: int64 [B, F] on the host."""
        gen = self.rank_choice_generator
        assert gen is not None, "on_train_start() was not called"
        num_draws = 1 if self.config.same_step_across_blocks else len(block_sizes)
        drawn = torch.randint(len(self.config.denoising_step_list), (batch_size, num_draws), generator=gen)
        if num_draws == 1:
            drawn = drawn.expand(batch_size, len(block_sizes))
        return drawn.repeat_interleave(torch.tensor(list(block_sizes)), dim=1)

    def single_train_step(self, batch: LatentBatch, step: int) -> StepOutput:
        student = self.student
        trajectory, timesteps = batch.trajectory_bkcthw, batch.trajectory_timesteps_bk
        if trajectory is None or timesteps is None or batch.latents_bcthw is None:
            raise DataError("method.name=ode_init needs ODE pairs (recipes/ode_pairs.py) in training.data.data_path")
        steps = [float(s) for s in self.config.denoising_step_list]
        if timesteps.shape[1] != len(steps) or not bool((timesteps == torch.tensor(steps)).all()):
            raise DataError(f"training.data.data_path: rows recorded at timesteps {timesteps[0].tolist()}, "
                            f"method.denoising_step_list is {self.config.denoising_step_list}")
        b, _, _, num_frames, _, _ = trajectory.shape
        index_bf = self.draw_step_indices(b, frame_blocks(student, num_frames))
        self.last_step_indices_bf = index_bf
        # Gathered on the host: one state per frame crosses to the device, not all K.
        x_t = student.normalize_latents(gather_states(trajectory, index_bf).to(student.device, torch.float32))
        t_bf = torch.tensor(steps)[index_bf].to(student.device)
        cond = student.prepare_batch(batch, student.device)
        assert cond.latents_bcthw is not None
        x0_pred = student.predict_x0(x_t, t_bf, cond.text_embeds_bld)
        loss = torch.mean((x0_pred - cond.latents_bcthw) ** 2)
        return StepOutput(losses={"loss": loss}, loss_roles={"loss": "student"},
                          passes={"student": PassCount(forward=b, backward=b)})

    @classmethod
    def sampler(cls, config: MethodConfigBase, *, num_steps: int, guidance_scale: float = 1.0) -> Sampler:
        """The DMD sampler over ``method.denoising_step_list`` (``num_steps`` and guidance do not apply)."""
        assert isinstance(config, OdeInitMethodConfig)
        return DMDSampler(tuple(config.denoising_step_list))


__all__ = ["OdeInitMethod", "OdeInitMethodConfig", "frame_blocks", "gather_states"]
