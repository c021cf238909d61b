"""The ``--dry-run`` summary: roles, parameters, dtype, sharding, optimizers, data, memory estimate."""

from __future__ import annotations

from typing import Any

import torch

from fv_accel.config import RunConfig


def _local_numel_bytes(module: torch.nn.Module) -> tuple[int, int, int, str]:
    from torch.distributed.tensor import DTensor

    total, local_bytes, trainable = 0, 0, 0
    dtypes: set[str] = set()
    for p in module.parameters():
        total += p.numel()
        local = p.to_local() if isinstance(p, DTensor) else p
        local_bytes += local.numel() * local.element_size()
        if p.requires_grad:
            trainable += p.numel()
        dtypes.add(str(p.dtype).replace("torch.", ""))
    return total, trainable, local_bytes, "/".join(sorted(dtypes))


def run_summary_lines(cfg: RunConfig, accelerator: Any, built: Any) -> list[str]:
    from torch.distributed.fsdp import FSDPModule

    method = built.method
    lines = [f"method: {cfg.method.name}   processes: {accelerator.num_processes}   "
             f"mixed precision: {accelerator.mixed_precision}   device: {accelerator.device}"]
    lines.append(f"{'role':<10}{'params':>14}{'trainable':>11}{'dtype':>18}{'sharding':>22}{'MiB/device':>12}")
    est_bytes = 0
    for role, model in method.role_models.items():
        total, trainable, local_bytes, dtypes = _local_numel_bytes(model.transformer)
        sharding = f"FSDP2 x{accelerator.num_processes}" if isinstance(model.transformer, FSDPModule) else "none"
        lines.append(f"{role:<10}{total:>14,}{'yes' if trainable else 'no':>11}{dtypes:>18}{sharding:>22}"
                     f"{local_bytes / 2**20:>12.1f}")
        est_bytes += local_bytes
        if trainable:
            # fp32 gradient shard + AdamW exp_avg / exp_avg_sq shards
            est_bytes += 3 * local_bytes
    for role, opt_cfg in method.optimizer_configs().items():
        lines.append(f"optimizer[{role}]: AdamW lr={opt_cfg.learning_rate:g} betas={tuple(opt_cfg.betas)} "
                     f"wd={opt_cfg.weight_decay:g} schedule={opt_cfg.lr_scheduler} "
                     f"steps={method.num_optimizer_steps(role, cfg.training.loop.max_train_steps)}")
    if built.data is not None:
        ds = built.data.dataset
        lines.append(f"data: {len(ds)} rows ({ds.kind}) in {len(ds.files)} file(s), latent shape "
                     f"{list(ds.latent_shape)}, {built.data.batches_per_epoch} batches/epoch/rank of "
                     f"{cfg.training.data.train_batch_size}")
    loop = cfg.training.loop
    lines.append(f"steps: {loop.max_train_steps} x {loop.gradient_accumulation_steps} micro-batch(es); "
                 f"output: {cfg.training.checkpoint.output_dir}")
    lines.append(f"estimated memory per device (weights + grads + AdamW, before activations): "
                 f"{est_bytes / 2**30:.3f} GiB")
    return lines


def print_run_summary(cfg: RunConfig, accelerator: Any, built: Any) -> None:
    print("\n".join(run_summary_lines(cfg, accelerator, built)), flush=True)
