"""The training-method seed API (DESIGN.md §2): a method owns role models, decides which of them step at each
iteration, and exposes its whole state for distributed checkpointing.

A method never loops over data and never calls ``optimizer.step()``: the loop (``fv_accel/trainer.py``) does,
using :meth:`get_optimizers`, :meth:`get_lr_schedulers` and :meth:`get_grad_clip_targets`.

Backward contract. Per micro-batch the loop calls ``out = single_train_step(batch, step)`` then
``backward(out, grad_accum_rounds=accum)``, and logs and checks every entry of ``out.losses`` for non-finite
values. A method whose roles run one after another may differentiate a loss early, inside
``single_train_step``, through :meth:`TrainingMethod.backward_now`, so that role's graph is freed before the next
role's forward (DMD2: the student's graph before the critic's). Such a loss is still reported in ``losses`` (as a
detached value) and named in ``StepOutput.backpropagated``; :meth:`TrainingMethod.backward` differentiates only
the others. Every loss is differentiated exactly once and scaled by ``1 / grad_accum_rounds``; the early ones use
``training.loop.gradient_accumulation_steps``, and :meth:`backward` refuses a different ``grad_accum_rounds``.
Summing losses of disjoint graphs and differentiating them separately give bitwise the same gradients.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from fv_accel.checkpoint import layout
from fv_accel.checkpoint.states import (
    ModelState,
    OptimizerState,
    RoleModuleContainer,
    SchedulerState,
    unwrap_optimizer,
)
from fv_accel.config import OptimizerConfig, RunConfig
from fv_accel.flops import PassCount
from fv_accel.models.base import ModelBase
from fv_accel.sampling import Generators


@dataclass
class StepOutput:
    """What one micro-batch of :meth:`TrainingMethod.single_train_step` produced."""

    losses: dict[str, torch.Tensor]
    """Scalar losses that :meth:`TrainingMethod.backward` differentiates (and the loop logs)."""
    loss_roles: dict[str, str]
    """Loss name → the role it trains (named in non-finite errors)."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Extra detached scalars to log (must not reuse loss names)."""
    passes: dict[str, PassCount] = field(default_factory=dict)
    """Role → samples its transformer saw in this micro-batch (forwards with or without grad, backwards), as
    plain ints: the loop turns them into FLOPs and MFU (``fv_accel/flops.py``) without a host sync. Empty: no
    MFU is reported."""
    backpropagated: frozenset[str] = frozenset()
    """Names in ``losses`` already differentiated inside ``single_train_step`` (:meth:`TrainingMethod.backward_now`);
    their values are detached and only logged and checked. See the module docstring's backward contract."""


#: ``sampler(model, text_embeds_bld, uncond_embeds_bld, latent_shape [C,T,H,W], generator)`` → x0 in the
#: model's normalised latent space, float32 [B, C, T, H, W]; runs under ``torch.no_grad`` on every rank.
#: ``generator``: one for the batch or one per sample (validation passes one per prompt).
ValidationSampler = Callable[[ModelBase, torch.Tensor, torch.Tensor, Sequence[int], Generators], torch.Tensor]


class TrainingMethod(nn.Module, ABC):
    """Base training method. Construct as ``Method(cfg=run_config, role_models={"student": ..., ...})``."""

    #: the ``method.name`` this class implements
    name: ClassVar[str]
    #: roles the method needs, and which of them must be trainable
    required_roles: ClassVar[tuple[str, ...]] = ("student",)
    trainable_roles: ClassVar[tuple[str, ...]] = ("student",)

    cuda_generator: torch.Generator | None = None
    choice_generator: torch.Generator | None = None

    def __init__(self, *, cfg: RunConfig, role_models: dict[str, ModelBase]) -> None:
        super().__init__()
        missing = [r for r in self.required_roles if r not in role_models]
        if missing:
            raise ValueError(f"method {self.name!r} needs roles {list(self.required_roles)}; missing {missing}")
        for role in self.trainable_roles:
            if not role_models[role]._trainable:
                raise ValueError(f"method {self.name!r}: models.{role}.trainable must be true")
        self.tracker: Any | None = None
        self._role_models: dict[str, ModelBase] = dict(role_models)
        self.student = role_models["student"]
        self.cfg = cfg
        self.training_config = cfg.training
        self.method_config: dict[str, Any] = cfg.method.model_dump()
        validation = cfg.callbacks.validation
        self.validation_config: dict[str, Any] = validation.model_dump() if validation is not None else {}
        self.role_modules = nn.ModuleDict(
            {role: nn.ModuleDict({"transformer": model.transformer}) for role, model in role_models.items()}
        )
        self._optimizer_dict: dict[str, Any] = {}
        self._lr_scheduler_dict: dict[str, Any] = {}
        self.student.init_preprocessors(self.training_config)

    # -- roles, optimizers ----------------------------------------------------------------------------------
    @property
    def role_models(self) -> dict[str, ModelBase]:
        return dict(self._role_models)

    def optimizer_configs(self) -> dict[str, OptimizerConfig]:
        """Optimizer settings for each trainable role. Default: the student uses ``training.optimizer``."""
        return {"student": self.training_config.optimizer}

    def num_optimizer_steps(self, role: str, max_train_steps: int) -> int:
        """How many times ``role``'s optimizer steps in a run (sizes its LR schedule)."""
        return max_train_steps

    def attach_prepared(self, role: str, transformer: nn.Module, optimizer: Any, scheduler: Any) -> None:
        """Record a role's prepared (sharded) transformer, optimizer and LR scheduler."""
        self._role_models[role].transformer = transformer
        self.role_modules[role].add_module("transformer", transformer)  # what ModuleDict's item assignment does
        self._optimizer_dict[role] = optimizer
        self._lr_scheduler_dict[role] = scheduler

    def set_tracker(self, tracker: Any) -> None:
        self.tracker = tracker

    # -- lifecycle ------------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        """Create the shared generator every random draw of the method and its models uses, and the host-side
        ``choice_generator`` for random choices that change the number of forward passes."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        device = self.student.device
        self.cuda_generator = torch.Generator(device=device)
        self.cuda_generator.manual_seed(self.training_config.data.seed * 1_000_003 + rank)
        # Seeded without the rank, so every rank draws the same choices: FSDP collectives stay aligned with no
        # broadcast, and no device→host sync happens inside the step.
        self.choice_generator = torch.Generator()
        self.choice_generator.manual_seed(self.training_config.data.seed * 1_000_003 + 7_919)

    @abstractmethod
    def single_train_step(self, batch: Any, iteration: int) -> StepOutput:
        """All forwards of one micro-batch; returns the losses to differentiate."""

    #: Whether :meth:`backward_now` differentiates at once. False defers every loss to :meth:`backward` (one
    #: combined backward, every role's graph alive until then): the same gradients, more peak memory.
    eager_backward: ClassVar[bool] = True

    def backward_now(self, loss: torch.Tensor) -> bool:
        """Differentiate ``loss`` now, scaled as :meth:`backward` would scale it, and free its graph.

        Returns whether it ran (see :attr:`eager_backward`). When it did, the caller reports ``loss.detach()``
        and lists the loss's name in ``StepOutput.backpropagated``; otherwise it reports ``loss`` as usual."""
        if not self.eager_backward:
            return False
        (loss / self.training_config.loop.gradient_accumulation_steps).backward()
        return True

    def backward(self, output: StepOutput, *, grad_accum_rounds: int = 1) -> None:
        """Differentiate the sum of the losses not already in ``output.backpropagated``, scaled by
        ``1 / grad_accum_rounds``."""
        if output.backpropagated:
            unknown = sorted(output.backpropagated - output.losses.keys())
            if unknown:
                raise ValueError(f"StepOutput.backpropagated names losses it does not report: {unknown}")
            configured = self.training_config.loop.gradient_accumulation_steps
            if grad_accum_rounds != configured:
                raise ValueError(f"backward(grad_accum_rounds={grad_accum_rounds}) but losses "
                                 f"{sorted(output.backpropagated)} were already scaled by 1/{configured} "
                                 "(training.loop.gradient_accumulation_steps)")
        pending = [loss for name, loss in output.losses.items() if name not in output.backpropagated]
        if not pending:
            return
        total = sum(pending[1:], pending[0])
        (total / grad_accum_rounds).backward()

    def get_optimizers(self, iteration: int) -> Sequence[Any]:
        """Only the optimizers that step at ``iteration``. Default: every trainable role's."""
        return list(self._optimizer_dict.values())

    def get_lr_schedulers(self, iteration: int) -> Sequence[Any]:
        return list(self._lr_scheduler_dict.values())

    def get_grad_clip_targets(self, iteration: int) -> dict[str, nn.Module]:
        """Modules whose gradients are clipped (each to its own global norm) at ``iteration``."""
        return {"student": self.student.transformer}

    def validation_sampler(self) -> ValidationSampler:
        """How this method's student generates a sample (used by the validation callback).

        Default: the flow ODE with ``callbacks.validation.num_inference_steps`` Euler steps along the
        student's shifted schedule (``fv_accel.sampling.euler_sample``). Few-step methods override it; DMD2
        samples with ``fv_accel.sampling.dmd_sample`` over ``method.dmd_denoising_steps``.
        """
        from fv_accel.sampling import euler_sample

        num_steps = int(self.validation_config.get("num_inference_steps", 8))
        guidance = float(self.validation_config.get("guidance_scale", 1.0))

        def sample(model: ModelBase, text_embeds_bld: torch.Tensor, uncond_embeds_bld: torch.Tensor,
                   latent_shape: Sequence[int], generator: Generators) -> torch.Tensor:
            return euler_sample(model, text_embeds_bld, latent_shape=latent_shape, num_steps=num_steps,
                                shift=model.flow_shift, generator=generator, guidance_scale=guidance,
                                uncond_embeds_bld=uncond_embeds_bld if guidance != 1.0 else None)

        return sample

    def optimizers_zero_grad(self, iteration: int) -> None:
        for optimizer in self._optimizer_dict.values():
            optimizer.zero_grad(set_to_none=True)

    # -- checkpointing --------------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Stateful]:
        """DCP-ready state of every trainable role: ``roles.<role>.<module>``, ``optimizers.<role>``,
        ``schedulers.<role>``. Per-rank random state is saved separately, after the collective save
        (see :meth:`random_state`)."""
        states: dict[str, Stateful] = {}
        for role, model in self._role_models.items():
            if not model._trainable:
                continue
            modules = {"transformer": model.transformer}
            for module_name, module in modules.items():
                states[layout.role_module_key(role, module_name)] = ModelState(module)
            if role in self._optimizer_dict:
                states[layout.optimizer_key(role)] = OptimizerState(RoleModuleContainer(modules),
                                                              self._optimizer_dict[role])
            if role in self._lr_scheduler_dict:
                states[layout.scheduler_key(role)] = SchedulerState(self._lr_scheduler_dict[role])
        return states

    def random_state(self) -> dict[str, torch.Tensor]:
        """``random_state.*`` of this rank: the method's shared generator."""
        if self.cuda_generator is None or self.choice_generator is None:
            return {}
        return {"generator": self.cuda_generator.get_state(), "choice_generator": self.choice_generator.get_state()}

    def load_random_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.cuda_generator is None or self.choice_generator is None:
            raise RuntimeError("on_train_start() must run before the random state is restored")
        if "generator" in state:
            self.cuda_generator.set_state(state["generator"])
        if "choice_generator" in state:
            self.choice_generator.set_state(state["choice_generator"])

    def seed_optimizer_state_for_resume(self) -> None:
        """Materialise optimizer state (parameters unchanged) so DCP has tensors to load into.

        A fresh AdamW has no state until its first step, and DCP silently loads nothing into an empty
        state. One step with zero gradients and lr 0 creates it; parameters and grads are left as they were.
        """
        for optimizer in self._optimizer_dict.values():
            opt = unwrap_optimizer(optimizer)
            params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
            if all(len(opt.state.get(p, {})) > 0 for p in params):
                continue
            if any(p.grad is not None for p in params):
                raise RuntimeError("seed_optimizer_state_for_resume() must run before any backward")
            saved = [(g, g["lr"]) for g in opt.param_groups]
            for group, _ in saved:
                group["lr"] = 0.0
            for p in params:
                p.grad = torch.zeros_like(p)
            opt.step()
            for group, lr in saved:
                group["lr"] = lr
            for p in params:
                p.grad = None

    def check_optimizer_state_loaded(self) -> None:
        for role, optimizer in self._optimizer_dict.items():
            if len(unwrap_optimizer(optimizer).state) == 0:
                raise RuntimeError(f"optimizer state of role {role!r} is empty after loading the checkpoint")
