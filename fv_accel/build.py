"""Build functions: load roles, construct the method, create optimizers, shard with Accelerate, build data.

Constructors stay cheap (they take built collaborators); everything that reads weights or allocates lives here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import accelerate
import torch
from accelerate import Accelerator
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from diffusers.optimization import get_scheduler

from fv_accel.config import OptimizerConfig, RunConfig
from fv_accel.data import DataStream, build_data_stream
from fv_accel.errors import ConfigError, DataError
from fv_accel.methods import TrainingMethod, method_class
from fv_accel.models import ModelBase, load_role_model, resolve_latent_stats
from fv_accel.runtime import FP32_POLICY, assert_fsdp2_sharded, compute_dtype

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
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.betas[0], cfg.betas[1]),
                             weight_decay=cfg.weight_decay, eps=cfg.eps, **kwargs)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, num_steps: int) -> Any:
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                         num_training_steps=max(num_steps, 1))


def load_roles(cfg: RunConfig, mixed_precision: str) -> dict[str, ModelBase]:
    # Statistics of every role first (Hub ones included): a missing or mismatched latent space stops the run
    # (exit 2) before any weights are read.
    stats = resolve_latent_stats(cfg.models)
    return {role: load_role_model(role, mcfg, mixed_precision=mixed_precision, latent_stats=stats[role])
            for role, mcfg in cfg.models.items()}


def shard_roles(accelerator: Accelerator, method: TrainingMethod, cfg: RunConfig) -> None:
    """FSDP2-shard every role: each trainable role in its own ``prepare()`` call with its optimizer and
    scheduler; frozen roles with the same plugin but no optimizer, kept out of Accelerate's saved models."""
    opt_cfgs = method.optimizer_configs()
    plugin = accelerator.state.fsdp_plugin
    for role, model in method.role_models.items():
        plugin.transformer_cls_names_to_wrap = list(model.block_class_names)
        stored_dtypes = shard_fp32_modules(accelerator, model)
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
            method.role_modules[role].add_module("transformer", transformer)  # ModuleDict item assignment
        finish_prepare(accelerator, role, model, stored_dtypes)
        assert_fsdp2_sharded(role, model.transformer)


def shard_fp32_modules(accelerator: Accelerator, model: ModelBase) -> dict[str, torch.dtype]:
    """Before ``prepare``: under bf16, give each module the family keeps in fp32 (``model.fp32_modules()``) its
    own FSDP2 unit with :data:`FP32_POLICY`, so it is gathered and computed in fp32 as in diffusers' inference
    (in the block's bf16 unit the time embedder's gradients near t = 1000 are tens of % off). Accelerate then
    wraps the blocks and the root around these units. Returns every parameter's stored dtype (master
    weights: fp32), which ``prepare`` must keep (:func:`finish_prepare`)."""
    from torch.distributed.fsdp import fully_shard

    model.compute_dtype = compute_dtype(accelerator.mixed_precision)
    stored = {name: p.dtype for name, p in model.transformer.named_parameters()}
    if accelerator.mixed_precision == "no":
        return stored
    stored.update({name: torch.float32 for name, p in model.transformer.named_parameters() if p.requires_grad})
    plugin = accelerator.state.fsdp_plugin
    mesh = accelerator.torch_device_mesh  # the mesh Accelerate shards the rest of the model over
    if mesh is not None:
        mesh = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    for module in model.fp32_modules():
        fully_shard(module, mesh=mesh,
                    reshard_after_forward=plugin.reshard_after_forward, mp_policy=FP32_POLICY,
                    offload_policy=plugin.cpu_offload)
    return stored


def finish_prepare(accelerator: Accelerator, role: str, model: ModelBase, stored: dict[str, torch.dtype]) -> None:
    """After ``prepare``, hold Accelerate to what fv_accel relies on (accelerate 1.15; see pyproject.toml):
    parameters keep their stored dtypes (1.10–1.12 upcast a frozen bf16 role to fp32: twice its memory), and
    the root unit reshards after forward like every other unit (≥ 1.14 leaves it unsharded, which keeps a
    frozen role's embeddings gathered for the whole run)."""
    from torch.distributed.fsdp import FSDPModule

    changed = [f"{name}: {stored[name]} → {p.dtype}" for name, p in model.transformer.named_parameters()
               if stored.get(name, p.dtype) != p.dtype]
    if changed:
        raise RuntimeError(f"accelerate {accelerate.__version__} changed parameter dtypes of role {role!r} "
                           f"({changed[0]}; {len(changed)} in all): install an accelerate version that "
                           "pyproject.toml allows")
    if isinstance(model.transformer, FSDPModule):
        reshard = accelerator.state.fsdp_plugin.reshard_after_forward
        model.transformer.set_reshard_after_forward(bool(reshard), recurse=False)


def build_run(cfg: RunConfig, accelerator: Accelerator, *, with_data: bool = True) -> BuiltRun:
    models = load_roles(cfg, accelerator.mixed_precision)
    method = method_class(cfg.method.name)(cfg=cfg, role_models=models)
    shard_roles(accelerator, method, cfg)
    data = None
    if with_data:
        data = build_data_stream(cfg.training.data, rank=accelerator.process_index,
                                 world_size=accelerator.num_processes)
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
