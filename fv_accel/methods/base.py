"""The training-method seed API (``docs/architecture.md``): a method owns role models, says which of them step
at each step, and exposes its whole state for distributed checkpointing.

Roles are public records (:class:`Role`: name, model, trainable, optimizer, scheduler, modules) in
``method.roles``. A method says which roles step at a step (:meth:`TrainingMethod.stepping_roles`); the
optimizers, schedulers and clip targets the loop uses derive from that in this base class. A method never
loops over data and never calls ``optimizer.step()``: the loop (``fv_accel/trainer.py``) does.

A method is one file: its ``Config`` (a strict pydantic model deriving from
:class:`fv_accel.config.MethodConfigBase`), its role rules (:attr:`TrainingMethod.required_roles`,
:attr:`~TrainingMethod.trainable_roles`, :attr:`~TrainingMethod.frozen_roles`,
:meth:`~TrainingMethod.default_roles`, :meth:`~TrainingMethod.check_config`) and the class, registered with
``@register_method`` (``fv_accel/methods/registry.py``).

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
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
from fv_accel.config import MethodConfigBase, OptimizerConfig, RunConfig
from fv_accel.errors import ConfigError
from fv_accel.flops import PassCount
from fv_accel.models.base import ModelBase
from fv_accel.runtime import RANK_CHOICE_STREAM_OFFSET, SHARED_STREAM_OFFSET, Topology, derived_seed
from fv_accel.sampling import EulerSampler, Generators, Sampler


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


@dataclass
class Role:
    """One role of a method: its model and, for a trainable role once it is prepared, its optimizer and LR
    scheduler (Accelerate-prepared objects). :func:`fv_accel.build.shard_roles` fills those in through
    :meth:`TrainingMethod.attach_prepared`."""

    name: str
    model: ModelBase
    trainable: bool
    optimizer: Any | None = None
    scheduler: Any | None = None

    @property
    def modules(self) -> dict[str, nn.Module]:
        """The role's modules by name (``transformer``, and ``transformer_2`` for a two-expert family)."""
        return self.model.modules()

    @property
    def clip_target(self) -> nn.Module:
        """The module whose gradients are clipped to one global norm: the only trained module, or all of them
        (a two-expert role clips both experts to one norm, as one optimizer steps them)."""
        trained = self.model.trained_modules()
        modules = {name: module for name, module in self.modules.items() if name in trained} or self.modules
        return next(iter(modules.values())) if len(modules) == 1 else RoleModuleContainer(modules)


#: ``sampler(model, text_embeds_bld, uncond_embeds_bld, latent_shape [C,T,H,W], generator)`` → x0 in the
#: model's normalised latent space, float32 [B, C, T, H, W]; runs under ``torch.no_grad`` on every rank.
#: ``generator``: one for the batch or one per sample (validation passes one per prompt).
ValidationSampler = Callable[[ModelBase, torch.Tensor, torch.Tensor, Sequence[int], Generators], torch.Tensor]


class TrainingMethod(nn.Module, ABC):
    """Base training method. Construct as ``Method(cfg=run_config, role_models={"student": ..., ...})``."""

    #: the ``method.name`` this class implements
    name: ClassVar[str]
    #: the method's own configuration section (``method``); the base class accepts any method's
    Config: ClassVar[type[MethodConfigBase]] = MethodConfigBase
    #: roles the method needs; which of them must be trainable, and which must be frozen
    required_roles: ClassVar[tuple[str, ...]] = ("student",)
    trainable_roles: ClassVar[tuple[str, ...]] = ("student",)
    frozen_roles: ClassVar[tuple[str, ...]] = ()

    cuda_generator: torch.Generator | None = None
    choice_generator: torch.Generator | None = None
    rank_choice_generator: torch.Generator | None = None
    #: where this process sits (set by ``fv_accel.build.build_run``; None: read from the process group)
    topology: Topology | None = None

    # -- role rules (read when the configuration is validated, and again at construction) --------------------
    @classmethod
    def default_roles(cls, models: dict[str, Any]) -> dict[str, Any]:
        """``models`` (raw config entries) with the roles this method fills in when they are not given."""
        return models

    @classmethod
    def role_errors(cls, trainable: Mapping[str, bool]) -> list[str]:
        """What is wrong with roles ``{role: trainable}`` for this method (each a message naming the key)."""
        errors = [f"models.{r} is required for method.name={cls.name}" for r in cls.required_roles
                  if r not in trainable]
        errors += [f"models.{r}.trainable must be true for method.name={cls.name}" for r in cls.trainable_roles
                   if r in trainable and not trainable[r]]
        errors += [f"models.{r}.trainable must be false for method.name={cls.name} (the {r} is frozen)"
                   for r in cls.frozen_roles if trainable.get(r)]
        return errors

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:  # noqa: B027 - optional hook
        """Cross-field checks of a validated run for this method; raise ValueError naming the keys."""

    def __init__(self, *, cfg: RunConfig, role_models: dict[str, ModelBase]) -> None:
        super().__init__()
        problems = self.role_errors({role: model.config.trainable for role, model in role_models.items()})
        if problems:
            raise ConfigError(problems[0])
        if not isinstance(cfg.method, self.Config):
            raise ConfigError(f"method {self.name!r} needs a {self.Config.__name__} method section "
                              f"(got {type(cfg.method).__name__})")
        self.tracker: Any | None = None
        self.roles: dict[str, Role] = {role: Role(role, model, model.config.trainable)
                                       for role, model in role_models.items()}
        self.student = role_models["student"]
        self.cfg = cfg
        self.config: MethodConfigBase = cfg.method
        """This method's own typed configuration (``method``)."""
        self.training_config = cfg.training
        self.method_config: dict[str, Any] = cfg.method.model_dump()
        """The seed API's plain-dict view of ``method``; code reads the typed :attr:`config`."""
        validation = cfg.callbacks.validation
        self.validation_config: dict[str, Any] = validation.model_dump() if validation is not None else {}
        self.role_modules = nn.ModuleDict(
            {role: nn.ModuleDict(model.modules()) for role, model in role_models.items()}
        )
        self.student.init_preprocessors(self.training_config)

    # -- roles, optimizers ----------------------------------------------------------------------------------
    @property
    def role_models(self) -> dict[str, ModelBase]:
        return {name: role.model for name, role in self.roles.items()}

    def optimizer_configs(self) -> dict[str, OptimizerConfig]:
        """Optimizer settings for each trainable role. Default: the student uses ``training.optimizer``."""
        return {"student": self.training_config.optimizer}

    def num_optimizer_steps(self, role: str, max_train_steps: int) -> int:
        """How many times ``role``'s optimizer steps in a run (sizes its LR schedule)."""
        return max_train_steps

    def attach_prepared(self, role: str, modules: Mapping[str, nn.Module], optimizer: Any = None,
                        scheduler: Any = None) -> None:
        """Record a role's prepared (sharded) modules and, for a trainable role, its optimizer and LR scheduler.
        The one place where the model, ``role_modules`` and the role record learn the prepared modules."""
        record = self.roles[role]
        for name, module in modules.items():
            setattr(record.model, name, module)
            self.role_modules[role].add_module(name, module)  # what ModuleDict's item assignment does
        record.optimizer = optimizer
        record.scheduler = scheduler

    def set_tracker(self, tracker: Any) -> None:
        self.tracker = tracker

    def stepping_roles(self, step: int) -> list[str]:
        """The roles whose optimizers step at (1-based) ``step``. Default: every role that has an optimizer.
        The optimizers, LR schedulers and clip targets of the step derive from it."""
        return [name for name, role in self.roles.items() if role.optimizer is not None]

    def get_optimizers(self, step: int) -> Sequence[Any]:
        """The optimizers that step at ``step`` (those of :meth:`stepping_roles`)."""
        return [self.roles[r].optimizer for r in self.stepping_roles(step) if self.roles[r].optimizer is not None]

    def get_lr_schedulers(self, step: int) -> Sequence[Any]:
        return [self.roles[r].scheduler for r in self.stepping_roles(step) if self.roles[r].scheduler is not None]

    def get_grad_clip_targets(self, iteration: int) -> dict[str, nn.Module]:
        """Modules whose gradients are clipped (each role to its own global norm) at step ``iteration`` (the
        seed API's name for the loop's step): the stepping roles'."""
        return {r: self.roles[r].clip_target for r in self.stepping_roles(iteration)}

    # -- lifecycle ------------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        """Create the per-rank generator every random draw of the method and its models uses (``cuda_generator``,
        on the student's device), the host-side ``choice_generator`` for random choices that change the number
        of forward passes (the same on every rank), and the host-side ``rank_choice_generator`` for choices that
        may differ between data ranks without changing it (no device→host sync to read them)."""
        topology = self.topology or Topology.from_process_group()
        seed = self.training_config.data.seed
        self.cuda_generator = torch.Generator(device=self.student.device)
        # Per data rank, not per rank: the ranks of a context-parallel group split one sample's sequence and
        # must draw the same noise and timesteps (nothing would fail otherwise, the loss would just be wrong).
        self.cuda_generator.manual_seed(derived_seed(seed, topology.data_rank))
        # Seeded without the rank, so every rank draws the same choices: FSDP collectives stay aligned with no
        # broadcast, and no device→host sync happens inside the step.
        self.choice_generator = torch.Generator()
        self.choice_generator.manual_seed(derived_seed(seed, SHARED_STREAM_OFFSET))
        # Per data rank too: context-parallel peers must run the same rollout (e.g. DMD2's per-rank graded step).
        self.rank_choice_generator = torch.Generator()
        self.rank_choice_generator.manual_seed(derived_seed(seed, topology.data_rank + RANK_CHOICE_STREAM_OFFSET))

    @abstractmethod
    def single_train_step(self, batch: Any, step: int) -> StepOutput:
        """All forwards of one micro-batch of (1-based) ``step``; returns the losses to differentiate."""

    #: Whether :meth:`backward_now` differentiates at once. False defers every loss to :meth:`backward` (one
    #: combined backward, every role's graph alive until then): the same gradients, more peak memory.
    eager_backward: ClassVar[bool] = True

    def backward_now(self, loss: torch.Tensor) -> bool:
        """Differentiate ``loss`` now, scaled as :meth:`backward` would scale it, and free its graph.

        Returns whether it ran (see :attr:`eager_backward`). When it did, the caller reports ``loss.detach()``
        and lists the loss's name in ``StepOutput.backpropagated``; otherwise it reports ``loss`` as usual."""
        if not self.eager_backward:
            return False
        (loss * self.gradient_scale / self.training_config.loop.gradient_accumulation_steps).backward()
        return True

    @property
    def gradient_scale(self) -> int:
        """What every loss is multiplied by before backward: the context-parallel degree (1 without).

        Each rank of a context-parallel group computes the same full loss (the output is gathered) but only its
        tokens' share of every gradient; the right gradient is the sum over the group. FSDP2 averages over all
        ranks it shards over (dp_shard × cp), so without this factor every gradient is ``cp`` times too small:
        AdamW hides most of it, gradient clipping and ``eps`` do not."""
        return self.topology.cp_size if self.topology is not None else 1

    def backward(self, output: StepOutput, *, grad_accum_rounds: int = 1) -> None:
        """Differentiate the sum of the losses not already in ``output.backpropagated``, scaled by
        ``gradient_scale / grad_accum_rounds``."""
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
        (total * self.gradient_scale / grad_accum_rounds).backward()

    @classmethod
    def sampler(cls, config: MethodConfigBase, *, num_steps: int, guidance_scale: float = 1.0) -> Sampler:
        """How a student trained by this method generates, from the method's config alone (so offline tools,
        ``recipes/sample.py``, ask the same place as training). Default: the flow ODE with ``num_steps`` Euler
        steps along the model's shifted schedule and ``guidance_scale`` (``fv_accel.sampling.EulerSampler``);
        few-step methods override it (DMD2: its ``dmd_denoising_steps``)."""
        return EulerSampler(num_steps, guidance_scale)

    def validation_sampler(self) -> ValidationSampler:
        """The sampler validation uses: :meth:`sampler` with ``callbacks.validation``'s steps and guidance."""
        from fv_accel.config import ValidationConfig

        validation = self.cfg.callbacks.validation or ValidationConfig()
        return type(self).sampler(self.config, num_steps=validation.num_inference_steps,
                                  guidance_scale=validation.guidance_scale)

    def optimizers(self) -> dict[str, Any]:
        """Every role's optimizer (as prepared), by role."""
        return {name: role.optimizer for name, role in self.roles.items() if role.optimizer is not None}

    def optimizers_zero_grad(self, step: int) -> None:
        for optimizer in self.optimizers().values():
            optimizer.zero_grad(set_to_none=True)

    # -- checkpointing --------------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Stateful]:
        """DCP-ready state of every trainable role: ``roles.<role>.<module>`` (a LoRA role: its adapters only),
        ``optimizers.<role>``, ``schedulers.<role>``. Per-rank random state is saved separately, after the collective save
        (see :meth:`random_state`)."""
        states: dict[str, Stateful] = {}
        for name, role in self.roles.items():
            if not role.trainable:
                continue
            modules = role.modules
            for module_name, module in modules.items():
                if module_name not in role.model.trained_modules():  # a frozen expert: read from init_from again
                    continue
                states[layout.role_module_key(name, module_name)] = ModelState(
                    module, trainable_only=role.model.config.lora is not None)
            if role.optimizer is not None:
                states[layout.optimizer_key(name)] = OptimizerState(RoleModuleContainer(modules), role.optimizer)
            if role.scheduler is not None:
                states[layout.scheduler_key(name)] = SchedulerState(role.scheduler)
        return states

    def random_state(self) -> dict[str, torch.Tensor]:
        """``random_state.*`` of this rank: the method's generators (see :meth:`on_train_start`)."""
        generators = self._generators()
        if generators is None:
            return {}
        return {key: gen.get_state() for key, gen in generators.items()}

    def load_random_state(self, state: dict[str, torch.Tensor]) -> None:
        generators = self._generators()
        if generators is None:
            raise RuntimeError("on_train_start() must run before the random state is restored")
        for key, gen in generators.items():
            if key in state:  # a checkpoint from before a generator existed keeps its fresh seed
                gen.set_state(state[key])

    def _generators(self) -> dict[str, torch.Generator] | None:
        """The method's generators by their ``random_state`` key; None before :meth:`on_train_start`."""
        if self.cuda_generator is None or self.choice_generator is None or self.rank_choice_generator is None:
            return None
        return {"generator": self.cuda_generator, "choice_generator": self.choice_generator,
                "rank_choice_generator": self.rank_choice_generator}

    def seed_optimizer_state_for_resume(self) -> None:
        """Materialise optimizer state (parameters unchanged) so DCP has tensors to load into.

        A fresh AdamW has no state until its first step, and DCP silently loads nothing into an empty
        state. One step with zero gradients and lr 0 creates it; parameters and grads are left as they were.
        """
        for optimizer in self.optimizers().values():
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
        for role, optimizer in self.optimizers().items():
            if len(unwrap_optimizer(optimizer).state) == 0:
                raise RuntimeError(f"optimizer state of role {role!r} is empty after loading the checkpoint")
