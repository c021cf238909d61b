"""Build functions: load roles, construct the method, create optimizers, shard with Accelerate, build data.

Constructors stay cheap (they take built collaborators); everything that reads weights or allocates lives here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from diffusers.optimization import get_scheduler

from fv_accel.config import OptimizerConfig, RunConfig
from fv_accel.data import DataStream, build_data_stream
from fv_accel.errors import ConfigError, DataError
from fv_accel.methods import TrainingMethod, method_class
from fv_accel.models import ModelBase, load_role_model
from fv_accel.runtime import assert_fsdp2_sharded

logger = logging.getLogger(__name__)


@dataclass
class BuiltRun:
    method: TrainingMethod
    data: DataStream | None


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = {}
    if cfg.fused and torch.cuda.is_available():
        kwargs["fused"] = True
    else:
        # FSDP2 parameters are DTensors: the per-tensor loop (PyTorch's CPU default) pays DTensor dispatch for
        # every op of every parameter; the foreach kernels dispatch once per op for the whole list.
        kwargs["foreach"] = True
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=tuple(cfg.betas),  # type: ignore[arg-type]
                             weight_decay=cfg.weight_decay, eps=cfg.eps, **kwargs)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, num_steps: int) -> Any:
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                         num_training_steps=max(num_steps, 1))


def load_roles(cfg: RunConfig, mixed_precision: str) -> dict[str, ModelBase]:
    return {role: load_role_model(role, mcfg, mixed_precision=mixed_precision)
            for role, mcfg in cfg.models.items()}


def shard_roles(accelerator: Accelerator, method: TrainingMethod, cfg: RunConfig) -> None:
    """FSDP2-shard every role: each trainable role in its own ``prepare()`` call with its optimizer and
    scheduler; frozen roles with the same plugin but no optimizer, kept out of Accelerate's saved models."""
    opt_cfgs = method.optimizer_configs()
    plugin = accelerator.state.fsdp_plugin
    for role, model in method.role_models.items():
        plugin.transformer_cls_names_to_wrap = list(model.block_class_names)
        if model._trainable:
            if role not in opt_cfgs:
                raise ValueError(f"method {method.name!r} gives no optimizer settings for trainable role {role!r}")
            params = [p for p in model.transformer.parameters() if p.requires_grad]
            optimizer = build_optimizer(params, opt_cfgs[role])
            num_steps = method.num_optimizer_steps(role, cfg.training.loop.max_train_steps)
            scheduler = build_lr_scheduler(optimizer, opt_cfgs[role], num_steps)
            transformer, optimizer, scheduler = accelerator.prepare(model.transformer, optimizer, scheduler)
            method.attach_prepared(role, transformer, optimizer, scheduler)
        else:
            transformer = fsdp2_prepare_model(accelerator, model.transformer)
            transformer.requires_grad_(False)
            transformer.eval()
            model.transformer = transformer
            method.role_modules[role]["transformer"] = transformer
        assert_fsdp2_sharded(role, model.transformer)


def build_run(cfg: RunConfig, accelerator: Accelerator, *, with_data: bool = True) -> BuiltRun:
    models = load_roles(cfg, accelerator.mixed_precision)
    method = method_class(cfg.method.name)(cfg=cfg, role_models=models)
    shard_roles(accelerator, method, cfg)
    data = None
    if with_data:
        data = build_data_stream(cfg.training.data, rank=accelerator.process_index,
                                 world_size=accelerator.num_processes,
                                 stop_signals=cfg.training.checkpoint.preempt_signals)
        check_latent_patching(method.role_models, data)
    return BuiltRun(method=method, data=data)


def check_latent_patching(role_models: dict[str, ModelBase], data: DataStream) -> None:
    """Fail before step 1 when the data's latents do not split into whole transformer patches: the patch
    embedding would silently drop the last latent row/column and the loss would die on a shape mismatch."""
    dataset = data.dataset
    c, *thw = dataset.latent_shape
    for role, model in role_models.items():
        patch = model.latent_patch_size
        if all(size % p == 0 for size, p in zip(thw, patch, strict=True)):
            continue
        problem = (f"latents [C, T, H, W] = {[c, *thw]} do not divide into models.{role}'s patches (T, H, W) = "
                   f"{list(patch)}")
        if dataset.kind == "text_only":
            raise ConfigError(f"training.data.latent_shape: {problem}")
        raise DataError(f"{dataset.files[0]}: {problem}; preprocess with --height/--width (and --num-frames) "
                        "that give whole patches")
